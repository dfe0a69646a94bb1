/*
 * blk-hostile: a hostile virtio-blk driver. Each case breaks one rule of the
 * virtio 1.x transport, split virtqueue or block protocol, reports what the
 * device did, then checks that a normal read still works (without a device
 * reset when the device should have carried on, after one otherwise).
 *
 * Expected device behaviour (what `ok` means):
 *   - queue configuration refused: QueueReady reads 0; DRIVER_OK then makes
 *     the device report DEVICE_NEEDS_RESET with a configuration interrupt;
 *   - unwalkable chains (loop, next out of range, > 4 GiB, buffer outside RAM
 *     or across the MMIO hole, indirect when not negotiated, nested indirect)
 *     and chains without a writable status byte: returned in the used ring
 *     with length 0, status byte untouched, with an interrupt;
 *   - malformed requests: status IOERR (UNSUPP for an unknown type or FLUSH
 *     without the feature);
 *   - avail.idx jumping ahead: DEVICE_NEEDS_RESET + configuration interrupt,
 *     nothing processed until reset;
 *   - illegal status transitions and writes to read-only registers: ignored.
 */
#include "boot.h"
#include "cpu.h"
#include "io.h"
#include "lib.h"
#include "mm.h"
#include "report.h"
#include "scenario.h"
#include "virtio_blk.h"

#define H "blk-hostile"
#define WAIT_MS         BLK_TIMEOUT_MS
#define QUIET_MS        200     /* how long "nothing happens" is watched */
#define SCRATCH_BYTES   (8 * PAGE_SIZE)

/* Scratch layout (offsets in the DMA scratch area). */
#define OFF_HDR         0x000
#define OFF_STATUS      0x100   /* the status byte of hand-made chains */
#define OFF_RO_BYTE     0x101   /* a device-readable "status" byte */
#define OFF_DATA        0x1000  /* 2 pages */
#define OFF_TABLE       0x3000  /* indirect table */
#define OFF_TABLE2      0x4000  /* nested indirect table */

struct hctx {
    u32 dev;                    /* block device index */
    struct blk_dev *b;
    struct virtio_dev *d;
    struct virtq *vq;
    u8 *scratch;
    u8 *ref;                    /* sector 0 as first read */
    u64 mode;                   /* extra features of the current initialisation */
    bool live;                  /* initialised in `mode` and working */
    bool reset_needed;          /* the case left the device unusable on purpose */
    bool read_only;
    bool skipped;               /* the case does not apply to this device */
    u64 ram_low_end;            /* end of the RAM entry holding 1 MiB */
    u64 ram_top;                /* end of the highest RAM entry */
    bool ram_to_hole;           /* some RAM entry ends exactly at 3 GiB */
};

struct hcase {
    const char *name;
    void (*run)(struct hctx *h, const struct hcase *c);
    u64 mode;                   /* features the case needs negotiated */
    u64 a, b;                   /* case parameters */
};

static u64 scr(struct hctx *h, u32 off) { return virt_to_phys(h->scratch + off); }
static volatile u8 *status_byte(struct hctx *h) { return h->scratch + OFF_STATUS; }

static void set_hdr(struct hctx *h, u32 type, u64 sector)
{
    volatile struct virtio_blk_req_hdr *hdr = (void *)(h->scratch + OFF_HDR);
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
}

/* Writes descriptor i of `table` (NULL: the queue's table). */
static void put_desc(struct hctx *h, volatile struct virtq_desc *table, u16 i,
                     u64 addr, u32 len, u16 flags, u16 next)
{
    volatile struct virtq_desc *t = table ? table : h->vq->desc;
    t[i].addr = addr;
    t[i].len = len;
    t[i].flags = flags;
    t[i].next = next;
}

#define R 0
#define W VIRTQ_DESC_F_WRITE

struct raw { u64 addr; u32 len; u16 flags; };

/* A linear chain of `n` descriptors starting at 0 (NEXT added). */
static void put_chain(struct hctx *h, const struct raw *c, u32 n)
{
    for (u32 i = 0; i < n; i++)
        put_desc(h, NULL, (u16)i, c[i].addr, c[i].len,
                 (u16)(c[i].flags | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0)),
                 (u16)(i + 1 < n ? i + 1 : 0));
}

struct outcome {
    enum virtq_wait_result wait;
    bool used;
    u32 id, len;
    u8 status;
};

/* Posts `head`, notifies, waits for one used entry. */
static void run_head(struct hctx *h, u16 head, struct outcome *o)
{
    virtq_post(h->vq, head);
    virtq_notify(h->vq);
    o->wait = virtq_wait(h->vq, WAIT_MS);
    o->used = virtq_pop_used(h->vq, &o->id, &o->len, false);
    o->status = *status_byte(h);
}

static const char *wait_name(enum virtq_wait_result w)
{
    return w == VIRTQ_WAIT_IRQ ? "" : w == VIRTQ_WAIT_POLLED ? " irq=none" : " used=none";
}

