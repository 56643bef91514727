/* bridge.h — internal: the bridge's state, shared by its pipeline files
 * (bridge.c, txq.c, encap.c, segment.c, decap.c, reasm.c). */
#ifndef TPB_BRIDGE_H
#define TPB_BRIDGE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE    /* struct mmsghdr, sendmmsg */
#endif

#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <sys/socket.h>
#include <linux/virtio_net.h>

#include "tpb.h"
#include "ring.h"
#include "proto.h"

#define VNET_LEN sizeof(struct virtio_net_hdr)
#define TXQ_MAX 512            /* messages per sendmmsg flush */
#define TXQ_HDR 224            /* vnet + Ethernet + outer + inner headers */
#define TXQ_IOV 4
/* iovecs of the messages gathered from many pieces (txq_reserve_long) */
#define TXQ_XIOV 1024
#define ARENA_SIZE (1u << 20)  /* bounce buffers, valid until the flush */

/* Messages waiting to leave one port, pointing at ring slots, their own
 * header scratch, or the arena; all of it stays valid until txq_flush(). */
struct txq {
    int fd;                    /* qdisc bypassed */
    int fd_q;                  /* through the qdisc: see qdisc[] */
    struct tpb_txring ring;    /* fd's frames that fit a slot go by it */
    uint32_t ring_max;         /* the longest frame the TX ring takes */
    uint32_t mtu;              /* the port's, read every second; 0: unknown */
    int ifindex;
    struct tpb_port_counters *c;
    uint32_t n;
    struct mmsghdr msg[TXQ_MAX];
    struct iovec iov[TXQ_MAX][TXQ_IOV];
    uint8_t hdr[TXQ_MAX][TXQ_HDR];
    uint32_t len[TXQ_MAX];
    uint8_t qdisc[TXQ_MAX];      /* 1: send through fd_q */
    uint8_t *arena;
    size_t arena_used;
    struct iovec xiov[TXQ_XIOV];   /* long messages' iovecs, until sent */
    uint32_t xiov_used;
    /* What a message counts in the tunnel's counters once it has left
     * (txq_account): TXQ_ACCT_* and its inner bytes. */
    struct tpb_tunnel_counters *tc;
    uint8_t acct[TXQ_MAX];
    uint32_t acct_bytes[TXQ_MAX];
    uint16_t acct_pkts[TXQ_MAX];  /* datagrams a UDP GSO message becomes */
    uint8_t acct_broken;         /* a fragment of the packet was refused */
    uint32_t fault_skip;         /* tests: every Nth TX ring slot invalid */
    uint32_t fault_n;
#ifdef TPB_FUZZ
    uint8_t **fz_bufs;         /* txq_alloc()'s, each its own malloc() */
    uint32_t fz_nbufs, fz_cap;
#endif
};

#define TXQ_ACCT_NONE 0
#define TXQ_ACCT_ENCAP 1         /* a GRE packet, or its last fragment */
#define TXQ_ACCT_ENCAP_FRAG 2    /* a GRE packet's fragment but the last */

/* One received frame: the Ethernet header in the ring (untagged: the
 * kernel moved any outer tag into the slot header) and its tag, if any. */
struct frame {
    struct tpacket2_hdr *h;
    uint8_t *mac;
    uint32_t len;
    struct virtio_net_hdr *vh;
    int tagged;
    uint8_t tag[4];
};

enum src_kind { SRC_BRIDGE, SRC_ENCAP, SRC_FROM_OUT };

/* One stream of frames, in two rings split by length (ring.h): [0] small
 * slots, [1] big ones, merged back in arrival order by their timestamps. */
struct source {
    struct tpb_ring ring[2];
    uint8_t group_len;         /* its rings in a fanout group of this many
                                  sources, no filters (0: filters) */
    enum src_kind kind;
    int port;                  /* whose rx counters */
    int to;                    /* the port it sends out of */
};

/* plain: --in, --out; tunnel: --in's two ways (bridge_open.c), each
 * split by the mark, and --out */
#define TPB_MAX_SOURCES 5

struct reasm;                  /* reasm.c */

/* keepalive.c: one POP of `remote`, its keepalive state and the sequence
 * window of what it sends us. */
