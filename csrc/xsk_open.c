/* xsk_open.c — the AF_XDP backend set up and taken down (stages 1. and
 * 2. of xsk.c's list): the XDP program assembled and attached as a
 * bpf_link, its XSKMAP and statistics map, one UMEM shared by every
 * socket of both ports (XDP_SHARED_UMEM), each socket's rings mapped, busy
 * polling set where asked.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_link.h>
#include <linux/if_packet.h>
#include <linux/if_xdp.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include "bpf.h"
#include "ring.h"
#include "tpb.h"
#include "xsk.h"

/* 1. ------------------------------------------------------------------ */

/* return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_ABORTED) ==
 *        XDP_REDIRECT ? XDP_REDIRECT : (stats[0]++, XDP_DROP); */
static int xdp_prog(int xsks_fd, int stats_fd, char *log, size_t loglen)
{
    struct bpf_insn p[] = {
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_6, BPF_REG_1, 0, 0),
        INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_2, BPF_REG_6,
             offsetof(struct xdp_md, rx_queue_index), 0),
        INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, xsks_fd),
        INSN(0, 0, 0, 0, 0),
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_3, 0, 0, XDP_ABORTED),
        INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_redirect_map),
        INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 10, XDP_REDIRECT),
        INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -4, 0),
        INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0),
        INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -4),
        INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, stats_fd),
        INSN(0, 0, 0, 0, 0),
        INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
        INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 2, 0),
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_1, 0, 0, 1),
        INSN(BPF_STX | BPF_ATOMIC | BPF_DW, BPF_REG_0, BPF_REG_1, 0, BPF_ADD),
        INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, XDP_DROP),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    };

    return bpf_load_xdp(p, sizeof(p) / sizeof(p[0]), "tpb_xsk", log, loglen);
}

static int map_update(int fd, uint32_t key, const void *value)
{
    union bpf_attr a;

    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)fd;
    a.key = (uint64_t)(uintptr_t)&key;
    a.value = (uint64_t)(uintptr_t)value;
    return bpf_call(BPF_MAP_UPDATE_ELEM, &a);
}

uint64_t xsk_map_read(int fd, uint32_t key)
{
    union bpf_attr a;
    uint64_t v = 0;

    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)fd;
    a.key = (uint64_t)(uintptr_t)&key;
    a.value = (uint64_t)(uintptr_t)&v;
    return bpf_call(BPF_MAP_LOOKUP_ELEM, &a) == 0 ? v : 0;
}

/* 2. ------------------------------------------------------------------ */

static int ring_map(struct xring *r, int fd, const struct xdp_ring_offset *o,
                    uint32_t size, size_t desc, off_t pgoff)
{
    r->maplen = o->desc + size * desc;
    r->map = mmap(NULL, r->maplen, PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_POPULATE, fd, pgoff);
    if (r->map == MAP_FAILED) {
        r->map = NULL;
        return -errno;
    }
    r->producer = (uint32_t *)((uint8_t *)r->map + o->producer);
    r->consumer = (uint32_t *)((uint8_t *)r->map + o->consumer);
    r->flags = (uint32_t *)((uint8_t *)r->map + o->flags);
    r->descs = (uint8_t *)r->map + o->desc;
    r->size = size;
    r->mask = size - 1;
    return 0;
}

/* Socket q of port k; the very first one registers the UMEM, every other
 * shares it. */