/* Reports a chain the device must refuse: used length 0, status untouched. */
static void report_refused(const struct hcase *c, const struct outcome *o)
{
    char sbuf[8];
    const char *st = blk_status_name(o->status, sbuf, sizeof(sbuf));
    bool good = o->wait == VIRTQ_WAIT_IRQ && o->used && o->id == 0 && o->len == 0
        && o->status == BLK_STATUS_UNTOUCHED;
    (good ? ok : fail)(H, "%s used-len=%u status=%s%s", c->name, o->used ? o->len : 0, st,
                       wait_name(o->wait));
}

/* Reports a request the device must answer with `want`. */
static void report_status(const struct hcase *c, const struct outcome *o, u8 want)
{
    char sbuf[8];
    const char *st = blk_status_name(o->status, sbuf, sizeof(sbuf));
    bool good = o->wait == VIRTQ_WAIT_IRQ && o->used && o->id == 0 && o->status == want;
    (good ? ok : fail)(H, "%s used-len=%u status=%s%s", c->name, o->used ? o->len : 0, st,
                       wait_name(o->wait));
}

/* ---- (re)initialisation and recovery ------------------------------------ */

static bool init_mode(struct hctx *h, u64 mode, const char **why)
{
    h->live = false;
    h->b = blk_open(h->dev, mode, false, why);
    if (!h->b)
        return false;
    h->d = h->b->vdev;
    h->vq = &h->d->vq[0];
    h->mode = mode;
    h->live = true;
    h->reset_needed = false;
    return true;
}

/* A normal read of sector 0 through the driver, compared with the first one. */
static bool normal_read(struct hctx *h, char *why, size_t size)
{
    struct blk_result r;
    char sbuf[8];
    virtq_reset_free(h->vq);    /* hand-made chains bypassed the free list */
    memset(h->b->data2, 0, BLK_SECTOR_SIZE);
    if (!blk_request(h->b, VIRTIO_BLK_T_IN, 0, h->b->data2, BLK_SECTOR_SIZE, &r)) {
        ksnprintf(why, size, "%s", r.wait == VIRTQ_WAIT_TIMEOUT ? "timeout" : "no-used-entry");
        return false;
    }
    if (r.wait != VIRTQ_WAIT_IRQ || r.status != VIRTIO_BLK_S_OK
        || r.used_len != BLK_SECTOR_SIZE + 1) {
        ksnprintf(why, size, "status=%s used-len=%u%s",
                  blk_status_name(r.status, sbuf, sizeof(sbuf)), r.used_len, wait_name(r.wait));
        return false;
    }
    if (h->ref && memcmp(h->b->data2, h->ref, BLK_SECTOR_SIZE) != 0) {
        ksnprintf(why, size, "data-mismatch");
        return false;
    }
    return true;
}

static void recover(struct hctx *h, const struct hcase *c)
{
    char why[64];
    const char *iwhy = "";
    if (h->reset_needed || !h->live) {
        if (!init_mode(h, h->mode, &iwhy)) {
            fail(H, "%s not-recovered init=%s", c->name, iwhy);
            return;
        }
        if (normal_read(h, why, sizeof(why)))
            ok(H, "%s recovered after-reset", c->name);
        else
            fail(H, "%s not-recovered after-reset %s", c->name, why);
        return;
    }
    if (normal_read(h, why, sizeof(why))) {
        ok(H, "%s recovered", c->name);
        return;
    }
    fail(H, "%s not-recovered %s", c->name, why);
    h->live = false;            /* the next case starts from a reset */
}

/* ---- transport: queue configuration ------------------------------------- */

enum { Q_NUM, Q_DESC, Q_AVAIL, Q_USED };
/* Values of hcase.b for Q_DESC/Q_AVAIL/Q_USED resolved at run time. */
#define QV_MISALIGNED   1       /* the valid ring address + 8 / 1 / 2 */
#define QV_LOW_END      2       /* 2 KiB before the end of the RAM holding 1 MiB */
#define QV_RAM_TOP      3       /* the end of the highest RAM */

/*
 * Initialises up to FEATURES_OK and programs queue 0 with valid rings except
 * one field (c->a selects it, c->b is its value), sets QueueReady, then
 * DRIVER_OK.
 */
