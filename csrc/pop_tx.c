/* pop_tx.c — `tpb pop` toward the bridges: what the host routes into the
 * TUN device is wrapped toward the bridge behind its destination.
 *
 * Each pass of the loop (to_bridges):
 *   8. read()          up to a batch of packets from the TUN device, each
 *                      behind a vnet header (IFF_VNET_HDR).  The device
 *                      offers checksum, TSO and USO offloads (TUNSETOFFLOAD
 *                      in tpb/pop.py), so the host hands over a TCP flow
 *                      toward a bridge as super-packets of up to 64 KB, not
 *                      one MTU-sized packet per read (tun.c: tun_put_user,
 *                      virtio_net_hdr_from_skb);
 *      vnet_check()    the header checked before anything is done with
 *                      the packet: no flag but NEEDS_CSUM/DATA_VALID, a
 *                      GSO type we offered and that matches the packet
 *                      (gso_plan(), segment.c), its IP header whole; else
 *                      counted gso_bad.  A plain packet's partial checksum
 *                      is completed (finish_csum());
 *   9. route()         (pop.c) the bridge behind the inner destination;
 *  10. split()         a super-packet cut into segments whose tunnel packet
 *                      (inner + GRE [+ UDP] + outer IPv4) fits the TUN
 *                      device's MTU, taken as the path MTU toward the
 *                      bridges: no segment is then fragmented on its way
 *                      (gso_size is lowered where it must be; TCP takes any
 *                      segment up to the MSS).  Each segment gets its own
 *                      IP ID, TCP sequence number, flags and checksums
 *                      (gso_seg()) and its own GRE header (sequence number,
 *                      checksum: gre_header()).  A GRE peer gets one
 *                      message per segment; a GRE-in-UDP peer one message
 *                      per super-packet (up to 64 segments), its payload
 *                      the GRE-wrapped segments back to back, each exactly
 *                      gso_size long but the last, and a UDP_SEGMENT cmsg:
 *                      the kernel cuts it into datagrams and checksums
 *                      each (udp(7), Documentation/networking/segmentation-
 *                      offloads.rst, "UDP Fragmentation Offload"/USO), as
 *                      wireguard-go's conn/ does;
 *  11. flush()         sendmmsg() the messages queued, runs of one socket's
 *                      messages in order; the kernel writes the outer IPv4
 *                      header (TTL/TOS per message by cmsg, DF clear).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/udp.h>

#include "proto.h"
#include "tpb.h"
#include "pop.h"

#define TX_MSGS 256             /* messages queued before a flush */
#define TX_SEGS 512             /* their headers (GRE + segment's IP/L4) */
#define TX_IOVS 1024
#define SEG_HDR (16 + GSO_HDR_MAX)
/* UDP GSO: at most UDP_MAX_SEGMENTS (64 before Linux 6.9) datagrams per
 * message, and a payload an IPv4 UDP datagram could carry. */
#define UDP_GSO_SEGS 64
#define UDP_GSO_BYTES (65535 - 20 - UDP_HLEN)
#define TUN_F_VALID (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)

struct tx_meta {
    uint32_t peer;              /* index of pop->peers */
    uint32_t segs;              /* inner packets the message carries */
    uint64_t bytes;             /* their bytes */
    uint8_t udp;                /* through the UDP socket */
    uint8_t gso;                /* with UDP_SEGMENT */
};

