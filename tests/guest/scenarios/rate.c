/*
 * Floods for rate-limiter tests (tests/rate_limit.rs): the device is kept
 * busy with a fixed set of requests in flight, each re-posted as soon as it
 * comes back, forever (the host stops the VM). Every REPORT_TSC ticks the
 * guest prints its own count of completed work; the host timestamps those
 * lines as they arrive, which makes the rate oracle independent of kiln's
 * counters.
 *
 *   blk-flood:<size>[:<dev>]   reads of `size` bytes (sector 0), 80 in flight
 *       bench blk-flood n=<reads completed> bytes=<n * size>
 *   net-flood:tx:<size>        UDP frames of `size` bytes to the peer's port
 *                              9000, 128 in flight (the host counts them)
 *       bench net-flood dir=tx n=<frames completed>
 *   net-flood:rx:<size>        counts UDP frames of `size` bytes to port 9001
 *       bench net-flood dir=rx n=<frames received> bytes=<n * size>
 */
#include "cpu.h"
#include "irq.h"
#include "lib.h"
#include "mm.h"
#include "net.h"
#include "report.h"
#include "scenario.h"
#include "virtio_blk.h"
#include "virtio_net.h"

/* Requests in flight: enough for ~0.1 s at the tested rates, so a guest descheduled
 * for a while on a busy host still leaves the device a backlog. */
#define BLK_DEPTH       80      /* 3 descriptors each, of 256 */
#define NET_DEPTH       128
#define FLOOD_MAX_SIZE  (256 * KiB)
/* ~0.05-0.2 s between progress lines, whatever the TSC rate. */
#define REPORT_TSC      200000000ULL
#define PORT_TX         9000
#define PORT_RX         9001

static bool num(const char *s, size_t len, u64 *out)
{
    return len > 0 && parse_u64(s, len, out);
}

/* Waits for used entries (interrupt or a 100 ms poll) and re-posts every one that came back. */
static u64 flood_round(struct virtq *vq)
{
    virtq_wait(vq, 100);
    u64 done = 0;
    u32 id, len;
    while (virtq_pop_used(vq, &id, &len, false)) {
        virtq_post(vq, (u16)id);
        done++;
    }
    if (done)
        virtq_kick(vq);
    return done;
}

void scn_blk_flood(const char *arg)
{
    u64 size = 0, dev = 0;
    const char *colon = NULL;
    size_t len = 0;
    for (; arg && arg[len]; len++) {
        if (arg[len] == ':') {
            colon = arg + len;
            break;
        }
    }
    if (!arg || !num(arg, len, &size) || (colon && !num(colon + 1, strlen(colon + 1), &dev))
        || size == 0 || size % BLK_SECTOR_SIZE || size > FLOOD_MAX_SIZE
        || dev >= VIRTIO_MAX_DEVICES) {
        fail("blk-flood", "bad-arg=%s", arg ? arg : "");
        return;
    }
    const char *why = "";
    struct blk_dev *b = blk_open((u32)dev, VIRTIO_F_EVENT_IDX, false, &why);
    if (!b) {
        fail("blk-flood", "init dev=%llu %s", dev, why);
        return;
    }
    if (b->capacity < size / BLK_SECTOR_SIZE) {
        fail("blk-flood", "dev=%llu capacity=%llu size=%llu", dev, b->capacity, size);
        return;
    }
    static u8 *data, *meta;
    if (!data) {
        data = dma_alloc(FLOOD_MAX_SIZE);
        meta = dma_alloc(PAGE_SIZE);
    }
    struct virtq *vq = &b->vdev->vq[0];
    /* Request i: descriptors 3i (header), 3i+1 (data, shared), 3i+2 (status). */
    for (u16 i = 0; i < BLK_DEPTH; i++) {
        volatile struct virtio_blk_req_hdr *h = (void *)(meta + 16 * i);
        h->type = VIRTIO_BLK_T_IN;
        h->reserved = 0;
        h->sector = 0;
        volatile struct virtq_desc *d = &vq->desc[3 * i];
        d[0].addr = virt_to_phys((void *)h);
        d[0].len = 16;
        d[0].flags = VIRTQ_DESC_F_NEXT;
        d[0].next = (u16)(3 * i + 1);
        d[1].addr = virt_to_phys(data);
        d[1].len = (u32)size;
        d[1].flags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
        d[1].next = (u16)(3 * i + 2);
        d[2].addr = virt_to_phys(meta + 16 * BLK_DEPTH + i);
        d[2].len = 1;
        d[2].flags = VIRTQ_DESC_F_WRITE;
        d[2].next = 0;
    }
    info("blk-flood", "begin dev=%llu size=%llu depth=%u", dev, size, BLK_DEPTH);
    for (u16 i = 0; i < BLK_DEPTH; i++)
        virtq_post(vq, (u16)(3 * i));
    virtq_kick(vq);
    u64 done = 0, last = rdtsc();
    for (;;) {
        done += flood_round(vq);
        u64 now = rdtsc();
        if (now - last >= REPORT_TSC) {
            bench("blk-flood", "n=%llu bytes=%llu", done, done * size);
            last = now;
        }
    }
}

