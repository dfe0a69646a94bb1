/*
 * net-offload: the checksum and segmentation offloads kiln's virtio-net
 * offers, against the host's own network stack.
 * Negotiated: VERSION_1, MAC, CSUM, HOST_TSO4, GUEST_CSUM (one receive
 * buffer per frame; no GUEST_TSO4, so the host never sends more than a
 * buffer holds).
 *
 * - tx-csum: a UDP datagram to the peer's PORT_TX_CSUM whose checksum is
 *   left to the device (VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start 34,
 *   csum_offset 6, the field holding the pseudo-header sum, as Linux does);
 *   the host's socket must receive it (the test checks).
 * - tx-tso4: one TCPv4 segment of TSO_PAYLOAD bytes, GSO_TCPV4 with gso_size
 *   1448 and NEEDS_CSUM, to a closed port of the peer, without ACK: the
 *   host's TCP answers RST|ACK acknowledging seq + every byte of the segment
 *   (RFC 793), which shows it took the whole segment.
 * - rx-csum: "info net-offload listen", then a UDP datagram from the host to
 *   PORT_RX_CSUM: with GUEST_CSUM the host may leave its checksum to the
 *   guest (NEEDS_CSUM): the guest completes it at csum_start + csum_offset,
 *   then verifies it with the pseudo-header and checks the payload.
 * - net-offload:rx-tso negotiates GUEST_CSUM, GUEST_TSO4 and MRG_RXBUF instead
 *   and receives TCP segments larger than the MSS from the host (rx_tso4).
 */
#include "cpu.h"
#include "lib.h"
#include "mm.h"
#include "net.h"
#include "report.h"
#include "scenario.h"

#define PORT_TX_CSUM        7010
#define PORT_RX_CSUM        7011
#define PORT_TSO            7012        /* closed on the host */
#define TX_CSUM_PAYLOAD     1000
#define RX_CSUM_PAYLOAD     600
#define TSO_PAYLOAD         4000
#define TSO_MSS             1448
#define TSO_SEQ             0x4b494c4eU /* "KILN" */
#define IPPROTO_TCP         6
#define TCP_HLEN            20
#define TCP_RST             0x04
#define TCP_PSH             0x08
#define TCP_ACK             0x10
#define TCP_SYN             0x02
#define PORT_RX_TSO         7013
#define RX_TSO_BYTES        12000
#define WAIT_MS             3000
#define BUF_BYTES           8192

static u8 *buf;                 /* BUF_BYTES of DMA memory: header + frame */

/* The folded pseudo-header sum (not complemented), as a driver leaves it for the device. */
static u16 pseudo_sum(u32 src, u32 dst, u8 proto, u32 l4_len)
{
    u8 ph[12];
    put32(ph, src);
    put32(ph + 4, dst);
    ph[8] = 0;
    ph[9] = proto;
    put16(ph + 10, (u16)l4_len);
    return (u16)~inet_csum(ph, sizeof(ph), 0);
}

/* Sends buf (header + frame of `len` bytes) as descriptor 0 of the transmit queue (nothing
 * else in flight) and waits for it to come back. */
static const char *send_raw(struct net_dev *n, u32 len)
{
    if (!net_tx_drain(n, WAIT_MS))
        return "tx-busy";
    struct virtq *vq = n->txq;
    volatile struct virtq_desc *d = &vq->desc[0];
    d->addr = virt_to_phys(buf);
    d->len = NET_HDR_LEN + len;
    d->flags = 0;
    d->next = 0;
    virtq_post(vq, 0);
    virtq_notify(vq);
    if (virtq_wait(vq, WAIT_MS) == VIRTQ_WAIT_TIMEOUT)
        return "used=none";
    u32 id, used_len;
    if (!virtq_pop_used(vq, &id, &used_len, false) || id != 0)
        return "used-id";
    return NULL;
}

static void tx_csum(struct net_dev *n)
{
    memset(buf, 0, NET_HDR_LEN);
    u8 *f = buf + NET_HDR_LEN;
    u8 *data = f + UDP_FRAME_LEN(0);
    for (u32 i = 0; i < TX_CSUM_PAYLOAD; i++)
        data[i] = (u8)(i * 13 + 5);
    u32 len = udp_build(f, n->mac, net_cfg.peer_mac, net_cfg.peer, PORT_TX_CSUM, PORT_TX_CSUM,
                        TX_CSUM_PAYLOAD);
    u8 *udp = f + ETH_HLEN + IP_HLEN;
    put16(udp + 6, pseudo_sum(net_cfg.ip, net_cfg.peer, IPPROTO_UDP, UDP_HLEN + TX_CSUM_PAYLOAD));
    struct virtio_net_hdr *h = (struct virtio_net_hdr *)buf;
    h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h->csum_start = ETH_HLEN + IP_HLEN;
    h->csum_offset = 6;
    const char *why = send_raw(n, len);
    if (why)
        fail("net-offload", "tx-csum %s", why);
    else
        ok("net-offload", "tx-csum sent len=%u", len);
}

