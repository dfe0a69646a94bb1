/*
 * virtio scenarios: virtio (list the devices), blk (functional checks of a
 * block device), blk-read / blk-write (one transfer, for host-side checks),
 * blk-bench (sequential reads at queue depth 1, timed).
 */
#include "cpu.h"
#include "irq.h"
#include "lib.h"
#include "mm.h"
#include "report.h"
#include "scenario.h"
#include "virtio_blk.h"

#define BLK_DEFAULT_SECTOR  8
#define BLK_DEFAULT_COUNT   8
#define BLK_MAX_COUNT       (BLK_DATA_MAX / BLK_SECTOR_SIZE)
#define BENCH_MAX_SIZE      (1 * MiB)
#define BENCH_SETTLE_MS     100

static u32 fnv_buf(const u8 *p, u64 n)
{
    return fnv1a32(FNV1A32_INIT, p, n);
}

/* ---- virtio ------------------------------------------------------------- */

void scn_virtio(const char *arg)
{
    (void)arg;
    struct virtio_dev *devs;
    u32 n = virtio_mmio_scan(&devs);
    for (u32 i = 0; i < n; i++) {
        struct virtio_dev *d = &devs[i];
        info("virtio", "dev=%u base=0x%llx size=0x%llx gsi=%u device-id=%u",
             i, d->slot.base, d->slot.size, d->slot.gsi, d->device_id);
    }
    ok("virtio", "devices=%u", n);
}

/* ---- blk ---------------------------------------------------------------- */

struct blk_opts {
    u64 dev, sector, count;
    bool event_idx, indirect, flush, expect_ioerr;
};

/*
 * "[<dev>][:sector=<s>][:count=<n>][:evidx][:indirect][:flush][:expect-ioerr]";
 * blk-read / blk-write take "<dev>:<sector>:<count>" positionally first.
 */
static bool parse_opts(const char *name, const char *arg, struct blk_opts *o, u32 positional)
{
    char buf[128];
    char *tok[ARG_MAX_TOKENS];
    u32 n = split_arg(arg, buf, sizeof(buf), tok);
    u64 *pos[3] = { &o->dev, &o->sector, &o->count };
    for (u32 i = 0; i < n; i++) {
        const char *t = tok[i];
        if (i < positional || (i == 0 && t[0] >= '0' && t[0] <= '9')) {
            if (i >= 3 || !parse_num(t, pos[i]))
                goto bad;
        } else if (str_starts_with(t, "sector=")) {
            if (!parse_num(t + 7, &o->sector))
                goto bad;
        } else if (str_starts_with(t, "count=")) {
            if (!parse_num(t + 6, &o->count))
                goto bad;
        } else if (strcmp(t, "evidx") == 0) {
            o->event_idx = true;
        } else if (strcmp(t, "indirect") == 0) {
            o->indirect = true;
        } else if (strcmp(t, "flush") == 0) {
            o->flush = true;
        } else if (strcmp(t, "expect-ioerr") == 0) {
            o->expect_ioerr = true;
        } else {
            goto bad;
        }
    }
    if (n < positional)
        goto bad;
    if (o->count == 0 || o->count > BLK_MAX_COUNT || o->dev >= VIRTIO_MAX_DEVICES)
        goto bad;
    return true;
bad:
    fail(name, "bad-arg=%s", arg ? arg : "");
    return false;
}

static struct blk_dev *open_for(const char *check, const struct blk_opts *o, u64 wanted)
{
    const char *why = "";
    if (o->event_idx)
        wanted |= VIRTIO_F_EVENT_IDX;
    struct blk_dev *b = blk_open((u32)o->dev, wanted, o->indirect, &why);
    if (!b)
        fail(check, "init dev=%llu %s", o->dev, why);
    return b;
}

/* True if the request completed with `want` and, for reads, a full used length. */
static bool expect(const char *check, const char *what, const struct blk_result *r,
                   u8 want, u32 want_len)
{
    char sbuf[8];
    if (!r->completed)
        return false;           /* blk_request reported it */
    if (r->status != want) {
        fail(check, "%s status=%s", what, blk_status_name(r->status, sbuf, sizeof(sbuf)));
        return false;
    }
    if (want == VIRTIO_BLK_S_OK && r->used_len != want_len) {
        fail(check, "%s used-len=%u expected=%u", what, r->used_len, want_len);
        return false;
    }
    return true;
}

