/*
 * A minimal Ethernet / ARP / IPv4 / ICMP / UDP stack for the network
 * scenarios: frame builders, a parser that checks lengths and checksums,
 * and a responder that answers ARP requests and ICMP echo requests for the
 * guest's address. Integer code only; all multi-byte fields big-endian on
 * the wire.
 *
 * Addresses come from the command line:
 *     kiln.net=ip:<a.b.c.d>,peer:<a.b.c.d>
 * (defaults: ip 10.0.0.2, peer 10.0.0.1). The guest's MAC is the device's
 * (VIRTIO_NET_F_MAC), the peer's is learnt by ARP.
 */
#ifndef KILN_NET_H
#define KILN_NET_H

#include "types.h"
#include "virtio_net.h"

#define ETH_HLEN            14
#define ETH_P_IP            0x0800
#define ETH_P_ARP           0x0806
#define ETH_P_LOCAL_EXP     0x88b5          /* IEEE local experimental: nobody answers */
#define IP_HLEN             20
#define IPPROTO_ICMP        1
#define IPPROTO_UDP         17
#define UDP_HLEN            8
#define ICMP_HLEN           8
#define ICMP_ECHO_REPLY     0
#define ICMP_ECHO_REQUEST   8
#define ARP_FRAME_LEN       42
#define ARP_REQUEST         1
#define ARP_REPLY           2
/* UDP/IPv4 frame length for a payload of n bytes. */
#define UDP_FRAME_LEN(n)    (ETH_HLEN + IP_HLEN + UDP_HLEN + (n))

struct net_cfg {
    u32 ip, peer;               /* host byte order */
    u8 peer_mac[6];
    bool peer_known;
};
extern struct net_cfg net_cfg;

/* Parses kiln.net= (once); false with *why on a malformed value. */
bool net_cfg_load(const char **why);
/* "a.b.c.d" / "aa:bb:cc:dd:ee:ff" into buf (>= 18 bytes). */
const char *ip_str(u32 ip, char *buf);
const char *mac_str(const u8 *mac, char *buf);

static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static inline void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)); put16(p + 2, (u16)v); }

/*
 * Internet checksum (RFC 1071) of `len` bytes, continuing from `sum` (0 to
 * start): the value to store in the checksum field (big-endian bytes), or 0
 * when verifying data that includes its checksum.
 */
u16 inet_csum(const void *data, u32 len, u32 sum);

/* Frame builders: each writes a whole frame at f and returns its length. */
u32 arp_build(u8 *f, const u8 *my_mac, u16 op, const u8 *dst_mac, u32 target_ip);
/* Ethernet + IPv4 headers for `l4_len` bytes of payload (header checksum filled in). */
u32 ip_build(u8 *f, const u8 *my_mac, const u8 *dst_mac, u8 proto, u32 dst_ip, u32 l4_len);
/* ICMP echo request/reply with `data_len` bytes already at f + ETH_HLEN + IP_HLEN + ICMP_HLEN. */
u32 icmp_echo_build(u8 *f, const u8 *my_mac, const u8 *dst_mac, u32 dst_ip, u8 type,
                    u16 id, u16 seq, u32 data_len);
/* UDP with `len` bytes of payload already at f + UDP_FRAME_LEN(0); checksum 0 (none). */
u32 udp_build(u8 *f, const u8 *my_mac, const u8 *dst_mac, u32 dst_ip, u16 sport, u16 dport,
              u32 len);

enum pkt_kind {
    PKT_OTHER,                  /* not for us, or a protocol we do not speak */
    PKT_BAD,                    /* truncated, bad length or checksum */
    PKT_ARP,
    PKT_ICMP,
    PKT_UDP,
};

struct pkt {
    const u8 *src_mac, *dst_mac;
    u16 ethertype;
    /* ARP */
    u16 arp_op;
    u32 arp_spa, arp_tpa;
    const u8 *arp_sha;
    /* IPv4 */
    u32 src_ip, dst_ip;
    u8 proto;
    /* ICMP */
    u8 icmp_type;
    u16 icmp_id, icmp_seq;
    /* UDP */
    u16 sport, dport;
    /* ICMP echo data or UDP payload */
    const u8 *data;
    u32 data_len;
    const char *why;            /* PKT_BAD: what was wrong */
};

/*
 * Parses a received frame. IPv4 packets must be addressed to the guest (or
 * broadcast), have a valid header checksum and consistent lengths, no
 * fragmentation; ICMP checksums are verified; UDP checksums when not 0
 * (`verify_udp`).
 */
enum pkt_kind net_parse(const u8 *f, u32 len, struct pkt *p, bool verify_udp);

/*
 * Answers what a host expects an IPv4 node to answer: an ARP request for
 * the guest's address (learning the peer's MAC when it asks), an ICMP echo
 * request to it. True if the frame was such a request (and answered).
 */
bool net_respond(struct net_dev *n, const u8 *f, u32 len, const struct pkt *p);
/* Requests answered by net_respond since the last net_open of the scenario (reset by caller). */
extern u32 net_arp_answered, net_echo_answered;

/* ARPs for the peer (3 tries, 500 ms each), answering requests meanwhile. */
bool net_resolve_peer(struct net_dev *n);

/*
 * One ICMP echo request to the peer (`data_len` bytes of pattern
 * (seq * 7 + i) & 0xff) and its reply, checked: id, seq, data, checksums.
 * Returns NULL if it came back right, else the reason ("timeout",
 * "data-mismatch", ...). Other frames meanwhile go to net_respond.
 */
const char *net_ping(struct net_dev *n, u16 id, u16 seq, u32 data_len, u64 timeout_ms);
/* Builds that echo request into f; returns the frame length. */
u32 net_ping_build(struct net_dev *n, u8 *f, u16 id, u16 seq, u32 data_len);
/* Waits for the reply to (id, seq); NULL if right, else the reason. */
const char *net_ping_wait(struct net_dev *n, u16 id, u16 seq, u32 data_len, u64 timeout_ms);

/*
 * Scenario arguments "flag:key=<n>:...": every token must be consumed by a
 * lookup, else net_args_ok is false (a bad argument).
 */
#define NET_ARGS_MAX        12
struct net_args {
    char buf[128];
    char *tok[NET_ARGS_MAX];
    u32 n;
    u32 used;                   /* bit i: tok[i] was looked up */
    bool bad;                   /* a number did not parse */
};
bool net_args_parse(struct net_args *a, const char *arg);
bool net_arg_flag(struct net_args *a, const char *name);
/* "name=<n>": true if present (*v set when it parses). */
bool net_arg_num(struct net_args *a, const char *name, u64 *v);
bool net_args_ok(const struct net_args *a);

#endif
