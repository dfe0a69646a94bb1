/*
 * net-hostile: transmit chains that break the virtio-net framing rules
 * (security-tests.md 20). Each hand-made chain goes on the descriptors of
 * transmit slots 0-2 (nothing else is in flight), head 0, then QueueNotify.
 * kiln must return the chain (used entry id 0, length 0) with its interrupt
 * and keep the queue working: a normal ping must succeed afterwards.
 * Negotiated: VERSION_1 and MAC only (so checksum and GSO headers are not
 * allowed).
 */
#include "cpu.h"
#include "lib.h"
#include "mm.h"
#include "net.h"
#include "report.h"
#include "scenario.h"

#define MAX_FRAME_TOTAL     65562       /* kiln's limit: 64 KiB + 14 + 12 */
#define BIG_BYTES           (MAX_FRAME_TOTAL + 4096)
#define PING_ID             0x6b68      /* "kh" */
#define WAIT_MS             2000

enum net_case {
    TX_TOO_LONG, TX_MAX, TX_SHORT, TX_ZERO, TX_HDR_ONLY, TX_SPLIT,
    TX_WRITABLE, TX_GSO_UNNEG, TX_CSUM_UNNEG, NET_CASES
};

static const char *const case_names[NET_CASES] = {
    "tx-too-long", "tx-max", "tx-short", "tx-zero", "tx-hdr-only", "tx-split",
    "tx-writable", "tx-gso-unneg", "tx-csum-unneg",
};

static u8 *big;                 /* BIG_BYTES of DMA memory, allocated once */
static u16 ping_seq;

static void set_desc(struct net_dev *n, u16 i, const void *addr, u32 len, u16 flags, u16 next)
{
    volatile struct virtq_desc *d = &n->txq->desc[i];
    d->addr = virt_to_phys(addr);
    d->len = len;
    d->flags = flags;
    d->next = next;
}

/* A minimal frame to the peer (local experimental EtherType: nobody answers). */
static u32 filler_frame(struct net_dev *n, u8 *f, u32 len)
{
    memset(f, 0, len);
    memcpy(f, net_cfg.peer_mac, 6);
    memcpy(f + 6, n->mac, 6);
    put16(f + 12, ETH_P_LOCAL_EXP);
    return len;
}

/*
 * Posts head 0 and waits for it: the used entry's length, or a reason in
 * *why ("used=none", "used-id=<n>") and -1.
 */
static s64 post_and_wait(struct net_dev *n, char *why, size_t size, bool *irq)
{
    struct virtq *vq = n->txq;
    virtq_post(vq, 0);
    virtq_notify(vq);
    enum virtq_wait_result w = virtq_wait(vq, WAIT_MS);
    *irq = w == VIRTQ_WAIT_IRQ;
    u32 id, len;
    if (w == VIRTQ_WAIT_TIMEOUT || !virtq_pop_used(vq, &id, &len, false)) {
        ksnprintf(why, size, "used=none");
        return -1;
    }
    if (id != 0) {
        ksnprintf(why, size, "used-id=%u", id);
        return -1;
    }
    /* Nothing else may come back. */
    if (virtq_has_used(vq)) {
        ksnprintf(why, size, "extra-used");
        return -1;
    }
    return len;
}

