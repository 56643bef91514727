/* xsk.h — the AF_XDP backend's own types, shared by xsk.c (the loop) and
 * xsk_open.c (the XDP program, the UMEM, the sockets). */
#ifndef TPB_XSK_H
#define TPB_XSK_H

#ifndef SOL_XDP
#define SOL_XDP 283
#endif
#ifndef AF_XDP
#define AF_XDP 44
#endif
#ifndef SO_PREFER_BUSY_POLL
#define SO_PREFER_BUSY_POLL 69
#endif
#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif

#define CHUNK 4096u                  /* one frame per page: aligned mode */
#define MAX_BATCH 256
#define TX_KICKS 64                  /* sendto()s per kick, 32 frames each */
#define MAXQ TPB_XSK_MAX_QUEUES

struct xring {
    uint32_t *producer, *consumer, *flags;
    void *descs;
    uint32_t mask, size;
    uint32_t cached;                 /* our own index: prod or cons */
    void *map;
    size_t maplen;
};

/* One socket: one queue of one port. */
struct xsock {
    int fd;
    struct xring rx, tx, fill, comp;
    uint32_t tx_unsent;              /* submitted, not yet taken by the kernel */
};

struct xport {
    int ifindex;
    uint32_t mtu, nq;
    struct xsock s[MAXQ];
    int prog_fd, xsks_fd, stats_fd;
    int link_fd;                     /* the program attached: a bpf_link */
    int promisc_fd;                  /* holds the port promiscuous */
};

struct tpb_xsk {
    struct xport p[2];
    uint8_t *umem;
    size_t umem_len;
    uint64_t *free;                  /* chunk addresses nobody holds */
    uint32_t nfree, nchunks, nsocks;
    uint32_t batch, spin_us, busy_poll;
    int stopfd, ioctl_fd;
    volatile int stopping;
    volatile uint64_t heartbeat;
    struct tpb_port_counters c[2];
};

/* every socket of both ports */
#define EACH_SOCK(x, k, q) \
    for (k = 0; k < 2; k++) \
        for (q = 0; q < (x)->p[k].nq; q++)

/* xsk.c */
void xsk_refill(struct tpb_xsk *x, struct xsock *xs);
/* xsk_open.c */
uint64_t xsk_map_read(int fd, uint32_t key);

#endif
