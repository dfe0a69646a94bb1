/* Ethernet / ARP / IPv4 / ICMP / UDP: see include/net.h. */
#include "boot.h"
#include "cpu.h"
#include "lib.h"
#include "net.h"

#define ARP_TRIES           3
#define ARP_WAIT_MS         500
#define IP_TTL              64

struct net_cfg net_cfg;
u32 net_arp_answered, net_echo_answered;

static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

/* ---- configuration ------------------------------------------------------ */

static bool parse_ip(const char *s, size_t len, u32 *out)
{
    u32 ip = 0;
    size_t i = 0;
    for (u32 part = 0; part < 4; part++) {
        size_t start = i;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        u64 v;
        if (i == start || i - start > 3 || !parse_u64(s + start, i - start, &v) || v > 255)
            return false;
        ip = ip << 8 | (u32)v;
        if (part < 3) {
            if (i >= len || s[i] != '.')
                return false;
            i++;
        }
    }
    if (i != len)
        return false;
    *out = ip;
    return true;
}

bool net_cfg_load(const char **why)
{
    static bool loaded;
    static const char key[] = "kiln.net=";
    if (loaded)
        return true;
    net_cfg.ip = 0x0a000002;            /* 10.0.0.2 */
    net_cfg.peer = 0x0a000001;          /* 10.0.0.1 */
    const char *p = boot.cmdline;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
            p++;
        const char *tok = p;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
            p++;
        if ((size_t)(p - tok) < sizeof(key) - 1 || strncmp(tok, key, sizeof(key) - 1) != 0)
            continue;
        /* "ip:<a.b.c.d>,peer:<a.b.c.d>", in any order */
        for (const char *item = tok + sizeof(key) - 1; item < p;) {
            const char *end = item;
            while (end < p && *end != ',')
                end++;
            size_t len = (size_t)(end - item);
            bool good;
            if (len > 3 && strncmp(item, "ip:", 3) == 0)
                good = parse_ip(item + 3, len - 3, &net_cfg.ip);
            else if (len > 5 && strncmp(item, "peer:", 5) == 0)
                good = parse_ip(item + 5, len - 5, &net_cfg.peer);
            else
                good = false;
            if (!good) {
                *why = "bad-kiln.net";
                return false;
            }
            item = end + 1;
        }
    }
    loaded = true;
    return true;
}

const char *ip_str(u32 ip, char *buf)
{
    ksnprintf(buf, 18, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff, ip & 0xff);
    return buf;
}

const char *mac_str(const u8 *m, char *buf)
{
    ksnprintf(buf, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
    return buf;
}

/* ---- checksums and builders --------------------------------------------- */

u16 inet_csum(const void *data, u32 len, u32 sum)
{
    /* Native 32-bit words; one's complement sums do not depend on byte order
     * (RFC 1071 2(B)), so the folded result is only byte-swapped at the end. */
    const u8 *p = data;
    u64 acc = 0;
    for (; len >= 4; p += 4, len -= 4)
        acc += *(const u32 *)p;
    if (len >= 2) {
        acc += *(const u16 *)p;
        p += 2;
        len -= 2;
    }
    if (len)
        acc += *p;
    while (acc >> 16)
        acc = (acc & 0xffff) + (acc >> 16);
    u32 be = (u32)((acc & 0xff) << 8 | acc >> 8) + sum;
    while (be >> 16)
        be = (be & 0xffff) + (be >> 16);
    return (u16)~be;
}

static u32 eth_build(u8 *f, const u8 *dst, const u8 *src, u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    put16(f + 12, type);
    return ETH_HLEN;
}

u32 arp_build(u8 *f, const u8 *my_mac, u16 op, const u8 *dst_mac, u32 target_ip)
{
    static const u8 zero[6];
    eth_build(f, op == ARP_REQUEST ? broadcast : dst_mac, my_mac, ETH_P_ARP);
    u8 *a = f + ETH_HLEN;
    put16(a, 1);                        /* Ethernet */
    put16(a + 2, ETH_P_IP);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, my_mac, 6);
    put32(a + 14, net_cfg.ip);
    memcpy(a + 18, op == ARP_REQUEST ? zero : dst_mac, 6);
    put32(a + 24, target_ip);
    return ARP_FRAME_LEN;
}

