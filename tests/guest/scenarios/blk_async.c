/*
 * Block scenarios with many requests in flight (the VMM's async engine):
 *
 *   blk-rand:<n>:<size>:<depth>[:<dev>]   n reads of `size` bytes at random
 *       size-aligned offsets, `depth` in flight (each re-posted at a new
 *       offset as soon as it comes back), timed like blk-bench;
 *   blk-slow:<n>[:<dev>]   n 4 KiB reads (sectors 8i) and then one FLUSH,
 *       posted at once, while the guest answers ARP and ping on network
 *       device 0: which came first, the echo replies or the block
 *       completions, is printed as it happens; the guest goes on answering
 *       for SLOW_GRACE_MS after the last completion.
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

#define RAND_MAX_DEPTH      80          /* 3 descriptors each, of 256 */
#define RAND_MAX_SIZE       (64 * KiB)
#define RAND_SETTLE_MS      100
#define SLOW_MAX_READS      64
#define SLOW_READ_BYTES     4096
#define SLOW_TIMEOUT_MS     60000
#define SLOW_GRACE_MS       2000

static void sleep_ms(u64 ms)
{
    static volatile u32 never;
    wait_for_irq(&never, ms);
}

/* Request slot i of a queue: descriptors 3i (header), 3i+1 (data), 3i+2 (status). */
static void slot_setup(struct virtq *vq, u16 i, volatile struct virtio_blk_req_hdr *h,
                       u64 data, u32 len, volatile u8 *status)
{
    volatile struct virtq_desc *d = &vq->desc[3 * i];
    d[0].addr = virt_to_phys((void *)h);
    d[0].len = sizeof(*h);
    d[0].flags = VIRTQ_DESC_F_NEXT;
    d[0].next = (u16)(3 * i + 1);
    d[1].addr = data;
    d[1].len = len;
    d[1].flags = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
    d[1].next = (u16)(3 * i + 2);
    d[2].addr = virt_to_phys((void *)status);
    d[2].len = 1;
    d[2].flags = VIRTQ_DESC_F_WRITE;
    d[2].next = 0;
}

/* ---- blk-rand ----------------------------------------------------------- */

