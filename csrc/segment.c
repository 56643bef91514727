/* segment.c — GSO super-packets cut into wire-size packets, in C, the way
 * the kernel's tcp_gso_segment / __udp_gso_segment do it: a GRE packet
 * cannot be handed back to the kernel with a vnet header (there is no GSO
 * type for "GRE around this"), so encapsulated flows are segmented here.
 *
 *   1. finish_csum()   a CHECKSUM_PARTIAL packet's L4 checksum, completed
 *                      from csum_start/csum_offset;
 *   2. gso_plan()      checks the super-packet (a TCP data offset below 5
 *                      refused: RFC 9293); segment() (the bridge) and
 *                      pop_offload.c (the POP) then, per gso_size piece,
 *      gso_seg()       copy the header and:
 *   3. tcp_seg()       copy IP+TCP header, IP length/ID (+1 per segment,
 *                      as Linux without FIXEDID), TCP sequence, CWR only
 *                      on the first, FIN/PSH only on the last, checksums;
 *      udp_seg()       copy IP+UDP header, lengths, IP ID, checksums;
 *   4. each segment is handed to `emit` (encap.c: fit) with its header in
 *      the tx arena and its payload still in the ring slot: no copy;
 *   5. forward()       a frame bridged unchanged (txq_bridge), unless it is
 *                      a tunnel's super-packet the kernel cannot segment:
 *                      then segmented here and re-wrapped (emit_transit).
 */
#define _GNU_SOURCE
#include <string.h>
#include <linux/if_ether.h>

#include "bridge.h"

#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define UDP_CSUM_OFFSET 6   /* where a vnet header points for UDP */

/* 1. ------------------------------------------------------------------ */

int finish_csum(uint8_t *frame, size_t len, const struct virtio_net_hdr *vh,
                size_t from)
{
    size_t start = vh->csum_start, off = vh->csum_offset;
    uint16_t c;

    if (start < from || start + off + 2 > len)
        return -1;
    /* The field holds the pseudo-header sum: summing over it finishes it. */
    c = csum_finish(csum_add(0, frame + start, len - start));
    /* RFC 768: a UDP checksum that computes to zero goes as all ones, since
     * zero means "none".  TCP's zero stays zero: 0xffff is -0, which no
     * sum of real data yields (RFC 1624, 3), and decoders flag it. */
    if (c == 0 && off == UDP_CSUM_OFFSET)
        c = 0xffff;
    wr16(frame + start + off, c);
    return 0;
}

/* 3. ------------------------------------------------------------------ */

static void ip_seg_fields(const struct gso_plan *s, uint8_t *h, size_t d,
                          uint32_t k)
{
    if (s->proto == ETYPE_IPV4) {
        wr16(h + 2, (uint16_t)(s->hl + d));
        wr16(h + 4, (uint16_t)(rd16(s->ip + 4) + k));
        ip4_set_csum(h);
    } else {
        wr16(h + 4, (uint16_t)(s->l4hl + d));
    }
}

static uint32_t l4_pseudo(const struct gso_plan *s, const uint8_t *h,
                          uint8_t l4proto, size_t l4len)
{
    return s->proto == ETYPE_IPV4 ? csum_pseudo4(h, l4proto, (uint32_t)l4len)
                                  : csum_pseudo6(h, l4proto, (uint32_t)l4len);
}

static void tcp_seg(const struct gso_plan *s, uint8_t *h, size_t d, uint32_t k,
                    uint32_t n)
{
    uint8_t *t = h + s->ihl, fl = s->ip[s->ihl + 13];
    uint32_t sum;

    ip_seg_fields(s, h, d, k);
    wr32(t + 4, rd32(s->ip + s->ihl + 4) + k * s->mss);
    if (k > 0)
        fl &= (uint8_t)~TCP_CWR;
    if (k + 1 < n)
        fl &= (uint8_t)~(TCP_FIN | TCP_PSH);
    t[13] = fl;
    wr16(t + 16, 0);
    sum = l4_pseudo(s, h, IPPROTO_TCP_, s->l4hl + d);
    sum = csum_add(csum_add(sum, t, s->l4hl), s->payload + (size_t)k * s->mss, d);
    wr16(t + 16, csum_finish(sum));
}