/* Waits for a TCP segment from the peer to `port`; its flags and acknowledgement number. */
static bool wait_tcp(struct net_dev *n, u16 port, u8 *flags, u32 *ack)
{
    u64 deadline = tsc_deadline_ms(WAIT_MS);
    while (!tsc_passed(deadline)) {
        const u8 *f;
        u32 len = net_recv(n, &f, 200);
        if (!len)
            continue;
        struct pkt p;
        if (net_parse(f, len, &p, false) != PKT_OTHER) {
            net_respond(n, f, len, &p);
            continue;
        }
        if (len < ETH_HLEN + IP_HLEN + TCP_HLEN || get16(f + 12) != ETH_P_IP)
            continue;
        const u8 *ip = f + ETH_HLEN;
        const u8 *tcp = ip + (ip[0] & 0xf) * 4;
        if (ip[9] != IPPROTO_TCP || get32(ip + 12) != net_cfg.peer || get16(tcp + 2) != port)
            continue;
        *flags = tcp[13];
        *ack = get32(tcp + 8);
        return true;
    }
    return false;
}

static void tx_tso4(struct net_dev *n)
{
    memset(buf, 0, NET_HDR_LEN);
    u8 *f = buf + NET_HDR_LEN;
    u8 *tcp = f + ETH_HLEN + IP_HLEN;
    u8 *data = tcp + TCP_HLEN;
    for (u32 i = 0; i < TSO_PAYLOAD; i++)
        data[i] = (u8)(i * 7 + 1);
    put16(tcp, PORT_TSO);
    put16(tcp + 2, PORT_TSO);
    put32(tcp + 4, TSO_SEQ);
    put32(tcp + 8, 0);
    tcp[12] = (TCP_HLEN / 4) << 4;
    tcp[13] = TCP_PSH;
    put16(tcp + 14, 65535);
    put16(tcp + 18, 0);
    put16(tcp + 16, pseudo_sum(net_cfg.ip, net_cfg.peer, IPPROTO_TCP, TCP_HLEN + TSO_PAYLOAD));
    u32 len = ip_build(f, n->mac, net_cfg.peer_mac, IPPROTO_TCP, net_cfg.peer,
                       TCP_HLEN + TSO_PAYLOAD);
    struct virtio_net_hdr *h = (struct virtio_net_hdr *)buf;
    h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h->gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
    h->hdr_len = ETH_HLEN + IP_HLEN + TCP_HLEN;
    h->gso_size = TSO_MSS;
    h->csum_start = ETH_HLEN + IP_HLEN;
    h->csum_offset = 16;
    const char *why = send_raw(n, len);
    if (why) {
        fail("net-offload", "tx-tso4 %s", why);
        return;
    }
    u8 flags;
    u32 ack;
    if (!wait_tcp(n, PORT_TSO, &flags, &ack)) {
        fail("net-offload", "tx-tso4 no-answer");
        return;
    }
    if ((flags & (TCP_RST | TCP_ACK)) == (TCP_RST | TCP_ACK) && ack == TSO_SEQ + TSO_PAYLOAD)
        ok("net-offload", "tx-tso4 rst-acked=%u", ack - TSO_SEQ);
    else
        fail("net-offload", "tx-tso4 flags=0x%x acked=%u", flags, ack - TSO_SEQ);
}