void scn_blk_rand(const char *arg)
{
    char buf[64];
    char *tok[ARG_MAX_TOKENS];
    u32 nt = split_arg(arg, buf, sizeof(buf), tok);
    u64 n = 0, size = 0, depth = 0, dev = 0;
    if (nt < 3 || nt > 4 || !parse_num(tok[0], &n) || !parse_num(tok[1], &size)
        || !parse_num(tok[2], &depth) || (nt == 4 && !parse_num(tok[3], &dev)) || n == 0
        || size == 0 || size % BLK_SECTOR_SIZE || size > RAND_MAX_SIZE || depth == 0
        || depth > RAND_MAX_DEPTH || dev >= VIRTIO_MAX_DEVICES) {
        fail("blk-rand", "bad-arg=%s", arg ? arg : "");
        return;
    }
    const char *why = "";
    struct blk_dev *b = blk_open((u32)dev, VIRTIO_F_EVENT_IDX, false, &why);
    if (!b) {
        fail("blk-rand", "init dev=%llu %s", dev, why);
        return;
    }
    u64 per = size / BLK_SECTOR_SIZE;
    u64 slots = b->capacity / per;
    if (slots == 0) {
        fail("blk-rand", "dev=%llu capacity=%llu size=%llu", dev, b->capacity, size);
        return;
    }
    static u8 *data, *meta;
    if (!data) {
        data = dma_alloc(RAND_MAX_SIZE);
        meta = dma_alloc(PAGE_SIZE);
    }
    struct virtq *vq = &b->vdev->vq[0];
    volatile struct virtio_blk_req_hdr *hdr = (void *)meta;
    volatile u8 *status = meta + 16 * RAND_MAX_DEPTH;
    struct prng rng;
    prng_seed(&rng, 0x6b696c6eULL ^ size ^ (depth << 32));
    for (u16 i = 0; i < depth; i++)
        slot_setup(vq, i, &hdr[i], virt_to_phys(data), (u32)size, &status[i]);

    info("blk-rand", "begin dev=%llu n=%llu size=%llu depth=%llu", dev, n, size, depth);
    sleep_ms(RAND_SETTLE_MS);
    u64 posted = 0, done = 0, errors = 0;
    u64 t0 = rdtsc();
    for (u16 i = 0; i < depth && posted < n; i++, posted++) {
        hdr[i].type = VIRTIO_BLK_T_IN;
        hdr[i].reserved = 0;
        hdr[i].sector = prng_below(&rng, slots) * per;
        status[i] = BLK_STATUS_UNTOUCHED;
        virtq_post(vq, (u16)(3 * i));
    }
    virtq_kick(vq);
    u64 deadline = tsc_deadline_ms(SLOW_TIMEOUT_MS);
    while (done < n && !tsc_passed(deadline)) {
        virtq_wait(vq, 100);
        u32 id, len;
        bool again = false;
        while (virtq_pop_used(vq, &id, &len, false)) {
            u16 i = (u16)(id / 3);
            done++;
            if (id % 3 || i >= depth || status[i] != VIRTIO_BLK_S_OK || len != size + 1)
                errors++;
            if (posted < n && i < depth) {
                hdr[i].sector = prng_below(&rng, slots) * per;
                status[i] = BLK_STATUS_UNTOUCHED;
                virtq_post(vq, (u16)(3 * i));
                posted++;
                again = true;
            }
        }
        if (again)
            virtq_kick(vq);
    }
    u64 t1 = rdtsc();
    bench("blk-rand", "end n=%llu bytes=%llu tsc=%llu", done, done * size, t1 - t0);
    sleep_ms(RAND_SETTLE_MS);
    if (done == n && errors == 0)
        ok("blk-rand", "reads=%llu size=%llu depth=%llu", n, size, depth);
    else
        fail("blk-rand", "reads=%llu/%llu errors=%llu", done, n, errors);
}

/* ---- blk-slow ----------------------------------------------------------- */