static void print_id(char *out, const u8 *id)
{
    u32 i = 0;
    for (; i < VIRTIO_BLK_ID_BYTES && id[i]; i++)
        out[i] = (id[i] >= 0x20 && id[i] <= 0x7e && id[i] != '"') ? (char)id[i] : '?';
    out[i] = '\0';
}

void scn_blk(const char *arg)
{
    struct blk_opts o = { .sector = BLK_DEFAULT_SECTOR, .count = BLK_DEFAULT_COUNT };
    if (!parse_opts("blk", arg, &o, 0))
        return;
    struct blk_dev *b = open_for("blk", &o, VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX);
    if (!b)
        return;
    struct virtio_dev *d = b->vdev;
    struct blk_result r;
    char fbuf[24], abuf[24];
    bool ro = (d->offered & VIRTIO_BLK_F_RO) != 0;
    bool flush = (d->acked & VIRTIO_BLK_F_FLUSH) != 0;
    u32 count = (u32)o.count, bytes = count * BLK_SECTOR_SIZE;

    ok("blk", "init dev=%llu features=%s acked=%s queue-size=%u", o.dev,
       virtio_features_str(d->offered, fbuf, sizeof(fbuf)),
       virtio_features_str(d->acked, abuf, sizeof(abuf)), d->vq[0].size);
    info("blk", "capacity=%llu seg_max=%u ro=%u flush=%u", b->capacity, b->seg_max, ro, flush);
    if (b->capacity == 0 || o.sector + count > b->capacity) {
        fail("blk", "capacity-too-small capacity=%llu sector=%llu count=%u",
             b->capacity, o.sector, count);
        return;
    }

    /* Sector 0. */
    memset(b->data, 0, BLK_SECTOR_SIZE);
    if (blk_request(b, VIRTIO_BLK_T_IN, 0, b->data, BLK_SECTOR_SIZE, &r)
        && expect("blk", "read sector=0", &r, VIRTIO_BLK_S_OK, BLK_SECTOR_SIZE + 1))
        ok("blk", "read sector=0 fnv1a=0x%08x", fnv_buf(b->data, BLK_SECTOR_SIZE));

    /* What the target sectors hold now. */
    memset(b->data2, 0, bytes);
    bool before = blk_request(b, VIRTIO_BLK_T_IN, o.sector, b->data2, bytes, &r)
        && expect("blk", "read-before", &r, VIRTIO_BLK_S_OK, bytes + 1);

    blk_pattern_fill(b->data, o.sector, count);
    if (ro) {
        if (blk_request(b, VIRTIO_BLK_T_OUT, o.sector, b->data, bytes, &r)
            && expect("blk", "read-only write", &r, VIRTIO_BLK_S_IOERR, 0))
            ok("blk", "read-only write=ioerr sector=%llu", o.sector);
        memset(b->data, 0, bytes);
        if (before && blk_request(b, VIRTIO_BLK_T_IN, o.sector, b->data, bytes, &r)
            && expect("blk", "read-only read-back", &r, VIRTIO_BLK_S_OK, bytes + 1)) {
            if (memcmp(b->data, b->data2, bytes) == 0)
                ok("blk", "read-only unchanged sector=%llu count=%u", o.sector, count);
            else
                fail("blk", "read-only changed sector=%llu", o.sector);
        }
    } else {
        if (blk_request(b, VIRTIO_BLK_T_OUT, o.sector, b->data, bytes, &r)
            && expect("blk", "write", &r, VIRTIO_BLK_S_OK, 1))
            ok("blk", "write sector=%llu count=%u", o.sector, count);
        if (flush) {
            if (blk_request(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, &r)
                && expect("blk", "flush", &r, VIRTIO_BLK_S_OK, 1))
                ok("blk", "flush");
        } else {
            info("blk", "flush not-offered");
        }
        memset(b->data2, 0, bytes);
        if (blk_request(b, VIRTIO_BLK_T_IN, o.sector, b->data2, bytes, &r)
            && expect("blk", "read-back", &r, VIRTIO_BLK_S_OK, bytes + 1)) {
            u32 i = 0;
            while (i < bytes && b->data[i] == b->data2[i])
                i++;
            if (i == bytes)
                ok("blk", "read-back sector=%llu count=%u", o.sector, count);
            else
                fail("blk", "read-back mismatch sector=%llu offset=%u", o.sector, i);
        }
    }

    /* GET_ID. */
    memset(b->id, 0, VIRTIO_BLK_ID_BYTES + 1);
    if (blk_request(b, VIRTIO_BLK_T_GET_ID, 0, b->id, VIRTIO_BLK_ID_BYTES, &r)
        && expect("blk", "get-id", &r, VIRTIO_BLK_S_OK, VIRTIO_BLK_ID_BYTES + 1)) {
        char id[VIRTIO_BLK_ID_BYTES + 1];
        print_id(id, b->id);
        ok("blk", "get-id id=\"%s\"", id);
    }

    /* The last sector. */
    u64 last = b->capacity - 1;
    memset(b->data, 0, BLK_SECTOR_SIZE);
    if (blk_request(b, VIRTIO_BLK_T_IN, last, b->data, BLK_SECTOR_SIZE, &r)
        && expect("blk", "read-last", &r, VIRTIO_BLK_S_OK, BLK_SECTOR_SIZE + 1))
        ok("blk", "read-last sector=%llu fnv1a=0x%08x", last, fnv_buf(b->data, BLK_SECTOR_SIZE));
}

