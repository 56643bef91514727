/* pop.h — internal to `tpb pop`: its state, shared by pop.c (the loop,
 * from the bridges, configuration), pop_tx.c (toward the bridges: TUN
 * reads, super-packets split, batched sends) and pop_gro.c (toward the TUN
 * device: TCP segments coalesced into super-packets). */
#ifndef TPB_POP_H
#define TPB_POP_H

#include <pthread.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/virtio_net.h>

/* after proto.h and tpb.h (which has no include guard) */

#define MAX_BATCH 64
#define BUF_SIZE 65536
#define VNET_LEN sizeof(struct virtio_net_hdr)
#define TCP_CWR 0x80
/* The learned table: each peer may hold LEARN_PER_PEER entries (fewer
 * when many peers would make it larger than LEARN_SLOTS_MAX slots), the
 * table has twice the slots all peers may hold (a power of two), so an
 * entry finds a free slot within LEARN_PROBE of its hash.  Sized at open
 * and on reload, by the number of peers. */
#define LEARN_PER_PEER 1024u
#define LEARN_SLOTS_MIN 64u
#define LEARN_SLOTS_MAX (1u << 21)     /* 64 MiB of entries */
#define LEARN_PROBE 32
#define MAX_PEERS 4096
#define IDLE_WAKE_MS 1000      /* the loop passes at least this often */
#define RELOAD_WAIT_S 2        /* tpb_pop_reconfigure() waits this long */
#define NO_PEER UINT32_MAX
#define NSEC 1000000000ull

/* One peer's keepalive state (struct tpb_remote_state's source). */
struct ka {
    uint8_t up;                 /* answering, or keepalives off */
    uint64_t transitions, sent, unsent, received, reflected;
    uint64_t next_ns;           /* next keepalive due; 0: at once */
    uint64_t sent_ns;           /* the last one sent; 0: none yet */
    uint64_t reply_ns;          /* the last answer; 0: never */
    uint64_t rtt_ns;
    uint16_t ip_id;             /* inner IPv4 ID of our keepalives */
};

struct peer {
    struct tpb_pop_peer_config cfg;
    struct gre_tx tx;
    struct gre_rx rx;
    struct sockaddr_in sa;      /* GRE: the peer's address; GRE-in-UDP: its
                                 * endpoint (addr:4754, or a NAT'd peer's
                                 * learned address and port; port 0: none) */
    struct tpb_tunnel_counters c;
    struct ka ka;
    uint32_t learned;           /* slots of the learned table it holds */
    uint8_t udp_gso_off;        /* its path refused a UDP GSO message: one
                                 * datagram per segment until it moves */
    uint64_t from_stamp;        /* the arrival whose endpoint sa is */
};

struct learned {
    uint8_t addr[16];
    uint32_t peer;
    uint8_t used;               /* has held an entry: lookups go on past it */
    uint64_t expires;           /* 0: free */
};

/* The learned table: open addressing, an entry within LEARN_PROBE slots
 * of its hash (the first free one when it was made, so a lookup can stop
 * at a slot never used). */
struct learn_table {
    struct learned *e;
    uint32_t mask;              /* slots - 1 */
    uint32_t budget;            /* entries one peer may hold */
};

/* A new configuration, built by tpb_pop_reconfigure(), swapped in by
 * apply(); afterwards it holds the old arrays, for the caller to free. */
struct reload {
    struct peer *peers;
    struct tpb_pop_prefix *prefixes;
    uint32_t npeers, nprefixes, batch, tun_mtu;
    uint64_t learn_ns;
    uint32_t *from;             /* new peer -> old index, or NO_PEER */
    uint32_t *to;               /* old peer -> new index, or NO_PEER */
    struct learn_table learn;   /* sized for the new peers */
    int done;
};


struct tpb_pop {
    int raw, tun, stop_fd, stop;  /* stop_fd: an eventfd that wakes poll() */
    int hdrincl;                /* send-only IPPROTO_RAW: keepalives reflected as they are */
    int udp;                    /* GRE-in-UDP: bound to local:4754 */
    uint32_t local;
    uint32_t npeers, nprefixes, batch, tun_mtu;
    uint8_t tun_uso;            /* the TUN device takes UDP super-packets */
    struct peer *peers;
    struct tpb_pop_prefix *prefixes;
    struct tpb_tunnel_counters global;      /* belongs to no peer */
    struct learn_table learn;
    uint64_t learn_ns, now_ns;
    uint64_t reclaim_ns;        /* the last sweep of expired entries */
    uint32_t rx_drops;          /* the socket's drop count last seen */
    uint32_t udp_rx_drops;      /* the same, of the UDP socket */
    uint64_t ka_due_ns;         /* keepalives() has nothing to do before */
    uint64_t passes;            /* the heartbeat */
    /* reload: lock guards peers/prefixes against readers; reload_lock
     * serializes tpb_pop_reconfigure() calls */
    pthread_mutex_t lock, reload_lock;
    pthread_cond_t applied;
    int running;                /* under lock: tpb_pop_run() is looping */
    struct reload *pending;     /* under lock; read unlocked as a hint */
    /* receive side */
    struct mmsghdr rmsg[MAX_BATCH];
    struct iovec riov[MAX_BATCH];
    union {                     /* SO_RXQ_OVFL: the socket's drop count;
                                 * IP_TOS (UDP: the outer TOS, for ECN) */
        char buf[CMSG_SPACE(sizeof(uint32_t)) + CMSG_SPACE(sizeof(int)) * 2];
        struct cmsghdr align;       /* (+ UDP_GRO: the datagrams' size) */
    } rctl[MAX_BATCH];
    struct sockaddr_in rsrc[MAX_BATCH];
    uint8_t *rbuf;
    /* send side (pop_tx.c) */
    struct pop_tx *tx;
    uint8_t *sbuf;
    /* coalescing toward the TUN device (pop_gro.c) */
    struct pop_gro *gro;
};


