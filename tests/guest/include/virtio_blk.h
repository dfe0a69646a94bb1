/*
 * virtio-blk driver on top of virtio.h: one request queue, requests at queue
 * depth 1 with the usual framing (header, data, status byte), optionally
 * through an indirect table.
 */
#ifndef KILN_VIRTIO_BLK_H
#define KILN_VIRTIO_BLK_H

#include "types.h"
#include "virtio.h"

/* Feature bits (5.2.3). */
#define VIRTIO_BLK_F_SIZE_MAX   (1ULL << 1)
#define VIRTIO_BLK_F_SEG_MAX    (1ULL << 2)
#define VIRTIO_BLK_F_RO         (1ULL << 5)
#define VIRTIO_BLK_F_BLK_SIZE   (1ULL << 6)
#define VIRTIO_BLK_F_FLUSH      (1ULL << 9)

/* Configuration space offsets. */
#define VIRTIO_BLK_CFG_CAPACITY 0x00    /* u64, 512-byte sectors */
#define VIRTIO_BLK_CFG_SIZE_MAX 0x08
#define VIRTIO_BLK_CFG_SEG_MAX  0x0c

/* Request types and status values (5.2.6). */
#define VIRTIO_BLK_T_IN         0
#define VIRTIO_BLK_T_OUT        1
#define VIRTIO_BLK_T_FLUSH      4
#define VIRTIO_BLK_T_GET_ID     8
#define VIRTIO_BLK_S_OK         0
#define VIRTIO_BLK_S_IOERR      1
#define VIRTIO_BLK_S_UNSUPP     2
/* Written by the driver before a request; no device writes it. */
#define BLK_STATUS_UNTOUCHED    0xff

#define VIRTIO_BLK_ID_BYTES     20
#define BLK_SECTOR_SIZE         512
/* Largest data transfer of blk_request with the driver's own buffers. */
#define BLK_DATA_MAX            (64 * KiB)
#define BLK_TIMEOUT_MS          2000

struct virtio_blk_req_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

struct blk_dev {
    struct virtio_dev *vdev;
    u32 nth;                    /* among block devices */
    u64 capacity;               /* sectors */
    u32 seg_max;                /* 0 if not offered */
    bool indirect;              /* requests go through an indirect table */
    /* DMA memory, allocated at first open and kept. */
    volatile struct virtio_blk_req_hdr *hdr;
    volatile u8 *status;
    volatile struct virtq_desc *table;  /* indirect table, 16 entries */
    u8 *id;                             /* GET_ID answer */
    u8 *data;                           /* BLK_DATA_MAX bytes */
    u8 *data2;                          /* BLK_DATA_MAX bytes */
};

struct blk_result {
    enum virtq_wait_result wait;
    bool completed;             /* a used entry came back */
    u32 id;                     /* its id */
    u32 used_len;               /* its len */
    u8 status;                  /* the status byte (BLK_STATUS_UNTOUCHED if not written) */
};

/*
 * The `nth` block device, (re)initialised: reset, features = offered &
 * (wanted | VERSION_1), one queue of the maximum size, DRIVER_OK. Reads the
 * capacity and seg_max. NULL with *why set on failure.
 */
struct blk_dev *blk_open(u32 nth, u64 wanted, bool indirect, const char **why);

/*
 * One request at queue depth 1: header, `len` bytes at `data` (device-
 * writable for IN and GET_ID, readable for OUT; none if len is 0), status.
 * Waits for the interrupt (BLK_TIMEOUT_MS). Prints `fail virtio
 * no-interrupt ...` if the entry came without one, `fail virtio timeout
 * ...` if it never came. True if the request completed.
 */
bool blk_request(struct blk_dev *b, u32 type, u64 sector, void *data, u32 len,
                 struct blk_result *r);

/* "ok", "ioerr", "unsupp", "untouched" or "0x<nn>". */
const char *blk_status_name(u8 status, char *buf, size_t size);

/*
 * The data pattern the blk scenarios write, so the host can predict the
 * image: byte `offset` (0-511) of sector `sector` is
 *   h = (u32)sector * 2654435761 + offset * 40503  (mod 2^32);  (u8)(h ^ (h >> 16))
 */
static inline u8 blk_pattern_byte(u64 sector, u32 offset)
{
    u32 h = (u32)sector * 2654435761u + offset * 40503u;
    return (u8)(h ^ (h >> 16));
}
void blk_pattern_fill(u8 *buf, u64 sector, u32 sectors);

#endif
