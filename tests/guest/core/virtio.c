/*
 * virtio-mmio transport and split virtqueues (see include/virtio.h).
 * Specification references are to virtio 1.2 (the same in 1.0/1.1).
 */
#include "boot.h"
#include "cpu.h"
#include "io.h"
#include "irq.h"
#include "lib.h"
#include "mm.h"
#include "virtio.h"

#define RESET_TIMEOUT_MS        100
/* desc | avail | used (VIRTQ_MAX_SIZE each) | the driver's free list and chain lengths */
#define RING_BYTES              (4 * PAGE_SIZE)

static struct virtio_dev devices[VIRTIO_MAX_DEVICES];
static u32 ndevices;
static bool scanned;
static struct virtio_dev *by_vector[256];
/* Ring memory, allocated at first use per (device, queue) and kept. */
static void *ring_mem[VIRTIO_MAX_DEVICES][VIRTIO_MAX_QUEUES];

/* ---- discovery ---------------------------------------------------------- */

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* "<n>[K|M|G]" */
static bool parse_size(const char *s, size_t len, u64 *out)
{
    u64 mult = 1;
    if (len && (s[len - 1] == 'K' || s[len - 1] == 'k'))
        mult = KiB;
    else if (len && (s[len - 1] == 'M' || s[len - 1] == 'm'))
        mult = MiB;
    else if (len && (s[len - 1] == 'G' || s[len - 1] == 'g'))
        mult = GiB;
    if (mult != 1)
        len--;
    u64 n;
    if (!parse_u64(s, len, &n) || n > ~0ULL / mult)
        return false;
    *out = n * mult;
    return true;
}

static size_t span_until(const char *s, size_t len, char c)
{
    size_t i = 0;
    while (i < len && s[i] != c)
        i++;
    return i;
}

/* "<size>@<base>:<gsi>[:<platform id>]" (Linux's virtio_mmio.device= format) */
static bool parse_device(const char *s, size_t len, struct virtio_mmio_slot *slot)
{
    size_t at = span_until(s, len, '@');
    if (at == len || !parse_size(s, at, &slot->size))
        return false;
    s += at + 1;
    len -= at + 1;
    size_t colon = span_until(s, len, ':');
    if (colon == len || !parse_u64(s, colon, &slot->base))
        return false;
    s += colon + 1;
    len -= colon + 1;
    u64 gsi;
    if (!parse_u64(s, span_until(s, len, ':'), &gsi) || gsi > 0xff)
        return false;
    slot->gsi = (u32)gsi;
    return true;
}

u32 virtio_mmio_scan(struct virtio_dev **devs)
{
    static const char key[] = "virtio_mmio.device=";
    if (!scanned) {
        scanned = true;
        const char *p = boot.cmdline;
        while (*p && ndevices < VIRTIO_MAX_DEVICES) {
            while (is_space(*p))
                p++;
            const char *tok = p;
            while (*p && !is_space(*p))
                p++;
            size_t len = (size_t)(p - tok);
            if (len < sizeof(key) - 1 || strncmp(tok, key, sizeof(key) - 1) != 0)
                continue;
            struct virtio_dev *d = &devices[ndevices];
            memset(d, 0, sizeof(*d));
            d->index = ndevices++;
            bool parsed = parse_device(tok + sizeof(key) - 1, len - (sizeof(key) - 1), &d->slot);
            /* Only a window in the identity-mapped 32-bit space is usable here. */
            if (parsed && d->slot.size >= 0x200 && d->slot.base >= 3 * GiB
                && d->slot.base + d->slot.size <= 4 * GiB
                && mmio_read32(d->slot.base + VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC)
                d->device_id = mmio_read32(d->slot.base + VIRTIO_MMIO_DEVICE_ID);
        }
    }
    *devs = devices;
    return ndevices;
}

struct virtio_dev *virtio_find(u32 device_id, u32 nth)
{
    struct virtio_dev *devs;
    u32 n = virtio_mmio_scan(&devs);
    for (u32 i = 0; i < n; i++)
        if (devs[i].device_id == device_id && nth-- == 0)
            return &devs[i];
    return NULL;
}

/* ---- registers ---------------------------------------------------------- */

u32 virtio_reg_read(struct virtio_dev *d, u32 reg)
{
    return mmio_read32(d->slot.base + reg);
}

void virtio_reg_write(struct virtio_dev *d, u32 reg, u32 value)
{
    mmio_write32(d->slot.base + reg, value);
}

u32 virtio_status(struct virtio_dev *d)
{
    return virtio_reg_read(d, VIRTIO_MMIO_STATUS);
}

void virtio_set_status(struct virtio_dev *d, u32 status)
{
    virtio_reg_write(d, VIRTIO_MMIO_STATUS, status);
}

u64 virtio_device_features(struct virtio_dev *d)
{
    virtio_reg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    u64 hi = virtio_reg_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_reg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 lo = virtio_reg_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
    return hi << 32 | lo;
}

void virtio_write_driver_features(struct virtio_dev *d, u64 features)
{
    virtio_reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(features >> 32));
    virtio_reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_reg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)features);
    d->acked = features;
}