/* pop.c */
int inner_addr(const uint8_t *ip, size_t len, int dst, uint8_t out[16]);
/* A TCP packet, not a fragment, with nothing between the IP and TCP
 * headers (IPv6: no extension header) and a payload: where its TCP header
 * starts (*l4) and how long it is (*thl, at least 20). */
int tcp_super(const uint8_t *in, size_t ilen, uint16_t proto,
              size_t *l4, size_t *thl);
struct peer *route(struct tpb_pop *pop, const uint8_t dst[16]);
void follow(struct peer *p, const struct sockaddr_in *from, uint64_t stamp);
void add_cmsg_int(struct msghdr *m, struct cmsghdr **c, int type, int v);
int tun_write(struct tpb_pop *pop, struct peer *p, uint8_t *in, size_t ilen,
              uint16_t proto);
int tun_drop(int e);
uint16_t l4_pseudo(const uint8_t *in, size_t ilen, uint16_t proto, size_t l4, uint8_t l4proto);
void learn_put(struct learned *e, struct peer *peers, const uint8_t a[16],
               uint32_t peer, uint64_t expires);

/* pop_tx.c: 8.-10., what the host routes into the TUN device, to the
 * bridges; returns how many packets it read. */
int to_bridges(struct tpb_pop *pop);
struct pop_tx *pop_tx_new(void);

/* pop_gro.c: what from_peer() accepted, on its way to the TUN device.
 * gro_verdict() before learn_check(): GRO_APPEND joins its flow's held
 * group; otherwise gro_make_way() writes that group (GRO_NONE without
 * ports: every group) first, so that the TUN device sees each flow's
 * packets in order; gro_learn_new() writes every group before a packet
 * that makes a new learned entry (then learn_check() again); then
 * GRO_START holds the packet as a new group, GRO_NONE writes it alone
 * (tun_write()).  gro_flush(): every group, at a batch's end. */
enum { GRO_NONE, GRO_START, GRO_APPEND };
struct pop_gro *pop_gro_new(void);
int gro_verdict(struct tpb_pop *pop, const struct peer *p, const uint8_t *in,
                size_t ilen, uint16_t proto);
void gro_make_way(struct tpb_pop *pop, int verdict);
int gro_learn_new(struct tpb_pop *pop, const struct learned *slot);
void gro_hold(struct tpb_pop *pop, int verdict, struct peer *p, uint8_t *in,
              size_t ilen, uint16_t proto, const struct gre_pkt *gp,
              struct learned *slot, const uint8_t a[16],
              const struct sockaddr_in *from);
void gro_flush(struct tpb_pop *pop);
uint64_t gro_stamp(struct tpb_pop *pop);

/* pop_rx.c */
int from_bridges(struct tpb_pop *pop);

/* pop_learn.c */
struct peer *by_prefix(struct tpb_pop *pop, const uint8_t dst[16]);
int learn_alloc(struct learn_table *t, uint32_t npeers);
struct learned *learn_find(const struct learn_table *t, const uint8_t a[16],
                           uint64_t now, struct learned **free_slot);
int learn_check(struct tpb_pop *pop, struct peer *p, const uint8_t a[16],
                int proto, struct learned **slot);

/* pop_ka.c */
void peer_set_up(struct peer *p, int up);
void keepalives(struct tpb_pop *pop);
int poll_timeout(const struct tpb_pop *pop);
void peer_ka_answer(struct tpb_pop *pop, struct peer *p);
int is_keepalive(const struct tpb_pop *pop, const struct peer *p,
                 const uint8_t *in, size_t ilen, uint16_t proto);
void reflect(struct tpb_pop *pop, struct peer *p, uint8_t *in, size_t ilen,
             const struct gre_pkt *g, const struct sockaddr_in *from);

/* pop_conf.c */
int check_config(const struct tpb_pop_config *cfg,
                 const struct tpb_pop_peer_config *peers,
                 const struct tpb_pop_prefix *prefixes,
                 char *err, size_t errlen);
void peer_init(struct peer *p, const struct tpb_pop_peer_config *c,
               uint32_t local);
void take_reload(struct tpb_pop *pop);

#ifdef TPB_FUZZ
/* Fuzzing builds only (fuzz/README.md): fuzz/pop.c stands in for the TUN
 * device and the sockets, and drives the loop's steps one at a time
 * (tpb_fuzz_pop_* at the end of pop.c). */
ssize_t tpb_fuzz_read(int fd, void *buf, size_t n);
ssize_t tpb_fuzz_writev(int fd, const struct iovec *iov, int iovcnt);
ssize_t tpb_fuzz_sendmsg(int fd, const struct msghdr *m, int flags);
int tpb_fuzz_sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags);
ssize_t tpb_fuzz_sendto(int fd, const void *buf, size_t n, int flags,
                        const struct sockaddr *sa, socklen_t salen);
#define read tpb_fuzz_read
#define writev tpb_fuzz_writev
#define sendmsg tpb_fuzz_sendmsg
#define sendmmsg tpb_fuzz_sendmmsg
#define sendto tpb_fuzz_sendto
#endif

#endif