/* ---- blk-read / blk-write ----------------------------------------------- */

void scn_blk_read(const char *arg)
{
    struct blk_opts o = { 0 };
    if (!parse_opts("blk-read", arg, &o, 3))
        return;
    struct blk_dev *b = open_for("blk-read", &o, 0);
    if (!b)
        return;
    struct blk_result r;
    u32 bytes = (u32)o.count * BLK_SECTOR_SIZE;
    memset(b->data, 0, bytes);
    if (blk_request(b, VIRTIO_BLK_T_IN, o.sector, b->data, bytes, &r)
        && expect("blk-read", "read", &r, VIRTIO_BLK_S_OK, bytes + 1))
        ok("blk-read", "dev=%llu sector=%llu count=%llu fnv1a=0x%08x",
           o.dev, o.sector, o.count, fnv_buf(b->data, bytes));
}

void scn_blk_write(const char *arg)
{
    struct blk_opts o = { 0 };
    if (!parse_opts("blk-write", arg, &o, 3))
        return;
    struct blk_dev *b = open_for("blk-write", &o, o.flush ? VIRTIO_BLK_F_FLUSH : 0);
    if (!b)
        return;
    struct blk_result r;
    char sbuf[8];
    u32 bytes = (u32)o.count * BLK_SECTOR_SIZE;
    u8 want = o.expect_ioerr ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
    blk_pattern_fill(b->data, o.sector, (u32)o.count);
    if (!blk_request(b, VIRTIO_BLK_T_OUT, o.sector, b->data, bytes, &r))
        return;
    if (r.status == want)
        ok("blk-write", "dev=%llu sector=%llu count=%llu status=%s",
           o.dev, o.sector, o.count, blk_status_name(r.status, sbuf, sizeof(sbuf)));
    else
        fail("blk-write", "dev=%llu sector=%llu count=%llu status=%s",
             o.dev, o.sector, o.count, blk_status_name(r.status, sbuf, sizeof(sbuf)));
    if (!o.flush)
        return;
    if (!(b->vdev->acked & VIRTIO_BLK_F_FLUSH)) {
        fail("blk-write", "flush not-offered");
        return;
    }
    if (!blk_request(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, &r))
        return;
    if (r.status == VIRTIO_BLK_S_OK)
        ok("blk-write", "flush status=ok");
    else
        fail("blk-write", "flush status=%s", blk_status_name(r.status, sbuf, sizeof(sbuf)));
}

/* ---- blk-bench ---------------------------------------------------------- */

static void sleep_ms(u64 ms)
{
    static volatile u32 never;
    wait_for_irq(&never, ms);
}

