/*
 * virtio-net driver on top of virtio.h (virtio 1.x 5.1): a receive queue (0)
 * and a transmit queue (1), the 12-byte virtio_net_hdr_v1 in front of every
 * frame, interrupt-driven completion with bounded waits.
 *
 * Buffers are fixed so the hot paths do almost nothing per frame (guest
 * instructions are emulated, ~1.5 M/s here):
 *   - receive buffer i is descriptor i of the RX queue (one device-writable
 *     descriptor of rx_buf_len bytes, header included), posted again after
 *     the frame in it was consumed (in batches, see net_recv);
 *   - transmit slot i is descriptor i of the TX queue: NET_BUF_SIZE bytes of
 *     DMA memory, header then frame, one device-readable descriptor.
 * Hand-made chains (hostile scenarios) may use the descriptors of TX slots
 * that are not in flight.
 */
#ifndef KILN_VIRTIO_NET_H
#define KILN_VIRTIO_NET_H

#include "types.h"
#include "virtio.h"

/* Feature bits (5.1.3). */
#define VIRTIO_NET_F_CSUM           (1ULL << 0)
#define VIRTIO_NET_F_GUEST_CSUM     (1ULL << 1)
#define VIRTIO_NET_F_MAC            (1ULL << 5)
#define VIRTIO_NET_F_GUEST_TSO4     (1ULL << 7)
#define VIRTIO_NET_F_GUEST_TSO6     (1ULL << 8)
#define VIRTIO_NET_F_HOST_TSO4      (1ULL << 11)
#define VIRTIO_NET_F_HOST_TSO6      (1ULL << 12)
#define VIRTIO_NET_F_MRG_RXBUF      (1ULL << 15)

/* Configuration space. */
#define VIRTIO_NET_CFG_MAC          0x00    /* 6 bytes, with VIRTIO_NET_F_MAC */

/* virtio_net_hdr (5.1.6). */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_NONE     0
#define VIRTIO_NET_HDR_GSO_TCPV4    1
#define NET_HDR_LEN                 12

struct virtio_net_hdr {
    u8 flags;
    u8 gso_type;
    u16 hdr_len;
    u16 gso_size;
    u16 csum_start;
    u16 csum_offset;
    u16 num_buffers;
};

#define NET_RXQ                     0
#define NET_TXQ                     1
/* Default receive buffer and every transmit slot: header + a 1514-byte frame fit. */
#define NET_BUF_SIZE                2048
#define NET_ETH_MAX                 1514
/* Largest frame net_recv assembles from merged buffers (Ethernet header included). */
#define NET_FRAME_MAX               (64 * KiB + 14)
#define NET_TIMEOUT_MS              2000
/* Consumed receive buffers are posted again once this many are waiting. */
#define NET_RECYCLE_BATCH           32

struct net_dev {
    struct virtio_dev *vdev;
    struct virtq *rxq, *txq;
    u8 mac[6];
    bool mac_offered;           /* VIRTIO_NET_F_MAC: mac[] from config space */
    bool mrg;                   /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    u32 rx_buf_len;             /* bytes per receive buffer, header included */
    u16 rx_bufs;                /* receive buffers in use (descriptors 0..rx_bufs-1) */
    /* DMA memory, allocated at the first open and kept. */
    u8 *rx_mem;                 /* VIRTQ_MAX_SIZE * NET_BUF_SIZE */
    u8 *tx_mem;                 /* VIRTQ_MAX_SIZE * NET_BUF_SIZE */
    u8 *frame;                  /* NET_FRAME_MAX: merged frames are copied here */
    /* Driver state. */
    u16 recycle[VIRTQ_MAX_SIZE];        /* consumed buffers waiting to be posted */
    u16 nrecycle;
    bool rx_posting;            /* false: consumed buffers are kept (net_rx_hold) */
    u8 tx_busy[VIRTQ_MAX_SIZE];
    u16 tx_inflight;
    u16 tx_next;
    /* Counters (since the last net_open). */
    struct virtio_net_hdr rx_hdr;       /* the header of the frame net_recv returned last */
    u32 rx_frames;              /* frames returned by net_recv */
    u32 rx_merged;              /* of which spanned several buffers */
    u32 rx_bad;                 /* used entries refused: id, length, num_buffers */
    u32 rx_no_irq;              /* receive completions that came without their interrupt */
    u32 tx_frames;              /* frames posted */
    u32 tx_completed;           /* transmit chains returned */
    u32 tx_bad_used;            /* used entries with an id not in flight */
    u32 tx_no_irq;
};

/*
 * The `nth` network device, (re)initialised: reset, features = offered &
 * (wanted | VERSION_1 | MAC), both queues at the maximum size (<= 256),
 * DRIVER_OK; then `rx_bufs` receive buffers of `rx_buf_len` bytes (0: 256
 * of NET_BUF_SIZE) are posted. NULL with *why set on failure.
 */
struct net_dev *net_open(u32 nth, u64 wanted, u32 rx_buf_len, u16 rx_bufs, const char **why);

/*
 * The next received frame (Ethernet header first, virtio-net header
 * stripped): its length, *frame pointing at it, valid until the next call.
 * Waits up to `timeout_ms` for one, by interrupt (0: only what is there);
 * returns 0 if none came. Consumed buffers are posted again (one kick) when
 * NET_RECYCLE_BATCH have accumulated or before waiting. Merged frames
 * (MRG_RXBUF, num_buffers > 1) are copied into n->frame.
 */
u32 net_recv(struct net_dev *n, const u8 **frame, u64 timeout_ms);
/* Posts every consumed receive buffer again and kicks the queue if needed. */
void net_rx_flush(struct net_dev *n);
/* Stop / resume posting consumed buffers (for "receive queue full" scenarios). */
void net_rx_hold(struct net_dev *n, bool hold);
/* Used receive entries the driver has not consumed yet. */
u16 net_rx_pending(struct net_dev *n);

/* The frame area (after the header) of transmit slot `slot`. */
u8 *net_tx_frame(struct net_dev *n, u32 slot);
/* A free transmit slot, reclaiming (and waiting up to NET_TIMEOUT_MS) if needed; -1 if none. */
int net_tx_alloc(struct net_dev *n);
/* Sends the `len`-byte frame already in slot `slot` (header zeroed here), kicks. */
void net_tx_post(struct net_dev *n, u32 slot, u32 len);
/* Consumes the transmit used ring; returns the chains returned. */
u32 net_tx_reclaim(struct net_dev *n);
/* Waits (by interrupt, bounded) until no transmit chain is in flight. */
bool net_tx_drain(struct net_dev *n, u64 timeout_ms);
/* Copies `len` bytes (<= NET_BUF_SIZE - NET_HDR_LEN) into a slot and sends them. */
bool net_send(struct net_dev *n, const void *frame, u32 len);

#endif