static void case_queue_config(struct hctx *h, const struct hcase *c)
{
    const char *why = "";
    struct virtio_dev *d = h->d;
    /* The rings of the last (valid) initialisation. */
    u64 desc = virtq_desc_addr(h->vq), avail = virtq_avail_addr(h->vq), used = virtq_used_addr(h->vq);
    u32 num = VIRTQ_MAX_SIZE;
    h->live = false;
    h->reset_needed = true;
    if (!virtio_begin_init(d, &why) || !virtio_negotiate(d, 0, &why)) {
        fail(H, "%s init=%s", c->name, why);
        return;
    }
    u64 v = c->b;
    if (c->a != Q_NUM) {
        u64 valid = c->a == Q_DESC ? desc : c->a == Q_AVAIL ? avail : used;
        if (v == QV_MISALIGNED)
            v = valid + (c->a == Q_DESC ? 8 : c->a == Q_AVAIL ? 1 : 2);
        else if (v == QV_LOW_END)
            v = h->ram_low_end - 0x800;
        else if (v == QV_RAM_TOP)
            v = h->ram_top;
    }
    switch (c->a) {
    case Q_NUM: num = (u32)v; break;
    case Q_DESC: desc = v; break;
    case Q_AVAIL: avail = v; break;
    default: used = v; break;
    }
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NUM, num);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)avail);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)used);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
    u32 ready = virtio_reg_read(d, VIRTIO_MMIO_QUEUE_READY);
    d->irq_config_flag = 0;
    virtio_set_status(d, virtio_status(d) | VIRTIO_STATUS_DRIVER_OK);
    u32 status = virtio_status(d);
    bool cfg = virtio_wait_config_irq(d, WAIT_MS);
    bool good = ready == 0 && (status & VIRTIO_STATUS_NEEDS_RESET) && cfg;
    (good ? ok : fail)(H, "%s ready=%u status=0x%x config-irq=%u", c->name, ready, status, cfg);
}

/* ---- transport: registers and status ------------------------------------ */

static void case_queue_sel(struct hctx *h, const struct hcase *c)
{
    const char *why = "";
    struct virtio_dev *d = h->d;
    h->live = false;
    if (!virtio_begin_init(d, &why) || !virtio_negotiate(d, 0, &why)) {
        fail(H, "%s init=%s", c->name, why);
        return;
    }
    static const u32 sels[] = { 1, 0xffffffff };
    u32 num_max[2], ready[2];
    for (u32 i = 0; i < 2; i++) {
        virtio_reg_write(d, VIRTIO_MMIO_QUEUE_SEL, sels[i]);
        num_max[i] = virtio_reg_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
        virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NUM, 16);
        virtio_reg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)scr(h, OFF_DATA));
        virtio_reg_write(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)scr(h, OFF_DATA + 0x800));
        virtio_reg_write(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)scr(h, OFF_DATA + 0x1000));
        virtio_reg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
        ready[i] = virtio_reg_read(d, VIRTIO_MMIO_QUEUE_READY);
    }
    /* Queue 0 must be untouched by all that, and still configurable. */
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    u32 q0_max = virtio_reg_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    bool q0 = virtq_setup(d, 0, 0, &why) && virtio_driver_ok(d, &why);
    /* A notification for a queue that does not exist. */
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    h->live = q0;
    bool good = !num_max[0] && !num_max[1] && !ready[0] && !ready[1] && q0;
    (good ? ok : fail)(H, "%s num-max=%u,%u ready=%u,%u queue0-num-max=%u queue0=%s",
                       c->name, num_max[0], num_max[1], ready[0], ready[1], q0_max,
                       q0 ? "ok" : why);
}

static void case_status_illegal(struct hctx *h, const struct hcase *c)
{
    const char *why = "";
    struct virtio_dev *d = h->d;
    h->live = false;
    if (!virtio_begin_init(d, &why)) {      /* leaves ACK|DRIVER */
        fail(H, "%s init=%s", c->name, why);
        return;
    }
    u32 s[5];
    virtio_set_status(d, 0);
    virtio_set_status(d, VIRTIO_STATUS_DRIVER_OK);                      /* 0 -> DRIVER_OK */
    s[0] = virtio_status(d);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    virtio_set_status(d, 0xf);                                          /* ACK -> everything */
    s[1] = virtio_status(d);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    (void)virtio_device_features(d);
    bool neg = virtio_negotiate(d, 0, &why);
    virtio_set_status(d, 0xb | VIRTIO_STATUS_NEEDS_RESET);              /* driver sets NEEDS_RESET */
    s[2] = virtio_status(d);
    bool live = neg && virtq_setup(d, 0, 0, &why) && virtio_driver_ok(d, &why);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);                    /* clears bits */
    s[3] = virtio_status(d);
    mmio_write8(d->slot.base + VIRTIO_MMIO_STATUS, 0);                  /* narrow "reset" */
    s[4] = virtio_status(d);
    h->live = live;
    bool good = s[0] == 0 && s[1] == 1 && s[2] == 0xb && s[3] == 0xf && s[4] == 0xf && live;
    (good ? ok : fail)(H, "%s 0->0x4:0x%x 0x1->0xf:0x%x 0xb->0x4b:0x%x 0xf->0x1:0x%x narrow-0:0x%x",
                       c->name, s[0], s[1], s[2], s[3], s[4]);
}

static void case_features_no_v1(struct hctx *h, const struct hcase *c)
{
    const char *why = "";
    struct virtio_dev *d = h->d;
    h->live = false;
    h->reset_needed = true;
    if (!virtio_begin_init(d, &why)) {
        fail(H, "%s init=%s", c->name, why);
        return;
    }
    virtio_write_driver_features(d, d->offered & ~VIRTIO_F_VERSION_1);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    u32 s = virtio_status(d);
    (!(s & VIRTIO_STATUS_FEATURES_OK) ? ok : fail)(H, "%s status=0x%x", c->name, s);
}

