/* xsk.c — the AF_XDP backend (`backend = "afxdp"`): plain bridging of
 * every frame from one port out of the other through one UMEM.
 *
 * A frame passes these stages, in the order the functions below appear:
 *   1. the XDP program (xdp_prog) on the port, in the driver's receive
 *      path: bpf_redirect_map() to the port's AF_XDP socket, by the queue
 *      it came in on; a frame on a queue with no socket is dropped there
 *      and counted (drop_no_socket);
 *   2. the kernel copies it (or, on a zero-copy driver, DMAs it) into a
 *      UMEM chunk the fill ring offered, and puts its descriptor on the
 *      socket's RX ring;
 *   3. forward()  takes RX descriptors, checks each (a runt, longer than
 *                 the other port's MTU: dropped and counted) and moves the
 *                 descriptor as it is to the other port's socket's TX
 *                 ring: both sockets share the UMEM (XDP_SHARED_UMEM), so
 *                 no byte is copied in user space;
 *   4. recycle()  completion-ring addresses (frames sent, or dropped by
 *                 the egress device) go to the free list, and xsk_refill()
 *                 puts free chunks into every socket's fill ring;
 *   5. kick()     sendto() on the TX side's socket: in copy mode the kernel
 *                 transmits from the TX ring inside that call, at most 32
 *                 frames a time (hence the loop);
 *   6. run()      go round; when nothing moved, spin briefly, then sleep in
 *                 poll() on both sockets and the stop fd; every second the
 *                 ports' MTUs are read again.
 *
 * Kernel side: Documentation/networking/af_xdp.rst.  Each socket has its
 * own fill and completion rings although they share one UMEM, because the
 * ports are different devices (af_xdp.rst, "XDP_SHARED_UMEM bind flag").
 * The XDP program is assembled here by hand: eighteen instructions need
 * no compiler or libbpf.  It is attached as a bpf_link (port_attach), so
 * the kernel takes it off the port when TPB's process ends, however.
 * Stages 1. and 2., and opening and closing: xsk_open.c.
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

#include "ring.h"
#include "tpb.h"
#include "xsk.h"

/* 3. ------------------------------------------------------------------ */

static inline uint32_t cons_avail(struct xring *r, uint32_t max)
{
    uint32_t n = __atomic_load_n(r->producer, __ATOMIC_ACQUIRE) - r->cached;

    return n < max ? n : max;
}

static inline void cons_release(struct xring *r, uint32_t n)
{
    r->cached += n;
    __atomic_store_n(r->consumer, r->cached, __ATOMIC_RELEASE);
}

static inline uint32_t prod_room(struct xring *r)
{
    return r->size - (r->cached - __atomic_load_n(r->consumer, __ATOMIC_ACQUIRE));
}

static inline void prod_submit(struct xring *r, uint32_t n)
{
    r->cached += n;
    __atomic_store_n(r->producer, r->cached, __ATOMIC_RELEASE);
}

static inline int tagged(const uint8_t *f)
{
    uint16_t t = (uint16_t)(f[12] << 8 | f[13]);

    return t == ETH_P_8021Q || t == ETH_P_8021AD;
}

/* From socket q of port `from` to the other port's socket of the same
 * queue number (or queue 0): a flow the peer hashes to one queue stays on
 * one TX ring, in order. */