u32 ip_build(u8 *f, const u8 *my_mac, const u8 *dst_mac, u8 proto, u32 dst_ip, u32 l4_len)
{
    static u16 ident;
    eth_build(f, dst_mac, my_mac, ETH_P_IP);
    u8 *ip = f + ETH_HLEN;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (u16)(IP_HLEN + l4_len));
    put16(ip + 4, ident++);
    put16(ip + 6, 0x4000);              /* DF */
    ip[8] = IP_TTL;
    ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, net_cfg.ip);
    put32(ip + 16, dst_ip);
    put16(ip + 10, inet_csum(ip, IP_HLEN, 0));
    return ETH_HLEN + IP_HLEN + l4_len;
}

u32 icmp_echo_build(u8 *f, const u8 *my_mac, const u8 *dst_mac, u32 dst_ip, u8 type,
                    u16 id, u16 seq, u32 data_len)
{
    u8 *icmp = f + ETH_HLEN + IP_HLEN;
    icmp[0] = type;
    icmp[1] = 0;
    put16(icmp + 2, 0);
    put16(icmp + 4, id);
    put16(icmp + 6, seq);
    put16(icmp + 2, inet_csum(icmp, ICMP_HLEN + data_len, 0));
    return ip_build(f, my_mac, dst_mac, IPPROTO_ICMP, dst_ip, ICMP_HLEN + data_len);
}

u32 udp_build(u8 *f, const u8 *my_mac, const u8 *dst_mac, u32 dst_ip, u16 sport, u16 dport,
              u32 len)
{
    u8 *udp = f + ETH_HLEN + IP_HLEN;
    put16(udp, sport);
    put16(udp + 2, dport);
    put16(udp + 4, (u16)(UDP_HLEN + len));
    put16(udp + 6, 0);                  /* no checksum (allowed over IPv4) */
    return ip_build(f, my_mac, dst_mac, IPPROTO_UDP, dst_ip, UDP_HLEN + len);
}

/* ---- parsing ------------------------------------------------------------ */

static enum pkt_kind bad(struct pkt *p, const char *why)
{
    p->why = why;
    return PKT_BAD;
}

enum pkt_kind net_parse(const u8 *f, u32 len, struct pkt *p, bool verify_udp)
{
    memset(p, 0, sizeof(*p));
    if (len < ETH_HLEN)
        return bad(p, "short-frame");
    p->dst_mac = f;
    p->src_mac = f + 6;
    p->ethertype = get16(f + 12);
    const u8 *l3 = f + ETH_HLEN;
    u32 l3_len = len - ETH_HLEN;
    if (p->ethertype == ETH_P_ARP) {
        if (l3_len < ARP_FRAME_LEN - ETH_HLEN)
            return bad(p, "short-arp");
        if (get16(l3) != 1 || get16(l3 + 2) != ETH_P_IP || l3[4] != 6 || l3[5] != 4)
            return PKT_OTHER;
        p->arp_op = get16(l3 + 6);
        p->arp_sha = l3 + 8;
        p->arp_spa = get32(l3 + 14);
        p->arp_tpa = get32(l3 + 24);
        return PKT_ARP;
    }
    if (p->ethertype != ETH_P_IP)
        return PKT_OTHER;
    if (l3_len < IP_HLEN)
        return bad(p, "short-ip");
    u32 ihl = (u32)(l3[0] & 0xf) * 4;
    u32 total = get16(l3 + 2);
    if ((l3[0] >> 4) != 4 || ihl < IP_HLEN || total < ihl || total > l3_len)
        return bad(p, "ip-length");
    p->src_ip = get32(l3 + 12);
    p->dst_ip = get32(l3 + 16);
    p->proto = l3[9];
    if (inet_csum(l3, ihl, 0) != 0)
        return bad(p, "ip-checksum");
    if (p->dst_ip != net_cfg.ip && p->dst_ip != 0xffffffff)
        return PKT_OTHER;
    if (get16(l3 + 6) & 0x3fff)         /* MF or a fragment offset */
        return PKT_OTHER;
    const u8 *l4 = l3 + ihl;
    u32 l4_len = total - ihl;
    if (p->proto == IPPROTO_ICMP) {
        if (l4_len < ICMP_HLEN)
            return bad(p, "short-icmp");
        if (inet_csum(l4, l4_len, 0) != 0)
            return bad(p, "icmp-checksum");
        p->icmp_type = l4[0];
        p->icmp_id = get16(l4 + 4);
        p->icmp_seq = get16(l4 + 6);
        p->data = l4 + ICMP_HLEN;
        p->data_len = l4_len - ICMP_HLEN;
        return PKT_ICMP;
    }
    if (p->proto == IPPROTO_UDP) {
        if (l4_len < UDP_HLEN)
            return bad(p, "short-udp");
        u32 ulen = get16(l4 + 4);
        if (ulen < UDP_HLEN || ulen > l4_len)
            return bad(p, "udp-length");
        if (verify_udp && get16(l4 + 6) != 0) {
            u32 pseudo = (p->src_ip >> 16) + (p->src_ip & 0xffff) + (p->dst_ip >> 16)
                + (p->dst_ip & 0xffff) + IPPROTO_UDP + ulen;
            if (inet_csum(l4, ulen, pseudo) != 0)
                return bad(p, "udp-checksum");
        }
        p->sport = get16(l4);
        p->dport = get16(l4 + 2);
        p->data = l4 + UDP_HLEN;
        p->data_len = ulen - UDP_HLEN;
        return PKT_UDP;
    }
    return PKT_OTHER;
}

