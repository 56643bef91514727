/* txq.c — messages queued for one port, sent with sendmmsg in batches.
 *
 *   1. txq_reserve()  take the next message slot (flushing a full queue);
 *      txq_reserve_long()  the same for a message of any number of
 *                     pieces (a super-packet whose payloads stay in the
 *                     ring: udpgso.c, coalesce.c): more than a slot has
 *                     iovecs for come from a pool kept until sent;
 *   2. txq_alloc()    bounce memory for headers or data that outlive the
 *                     ring slot they came from, kept until the flush;
 *   3. txq_bridge()   a received frame as it was: zero copy from the ring,
 *                     the VLAN tag the kernel moved out of band put back,
 *                     the vnet header's offsets shifted past it;
 *   4. txq_send()     each run of messages through its socket: past the
 *                     qdisc (while it is noqueue: txq_bypass), frames that
 *                     fit a TX ring slot are copied into one and leave
 *                     with a single send() (txring.c);
 *                     everything else by sendmmsg (txq_send_mmsg);
 *                     each refused message counted by reason, a slot the
 *                     kernel skipped too; an encapsulated
 *                     packet counted only once it has left (txq_account);
 *      txq_flush()    the same, then the arena is free again.
 * Every message starts with a virtio_net_hdr: the sockets have
 * PACKET_VNET_HDR, so GSO super-packets and partial checksums travel on.
 *
 * The TX ring's path is txring.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/if_ether.h>

#include "bridge.h"

#ifdef TPB_FUZZ
/* fuzz/: no socket.  Bounce memory is still counted against the arena
 * (so flushes happen where they would), but each piece is a malloc() of
 * its own, freed at the flush: AddressSanitizer sees a read past one, or
 * a use after the flush. */
int (*tpb_fuzz_tx)(struct txq *q, uint32_t i);

static void fz_release(struct txq *q)
{
    while (q->fz_nbufs)
        free(q->fz_bufs[--q->fz_nbufs]);
}
#endif

/* A slot is taken until its skb is freed or orphaned: by the device's
 * completion, or on a veth by the receiver's stack or packet socket.
 * 1024 are two full batches of both sources. */
#define TXRING_FRAMES 1024u

uint32_t port_mtu(int fd, int ifindex)
{
    struct ifreq ifr;

    memset(&ifr, 0, sizeof(ifr));
    if (!if_indextoname((unsigned)ifindex, ifr.ifr_name) ||
        ioctl(fd, SIOCGIFMTU, &ifr) < 0)
        return 0;
    return (uint32_t)ifr.ifr_mtu;
}

/* The MTU is read again every second (bridge.c), so that a port whose MTU
 * an operator lowers refuses the longer frames from then on (and the
 * tunnel follows it: encap_mtu). */
void txq_check_mtu(struct txq *q)
{
    uint32_t room = TPB_TXRING_SLOT - (uint32_t)TPB_TXRING_OFF - (uint32_t)VNET_LEN;
    uint32_t mtu;

#ifdef TPB_FUZZ
    q->mtu = 0;                 /* unknown: the configured MTU holds */
    q->ring_max = 0;
    return;
#endif
    mtu = port_mtu(q->fd, q->ifindex);
    q->mtu = mtu;
    q->ring_max = !mtu ? 0 : mtu + ETH_HLEN < room ? mtu + ETH_HLEN : room;
}

/* Past the qdisc only while there is none that queues (bridge.py watches
 * the port's root qdisc).  Behind a qdisc that queues, a frame sent past
 * it would overtake the super-packets of its own flow waiting there (TCP
 * takes that for loss and retransmits) and escape the operator's shaping.
 * With noqueue both paths transmit at once, in the order sent. */
int txq_bypass(struct txq *q, int on)
{
    int fds[2] = { q->fd, q->ring.fd }, k;

    for (k = 0; k < 2; k++)
        if (fds[k] >= 0 &&
            setsockopt(fds[k], SOL_PACKET, PACKET_QDISC_BYPASS, &on, sizeof(on)))
            return -errno;
    return 0;
}

int txq_init(struct txq *q, int fd, int fd_q, int ifindex,
             struct tpb_port_counters *c)
{
    char err[128];

    q->fd = fd;
    q->ifindex = ifindex;
    q->fd_q = fd_q;
    q->c = c;
    q->n = 0;
    q->arena_used = 0;
    q->xiov_used = 0;
    q->ring.fd = -1;
    q->tc = NULL;
    q->acct_broken = 0;
    /* Fault injection for the tests only: every Nth frame put in the TX
     * ring is made one the kernel skips (ring_put), to show it counted. */
    q->fault_skip = getenv("TPB_FAULT_TXRING_SKIP")
                        ? (uint32_t)strtoul(getenv("TPB_FAULT_TXRING_SKIP"), NULL, 10) : 0;
    q->fault_n = 0;
#ifndef TPB_FUZZ
    q->arena = malloc(ARENA_SIZE);
#else
    q->arena = malloc(1);       /* only marks the queue as set up */
#endif
    if (!q->arena)
        return -ENOMEM;
#ifdef TPB_FUZZ
    q->ring_max = 0;
    q->fz_bufs = NULL;
    q->fz_nbufs = q->fz_cap = 0;
    (void)err;
    return 0;
#endif
    /* The ring only speeds things up: without it (no memory) or while the
     * MTU is unknown (ring_max 0) every frame goes by sendmmsg. */
    txq_check_mtu(q);
    tpb_txring_open(&q->ring, ifindex, 1, TXRING_FRAMES, err, sizeof(err));
    return 0;
}