static void case_ro_registers(struct hctx *h, const struct hcase *c)
{
    struct virtio_dev *d = h->d;
    static const struct { u32 reg; const char *name; } regs[] = {
        { VIRTIO_MMIO_MAGIC_VALUE, "magic" },
        { VIRTIO_MMIO_VERSION, "version" },
        { VIRTIO_MMIO_DEVICE_ID, "device-id" },
        { VIRTIO_MMIO_VENDOR_ID, "vendor-id" },
        { VIRTIO_MMIO_DEVICE_FEATURES, "device-features" },
        { VIRTIO_MMIO_QUEUE_NUM_MAX, "queue-num-max" },
        { VIRTIO_MMIO_INTERRUPT_STATUS, "interrupt-status" },
        { VIRTIO_MMIO_CONFIG_GENERATION, "config-generation" },
        { VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CFG_CAPACITY, "capacity" },
        { VIRTIO_MMIO_CONFIG + VIRTIO_BLK_CFG_SEG_MAX, "seg-max" },
    };
    u32 before[ARRAY_SIZE(regs)];
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    virtio_reg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    for (u32 i = 0; i < ARRAY_SIZE(regs); i++)
        before[i] = virtio_reg_read(d, regs[i].reg);
    for (u32 i = 0; i < ARRAY_SIZE(regs); i++)
        virtio_reg_write(d, regs[i].reg, ~before[i]);
    char changed[160] = "none";
    size_t len = 0;
    for (u32 i = 0; i < ARRAY_SIZE(regs); i++) {
        if (virtio_reg_read(d, regs[i].reg) != before[i])
            len += ksnprintf(changed + len, sizeof(changed) - MIN(len, sizeof(changed)),
                             "%s%s", len ? "," : "", regs[i].name);
    }
    (len == 0 ? ok : fail)(H, "%s written=%u changed=%s", c->name, (u32)ARRAY_SIZE(regs), changed);
}

/* Queue registers written while the device runs must be ignored. */
static void case_queue_write_live(struct hctx *h, const struct hcase *c)
{
    struct virtio_dev *d = h->d;
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NUM, 16);
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)scr(h, OFF_DATA));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)scr(h, OFF_DATA + 0x800));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)scr(h, OFF_DATA + 0x1000));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_READY, 0);
    u32 ready = virtio_reg_read(d, VIRTIO_MMIO_QUEUE_READY);
    u32 status = virtio_status(d);
    (ready == 1 && status == 0xf ? ok : fail)(H, "%s ready=%u status=0x%x", c->name, ready, status);
}

/* ---- rings ------------------------------------------------------------- */

/* header, 512 bytes of read data, status: a valid read of sector 0. */
static void put_good_read(struct hctx *h, u16 first)
{
    set_hdr(h, VIRTIO_BLK_T_IN, 0);
    *status_byte(h) = BLK_STATUS_UNTOUCHED;
    put_desc(h, NULL, first, scr(h, OFF_HDR), 16, VIRTQ_DESC_F_NEXT, (u16)(first + 1));
    put_desc(h, NULL, (u16)(first + 1), scr(h, OFF_DATA), 512, VIRTQ_DESC_F_NEXT | W, (u16)(first + 2));
    put_desc(h, NULL, (u16)(first + 2), scr(h, OFF_STATUS), 1, W, 0);
}

static void case_avail_jump(struct hctx *h, const struct hcase *c)
{
    struct virtio_dev *d = h->d;
    struct virtq *vq = h->vq;
    h->reset_needed = true;
    d->irq_config_flag = 0;
    vq->avail->idx = (u16)(vq->avail_idx + vq->size + 5);
    mb();
    virtq_notify(vq);
    bool cfg = virtio_wait_config_irq(d, WAIT_MS);
    u32 status = virtio_status(d);
    /* Put the index back, post a valid request: the device must stay stopped. */
    vq->avail->idx = vq->avail_idx;
    put_good_read(h, 0);
    virtq_post(vq, 0);
    virtq_notify(vq);
    enum virtq_wait_result w = virtq_wait(vq, QUIET_MS);
    u32 used = (u16)(virtq_used_idx(vq) - vq->last_used);
    bool good = cfg && (status & VIRTIO_STATUS_NEEDS_RESET) && w == VIRTQ_WAIT_TIMEOUT
        && *status_byte(h) == BLK_STATUS_UNTOUCHED;
    (good ? ok : fail)(H, "%s status=0x%x config-irq=%u then-used=%u", c->name, status, cfg, used);
}

