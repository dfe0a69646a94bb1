/*
 * virtio 1.x over MMIO (register layout version 2), device independent:
 * discovery from the command line, the initialisation sequence, split
 * virtqueues in DMA memory, and interrupt-driven completion.
 *
 * Layers, so that device drivers, hostile scenarios and a fuzzer can each
 * take what they need:
 *   - discovery:  virtio_mmio_scan() parses every virtio_mmio.device= token;
 *   - transport:  virtio_reg_read/write (raw), virtio_begin_init /
 *                 virtio_negotiate / virtio_driver_ok / virtio_reset;
 *   - queues:     virtq_setup (driver-owned rings, reused across resets),
 *                 virtq_submit / virtq_kick / virtq_wait / virtq_pop_used for
 *                 well-formed chains, and raw access (vq->desc, virtq_post,
 *                 virtq_notify) for hand-made ones;
 *   - interrupts: each device's GSI is routed to vector 0x20 + GSI; the
 *                 handler reads and acknowledges InterruptStatus and counts
 *                 used-buffer and configuration-change interrupts.
 *
 * Everything follows the virtio 1.x specification (2.7 split virtqueues,
 * 3.1 device initialisation, 4.2 MMIO transport), not kiln's behaviour.
 */
#ifndef KILN_VIRTIO_H
#define KILN_VIRTIO_H

#include "types.h"

/* MMIO register offsets (virtio 1.x 4.2.2). */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW     0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH    0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW      0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH     0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

#define VIRTIO_MMIO_MAGIC               0x74726976      /* "virt" */

#define VIRTIO_INT_USED                 0x1
#define VIRTIO_INT_CONFIG               0x2

/* Device status bits (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE       0x01
#define VIRTIO_STATUS_DRIVER            0x02
#define VIRTIO_STATUS_DRIVER_OK         0x04
#define VIRTIO_STATUS_FEATURES_OK       0x08
#define VIRTIO_STATUS_NEEDS_RESET       0x40
#define VIRTIO_STATUS_FAILED            0x80

/* Device-independent feature bits (6). */
#define VIRTIO_F_INDIRECT_DESC          (1ULL << 28)
#define VIRTIO_F_EVENT_IDX              (1ULL << 29)
#define VIRTIO_F_VERSION_1              (1ULL << 32)

#define VIRTIO_ID_NET                   1
#define VIRTIO_ID_BLOCK                 2

/* Split virtqueue layout (2.7). */
#define VIRTQ_DESC_F_NEXT               1
#define VIRTQ_DESC_F_WRITE              2
#define VIRTQ_DESC_F_INDIRECT           4
#define VIRTQ_AVAIL_F_NO_INTERRUPT      1
#define VIRTQ_USED_F_NO_NOTIFY          1

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[];                 /* [size], then u16 used_event */
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[];      /* [size], then u16 avail_event */
};

/* Rings are allocated once per queue for this size and reused. */
#define VIRTQ_MAX_SIZE                  256
#define VIRTIO_MAX_DEVICES              19      /* GSIs 5-23 */
#define VIRTIO_MAX_QUEUES               4

/* One virtio_mmio.device=<size>@<base>:<gsi>[:<id>] token. */
struct virtio_mmio_slot {
    u64 base;
    u64 size;
    u32 gsi;
};

struct virtio_dev;

struct virtq {
    struct virtio_dev *dev;
    u16 index;                  /* queue number */
    u16 size;                   /* entries in use (<= VIRTQ_MAX_SIZE) */
    bool event_idx;             /* VIRTIO_F_EVENT_IDX negotiated */
    /* The rings (driver memory, physical == virtual). */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    /* Driver-private state: never read back from device-visible memory. */
    u16 avail_idx;              /* next avail.idx the driver publishes */
    u16 kicked_idx;             /* avail.idx at the last notification decision */
    u16 last_used;              /* next used entry to consume */
    u16 announced;              /* used.idx seen by the last used-buffer interrupt */
    u16 free_head;
    u16 num_free;
    /*
     * Free list (shadow of desc.next) and descriptors of each in-flight head,
     * [VIRTQ_MAX_SIZE] each, in the queue's ring memory: kept out of .bss, which
     * the guest zeroes at every boot (a cost paid per instruction here).
     */
    u16 *next_free;
    u16 *chain_len;
};

struct virtio_dev {
    u32 index;                  /* position among virtio_mmio.device= tokens */
    struct virtio_mmio_slot slot;
    u32 device_id;              /* 0: no device there */
    u8 vector;                  /* 0x20 + GSI */
    bool irq_routed;
    u64 offered;                /* device features */
    u64 acked;                  /* features written by the driver */
    struct virtq vq[VIRTIO_MAX_QUEUES];
    /* Interrupt handler state. */
    volatile u32 irq_used_flag;         /* set on a used-buffer interrupt */
    volatile u32 irq_config_flag;       /* set on a configuration-change interrupt */
    volatile u32 irqs;                  /* interrupts taken */
    volatile u32 used_irqs;
    volatile u32 config_irqs;
};