struct remote {
    uint32_t addr;
    struct gre_rx grx;
    uint8_t up;
    uint16_t ka_id;            /* inner IP ID of the last keepalive sent */
    uint64_t sent_ns;          /* when it was sent */
    uint64_t reply_ns;         /* last answer (or when the clock started) */
    struct tpb_remote_state st;   /* counters Python reads */
};

/* segment.c: forward()'s state while it segments a tunnel's super-packet. */
struct transit {
    struct txq *q;
    size_t olen;               /* outer IP (+ GRE) header bytes */
    size_t gre_off;            /* GRE header offset in them, 0: IP-in-IP */
    uint32_t k;                /* the next segment's number */
};

/* udpgso.c: the GRE-in-UDP UDP GSO message being built from one
 * super-packet's segments. */
/* include/linux/udp.h: what the kernel takes in one UDP GSO message
 * (UDP_MAX_SEGMENTS, 64 before Linux 6.10, 128 after). */
#define UGSO_MAX_SEGS 64u

struct ugso {
    uint8_t *buf;              /* NULL: off (GRE, or a kernel without USO) */
    size_t used;               /* payload bytes (GRE + inner) so far */
    size_t bused;              /* of them in buf (the rest in the ring) */
    /* the message: headers, then each datagram's GRE and inner headers
     * (in buf) and its payload (in the ring, or buf) */
    struct iovec iov[1 + 2 * UGSO_MAX_SEGS];
    uint32_t niov;
    size_t seg;                /* every datagram's payload but the last */
    uint32_t n;                /* datagrams */
    uint32_t ibytes;           /* inner bytes, for encap_bytes */
    uint16_t proto;
    size_t ilen0;
    uint8_t inner0[64];        /* the first inner header: outer fields, sport */
};

/* shed.c: overload shedding on one port (see there) */
#define SHED_TICK_NS 10000000ull      /* the controller's period: 10 ms */
struct shed {
    int ifindex;
    int map_fd, prog_fd, link_fd;     /* -1: none; link_fd >= 0: shedding */
    uint64_t *map;                    /* the BPF array, mmapped */
    struct tpb_port_counters *c;      /* the port's */
    int refused;                      /* could not load or attach: never again */
    int spell;                        /* ticks of ring drops in a row */
    uint64_t rate;                    /* frames admitted per tick */
    uint64_t shed_ns;                 /* when it last shed a frame */
    uint64_t last_kdrops, last_rx;
};
void shed_init(struct shed *s, int ifindex);
int shed_load(struct shed *s, char *err, size_t errlen);
void shed_free(struct shed *s);
void shed_tick(struct shed *s, uint64_t now_ns, int queued);

struct tpb_bridge {
    struct source src[TPB_MAX_SOURCES];
    int nsrc;
    int txfd_in;               /* tunnel mode: the socket that sends out --in */
    int gsofd[TPB_NPORTS];     /* per port: super-packets go out through it */
    struct txq q[TPB_NPORTS];
    struct tpb_port_counters c[TPB_NPORTS];
    uint32_t batch;
    uint32_t spin_us;
    int stop_fd;
    int stop;
    /* tunnel */
    int tunnel;
    int sel_ifindex;
    uint32_t mark;
    struct tpb_tunnel_config cfg;
    struct tpb_tunnel_counters tc;
    struct gre_tx gtx;         /* toward the active remote */
    struct remote remote[TPB_MAX_REMOTES];
    uint32_t nremotes;
    int active;                /* index into remote[], -1: none up */
    uint64_t ka_due_ns;        /* next round of keepalives */
    uint8_t hop[12];           /* --out's next hop and our source MAC ... */
    uint8_t hop_tag[4];        /* ... and VLAN tag, from --in's IPv4 frames */
    int hop_tagged;
    int have_hop;
    size_t overhead;           /* outer IPv4 + GRE */
    int mtu_ok;                /* cfg.mtu (--out's, followed) carries the tunnel */
    uint16_t mss4, mss6;       /* clamps for IPv4 / IPv6 inner TCP */
    uint8_t router_mac[6];     /* the in-side router, learned or pinned */
    int have_router_mac;
    double icmp_tokens;
    uint64_t icmp_last_ns;
    double echo_tokens;        /* echo replies: a bucket of their own */
    uint64_t echo_last_ns;
    struct reasm *reasm;
    struct transit transit;
    struct ugso ugso;
    uint64_t now_ns;           /* refreshed once per loop pass */
    uint64_t passes;           /* the heartbeat */
    int wake_fd;               /* reconfigure wakes the loop */
    int running;
    struct tpb_bridge_config *pending;   /* reconfigure's, under stats_lock */
    uint64_t applied;          /* reconfigurations taken by the loop */
    pthread_cond_t applied_cv;
    uint64_t mtu_checked_ns;
    struct shed shed[TPB_NPORTS];
    int shed_on;                      /* cfg.shed, one loop, loaded */
    uint64_t shed_tick_ns;
    char shed_err[256];               /* why shedding could not be loaded */
    pthread_mutex_t stats_lock;
};