static void case_same_head(struct hctx *h, const struct hcase *c)
{
    struct virtq *vq = h->vq;
    put_good_read(h, 0);
    virtq_post(vq, 0);
    virtq_post(vq, 0);
    virtq_notify(vq);
    u32 n = 0, ids_ok = 1, lens[2] = { 0, 0 };
    for (u32 i = 0; i < 2; i++) {
        if (virtq_wait(vq, i ? QUIET_MS : WAIT_MS) == VIRTQ_WAIT_TIMEOUT)
            break;
        u32 id, len;
        while (n < 2 && virtq_pop_used(vq, &id, &len, false)) {
            ids_ok &= id == 0;
            lens[n++] = len;
        }
        if (n == 2)
            break;
    }
    char sbuf[8];
    u8 st = *status_byte(h);
    bool good = n >= 1 && ids_ok && st == VIRTIO_BLK_S_OK;
    (good ? ok : fail)(H, "%s used=%u len=%u,%u status=%s", c->name, n, lens[0], lens[1],
                       blk_status_name(st, sbuf, sizeof(sbuf)));
}

static void case_head_range(struct hctx *h, const struct hcase *c)
{
    struct virtq *vq = h->vq;
    put_good_read(h, 0);
    virtq_post(vq, (u16)(vq->size + 44));
    virtq_post(vq, 0);
    virtq_notify(vq);
    virtq_wait(vq, WAIT_MS);
    u32 n = 0, id, len, good_ids = 0, bad_ids = 0;
    while (virtq_pop_used(vq, &id, &len, false)) {
        n++;
        if (id == 0)
            good_ids++;
        else
            bad_ids++;
    }
    char sbuf[8];
    u8 st = *status_byte(h);
    bool good = good_ids == 1 && st == VIRTIO_BLK_S_OK;
    (good ? ok : fail)(H, "%s head=%u used=%u other-ids=%u status=%s", c->name,
                       vq->size + 44, n, bad_ids, blk_status_name(st, sbuf, sizeof(sbuf)));
}

/* ---- descriptor chains --------------------------------------------------- */

static void case_desc_loop(struct hctx *h, const struct hcase *c)
{
    struct outcome o;
    put_good_read(h, 0);
    if (c->a == 0)
        put_desc(h, NULL, 0, scr(h, OFF_HDR), 16, VIRTQ_DESC_F_NEXT, 0);       /* self */
    else
        put_desc(h, NULL, 2, scr(h, OFF_STATUS), 1, VIRTQ_DESC_F_NEXT | W, 0); /* 2 -> 0 */
    run_head(h, 0, &o);
    report_refused(c, &o);
}

static void case_next_range(struct hctx *h, const struct hcase *c)
{
    struct outcome o;
    put_good_read(h, 0);
    u16 next = c->a ? (u16)c->a : h->vq->size;
    put_desc(h, NULL, 2, scr(h, OFF_STATUS), 1, VIRTQ_DESC_F_NEXT | W, next);
    run_head(h, 0, &o);
    report_refused(c, &o);
}

/* Readable buffers whose lengths add up past 4 GiB, all inside RAM. */
static void case_len_overflow(struct hctx *h, const struct hcase *c)
{
    struct outcome o;
    u64 room = h->ram_low_end > 2 * MiB ? h->ram_low_end - 2 * MiB : 0;
    u64 big = 1;
    while (big * 2 <= room && big < 2 * GiB)
        big *= 2;
    u32 n = (u32)((4 * GiB) / big) + 1;        /* n * big > 4 GiB - 1 */
    if (big < MiB || n + 3 > h->vq->size) {
        info(H, "%s skipped ram=0x%llx", c->name, h->ram_low_end);
        h->skipped = true;
        return;
    }
    set_hdr(h, VIRTIO_BLK_T_IN, 0);
    *status_byte(h) = BLK_STATUS_UNTOUCHED;
    u16 i = 0;
    put_desc(h, NULL, i, scr(h, OFF_HDR), 16, VIRTQ_DESC_F_NEXT, (u16)(i + 1)); i++;
    for (u32 k = 0; k < n; k++, i++)
        put_desc(h, NULL, i, 2 * MiB, (u32)big, VIRTQ_DESC_F_NEXT, (u16)(i + 1));
    put_desc(h, NULL, i, scr(h, OFF_DATA), 512, VIRTQ_DESC_F_NEXT | W, (u16)(i + 1)); i++;
    put_desc(h, NULL, i, scr(h, OFF_STATUS), 1, W, 0);
    run_head(h, 0, &o);
    report_refused(c, &o);
}

enum { A_PAST_TOP, A_STRADDLE_TOP, A_WRAP, A_INTO_HOLE, A_ACROSS_HOLE };