/* ---- responder ---------------------------------------------------------- */

bool net_respond(struct net_dev *n, const u8 *f, u32 len, const struct pkt *p)
{
    (void)f;
    (void)len;
    if (p->ethertype == ETH_P_ARP && p->arp_tpa == net_cfg.ip && p->arp_op == ARP_REQUEST) {
        if (p->arp_spa == net_cfg.peer) {
            memcpy(net_cfg.peer_mac, p->arp_sha, 6);
            net_cfg.peer_known = true;
        }
        int slot = net_tx_alloc(n);
        if (slot < 0)
            return true;
        u8 *out = net_tx_frame(n, (u32)slot);
        net_tx_post(n, (u32)slot, arp_build(out, n->mac, ARP_REPLY, p->arp_sha, p->arp_spa));
        net_arp_answered++;
        return true;
    }
    if (p->ethertype == ETH_P_IP && p->proto == IPPROTO_ICMP && p->icmp_type == ICMP_ECHO_REQUEST
        && p->dst_ip == net_cfg.ip && p->data_len <= NET_ETH_MAX - ETH_HLEN - IP_HLEN - ICMP_HLEN) {
        int slot = net_tx_alloc(n);
        if (slot < 0)
            return true;
        u8 *out = net_tx_frame(n, (u32)slot);
        memcpy(out + ETH_HLEN + IP_HLEN + ICMP_HLEN, p->data, p->data_len);
        u32 l = icmp_echo_build(out, n->mac, p->src_mac, p->src_ip, ICMP_ECHO_REPLY,
                                p->icmp_id, p->icmp_seq, p->data_len);
        net_tx_post(n, (u32)slot, l);
        net_echo_answered++;
        return true;
    }
    return false;
}

bool net_resolve_peer(struct net_dev *n)
{
    net_cfg.peer_known = false;
    for (u32 t = 0; t < ARP_TRIES; t++) {
        int slot = net_tx_alloc(n);
        if (slot < 0)
            return false;
        u8 *out = net_tx_frame(n, (u32)slot);
        net_tx_post(n, (u32)slot, arp_build(out, n->mac, ARP_REQUEST, broadcast, net_cfg.peer));
        u64 deadline = tsc_deadline_ms(ARP_WAIT_MS);
        while (!tsc_passed(deadline)) {
            const u8 *f;
            u32 len = net_recv(n, &f, ARP_WAIT_MS);
            if (!len)
                break;
            struct pkt p;
            if (net_parse(f, len, &p, false) != PKT_ARP)
                continue;
            if (p.arp_op == ARP_REPLY && p.arp_spa == net_cfg.peer && p.arp_tpa == net_cfg.ip) {
                memcpy(net_cfg.peer_mac, p.arp_sha, 6);
                net_cfg.peer_known = true;
                return true;
            }
            net_respond(n, f, len, &p);
            if (net_cfg.peer_known)
                return true;
        }
    }
    return false;
}