static void rx_csum(struct net_dev *n)
{
    info("net-offload", "listen port=%u", PORT_RX_CSUM);
    u64 deadline = tsc_deadline_ms(10000);
    while (!tsc_passed(deadline)) {
        const u8 *cf;
        u32 len = net_recv(n, &cf, 200);
        if (!len)
            continue;
        u8 *f = (u8 *)cf;
        /* One buffer per frame (no MRG_RXBUF): the header is right before the frame. */
        const struct virtio_net_hdr *h = (const struct virtio_net_hdr *)(f - NET_HDR_LEN);
        struct pkt p;
        enum pkt_kind k = net_parse(f, len, &p, false);
        if (k != PKT_UDP || p.dport != PORT_RX_CSUM) {
            if (k != PKT_OTHER)
                net_respond(n, f, len, &p);
            continue;
        }
        u32 needs = h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM;
        if (needs) {
            if (h->csum_start != ETH_HLEN + IP_HLEN || h->csum_offset != 6) {
                fail("net-offload", "rx-csum csum_start=%u csum_offset=%u", h->csum_start,
                     h->csum_offset);
                return;
            }
            u16 c = inet_csum(f + h->csum_start, len - h->csum_start, 0);
            put16(f + h->csum_start + h->csum_offset, c);
        }
        if (net_parse(f, len, &p, true) != PKT_UDP) {
            fail("net-offload", "rx-csum bad=%s needs-csum=%u", p.why ? p.why : "?", needs);
            return;
        }
        if (get16(f + ETH_HLEN + IP_HLEN + 6) == 0) {
            fail("net-offload", "rx-csum no-checksum needs-csum=%u", needs);
            return;
        }
        bool good = p.data_len == RX_CSUM_PAYLOAD;
        for (u32 i = 0; good && i < p.data_len; i++)
            good = p.data[i] == (u8)(i * 7 + 3);
        if (good)
            ok("net-offload", "rx-csum needs-csum=%u len=%u", needs, p.data_len);
        else
            fail("net-offload", "rx-csum payload len=%u", p.data_len);
        return;
    }
    fail("net-offload", "rx-csum timeout");
}

/* A TCP segment from the guest's port PORT_RX_TSO to the peer's, with a full checksum. */
static void tcp_send(struct net_dev *n, u32 seq, u32 ack, u8 flags, bool mss_option)
{
    u8 f[ETH_HLEN + IP_HLEN + TCP_HLEN + 4];
    u8 *tcp = f + ETH_HLEN + IP_HLEN;
    u32 tcp_len = TCP_HLEN + (mss_option ? 4 : 0);
    put16(tcp, PORT_RX_TSO);
    put16(tcp + 2, PORT_RX_TSO);
    put32(tcp + 4, seq);
    put32(tcp + 8, ack);
    tcp[12] = (u8)((tcp_len / 4) << 4);
    tcp[13] = flags;
    put16(tcp + 14, 65535);
    put16(tcp + 16, 0);
    put16(tcp + 18, 0);
    if (mss_option) {
        tcp[20] = 2;            /* MSS */
        tcp[21] = 4;
        put16(tcp + 22, TSO_MSS);
    }
    u32 len = ip_build(f, n->mac, net_cfg.peer_mac, IPPROTO_TCP, net_cfg.peer, tcp_len);
    u32 ps = (net_cfg.ip >> 16) + (net_cfg.ip & 0xffff) + (net_cfg.peer >> 16)
             + (net_cfg.peer & 0xffff) + IPPROTO_TCP + tcp_len;
    put16(tcp + 16, inet_csum(tcp, tcp_len, ps));
    net_send(n, f, len);
}

/* Waits for a TCP segment from the peer's PORT_RX_TSO; *tcp points at its TCP header. */
static u32 recv_tcp(struct net_dev *n, u8 **frame, u8 **tcp, u64 ms)
{
    u64 deadline = tsc_deadline_ms(ms);
    while (!tsc_passed(deadline)) {
        const u8 *cf;
        u32 len = net_recv(n, &cf, 200);
        if (!len)
            continue;
        struct pkt p;
        if (net_parse(cf, len, &p, false) != PKT_OTHER) {
            net_respond(n, cf, len, &p);
            continue;
        }
        u8 *f = (u8 *)cf;
        if (len < ETH_HLEN + IP_HLEN + TCP_HLEN || get16(f + 12) != ETH_P_IP)
            continue;
        u8 *ip = f + ETH_HLEN;
        u8 *t = ip + (ip[0] & 0xf) * 4;
        if (ip[9] != IPPROTO_TCP || get32(ip + 12) != net_cfg.peer || get16(t) != PORT_RX_TSO)
            continue;
        *frame = f;
        *tcp = t;
        return len;
    }
    return 0;
}

/*
 * rx-tso4: a TCP connection to the host's listener (SYN with MSS 1448, SYN-ACK, ACK), then
 * the host writes RX_TSO_BYTES; with GUEST_TSO4 and MRG_RXBUF its stack may hand the TAP
 * segments larger than the MSS (GSO_TCPV4), which the guest receives whole: each is
 * checked (checksum completed and verified with the pseudo-header, payload) until every
 * byte came. The guest never acknowledges data; it only counts.
 */