void txq_free(struct txq *q)
{
    if (!q->arena)
        return;
    tpb_txring_close(&q->ring);
#ifdef TPB_FUZZ
    fz_release(q);
    free(q->fz_bufs);
#endif
    free(q->arena);
    q->arena = NULL;
}

void txq_send(struct txq *q);

/* 1. */
uint32_t txq_reserve(struct txq *q)
{
    uint32_t i;

    /* Send, but keep the arena: the caller may still point new messages
     * at bounce memory it took before. */
    if (q->n == TXQ_MAX)
        txq_send(q);
    i = q->n;
    memset(&q->msg[i].msg_hdr, 0, sizeof(q->msg[i].msg_hdr));
    q->msg[i].msg_hdr.msg_iov = q->iov[i];
    return i;
}

/* Any niov <= TXQ_XIOV (the callers' messages have at most 1 + 2 * 64);
 * one that fits a slot's own iovecs takes them. */
uint32_t txq_reserve_long(struct txq *q, uint32_t niov)
{
    uint32_t i;

    if (niov <= TXQ_IOV)
        return txq_reserve(q);
    if (q->n == TXQ_MAX || q->xiov_used + niov > TXQ_XIOV)
        txq_send(q);
    i = q->n;
    memset(&q->msg[i].msg_hdr, 0, sizeof(q->msg[i].msg_hdr));
    q->msg[i].msg_hdr.msg_iov = q->xiov + q->xiov_used;
    q->xiov_used += niov;
    return i;
}

void txq_commit(struct txq *q, uint32_t i, int niov)
{
    const struct iovec *iov = q->msg[i].msg_hdr.msg_iov;
    uint32_t len = 0;
    int k;

    q->msg[i].msg_hdr.msg_iovlen = (size_t)niov;
    for (k = 0; k < niov; k++)
        len += (uint32_t)iov[k].iov_len;
    q->len[i] = len - (uint32_t)VNET_LEN;
    q->qdisc[i] = 0;
    q->acct[i] = TXQ_ACCT_NONE;
    q->n = i + 1;
}

void txq_account(struct txq *q, uint32_t i, uint8_t kind, uint32_t bytes)
{
    txq_account_n(q, i, kind, bytes, 1);
}

void txq_account_n(struct txq *q, uint32_t i, uint8_t kind, uint32_t bytes,
                   uint32_t packets)
{
    q->acct[i] = kind;
    q->acct_bytes[i] = bytes;
    q->acct_pkts[i] = (uint16_t)packets;
}

/* Message k left (sent) or was refused: what it counts in the tunnel's
 * counters.  A packet whose fragment was refused is lost whole: it counts
 * neither when its last fragment leaves (the refusal is counted by the
 * port's drop reason). */
static void account(struct txq *q, uint32_t k, int sent)
{
    switch (q->acct[k]) {
    case TXQ_ACCT_ENCAP:
        if (sent && !q->acct_broken && q->tc) {
            q->tc->encap_packets += q->acct_pkts[k];
            q->tc->encap_bytes += q->acct_bytes[k];
        }
        q->acct_broken = 0;
        break;
    case TXQ_ACCT_ENCAP_FRAG:
        if (!sent)
            q->acct_broken = 1;
        break;
    }
}

/* Through the qdisc: super-packets, which only a socket that keeps the
 * qdisc may send (dev_direct_xmit() drops what the device would have to
 * segment), and tunnel output.  The segments of one super-packet leave in
 * a burst of up to 45 GRE packets that a device ring may not hold; the
 * qdisc queues them as it queues the kernel's own GSO segments, where
 * bypassing it would drop them. */
void txq_commit_queued(struct txq *q, uint32_t i, int niov)
{
    txq_commit(q, i, niov);
    q->qdisc[i] = 1;
}

/* 2. Callers take bounce memory before they reserve the messages that
 * point at it, so a flush here never sends a half-built message. */
uint8_t *txq_alloc(struct txq *q, size_t len)
{
    uint8_t *p;
#ifdef TPB_FUZZ
    size_t want = len;
#endif

    len = (len + 15) & ~(size_t)15;
    if (len > ARENA_SIZE)
        return NULL;
    if (q->arena_used + len > ARENA_SIZE)
        txq_flush(q);
#ifndef TPB_FUZZ
    p = q->arena + q->arena_used;
#else
    if (q->fz_nbufs == q->fz_cap) {
        q->fz_cap = q->fz_cap ? 2 * q->fz_cap : 64;
        q->fz_bufs = realloc(q->fz_bufs, q->fz_cap * sizeof(*q->fz_bufs));
        if (!q->fz_bufs)
            abort();
    }
    p = malloc(want ? want : 1);
    if (!p)
        abort();
    q->fz_bufs[q->fz_nbufs++] = p;
#endif
    q->arena_used += len;
    return p;
}

