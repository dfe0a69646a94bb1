/*
 * workload:<steps>[:blk][:net][:ws=<MiB>] - a guest that runs for a while,
 * for snapshot, restore and migration tests. Every step checks the memory
 * pattern the previous step left in a 64 KiB buffer and writes the next one;
 * with `blk` it also writes a sector of the first block device and reads back
 * (and checks) the one written the step before; with `net` it pings the peer
 * (kiln.net=, default 10.0.0.1) through the first network device, ARPing for
 * it again once if the ping goes unanswered (a restored guest may sit behind
 * another TAP, with another MAC). Then it prints
 *   info workload step=<k> mem=ok[ blk=ok][ net=ok]
 * and waits ~100 ms. Throughout (every 64 words of the pattern, every ~1 ms
 * of the wait) it answers each byte that arrives on COM1 with
 * `info workload echo=<hex>`: a sign of life that depends on no guest timer,
 * for measuring when a restored guest runs again. With `ws=<MiB>` it first
 * writes one word per page of a <MiB> MiB area, and reads every one of them
 * back (checking it) before each answer, `echo=<hex> ws=ok`: a request that
 * needs its working set, as a function invoked after a restore does. A guest
 * restored from a snapshot carries on from its last step: the first step
 * after the restore checks what the step before the snapshot left, in memory
 * and on the disk (through the restored queue), and uses the restored
 * network queues.
 * Ends with `ok workload steps=<n>`.
 */
#include "console.h"
#include "cpu.h"
#include "io.h"
#include "lib.h"
#include "mm.h"
#include "net.h"
#include "report.h"
#include "scenario.h"
#include "virtio_blk.h"

#define WL_WORDS        (8 * 1024)      /* 64 KiB */
#define WL_SECTOR_BASE  2048
#define WL_SECTORS      64
#define WL_STEP_US      100000
#define WL_PING_ID      0x776c          /* "wl" */
#define WL_PING_MS      2000

static u64 wl_word(u64 step, u64 i)
{
    u64 x = (step + 1) * 0x9e3779b97f4a7c15ULL ^ (i * 0xbf58476d1ce4e5b9ULL);
    return x ^ (x >> 29);
}

#define WL_WS_SEED      1000
static volatile u64 *wl_ws;
static u64 wl_ws_pages;

/* Answers the bytes waiting in COM1's receiver (after reading the working set). */
static void wl_poll(void)
{
    while (inb(COM1 + UART_LSR) & UART_LSR_DR) {
        u8 c = inb(COM1);
        bool ok = true;
        for (u64 p = 0; p < wl_ws_pages; p++)
            ok &= wl_ws[p * (PAGE_SIZE / 8)] == wl_word(WL_WS_SEED, p);
        if (!ok)
            fail("workload", "echo=%02x ws-word", c);
        else
            info("workload", "echo=%02x%s", c, wl_ws_pages ? " ws=ok" : "");
    }
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

/* One ping of the peer, ARPing for it again once if it goes unanswered. */
static const char *wl_ping(struct net_dev *n, u64 step)
{
    const char *why = net_ping(n, WL_PING_ID, (u16)step, 56, WL_PING_MS);
    if (!why)
        return NULL;
    if (!net_resolve_peer(n))
        return "arp-timeout";
    return net_ping(n, WL_PING_ID, (u16)step, 56, WL_PING_MS);
}

void scn_workload(const char *arg)
{
    u64 steps = 0;
    const char *opts = arg ? arg : "";
    size_t n = 0;
    while (opts[n] && opts[n] != ':')
        n++;
    if (!arg || !parse_u64(arg, n, &steps) || steps == 0) {
        fail("workload", "bad-arg=%s", arg ? arg : "");
        return;
    }
    bool use_blk = false, use_net = false;
    u64 ws_mib = 0;
    for (const char *p = opts + n; *p == ':';) {
        const char *tok = ++p;
        while (*p && *p != ':')
            p++;
        size_t len = (size_t)(p - tok);
        if (len == 3 && strncmp(tok, "blk", 3) == 0) {
            use_blk = true;
        } else if (len == 3 && strncmp(tok, "net", 3) == 0) {
            use_net = true;
        } else if (len > 3 && strncmp(tok, "ws=", 3) == 0 && parse_u64(tok + 3, len - 3, &ws_mib)) {
        } else {
            fail("workload", "bad-arg=%s", arg);
            return;
        }
    }
    if (ws_mib) {
        wl_ws = dma_alloc(ws_mib << 20);
        if (!wl_ws) {
            fail("workload", "no-memory ws=%llu", ws_mib);
            return;
        }
        wl_ws_pages = (ws_mib << 20) / PAGE_SIZE;
        for (u64 p = 0; p < wl_ws_pages; p++)
            wl_ws[p * (PAGE_SIZE / 8)] = wl_word(WL_WS_SEED, p);
    }
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
    struct net_dev *nd = NULL;
    if (use_net) {
        const char *why = "";
        if (!net_cfg_load(&why) || !(nd = net_open(0, 0, 0, 0, &why))) {
            fail("workload", "net-init %s", why);
            return;
        }
        if (!net_resolve_peer(nd)) {
            fail("workload", "net-arp timeout");
            return;
        }
    }
    for (u64 step = 0; step < steps; step++) {
        if (step > 0) {
            for (u64 i = 0; i < WL_WORDS; i++) {
                if ((i & 63) == 0)
                    wl_poll();      /* the pattern takes most of a step under emulation */
                if (mem[i] != wl_word(step - 1, i)) {
                    fail("workload", "step=%llu mem-word=%llu", step, i);
                    return;
                }
            }
        }
        for (u64 i = 0; i < WL_WORDS; i++) {
            if ((i & 63) == 0)
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
        if (nd) {
            const char *why = wl_ping(nd, step);
            if (why) {
                fail("workload", "step=%llu net %s", step, why);
                return;
            }
        }
        info("workload", "step=%llu mem=ok%s%s", step, b ? " blk=ok" : "", nd ? " net=ok" : "");
        wl_wait();
    }
    ok("workload", "steps=%llu", steps);
}