static void udp_seg(const struct gso_plan *s, uint8_t *h, size_t d, uint32_t k)
{
    uint8_t *u = h + s->ihl;
    uint32_t sum;
    uint16_t c;

    ip_seg_fields(s, h, d, k);
    wr16(u + 4, (uint16_t)(8 + d));
    wr16(u + 6, 0);
    sum = l4_pseudo(s, h, IPPROTO_UDP_, 8 + d);
    sum = csum_add(csum_add(sum, u, 8), s->payload + (size_t)k * s->mss, d);
    c = csum_finish(sum);
    wr16(u + 6, c ? c : 0xffff);
}

/* 2. ------------------------------------------------------------------ */

uint32_t gso_count(const struct gso_plan *s)
{
    return s->mss ? (uint32_t)((s->plen + s->mss - 1) / s->mss) : 0;
}

int gso_plan(struct gso_plan *s, uint8_t *ip, size_t len, uint16_t proto,
             uint8_t gso_type, uint16_t mss)
{
    uint8_t gso = gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN, l4;

    s->ip = ip;
    s->proto = proto;
    s->mss = mss;
    if (proto == ETYPE_IPV4) {
        /* A fragment is no super-packet: segments copy its header, so each
         * would claim the fragment's offset, and only the first fragment
         * holds an L4 header at all (GSO cuts whole datagrams). */
        if (len < 20 || (rd16(ip + 6) & (IP_MF | IP_OFFMASK)))
            return -1;
        s->ihl = (size_t)(ip[0] & 0x0f) * 4;
        l4 = ip[9];
    } else {
        if (len < 40)
            return -1;
        s->ihl = 40;
        l4 = ip[6];
    }
    if ((gso == VIRTIO_NET_HDR_GSO_TCPV4 && proto == ETYPE_IPV4 &&
         l4 == IPPROTO_TCP_) ||
        (gso == VIRTIO_NET_HDR_GSO_TCPV6 && proto == ETYPE_IPV6 &&
         l4 == IPPROTO_TCP_)) {
        if (len < s->ihl + 20)
            return -1;
        s->l4hl = (size_t)(ip[s->ihl + 12] >> 4) * 4;
        /* RFC 9293 3.1: the data offset counts 32-bit words and is at least
         * 5.  Below that, tcp_seg() would write the flags and checksum past
         * the header copied for each segment (s->hl bytes). */
        if (s->l4hl < 20)
            return -1;
        s->tcp = 1;
    } else if (gso == VIRTIO_NET_HDR_GSO_UDP_L4 && l4 == IPPROTO_UDP_) {
        s->l4hl = 8;
        s->tcp = 0;
    } else {
        return -1;
    }
    s->hl = s->ihl + s->l4hl;
    if (!s->mss || s->ihl < 20 || s->hl > len || s->hl > GSO_HDR_MAX)
        return -1;
    s->payload = ip + s->hl;
    s->plen = len - s->hl;
    /* No payload: no segment to make (the caller's gso_bad), where a loop
     * over the segments would emit nothing and the packet vanish
     * uncounted.  No stack makes such a super-packet (tcp_gso_segment
     * sends one of at most gso_size bytes as it is). */
    return s->plen ? (int)gso_count(s) : -1;
}

size_t gso_seg(const struct gso_plan *s, uint8_t *h, uint32_t k, uint32_t n,
               const uint8_t **data)
{
    size_t d = s->plen - (size_t)k * s->mss;

    if (d > s->mss)
        d = s->mss;
    memcpy(h, s->ip, s->hl);
    if (s->tcp)
        tcp_seg(s, h, d, k, n);
    else
        udp_seg(s, h, d, k);
    *data = s->payload + (size_t)k * s->mss;
    return d;
}