static uint32_t forward(struct tpb_xsk *x, int from, uint32_t q)
{
    struct xport *pin = &x->p[from], *pout = &x->p[from ^ 1];
    struct xsock *in = &pin->s[q], *out = &pout->s[q < pout->nq ? q : 0];
    struct tpb_port_counters *ci = &x->c[from], *co = &x->c[from ^ 1];
    struct xdp_desc *rxd = in->rx.descs, *txd = out->tx.descs;
    uint32_t n = cons_avail(&in->rx, x->batch), room = prod_room(&out->tx), i, sent = 0;
    uint32_t max = pout->mtu + ETH_HLEN;

    for (i = 0; i < n; i++) {
        struct xdp_desc *d = &rxd[(in->rx.cached + i) & in->rx.mask];
        const uint8_t *f = x->umem + d->addr;

        ci->rx_frames++;
        ci->rx_bytes += d->len;
        if (d->len < ETH_HLEN) {
            ci->drop_truncated++;
        } else if (pout->mtu && d->len > max + (tagged(f) ? 4 : 0)) {
            co->drop_too_big++;          /* as AF_PACKET counts EMSGSIZE */
        } else if (sent == room) {
            co->drop_egress_full++;      /* the TX ring is full */
        } else {
            txd[(out->tx.cached + sent) & out->tx.mask] = *d;
            sent++;
            co->tx_frames++;
            co->tx_bytes += d->len;
            continue;
        }
        x->free[x->nfree++] = d->addr & ~(uint64_t)(CHUNK - 1);
    }
    if (n)
        cons_release(&in->rx, n);
    if (sent) {
        prod_submit(&out->tx, sent);
        out->tx_unsent += sent;
    }
    return n;
}

/* 4. ------------------------------------------------------------------ */

static void recycle(struct tpb_xsk *x, struct xsock *xs)
{
    uint32_t n = cons_avail(&xs->comp, xs->comp.size), i;
    const uint64_t *a = xs->comp.descs;

    for (i = 0; i < n; i++)
        x->free[x->nfree++] = a[(xs->comp.cached + i) & xs->comp.mask] & ~(uint64_t)(CHUNK - 1);
    if (n)
        cons_release(&xs->comp, n);
}

void xsk_refill(struct tpb_xsk *x, struct xsock *xs)
{
    uint32_t room = prod_room(&xs->fill), share = x->nfree / x->nsocks + 1, i;
    uint64_t *a = xs->fill.descs;

    /* A share of the free chunks at most: the other fill rings need some. */
    if (room > share)
        room = share;
    if (room > x->nfree)
        room = x->nfree;
    for (i = 0; i < room; i++)
        a[(xs->fill.cached + i) & xs->fill.mask] = x->free[--x->nfree];
    if (room)
        prod_submit(&xs->fill, room);
}

/* 5. ------------------------------------------------------------------ */

static void kick(struct tpb_xsk *x, int k, struct xsock *xs)
{
    int i;

    for (i = 0; i < TX_KICKS && xs->tx_unsent; i++) {
        uint32_t before = __atomic_load_n(xs->tx.consumer, __ATOMIC_ACQUIRE), taken;
        int rc = (int)sendto(xs->fd, NULL, 0, MSG_DONTWAIT, NULL, 0);
        int e = rc < 0 ? errno : 0;
        uint32_t now = __atomic_load_n(xs->tx.consumer, __ATOMIC_ACQUIRE);

        taken = now - before;
        xs->tx_unsent = xs->tx.cached - now;
        if (e == EBUSY && taken) {
            /* The device dropped the last frame taken (NET_XMIT_DROP):
             * its chunk comes back on the completion ring as if sent. */
            struct xdp_desc *d = &((struct xdp_desc *)xs->tx.descs)[(now - 1) & xs->tx.mask];

            x->c[k].tx_frames--;
            x->c[k].tx_bytes -= d->len;
            x->c[k].drop_egress_full++;
            continue;
        }
        if (e == EAGAIN || e == EBUSY || e == ENOBUFS) {
            recycle(x, xs);              /* a full completion ring stops it */
            if (!taken)
                break;
            continue;
        }
        if (e)
            break;                       /* ENETDOWN ...: they wait */
    }
    x->c[k].batches++;
}

