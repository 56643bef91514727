/* txring.c — the qdisc-bypassing messages of a port's queue (txq.c) sent
 * through a PACKET_TX_RING where they fit, sendmmsg for the rest.
 *
 *   1. ring_fits()    a frame the ring may carry: not a super-packet, no
 *                     longer than the MTU, nothing the kernel would refuse;
 *   2. ring_put()     copied into the next free slot, marked for sending;
 *   3. ring_kick()    one send() hands every filled slot to the kernel;
 *                     ring_reap() counts what left and what it skipped,
 *                     by the reason sendmmsg would have given;
 *   4. txring_send()  a run of messages, in order: the ring's frames, and
 *                     between them whatever must go by sendmmsg.
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
#include <string.h>
#include <sys/socket.h>
#include <linux/if_ether.h>

#include "bridge.h"

/* Tries of a frame the device refuses (ENOBUFS: its queue is full) before
 * it is given up and counted, as sendmmsg would count it at once. */
#define TXRING_TRIES 3

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

/* 1. Whether message i may go by a TX ring: not a super-packet (only
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

/* 2. Copies message i into the ring's next slot; 0 if that slot is still in
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
                txq_count_refused(q->c, e);
            } else {
                bytes += t->len[t->tail];
                sent++;
            }
        }
        ring_pop(t);
    }
    if (n >= 0 && (uint64_t)n < bytes && sent) {
        txq_count_refused(q->c, EINVAL);
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
    txq_count_refused(q->c, e);
    t->len[t->tail] = TXRING_GAVE_UP;
    txslot(t, t->tail)->tp_len = 0;
}

/* 3. Hands every filled slot to the kernel.  It stops at a frame the device
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

/* 4. Sends messages [i, end) past the qdisc, by the TX ring where they
 * fit, keeping their order. */
void txring_send(struct txq *q, uint32_t i, uint32_t end)
{
    struct tpb_txring *t = &q->ring;
    int fd = q->fd;
    uint32_t j;

    if (t->fd < 0) {
        txq_send_mmsg(q, fd, i, end);
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
        txq_send_mmsg(q, fd, i, j);
        i = j;
    }
    ring_kick(q, t);
}
