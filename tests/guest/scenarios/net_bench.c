/*
 * net-bench: frames through kiln's virtio-net as cheaply as the guest can
 * (prepared once, fixed descriptors), for benches/net.rs, which samples the
 * VMM threads' CPU time at the begin and end lines.
 *
 *   tx: n UDP frames of `size` bytes to the peer, `batch` chains posted per
 *       notification; used_event asks for one interrupt per batch, whose
 *       chains are all reclaimed before the next batch is posted.
 *   rx: the host sends UDP frames of `size` bytes to port 9001 in bursts of
 *       `batch`; the guest consumes each burst (used_event: one interrupt per
 *       burst), posts the buffers again with one kick and acknowledges with a
 *       4-byte UDP datagram (frames received so far) to the peer's port 9002.
 */
#include "cpu.h"
#include "irq.h"
#include "lib.h"
#include "mm.h"
#include "net.h"
#include "report.h"
#include "scenario.h"

#define PORT_TX_SRC         9000
#define PORT_TX_DST         9000
#define PORT_RX             9001
#define PORT_ACK            9002
#define SETTLE_MS           100
#define WAIT_MS             1000
#define RX_IDLE_MS          1000

static void sleep_ms(u64 ms)
{
    static volatile u32 never;
    wait_for_irq(&never, ms);
}

static volatile u16 *used_event(struct virtq *vq)
{
    return &vq->avail->ring[vq->size];
}

/* Sleeps until `count` used entries are there; false after WAIT_MS without progress. */
static bool wait_used_count(struct virtq *vq, u16 count)
{
    struct virtio_dev *d = vq->dev;
    for (;;) {
        cli();
        u16 have = (u16)(virtq_used_idx(vq) - vq->last_used);
        if (have >= count)
            return true;
        d->irq_used_flag = 0;
        if ((u16)(virtq_used_idx(vq) - vq->last_used) != have)
            continue;
        if (!wait_for_irq(&d->irq_used_flag, WAIT_MS)
            && (u16)(virtq_used_idx(vq) - vq->last_used) == have)
            return false;
    }
}

static void bench_tx(struct net_dev *n, u64 count, u32 size, u16 batch)
{
    struct virtq *vq = n->txq;
    u16 slots = MIN(batch, vq->size);
    /* The ARP request's chain must be back: from here on the ring only holds ours. */
    if (!net_tx_drain(n, NET_TIMEOUT_MS)) {
        fail("net-bench", "dir=tx tx-busy");
        return;
    }
    /* One frame, copied into every slot once; descriptor i = slot i, fixed. */
    u8 *f0 = net_tx_frame(n, 0);
    udp_build(f0, n->mac, net_cfg.peer_mac, net_cfg.peer, PORT_TX_SRC, PORT_TX_DST,
              size - UDP_FRAME_LEN(0));
    for (u16 i = 0; i < slots; i++) {
        u8 *f = net_tx_frame(n, i);
        if (i)
            memcpy(f, f0, size);
        memset(f - NET_HDR_LEN, 0, NET_HDR_LEN);
        vq->desc[i].addr = virt_to_phys(f - NET_HDR_LEN);
        vq->desc[i].len = NET_HDR_LEN + size;
        vq->desc[i].flags = 0;
        vq->desc[i].next = 0;
    }
    info("net-bench", "begin dir=tx n=%llu size=%u batch=%u", count, size, batch);
    sleep_ms(SETTLE_MS);
    u32 irqs0 = n->vdev->used_irqs;
    u64 sent = 0;
    bool stuck = false;
    u64 t0 = rdtsc();
    while (sent < count) {
        u16 k = (u16)MIN((u64)slots, count - sent);
        for (u16 i = 0; i < k; i++)
            virtq_post(vq, i);
        /* One interrupt when the whole batch is back. */
        *used_event(vq) = (u16)(vq->last_used + k - 1);
        virtq_kick(vq);
        if (!wait_used_count(vq, k)) {
            stuck = true;
            break;
        }
        vq->last_used = (u16)(vq->last_used + k);
        sent += k;
    }
    u64 t1 = rdtsc();
    bench("net-bench", "end dir=tx n=%llu bytes=%llu tsc=%llu irqs=%u", sent, sent * size,
          t1 - t0, n->vdev->used_irqs - irqs0);
    sleep_ms(SETTLE_MS);
    if (stuck)
        fail("net-bench", "dir=tx stuck sent=%llu/%llu", sent, count);
    else
        ok("net-bench", "dir=tx n=%llu size=%u batch=%u", count, size, batch);
}

static void send_ack(struct net_dev *n, u32 received)
{
    int slot = net_tx_alloc(n);
    if (slot < 0)
        return;
    u8 *f = net_tx_frame(n, (u32)slot);
    put32(f + UDP_FRAME_LEN(0), received);
    net_tx_post(n, (u32)slot, udp_build(f, n->mac, net_cfg.peer_mac, net_cfg.peer, PORT_RX,
                                        PORT_ACK, 4));
}

