/* proto.h — internal: header layouts, checksum helpers, GRE codec.
 *
 *  Ethernet   dst(6) src(6) [tpid(2) tci(2)] type(2)
 *  IPv4       RFC 791: ver/ihl tos len id flags/frag ttl proto csum src dst
 *  UDP        RFC 768: sport dport len csum (GRE-in-UDP, RFC 8086: dport
 *             4754, the GRE header right behind the UDP header)
 *  GRE        RFC 2784/2890:
 *              0                   1                   2                   3
 *             |C| |K|S| Reserved0       | Ver |         Protocol Type         |
 *             |      Checksum (optional)      |       Reserved1 (Optional)    |
 *             |                         Key (optional)                        |
 *             |                 Sequence Number (Optional)                    |
 *  All multi-byte fields are read and written byte-wise (network order),
 *  so nothing here depends on alignment inside ring slots.
 */
#ifndef TPB_PROTO_H
#define TPB_PROTO_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

#define ETH_ALEN_ 6
#define ETYPE_IPV4 0x0800
#define ETYPE_ARP 0x0806
#define ETYPE_IPV6 0x86dd
#define ETYPE_8021Q 0x8100

#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_GRE_ 47

/* RFC 8086 3.2: the destination port of GRE-in-UDP; the source port
 * carries the inner flow's entropy, from the dynamic range 49152-65535. */
#define GRE_UDP_PORT 4754
#define UDP_HLEN 8
#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5    /* older uapi headers lack it */
#endif

#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff

#define GRE_C 0x8000
#define GRE_K 0x2000
#define GRE_S 0x1000
#define GRE_VER 0x0007
/* R, s, Recur and the reserved flag bits: anything RFC 2784 says must be 0 */
#define GRE_UNKNOWN 0x4ff8

#define ECN_MASK 3
#define ECN_NOT_ECT 0
#define ECN_CE 3

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void wr16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
static inline void wr32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v & 0xff;
}

/* ---- checksums (csum.c) ---- */

/* One's-complement sum (RFC 1071) of len bytes added to sum, folded to
 * 16 bits but not inverted.  Pieces of one checksummed whole must start
 * at even offsets of it (all callers split on even boundaries). */
uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t len);
uint16_t csum_finish(uint32_t sum);             /* fold and invert */
/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one 16-bit field change */
uint16_t csum_replace16(uint16_t check, uint16_t old, uint16_t new_);
uint32_t csum_pseudo4(const uint8_t *ip, uint8_t proto, uint32_t l4len);
uint32_t csum_pseudo6(const uint8_t *ip6, uint8_t proto, uint32_t l4len);
void ip4_set_csum(uint8_t *ip);

/* ---- GRE codec (gre.c) ---- */

struct gre_tx {
    uint32_t local, remote, key;   /* host order */
    uint8_t has_key, csum, seq;
    int16_t ttl;                   /* -1: inherit the inner TTL/hop limit */
    int16_t tos;                   /* -1: inherit the inner DSCP */
    uint8_t df;                    /* TPB_DF_* */
    uint32_t seqno;                /* next sequence number to send */
    uint16_t ip_id;                /* next outer IP ID */
    uint8_t udp;                   /* GRE-in-UDP (RFC 8086) */
};

/* Whether gre_encap() needs the payload's sum: for the GRE checksum, or
 * for the UDP checksum GRE-in-UDP always carries. */
static inline int gre_wants_psum(const struct gre_tx *t)
{
    return t->csum || t->udp;
}

struct gre_rx {
    uint32_t local, remote, key;
    uint8_t has_key, csum, seq;
    uint8_t seq_started;
    uint32_t next_seq;             /* lowest sequence number still fresh */
};

/* What gre_decode() found: where the inner packet is and its type, and
 * the sequence number to commit once the packet is accepted. */
struct gre_pkt {
    uint16_t proto;
    uint16_t off;                  /* inner packet offset from the GRE header */
    uint8_t has_seq;               /* a number the window checked (r->seq) */
    uint32_t seq;
};

/* GRE header length for these options: 4 + 4 per optional field. */
static inline size_t gre_hlen(uint8_t csum, uint8_t key, uint8_t seq)
{
    return 4 + (csum ? 4 : 0) + (key ? 4 : 0) + (seq ? 4 : 0);
}

/* RFC 8086 3.2.1: the UDP source port of a GRE-in-UDP packet, a hash of
 * the inner flow (addresses, protocol and, when the packet is not a
 * fragment and holds them within plen bytes, its ports) folded into
 * 49152-65535, so the packets of one flow take one path and different
 * flows spread over ECMP.  Fragments hash on addresses and protocol alone,
 * so all of a datagram's fragments go one way. */
