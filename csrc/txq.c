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
 *                     with a single send() (ring_put, ring_kick);
 *                     everything else by sendmmsg (send_mmsg);
 *                     each refused message counted by reason, a slot the
 *                     kernel skipped too (ring_reap); an encapsulated
 *                     packet counted only once it has left (txq_account);
 *      txq_flush()    the same, then the arena is free again.
 * Every message starts with a virtio_net_hdr: the sockets have
 * PACKET_VNET_HDR, so GSO super-packets and partial checksums travel on.
 *
 * Why a TX ring beside sendmmsg (measured: one sender of 64-byte or
 * 1514-byte frames into a veth, 11-13 % more frames per CPU second; TPB's
 * 64-byte bench from 0.31 to 0.34 Mpps): per frame, the kernel no longer
 * copies in a msghdr and its iovecs or checks the user copy.  Each slot's
 * vnet header calls the whole frame header (hdr_len), so the kernel copies
 * it into the skb: an skb pointing into the ring would see its slot reused
 * while a local receiver still queued it, since the slot is handed back
 * when the skb is orphaned, not when its data is freed.
 * What stays on sendmmsg: super-packets and frames longer than the MTU
 * (that path segments the one and refuses the other with EMSGSIZE), and
 * whatever goes through the qdisc.  A TX ring there was tried for tunnel
 * output: a veth gives NAPI and GRO only to skbs freed by sock_wfree, so
 * the far end of the bench's tunnel stopped merging GRE and tunnel TCP fell
 * from 4.9 to 1.6 Gbit/s; with GRO restored (TSO off) it was no faster.
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
/* Tries of a frame the device refuses (ENOBUFS: its queue is full) before
 * it is given up and counted, as sendmmsg would count it at once. */
#define TXRING_TRIES 3

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
static void count_refused(struct tpb_port_counters *c, int e)
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
static void send_mmsg(struct txq *q, int fd, uint32_t i, uint32_t end)
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
        count_refused(c, errno);
        account(q, i, 0);
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen);
        i++;
    }
}

static inline struct tpacket2_hdr *txslot(const struct tpb_txring *t,
                                          uint32_t i)
{
    return (struct tpacket2_hdr *)(t->map + (size_t)i * t->frame_size);
}

static inline uint32_t txstatus(const struct tpb_txring *t, uint32_t i)
{
    return __atomic_load_n(&txslot(t, i)->tp_status, __ATOMIC_ACQUIRE);
}

/* The kernel's checks of a TX ring slot (tpacket_snd: the length, the
 * vnet header, the link-layer header; virtio_net_hdr_to_skb: a partial
 * checksum inside the frame, after at least an IPv4 header's worth): the
 * errno sendmmsg would report for the same frame, or 0.  A slot it
 * refuses is skipped without a word (PACKET_LOSS). */