/* A read whose data buffer is somewhere it must not be. */
static void case_bad_addr(struct hctx *h, const struct hcase *c)
{
    struct outcome o;
    u64 addr;
    u32 len = 512;
    switch (c->a) {
    case A_PAST_TOP: addr = h->ram_top; break;
    case A_STRADDLE_TOP: addr = h->ram_top - 256; break;
    case A_WRAP: addr = 0xffffffffffffff00ULL; break;
    case A_INTO_HOLE: addr = 3 * GiB - 256; break;
    default: addr = 3 * GiB - 256; len = (u32)(GiB + 512); break;
    }
    put_good_read(h, 0);
    put_desc(h, NULL, 1, addr, len, VIRTQ_DESC_F_NEXT | W, 2);
    run_head(h, 0, &o);
    if (c->a == A_INTO_HOLE || c->a == A_ACROSS_HOLE) {
        /* Only meaningful when RAM reaches the hole; the device must refuse either way. */
        char sbuf[8];
        bool good = o.wait == VIRTQ_WAIT_IRQ && o.used && o.len == 0
            && o.status == BLK_STATUS_UNTOUCHED;
        (good ? ok : fail)(H, "%s ram-to-hole=%u used-len=%u status=%s%s", c->name,
                           h->ram_to_hole, o.used ? o.len : 0,
                           blk_status_name(o.status, sbuf, sizeof(sbuf)), wait_name(o.wait));
        return;
    }
    report_refused(c, &o);
}

static void put_table_read(struct hctx *h, volatile struct virtq_desc *t)
{
    set_hdr(h, VIRTIO_BLK_T_IN, 0);
    *status_byte(h) = BLK_STATUS_UNTOUCHED;
    put_desc(h, t, 0, scr(h, OFF_HDR), 16, VIRTQ_DESC_F_NEXT, 1);
    put_desc(h, t, 1, scr(h, OFF_DATA), 512, VIRTQ_DESC_F_NEXT | W, 2);
    put_desc(h, t, 2, scr(h, OFF_STATUS), 1, W, 0);
}

/* c->a: 0 = an indirect table without the feature, 1 = nested tables (negotiated). */
static void case_indirect(struct hctx *h, const struct hcase *c)
{
    struct outcome o;
    volatile struct virtq_desc *t1 = (void *)(h->scratch + OFF_TABLE);
    volatile struct virtq_desc *t2 = (void *)(h->scratch + OFF_TABLE2);
    if (c->a == 0) {
        put_table_read(h, t1);
    } else {
        put_table_read(h, t2);
        put_desc(h, t1, 0, scr(h, OFF_TABLE2), 3 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    }
    put_desc(h, NULL, 0, scr(h, OFF_TABLE), c->a ? 16 : 3 * 16, VIRTQ_DESC_F_INDIRECT, 0);
    run_head(h, 0, &o);
    report_refused(c, &o);
}

/* ---- block requests ----------------------------------------------------- */

enum {
    B_HDR_WRITABLE, B_NO_STATUS, B_STATUS_EMPTY, B_STATUS_RO, B_READ_LEN, B_WRITE_LEN,
    B_READ_PAST_END, B_WRITE_PAST_END, B_READ_SECTOR_MAX, B_WRITE_SECTOR_MAX,
    B_WRITE_OFFSET_WRAP, B_UNKNOWN_TYPE, B_FLUSH_UNNEG, B_WRITE_DATA_WRITABLE,
    B_READ_DATA_READABLE, B_NO_DATA, B_RO_WRITE,
};

static void case_request(struct hctx *h, const struct hcase *c)
{
    struct outcome o;
    u64 hdr = scr(h, OFF_HDR), data = scr(h, OFF_DATA), st = scr(h, OFF_STATUS);
    u64 cap = h->b->capacity;
    volatile u8 *ro_byte = h->scratch + OFF_RO_BYTE;
    *status_byte(h) = BLK_STATUS_UNTOUCHED;
    *ro_byte = BLK_STATUS_UNTOUCHED;
    /* Write data: the pattern of an arbitrary sector (never valid to write here). */
    blk_pattern_fill(h->scratch + OFF_DATA, 1000, 2);
    u8 want = VIRTIO_BLK_S_IOERR;
    bool refused = false;

    switch (c->a) {
    case B_HDR_WRITABLE:
        set_hdr(h, VIRTIO_BLK_T_IN, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, W }, { data, 512, W }, { st, 1, W } }, 3);
        break;
    case B_NO_STATUS:
        set_hdr(h, VIRTIO_BLK_T_IN, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R } }, 1);
        refused = true;
        break;
    case B_STATUS_EMPTY:
        set_hdr(h, VIRTIO_BLK_T_FLUSH, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { st, 0, W } }, 2);
        refused = true;
        break;
    case B_STATUS_RO: {
        set_hdr(h, VIRTIO_BLK_T_IN, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, W }, { st + 1, 1, R } }, 3);
        run_head(h, 0, &o);
        /* The device-readable byte must stay as it was, whatever else happens. */
        char sbuf[8], dbuf[8];
        u8 ro = *ro_byte;
        bool good = o.wait == VIRTQ_WAIT_IRQ && o.used && ro == BLK_STATUS_UNTOUCHED;
        (good ? ok : fail)(H, "%s used-len=%u readable-byte=%s data-last=%s%s", c->name,
                           o.used ? o.len : 0, blk_status_name(ro, sbuf, sizeof(sbuf)),
                           blk_status_name(h->scratch[OFF_DATA + 511], dbuf, sizeof(dbuf)),
                           wait_name(o.wait));
        return;
    }
    case B_READ_LEN:
        set_hdr(h, VIRTIO_BLK_T_IN, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 511, W }, { st, 1, W } }, 3);
        break;
    case B_WRITE_LEN:
        set_hdr(h, VIRTIO_BLK_T_OUT, 1);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 513, R }, { st, 1, W } }, 3);
        break;
    case B_READ_PAST_END:
        set_hdr(h, VIRTIO_BLK_T_IN, cap);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, W }, { st, 1, W } }, 3);
        break;
    case B_WRITE_PAST_END:
        set_hdr(h, VIRTIO_BLK_T_OUT, cap - 1);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 1024, R }, { st, 1, W } }, 3);
        break;
    case B_READ_SECTOR_MAX:
        set_hdr(h, VIRTIO_BLK_T_IN, ~0ULL);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, W }, { st, 1, W } }, 3);
        break;
    case B_WRITE_SECTOR_MAX:
        set_hdr(h, VIRTIO_BLK_T_OUT, ~0ULL);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, R }, { st, 1, W } }, 3);
        break;
    case B_WRITE_OFFSET_WRAP:
        /* sector * 512 wraps to 0 in 64 bits: must not land on sector 0. */
        set_hdr(h, VIRTIO_BLK_T_OUT, 1ULL << 55);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, R }, { st, 1, W } }, 3);
        break;
    case B_UNKNOWN_TYPE:
        set_hdr(h, 99, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, W }, { st, 1, W } }, 3);
        want = VIRTIO_BLK_S_UNSUPP;
        break;
    case B_FLUSH_UNNEG:
        set_hdr(h, VIRTIO_BLK_T_FLUSH, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { st, 1, W } }, 2);
        want = VIRTIO_BLK_S_UNSUPP;
        break;
    case B_WRITE_DATA_WRITABLE:
        set_hdr(h, VIRTIO_BLK_T_OUT, 1);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, W }, { st, 1, W } }, 3);
        break;
    case B_READ_DATA_READABLE:
        set_hdr(h, VIRTIO_BLK_T_IN, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, R }, { st, 1, W } }, 3);
        break;
    case B_NO_DATA:
        set_hdr(h, VIRTIO_BLK_T_IN, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { st, 1, W } }, 2);
        break;
    case B_RO_WRITE:
        if (!h->read_only) {
            info(H, "%s skipped not-read-only", c->name);
            h->skipped = true;
            return;
        }
        set_hdr(h, VIRTIO_BLK_T_OUT, 0);
        put_chain(h, (struct raw[]){ { hdr, 16, R }, { data, 512, R }, { st, 1, W } }, 3);
        break;
    }
    run_head(h, 0, &o);
    if (refused)
        report_refused(c, &o);
    else
        report_status(c, &o, want);
}

