/* txq.c — messages queued for one port, sent with sendmmsg in batches.
 *
 *   1. txq_reserve()  take the next message slot (flushing a full queue);
 *   2. txq_alloc()    bounce memory for headers or data that outlive the
 *                     ring slot they came from, kept until the flush;
 *   3. txq_bridge()   a received frame as it was: zero copy from the ring,
 *                     the VLAN tag the kernel moved out of band put back,
 *                     the vnet header's offsets shifted past it;
 *   4. txq_send()     sendmmsg, skipping and counting each refused message;
 *      txq_flush()    the same, then the arena is free again.
 * Every message starts with a virtio_net_hdr: the socket has
 * PACKET_VNET_HDR, so GSO super-packets and partial checksums travel on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <linux/if_ether.h>

#include "bridge.h"

int txq_init(struct txq *q, int fd, int fd_q, struct tpb_port_counters *c)
{
    q->fd = fd;
    q->fd_q = fd_q;
    q->c = c;
    q->n = 0;
    q->arena_used = 0;
    q->arena = malloc(ARENA_SIZE);
    return q->arena ? 0 : -ENOMEM;
}

void txq_free(struct txq *q)
{
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

void txq_commit(struct txq *q, uint32_t i, int niov)
{
    uint32_t len = 0;
    int k;

    q->msg[i].msg_hdr.msg_iovlen = (size_t)niov;
    for (k = 0; k < niov; k++)
        len += (uint32_t)q->iov[i][k].iov_len;
    q->len[i] = len - (uint32_t)VNET_LEN;
    q->qdisc[i] = 0;
    q->n = i + 1;
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

    len = (len + 15) & ~(size_t)15;
    if (len > ARENA_SIZE)
        return NULL;
    if (q->arena_used + len > ARENA_SIZE)
        txq_flush(q);
    p = q->arena + q->arena_used;
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

/* Sends messages [i, end) through fd; returns after all are sent or
 * counted as refused. */
static void send_run(struct txq *q, int fd, uint32_t i, uint32_t end)
{
    struct tpb_port_counters *c = q->c;
    uint32_t k;
    int sent, e;
    socklen_t elen = sizeof(e);

    while (i < end) {
        sent = sendmmsg(fd, &q->msg[i], end - i, 0);
        if (sent > 0) {
            for (k = i; k < i + (uint32_t)sent; k++)
                c->tx_bytes += q->len[k];
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
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &elen);
        i++;
    }
}

/* In order, each run of messages through its socket (txq_commit_queued). */
void txq_send(struct txq *q)
{
    uint32_t i = 0, j;

    while (i < q->n) {
        for (j = i + 1; j < q->n && q->qdisc[j] == q->qdisc[i]; j++)
            ;
        send_run(q, q->qdisc[i] ? q->fd_q : q->fd, i, j);
        i = j;
    }
    q->n = 0;
}

/* Sends everything; nothing points into the arena any more. */
void txq_flush(struct txq *q)
{
    txq_send(q);
    q->arena_used = 0;
}