/*
 * Parses every virtio_mmio.device= token of the command line (once; later
 * calls return the cached table) and reads each device's DeviceID.
 * Returns the number of devices; *devs points to the table.
 */
u32 virtio_mmio_scan(struct virtio_dev **devs);
/* The `nth` (0-based) device with DeviceID `device_id`, or NULL. */
struct virtio_dev *virtio_find(u32 device_id, u32 nth);

u32 virtio_reg_read(struct virtio_dev *d, u32 reg);
void virtio_reg_write(struct virtio_dev *d, u32 reg, u32 value);
u32 virtio_status(struct virtio_dev *d);
void virtio_set_status(struct virtio_dev *d, u32 status);
u64 virtio_device_features(struct virtio_dev *d);
void virtio_write_driver_features(struct virtio_dev *d, u64 features);
u8 virtio_config_read8(struct virtio_dev *d, u32 offset);
u32 virtio_config_read32(struct virtio_dev *d, u32 offset);
/* A 64-bit config field read twice around ConfigGeneration (4.2.2.2). */
u64 virtio_config_read64(struct virtio_dev *d, u32 offset);

/*
 * Initialisation, split so hostile code can stop anywhere in between:
 *   virtio_begin_init: check magic/version, route the interrupt, reset
 *       (waits for Status to read 0), ACKNOWLEDGE, DRIVER, read features;
 *   virtio_negotiate: write offered & wanted (VERSION_1 always added),
 *       set FEATURES_OK and check it stuck;
 *   virtq_setup: per queue;
 *   virtio_driver_ok: DRIVER_OK, checked not to report NEEDS_RESET.
 * On failure they return false with *why set to a short reason.
 */
bool virtio_begin_init(struct virtio_dev *d, const char **why);
bool virtio_negotiate(struct virtio_dev *d, u64 wanted, const char **why);
bool virtio_driver_ok(struct virtio_dev *d, const char **why);
/* All of the above with one queue of `queue_size` entries (0: the max). */
bool virtio_init_simple(struct virtio_dev *d, u64 wanted, u16 queue_size, const char **why);
/* Writes 0 to Status and waits (bounded) for it to read 0; clears driver state. */
bool virtio_reset(struct virtio_dev *d);

/*
 * Programs queue `index` with `size` entries (0: min(QueueNumMax, VIRTQ_MAX_SIZE))
 * on zeroed driver rings and sets QueueReady; checks it reads back 1.
 */
bool virtq_setup(struct virtio_dev *d, u16 index, u16 size, const char **why);
/* Physical addresses of a queue's rings (for hand-made register writes). */
u64 virtq_desc_addr(const struct virtq *vq);
u64 virtq_avail_addr(const struct virtq *vq);
u64 virtq_used_addr(const struct virtq *vq);
/* Forgets every chain (driver side only): all descriptors free again. */
void virtq_reset_free(struct virtq *vq);

/* A buffer of a well-formed chain: device-readable ones first. */
struct virtq_buf {
    u64 addr;
    u32 len;
    bool writable;
};

/*
 * Builds a chain from `n` buffers (from the free list, or as one indirect
 * table of `n` entries at `indirect_table` if that is non-NULL), publishes
 * it in the available ring, and returns its head; -1 if no descriptors.
 * Does not notify: call virtq_kick.
 */
int virtq_submit(struct virtq *vq, const struct virtq_buf *bufs, u32 n,
                 volatile struct virtq_desc *indirect_table);
/* Publishes `head` in the next available slot (raw: no free-list bookkeeping). */
void virtq_post(struct virtq *vq, u16 head);
/* Notifies the device if it asked for it (EVENT_IDX / NO_NOTIFY). */
void virtq_kick(struct virtq *vq);
/* Notifies the device unconditionally. */
void virtq_notify(struct virtq *vq);
/* True if the device has used entries the driver has not consumed. */
bool virtq_has_used(struct virtq *vq);
/* Device's used.idx (volatile read). */
u16 virtq_used_idx(struct virtq *vq);

enum virtq_wait_result {
    VIRTQ_WAIT_IRQ,             /* a used entry arrived with its interrupt */
    VIRTQ_WAIT_POLLED,          /* a used entry arrived, but no interrupt in time */
    VIRTQ_WAIT_TIMEOUT,         /* nothing arrived */
};
/*
 * Sleeps until the used ring holds an unconsumed entry, woken by the
 * device's interrupt; bounded by `timeout_ms`, after which the used ring is
 * polled once. Asks for the interrupt first (used_event / flags).
 */
enum virtq_wait_result virtq_wait(struct virtq *vq, u64 timeout_ms);
/*
 * Consumes the next used entry: *id and *len as the device wrote them.
 * Returns false if there is none. If `free_chain` and the id is a head the
 * driver has in flight, its descriptors return to the free list.
 */
bool virtq_pop_used(struct virtq *vq, u32 *id, u32 *len, bool free_chain);

/* Waits (bounded) for a configuration-change interrupt. */
bool virtio_wait_config_irq(struct virtio_dev *d, u64 timeout_ms);

/* "0x..." of a feature set, for reports. */
const char *virtio_features_str(u64 features, char *buf, size_t size);

#endif