/* ---- the table ---------------------------------------------------------- */

static const struct hcase cases[] = {
    /* virtio transport and queues (8, 14) */
    { "qsize-0",            case_queue_config,   0, Q_NUM, 0 },
    { "qsize-not-pow2",     case_queue_config,   0, Q_NUM, 100 },
    { "qsize-over-max",     case_queue_config,   0, Q_NUM, 512 },
    { "desc-misaligned",    case_queue_config,   0, Q_DESC, QV_MISALIGNED },
    { "avail-misaligned",   case_queue_config,   0, Q_AVAIL, QV_MISALIGNED },
    { "used-misaligned",    case_queue_config,   0, Q_USED, QV_MISALIGNED },
    { "desc-in-hole",       case_queue_config,   0, Q_DESC, 0xd0000000ULL },
    { "desc-straddles-ram-end", case_queue_config, 0, Q_DESC, QV_LOW_END },
    { "avail-past-ram",     case_queue_config,   0, Q_AVAIL, QV_RAM_TOP },
    { "used-wraps",         case_queue_config,   0, Q_USED, 0xfffffffffffff000ULL },
    { "queue-sel",          case_queue_sel,      0, 0, 0 },
    { "status-illegal",     case_status_illegal, 0, 0, 0 },
    { "features-no-v1",     case_features_no_v1, 0, 0, 0 },
    { "ro-registers",       case_ro_registers,   0, 0, 0 },
    { "queue-write-live",   case_queue_write_live, 0, 0, 0 },
    /* rings and chains (9-14) */
    { "avail-jump",         case_avail_jump,     0, 0, 0 },
    { "same-head",          case_same_head,      0, 0, 0 },
    { "head-range",         case_head_range,     0, 0, 0 },
    { "desc-self-loop",     case_desc_loop,      0, 0, 0 },
    { "desc-loop",          case_desc_loop,      0, 1, 0 },
    { "next-range",         case_next_range,     0, 0, 0 },
    { "next-max",           case_next_range,     0, 0xffff, 0 },
    { "len-overflow",       case_len_overflow,   0, 0, 0 },
    { "addr-past-ram",      case_bad_addr,       0, A_PAST_TOP, 0 },
    { "addr-straddles-ram-end", case_bad_addr,   0, A_STRADDLE_TOP, 0 },
    { "addr-wraps",         case_bad_addr,       0, A_WRAP, 0 },
    { "addr-into-hole",     case_bad_addr,       0, A_INTO_HOLE, 0 },
    { "addr-across-hole",   case_bad_addr,       0, A_ACROSS_HOLE, 0 },
    { "indirect-unneg",     case_indirect,       0, 0, 0 },
    { "indirect-nested",    case_indirect,       VIRTIO_F_INDIRECT_DESC, 1, 0 },
    /* virtio-blk requests (15, 16) */
    { "hdr-writable",       case_request,        0, B_HDR_WRITABLE, 0 },
    { "no-status",          case_request,        0, B_NO_STATUS, 0 },
    { "status-empty",       case_request,        0, B_STATUS_EMPTY, 0 },
    { "status-readable",    case_request,        0, B_STATUS_RO, 0 },
    { "read-len-511",       case_request,        0, B_READ_LEN, 0 },
    { "write-len-513",      case_request,        0, B_WRITE_LEN, 0 },
    { "read-past-end",      case_request,        0, B_READ_PAST_END, 0 },
    { "write-past-end",     case_request,        0, B_WRITE_PAST_END, 0 },
    { "read-sector-max",    case_request,        0, B_READ_SECTOR_MAX, 0 },
    { "write-sector-max",   case_request,        0, B_WRITE_SECTOR_MAX, 0 },
    { "write-offset-wraps", case_request,        0, B_WRITE_OFFSET_WRAP, 0 },
    { "unknown-type",       case_request,        0, B_UNKNOWN_TYPE, 0 },
    { "flush-unneg",        case_request,        0, B_FLUSH_UNNEG, 0 },
    { "write-data-writable", case_request,       0, B_WRITE_DATA_WRITABLE, 0 },
    { "read-data-readable", case_request,        0, B_READ_DATA_READABLE, 0 },
    { "no-data",            case_request,        0, B_NO_DATA, 0 },
    { "ro-write",           case_request,        0, B_RO_WRITE, 0 },
};