u8 virtio_config_read8(struct virtio_dev *d, u32 offset)
{
    return mmio_read8(d->slot.base + VIRTIO_MMIO_CONFIG + offset);
}

u32 virtio_config_read32(struct virtio_dev *d, u32 offset)
{
    return mmio_read32(d->slot.base + VIRTIO_MMIO_CONFIG + offset);
}

u64 virtio_config_read64(struct virtio_dev *d, u32 offset)
{
    u64 v = 0;
    /* 4.2.2.2: re-read until ConfigGeneration is stable (bounded). */
    for (u32 tries = 0; tries < 16; tries++) {
        u32 gen = virtio_reg_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
        u64 lo = virtio_config_read32(d, offset);
        u64 hi = virtio_config_read32(d, offset + 4);
        v = hi << 32 | lo;
        if (virtio_reg_read(d, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
            break;
    }
    return v;
}

const char *virtio_features_str(u64 features, char *buf, size_t size)
{
    ksnprintf(buf, size, "0x%llx", features);
    return buf;
}

/* ---- interrupts --------------------------------------------------------- */

static void virtio_irq(struct trap_frame *f)
{
    struct virtio_dev *d = by_vector[f->vector & 0xff];
    if (!d)
        return;
    /* Edge-triggered: read and acknowledge what the device reports. */
    u32 isr = virtio_reg_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        virtio_reg_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
    d->irqs++;
    if (isr & VIRTIO_INT_USED) {
        d->used_irqs++;
        /* The device fills the used ring before it interrupts: everything in
         * it now was announced by this interrupt. */
        for (u32 q = 0; q < VIRTIO_MAX_QUEUES; q++)
            if (d->vq[q].size)
                d->vq[q].announced = d->vq[q].used->idx;
        d->irq_used_flag = 1;
    }
    if (isr & VIRTIO_INT_CONFIG) {
        d->config_irqs++;
        d->irq_config_flag = 1;
    }
}

static u64 ms_until(u64 deadline)
{
    u64 now = rdtsc();
    if ((s64)(deadline - now) <= 0)
        return 0;
    return (deadline - now) / (TSC_HZ_MAX / 1000) + 1;
}

bool virtio_wait_config_irq(struct virtio_dev *d, u64 timeout_ms)
{
    return wait_for_irq(&d->irq_config_flag, timeout_ms);
}

/* ---- initialisation ----------------------------------------------------- */

static void forget_queues(struct virtio_dev *d)
{
    for (u32 q = 0; q < VIRTIO_MAX_QUEUES; q++)
        d->vq[q].size = 0;
}

bool virtio_reset(struct virtio_dev *d)
{
    virtio_set_status(d, 0);
    forget_queues(d);
    d->acked = 0;
    d->irq_used_flag = 0;
    d->irq_config_flag = 0;
    /* 4.2.3.1.1 / 2.4.1: the reset is complete when Status reads 0. */
    return SPIN_UNTIL_MS(virtio_status(d) == 0, RESET_TIMEOUT_MS);
}

bool virtio_begin_init(struct virtio_dev *d, const char **why)
{
    if (d->device_id == 0) {
        *why = "no-device";
        return false;
    }
    if (virtio_reg_read(d, VIRTIO_MMIO_VERSION) != 2) {
        *why = "not-version-2";
        return false;
    }
    if (!d->irq_routed) {
        u32 vector = 0x20 + d->slot.gsi;
        if (vector >= IRQ_VECTOR_TIMER || !irq_route(d->slot.gsi, (u8)vector, virtio_irq)) {
            *why = "irq-route";
            return false;
        }
        d->vector = (u8)vector;
        by_vector[vector] = d;
        d->irq_routed = true;
    }
    if (!virtio_reset(d)) {
        *why = "reset-timeout";
        return false;
    }
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    d->offered = virtio_device_features(d);
    if (!(d->offered & VIRTIO_F_VERSION_1)) {
        *why = "no-version-1";
        virtio_set_status(d, virtio_status(d) | VIRTIO_STATUS_FAILED);
        return false;
    }
    return true;
}

bool virtio_negotiate(struct virtio_dev *d, u64 wanted, const char **why)
{
    virtio_write_driver_features(d, d->offered & (wanted | VIRTIO_F_VERSION_1));
    u32 status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
    virtio_set_status(d, status | VIRTIO_STATUS_FEATURES_OK);
    if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
        *why = "features-not-ok";
        virtio_set_status(d, virtio_status(d) | VIRTIO_STATUS_FAILED);
        return false;
    }
    return true;
}

bool virtio_driver_ok(struct virtio_dev *d, const char **why)
{
    virtio_set_status(d, virtio_status(d) | VIRTIO_STATUS_DRIVER_OK);
    u32 s = virtio_status(d);
    if (!(s & VIRTIO_STATUS_DRIVER_OK) || (s & VIRTIO_STATUS_NEEDS_RESET)) {
        *why = "driver-ok-refused";
        return false;
    }
    return true;
}

bool virtio_init_simple(struct virtio_dev *d, u64 wanted, u16 queue_size, const char **why)
{
    return virtio_begin_init(d, why) && virtio_negotiate(d, wanted, why)
        && virtq_setup(d, 0, queue_size, why) && virtio_driver_ok(d, why);
}

/* ---- virtqueues --------------------------------------------------------- */

static volatile u16 *used_event(struct virtq *vq)
{
    return &vq->avail->ring[vq->size];
}

static volatile u16 *avail_event(struct virtq *vq)
{
    return (volatile u16 *)&vq->used->ring[vq->size];
}

u64 virtq_desc_addr(const struct virtq *vq) { return virt_to_phys((const void *)vq->desc); }
u64 virtq_avail_addr(const struct virtq *vq) { return virt_to_phys((const void *)vq->avail); }
u64 virtq_used_addr(const struct virtq *vq) { return virt_to_phys((const void *)vq->used); }

void virtq_reset_free(struct virtq *vq)
{
    for (u32 i = 0; i < vq->size; i++) {
        vq->next_free[i] = (u16)(i + 1);
        vq->chain_len[i] = 0;
    }
    vq->free_head = 0;
    vq->num_free = vq->size;
}

bool virtq_setup(struct virtio_dev *d, u16 index, u16 size, const char **why)
{
    if (index >= VIRTIO_MAX_QUEUES) {
        *why = "queue-index";
        return false;
    }
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_reg_read(d, VIRTIO_MMIO_QUEUE_READY) != 0) {
        *why = "queue-already-ready";
        return false;
    }
    u32 max = virtio_reg_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0) {
        *why = "queue-unavailable";
        return false;
    }
    if (size == 0)
        size = (u16)MIN(max, VIRTQ_MAX_SIZE);
    if (size > max || size > VIRTQ_MAX_SIZE || (size & (size - 1))) {
        *why = "queue-size";
        return false;
    }
    void **mem = &ring_mem[d->index][index];
    if (!*mem && !(*mem = dma_alloc(RING_BYTES))) {
        *why = "out-of-dma-memory";
        return false;
    }
    u8 *base = *mem;
    memset(base, 0, RING_BYTES);

    struct virtq *vq = &d->vq[index];
    vq->dev = d;
    vq->index = index;
    vq->event_idx = (d->acked & VIRTIO_F_EVENT_IDX) != 0;
    vq->desc = (volatile struct virtq_desc *)base;
    vq->avail = (volatile struct virtq_avail *)(base + PAGE_SIZE);
    vq->used = (volatile struct virtq_used *)(base + 2 * PAGE_SIZE);
    vq->next_free = (u16 *)(base + 3 * PAGE_SIZE);
    vq->chain_len = vq->next_free + VIRTQ_MAX_SIZE;
    vq->avail_idx = vq->kicked_idx = vq->last_used = vq->announced = 0;
    vq->size = size;
    virtq_reset_free(vq);

    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
    u64 desc = virtq_desc_addr(vq), avail = virtq_avail_addr(vq), used = virtq_used_addr(vq);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)avail);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)used);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (virtio_reg_read(d, VIRTIO_MMIO_QUEUE_READY) != 1) {
        vq->size = 0;
        *why = "queue-not-ready";
        return false;
    }
    return true;
}