/* 6. ------------------------------------------------------------------ */

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int tpb_xsk_run(struct tpb_xsk *x)
{
    uint64_t idle_since = 0, last_mtu = now_ns();
    struct pollfd pf[2 * MAXQ + 1];
    uint32_t q, npf = 0;
    int k;

    EACH_SOCK(x, k, q) {
        pf[npf++] = (struct pollfd){ .fd = x->p[k].s[q].fd, .events = POLLIN };
        xsk_refill(x, &x->p[k].s[q]);
    }
    pf[npf++] = (struct pollfd){ .fd = x->stopfd, .events = POLLIN };
    while (!x->stopping) {
        uint32_t moved = 0, unsent = 0;

        x->heartbeat++;
        EACH_SOCK(x, k, q) {
            recycle(x, &x->p[k].s[q]);
            xsk_refill(x, &x->p[k].s[q]);
        }
        EACH_SOCK(x, k, q)
            moved += forward(x, k, q);
        EACH_SOCK(x, k, q)
            if (x->p[k].s[q].tx_unsent) {
                kick(x, k, &x->p[k].s[q]);
                unsent += x->p[k].s[q].tx_unsent;
            }
        if (moved) {
            idle_since = 0;
            continue;
        }
        uint64_t t = now_ns();
        if (t - last_mtu > 1000000000ull) {
            last_mtu = t;
            for (k = 0; k < 2; k++)
                x->p[k].mtu = port_mtu(x->ioctl_fd, x->p[k].ifindex);
        }
        if (x->busy_poll) {
            /* recvfrom() drives the queue's NAPI (SO_PREFER_BUSY_POLL):
             * the receive work runs here, in TPB's time slice. */
            EACH_SOCK(x, k, q)
                recvfrom(x->p[k].s[q].fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
            continue;
        }
        if (!idle_since)
            idle_since = t;
        if (t - idle_since < (uint64_t)x->spin_us * 1000)
            continue;
        x->c[0].polls++;                 /* one loop: counted on port in */
        /* Frames left on a TX ring (egress busy): try again in 1 ms. */
        if (poll(pf, npf, unsent ? 1 : 1000) < 0 && errno != EINTR)
            return -errno;
        idle_since = 0;
    }
    return 0;
}

void tpb_xsk_stop(struct tpb_xsk *x)
{
    uint64_t one = 1;

    x->stopping = 1;
    if (write(x->stopfd, &one, sizeof(one)) < 0) {
        /* the flag alone stops it within a second */
    }
}

uint64_t tpb_xsk_heartbeat(struct tpb_xsk *x)
{
    return x->heartbeat;
}

void tpb_xsk_counters(struct tpb_xsk *x, int port, struct tpb_port_counters *out)
{
    struct xport *p = &x->p[port & 1];
    uint64_t rx_dropped = 0, fill_empty = 0;
    uint32_t q;

    *out = x->c[port & 1];
    out->kernel_drops = out->drop_xsk_invalid = out->xsk_tx_ring_empty = 0;
    /* XDP_STATISTICS are totals since bind (not reset on read as
     * PACKET_STATISTICS are); summed over the port's queues. */
    for (q = 0; q < p->nq; q++) {
        struct xdp_statistics st;
        socklen_t sl = sizeof(st);

        memset(&st, 0, sizeof(st));
        if (getsockopt(p->s[q].fd, SOL_XDP, XDP_STATISTICS, &st, &sl) < 0)
            continue;
        out->kernel_drops += st.rx_ring_full;
        rx_dropped += st.rx_dropped;
        fill_empty += st.rx_fill_ring_empty_descs;
        out->drop_xsk_invalid += st.rx_invalid_descs + st.tx_invalid_descs;
        out->xsk_tx_ring_empty += st.tx_ring_empty_descs;
    }
    /* A frame that found no chunk in the fill ring counts in rx_dropped
     * too (xsk_rcv: the allocation failed). */
    out->drop_fill_empty = fill_empty;
    out->drop_xsk_rx = rx_dropped - (fill_empty < rx_dropped ? fill_empty : rx_dropped);
    out->drop_no_socket = xsk_map_read(p->stats_fd, 0);
    out->kernel_packets = out->rx_frames + out->kernel_drops + rx_dropped;
}