/* ---- ping --------------------------------------------------------------- */

static u8 ping_byte(u16 seq, u32 i)
{
    return (u8)(seq * 7u + i);
}

u32 net_ping_build(struct net_dev *n, u8 *f, u16 id, u16 seq, u32 data_len)
{
    u8 *data = f + ETH_HLEN + IP_HLEN + ICMP_HLEN;
    for (u32 i = 0; i < data_len; i++)
        data[i] = ping_byte(seq, i);
    return icmp_echo_build(f, n->mac, net_cfg.peer_mac, net_cfg.peer, ICMP_ECHO_REQUEST, id, seq,
                           data_len);
}

const char *net_ping_wait(struct net_dev *n, u16 id, u16 seq, u32 data_len, u64 timeout_ms)
{
    u64 deadline = tsc_deadline_ms(timeout_ms);
    while (!tsc_passed(deadline)) {
        const u8 *f;
        u32 len = net_recv(n, &f, timeout_ms);
        if (!len)
            break;
        struct pkt p;
        enum pkt_kind k = net_parse(f, len, &p, false);
        if (k == PKT_ICMP && p.icmp_type == ICMP_ECHO_REPLY && p.icmp_id == id) {
            if (p.src_ip != net_cfg.peer)
                return "wrong-source";
            if (p.icmp_seq != seq)
                continue;               /* a late reply to an earlier request */
            if (p.data_len != data_len)
                return "data-length";
            for (u32 i = 0; i < data_len; i++)
                if (p.data[i] != ping_byte(seq, i))
                    return "data-mismatch";
            return NULL;
        }
        if (k == PKT_BAD && p.ethertype == ETH_P_IP && p.src_ip == net_cfg.peer)
            return p.why;
        net_respond(n, f, len, &p);
    }
    return "timeout";
}

const char *net_ping(struct net_dev *n, u16 id, u16 seq, u32 data_len, u64 timeout_ms)
{
    if (data_len > NET_ETH_MAX - ETH_HLEN - IP_HLEN - ICMP_HLEN)
        return "too-long";
    int slot = net_tx_alloc(n);
    if (slot < 0)
        return "no-tx-slot";
    net_tx_post(n, (u32)slot, net_ping_build(n, net_tx_frame(n, (u32)slot), id, seq, data_len));
    return net_ping_wait(n, id, seq, data_len, timeout_ms);
}

/* ---- scenario arguments ------------------------------------------------- */

bool net_args_parse(struct net_args *a, const char *arg)
{
    memset(a, 0, sizeof(*a));
    if (!arg || !*arg)
        return true;
    size_t len = strlen(arg);
    if (len >= sizeof(a->buf))
        return false;
    memcpy(a->buf, arg, len + 1);
    char *p = a->buf;
    for (;;) {
        if (a->n == NET_ARGS_MAX)
            return false;
        a->tok[a->n++] = p;
        while (*p && *p != ':')
            p++;
        if (!*p)
            return true;
        *p++ = '\0';
    }
}

bool net_arg_flag(struct net_args *a, const char *name)
{
    for (u32 i = 0; i < a->n; i++)
        if (strcmp(a->tok[i], name) == 0) {
            a->used |= 1u << i;
            return true;
        }
    return false;
}

bool net_arg_num(struct net_args *a, const char *name, u64 *v)
{
    size_t len = strlen(name);
    for (u32 i = 0; i < a->n; i++) {
        const char *t = a->tok[i];
        if (strncmp(t, name, len) == 0 && t[len] == '=') {
            a->used |= 1u << i;
            if (!parse_u64(t + len + 1, strlen(t + len + 1), v))
                a->bad = true;
            return true;
        }
    }
    return false;
}

bool net_args_ok(const struct net_args *a)
{
    return !a->bad && a->used == (a->n == 32 ? ~0u : (1u << a->n) - 1);
}
