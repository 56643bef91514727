/* fuzz.h — shared by the libFuzzer harnesses (fuzz/README.md).
 *
 * The harnesses call the helper's pipeline functions directly, in a build
 * with -DTPB_FUZZ (no socket is opened; txq.c hands every message to
 * tpb_fuzz_tx, pop.c's I/O goes to the tpb_fuzz_* functions of fuzz/pop.c)
 * and check what comes out.  A violated invariant is reported by fz_fail(),
 * which abort()s: libFuzzer takes it for a crash.
 */
#ifndef TPB_FUZZ_H
#define TPB_FUZZ_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE     /* before any system header: struct mmsghdr */
#endif
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "bridge.h"

#define FZ_ETH 14
#define FZ_GRE_UDP_PORT 4754               /* RFC 8086 */

/* The lab's addresses (tpb/lab.py's tunnel topology), as the seeds use. */
#define FZ_LOCAL 0xc6336403u               /* 198.51.100.3, the tunnel address */
#define FZ_NREMOTES 3
static const uint32_t fz_remotes[FZ_NREMOTES] = {
    0xc6336422u, 0xc6336432u, 0xc6336442u, /* 198.51.100.34, .50, .66 */
};
static const uint8_t fz_out_mac[6] = {2, 0, 0, 0, 0, 0x44};    /* TPB --out */
static const uint8_t fz_router_mac[6] = {2, 0, 0, 0, 0, 0x42}; /* gw1 */
#define FZ_T0 1000000000ull                /* the fake clock starts at 1 s */

/* ---- the input, read front to back; past its end everything is 0 ---- */

struct fz_in {
    const uint8_t *p;
    size_t n;
};

uint8_t fz_u8(struct fz_in *in);
uint16_t fz_u16(struct fz_in *in);
uint32_t fz_u32(struct fz_in *in);
/* Up to want bytes (fewer at the end); returns how many. */
size_t fz_bytes(struct fz_in *in, uint8_t *out, size_t want);

/* ---- failures, and a trace for reading seeds (FZ_TRACE=1) ---- */

void fz_trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

__attribute__((noreturn, format(printf, 1, 2)))
void fz_fail(const char *fmt, ...);
#define FZ_CHECK(cond, ...) \
    do { if (!(cond)) fz_fail(__VA_ARGS__); } while (0)

/* ---- checksums, written afresh (not csum.c) ---- */

uint32_t fz_sum(uint32_t sum, const uint8_t *p, size_t len);  /* unfolded */
uint16_t fz_fold(uint32_t sum);                               /* folded, inverted */
int fz_ip4_csum_ok(const uint8_t *ip);
void fz_ip4_set_csum(uint8_t *ip);
/* The pseudo-header sum of the IPv4 or IPv6 header at ip, unfolded. */
uint32_t fz_pseudo(const uint8_t *ip, uint8_t l4proto, uint32_t l4len);
/* L4 (TCP/UDP) checksum of the packet at ip, its L4 header at l4 (from ip),
 * total length len: 1 valid (or UDP over IPv4 without one), 0 not. */
int fz_l4_csum_ok(const uint8_t *ip, size_t l4, size_t len, uint8_t l4proto);
/* Writes the L4 checksum: complete, or (partial) the pseudo-header sum a
 * CHECKSUM_PARTIAL packet carries. */
void fz_l4_set_csum(uint8_t *ip, size_t l4, size_t len, uint8_t l4proto,
                    int partial);

/* ---- parsing ---- */

/* An IP packet's length (IPv4 total length with a valid header, IPv6 40 +
 * payload length), or 0; avail bytes are there. */
size_t fz_ip_len(const uint8_t *ip, size_t avail);
/* Where the L4 header of the IP packet at ip starts, its protocol, for
 * IPv4 (not a later fragment) or IPv6 without extension headers; 0 if
 * none. */
size_t fz_l4_off(const uint8_t *ip, size_t len, uint8_t *l4proto);
/* GRE header length for its flags word */
size_t fz_gre_hlen(uint16_t flags);
/* The optional GRE fields after g's flags and protocol, as tunnel t sends
 * them (RFC 2890's order): the checksum over the len bytes from g, the key,
 * the sequence number *seq_next (then advanced); `what` names the packet in
 * a failure. */
void fz_check_gre_fields(const struct tpb_tunnel_config *t, const uint8_t *g, size_t len,
                         uint32_t *seq_next, const char *what);
int fz_ecn_decap(uint8_t outer, uint8_t inner);   /* RFC 6040 fig. 4 */

/* ---- input fixing: a mutated seed stays deep enough to be interesting ---- */

/* Makes the IPv4 or IPv6 packet at ip (avail bytes) consistent: lengths
 * to fill avail, header checksum, and then, innermost first, GRE (and its
 * checksum) or IP-in-IP, and a TCP/UDP checksum (partial: the pseudo
 * sum).  Returns the innermost L4 offset from ip (0: none) and its
 * protocol and IP version, for a vnet header. */
struct fz_l4 {
    size_t off;          /* L4 header offset from the outermost IP header */
    size_t ip_off;       /* the innermost IP header's offset */
    uint8_t proto;
    uint8_t ver;
};
void fz_fix_ip(uint8_t *ip, size_t avail, int partial, struct fz_l4 *l4);
/* The L4 layout fz_fix_ip() finds in an Ethernet frame of len bytes, from
 * a copy: the frame keeps the checksums the input gave it. */
void fz_l4_of(const uint8_t *frame, size_t len, struct fz_l4 *l4);