static void flood_tx(struct net_dev *n, u32 size)
{
    struct virtq *vq = n->txq;
    if (!net_tx_drain(n, NET_TIMEOUT_MS)) {
        fail("net-flood", "dir=tx tx-busy");
        return;
    }
    for (u16 i = 0; i < NET_DEPTH; i++) {
        u8 *f = net_tx_frame(n, i);
        udp_build(f, n->mac, net_cfg.peer_mac, net_cfg.peer, PORT_TX, PORT_TX,
                  size - UDP_FRAME_LEN(0));
        memset(f - NET_HDR_LEN, 0, NET_HDR_LEN);
        vq->desc[i].addr = virt_to_phys(f - NET_HDR_LEN);
        vq->desc[i].len = NET_HDR_LEN + size;
        vq->desc[i].flags = 0;
        vq->desc[i].next = 0;
    }
    info("net-flood", "begin dir=tx size=%u depth=%u", size, NET_DEPTH);
    for (u16 i = 0; i < NET_DEPTH; i++)
        virtq_post(vq, i);
    virtq_kick(vq);
    u64 done = 0, last = rdtsc();
    for (;;) {
        done += flood_round(vq);
        u64 now = rdtsc();
        if (now - last >= REPORT_TSC) {
            bench("net-flood", "dir=tx n=%llu", done);
            last = now;
        }
    }
}

static void flood_rx(struct net_dev *n, u32 size)
{
    struct virtq *vq = n->rxq;
    info("net-flood", "begin dir=rx size=%u port=%u", size, PORT_RX);
    u64 received = 0, last = rdtsc();
    for (;;) {
        virtq_wait(vq, 100);
        u32 id, len;
        while (virtq_pop_used(vq, &id, &len, false)) {
            if (id >= n->rx_bufs)
                continue;
            const u8 *f = n->rx_mem + (u64)id * n->rx_buf_len + NET_HDR_LEN;
            if (len == NET_HDR_LEN + size && get16(f + 12) == ETH_P_IP
                && get16(f + ETH_HLEN + IP_HLEN + 2) == PORT_RX) {
                received++;
            } else if (len >= NET_HDR_LEN) {
                struct pkt p;
                net_parse(f, len - NET_HDR_LEN, &p, false);
                net_respond(n, f, len - NET_HDR_LEN, &p);
            }
            n->recycle[n->nrecycle++] = (u16)id;
        }
        net_rx_flush(n);
        u64 now = rdtsc();
        if (now - last >= REPORT_TSC) {
            bench("net-flood", "dir=rx n=%llu bytes=%llu", received, received * size);
            last = now;
        }
    }
}

void scn_net_flood(const char *arg)
{
    struct net_args a;
    u64 size = 0;
    bool parsed = net_args_parse(&a, arg) && a.n >= 2;
    bool tx = parsed && strcmp(a.tok[0], "tx") == 0;
    bool rx = parsed && strcmp(a.tok[0], "rx") == 0;
    if ((!tx && !rx) || !parse_u64(a.tok[1], strlen(a.tok[1]), &size)
        || size < UDP_FRAME_LEN(4) || size > NET_ETH_MAX) {
        fail("net-flood", "bad-arg=%s", arg ? arg : "");
        return;
    }
    const char *why = "";
    if (!net_cfg_load(&why)) {
        fail("net-flood", "config %s", why);
        return;
    }
    struct net_dev *n = net_open(0, VIRTIO_F_EVENT_IDX, 0, 0, &why);
    if (!n) {
        fail("net-flood", "init %s", why);
        return;
    }
    if (!net_resolve_peer(n)) {
        fail("net-flood", "arp timeout");
        return;
    }
    if (tx)
        flood_tx(n, (u32)size);
    else
        flood_rx(n, (u32)size);
}