/* "<n>:<size>[:<dev>]": n sequential reads of size bytes, queue depth 1. */
void scn_blk_bench(const char *arg)
{
    char buf[64];
    char *tok[ARG_MAX_TOKENS];
    u32 nt = split_arg(arg, buf, sizeof(buf), tok);
    u64 n = 0, size = 0, dev = 0;
    if (nt < 2 || nt > 3 || !parse_num(tok[0], &n) || !parse_num(tok[1], &size)
        || (nt == 3 && !parse_num(tok[2], &dev)) || n == 0 || size == 0
        || size % BLK_SECTOR_SIZE || size > BENCH_MAX_SIZE || dev >= VIRTIO_MAX_DEVICES) {
        fail("blk-bench", "bad-arg=%s", arg ? arg : "");
        return;
    }
    static u8 *big;
    u8 *data;
    const char *why = "";
    struct blk_dev *b = blk_open((u32)dev, 0, false, &why);
    if (!b) {
        fail("blk-bench", "init dev=%llu %s", dev, why);
        return;
    }
    if (size <= BLK_DATA_MAX) {
        data = b->data;
    } else {
        if (!big)
            big = dma_alloc(BENCH_MAX_SIZE);
        data = big;
    }
    u64 sectors = size / BLK_SECTOR_SIZE;
    if (!data || b->capacity < sectors) {
        fail("blk-bench", "dev=%llu capacity=%llu size=%llu", dev, b->capacity, size);
        return;
    }

    info("blk-bench", "begin dev=%llu n=%llu size=%llu", dev, n, size);
    sleep_ms(BENCH_SETTLE_MS);
    struct blk_result r;
    u64 sector = 0, errors = 0, done = 0;
    u64 t0 = rdtsc();
    for (; done < n; done++) {
        if (sector + sectors > b->capacity)
            sector = 0;
        if (!blk_request(b, VIRTIO_BLK_T_IN, sector, data, (u32)size, &r))
            break;              /* reported; the queue is not usable any more */
        if (r.status != VIRTIO_BLK_S_OK || r.wait != VIRTQ_WAIT_IRQ)
            errors++;
        sector += sectors;
    }
    u64 t1 = rdtsc();
    bench("blk-bench", "end n=%llu bytes=%llu tsc=%llu", done, done * size, t1 - t0);
    sleep_ms(BENCH_SETTLE_MS);
    if (done == n && errors == 0)
        ok("blk-bench", "reads=%llu size=%llu", n, size);
    else
        fail("blk-bench", "reads=%llu/%llu errors=%llu", done, n, errors);
}

/*
 * blk-resize[:<dev>]: open the drive, report its capacity, wait (up to 20 s)
 * for a configuration-change interrupt (the VMM swapped the backing file),
 * then report the new capacity (read under ConfigGeneration) and the FNV-1a of
 * sector 0 of the new image.
 */
#define BLK_RESIZE_TIMEOUT_MS 20000

void scn_blk_resize(const char *arg)
{
    struct blk_opts o = { .sector = BLK_DEFAULT_SECTOR, .count = BLK_DEFAULT_COUNT };
    if (!parse_opts("blk-resize", arg, &o, 0))
        return;
    struct blk_dev *b = open_for("blk-resize", &o, 0);
    if (!b)
        return;
    struct virtio_dev *d = b->vdev;
    info("blk-resize", "capacity=%llu waiting", b->capacity);
    if (!virtio_wait_config_irq(d, BLK_RESIZE_TIMEOUT_MS)) {
        fail("blk-resize", "no-config-interrupt");
        return;
    }
    /* The interrupt handler acknowledged InterruptStatus already. */
    b->capacity = virtio_config_read64(d, VIRTIO_BLK_CFG_CAPACITY);
    struct blk_result r;
    memset(b->data, 0, BLK_SECTOR_SIZE);
    if (blk_request(b, VIRTIO_BLK_T_IN, 0, b->data, BLK_SECTOR_SIZE, &r)
        && expect("blk-resize", "read sector=0", &r, VIRTIO_BLK_S_OK, BLK_SECTOR_SIZE + 1))
        ok("blk-resize", "capacity=%llu fnv1a=0x%08x", b->capacity,
           fnv_buf(b->data, BLK_SECTOR_SIZE));
}