struct pop_tx {
    struct mmsghdr msg[TX_MSGS];
    struct tx_meta meta[TX_MSGS];
    struct sockaddr_in to[TX_MSGS];  /* a copy: the endpoint may move */
    union {
        char buf[CMSG_SPACE(sizeof(int)) * 2 + CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } ctl[TX_MSGS];
    uint8_t hdr[TX_SEGS][SEG_HDR];
    struct iovec iov[TX_IOVS];
    uint32_t nmsg, nseg, niov;
};

struct pop_tx *pop_tx_new(void)
{
    return calloc(1, sizeof(struct pop_tx));
}

/* 11. ----------------------------------------------------------------- */

/* A UDP GSO message the kernel refused (EMSGSIZE: the route's MTU below
 * a datagram; EIO: no checksum offload on the way out; EINVAL): its
 * datagrams one by one, as a peer without GSO would have had them (the
 * kernel fragments what the path cannot carry whole: DF is clear), and
 * that peer's next super-packets likewise (split()).  Its iovecs are two
 * per datagram, GRE and inner headers then the segment's payload. */
static void ungso(struct tpb_pop *pop, struct mmsghdr *mm, struct tx_meta *mt)
{
    struct msghdr one = mm->msg_hdr;
    struct peer *p = &pop->peers[mt->peer];
    size_t k, len;

    p->udp_gso_off = 1;
    one.msg_controllen = CMSG_SPACE(sizeof(int)) * 2;   /* TTL, TOS: not UDP_SEGMENT */
    one.msg_iovlen = 2;
    for (k = 0; k + 1 < mm->msg_hdr.msg_iovlen; k += 2) {
        one.msg_iov = &mm->msg_hdr.msg_iov[k];
        len = one.msg_iov[0].iov_len + one.msg_iov[1].iov_len;
        if (sendmsg(pop->udp, &one, 0) < 0) {
            p->c.drop[TPB_DROP_SEND]++;
            continue;
        }
        p->c.encap_packets++;
        p->c.encap_bytes += len - gre_hlen(p->tx.csum, p->tx.has_key, p->tx.seq);
    }
}

static void flush(struct tpb_pop *pop)
{
    struct pop_tx *tx = pop->tx;
    struct tx_meta *mt;
    uint32_t i, k;
    int sent;

    for (i = 0; i < tx->nmsg;) {
        /* runs of one socket's messages, in order */
        for (k = i + 1; k < tx->nmsg && tx->meta[k].udp == tx->meta[i].udp; k++) {
        }
        sent = sendmmsg(tx->meta[i].udp ? pop->udp : pop->raw, &tx->msg[i], k - i, 0);
        if (sent <= 0) {
            if (sent < 0 && errno == EINTR)
                continue;
            mt = &tx->meta[i];
            if (mt->gso && (errno == EMSGSIZE || errno == EINVAL || errno == EIO))
                ungso(pop, &tx->msg[i], mt);
            else
                pop->peers[mt->peer].c.drop[TPB_DROP_SEND] += mt->segs;
            i++;
            continue;
        }
        for (k = i; k < i + (uint32_t)sent; k++) {
            mt = &tx->meta[k];
            pop->peers[mt->peer].c.encap_packets += mt->segs;
            pop->peers[mt->peer].c.encap_bytes += mt->bytes;
        }
        i += (uint32_t)sent;
    }
    tx->nmsg = tx->nseg = tx->niov = 0;
}

/* A new message to p, room made for it (segs headers, 2 iovecs each):
 * TTL and TOS from the inner header as the peer's settings say. */
static struct msghdr *msg_new(struct tpb_pop *pop, struct peer *p, uint32_t segs,
                              uint16_t proto, const uint8_t *inner)
{
    struct pop_tx *tx = pop->tx;
    struct msghdr *m;
    struct cmsghdr *c = NULL;
    uint32_t i;

    if (tx->nmsg + 1 > TX_MSGS || tx->nseg + segs > TX_SEGS ||
        tx->niov + 2 * segs > TX_IOVS)
        flush(pop);
    i = tx->nmsg++;
    m = &tx->msg[i].msg_hdr;
    memset(m, 0, sizeof(*m));
    tx->to[i] = p->sa;
    m->msg_name = &tx->to[i];
    m->msg_namelen = sizeof(tx->to[i]);
    m->msg_iov = &tx->iov[tx->niov];
    m->msg_control = tx->ctl[i].buf;
    m->msg_controllen = CMSG_SPACE(sizeof(int)) * 2;
    add_cmsg_int(m, &c, IP_TTL, outer_ttl(&p->tx, proto, inner));
    add_cmsg_int(m, &c, IP_TOS, outer_tos(&p->tx, proto, inner));
    memset(&tx->meta[i], 0, sizeof(tx->meta[i]));
    tx->meta[i].peer = (uint32_t)(p - pop->peers);
    tx->meta[i].udp = p->cfg.encap == TPB_ENCAP_UDP;
    return m;
}

static void msg_iov(struct pop_tx *tx, struct msghdr *m, void *base, size_t len)
{
    tx->iov[tx->niov].iov_base = base;
    tx->iov[tx->niov].iov_len = len;
    tx->niov++;
    m->msg_iovlen++;
}

/* The message just made (the last queued) carries a UDP GSO super-packet
 * of datagrams gso_size long: UDP_SEGMENT (SOL_UDP, a u16). */
static void msg_gso(struct pop_tx *tx, struct msghdr *m, uint16_t gso_size)
{
    struct cmsghdr *c = (struct cmsghdr *)((char *)m->msg_control +
                                           CMSG_SPACE(sizeof(int)) * 2);

    m->msg_controllen += CMSG_SPACE(sizeof(uint16_t));
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(c), &gso_size, sizeof(gso_size));
    tx->meta[tx->nmsg - 1].gso = 1;
}

/* One packet as it is, behind the peer's GRE header. */
static void one(struct tpb_pop *pop, struct peer *p, uint8_t *pkt, size_t len,
                uint16_t proto)
{
    struct pop_tx *tx = pop->tx;
    struct msghdr *m = msg_new(pop, p, 1, proto, pkt);
    uint8_t *h = tx->hdr[tx->nseg++];
    size_t glen = gre_header(&p->tx, h, proto, len, p->tx.csum ? csum_add(0, pkt, len) : 0);

    msg_iov(tx, m, h, glen);
    msg_iov(tx, m, pkt, len);
    tx->meta[tx->nmsg - 1].segs = 1;
    tx->meta[tx->nmsg - 1].bytes = len;
}

/* 10. ----------------------------------------------------------------- */

