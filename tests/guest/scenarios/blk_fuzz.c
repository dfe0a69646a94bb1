/*
 * blk-fuzz:<seed>[:<batches>[:<ops>]] — an in-guest fuzzer for the virtio-mmio
 * transport and virtio-blk. From the seed, each batch performs <ops> random
 * operations: register reads and writes of any width and offset, status
 * transitions, queue set-ups with wild sizes and addresses, and descriptor
 * chains with random addresses, lengths (0 .. 4 GiB), flags (NEXT, WRITE,
 * INDIRECT), next indices (loops, out of range), avail-index jumps and
 * notifications of random queues. After each batch the device is reset and
 * re-initialised, and a normal read of sector 0 must return what it returned
 * before the first batch.
 *
 * Disk safety oracle for the host: the only write requests the guest can make
 * name a sector >= BLK_FUZZ_FIRST_WRITABLE (the header buffers are the only
 * memory that can hold a well-formed header: everything else a descriptor
 * can point at is refilled with 0xff before each chain), so sectors below it
 * must come out unchanged whatever else happened.
 *
 * Output:
 *   info blk-fuzz seed=<S> batches=<B> ops=<N> capacity=<sectors>
 *   ok blk-fuzz batch=<i>                      one per batch
 *   ok blk-fuzz done seed=<S> ops=<total>
 * A failure names the seed and batch: `kiln.run=blk-fuzz:<S>` reproduces it.
 */
#include "boot.h"
#include "cpu.h"
#include "io.h"
#include "lib.h"
#include "mm.h"
#include "report.h"
#include "scenario.h"
#include "virtio_blk.h"

#define F "blk-fuzz"
#define BLK_FUZZ_FIRST_WRITABLE 64      /* documented for the host test */
#define AREA_PAGES      12
#define HDRS            8               /* header buffers at the area's start */
#define OFF_STATUS      0x400
#define OFF_DATA        0x1000          /* 4 pages of data */
#define DATA_PAGES      4
#define OFF_TABLES      0x5000          /* 2 pages of indirect tables */
#define OFF_POISON      0x7000          /* the rest: 0xff */

static u8 *area;
static u64 area_phys;
static u64 ram_top;

/* A random choice biased towards the interesting values. */
static u64 pick(struct prng *p, const u64 *vals, u32 n)
{
    return prng_below(p, 4) ? vals[prng_below(p, n)] : prng_next(p);
}

static u64 wild_addr(struct prng *p)
{
    const u64 choices[] = {
        area_phys, area_phys + OFF_STATUS, area_phys + OFF_DATA,
        area_phys + OFF_DATA + PAGE_SIZE - 8, area_phys + OFF_TABLES, area_phys + OFF_POISON,
        0, ram_top, ram_top - 8, 0xc0000000ULL - 0x800, 0xc0001000ULL, 0xfee00000ULL,
        0xfffffffffffff000ULL, 0x100000000ULL,
    };
    u64 a = choices[prng_below(p, sizeof(choices) / sizeof(choices[0]))];
    if (prng_below(p, 4) == 0)
        a += prng_below(p, 64);          /* misalign now and then */
    return a;
}

static u32 wild_len(struct prng *p)
{
    const u64 lens[] = { 0, 1, 8, 15, 16, 17, 511, 512, 513, 4096, 4097, 16384,
                         65536, 0x7fffffff, 0x80000000, 0xffffffff };
    return (u32)pick(p, lens, sizeof(lens) / sizeof(lens[0]));
}

/* Header buffers: reads, flushes, ids, unknown types, and writes above the line. */
static void fill_headers(struct prng *p, u64 capacity)
{
    for (u32 i = 0; i < HDRS; i++) {
        volatile struct virtio_blk_req_hdr *h = (void *)(area + 16 * i);
        const u32 types[] = { VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH,
                              VIRTIO_BLK_T_GET_ID, 0x77, 0xffffffff };
        u32 t = types[prng_below(p, 6)];
        u64 sector;
        if (t == VIRTIO_BLK_T_OUT) {
            u64 room = capacity > BLK_FUZZ_FIRST_WRITABLE ? capacity - BLK_FUZZ_FIRST_WRITABLE : 1;
            sector = BLK_FUZZ_FIRST_WRITABLE + prng_below(p, room + 8);
        } else {
            const u64 sectors[] = { 0, 1, capacity - 1, capacity, capacity + 1,
                                    0xffffffffffffffffULL, 0x8000000000000000ULL };
            sector = pick(p, sectors, 7);
        }
        h->type = t;
        h->reserved = (u32)prng_below(p, 2);
        h->sector = sector;
    }
}