void virtq_post(struct virtq *vq, u16 head)
{
    /* Ask for an interrupt when the oldest outstanding entry is used. */
    if (vq->event_idx)
        *used_event(vq) = vq->last_used;
    vq->avail->ring[vq->avail_idx % vq->size] = head;
    /* 2.7.13: the ring entry must be visible before the index that covers it. */
    mb();
    vq->avail_idx++;
    vq->avail->idx = vq->avail_idx;
}

int virtq_submit(struct virtq *vq, const struct virtq_buf *bufs, u32 n,
                 volatile struct virtq_desc *table)
{
    if (n == 0 || vq->size == 0)
        return -1;
    u32 need = table ? 1 : n;
    if (vq->num_free < need)
        return -1;
    u16 head = vq->free_head;
    if (table) {
        for (u32 i = 0; i < n; i++) {
            table[i].addr = bufs[i].addr;
            table[i].len = bufs[i].len;
            table[i].flags = (u16)((bufs[i].writable ? VIRTQ_DESC_F_WRITE : 0)
                                   | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
            table[i].next = (u16)(i + 1 < n ? i + 1 : 0);
        }
        vq->desc[head].addr = virt_to_phys((const void *)table);
        vq->desc[head].len = n * (u32)sizeof(struct virtq_desc);
        vq->desc[head].flags = VIRTQ_DESC_F_INDIRECT;
        vq->desc[head].next = 0;
        vq->free_head = vq->next_free[head];
    } else {
        u16 cur = head;
        for (u32 i = 0; i < n; i++) {
            vq->desc[cur].addr = bufs[i].addr;
            vq->desc[cur].len = bufs[i].len;
            u16 flags = bufs[i].writable ? VIRTQ_DESC_F_WRITE : 0;
            if (i + 1 < n) {
                flags |= VIRTQ_DESC_F_NEXT;
                vq->desc[cur].next = vq->next_free[cur];
            } else {
                vq->desc[cur].next = 0;
            }
            vq->desc[cur].flags = flags;
            cur = vq->next_free[cur];
        }
        vq->free_head = cur;
    }
    vq->num_free = (u16)(vq->num_free - need);
    vq->chain_len[head] = (u16)need;
    virtq_post(vq, head);
    return head;
}

void virtq_notify(struct virtq *vq)
{
    vq->kicked_idx = vq->avail_idx;
    virtio_reg_write(vq->dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

void virtq_kick(struct virtq *vq)
{
    /* The new avail.idx must be visible before the suppression state is read. */
    mb();
    u16 old = vq->kicked_idx, new = vq->avail_idx;
    bool need;
    if (vq->event_idx) {
        u16 ev = *avail_event(vq);
        need = (u16)(new - ev - 1) < (u16)(new - old);     /* vring_need_event */
    } else {
        need = !(vq->used->flags & VIRTQ_USED_F_NO_NOTIFY);
    }
    if (need)
        virtq_notify(vq);
    else
        vq->kicked_idx = new;
}

u16 virtq_used_idx(struct virtq *vq)
{
    return vq->used->idx;
}

bool virtq_has_used(struct virtq *vq)
{
    return vq->size && virtq_used_idx(vq) != vq->last_used;
}

/* An unconsumed entry that an interrupt has announced. */
static bool announced_pending(struct virtq *vq)
{
    u16 a = (u16)(vq->announced - vq->last_used);
    u16 u = (u16)(virtq_used_idx(vq) - vq->last_used);
    return a != 0 && a <= u;
}

enum virtq_wait_result virtq_wait(struct virtq *vq, u64 timeout_ms)
{
    struct virtio_dev *d = vq->dev;
    if (vq->event_idx && *used_event(vq) != vq->last_used) {
        /* used_event was stale, so the device may rightly have stayed quiet
         * about what it used since: re-arm, then take those as announced. */
        *used_event(vq) = vq->last_used;
        mb();
        if (virtq_has_used(vq))
            vq->announced = virtq_used_idx(vq);
    }
    u64 deadline = tsc_deadline_ms(timeout_ms);
    for (;;) {
        if (announced_pending(vq))
            return VIRTQ_WAIT_IRQ;
        u64 left = ms_until(deadline);
        if (left == 0)
            break;
        d->irq_used_flag = 0;
        if (announced_pending(vq))
            continue;
        wait_for_irq(&d->irq_used_flag, left);
    }
    return virtq_has_used(vq) ? VIRTQ_WAIT_POLLED : VIRTQ_WAIT_TIMEOUT;
}

bool virtq_pop_used(struct virtq *vq, u32 *id, u32 *len, bool free_chain)
{
    if (!virtq_has_used(vq))
        return false;
    /* The index is read before the entry it covers (2.7.14). */
    mb();
    volatile struct virtq_used_elem *e = &vq->used->ring[vq->last_used % vq->size];
    *id = e->id;
    *len = e->len;
    vq->last_used++;
    if (free_chain && *id < vq->size && vq->chain_len[*id]) {
        u16 head = (u16)*id, last = head;
        for (u32 i = 1; i < vq->chain_len[head]; i++)
            last = vq->next_free[last];
        vq->next_free[last] = vq->free_head;
        vq->free_head = head;
        vq->num_free = (u16)(vq->num_free + vq->chain_len[head]);
        vq->chain_len[head] = 0;
    }
    return true;
}