static void bench_rx(struct net_dev *n, u64 count, u32 size, u16 batch)
{
    struct virtq *vq = n->rxq;
    /*
     * Every buffer posted (the ARP reply's too): used_event below asks for an interrupt
     * after a whole burst, which must fit the buffers the device has.
     */
    if (net_rx_pending(n) || n->nrecycle) {
        const u8 *f;
        while (net_recv(n, &f, 0))
            ;
        net_rx_flush(n);
    }
    info("net-bench", "begin dir=rx n=%llu size=%u batch=%u port=%u", count, size, batch, PORT_RX);
    u64 received = 0, acked = 0, t0 = 0, t1 = 0;
    u32 others = 0;
    for (;;) {
        /* One interrupt for the rest of the burst. */
        u64 want = MIN(count - received, (u64)batch - (received - acked));
        if (want == 0)
            want = 1;
        *used_event(vq) = (u16)(vq->last_used + want - 1);
        mb();
        if (!wait_used_count(vq, 1) && !wait_used_count(vq, 1))
            break;                      /* idle for 2 * WAIT_MS: the host is done */
        /* Everything that is there now. */
        u32 id, len;
        while (virtq_pop_used(vq, &id, &len, false)) {
            if (id >= n->rx_bufs)
                continue;
            const u8 *buf = n->rx_mem + (u64)id * n->rx_buf_len;
            const u8 *f = buf + NET_HDR_LEN;
            if (len == NET_HDR_LEN + size && get16(f + 12) == ETH_P_IP
                && get16(f + ETH_HLEN + IP_HLEN + 2) == PORT_RX) {
                if (!received)
                    t0 = rdtsc();
                received++;
                t1 = rdtsc();
            } else if (len >= NET_HDR_LEN) {
                struct pkt p;
                net_parse(f, len - NET_HDR_LEN, &p, false);
                net_respond(n, f, len - NET_HDR_LEN, &p);
                others++;
            }
            n->recycle[n->nrecycle++] = (u16)id;
        }
        net_rx_flush(n);
        if (received - acked >= batch || received == count) {
            send_ack(n, (u32)received);
            acked = received;
        }
        if (received == count)
            break;
    }
    bench("net-bench", "end dir=rx n=%llu bytes=%llu tsc=%llu others=%u", received,
          received * size, t1 - t0, others);
    sleep_ms(SETTLE_MS);
    if (received == count)
        ok("net-bench", "dir=rx n=%llu size=%u batch=%u", count, size, batch);
    else
        fail("net-bench", "dir=rx received=%llu/%llu", received, count);
}

/* "<tx|rx>:<n>:<size>:<batch>[:mrg]" */
void scn_net_bench(const char *arg)
{
    struct net_args a;
    bool parsed = net_args_parse(&a, arg);
    u64 count = 0, size = 0, batch = 0;
    bool tx = parsed && a.n >= 4 && strcmp(a.tok[0], "tx") == 0;
    bool rx = parsed && a.n >= 4 && strcmp(a.tok[0], "rx") == 0;
    if ((!tx && !rx) || !parse_u64(a.tok[1], strlen(a.tok[1]), &count)
        || !parse_u64(a.tok[2], strlen(a.tok[2]), &size)
        || !parse_u64(a.tok[3], strlen(a.tok[3]), &batch)) {
        fail("net-bench", "bad-arg=%s", arg ? arg : "");
        return;
    }
    a.used = 0xf;
    bool mrg = net_arg_flag(&a, "mrg");
    if (!net_args_ok(&a) || count == 0 || size < UDP_FRAME_LEN(4) || size > NET_ETH_MAX
        || batch == 0 || batch > VIRTQ_MAX_SIZE) {
        fail("net-bench", "bad-arg=%s", arg);
        return;
    }
    const char *why = "";
    if (!net_cfg_load(&why)) {
        fail("net-bench", "config %s", why);
        return;
    }
    u64 wanted = VIRTIO_F_EVENT_IDX | (mrg ? VIRTIO_NET_F_MRG_RXBUF : 0);
    struct net_dev *n = net_open(0, wanted, 0, 0, &why);
    if (!n || !(n->vdev->acked & VIRTIO_F_EVENT_IDX)) {
        fail("net-bench", "init %s", n ? "evidx-not-offered" : why);
        return;
    }
    if (!net_resolve_peer(n)) {
        fail("net-bench", "arp timeout");
        return;
    }
    if (tx)
        bench_tx(n, count, (u32)size, (u16)batch);
    else
        bench_rx(n, count, (u32)size, (u16)batch);
}