static void split(struct tpb_pop *pop, struct peer *p, struct gso_plan *s,
                  uint16_t proto)
{
    struct pop_tx *tx = pop->tx;
    size_t glen = gre_hlen(p->tx.csum, p->tx.has_key, p->tx.seq), over, d;
    int udp = p->cfg.encap == TPB_ENCAP_UDP;
    uint32_t n, k, per = 1, j;
    struct msghdr *m = NULL;
    const uint8_t *data;
    uint8_t *h;

    /* The tunnel packet of a full segment fits the TUN device's MTU. */
    over = 20 + (udp ? UDP_HLEN : 0) + glen + s->hl;
    if (pop->tun_mtu > over + 64 && pop->tun_mtu - over < s->mss)
        s->mss = (uint16_t)(pop->tun_mtu - over);
    n = gso_count(s);
    if (udp && !p->udp_gso_off) {
        per = (uint32_t)(UDP_GSO_BYTES / (glen + s->hl + s->mss));
        if (per > UDP_GSO_SEGS)
            per = UDP_GSO_SEGS;
        if (per < 1)
            per = 1;
    }
    for (k = 0; k < n; k++) {
        j = k % per;
        if (!j) {
            uint32_t segs = n - k < per ? n - k : per;

            m = msg_new(pop, p, segs, proto, s->ip);
            if (segs > 1)
                msg_gso(tx, m, (uint16_t)(glen + s->hl + s->mss));
        }
        h = tx->hdr[tx->nseg++];
        d = gso_seg(s, h + glen, k, n, &data);
        gre_header(&p->tx, h, proto, s->hl + d,
                   p->tx.csum ? csum_add(csum_add(0, h + glen, s->hl), data, d) : 0);
        msg_iov(tx, m, h, glen + s->hl);
        msg_iov(tx, m, (void *)data, d);
        tx->meta[tx->nmsg - 1].segs++;
        tx->meta[tx->nmsg - 1].bytes += s->hl + d;
    }
    p->c.gso_packets++;
    p->c.gso_segments += n;
}

/* 8. ------------------------------------------------------------------ */

/* The vnet header the TUN device put before pkt: 0, with *s planned for a
 * super-packet (s->mss 0: a plain packet, its checksum completed), or -1
 * (gso_bad).  *proto and dst: the inner packet's family and destination,
 * read once the checksum is complete (it may lie anywhere). */
static int vnet_check(struct virtio_net_hdr *vh, uint8_t *pkt, size_t len,
                      int *proto, uint8_t dst[16], struct gso_plan *s)
{
    size_t ilen;

    s->mss = 0;
    *proto = 0;
    if (vh->flags & ~TUN_F_VALID)
        return -1;
    if (vh->gso_type == VIRTIO_NET_HDR_GSO_NONE) {
        if ((vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && finish_csum(pkt, len, vh, 0))
            return -1;
        *proto = inner_addr(pkt, len, 1, dst);
        return 0;
    }
    *proto = inner_addr(pkt, len, 1, dst);
    /* The kernel marks every super-packet's checksum partial; each
     * segment's is computed afresh (gso_seg()), so it is not finished. */
    if (!(vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || !*proto)
        return -1;
    ilen = ip_len(pkt, len, (uint16_t)*proto);
    if (!ilen || gso_plan(s, pkt, ilen, (uint16_t)*proto, vh->gso_type, vh->gso_size) < 0)
        return -1;
    /* ECN (TUN_F_TSO_ECN) goes with TCP only */
    if ((vh->gso_type & VIRTIO_NET_HDR_GSO_ECN) && !s->tcp)
        return -1;
    return 0;
}

int to_bridges(struct tpb_pop *pop)
{
    uint32_t n = 0;
    uint8_t dst[16], *pkt;
    struct virtio_net_hdr *vh;
    struct gso_plan s;
    struct peer *p;
    ssize_t len;
    int proto;

    while (n < pop->batch) {
        vh = (struct virtio_net_hdr *)(pop->sbuf + (size_t)n * (BUF_SIZE + VNET_LEN));
        pkt = (uint8_t *)vh + VNET_LEN;
        len = read(pop->tun, vh, BUF_SIZE + VNET_LEN) - (ssize_t)VNET_LEN;
        if (len <= 0)
            break;
        n++;                    /* its buffer stays the packet's until flush() */
        if (vnet_check(vh, pkt, (size_t)len, &proto, dst, &s)) {
            pop->global.drop[vh->gso_type == VIRTIO_NET_HDR_GSO_NONE
                                 ? TPB_DROP_INNER_BAD : TPB_DROP_GSO_BAD]++;
            continue;
        }
        p = proto ? route(pop, dst) : NULL;
        if (!p) {
            pop->global.drop[proto ? TPB_DROP_NO_PEER : TPB_DROP_INNER_BAD]++;
            continue;
        }
        if (p->cfg.encap == TPB_ENCAP_UDP && !p->sa.sin_port) {
            p->c.drop[TPB_DROP_NO_ENDPOINT]++;   /* NAT'd, not heard from yet */
            continue;
        }
        if (s.mss)
            split(pop, p, &s, (uint16_t)proto);
        else
            one(pop, p, pkt, (size_t)len, (uint16_t)proto);
    }
    flush(pop);
    return (int)n;
}