/* Writes an Ethernet header with the frame's VLAN tag (if it had one). */
size_t eth_write(uint8_t *out, const uint8_t *dst, const uint8_t *src,
                 const struct frame *f, uint16_t type)
{
    size_t n = 12;

    memmove(out, dst, 6);
    memmove(out + 6, src, 6);
    if (f->tagged) {
        memcpy(out + 12, f->tag, 4);
        n += 4;
    }
    wr16(out + n, type);
    return n + 2;
}

/* 3. */
void txq_bridge(struct txq *q, const struct frame *f)
{
    uint32_t i = txq_reserve(q);
    struct iovec *iov = q->iov[i];
    struct virtio_net_hdr *vh;

    if (!f->tagged) {
        /* The kernel wrote the vnet header just before the MAC header. */
        iov[0].iov_base = f->vh;
        iov[0].iov_len = VNET_LEN + f->len;
        txq_commit(q, i, 1);
        q->qdisc[i] = f->vh->gso_type != VIRTIO_NET_HDR_GSO_NONE;
        return;
    }
    vh = (struct virtio_net_hdr *)q->hdr[i];
    *vh = *f->vh;
    if (vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
        vh->csum_start += 4;
    if (vh->gso_type != VIRTIO_NET_HDR_GSO_NONE)
        vh->hdr_len += 4;
    memcpy(q->hdr[i] + VNET_LEN, f->mac, 2 * ETH_ALEN);
    memcpy(q->hdr[i] + VNET_LEN + 2 * ETH_ALEN, f->tag, 4);
    iov[0].iov_base = q->hdr[i];
    iov[0].iov_len = VNET_LEN + 2 * ETH_ALEN + 4;
    iov[1].iov_base = f->mac + 2 * ETH_ALEN;
    iov[1].iov_len = f->len - 2 * ETH_ALEN;
    txq_commit(q, i, 2);
    q->qdisc[i] = vh->gso_type != VIRTIO_NET_HDR_GSO_NONE;
}

/* 4. */
void txq_count_refused(struct tpb_port_counters *c, int e)
{
    switch (e) {
    case EMSGSIZE:
        c->drop_too_big++;
        break;
    case ENOBUFS:
    case EAGAIN:
        c->drop_egress_full++;
        break;
    default:
        c->drop_send_error++;
    }
}

/* Sends messages [i, end) through fd by sendmmsg; returns after all are
 * sent or counted as refused. */
void txq_send_mmsg(struct txq *q, int fd, uint32_t i, uint32_t end)
{
    struct tpb_port_counters *c = q->c;
    uint32_t k;
    int sent, e;
    socklen_t elen = sizeof(e);

    while (i < end) {
        sent = sendmmsg(fd, &q->msg[i], end - i, 0);
        if (sent > 0) {
            for (k = i; k < i + (uint32_t)sent; k++) {
                c->tx_bytes += q->len[k];
                account(q, k, 1);
            }
            c->tx_frames += (uint64_t)sent;
            c->batches++;
            i += (uint32_t)sent;
            continue;
        }
        if (errno == EINTR)
            continue;
        /* Message i was refused: count it by reason and go on with the
         * rest.  A refusal after a partial batch is parked in sk_err,
         * which would make poll() report POLLERR forever: clear it. */
        txq_count_refused(c, errno);
        account(q, i, 0);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen);
        i++;
    }
}

/* In order, each run of messages through its path (txq_commit_queued). */
void txq_send(struct txq *q)
{
    uint32_t i = 0, j;

#ifdef TPB_FUZZ
    for (i = 0; i < q->n; i++) {
        if (!tpb_fuzz_tx(q, i)) {
            txq_count_refused(q->c, ENOBUFS);
            account(q, i, 0);
            continue;
        }
        q->c->tx_frames++;
        q->c->tx_bytes += q->len[i];
        account(q, i, 1);
    }
    if (q->n)
        q->c->batches++;
    q->n = 0;
    q->xiov_used = 0;
    return;
#endif

    while (i < q->n) {
        for (j = i + 1; j < q->n && q->qdisc[j] == q->qdisc[i]; j++)
            ;
        if (q->qdisc[i])
            txq_send_mmsg(q, q->fd_q, i, j);
        else
            txring_send(q, i, j);
        i = j;
    }
    q->n = 0;
    q->xiov_used = 0;
}

/* Sends everything; nothing points into the arena any more. */
void txq_flush(struct txq *q)
{
    txq_send(q);
#ifdef TPB_FUZZ
    fz_release(q);
#endif
    q->arena_used = 0;
}