static int sock_open(struct tpb_xsk *x, int k, uint32_t q, const struct tpb_xsk_config *cfg,
                     char *err, size_t errlen)
{
    struct xport *p = &x->p[k];
    struct xsock *xs = &p->s[q];
    struct xdp_mmap_offsets off;
    struct sockaddr_xdp sa;
    socklen_t ol = sizeof(off);
    uint32_t n = cfg->ring_size, nfill = 2 * n;
    int first = k == 0 && q == 0, rc;

    xs->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (xs->fd < 0) {
        snprintf(err, errlen, "AF_XDP socket: %s", strerror(errno));
        return -1;
    }
    if (first) {
        struct xdp_umem_reg reg;

        memset(&reg, 0, sizeof(reg));
        reg.addr = (uint64_t)(uintptr_t)x->umem;
        reg.len = x->umem_len;
        reg.chunk_size = CHUNK;
        if (setsockopt(xs->fd, SOL_XDP, XDP_UMEM_REG, &reg, sizeof(reg)) < 0) {
            snprintf(err, errlen, "XDP_UMEM_REG: %s", strerror(errno));
            return -1;
        }
    }
    /* The fill ring twice the RX ring (as the kernel's xdpsock sample
     * has it): when the loop falls behind, the RX ring fills first and the
     * kernel stops taking chunks (__xsk_rcv takes a chunk, then fails to
     * queue it, and keeps it for the next frame), so the excess is counted
     * rx_ring_full, congestion; with rings of one size the fill ring ran
     * dry at the same frame and every later one counted fill_empty, which
     * is kept for a real shortage of chunks. */
    if (setsockopt(xs->fd, SOL_XDP, XDP_UMEM_FILL_RING, &nfill, sizeof(nfill)) < 0 ||
        setsockopt(xs->fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &n, sizeof(n)) < 0 ||
        setsockopt(xs->fd, SOL_XDP, XDP_RX_RING, &n, sizeof(n)) < 0 ||
        setsockopt(xs->fd, SOL_XDP, XDP_TX_RING, &n, sizeof(n)) < 0 ||
        getsockopt(xs->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &ol) < 0) {
        snprintf(err, errlen, "AF_XDP rings of %u: %s", n, strerror(errno));
        return -1;
    }
    /* The fill and completion rings are mapped before bind(): after it
     * they belong to the buffer pool and cannot be mapped any more. */
    if ((rc = ring_map(&xs->rx, xs->fd, &off.rx, n, sizeof(struct xdp_desc),
                       XDP_PGOFF_RX_RING)) < 0 ||
        (rc = ring_map(&xs->tx, xs->fd, &off.tx, n, sizeof(struct xdp_desc),
                       XDP_PGOFF_TX_RING)) < 0 ||
        (rc = ring_map(&xs->fill, xs->fd, &off.fr, nfill, sizeof(uint64_t),
                       XDP_UMEM_PGOFF_FILL_RING)) < 0 ||
        (rc = ring_map(&xs->comp, xs->fd, &off.cr, n, sizeof(uint64_t),
                       XDP_UMEM_PGOFF_COMPLETION_RING)) < 0) {
        snprintf(err, errlen, "AF_XDP ring mmap: %s", strerror(-rc));
        return -1;
    }
    if (cfg->busy_poll_us) {
        int one = 1, us = (int)cfg->busy_poll_us, budget = (int)x->batch;

        if (setsockopt(xs->fd, SOL_SOCKET, SO_PREFER_BUSY_POLL, &one, sizeof(one)) < 0 ||
            setsockopt(xs->fd, SOL_SOCKET, SO_BUSY_POLL, &us, sizeof(us)) < 0 ||
            setsockopt(xs->fd, SOL_SOCKET, SO_BUSY_POLL_BUDGET, &budget, sizeof(budget)) < 0) {
            snprintf(err, errlen, "AF_XDP busy polling: %s", strerror(errno));
            return -1;
        }
    }
    memset(&sa, 0, sizeof(sa));
    sa.sxdp_family = AF_XDP;
    sa.sxdp_ifindex = (uint32_t)p->ifindex;
    sa.sxdp_queue_id = q;
    if (first) {
        /* The kernel picks zero-copy where the driver has it, copy
         * otherwise (veth); tpb_xsk_zerocopy() says which.  The other
         * sockets inherit the mode: flags are refused with SHARED_UMEM. */
        sa.sxdp_flags = XDP_USE_NEED_WAKEUP | (cfg->force_copy ? XDP_COPY : 0);
    } else {
        sa.sxdp_flags = XDP_SHARED_UMEM;
        sa.sxdp_shared_umem_fd = (uint32_t)x->p[0].s[0].fd;
    }
    if (bind(xs->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        char name[IF_NAMESIZE] = "?";

        if_indextoname((unsigned)p->ifindex, name);
        snprintf(err, errlen, "AF_XDP bind to %s queue %u: %s", name, q, strerror(errno));
        return -1;
    }
    if (map_update(p->xsks_fd, q, &xs->fd) < 0) {
        snprintf(err, errlen, "XSKMAP update: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static int port_open(struct tpb_xsk *x, int k, const struct tpb_xsk_config *cfg,
                     char *err, size_t errlen)
{
    static char log[4096];
    struct xport *p = &x->p[k];
    uint32_t q;

    p->ifindex = cfg->ifindex[k];
    p->nq = cfg->queues[k];
    p->xsks_fd = bpf_map_new(BPF_MAP_TYPE_XSKMAP, 4, MAXQ, 0);
    p->stats_fd = bpf_map_new(BPF_MAP_TYPE_ARRAY, 8, 1, 0);
    if (p->xsks_fd < 0 || p->stats_fd < 0) {
        snprintf(err, errlen, "BPF map for AF_XDP: %s", strerror(errno));
        return -1;
    }
    for (q = 0; q < p->nq; q++)
        if (sock_open(x, k, q, cfg, err, errlen) < 0)
            return -1;
    log[0] = 0;
    p->prog_fd = xdp_prog(p->xsks_fd, p->stats_fd, log, sizeof(log));
    if (p->prog_fd < 0) {
        snprintf(err, errlen, "XDP program load: %s%s%.120s", strerror(errno),
                 log[0] ? ": " : "", log);
        return -1;
    }
    p->mtu = port_mtu(x->ioctl_fd, p->ifindex);
    /* A bridge port takes every frame, not only those to its MAC.  A
     * packet socket of protocol 0 receives nothing; its membership is the
     * kernel's promiscuity count, dropped when the socket closes. */
    struct packet_mreq mr = { .mr_ifindex = p->ifindex, .mr_type = PACKET_MR_PROMISC };
    p->promisc_fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (p->promisc_fd < 0 ||
        setsockopt(p->promisc_fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof(mr)) < 0) {
        snprintf(err, errlen, "promiscuous mode: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* Attached as a bpf_link (BPF_LINK_CREATE), not through netlink: the link
 * is the file descriptor's, so the kernel detaches the program when the
 * process ends however it ends (kill -9 included), and a port that has a
 * program already is refused (EBUSY) rather than taken over. */
static int port_attach(struct xport *p, char *err, size_t errlen)
{
    char name[IF_NAMESIZE] = "?";

    p->link_fd = bpf_link_xdp(p->prog_fd, p->ifindex, XDP_FLAGS_DRV_MODE);
    if (p->link_fd >= 0)
        return 0;
    if_indextoname((unsigned)p->ifindex, name);
    snprintf(err, errlen, "%s: attaching the XDP program in driver mode: %s%s", name,
             strerror(errno),
             errno == EBUSY || errno == EEXIST ? " (the port has an XDP program already)"
             : errno == EINVAL ? " (on veth: the peer's MTU too large for XDP?)"
             : errno == EOPNOTSUPP ? " (the driver has no native XDP)" : "");
    return -1;
}

void tpb_xsk_close(struct tpb_xsk *x)
{
    int k, q;

    if (!x)
        return;
    for (k = 1; k >= 0; k--) {
        struct xport *p = &x->p[k];

        if (p->link_fd >= 0)
            close(p->link_fd);           /* detaches: frames go to the stack */
    }
    for (k = 1; k >= 0; k--) {
        struct xport *p = &x->p[k];

        /* The sharing sockets first: the UMEM was registered on p[0].s[0]. */
        for (q = MAXQ - 1; q >= 0; q--) {
            struct xsock *xs = &p->s[q];
            struct xring *r[4] = { &xs->rx, &xs->tx, &xs->fill, &xs->comp };

            for (int i = 0; i < 4; i++)
                if (r[i]->map)
                    munmap(r[i]->map, r[i]->maplen);
            if (xs->fd >= 0)
                close(xs->fd);
        }
        if (p->prog_fd >= 0)
            close(p->prog_fd);
        if (p->xsks_fd >= 0)
            close(p->xsks_fd);
        if (p->stats_fd >= 0)
            close(p->stats_fd);
        if (p->promisc_fd >= 0)
            close(p->promisc_fd);
    }
    if (x->umem)
        munmap(x->umem, x->umem_len);
    if (x->stopfd >= 0)
        close(x->stopfd);
    if (x->ioctl_fd >= 0)
        close(x->ioctl_fd);
    free(x->free);
    free(x);
}


struct tpb_xsk *tpb_xsk_open(const struct tpb_xsk_config *cfg, char *err, size_t errlen)
{
    struct tpb_xsk *x;
    uint32_t n = cfg->ring_size, i, q;
    int k;

    if (n < 64 || n > 16384 || (n & (n - 1))) {
        snprintf(err, errlen, "AF_XDP ring size %u: a power of two, 64-16384", n);
        return NULL;
    }
    for (i = 0; i < 2; i++)
        if (cfg->queues[i] < 1 || cfg->queues[i] > MAXQ) {
            snprintf(err, errlen, "AF_XDP: %u receive queues on a port: 1-%d", cfg->queues[i],
                     MAXQ);
            return NULL;
        }
    x = calloc(1, sizeof(*x));
    if (!x) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    x->stopfd = x->ioctl_fd = -1;
    for (i = 0; i < 2; i++) {
        x->p[i].prog_fd = x->p[i].xsks_fd = x->p[i].stats_fd = x->p[i].promisc_fd = -1;
        x->p[i].link_fd = -1;
        for (q = 0; q < MAXQ; q++)
            x->p[i].s[q].fd = -1;
    }
    x->batch = cfg->batch < 1 ? 1 : cfg->batch > MAX_BATCH ? MAX_BATCH : cfg->batch;
    x->spin_us = cfg->spin_us;
    x->busy_poll = cfg->busy_poll_us;
    x->nsocks = cfg->queues[0] + cfg->queues[1];
    /* Every ring of every socket full at once: the fill ring (2n), the
     * RX, TX and completion rings (n each). */
    x->nchunks = 5 * n * x->nsocks;
    x->umem_len = (size_t)x->nchunks * CHUNK;
    x->umem = mmap(NULL, x->umem_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (x->umem == MAP_FAILED) {
        x->umem = NULL;
        snprintf(err, errlen, "UMEM of %zu bytes: %s", x->umem_len, strerror(errno));
        goto fail;
    }
    x->free = calloc(x->nchunks, sizeof(uint64_t));
    x->stopfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    x->ioctl_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (!x->free || x->stopfd < 0 || x->ioctl_fd < 0) {
        snprintf(err, errlen, "AF_XDP set-up: %s", strerror(errno));
        goto fail;
    }
    for (i = 0; i < x->nchunks; i++)
        x->free[x->nfree++] = (uint64_t)(x->nchunks - 1 - i) * CHUNK;
    for (i = 0; i < 2; i++)
        if (port_open(x, (int)i, cfg, err, errlen) < 0)
            goto fail;
    /* Every fill ring stocked before a program goes on: a frame that comes
     * before the loop runs must find a chunk, or the kernel drops it
     * (rx_fill_ring_empty_descs); the RX ring then holds it. */
    EACH_SOCK(x, k, q)
        xsk_refill(x, &x->p[k].s[q]);
    for (i = 0; i < 2; i++)
        if (port_attach(&x->p[i], err, errlen) < 0)
            goto fail;
    return x;
fail:
    tpb_xsk_close(x);
    return NULL;
}

int tpb_xsk_zerocopy(struct tpb_xsk *x)
{
    struct xdp_options o = { 0 };
    socklen_t ol = sizeof(o);

    if (getsockopt(x->p[0].s[0].fd, SOL_XDP, XDP_OPTIONS, &o, &ol) < 0)
        return -errno;
    return (o.flags & XDP_OPTIONS_ZEROCOPY) != 0;
}