static int ring_refuses(const struct tpb_txring *t, uint32_t tp_len,
                        const struct virtio_net_hdr *vh)
{
    uint32_t len;

    if (tp_len > t->frame_size - (uint32_t)TPB_TXRING_OFF)
        return EMSGSIZE;
    if (tp_len < VNET_LEN + ETH_HLEN)
        return EINVAL;
    len = tp_len - (uint32_t)VNET_LEN;
    if (vh->gso_type != VIRTIO_NET_HDR_GSO_NONE)
        return EINVAL;          /* never put there: not segmented here */
    if ((vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
        (vh->csum_start < 20 || (uint32_t)vh->csum_start + vh->csum_offset + 2 > len))
        return EINVAL;
    return 0;
}

/* Whether message i may go by a TX ring: not a super-packet (only
 * sendmmsg's path segments those), no longer than the port's MTU, and
 * nothing the kernel would refuse (it would skip the slot without a word;
 * sendmmsg reports it). */
static int ring_fits(const struct txq *q, uint32_t i)
{
    const struct iovec *iov = q->msg[i].msg_hdr.msg_iov;
    const struct virtio_net_hdr *vh = iov[0].iov_base;

    if (q->len[i] > q->ring_max || iov[0].iov_len < VNET_LEN)
        return 0;
    return !ring_refuses(&q->ring, (uint32_t)VNET_LEN + q->len[i], vh);
}

/* Copies message i into the ring's next slot; 0 if that slot is still in
 * flight. */
static int ring_put(struct txq *q, struct tpb_txring *t, uint32_t i)
{
    struct tpacket2_hdr *h = txslot(t, t->head);
    uint8_t *p = (uint8_t *)h + TPB_TXRING_OFF;
    struct msghdr *m = &q->msg[i].msg_hdr;
    size_t k;

    if (txstatus(t, t->head) != TP_STATUS_AVAILABLE)
        return 0;
    for (k = 0; k < m->msg_iovlen; k++) {
        memcpy(p, m->msg_iov[k].iov_base, m->msg_iov[k].iov_len);
        p += m->msg_iov[k].iov_len;
    }
    /* All of it header: the kernel copies the frame, keeps no page. */
    ((struct virtio_net_hdr *)((uint8_t *)h + TPB_TXRING_OFF))->hdr_len =
        (uint16_t)q->len[i];
    h->tp_len = (uint32_t)VNET_LEN + q->len[i];
    if (q->fault_skip && ++q->fault_n % q->fault_skip == 0)
        h->tp_len = 1;          /* tests only: a slot the kernel skips */
    t->len[t->head] = q->len[i];
    __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
    t->head = t->head + 1 == t->frame_nr ? 0 : t->head + 1;
    t->pending++;
    return 1;
}

/* The oldest slot handed over is done with (sent or given up). */
static inline void ring_pop(struct tpb_txring *t)
{
    t->tail = t->tail + 1 == t->frame_nr ? 0 : t->tail + 1;
    t->pending--;
}

/* Counts the slots the kernel has taken since the last look (in the
 * send() that returned `n`): it takes them in order, so they run from tail
 * to the first still requested.  Each was sent, or skipped: the kernel
 * marks a skipped slot available as it does a sent one (PACKET_LOSS; no
 * TP_STATUS_WRONG_FORMAT, which would stall the ring at that slot for
 * good), so a skipped one is found by the kernel's own checks, read from
 * the slot as it was handed over (ring_refuses), and counted by the reason
 * sendmmsg would have given.  A send() that succeeded also says how many
 * bytes left (the frames' lengths): anything it skipped for a reason the
 * checks do not know is still caught there, and counted as one frame
 * refused (send_error) with its bytes.  Returns how many were sent. */
static uint32_t ring_reap(struct txq *q, struct tpb_txring *t, ssize_t n)
{
    uint64_t bytes = 0;
    uint32_t sent = 0;
    int e;

    while (t->pending && txstatus(t, t->tail) != TP_STATUS_SEND_REQUEST) {
        struct tpacket2_hdr *h = txslot(t, t->tail);

        if (t->len[t->tail] != TXRING_GAVE_UP) {
            e = ring_refuses(t, h->tp_len, (const struct virtio_net_hdr *)
                                               ((uint8_t *)h + TPB_TXRING_OFF));
            if (e) {
                count_refused(q->c, e);
            } else {
                bytes += t->len[t->tail];
                sent++;
            }
        }
        ring_pop(t);
    }
    if (n >= 0 && (uint64_t)n < bytes && sent) {
        count_refused(q->c, EINVAL);
        sent--;
        bytes = (uint64_t)n;
    }
    q->c->tx_bytes += bytes;
    q->c->tx_frames += sent;
    return sent;
}

/* Gives up on the frame at tail: an invalid length makes the kernel skip
 * its slot (PACKET_LOSS) the next time round. */
static void ring_give_up(struct txq *q, struct tpb_txring *t, int e)
{
    count_refused(q->c, e);
    t->len[t->tail] = TXRING_GAVE_UP;
    txslot(t, t->tail)->tp_len = 0;
}

/* Hands every filled slot to the kernel.  It stops at a frame the device
 * refuses and leaves it requested: that frame is tried again a few times
 * (a full device queue drains), then given up and counted. */
static void ring_kick(struct txq *q, struct tpb_txring *t)
{
    int tries = 0, e;
    uint32_t before;
    ssize_t n;

    while (t->pending) {
        before = t->pending;
        n = send(t->fd, NULL, 0, MSG_DONTWAIT);
        e = n < 0 ? errno : 0;
        if (ring_reap(q, t, n))
            q->c->batches++;
        if (t->pending < before)
            tries = 0;
        if (!t->pending || e == EINTR)
            continue;
        if (e == 0 || e == ENOBUFS || e == EAGAIN) {
            if (++tries < TXRING_TRIES)
                continue;
            ring_give_up(q, t, e ? e : ENOBUFS);
        } else {
            /* Not the frame, the device (down, gone): give them all up.
             * The kernel skips their slots once it can send again. */
            while (t->pending) {
                ring_give_up(q, t, e);
                ring_pop(t);
            }
            send(t->fd, NULL, 0, MSG_DONTWAIT);
            return;
        }
        tries = 0;
    }
}

/* Sends messages [i, end) past the qdisc, by the TX ring where they fit,
 * keeping their order. */
static void send_bypass(struct txq *q, uint32_t i, uint32_t end)
{
    struct tpb_txring *t = &q->ring;
    int fd = q->fd;
    uint32_t j;

    if (t->fd < 0) {
        send_mmsg(q, fd, i, end);
        return;
    }
    while (i < end) {
        for (; i < end && ring_fits(q, i); i++)
            if (!ring_put(q, t, i)) {
                ring_kick(q, t);
                if (!ring_put(q, t, i))
                    break;      /* every slot in flight */
            }
        if (i == end)
            break;
        /* What is queued in the ring leaves before message i. */
        ring_kick(q, t);
        for (j = i + 1; j < end && !ring_fits(q, j); j++)
            ;
        send_mmsg(q, fd, i, j);
        i = j;
    }
    ring_kick(q, t);
}

/* In order, each run of messages through its path (txq_commit_queued). */
void txq_send(struct txq *q)
{
    uint32_t i = 0, j;

#ifdef TPB_FUZZ
    for (i = 0; i < q->n; i++) {
        if (!tpb_fuzz_tx(q, i)) {
            count_refused(q->c, ENOBUFS);
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
            send_mmsg(q, q->fd_q, i, j);
        else
            send_bypass(q, i, j);
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