/* bridge.c, bridge_open.c: frames taken per ring before each flush (at
 * most), and a new configuration swapped in between passes */
#define MAX_BATCH 256
void apply_pending(struct tpb_bridge *br);

/* txq.c */
int txq_init(struct txq *q, int fd, int fd_q, int ifindex,
             struct tpb_port_counters *c);
void txq_free(struct txq *q);
void txq_check_mtu(struct txq *q);
int txq_bypass(struct txq *q, int on);
uint32_t txq_reserve(struct txq *q);
uint32_t txq_reserve_long(struct txq *q, uint32_t niov);
uint8_t *txq_alloc(struct txq *q, size_t len);
void txq_commit(struct txq *q, uint32_t i, int niov);
void txq_commit_queued(struct txq *q, uint32_t i, int niov);
/* Message i, once sent, counts as one encapsulated packet of `bytes` inner
 * bytes (kind TXQ_ACCT_ENCAP), or as a fragment of one (the packet counts
 * when its last fragment leaves, and not if any fragment was refused). */
void txq_account(struct txq *q, uint32_t i, uint8_t kind, uint32_t bytes);
/* The same for a message that leaves as `packets` packets (UDP GSO). */
void txq_account_n(struct txq *q, uint32_t i, uint8_t kind, uint32_t bytes,
                   uint32_t packets);
void txq_flush(struct txq *q);
void txq_bridge(struct txq *q, const struct frame *f);
/* txq.c's senders, and txring.c's path past the qdisc */
void txq_count_refused(struct tpb_port_counters *c, int e);
void txq_send_mmsg(struct txq *q, int fd, uint32_t i, uint32_t end);
void txring_send(struct txq *q, uint32_t i, uint32_t end);
size_t eth_write(uint8_t *out, const uint8_t *dst, const uint8_t *src,
                 const struct frame *f, uint16_t type);

#ifdef TPB_FUZZ
/* Fuzzing builds only (fuzz/README.md): no socket is opened; every message
 * txq_send() would send goes to this sink instead, and counts as sent if
 * it returns 1, as refused (egress_full, as ENOBUFS) if 0. */
extern int (*tpb_fuzz_tx)(struct txq *q, uint32_t i);
/* A bridge without sockets or rings (tunnel mode if cfg->tunnel), its
 * clock at now_ns; NULL if cfg is refused.  tpb_bridge_close() frees it. */
struct tpb_bridge *tpb_fuzz_bridge_open(const struct tpb_bridge_config *cfg,
                                        uint64_t now_ns);
/* What a live reload does between passes (tunnel mode). */
void tpb_fuzz_bridge_reconfigure(struct tpb_bridge *br,
                                 const struct tpb_tunnel_config *t);
#endif

/* encap.c */
/* The smallest --out MTU that carries the tunnel with this overhead. */
size_t encap_min_mtu(size_t overhead);
/* --out's MTU, at open, on reload and whenever txq_check_mtu() finds it
 * changed: the fragment size, the ICMP next-hop MTU and the MSS clamp
 * follow it; below encap_min_mtu() selected frames are dropped. */
void encap_mtu(struct tpb_bridge *br, uint32_t mtu);
void learn_router(struct tpb_bridge *br, const struct frame *f);
void encap_frame(struct tpb_bridge *br, struct frame *f);
int clamp_mss(struct tpb_bridge *br, uint8_t *ip, size_t len, uint16_t proto,
              int partial);

