/*
 * soak[:<rounds>[:<idle_ms>]] — block and network traffic in a loop, for
 * kiln's soak test. Each round writes the pattern to 8 sectors (cycling over
 * sectors 64..1087), reads them back and compares, pings the peer (answering
 * what arrives meanwhile), then sleeps `idle_ms` (default 100) in `hlt` so
 * the guest costs little CPU. Every 16 rounds: `info soak round=<n>`.
 * rounds 0 (the default) runs for ever.
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

#define SOAK_SECTORS        8
#define SOAK_SPAN           1024
#define SOAK_PING_ID        0x736b      /* "sk" */
#define SOAK_PING_MS        2000

static bool soak_args(const char *arg, u64 *rounds, u64 *idle_ms)
{
    if (!arg)
        return true;
    const char *colon = arg;
    while (*colon && *colon != ':')
        colon++;
    if (!parse_u64(arg, (size_t)(colon - arg), rounds))
        return false;
    if (*colon == ':')
        return parse_u64(colon + 1, strlen(colon + 1), idle_ms);
    return true;
}

void scn_soak(const char *arg)
{
    u64 rounds = 0, idle_ms = 100;
    if (!soak_args(arg, &rounds, &idle_ms)) {
        fail("soak", "bad-arg=%s", arg);
        return;
    }
    const char *why = "";
    struct blk_dev *b = blk_open(0, 0, false, &why);
    if (!b) {
        fail("soak", "blk-init %s", why);
        return;
    }
    if (b->capacity < 64 + SOAK_SPAN) {
        fail("soak", "blk-capacity=%llu", b->capacity);
        return;
    }
    if (!net_cfg_load(&why)) {
        fail("soak", "net-config %s", why);
        return;
    }
    struct net_dev *n = net_open(0, 0, 0, 0, &why);
    if (!n) {
        fail("soak", "net-init %s", why);
        return;
    }
    if (!net_resolve_peer(n)) {
        fail("soak", "arp timeout");
        return;
    }
    u8 *out = dma_alloc(SOAK_SECTORS * 512);
    u8 *in = dma_alloc(SOAK_SECTORS * 512);
    static volatile u32 never;
    info("soak", "begin rounds=%llu idle-ms=%llu", rounds, idle_ms);
    for (u64 r = 1; rounds == 0 || r <= rounds; r++) {
        u64 sector = 64 + (r * SOAK_SECTORS) % SOAK_SPAN;
        struct blk_result res;
        blk_pattern_fill(out, sector, SOAK_SECTORS);
        if (!blk_request(b, VIRTIO_BLK_T_OUT, sector, out, SOAK_SECTORS * 512, &res) ||
            res.status != VIRTIO_BLK_S_OK) {
            fail("soak", "round=%llu write sector=%llu status=0x%x", r, sector, res.status);
            return;
        }
        memset(in, 0, SOAK_SECTORS * 512);
        if (!blk_request(b, VIRTIO_BLK_T_IN, sector, in, SOAK_SECTORS * 512, &res) ||
            res.status != VIRTIO_BLK_S_OK || memcmp(in, out, SOAK_SECTORS * 512) != 0) {
            fail("soak", "round=%llu read sector=%llu status=0x%x", r, sector, res.status);
            return;
        }
        why = net_ping(n, SOAK_PING_ID, (u16)r, 56, SOAK_PING_MS);
        if (why) {
            fail("soak", "round=%llu ping %s", r, why);
            return;
        }
        if (r % 16 == 0)
            info("soak", "round=%llu", r);
        if (idle_ms)
            wait_for_irq(&never, idle_ms);
    }
    ok("soak", "rounds=%llu", rounds);
}
