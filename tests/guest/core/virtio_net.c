/* virtio-net driver: see include/virtio_net.h. */
#include "cpu.h"
#include "lib.h"
#include "mm.h"
#include "virtio_net.h"

/* Merged buffers of one frame are used back to back: wait this long for the rest. */
#define MERGE_WAIT_MS       100

/* Per device, allocated at the first open (kept out of .bss). */
static struct net_dev *net_devs[VIRTIO_MAX_DEVICES];

static u8 *rx_buf(struct net_dev *n, u32 i)
{
    return n->rx_mem + (u64)i * n->rx_buf_len;
}

u8 *net_tx_frame(struct net_dev *n, u32 slot)
{
    return n->tx_mem + (u64)slot * NET_BUF_SIZE + NET_HDR_LEN;
}

static void rx_post(struct net_dev *n, u16 i)
{
    volatile struct virtq_desc *d = &n->rxq->desc[i];
    d->addr = virt_to_phys(rx_buf(n, i));
    d->len = n->rx_buf_len;
    d->flags = VIRTQ_DESC_F_WRITE;
    d->next = 0;
    virtq_post(n->rxq, i);
}

struct net_dev *net_open(u32 nth, u64 wanted, u32 rx_buf_len, u16 rx_bufs, const char **why)
{
    struct virtio_dev *d = virtio_find(VIRTIO_ID_NET, nth);
    if (!d) {
        *why = "no-device";
        return NULL;
    }
    struct net_dev *n = net_devs[d->index];
    if (!n) {
        n = dma_alloc(sizeof(*n));
        if (n) {
            n->rx_mem = dma_alloc(VIRTQ_MAX_SIZE * NET_BUF_SIZE);
            n->tx_mem = dma_alloc(VIRTQ_MAX_SIZE * NET_BUF_SIZE);
            n->frame = dma_alloc(NET_FRAME_MAX);
        }
        if (!n || !n->rx_mem || !n->tx_mem || !n->frame) {
            *why = "out-of-dma-memory";
            return NULL;
        }
        net_devs[d->index] = n;
    }
    if (rx_buf_len == 0)
        rx_buf_len = NET_BUF_SIZE;
    if (rx_bufs == 0)
        rx_bufs = VIRTQ_MAX_SIZE;
    if (rx_buf_len < NET_HDR_LEN || rx_buf_len > NET_BUF_SIZE || rx_bufs > VIRTQ_MAX_SIZE) {
        *why = "bad-buffers";
        return NULL;
    }
    /* Everything but the DMA memory starts afresh. */
    u8 *rx_mem = n->rx_mem, *tx_mem = n->tx_mem, *frame = n->frame;
    memset(n, 0, sizeof(*n));
    n->rx_mem = rx_mem;
    n->tx_mem = tx_mem;
    n->frame = frame;
    n->vdev = d;
    n->rx_buf_len = rx_buf_len;
    n->rx_bufs = rx_bufs;
    n->rx_posting = true;

    if (!virtio_begin_init(d, why) || !virtio_negotiate(d, wanted | VIRTIO_NET_F_MAC, why)
        || !virtq_setup(d, NET_RXQ, 0, why) || !virtq_setup(d, NET_TXQ, 0, why)
        || !virtio_driver_ok(d, why))
        return NULL;
    n->rxq = &d->vq[NET_RXQ];
    n->txq = &d->vq[NET_TXQ];
    if (n->rxq->size < rx_bufs) {
        *why = "rx-queue-too-small";
        return NULL;
    }
    n->mrg = (d->acked & VIRTIO_NET_F_MRG_RXBUF) != 0;
    n->mac_offered = (d->acked & VIRTIO_NET_F_MAC) != 0;
    if (n->mac_offered) {
        for (u32 i = 0; i < 6; i++)
            n->mac[i] = virtio_config_read8(d, VIRTIO_NET_CFG_MAC + i);
    } else {
        /* A locally administered unicast address. */
        static const u8 fallback[6] = { 0x02, 0x6b, 0x69, 0x6c, 0x6e, 0x02 };
        memcpy(n->mac, fallback, 6);
    }
    for (u16 i = 0; i < rx_bufs; i++)
        rx_post(n, i);
    virtq_kick(n->rxq);
    return n;
}

/* ---- receive ------------------------------------------------------------ */

void net_rx_flush(struct net_dev *n)
{
    if (!n->nrecycle || !n->rx_posting)
        return;
    for (u16 i = 0; i < n->nrecycle; i++)
        rx_post(n, n->recycle[i]);
    n->nrecycle = 0;
    virtq_kick(n->rxq);
}

void net_rx_hold(struct net_dev *n, bool hold)
{
    n->rx_posting = !hold;
    if (!hold)
        net_rx_flush(n);
}

u16 net_rx_pending(struct net_dev *n)
{
    return (u16)(virtq_used_idx(n->rxq) - n->rxq->last_used);
}

static void recycle(struct net_dev *n, u32 id)
{
    if (id < n->rx_bufs && n->nrecycle < VIRTQ_MAX_SIZE)
        n->recycle[n->nrecycle++] = (u16)id;
}

/*
 * After a wait that ended by polling: an interrupt may be pending at this
 * very moment (the entry came just before the deadline). Let it in once.
 */
static bool late_irq(struct virtq *vq)
{
    asm volatile("sti; nop; cli" ::: "memory");
    u16 a = (u16)(vq->announced - vq->last_used);
    return a != 0 && a <= (u16)(virtq_used_idx(vq) - vq->last_used);
}

