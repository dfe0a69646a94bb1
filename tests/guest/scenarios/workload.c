/*
 * workload:<steps>[:blk] - a guest that runs for a while, for snapshot,
 * restore and migration tests. Every step checks the memory pattern the
 * previous step left in a 64 KiB buffer and writes the next one; with `blk`
 * it also writes a sector of the first block device and reads back (and
 * checks) the one written the step before. Then it prints
 *   info workload step=<k> mem=ok[ blk=ok]
 * and waits ~100 ms. Throughout (every 256 words of the pattern, every ~1 ms
 * of the wait) it answers each byte that arrives on COM1 with
 * `info workload echo=<hex>`: a sign of life that depends on no guest timer,
 * for measuring when a restored guest runs again. A guest restored
 * from a snapshot carries on from its
 * last step: the first step after the restore checks what the step before
 * the snapshot left, in memory and on the disk (through the restored queue).
 * Ends with `ok workload steps=<n>`.
 */
#include "console.h"
#include "cpu.h"
#include "io.h"
#include "lib.h"
#include "mm.h"
#include "report.h"
#include "scenario.h"
#include "virtio_blk.h"

#define WL_WORDS        (8 * 1024)      /* 64 KiB */
#define WL_SECTOR_BASE  2048
#define WL_SECTORS      64
#define WL_STEP_US      100000

static u64 wl_word(u64 step, u64 i)
{
    u64 x = (step + 1) * 0x9e3779b97f4a7c15ULL ^ (i * 0xbf58476d1ce4e5b9ULL);
    return x ^ (x >> 29);
}

/* Answers the bytes waiting in COM1's receiver. */
static void wl_poll(void)
{
    while (inb(COM1 + UART_LSR) & UART_LSR_DR)
        info("workload", "echo=%02x", inb(COM1));
}

/* delay_us(WL_STEP_US), looking at COM1's receiver about every 1 ms. */
static void wl_wait(void)
{
    u64 end = rdtsc() + WL_STEP_US * (TSC_HZ_MAX / 1000000);
    while (!tsc_passed(end)) {
        wl_poll();
        delay_us(1000);
    }
}

static void wl_sector(u8 *buf, u64 step)
{
    for (u32 j = 0; j < BLK_SECTOR_SIZE; j++)
        buf[j] = (u8)(wl_word(step, j / 8) >> ((j % 8) * 8));
}

void scn_workload(const char *arg)
{
    u64 steps = 0;
    const char *colon = arg ? arg : "";
    size_t n = 0;
    while (colon[n] && colon[n] != ':')
        n++;
    if (!arg || !parse_u64(arg, n, &steps) || steps == 0) {
        fail("workload", "bad-arg=%s", arg ? arg : "");
        return;
    }
    bool use_blk = colon[n] == ':' && strcmp(colon + n + 1, "blk") == 0;
    volatile u64 *mem = dma_alloc(WL_WORDS * sizeof(u64));
    u8 *sector = dma_alloc(BLK_SECTOR_SIZE);
    u8 *expect = dma_alloc(BLK_SECTOR_SIZE);
    if (!mem || !sector || !expect) {
        fail("workload", "no-memory");
        return;
    }
    struct blk_dev *b = NULL;
    if (use_blk) {
        const char *why = "";
        b = blk_open(0, 0, false, &why);
        if (!b) {
            fail("workload", "blk-init %s", why);
            return;
        }
    }
    for (u64 step = 0; step < steps; step++) {
        if (step > 0) {
            for (u64 i = 0; i < WL_WORDS; i++) {
                if ((i & 255) == 0)
                    wl_poll();      /* the pattern takes most of a step under emulation */
                if (mem[i] != wl_word(step - 1, i)) {
                    fail("workload", "step=%llu mem-word=%llu", step, i);
                    return;
                }
            }
        }
        for (u64 i = 0; i < WL_WORDS; i++) {
            if ((i & 255) == 0)
                wl_poll();
            mem[i] = wl_word(step, i);
        }
        if (b) {
            struct blk_result r;
            wl_sector(sector, step);
            u64 s = WL_SECTOR_BASE + step % WL_SECTORS;
            if (!blk_request(b, VIRTIO_BLK_T_OUT, s, sector, BLK_SECTOR_SIZE, &r) ||
                r.status != VIRTIO_BLK_S_OK) {
                fail("workload", "step=%llu blk-write", step);
                return;
            }
            if (step > 0) {
                u64 prev = WL_SECTOR_BASE + (step - 1) % WL_SECTORS;
                memset(sector, 0, BLK_SECTOR_SIZE);
                if (!blk_request(b, VIRTIO_BLK_T_IN, prev, sector, BLK_SECTOR_SIZE, &r) ||
                    r.status != VIRTIO_BLK_S_OK) {
                    fail("workload", "step=%llu blk-read", step);
                    return;
                }
                wl_sector(expect, step - 1);
                if (memcmp(sector, expect, BLK_SECTOR_SIZE) != 0) {
                    fail("workload", "step=%llu blk-data", step);
                    return;
                }
            }
        }
        info("workload", "step=%llu mem=ok%s", step, b ? " blk=ok" : "");
        wl_wait();
    }
    ok("workload", "steps=%llu", steps);
}
