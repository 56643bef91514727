/* bridge.c — the forwarding loop: every frame from one port out the other.
 *
 * A frame passes these stages, in the order the functions below appear:
 *   1. collect()   take up to `batch` filled slots from the source ring;
 *                  drop (and count) what the slot truncated;
 *   2. stage()     point one sendmmsg message at the frame in the ring,
 *                  putting back the VLAN tag the kernel moved out of band
 *                  (802.1Q/802.1ad, VLAN 0 included) and shifting the vnet
 *                  header's offsets past it;
 *   3. transmit()  sendmmsg the batch out the other port's socket, skipping
 *                  and counting each message the kernel refuses;
 *   4. release()   hand the slots back to the kernel;
 *   5. run()       alternate the two directions; when both rings are empty,
 *                  spin briefly, then sleep in poll() on both sockets and
 *                  the stop eventfd.
 * The frames are never copied in user space: the kernel copies them once,
 * from the RX ring into the egress skb.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/if_ether.h>
#include <linux/virtio_net.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include "tpb.h"
#include "ring.h"

#define MAX_BATCH 256
#define VNET_LEN sizeof(struct virtio_net_hdr)

struct batch {
    uint32_t n;
    struct mmsghdr msg[MAX_BATCH];
    struct iovec iov[MAX_BATCH][4];
    struct virtio_net_hdr vnet[MAX_BATCH];   /* copies, for tagged frames */
    uint8_t tag[MAX_BATCH][4];
    struct tpacket2_hdr *slot[MAX_BATCH];
    uint32_t len[MAX_BATCH];                 /* wire length, tag included */
};

struct tpb_bridge {
    struct tpb_ring ring[TPB_NPORTS];
    struct tpb_port_counters c[TPB_NPORTS];
    struct batch b;
    uint32_t batch;
    uint32_t spin_us;
    int stop_fd;
    int stop;
    pthread_mutex_t stats_lock;
};

/* 1. ------------------------------------------------------------------ */

static void stage(struct batch *b, struct tpacket2_hdr *h, uint32_t status);

static uint32_t collect(struct tpb_bridge *br, int src)
{
    struct tpb_ring *rx = &br->ring[src];
    struct tpb_port_counters *c = &br->c[src];
    struct batch *b = &br->b;
    struct tpacket2_hdr *h;
    uint32_t status;

    b->n = 0;
    while (b->n < br->batch &&
           (h = tpb_ring_peek(rx, rx->head, &status)) != NULL) {
        rx->head = tpb_ring_next(rx, rx->head);
        c->rx_frames++;
        c->rx_bytes += h->tp_len;
        /* A frame cut short by the slot (or a runt) is never sent on
         * half-made: drop it whole. */
        if (h->tp_snaplen < h->tp_len || h->tp_snaplen < ETH_HLEN) {
            c->drop_truncated++;
            tpb_ring_release(h);
            continue;
        }
        stage(b, h, status);
    }
    return b->n;
}

/* 2. ------------------------------------------------------------------ */