uint16_t gre_udp_sport(uint16_t proto, const uint8_t *inner, size_t plen);

/* Writes outer IPv4 + GRE (+ UDP between them with t->udp) for a payload
 * of `plen` bytes whose unfolded one's-complement sum is `psum` (needed
 * only where gre_wants_psum()), taking TOS/TTL/DF from the inner header per
 * the settings (RFC 6040 for ECN).  Returns the header length (20 [+ 8] +
 * GRE). */
size_t gre_encap(struct gre_tx *t, uint8_t *out, uint16_t proto,
                 const uint8_t *inner, size_t plen, uint32_t psum);

/* The outer IPv4 + UDP headers of a UDP GSO message (udpgso.c) whose UDP
 * length is ulen: nseg IDs taken, the source port hashed from the first
 * inner packet (ilen bytes), the checksum field left zero. */
void gre_udp_outer(struct gre_tx *t, uint8_t *out, uint16_t proto,
                   const uint8_t *inner, size_t ilen, size_t ulen, uint32_t nseg);

/* A UDP header (RFC 768) at u, len bytes with the payload, inside the
 * IPv4 packet ip: its checksum over the pseudo-header, the first `covered`
 * bytes at u and psum (the unfolded sum of the rest, wherever it lies). */
void udp4_put(uint8_t *u, const uint8_t *ip, uint16_t sport, uint16_t dport,
              size_t len, size_t covered, uint32_t psum);

/* Just the GRE header (the POP's kernel writes the outer IPv4 header). */
size_t gre_header(struct gre_tx *t, uint8_t *g, uint16_t proto,
                  size_t plen, uint32_t psum);
uint8_t outer_tos(const struct gre_tx *t, uint16_t proto, const uint8_t *inner);
uint8_t outer_ttl(const struct gre_tx *t, uint16_t proto, const uint8_t *inner);

/* segment.c: completes a CHECKSUM_PARTIAL packet's L4 checksum from the
 * vnet header's csum_start/csum_offset (counted from `frame`); -1 if they
 * point outside it or start before `from` (where the L4 header may begin:
 * a header the kernel never writes must not have the sum written over the
 * Ethernet or IP header). */
struct virtio_net_hdr;
int finish_csum(uint8_t *frame, size_t len, const struct virtio_net_hdr *vh,
                size_t from);

/* The length of a validated IPv4 or IPv6 header (without IPv6's extension
 * headers): where its payload begins at the earliest. */
static inline size_t ip_hlen(const uint8_t *ip, uint16_t proto)
{
    return proto == ETYPE_IPV4 ? (size_t)(ip[0] & 0x0f) * 4 : 40;
}

/* segment.c: a TCP (TSO) or UDP (USO) super-packet cut into segments of
 * at most `mss` payload bytes, as the kernel's tcp_gso_segment and
 * __udp_gso_segment cut them; used by the bridge (segment()) and the POP
 * (pop_offload.c). */
#define GSO_HDR_MAX 120     /* IP + L4 header of a segment, at most */
struct gso_plan {
    uint8_t *ip;            /* the super-packet's IP header */
    size_t ihl, l4hl, hl;   /* IP header, L4 header, both */
    uint16_t proto;         /* ETYPE_IPV4 / ETYPE_IPV6 */
    uint16_t mss;           /* payload bytes per segment (may be lowered
                             * after gso_plan(); gso_count() recounts) */
    uint8_t tcp;
    const uint8_t *payload;
    size_t plen;
};
/* Checks the super-packet at ip (len bytes, its IP header checked already)
 * against the vnet header's gso_type and gso_size (mss); returns how many
 * segments it makes, or -1 if it cannot be segmented. */
int gso_plan(struct gso_plan *s, uint8_t *ip, size_t len, uint16_t proto,
             uint8_t gso_type, uint16_t mss);
uint32_t gso_count(const struct gso_plan *s);
/* Segment k of n: its IP+L4 header written to h (s->hl bytes, lengths, ID,
 * sequence number, flags and checksums its own), *data pointed at its
 * payload; returns the payload's length. */
size_t gso_seg(const struct gso_plan *s, uint8_t *h, uint32_t k, uint32_t n,
               const uint8_t **data);

/* segment.c, GRO's side: whether TCP segment b (behind a 20-byte IPv4
 * header, or a 40-byte IPv6 one; TCP header thl long, both checked by the
 * caller) continues segment a's flow as inet_gro_receive / ipv6_gro_receive
 * and tcp_gro_receive would merge it: every header field equal but the IP
 * length and checksum, the IPv4 ID (which must be `id`), the TCP sequence
 * number (which must be `seq`), flags, checksum and urgent pointer.  The
 * flags each caller rules on itself.  Used by the bridge (coalesce.c) and
 * the POP (pop_gro.c). */