static void op_register(struct prng *p, struct virtio_dev *d)
{
    u64 base = d->slot.base;
    u32 off = (u32)prng_below(p, 0x140);
    switch (prng_below(p, 6)) {
    case 0: (void)mmio_read8(base + off); break;
    case 1: (void)mmio_read16(base + (off & ~1u)); break;
    case 2: (void)mmio_read32(base + (off & ~3u)); break;
    case 3: mmio_write8(base + off, (u8)prng_next(p)); break;
    case 4: mmio_write16(base + (off & ~1u), (u16)prng_next(p)); break;
    default: {
        const u64 vals[] = { 0, 1, 2, 3, 7, 11, 15, 0x40, 0x80, 256, 65536, 0xffffffff };
        u32 reg = (off & ~3u);
        if (reg == VIRTIO_MMIO_STATUS && prng_below(p, 2) == 0)
            break;              /* resets are done on purpose elsewhere */
        mmio_write32(base + reg, (u32)pick(p, vals, 12));
    }
    }
}

static void op_status(struct prng *p, struct virtio_dev *d)
{
    const u64 vals[] = { 1, 3, 7, 11, 15, 0x40, 0x80, 0x8b, 0xff };
    virtio_reg_write(d, VIRTIO_MMIO_STATUS, (u32)pick(p, vals, 9));
}

static void op_queue(struct prng *p, struct virtio_dev *d)
{
    const u64 sizes[] = { 0, 1, 3, 16, 128, 256, 512, 65535 };
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_SEL, (u32)prng_below(p, 3));
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NUM, (u32)pick(p, sizes, 8));
    const u32 regs[] = { VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                         VIRTIO_MMIO_QUEUE_USED_LOW };
    for (u32 i = 0; i < 3; i++) {
        u64 a = wild_addr(p);
        virtio_reg_write(d, regs[i], (u32)a);
        virtio_reg_write(d, regs[i] + 4, (u32)(a >> 32));
    }
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_READY, (u32)prng_below(p, 2));
}

static void op_chain(struct prng *p, struct virtio_dev *d, u64 capacity)
{
    struct virtq *vq = &d->vq[0];
    if (!vq->size)
        return;
    /* Everything a descriptor may point at, except the headers, reads as 0xff. */
    memset(area + OFF_STATUS, 0xff, AREA_PAGES * PAGE_SIZE - OFF_STATUS);
    fill_headers(p, capacity);
    u32 n = 1 + (u32)prng_below(p, 6);
    u16 head = (u16)prng_below(p, vq->size);
    if (prng_below(p, 3) == 0) {
        /* Nearly well-formed: header, data in the right direction, status; then one
         * mutation. Reaches the deeper request paths (writes, flushes, ids). */
        u32 h = (u32)prng_below(p, HDRS);
        u32 type = ((volatile struct virtio_blk_req_hdr *)(area + 16 * h))->type;
        u16 dir = type == VIRTIO_BLK_T_OUT ? 0 : VIRTQ_DESC_F_WRITE;
        u32 k = 1 + (u32)prng_below(p, 3);
        const u64 lens[] = { 512, 1024, 4096, 512, 100 };
        u16 at = head;
        for (u32 i = 0; i < k + 2; i++) {
            u16 next = (u16)((at + 1) % vq->size);
            u64 addr = i == 0 ? area_phys + 16 * h
                     : i == k + 1 ? area_phys + OFF_STATUS
                     : area_phys + OFF_DATA + (i - 1) * PAGE_SIZE;
            u32 len = i == 0 ? 16 : i == k + 1 ? 1 : (u32)lens[prng_below(p, 5)];
            u16 flags = i == 0 ? 0 : i == k + 1 ? VIRTQ_DESC_F_WRITE : dir;
            if (i < k + 1)
                flags |= VIRTQ_DESC_F_NEXT;
            vq->desc[at].addr = addr;
            vq->desc[at].len = len;
            vq->desc[at].flags = flags;
            vq->desc[at].next = next;
            at = next;
        }
        u16 victim = (u16)((head + prng_below(p, k + 2)) % vq->size);
        switch (prng_below(p, 8)) {
        case 0: vq->desc[victim].flags ^= VIRTQ_DESC_F_WRITE; break;
        case 1: vq->desc[victim].len = wild_len(p); break;
        case 2: vq->desc[victim].addr = wild_addr(p); break;
        case 3: vq->desc[victim].next = (u16)prng_next(p); break;
        default: break;             /* well-formed */
        }
        virtq_post(vq, head);
        mb();
        virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        return;
    }
    u16 idx = head;
    volatile struct virtq_desc *tables = (void *)(area + OFF_TABLES);
    for (u32 i = 0; i < n; i++) {
        u16 next = (u16)(prng_below(p, 8) == 0 ? prng_below(p, 0x10000)
                         : prng_below(p, 8) == 0 ? idx : prng_below(p, vq->size));
        u16 flags = (u16)(prng_below(p, 2) ? VIRTQ_DESC_F_WRITE : 0);
        if (i + 1 < n || prng_below(p, 8) == 0)
            flags |= VIRTQ_DESC_F_NEXT;
        u64 addr = i == 0 && prng_below(p, 2) ? area_phys + 16 * prng_below(p, HDRS) : wild_addr(p);
        u32 len = i == 0 && prng_below(p, 2) ? 16 : wild_len(p);
        if (prng_below(p, 10) == 0) {
            flags |= VIRTQ_DESC_F_INDIRECT;
            addr = area_phys + OFF_TABLES;
            len = 16 * (u32)(1 + prng_below(p, 8));
            for (u32 j = 0; j < 8; j++) {
                tables[j].addr = wild_addr(p);
                tables[j].len = wild_len(p);
                tables[j].flags = (u16)prng_below(p, 8);
                tables[j].next = (u16)prng_below(p, 10);
            }
        }
        vq->desc[idx].addr = addr;
        vq->desc[idx].len = len;
        vq->desc[idx].flags = flags;
        vq->desc[idx].next = next;
        idx = next < vq->size ? next : (u16)prng_below(p, vq->size);
    }
    u32 posts = prng_below(p, 6) == 0 ? 2 : 1;
    for (u32 i = 0; i < posts; i++)
        virtq_post(vq, prng_below(p, 16) == 0 ? (u16)prng_next(p) : head);
    if (prng_below(p, 16) == 0)
        vq->avail->idx = (u16)(vq->avail->idx + prng_below(p, 1000));
    mb();
    virtio_reg_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, prng_below(p, 8) == 0 ? (u32)prng_next(p) : 0);
}

