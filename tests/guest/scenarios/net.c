/*
 * Network scenarios (virtio-net): net (ARP + ping the peer, answer its
 * pings), net-rx-big (frames larger than the receive buffers),
 * net-rx-stall (receive queue and TAP both full, then drained),
 * net-tap-gone (the TAP disappears while the guest sends and does block
 * I/O). The host side of each is in tests/net.rs; README.md documents the
 * lines and the protocol with the host.
 */
#include "cpu.h"
#include "irq.h"
#include "lib.h"
#include "net.h"
#include "report.h"
#include "scenario.h"
#include "virtio_blk.h"

#define PING_ID             0x6b6e      /* "kn" */
#define PING_TIMEOUT_MS     2000
#define LISTEN_TIMEOUT_MS   20000
#define PORT_BIG            7001
#define PORT_SMALL          7002
#define PORT_END            7003
#define PORT_FLOOD          7004
#define PORT_FINAL          7005
#define PORT_GONE           7006
#define BIG_TIMEOUT_MS      20000
#define IDLE_END_MS         1000

static void sleep_ms(u64 ms)
{
    static volatile u32 never;
    wait_for_irq(&never, ms);
}

/* Common options: mrg, evidx, bufsize=, bufs=, dev=. */
struct net_common {
    u64 dev, bufsize, bufs;
    bool mrg, evidx;
};

static void common_args(struct net_args *a, struct net_common *c, u64 bufsize, u64 bufs)
{
    c->dev = 0;
    c->bufsize = bufsize;
    c->bufs = bufs;
    c->mrg = net_arg_flag(a, "mrg");
    c->evidx = net_arg_flag(a, "evidx");
    net_arg_num(a, "dev", &c->dev);
    net_arg_num(a, "bufsize", &c->bufsize);
    net_arg_num(a, "bufs", &c->bufs);
    if (c->dev >= VIRTIO_MAX_DEVICES || c->bufsize < 64 || c->bufsize > NET_BUF_SIZE
        || c->bufs == 0 || c->bufs > VIRTQ_MAX_SIZE)
        a->bad = true;
}

/* Opens the device and prints the init line; NULL (after a fail line) on failure. */
static struct net_dev *open_for(const char *check, const struct net_common *c)
{
    const char *why = "";
    if (!net_cfg_load(&why)) {
        fail(check, "config %s", why);
        return NULL;
    }
    u64 wanted = (c->mrg ? VIRTIO_NET_F_MRG_RXBUF : 0) | (c->evidx ? VIRTIO_F_EVENT_IDX : 0);
    struct net_dev *n = net_open((u32)c->dev, wanted, (u32)c->bufsize, (u16)c->bufs, &why);
    if (!n) {
        fail(check, "init dev=%llu %s", c->dev, why);
        return NULL;
    }
    if (c->mrg && !n->mrg) {
        fail(check, "init dev=%llu mrg-not-offered", c->dev);
        return NULL;
    }
    if (c->evidx && !(n->vdev->acked & VIRTIO_F_EVENT_IDX)) {
        fail(check, "init dev=%llu evidx-not-offered", c->dev);
        return NULL;
    }
    char mac[18];
    ok(check, "init dev=%u features=0x%llx acked=0x%llx mac=%s rx-buffers=%ux%u",
       n->vdev->index, n->vdev->offered, n->vdev->acked, mac_str(n->mac, mac), n->rx_bufs,
       n->rx_buf_len);
    net_arp_answered = net_echo_answered = 0;
    return n;
}

static bool resolve(const char *check, struct net_dev *n)
{
    char ip[18], mac[18];
    if (!net_resolve_peer(n)) {
        fail(check, "arp peer=%s timeout", ip_str(net_cfg.peer, ip));
        return false;
    }
    ok(check, "arp peer=%s mac=%s", ip_str(net_cfg.peer, ip), mac_str(net_cfg.peer_mac, mac));
    return true;
}

/* The driver's own view: every completion with its interrupt, no refused entry. */
static void driver_counters(const char *check, struct net_dev *n)
{
    if (!net_tx_drain(n, NET_TIMEOUT_MS))
        fail(check, "tx-drain in-flight=%u", n->tx_inflight);
    if (n->rx_bad || n->rx_no_irq || n->tx_bad_used || n->tx_no_irq)
        fail(check, "counters rx-bad=%u rx-no-irq=%u tx-bad-used=%u tx-no-irq=%u",
             n->rx_bad, n->rx_no_irq, n->tx_bad_used, n->tx_no_irq);
    else
        ok(check, "counters rx-bad=0 rx-no-irq=0 tx-bad-used=0 tx-no-irq=0");
    info(check, "stats rx-frames=%u rx-merged=%u tx-frames=%u arp-answered=%u echo-answered=%u",
         n->rx_frames, n->rx_merged, n->tx_frames, net_arp_answered, net_echo_answered);
}