/* ---- frames and the bridge's output ---- */

struct fz_frame {
    struct frame f;
    uint8_t *buf;          /* vnet header, then the frame: exact size */
    uint8_t *orig;         /* copy of the frame as it came in */
    struct virtio_net_hdr vh0;   /* the vnet header as it came in */
};

/* Builds f from len bytes at data: malloc(VNET_LEN + len), the frame at
 * its very end, so reading past it faults under AddressSanitizer. */
void fz_frame_new(struct fz_frame *z, const uint8_t *data, size_t len,
                  const struct virtio_net_hdr *vh, int tagged,
                  const uint8_t tag[4]);
void fz_frame_free(struct fz_frame *z);

/* How the harness makes a vnet header for a frame (2 bits of the input). */
enum { FZ_VNET_NONE, FZ_VNET_RAW, FZ_VNET_GSO, FZ_VNET_PARTIAL };
/* The vnet header of mode for the frame data (its L4 as fz_fix_ip found):
 * raw takes 10 bytes of the input, GSO a selector (bit 7: any type, bits
 * 0-2 which; bits 5-6: a size below 256 as it is) and a size. */
void fz_vnet(struct virtio_net_hdr *vh, int mode, struct fz_in *in,
             const struct fz_l4 *l4, uint32_t l2);

struct fz_out {
    int port;              /* TPB_PORT_*, -1: a lone txq */
    int qdisc;
    struct virtio_net_hdr vh;
    uint8_t *data;         /* the frame: exact size */
    size_t len;
    int refused;           /* the harness's sink refused it (fz_refuse) */
};

/* Everything txq_send() handed over since fz_outs_clear(). */
extern struct fz_out *fz_outs;
extern size_t fz_nouts;
void fz_outs_clear(void);
/* The port whose every message the sink refuses (egress_full), -1: none. */
extern int fz_refuse;
/* Routes tpb_fuzz_tx into fz_outs for this bridge (NULL: any txq, port -1). */
void fz_capture(struct tpb_bridge *br);

/* A bridge from cfg (tunnel mode if cfg->tunnel) at time now; aborts if
 * the configuration is refused. */
struct tpb_bridge *fz_bridge(const struct tpb_bridge_config *cfg, uint64_t now);
void fz_flush(struct tpb_bridge *br);

/* ---- counters ---- */

struct fz_snap {
    struct tpb_tunnel_counters tc;
    struct tpb_port_counters c[TPB_NPORTS];
};
void fz_snap(const struct tpb_bridge *br, struct fz_snap *s);
/* How many drops were counted from a to b (tunnel reasons and the ports'
 * drop_* counters); aborts if any counter went down.  *reason: the last
 * tunnel reason that moved (-1: none; a port's gso_bad: -2). */
uint64_t fz_drops(const struct fz_snap *a, const struct fz_snap *b, int *reason);
uint64_t fz_tc_drops(const struct tpb_tunnel_counters *a,
                     const struct tpb_tunnel_counters *b, int *reason);

/* ---- checks shared by harnesses ---- */

/* A frame bridged unchanged: forward()'s outcome for frame z sent out of
 * port `port`, given outs[0..n) are that port's outputs and `drops` the
 * drops counted for it (fuzz/README.md: forward).  Returns 1 if it was a
 * transit super-packet that was segmented. */
int fz_check_forward(const struct fz_frame *z, const struct fz_out *outs,
                     size_t n, uint64_t drops, uint64_t gso_bad);

/* The L2 header length of an output of frame z (its tag put back). */
static inline size_t fz_l2(const struct fz_frame *z)
{
    return FZ_ETH + (z->f.tagged ? 4 : 0);
}

/* Checks out's Ethernet header: dst, src, z's tag, type. */
void fz_check_eth(const struct fz_out *o, const struct fz_frame *z,
                  const uint8_t *dst, const uint8_t *src, uint16_t type,
                  const char *what);
int fz_vnet_zero(const struct virtio_net_hdr *vh);

static inline uint16_t fz_rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t fz_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void fz_wr16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
static inline void fz_wr32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v & 0xff;
}

/* ---- pop.c's fuzzing entries (compiled with -DTPB_FUZZ) ---- */

struct tpb_pop *tpb_fuzz_pop_open(const struct tpb_pop_config *cfg,
                                  const struct tpb_pop_peer_config *peers,
                                  const struct tpb_pop_prefix *prefixes);
void tpb_fuzz_pop_from_bridge(struct tpb_pop *pop, uint8_t *ip, size_t n,
                              uint64_t now);
int tpb_fuzz_pop_to_bridges(struct tpb_pop *pop, uint64_t now);
void tpb_fuzz_pop_from_bridge_held(struct tpb_pop *pop, uint8_t *ip, size_t n,
                                   uint64_t now);
void tpb_fuzz_pop_flush(struct tpb_pop *pop);
void tpb_fuzz_pop_keepalives(struct tpb_pop *pop, uint64_t now);
int tpb_fuzz_pop_rx(struct tpb_pop *pop, uint32_t i, struct gre_rx *out);
/* What ka_first_id() returns in fuzzing builds (csrc/gre.c). */
extern uint16_t tpb_fuzz_ka_id;
void tpb_fuzz_pop_rx_ovfl(struct tpb_pop *pop, uint32_t v);
struct sockaddr_in;
void tpb_fuzz_pop_from_udp(struct tpb_pop *pop, uint8_t *g, size_t n,
                           const struct sockaddr_in *from, uint8_t tos, uint64_t now);

#endif