int tcp_seg_follows(const uint8_t *a, const uint8_t *b, uint16_t proto,
                    size_t thl, uint16_t id, uint32_t seq);

/* The checks shared by every GRE header from a remote (gre.c); `what`: */
#define GRE_CHECK_CSUM 1u   /* verify a checksum present over glen bytes */
#define GRE_CHECK_SEQ 2u    /* require a sequence number where r->seq */
int gre_check(const struct gre_rx *r, const uint8_t *g, size_t glen,
              unsigned what, struct gre_pkt *out);

/* Validates GRE at g (glen bytes, to the end of the outer IP payload) for
 * this tunnel; returns 0 or a TPB_DROP_GRE_* reason.  csum_checked: the
 * kernel already verified the GRE checksum while it merged the packet
 * (GRO), and the field now holds the first segment's.  Checks only: the
 * sequence window is not moved (gre_commit_seq()). */
int gre_decode(const struct gre_rx *r, const uint8_t *g, size_t glen,
               int csum_checked, struct gre_pkt *out);

/* Moves the window past what gre_decode() accepted, once the packet is
 * delivered (sent on, written to the TUN device, reflected): a packet
 * dropped by a later check (inner header, ECN, a refused source, a full
 * device) leaves the window as it was, so it cannot make the next genuine
 * packets stale.  (WireGuard moves its replay counter only after
 * authentication, for the same reason.) */
void gre_commit_seq(struct gre_rx *r, const struct gre_pkt *p);

/* A keepalive answer (GRE protocol 0, what the far end reflects of our
 * keepalive): version, flags, checksum and key as gre_decode() checks
 * them; no sequence number required, the window not touched.  Returns 0
 * or a TPB_DROP_GRE_* reason (TPB_DROP_GRE_PROTO: not protocol 0). */
int gre_keepalive_answer(const struct gre_rx *r, const uint8_t *g, size_t glen);

/* The far end reflects our keepalive's inner IPv4 packet as it is, so an
 * answer carries back one of the IP IDs we sent (`id`; a POP's GRE-in-UDP
 * keepalive carries it in its inner UDP source port too, as the POP's UDP
 * socket never sees an IP header: pop.c, ka_send).  Only the last `window`
 * sent are answers (older ones are past period x retries anyway): a
 * protocol-0 packet that merely has the POP's address and key must not
 * bring a POP up.  IDs start at a random value (ka_first_id()) so an
 * off-path sender cannot predict them.  Returns 0 or
 * TPB_DROP_KEEPALIVE_STALE; `sent` 0 means none sent yet. */
#define KA_ID_WINDOW_MAX 16

/* The clock, read now: a loop pass's cached time would give an answer
 * handled in the pass that sent its keepalive a round trip of 0. */
static inline uint64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#ifdef TPB_FUZZ
/* fuzz/pop.c tells the POP's sockets apart by these (below 0: never
 * closed, and no descriptor of the harness's process) */
#define TPB_FUZZ_FD_RAW (-2)
#define TPB_FUZZ_FD_UDP (-3)
#define TPB_FUZZ_FD_HDRINCL (-4)
#endif

int ka_id_check(uint16_t last_id, uint64_t sent, uint16_t id, unsigned window);
uint16_t ka_first_id(void);

/* RFC 6040 decapsulation: the inner ECN field given the outer's; returns
 * -1 where the packet must be dropped (CE on a Not-ECT inner packet). */
int ecn_decap(uint8_t outer_tos, uint8_t inner_tos);
/* The same, applied to the inner header in place (IPv4 checksum kept
 * right, RFC 1624); returns -1 to drop. */
int ecn_decap_inner(uint8_t outer_tos, uint8_t *in, uint16_t proto);

/* Both directions of one tunnel from its settings. */
void gre_setup(struct gre_tx *tx, struct gre_rx *rx, uint32_t local,
               uint32_t remote, uint32_t key, uint8_t has_key, uint8_t csum,
               uint8_t seq, int16_t ttl, int16_t tos);

/* Length of the IPv4 or IPv6 packet at ip (avail bytes available), or 0
 * if its header is malformed; Ethernet padding is not part of it. */
size_t ip_len(const uint8_t *ip, size_t avail, uint16_t proto);

/* Validates an IPv4 header at p (len bytes available): version, IHL,
 * total length, header checksum.  Returns the total length or 0. */
size_t ip4_check(const uint8_t *p, size_t len);

#endif
