/* udpgso.c — a TCP super-packet leaves the bridge as one GRE-in-UDP UDP
 * GSO message, which the kernel (or the NIC) cuts into datagrams.
 *
 * GRE has no GSO type a packet socket can hand the kernel, so a plain GRE
 * tunnel sends a 64 KB super-packet as ~45 messages, each its own skb,
 * qdisc pass and device transmit.  UDP has one: VIRTIO_NET_HDR_GSO_UDP_L4
 * (Linux >= 6.2 from a packet socket's vnet header), whose payload the
 * kernel cuts every gso_size bytes, giving each piece its own IPv4 header
 * (the ID counting up), UDP header and checksum.  Each piece here is one
 * GRE header + one inner TCP segment, all of one size but the last: RFC
 * 8086 framing, exactly what per-packet GRE-in-UDP would have sent.
 *
 * A segment passes these stages:
 *   1. ugso_add()     (segment.c hands it each segment of a super-packet,
 *                     encap.c's fit() being the per-packet alternative):
 *                     one that needs fragmenting or an ICMP too big goes
 *                     to fit(); a message that is full (64 datagrams, the
 *                     UDP length limit) or whose size it breaks is sent
 *                     first; then its GRE header and inner headers are
 *                     written behind the others, and its payload, still
 *                     in the ring slot the frame holds until the message
 *                     has left, is pointed at, not copied (the kernel
 *                     copies it into its skb anyway: a copy here cost
 *                     ~7 % of the CPU in the chain lab's profile);
 *   2. ugso_flush()   (after the super-packet's last segment) vnet header,
 *                     Ethernet header as received, outer IPv4 and UDP
 *                     headers in front; the UDP checksum left partial (the
 *                     pseudo-header sum) for the kernel to finish per
 *                     datagram, or computed here when there is only one;
 *                     sent at once, since the next super-packet reuses the
 *                     buffer.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <linux/if_ether.h>

#include "bridge.h"

/* The outer IPv4 total length is 16 bits: the UDP payload's limit. */
#define UGSO_MAX_PAYLOAD (65535u - 20u - UDP_HLEN)
/* vnet header, Ethernet header with a VLAN tag, IPv4, UDP */
#define UGSO_ROOM 64u

/* VIRTIO_NET_HDR_GSO_UDP_L4 from a packet socket: Linux 6.2 (commit
 * 860b7f27b8f7, "linux/virtio_net.h: Support USO offload in vnet header").
 * An older kernel refuses the message (EINVAL): there, per-packet. */
static int kernel_takes_uso(void)
{
    struct utsname u;
    unsigned major = 0, minor = 0;

    if (uname(&u) || sscanf(u.release, "%u.%u", &major, &minor) != 2)
        return 0;
    return major > 6 || (major == 6 && minor >= 2);
}

/* The buffer is there whatever the encapsulation (64 KB): a reload may
 * switch a running bridge to GRE-in-UDP (encap.c looks at gtx.udp). */
int ugso_init(struct tpb_bridge *br)
{
    br->ugso.buf = NULL;
    if (!kernel_takes_uso())
        return 0;
    br->ugso.buf = malloc(UGSO_ROOM + UGSO_MAX_PAYLOAD);
    return br->ugso.buf ? 0 : -1;
}

void ugso_free(struct tpb_bridge *br)
{
    free(br->ugso.buf);
    br->ugso.buf = NULL;
}

/* 1. ------------------------------------------------------------------ */

/* Adds n bytes at p to the message, as the last iovec's continuation
 * where they follow on in memory (headers and copied payloads in buf). */
static void ugso_iov(struct ugso *u, const uint8_t *p, size_t n)
{
    struct iovec *v = &u->iov[u->niov - 1];

    if ((const uint8_t *)v->iov_base + v->iov_len == p) {
        v->iov_len += n;
        return;
    }
    u->iov[u->niov].iov_base = (void *)p;
    u->iov[u->niov].iov_len = n;
    u->niov++;
}

/* The frame's own bytes (its ring slot), which stay put until the
 * message leaves: ugso_flush() runs before encap_frame() returns. */
static int in_frame(const struct frame *f, const uint8_t *p, size_t n)
{
    return p >= f->mac && n <= f->len && p - f->mac <= (ptrdiff_t)(f->len - n);
}