static void find_ram(struct hctx *h)
{
    for (u32 i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        if (e->type != E820_RAM)
            continue;
        u64 end = e->addr + e->size;
        if (e->addr <= MiB && MiB < end)
            h->ram_low_end = end;
        if (end > h->ram_top)
            h->ram_top = end;
        if (end == 3 * GiB)
            h->ram_to_hole = true;
    }
}

void scn_blk_hostile(const char *arg)
{
    static u8 *scratch, *ref;
    static struct hctx h;
    char buf[64];
    const char *name = arg ? arg : "all";
    u64 dev = 0;
    /* "[<dev>:]<case>|all" */
    size_t i = 0;
    while (name[i] >= '0' && name[i] <= '9')
        i++;
    if (i && name[i] == ':') {
        if (!parse_u64(name, i, &dev) || dev >= VIRTIO_MAX_DEVICES) {
            fail(H, "bad-arg=%s", arg);
            return;
        }
        name += i + 1;
    }
    ksnprintf(buf, sizeof(buf), "%s", name);
    bool all = strcmp(buf, "all") == 0;
    const struct hcase *only = NULL;
    for (u32 k = 0; k < ARRAY_SIZE(cases) && !all; k++)
        if (strcmp(cases[k].name, buf) == 0)
            only = &cases[k];
    if (!all && !only) {
        fail(H, "unknown-case=%s", buf);
        return;
    }

    if (!scratch) {
        scratch = dma_alloc(SCRATCH_BYTES);
        ref = dma_alloc(PAGE_SIZE);
        if (!scratch || !ref) {
            fail(H, "out-of-dma-memory");
            return;
        }
    }
    memset(&h, 0, sizeof(h));
    h.dev = (u32)dev;
    h.scratch = scratch;
    find_ram(&h);
    const char *why = "";
    if (!init_mode(&h, 0, &why)) {
        fail(H, "init dev=%llu %s", dev, why);
        return;
    }
    h.read_only = (h.d->offered & VIRTIO_BLK_F_RO) != 0;
    char rbuf[16];
    if (!normal_read(&h, rbuf, sizeof(rbuf))) {
        fail(H, "first-read dev=%llu %s", dev, rbuf);
        return;
    }
    memcpy(ref, h.b->data2, BLK_SECTOR_SIZE);
    h.ref = ref;
    info(H, "dev=%llu capacity=%llu ro=%u cases=%u", dev, h.b->capacity, h.read_only,
         all ? (u32)ARRAY_SIZE(cases) : 1);

    for (u32 k = 0; k < ARRAY_SIZE(cases); k++) {
        const struct hcase *c = &cases[k];
        if (!all && c != only)
            continue;
        if (!h.live || h.reset_needed || h.mode != c->mode) {
            if (!init_mode(&h, c->mode, &why)) {
                fail(H, "%s init=%s", c->name, why);
                continue;
            }
        }
        virtq_reset_free(h.vq);
        h.skipped = false;
        c->run(&h, c);
        if (!h.skipped)
            recover(&h, c);
    }
}