/* segment.c */
struct inner {               /* an inner packet in two pieces */
    uint8_t *hdr;            /* IP (+ L4) header, or the whole packet */
    size_t hlen;
    const uint8_t *data;     /* payload slice, may be empty */
    size_t dlen;
    uint16_t proto;          /* ETYPE_IPV4 / ETYPE_IPV6 */
};
typedef void (*inner_fn)(struct tpb_bridge *br, struct frame *f,
                         struct inner *p);
/* Cuts a super-packet into gso_size segments, headers in q's arena; returns
 * how many, or -1 if it cannot be segmented (the caller counts it). */
int segment(struct tpb_bridge *br, struct txq *q, struct frame *f, uint8_t *ip,
            size_t len, uint16_t proto, const struct virtio_net_hdr *vh,
            inner_fn emit);
/* Bridges a frame out of q unchanged; a tunnel's super-packet segmented. */
void forward(struct tpb_bridge *br, struct txq *q, struct frame *f);

/* encap.c: one inner packet to the tunnel, fragmented or refused with an
 * ICMP too big if it does not fit --out's MTU. */
void encap_fit(struct tpb_bridge *br, struct frame *f, struct inner *p);

/* udpgso.c */
int ugso_init(struct tpb_bridge *br);
void ugso_free(struct tpb_bridge *br);
void ugso_add(struct tpb_bridge *br, struct frame *f, struct inner *p);
void ugso_flush(struct tpb_bridge *br, struct frame *f);

/* coalesce.c: the pieces of a UDP GSO super-packet into one inner TCP
 * super-packet, delivered (1), or nothing done as they cannot merge (0). */
int udp_gso_coalesce(struct tpb_bridge *br, struct remote *r, struct frame *f,
                     uint8_t *ip, size_t tot, size_t seg);
/* decap.c: an inner packet out of --in, its vnet header's offsets counted
 * from the inner packet. */
int decap_deliver_inner(struct tpb_bridge *br, struct frame *f,
                        const struct iovec *pkt, uint32_t npkt, size_t ilen,
                        const struct virtio_net_hdr *vh);

/* keepalive.c */
void ka_setup(struct tpb_bridge *br, const struct tpb_tunnel_config *t);
void ka_learn_hop(struct tpb_bridge *br, const struct frame *f);
void ka_tick(struct tpb_bridge *br);
int ka_timeout_ms(const struct tpb_bridge *br, int max_ms);
struct remote *ka_remote(struct tpb_bridge *br, uint32_t addr);
void ka_answer(struct tpb_bridge *br, struct remote *r, const uint8_t *inner_ip);
int ka_reflect(struct tpb_bridge *br, struct frame *f, struct remote *r,
               const uint8_t *in, size_t ilen);
void tunnel_down(struct tpb_bridge *br, struct frame *f);

/* decap.c */
void from_out_frame(struct tpb_bridge *br, struct frame *f);

/* reasm.c */
struct reasm *reasm_new(uint32_t memory, uint32_t timeout_ms);
void reasm_free(struct reasm *r);
/* Takes one outer IPv4 fragment (ip4_check'd, len its total length); a
 * first fragment (offset 0) must have passed the caller's GRE checks, as
 * it makes its datagram verified.  Returns the whole datagram (in the txq
 * arena) when this fragment completed it, else NULL. */
uint8_t *reasm_add(struct reasm *r, struct tpb_tunnel_counters *tc,
                   struct txq *q, const uint8_t *ip, size_t len,
                   uint64_t now_ns, size_t *out_len);
/* Drops, uncounted, the datagram the fragment at ip belongs to (the caller
 * counts why: a first fragment that failed its GRE checks). */
void reasm_forget(struct reasm *r, struct tpb_tunnel_counters *tc,
                  const uint8_t *ip);
void reasm_limits(struct reasm *r, uint32_t memory, uint32_t timeout_ms);
void reasm_expire(struct reasm *r, struct tpb_tunnel_counters *tc,
                  uint64_t now_ns);
/* The memory the datagrams held now account for, recomputed from them:
 * always equal to tc->reasm_memory (checked after every fragment when
 * built with -DTPB_DEBUG; for a fuzz harness). */
size_t reasm_memory_held(const struct reasm *r);
#ifdef TPB_FUZZ
/* How many datagrams are in progress (fuzz/: evictions are at most that). */
size_t reasm_datagrams(const struct reasm *r);
#endif

#endif