void ugso_add(struct tpb_bridge *br, struct frame *f, struct inner *p)
{
    struct ugso *u = &br->ugso;
    size_t glen = gre_hlen(br->gtx.csum, br->gtx.has_key, br->gtx.seq);
    size_t ilen = p->hlen + p->dlen, size = glen + ilen;
    uint8_t hdr[128], *g;
    uint32_t psum = 0;

    /* p->hdr is in the tx arena, which a flush below hands out again:
     * kept here first (segment() makes headers of at most 120 bytes). */
    if (p->hlen > sizeof(hdr) ||
        br->overhead + ilen > br->cfg.mtu) {   /* to be fragmented, or ICMP */
        if (u->n) {
            struct inner moved = *p;

            memcpy(hdr, p->hdr, p->hlen < sizeof(hdr) ? p->hlen : sizeof(hdr));
            ugso_flush(br, f);
            moved.hdr = txq_alloc(&br->q[TPB_PORT_OUT], p->hlen);
            if (!moved.hdr || p->hlen > sizeof(hdr)) {
                br->tc.drop[TPB_DROP_GSO_BAD]++;
                return;
            }
            memcpy(moved.hdr, hdr, p->hlen);
            encap_fit(br, f, &moved);
            return;
        }
        encap_fit(br, f, p);
        return;
    }
    memcpy(hdr, p->hdr, p->hlen);
    if (u->n && (size > u->seg || u->n == UGSO_MAX_SEGS ||
                 u->used + size > UGSO_MAX_PAYLOAD))
        ugso_flush(br, f);
    if (!u->n) {
        u->seg = size;
        u->proto = p->proto;
        u->ilen0 = ilen;
        memcpy(u->inner0, hdr, p->hlen < sizeof(u->inner0) ? p->hlen
                                                           : sizeof(u->inner0));
        u->iov[0].iov_base = u->buf + UGSO_ROOM;     /* ugso_flush's headers */
        u->iov[0].iov_len = 0;
        u->niov = 1;
    }
    if (br->gtx.csum)
        psum = csum_add(csum_add(0, hdr, p->hlen), p->data, p->dlen);
    g = u->buf + UGSO_ROOM + u->bused;
    gre_header(&br->gtx, g, p->proto, ilen, psum);
    memcpy(g + glen, hdr, p->hlen);
    ugso_iov(u, g, glen + p->hlen);
    u->bused += glen + p->hlen;
    if (p->dlen && in_frame(f, p->data, p->dlen)) {
        ugso_iov(u, p->data, p->dlen);
    } else if (p->dlen) {
        memcpy(g + glen + p->hlen, p->data, p->dlen);
        ugso_iov(u, g + glen + p->hlen, p->dlen);
        u->bused += p->dlen;
    }
    u->used += size;
    u->ibytes += (uint32_t)ilen;
    u->n++;
    if (size < u->seg)         /* only the last datagram may be shorter */
        ugso_flush(br, f);
}

/* 2. ------------------------------------------------------------------ */

void ugso_flush(struct tpb_bridge *br, struct frame *f)
{
    struct ugso *u = &br->ugso;
    struct txq *q = &br->q[TPB_PORT_OUT];
    struct virtio_net_hdr *vh;
    uint8_t eth[18], *ip = u->buf + UGSO_ROOM - 20 - UDP_HLEN, *udp = ip + 20;
    size_t elen, ulen = UDP_HLEN + u->used, start;
    uint32_t sum, i;

    if (!u->n)
        return;
    elen = eth_write(eth, f->mac, f->mac + 6, f, ETYPE_IPV4);
    start = UGSO_ROOM - 20 - UDP_HLEN - elen - VNET_LEN;
    memcpy(ip - elen, eth, elen);
    gre_udp_outer(&br->gtx, ip, u->proto, u->inner0, u->ilen0, ulen, u->n);
    vh = (struct virtio_net_hdr *)(u->buf + start);
    memset(vh, 0, VNET_LEN);
    sum = csum_pseudo4(ip, IPPROTO_UDP_, (uint32_t)ulen);
    if (u->n == 1) {
        /* RFC 768: a sum of zero goes as all ones.  The headers are
         * in buf behind the UDP header, the payload (of any length, it
         * is last) there too or in iov[1]. */
        uint8_t *end = u->buf + UGSO_ROOM + u->bused;
        uint16_t c;

        sum = csum_add(sum, udp, (size_t)(end - udp));
        if (u->niov > 1)
            sum = csum_add(sum, u->iov[1].iov_base, u->iov[1].iov_len);
        c = csum_finish(sum);
        wr16(udp + 6, c ? c : 0xffff);
    } else {
        /* CHECKSUM_PARTIAL: the field holds the pseudo-header sum over the
         * whole length; __udp_gso_segment() adjusts it for each datagram's
         * length, and the device (or skb_checksum_help) finishes it. */
        wr16(udp + 6, (uint16_t)~csum_finish(sum));
        vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh->csum_start = (uint16_t)(elen + 20);
        vh->csum_offset = 6;
        vh->gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
        vh->gso_size = (uint16_t)u->seg;
        vh->hdr_len = (uint16_t)(elen + 20 + UDP_HLEN);
        br->tc.udp_gso_sent++;
    }
    u->iov[0].iov_base = u->buf + start;
    u->iov[0].iov_len += UGSO_ROOM - start;
    i = txq_reserve_long(q, u->niov);
    memcpy(q->msg[i].msg_hdr.msg_iov, u->iov, u->niov * sizeof(struct iovec));
    txq_commit_queued(q, i, (int)u->niov);
    txq_account_n(q, i, TXQ_ACCT_ENCAP, u->ibytes, u->n);
    /* The buffer is the next super-packet's: this one leaves now, behind
     * whatever was queued before it. */
    txq_flush(q);
    u->n = 0;
    u->used = 0;
    u->bused = 0;
    u->ibytes = 0;
}