void scn_blk_fuzz(const char *arg)
{
    u64 vals[3] = { 1, 8, 24 };          /* seed, batches, ops per batch */
    for (u32 i = 0; arg && *arg && i < 3; i++) {
        size_t len = 0;
        while (arg[len] && arg[len] != ':')
            len++;
        if (!parse_u64(arg, len, &vals[i])) {
            fail(F, "bad-argument");
            return;
        }
        arg += len;
        if (*arg == ':')
            arg++;
    }
    u64 seed = vals[0], batches = vals[1], ops = vals[2];
    if (!area) {
        area = dma_alloc(AREA_PAGES * PAGE_SIZE);
        if (!area) {
            fail(F, "out-of-dma-memory");
            return;
        }
        area_phys = virt_to_phys(area);
    }
    ram_top = 0;
    for (u32 i = 0; i < boot.e820_count; i++)
        if (boot.e820[i].type == E820_RAM && boot.e820[i].addr + boot.e820[i].size > ram_top)
            ram_top = boot.e820[i].addr + boot.e820[i].size;

    const char *why = "";
    struct blk_dev *b = blk_open(0, VIRTIO_BLK_F_FLUSH, false, &why);
    if (!b) {
        fail(F, "init %s", why);
        return;
    }
    struct blk_result r;
    if (!blk_request(b, VIRTIO_BLK_T_IN, 0, b->data, BLK_SECTOR_SIZE, &r) || r.status != 0) {
        fail(F, "first-read");
        return;
    }
    u32 reference = fnv1a32(FNV1A32_INIT, b->data, BLK_SECTOR_SIZE);
    u64 capacity = b->capacity;
    info(F, "seed=%llu batches=%llu ops=%llu capacity=%llu", seed, batches, ops, capacity);

    struct prng p;
    prng_seed(&p, seed);
    u64 total = 0;
    for (u64 batch = 0; batch < batches; batch++) {
        struct virtio_dev *d = b->vdev;
        for (u64 i = 0; i < ops; i++, total++) {
            switch (prng_below(&p, 10)) {
            case 0: case 1: op_register(&p, d); break;
            case 2: op_status(&p, d); break;
            case 3: op_queue(&p, d); break;
            default: op_chain(&p, d, capacity); break;
            }
        }
        /* A well-formed request still works once the driver resets the device. */
        b = blk_open(0, batch % 2 ? VIRTIO_F_EVENT_IDX : 0, batch % 3 == 0, &why);
        if (!b) {
            fail(F, "batch=%llu seed=%llu reinit %s", batch, seed, why);
            return;
        }
        memset(b->data, 0, BLK_SECTOR_SIZE);
        if (!blk_request(b, VIRTIO_BLK_T_IN, 0, b->data, BLK_SECTOR_SIZE, &r) || r.status != 0
            || fnv1a32(FNV1A32_INIT, b->data, BLK_SECTOR_SIZE) != reference) {
            fail(F, "batch=%llu seed=%llu read status=%u", batch, seed, r.status);
            return;
        }
        ok(F, "batch=%llu", batch);
    }
    ok(F, "done seed=%llu ops=%llu", seed, total);
}