static void rx_tso4(struct net_dev *n)
{
    const u32 isn = 0x6b696c6e;
    u8 *f, *t;
    tcp_send(n, isn, 0, TCP_SYN, true);
    u32 len = recv_tcp(n, &f, &t, WAIT_MS);
    if (!len || (t[13] & (TCP_SYN | TCP_ACK)) != (TCP_SYN | TCP_ACK) || get32(t + 8) != isn + 1) {
        fail("net-offload", "rx-tso4 no-syn-ack len=%u", len);
        return;
    }
    u32 peer_isn = get32(t + 4);
    tcp_send(n, isn + 1, peer_isn + 1, TCP_ACK, false);
    info("net-offload", "connected port=%u", PORT_RX_TSO);
    u32 got = 0, gso_frames = 0, biggest = 0, gso_size = 0;
    while (got < RX_TSO_BYTES) {
        len = recv_tcp(n, &f, &t, 5000);
        if (!len)
            break;
        const struct virtio_net_hdr *h = &n->rx_hdr;
        u8 *ip = f + ETH_HLEN;
        u32 ip_len = get16(ip + 2), thl = (u32)(t[12] >> 4) * 4;
        u32 tcp_len = ip_len - (u32)(t - ip);
        u32 data_len = tcp_len - thl;
        if (!data_len)
            continue;
        if (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
            u16 c = inet_csum(f + h->csum_start, len - h->csum_start, 0);
            put16(f + h->csum_start + h->csum_offset, c);
        }
        u32 ps = (net_cfg.peer >> 16) + (net_cfg.peer & 0xffff) + (net_cfg.ip >> 16)
                 + (net_cfg.ip & 0xffff) + IPPROTO_TCP + tcp_len;
        if (inet_csum(t, tcp_len, ps) != 0) {
            fail("net-offload", "rx-tso4 checksum len=%u gso=%u needs-csum=%u", len, h->gso_type,
                 h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM);
            return;
        }
        u32 off = get32(t + 4) - (peer_isn + 1);
        const u8 *d = t + thl;
        for (u32 i = 0; i < data_len; i++)
            if (d[i] != (u8)((off + i) * 11 + 7)) {
                fail("net-offload", "rx-tso4 data offset=%u", off + i);
                return;
            }
        if ((h->gso_type & 0x7f) == VIRTIO_NET_HDR_GSO_TCPV4) {
            gso_frames++;
            gso_size = h->gso_size;
        }
        if (data_len > biggest)
            biggest = data_len;
        if (off + data_len > got)
            got = off + data_len;
    }
    if (got >= RX_TSO_BYTES && gso_frames && biggest > TSO_MSS)
        ok("net-offload", "rx-tso4 bytes=%u gso-frames>0 gso_size=%u", RX_TSO_BYTES, gso_size);
    else
        fail("net-offload", "rx-tso4 bytes=%u/%u gso-frames=%u biggest=%u", got, RX_TSO_BYTES,
             gso_frames, biggest);
}

void scn_net_offload(const char *arg)
{
    bool tso = arg && strcmp(arg, "rx-tso") == 0;
    if (arg && !tso) {
        fail("net-offload", "bad-arg=%s", arg);
        return;
    }
    const char *why = "";
    if (!net_cfg_load(&why)) {
        fail("net-offload", "config %s", why);
        return;
    }
    if (!buf && !(buf = dma_alloc(BUF_BYTES))) {
        fail("net-offload", "out-of-dma-memory");
        return;
    }
    u64 wanted = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_CSUM;
    if (tso)
        wanted = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MRG_RXBUF;
    struct net_dev *n = net_open(0, wanted, 0, 0, &why);
    if (!n) {
        fail("net-offload", "init %s", why);
        return;
    }
    if ((n->vdev->acked & wanted) != wanted) {
        fail("net-offload", "not-offered acked=0x%llx", n->vdev->acked);
        return;
    }
    info("net-offload", "acked=0x%llx", n->vdev->acked);
    if (!net_resolve_peer(n)) {
        fail("net-offload", "arp timeout");
        return;
    }
    if (tso) {
        rx_tso4(n);
        return;
    }
    tx_csum(n);
    tx_tso4(n);
    rx_csum(n);
}