/* Receives frames and answers ARP / echo requests until `*count` reaches `want`. */
static bool serve_until(struct net_dev *n, volatile u32 *count, u32 want, u64 timeout_ms)
{
    u64 deadline = tsc_deadline_ms(timeout_ms);
    while (*count < want && !tsc_passed(deadline)) {
        const u8 *f;
        u32 len = net_recv(n, &f, 100);
        if (!len)
            continue;
        struct pkt p;
        net_parse(f, len, &p, false);
        net_respond(n, f, len, &p);
    }
    return *count >= want;
}

/* ---- net ---------------------------------------------------------------- */

/* "[mrg][:evidx][:pings=<n>][:listen=<n>][:bufsize=<b>][:bufs=<k>][:dev=<d>]" */
void scn_net(const char *arg)
{
    struct net_args a;
    struct net_common c;
    u64 pings = 4, listen = 0;
    bool parsed = net_args_parse(&a, arg);
    common_args(&a, &c, NET_BUF_SIZE, VIRTQ_MAX_SIZE);
    net_arg_num(&a, "pings", &pings);
    net_arg_num(&a, "listen", &listen);
    if (!parsed || !net_args_ok(&a) || pings > 1000 || listen > 1000) {
        fail("net", "bad-arg=%s", arg ? arg : "");
        return;
    }
    struct net_dev *n = open_for("net", &c);
    if (!n)
        return;
    char ip[18], peer[18];
    info("net", "config ip=%s peer=%s", ip_str(net_cfg.ip, ip), ip_str(net_cfg.peer, peer));
    if (!resolve("net", n))
        return;
    for (u64 seq = 1; seq <= pings; seq++) {
        /* The last one fills a 1514-byte frame. */
        u32 bytes = (seq == pings && pings > 1) ? NET_ETH_MAX - ETH_HLEN - IP_HLEN - ICMP_HLEN : 56;
        const char *why = net_ping(n, PING_ID, (u16)seq, bytes, PING_TIMEOUT_MS);
        if (why)
            fail("net", "ping seq=%llu bytes=%u %s", seq, bytes, why);
        else
            ok("net", "ping seq=%llu bytes=%u", seq, bytes);
    }
    if (listen) {
        net_echo_answered = 0;
        info("net", "listen echo=%llu", listen);
        if (serve_until(n, &net_echo_answered, (u32)listen, LISTEN_TIMEOUT_MS))
            ok("net", "listen echo-replies=%llu", listen);
        else
            fail("net", "listen echo-replies=%u/%llu timeout", net_echo_answered, listen);
    }
    driver_counters("net", n);
}

/* ---- net-rx-big --------------------------------------------------------- */

/* Byte i of big datagram k: bytes 0-3 = k (big-endian), then (k + i) & 0xff. */
static bool big_payload_ok(const u8 *d, u32 len, u32 size, u32 *k)
{
    if (len != size || len < 4)
        return false;
    *k = get32(d);
    for (u32 i = 4; i < len; i++)
        if (d[i] != (u8)(*k + i))
            return false;
    return true;
}