static void run_case(struct net_dev *n, enum net_case c)
{
    const char *name = case_names[c];
    u8 *slot0 = net_tx_frame(n, 0) - NET_HDR_LEN;      /* header + frame, NET_BUF_SIZE */
    struct virtio_net_hdr *hdr = (struct virtio_net_hdr *)slot0;
    u8 *frame = slot0 + NET_HDR_LEN;
    bool want_reply = false;
    u16 seq = 0;
    u32 data_len = 56;

    memset(slot0, 0, NET_HDR_LEN);
    switch (c) {
    case TX_TOO_LONG:
    case TX_MAX: {
        u32 total = c == TX_TOO_LONG ? MAX_FRAME_TOTAL + 1 : MAX_FRAME_TOTAL;
        memset(big, 0, NET_HDR_LEN);
        filler_frame(n, big + NET_HDR_LEN, total - NET_HDR_LEN);
        set_desc(n, 0, big, total, 0, 0);
        break;
    }
    case TX_SHORT:
        set_desc(n, 0, slot0, NET_HDR_LEN - 1, 0, 0);
        break;
    case TX_ZERO:
        set_desc(n, 0, slot0, 0, VIRTQ_DESC_F_NEXT, 1);
        set_desc(n, 1, slot0, 0, 0, 0);
        break;
    case TX_HDR_ONLY:
        set_desc(n, 0, slot0, NET_HDR_LEN, 0, 0);
        break;
    case TX_SPLIT: {
        /* A valid echo request, split at odd places, the header across two buffers. */
        seq = ++ping_seq;
        want_reply = true;
        u32 len = net_ping_build(n, frame, PING_ID, seq, data_len);
        set_desc(n, 0, slot0, 5, VIRTQ_DESC_F_NEXT, 1);
        set_desc(n, 1, slot0 + 5, 16, VIRTQ_DESC_F_NEXT, 2);
        set_desc(n, 2, slot0 + 21, NET_HDR_LEN + len - 21, 0, 0);
        break;
    }
    case TX_WRITABLE:
        set_desc(n, 0, slot0, NET_HDR_LEN + filler_frame(n, frame, 60), VIRTQ_DESC_F_WRITE, 0);
        break;
    case TX_GSO_UNNEG:
        hdr->gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
        hdr->hdr_len = 54;
        hdr->gso_size = 1448;
        set_desc(n, 0, slot0, NET_HDR_LEN + filler_frame(n, frame, 60), 0, 0);
        break;
    case TX_CSUM_UNNEG:
        hdr->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        hdr->csum_start = 34;
        hdr->csum_offset = 6;
        set_desc(n, 0, slot0, NET_HDR_LEN + filler_frame(n, frame, 60), 0, 0);
        break;
    default:
        return;
    }

    char why[48];
    bool irq;
    s64 len = post_and_wait(n, why, sizeof(why), &irq);
    if (len < 0) {
        fail("net-hostile", "%s %s", name, why);
    } else {
        const char *reply = want_reply ? net_ping_wait(n, PING_ID, seq, data_len, WAIT_MS) : NULL;
        if (len == 0 && irq && !reply)
            ok("net-hostile", "%s used-len=0%s", name, want_reply ? " reply=ok" : "");
        else
            fail("net-hostile", "%s used-len=%lld%s%s%s", name, len, irq ? "" : " irq=none",
                 reply ? " reply=" : "", reply ? reply : "");
    }

    /* The queue must keep working: a normal ping through the normal path. */
    const char *r = net_ping(n, PING_ID, ++ping_seq, 56, WAIT_MS);
    if (r)
        fail("net-hostile", "%s not-recovered ping=%s", name, r);
    else
        ok("net-hostile", "%s recovered", name);
}

/* "<case>|all" */
void scn_net_hostile(const char *arg)
{
    u32 first = 0, last = NET_CASES;
    if (arg && *arg && strcmp(arg, "all") != 0) {
        for (first = 0; first < NET_CASES; first++)
            if (strcmp(arg, case_names[first]) == 0)
                break;
        if (first == NET_CASES) {
            fail("net-hostile", "unknown-case=%s", arg);
            return;
        }
        last = first + 1;
    }
    const char *why = "";
    if (!net_cfg_load(&why)) {
        fail("net-hostile", "config %s", why);
        return;
    }
    if (!big && !(big = dma_alloc(BIG_BYTES))) {
        fail("net-hostile", "out-of-dma-memory");
        return;
    }
    struct net_dev *n = net_open(0, 0, 0, 0, &why);
    if (!n) {
        fail("net-hostile", "init %s", why);
        return;
    }
    if (!net_resolve_peer(n)) {
        fail("net-hostile", "arp timeout");
        return;
    }
    info("net-hostile", "dev=%u acked=0x%llx cases=%u", n->vdev->index, n->vdev->acked,
         last - first);
    for (u32 c = first; c < last; c++) {
        /* Hand-made chains use slots 0-2: nothing may be in flight. */
        if (!net_tx_drain(n, WAIT_MS)) {
            fail("net-hostile", "%s setup=tx-busy", case_names[c]);
            continue;
        }
        run_case(n, (enum net_case)c);
    }
}