int tcp_seg_follows(const uint8_t *a, const uint8_t *b, uint16_t proto,
                    size_t thl, uint16_t id, uint32_t seq)
{
    size_t l4 = proto == ETYPE_IPV4 ? 20 : 40;

    if (proto == ETYPE_IPV4) {
        if (a[1] != b[1] || memcmp(a + 6, b + 6, 4) || memcmp(a + 12, b + 12, 8) ||
            rd16(b + 4) != id)
            return 0;           /* TOS, DF, TTL, protocol, addresses; the ID */
    } else if (memcmp(a, b, 4) || memcmp(a + 6, b + 6, 34)) {
        return 0;               /* class, flow label, next header, hops, addresses */
    }
    a += l4;
    b += l4;
    return !memcmp(a, b, 4) && rd32(b + 4) == seq && !memcmp(a + 8, b + 8, 5) &&
           !memcmp(a + 14, b + 14, 2) && !memcmp(a + 20, b + 20, thl - 20);
    /* ports, the sequence, ACK number and data offset, window, options */
}

int segment(struct tpb_bridge *br, struct txq *q, struct frame *f, uint8_t *ip,
            size_t len, uint16_t proto, const struct virtio_net_hdr *vh,
            inner_fn emit)
{
    uint8_t gso = vh->gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;
    struct gso_plan s;
    struct inner p;
    int n, k;
    uint8_t *h;

    if (gso == VIRTIO_NET_HDR_GSO_UDP) {
        /* UFO: one UDP datagram that is to be IP-fragmented; fit() will.
         * Its checksum is partial only if the header says so: without the
         * flag the sum is the sender's, and the csum fields mean nothing. */
        if ((vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
            finish_csum(f->mac, ETH_HLEN + len, vh, ETH_HLEN + ip_hlen(ip, proto)))
            return -1;
        p.hdr = ip;
        p.hlen = len;
        p.data = NULL;
        p.dlen = 0;
        p.proto = proto;
        emit(br, f, &p);
        return 1;
    }
    n = gso_plan(&s, ip, len, proto, vh->gso_type, vh->gso_size);
    if (n < 0)
        return -1;
    for (k = 0; k < n; k++) {
        h = txq_alloc(q, s.hl);
        if (!h)
            return -1;
        p.dlen = gso_seg(&s, h, (uint32_t)k, (uint32_t)n, &p.data);
        p.hdr = h;
        p.hlen = s.hl;
        p.proto = proto;
        emit(br, f, &p);
    }
    return n;
}

/* 5. ------------------------------------------------------------------ */

/* A tunnel packet's super-packet, bridged: GRO on the receiving port
 * merged GRE (or IP-in-IP) packets of one inner TCP flow.  Its vnet header
 * points at the inner TCP header, and the kernel could not segment it on
 * the way out (it has no GSO type for GRE from a packet socket), so it is
 * segmented here as gre_gso_segment would: per segment the inner headers
 * (tcp_seg), then the outer ones copied, outer length, ID +1 and header
 * checksum, and a GRE checksum if the packet had one. */

/* Where the inner IP header of a GRE or IP-in-IP packet starts (from the
 * MAC header); 0 if the frame is no such packet, -1 if it is one TPB does
 * not take apart (GRE with a sequence number, or carrying Ethernet) or one
 * whose outer headers the frame does not hold. */
static long tunnel_inner(const struct frame *f, uint16_t *iproto,
                         size_t *ohl, size_t *gre_off)
{
    const uint8_t *ip = f->mac + ETH_HLEN, *g;
    uint16_t type = rd16(f->mac + 12), flags;
    size_t avail = f->len - ETH_HLEN;
    uint8_t proto;

    if (type == ETYPE_IPV4 && avail >= 20 && (ip[0] >> 4) == 4 &&
        !(rd16(ip + 6) & (IP_MF | IP_OFFMASK))) {
        *ohl = (size_t)(ip[0] & 0x0f) * 4;
        if (*ohl < 20 || *ohl > avail)
            return -1;
        proto = ip[9];
    } else if (type == ETYPE_IPV6 && avail >= 40 && (ip[0] >> 4) == 6) {
        *ohl = 40;
        proto = ip[6];
    } else {
        return 0;
    }
    *gre_off = 0;
    if (proto == 4 || proto == 41) {
        *iproto = proto == 4 ? ETYPE_IPV4 : ETYPE_IPV6;
        return (long)(ETH_HLEN + *ohl);
    }
    if (proto != IPPROTO_GRE_)
        return 0;
    if (avail < *ohl + 4)
        return -1;
    g = ip + *ohl;
    flags = rd16(g);
    *iproto = rd16(g + 2);
    /* A sequence number would have to differ per segment (GRO does not
     * merge those); an inner Ethernet header is not parsed here. */
    if ((flags & (GRE_VER | GRE_UNKNOWN | GRE_S)) ||
        (*iproto != ETYPE_IPV4 && *iproto != ETYPE_IPV6))
        return -1;
    /* The whole GRE header inside the frame, options included: forward()
     * reads the inner packet from behind it. */
    if (avail < *ohl + gre_hlen(!!(flags & GRE_C), !!(flags & GRE_K), 0))
        return -1;
    *gre_off = *ohl;
    return (long)(ETH_HLEN + *ohl + gre_hlen(!!(flags & GRE_C), !!(flags & GRE_K), 0));
}

static void emit_transit(struct tpb_bridge *br, struct frame *f, struct inner *p)
{
    struct transit *t = &br->transit;
    uint32_t i = txq_reserve(t->q);
    uint8_t *h = t->q->hdr[i], *o, *g;
    size_t n, ilen = p->hlen + p->dlen;
    uint32_t sum;
    int niov = 2;

    memset(h, 0, VNET_LEN);
    n = VNET_LEN + eth_write(h + VNET_LEN, f->mac, f->mac + 6, f, rd16(f->mac + 12));
    o = h + n;
    memcpy(o, f->mac + ETH_HLEN, t->olen);
    if ((o[0] >> 4) == 4) {
        wr16(o + 2, (uint16_t)(t->olen + ilen));
        wr16(o + 4, (uint16_t)(rd16(f->mac + ETH_HLEN + 4) + t->k));
        ip4_set_csum(o);
    } else {
        wr16(o + 4, (uint16_t)(t->olen - 40 + ilen));
    }
    g = o + t->gre_off;
    if (t->gre_off && (rd16(g) & GRE_C)) {   /* RFC 2784 2.5 */
        wr16(g + 4, 0);
        sum = csum_add(csum_add(csum_add(0, g, t->olen - t->gre_off), p->hdr,
                                p->hlen), p->data, p->dlen);
        wr16(g + 4, csum_finish(sum));
    }
    t->q->iov[i][0].iov_base = h;
    t->q->iov[i][0].iov_len = n + t->olen;
    t->q->iov[i][1].iov_base = p->hdr;
    t->q->iov[i][1].iov_len = p->hlen;
    if (p->dlen) {
        t->q->iov[i][2].iov_base = (void *)p->data;
        t->q->iov[i][2].iov_len = p->dlen;
        niov = 3;
    }
    txq_commit(t->q, i, niov);
    t->k++;
}

void forward(struct tpb_bridge *br, struct txq *q, struct frame *f)
{
    const struct virtio_net_hdr *vh = f->vh;
    uint8_t gso = vh->gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;
    size_t ilen = 0, ohl, gre_off;
    uint16_t iproto;
    long in;

    if ((gso != VIRTIO_NET_HDR_GSO_TCPV4 && gso != VIRTIO_NET_HDR_GSO_TCPV6) ||
        !(vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) ||
        !(in = tunnel_inner(f, &iproto, &ohl, &gre_off))) {
        txq_bridge(q, f);   /* a plain super-packet: the kernel segments it */
        return;
    }
    if (in > 0 && vh->csum_start > (size_t)in)
        ilen = ip_len(f->mac + in, f->len - (size_t)in, iproto);
    if (!ilen) {
        /* The kernel would refuse it (or, behind a qdisc, drop it
         * unseen): counted here instead. */
        q->c->drop_gso_bad++;
        return;
    }
    br->transit.q = q;
    br->transit.olen = (size_t)in - ETH_HLEN;
    br->transit.gre_off = gre_off;
    br->transit.k = 0;
    if (segment(br, q, f, f->mac + in, ilen, iproto, vh, emit_transit) < 0)
        q->c->drop_gso_bad++;
}