static void stage(struct batch *b, struct tpacket2_hdr *h, uint32_t status)
{
    uint32_t i = b->n++;
    uint8_t *mac = (uint8_t *)h + h->tp_mac;
    struct virtio_net_hdr *vh = (struct virtio_net_hdr *)(mac - VNET_LEN);
    struct msghdr *m = &b->msg[i].msg_hdr;
    struct iovec *iov = b->iov[i];

    memset(m, 0, sizeof(*m));
    m->msg_iov = iov;
    b->slot[i] = h;
    b->len[i] = h->tp_snaplen;

    if (!(status & TP_STATUS_VLAN_VALID)) {
        /* The kernel wrote the vnet header just before the MAC header. */
        iov[0].iov_base = vh;
        iov[0].iov_len = VNET_LEN + h->tp_snaplen;
        m->msg_iovlen = 1;
        return;
    }

    /* The kernel untagged the frame (skb_vlan_untag) and left the outer
     * tag in the slot header: splice it back after the two MACs.  With no
     * valid TPID the kernel only ever strips 802.1Q. */
    tpb_vlan_tag((status & TP_STATUS_VLAN_TPID_VALID) ? h->tp_vlan_tpid
                                                      : ETH_P_8021Q,
                 h->tp_vlan_tci, b->tag[i]);
    b->vnet[i] = *vh;
    if (vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
        b->vnet[i].csum_start += 4;
    if (vh->gso_type != VIRTIO_NET_HDR_GSO_NONE)
        b->vnet[i].hdr_len += 4;
    iov[0].iov_base = &b->vnet[i];
    iov[0].iov_len = VNET_LEN;
    iov[1].iov_base = mac;
    iov[1].iov_len = 2 * ETH_ALEN;
    iov[2].iov_base = b->tag[i];
    iov[2].iov_len = 4;
    iov[3].iov_base = mac + 2 * ETH_ALEN;
    iov[3].iov_len = h->tp_snaplen - 2 * ETH_ALEN;
    m->msg_iovlen = 4;
    b->len[i] += 4;
}

/* 3. ------------------------------------------------------------------ */

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

static void transmit(struct tpb_bridge *br, int dst)
{
    struct batch *b = &br->b;
    struct tpb_port_counters *c = &br->c[dst];
    int fd = br->ring[dst].fd;
    uint32_t i = 0, k;
    int sent, e;
    socklen_t elen = sizeof(e);

    while (i < b->n) {
        sent = sendmmsg(fd, &b->msg[i], b->n - i, 0);
        if (sent > 0) {
            for (k = i; k < i + (uint32_t)sent; k++)
                c->tx_bytes += b->len[k];
            c->tx_frames += sent;
            c->batches++;
            i += sent;
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

/* 4. ------------------------------------------------------------------ */

static void release(struct batch *b)
{
    uint32_t i;

    for (i = 0; i < b->n; i++)
        tpb_ring_release(b->slot[i]);
    b->n = 0;
}

static uint32_t forward(struct tpb_bridge *br, int src, int dst)
{
    uint32_t n = collect(br, src);

    if (n) {
        transmit(br, dst);
        release(&br->b);
    }
    return n;
}

/* 5. ------------------------------------------------------------------ */

static int rings_ready(struct tpb_bridge *br)
{
    uint32_t st;
    int p;

    for (p = 0; p < TPB_NPORTS; p++)
        if (tpb_ring_peek(&br->ring[p], br->ring[p].head, &st))
            return 1;
    return 0;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Spinning a few microseconds catches the next frame of a burst without a
 * sleep/wake-up (a cross-CPU kick costs several microseconds here). */
static int spin(struct tpb_bridge *br)
{
    uint64_t until;

    if (!br->spin_us)
        return 0;
    until = now_ns() + (uint64_t)br->spin_us * 1000u;
    do {
        if (rings_ready(br))
            return 1;
        __builtin_ia32_pause();
    } while (now_ns() < until &&
             !__atomic_load_n(&br->stop, __ATOMIC_RELAXED));
    return 0;
}

int tpb_bridge_run(struct tpb_bridge *br)
{
    struct pollfd pfd[TPB_NPORTS + 1];
    int p, e;
    socklen_t elen = sizeof(e);

    for (p = 0; p < TPB_NPORTS; p++) {
        pfd[p].fd = br->ring[p].fd;
        pfd[p].events = POLLIN;
    }
    pfd[TPB_NPORTS].fd = br->stop_fd;
    pfd[TPB_NPORTS].events = POLLIN;

    while (!__atomic_load_n(&br->stop, __ATOMIC_ACQUIRE)) {
        uint32_t work = forward(br, TPB_PORT_IN, TPB_PORT_OUT);

        work += forward(br, TPB_PORT_OUT, TPB_PORT_IN);
        if (work || spin(br))
            continue;
        br->c[TPB_PORT_IN].polls++;
        if (poll(pfd, TPB_NPORTS + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        for (p = 0; p < TPB_NPORTS; p++)
            if (pfd[p].revents & POLLERR)
                getsockopt(pfd[p].fd, SOL_SOCKET, SO_ERROR, &e, &elen);
    }
    return 0;
}

void tpb_bridge_stop(struct tpb_bridge *br)
{
    uint64_t one = 1;

    __atomic_store_n(&br->stop, 1, __ATOMIC_RELEASE);
    if (write(br->stop_fd, &one, sizeof(one)) < 0) {
        /* The eventfd counter cannot overflow from a handful of stops;
         * the flag alone still ends the loop at its next wake-up. */
    }
}

/* ------------------------------------------------------------------ */

struct tpb_bridge *tpb_bridge_open(const struct tpb_bridge_config *cfg,
                                   char *err, size_t errlen)
{
    struct tpb_bridge *br = calloc(1, sizeof(*br));
    int p;

    if (!br) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    for (p = 0; p < TPB_NPORTS; p++)
        br->ring[p].fd = -1;
    br->batch = cfg->batch ? cfg->batch : 64;
    if (br->batch > MAX_BATCH)
        br->batch = MAX_BATCH;
    br->spin_us = cfg->spin_us;
    pthread_mutex_init(&br->stats_lock, NULL);
    br->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (br->stop_fd < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        goto fail;
    }
    for (p = 0; p < TPB_NPORTS; p++)
        if (tpb_ring_open(&br->ring[p], cfg->ifindex[p], cfg->ring_frames,
                          err, errlen) < 0)
            goto fail;
    return br;
fail:
    tpb_bridge_close(br);
    return NULL;
}

/* PACKET_STATISTICS resets on every read: fold it into the counters under
 * a lock, so concurrent readers never lose a count. */
static void fold_kernel_stats(struct tpb_bridge *br, int p)
{
    struct tpacket_stats st;
    socklen_t len = sizeof(st);

    if (br->ring[p].fd < 0)
        return;
    if (getsockopt(br->ring[p].fd, SOL_PACKET, PACKET_STATISTICS, &st,
                   &len) == 0) {
        br->c[p].kernel_packets += st.tp_packets;
        br->c[p].kernel_drops += st.tp_drops;
    }
}

void tpb_bridge_counters(struct tpb_bridge *br, int port,
                         struct tpb_port_counters *out)
{
    if (port < 0 || port >= TPB_NPORTS) {
        memset(out, 0, sizeof(*out));
        return;
    }
    pthread_mutex_lock(&br->stats_lock);
    fold_kernel_stats(br, port);
    *out = br->c[port];
    pthread_mutex_unlock(&br->stats_lock);
}

void tpb_bridge_close(struct tpb_bridge *br)
{
    int p;

    if (!br)
        return;
    for (p = 0; p < TPB_NPORTS; p++)
        tpb_ring_close(&br->ring[p]);
    if (br->stop_fd >= 0)
        close(br->stop_fd);
    pthread_mutex_destroy(&br->stats_lock);
    free(br);
}