/* Waits for one used entry; false on timeout. Counts a missing interrupt in *no_irq. */
static bool wait_used(struct virtq *vq, u64 timeout_ms, u32 *no_irq)
{
    if (virtq_has_used(vq))
        return true;
    if (timeout_ms == 0)
        return false;
    enum virtq_wait_result w = virtq_wait(vq, timeout_ms);
    if (w == VIRTQ_WAIT_TIMEOUT)
        return false;
    if (w == VIRTQ_WAIT_POLLED && !late_irq(vq))
        (*no_irq)++;
    return true;
}

u32 net_recv(struct net_dev *n, const u8 **frame, u64 timeout_ms)
{
    struct virtq *vq = n->rxq;
    /* A bounded number of refused entries are skipped per call. */
    for (u32 tries = 0; tries < VIRTQ_MAX_SIZE; tries++) {
        if (n->nrecycle >= NET_RECYCLE_BATCH || !virtq_has_used(vq))
            net_rx_flush(n);
        if (!wait_used(vq, timeout_ms, &n->rx_no_irq))
            return 0;
        u32 id, len;
        if (!virtq_pop_used(vq, &id, &len, false))
            return 0;
        if (id >= n->rx_bufs || len < NET_HDR_LEN || len > n->rx_buf_len) {
            n->rx_bad++;
            recycle(n, id);
            continue;
        }
        u8 *buf = rx_buf(n, id);
        recycle(n, id);
        memcpy(&n->rx_hdr, buf, NET_HDR_LEN);
        u16 nbufs = ((volatile struct virtio_net_hdr *)buf)->num_buffers;
        if (nbufs == 1) {
            *frame = buf + NET_HDR_LEN;
            n->rx_frames++;
            return len - NET_HDR_LEN;
        }
        if (!n->mrg || nbufs == 0) {
            n->rx_bad++;
            continue;
        }
        /* MRG_RXBUF: the frame continues in the next nbufs - 1 used entries. */
        u32 total = len - NET_HDR_LEN;
        memcpy(n->frame, buf + NET_HDR_LEN, total);
        bool bad = false;
        for (u16 k = 1; k < nbufs; k++) {
            if (!SPIN_UNTIL_MS(virtq_has_used(vq), MERGE_WAIT_MS)
                || !virtq_pop_used(vq, &id, &len, false)) {
                bad = true;
                break;
            }
            if (id >= n->rx_bufs || len > n->rx_buf_len || total + len > NET_FRAME_MAX) {
                recycle(n, id);
                bad = true;
                continue;
            }
            memcpy(n->frame + total, rx_buf(n, id), len);
            total += len;
            recycle(n, id);
        }
        if (bad) {
            n->rx_bad++;
            continue;
        }
        *frame = n->frame;
        n->rx_frames++;
        n->rx_merged++;
        return total;
    }
    return 0;
}

/* ---- transmit ----------------------------------------------------------- */

u32 net_tx_reclaim(struct net_dev *n)
{
    u32 id, len, count = 0;
    while (virtq_pop_used(n->txq, &id, &len, false)) {
        if (id < n->txq->size && n->tx_busy[id]) {
            n->tx_busy[id] = 0;
            n->tx_inflight--;
            n->tx_completed++;
            count++;
        } else {
            n->tx_bad_used++;
        }
    }
    return count;
}

int net_tx_alloc(struct net_dev *n)
{
    u16 size = n->txq->size;
    if (n->tx_inflight == size)
        net_tx_reclaim(n);
    u64 deadline = tsc_deadline_ms(NET_TIMEOUT_MS);
    while (n->tx_inflight == size) {
        if (tsc_passed(deadline) || !wait_used(n->txq, NET_TIMEOUT_MS, &n->tx_no_irq))
            return -1;
        net_tx_reclaim(n);
    }
    for (u16 i = 0; i < size; i++) {
        u16 slot = (u16)((n->tx_next + i) % size);
        if (!n->tx_busy[slot]) {
            n->tx_next = (u16)((slot + 1) % size);
            return slot;
        }
    }
    return -1;
}

void net_tx_post(struct net_dev *n, u32 slot, u32 len)
{
    u8 *hdr = net_tx_frame(n, slot) - NET_HDR_LEN;
    memset(hdr, 0, NET_HDR_LEN);
    volatile struct virtq_desc *d = &n->txq->desc[slot];
    d->addr = virt_to_phys(hdr);
    d->len = NET_HDR_LEN + len;
    d->flags = 0;
    d->next = 0;
    n->tx_busy[slot] = 1;
    n->tx_inflight++;
    n->tx_frames++;
    virtq_post(n->txq, (u16)slot);
    virtq_kick(n->txq);
}

bool net_tx_drain(struct net_dev *n, u64 timeout_ms)
{
    net_tx_reclaim(n);
    u64 deadline = tsc_deadline_ms(timeout_ms);
    while (n->tx_inflight) {
        if (tsc_passed(deadline) || !wait_used(n->txq, timeout_ms, &n->tx_no_irq))
            return false;
        net_tx_reclaim(n);
    }
    return true;
}

bool net_send(struct net_dev *n, const void *frame, u32 len)
{
    if (len > NET_BUF_SIZE - NET_HDR_LEN)
        return false;
    int slot = net_tx_alloc(n);
    if (slot < 0)
        return false;
    memcpy(net_tx_frame(n, (u32)slot), frame, len);
    net_tx_post(n, (u32)slot, len);
    return true;
}