/* "[mrg][:evidx][:n=<frames>][:size=<payload>][:hold=<ms>][:bufsize=<b>][:bufs=<k>][:dev=<d>]" */
void scn_net_rx_big(const char *arg)
{
    struct net_args a;
    struct net_common c;
    u64 nbig = 32, size = 3000, hold = 0;
    bool parsed = net_args_parse(&a, arg);
    common_args(&a, &c, 256, VIRTQ_MAX_SIZE);
    net_arg_num(&a, "n", &nbig);
    net_arg_num(&a, "size", &size);
    net_arg_num(&a, "hold", &hold);
    if (!parsed || !net_args_ok(&a) || nbig == 0 || nbig > 1024 || size < 4
        || size > 65000 || hold > 60000) {
        fail("net-rx-big", "bad-arg=%s", arg ? arg : "");
        return;
    }
    struct net_dev *n = open_for("net-rx-big", &c);
    if (!n)
        return;
    if (hold) {
        /* The whole burst waits in the ring and the TAP before the guest takes any. */
        info("net-rx-big", "ready big=%llu size=%llu mrg=%u hold=%llu", nbig, size, n->mrg, hold);
        sleep_ms(hold);
        info("net-rx-big", "consuming");
    } else {
        info("net-rx-big", "ready big=%llu size=%llu mrg=%u", nbig, size, n->mrg);
    }
    u32 big = 0, big_bad = 0, small = 0, order_errors = 0, next_big = 0;
    bool end = false;
    const char *bad_why = "";
    u64 deadline = tsc_deadline_ms(BIG_TIMEOUT_MS);
    while (!end && !tsc_passed(deadline)) {
        const u8 *f;
        u32 len = net_recv(n, &f, 500);
        if (!len)
            continue;
        struct pkt p;
        enum pkt_kind kind = net_parse(f, len, &p, true);
        if (kind == PKT_BAD && p.src_ip == net_cfg.peer) {
            big_bad++;
            bad_why = p.why;
            continue;
        }
        if (kind != PKT_UDP) {
            net_respond(n, f, len, &p);
            continue;
        }
        u32 k;
        if (p.dport == PORT_BIG) {
            if (!big_payload_ok(p.data, p.data_len, (u32)size, &k)) {
                big_bad++;
                bad_why = "payload";
            } else {
                if (k != next_big)
                    order_errors++;
                next_big = k + 1;
                big++;
            }
        } else if (p.dport == PORT_SMALL) {
            small++;
        } else if (p.dport == PORT_END) {
            end = true;
        }
    }
    u32 want_big = n->mrg ? (u32)nbig : 0;
    if (big == want_big && small == nbig && !big_bad && !order_errors)
        ok("net-rx-big", "big=%u/%llu small=%u/%llu", big, nbig, small, nbig);
    else
        fail("net-rx-big", "big=%u/%llu small=%u/%llu bad=%u %s out-of-order=%u", big, nbig,
             small, nbig, big_bad, bad_why, order_errors);
    if (end)
        ok("net-rx-big", "end");
    else
        fail("net-rx-big", "end timeout");
    driver_counters("net-rx-big", n);
}

/* ---- net-rx-stall ------------------------------------------------------- */

/* "[mrg][:evidx][:bufs=<k>][:pause=<ms>][:dev=<d>]" */
void scn_net_rx_stall(const char *arg)
{
    struct net_args a;
    struct net_common c;
    u64 pause = 3000;
    bool parsed = net_args_parse(&a, arg);
    common_args(&a, &c, NET_BUF_SIZE, 32);
    net_arg_num(&a, "pause", &pause);
    if (!parsed || !net_args_ok(&a) || pause > 60000) {
        fail("net-rx-stall", "bad-arg=%s", arg ? arg : "");
        return;
    }
    struct net_dev *n = open_for("net-rx-stall", &c);
    if (!n)
        return;
    /* The guest neither consumes nor posts receive buffers for `pause` ms. */
    net_rx_hold(n, true);
    info("net-rx-stall", "paused buffers=%u ms=%llu", n->rx_bufs, pause);
    sleep_ms(pause);
    u16 pending = net_rx_pending(n);
    if (pending == n->rx_bufs)
        ok("net-rx-stall", "ring-full frames=%u", pending);
    else
        fail("net-rx-stall", "ring-full frames=%u/%u", pending, n->rx_bufs);

    /* Drain: post buffers again as frames are consumed; kiln must resume reading the TAP. */
    net_rx_hold(n, false);
    u32 frames = 0, order_errors = 0, last_seq = 0, ring_last = 0, first_after = 0;
    for (;;) {
        const u8 *f;
        u32 len = net_recv(n, &f, IDLE_END_MS);
        if (!len)
            break;
        struct pkt p;
        if (net_parse(f, len, &p, false) != PKT_UDP || p.dport != PORT_FLOOD || p.data_len < 4) {
            net_respond(n, f, len, &p);
            continue;
        }
        u32 seq = get32(p.data);
        if (frames && seq <= last_seq)
            order_errors++;
        if (frames + 1 == pending)
            ring_last = seq;
        if (frames == pending)
            first_after = seq;
        last_seq = seq;
        frames++;
    }
    info("net-rx-stall", "seq ring-last=%u after-first=%u after-last=%u", ring_last, first_after,
         last_seq);
    if (frames > pending && !order_errors)
        ok("net-rx-stall", "resumed after-ring=%u", frames - pending);
    else
        fail("net-rx-stall", "resumed after-ring=%u frames=%u out-of-order=%u",
             frames > pending ? frames - pending : 0, frames, order_errors);

    /* Everything drained: a new frame must still get through (no lost wake-up). */
    info("net-rx-stall", "send-final");
    bool final = false;
    u64 deadline = tsc_deadline_ms(5000);
    while (!final && !tsc_passed(deadline)) {
        const u8 *f;
        u32 len = net_recv(n, &f, 500);
        if (!len)
            continue;
        struct pkt p;
        if (net_parse(f, len, &p, false) == PKT_UDP && p.dport == PORT_FINAL)
            final = true;
        else
            net_respond(n, f, len, &p);
    }
    if (final)
        ok("net-rx-stall", "final");
    else
        fail("net-rx-stall", "final timeout");
    driver_counters("net-rx-stall", n);
}