void scn_blk_slow(const char *arg)
{
    char buf[32];
    char *tok[ARG_MAX_TOKENS];
    u32 nt = split_arg(arg, buf, sizeof(buf), tok);
    u64 n = 0, dev = 0;
    if (nt < 1 || nt > 2 || !parse_num(tok[0], &n) || (nt == 2 && !parse_num(tok[1], &dev))
        || n == 0 || n > SLOW_MAX_READS || dev >= VIRTIO_MAX_DEVICES) {
        fail("blk-slow", "bad-arg=%s", arg ? arg : "");
        return;
    }
    const char *why = "";
    if (!net_cfg_load(&why)) {
        fail("blk-slow", "config %s", why);
        return;
    }
    struct net_dev *net = net_open(0, 0, 0, 0, &why);
    if (!net) {
        fail("blk-slow", "net-init %s", why);
        return;
    }
    struct blk_dev *b = blk_open((u32)dev, VIRTIO_BLK_F_FLUSH, false, &why);
    if (!b) {
        fail("blk-slow", "init dev=%llu %s", dev, why);
        return;
    }
    if (!(b->vdev->acked & VIRTIO_BLK_F_FLUSH) || b->capacity < 8 * n) {
        fail("blk-slow", "dev=%llu capacity=%llu flush=%d", dev, b->capacity,
             !!(b->vdev->acked & VIRTIO_BLK_F_FLUSH));
        return;
    }
    static u8 *data, *meta;
    if (!data) {
        data = dma_alloc(SLOW_MAX_READS * SLOW_READ_BYTES);
        meta = dma_alloc(PAGE_SIZE);
    }
    struct virtq *vq = &b->vdev->vq[0];
    volatile struct virtio_blk_req_hdr *hdr = (void *)meta;
    volatile u8 *status = meta + 16 * (SLOW_MAX_READS + 1);
    for (u16 i = 0; i < n; i++) {
        slot_setup(vq, i, &hdr[i], virt_to_phys(data + (u64)i * SLOW_READ_BYTES),
                   SLOW_READ_BYTES, &status[i]);
        hdr[i].type = VIRTIO_BLK_T_IN;
        hdr[i].reserved = 0;
        hdr[i].sector = 8ULL * i;
        status[i] = BLK_STATUS_UNTOUCHED;
    }
    /* The FLUSH: header and status only, in slot n. */
    u16 f = (u16)n;
    volatile struct virtq_desc *d = &vq->desc[3 * f];
    hdr[f].type = VIRTIO_BLK_T_FLUSH;
    hdr[f].reserved = 0;
    hdr[f].sector = 0;
    status[f] = BLK_STATUS_UNTOUCHED;
    d[0].addr = virt_to_phys((void *)&hdr[f]);
    d[0].len = sizeof(hdr[f]);
    d[0].flags = VIRTQ_DESC_F_NEXT;
    d[0].next = (u16)(3 * f + 2);
    d[2].addr = virt_to_phys((void *)&status[f]);
    d[2].len = 1;
    d[2].flags = VIRTQ_DESC_F_WRITE;
    d[2].next = 0;

    net_arp_answered = net_echo_answered = 0;
    for (u16 i = 0; i <= f; i++)
        virtq_post(vq, (u16)(3 * i));
    virtq_notify(vq);
    info("blk-slow", "posted reads=%llu flush=1", n);

    u64 reads = 0, bad = 0, echoes = 0;
    bool flushed = false;
    u64 deadline = tsc_deadline_ms(SLOW_TIMEOUT_MS);
    while (!(flushed && reads == n) && !tsc_passed(deadline)) {
        const u8 *frame;
        u32 len = net_recv(net, &frame, 10);
        if (len) {
            struct pkt p;
            net_parse(frame, len, &p, false);
            net_respond(net, frame, len, &p);
            if (net_echo_answered != echoes) {
                echoes = net_echo_answered;
                info("blk-slow", "echo answered=%llu blk-done=%llu", echoes,
                     reads + (flushed ? 1 : 0));
            }
        }
        u32 id, ulen;
        while (virtq_pop_used(vq, &id, &ulen, false)) {
            u16 i = (u16)(id / 3);
            if (id % 3 || i > f) {
                bad++;
                continue;
            }
            if (i == f) {
                flushed = true;
                char sbuf[8];
                info("blk-slow", "flush-done reads-done=%llu status=%s", reads,
                     blk_status_name(status[f], sbuf, sizeof(sbuf)));
                if (status[f] != VIRTIO_BLK_S_OK || ulen != 1)
                    bad++;
            } else {
                reads++;
                if (status[i] != VIRTIO_BLK_S_OK || ulen != SLOW_READ_BYTES + 1)
                    bad++;
            }
        }
    }
    /* A little longer for the network: a reply to a ping that waited for the block
     * requests (a synchronous VMM) still goes out. */
    u64 grace = tsc_deadline_ms(SLOW_GRACE_MS);
    while (!tsc_passed(grace)) {
        const u8 *frame;
        u32 len = net_recv(net, &frame, 10);
        if (!len)
            continue;
        struct pkt p;
        net_parse(frame, len, &p, false);
        net_respond(net, frame, len, &p);
        if (net_echo_answered != echoes) {
            echoes = net_echo_answered;
            info("blk-slow", "echo answered=%llu blk-done=%llu", echoes, reads + 1);
        }
    }
    if (flushed && reads == n && bad == 0)
        ok("blk-slow", "reads=%llu flush=ok echoes=%llu", n, echoes);
    else
        fail("blk-slow", "reads=%llu/%llu flush=%d bad=%llu", reads, n, flushed, bad);
}