/* ---- net-tap-gone ------------------------------------------------------- */

/* "[n=<iterations>][:idle=<ms>][:blk=<dev>][:dev=<d>][:evidx]" */
void scn_net_tap_gone(const char *arg)
{
    struct net_args a;
    struct net_common c;
    u64 iterations = 40, idle = 1000, blkdev = 0;
    bool parsed = net_args_parse(&a, arg);
    common_args(&a, &c, NET_BUF_SIZE, VIRTQ_MAX_SIZE);
    net_arg_num(&a, "n", &iterations);
    net_arg_num(&a, "idle", &idle);
    net_arg_num(&a, "blk", &blkdev);
    if (!parsed || !net_args_ok(&a) || iterations == 0 || iterations > 10000 || idle > 60000
        || blkdev >= VIRTIO_MAX_DEVICES) {
        fail("net-tap-gone", "bad-arg=%s", arg ? arg : "");
        return;
    }
    struct net_dev *n = open_for("net-tap-gone", &c);
    if (!n || !resolve("net-tap-gone", n))
        return;
    const char *why = "";
    struct blk_dev *b = blk_open((u32)blkdev, 0, false, &why);
    if (!b) {
        fail("net-tap-gone", "blk-init dev=%llu %s", blkdev, why);
        return;
    }
    if (b->capacity < 16) {
        fail("net-tap-gone", "blk-capacity=%llu", b->capacity);
        return;
    }
    info("net-tap-gone", "begin iterations=%llu", iterations);
    u32 tx_done = 0, blk_ok = 0;
    struct blk_result r;
    for (u64 i = 0; i < iterations; i++) {
        if (i && i % 10 == 0)
            info("net-tap-gone", "progress i=%llu", i);
        int slot = net_tx_alloc(n);
        if (slot >= 0) {
            u8 *f = net_tx_frame(n, (u32)slot);
            put32(f + UDP_FRAME_LEN(0), (u32)i);
            net_tx_post(n, (u32)slot, udp_build(f, n->mac, net_cfg.peer_mac, net_cfg.peer,
                                                PORT_GONE, PORT_GONE, 4));
            if (net_tx_drain(n, NET_TIMEOUT_MS))
                tx_done++;
        }
        /* Anything received meanwhile (before the TAP went) is consumed. */
        const u8 *f;
        while (net_recv(n, &f, 0))
            ;
        u64 sector = 8 + i % 8;
        blk_pattern_fill(b->data, sector, 1);
        if (!blk_request(b, VIRTIO_BLK_T_OUT, sector, b->data, BLK_SECTOR_SIZE, &r)
            || r.status != VIRTIO_BLK_S_OK)
            continue;
        memset(b->data2, 0, BLK_SECTOR_SIZE);
        if (blk_request(b, VIRTIO_BLK_T_IN, sector, b->data2, BLK_SECTOR_SIZE, &r)
            && r.status == VIRTIO_BLK_S_OK && memcmp(b->data, b->data2, BLK_SECTOR_SIZE) == 0)
            blk_ok++;
    }
    if (tx_done == iterations)
        ok("net-tap-gone", "tx-completed=%u/%llu", tx_done, iterations);
    else
        fail("net-tap-gone", "tx-completed=%u/%llu", tx_done, iterations);
    if (blk_ok == iterations)
        ok("net-tap-gone", "blk=%u/%llu", blk_ok, iterations);
    else
        fail("net-tap-gone", "blk=%u/%llu", blk_ok, iterations);
    /* The host samples the VMM's CPU time over this idle window: no spinning. */
    info("net-tap-gone", "idle ms=%llu", idle);
    sleep_ms(idle);
    info("net-tap-gone", "awake");
    if (n->tx_bad_used || n->tx_no_irq)
        fail("net-tap-gone", "counters tx-bad-used=%u tx-no-irq=%u", n->tx_bad_used, n->tx_no_irq);
}
