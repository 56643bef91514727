/* pop_gro.c — `tpb pop` toward the TUN device: consecutive TCP segments
 * and UDP datagrams of one flow from one bridge, written as one
 * super-packet.
 *
 * The bridges send a TCP flow as MTU-sized tunnel packets, and a UDP flow
 * (QUIC, media, a flood) as datagrams; written one by one, each costs a
 * write() and a trip through the host's stack.  What the host's GRO would
 * do for a NIC (net/ipv4/tcp_offload.c: tcp_gro_receive; udp_offload.c:
 * udp_gro_receive_segment) is done here for the TUN device, as
 * wireguard-go's tun/offload_linux.go does: a run of packets that the host
 * could have merged goes in one writev() behind a vnet header with
 * VIRTIO_NET_HDR_GSO_TCPV4/6 or _UDP_L4, and the host segments it again
 * only where it must (a NIC with TSO/USO, or a local socket, takes it
 * whole).  Up to GRO_FLOWS flows are held at once, each in the slot its
 * flow hashes to (as the kernel's GRO keeps a list per hash bucket): the
 * flows of a batch arrive interleaved.
 *
 * For each packet from_peer() (pop_rx.c) accepted:
 *   1. candidate()     it may be merged at all: TCP or UDP right behind an
 *                      IPv4 header without options (or IPv6 without
 *                      extension headers), not a fragment, no larger than
 *                      the TUN device's MTU (one the host's GRO merged, or
 *                      that was reassembled, goes alone as before), a
 *                      payload, and its checksum right (RFC 9293 3.1, RFC
 *                      768): merged, a packet's own checksum is gone and
 *                      the super-packet's is computed afresh, so a damaged
 *                      one would otherwise be delivered as intact.  TCP:
 *                      flags ACK or ACK|PSH only.  UDP: its length field
 *                      the IP payload's, its checksum not 0 (none to
 *                      check).  A peer with sequence numbers is never held
 *                      (its window must move per packet, before the next
 *                      one is checked, RFC 2890);
 *   2. gro_verdict()   finds the flow's slot; joins the group held there
 *                      (GRO_APPEND) when the packet is the flow's next one
 *                      from the same peer as the kernel's GRO would take
 *                      it: same addresses, ports, TOS, TTL, DF (IPv6:
 *                      class, flow label, hop limit); IPv4 ID the next
 *                      one, or for UDP with DF the same as the first's
 *                      (RFC 6864 4.1: an atomic datagram's ID means
 *                      nothing; the host's segmentation numbers them
 *                      anew); TCP: ACK number, window, options, its
 *                      sequence number the next byte; no longer than the
 *                      first one's payload (gso_size), the group not
 *                      closed (a short packet, or TCP's PSH, ends it), at
 *                      most 64 packets and 64 KB.  Else GRO_START: the
 *                      slot's group is written out first.  A packet that
 *                      may not be merged (GRO_NONE) writes out its flow's
 *                      group first, or every group if it has no ports;
 *   3. gro_hold()      held: the first packet whole, the others' payloads
 *                      as iovecs into the receive buffers (no copy);
 *   4. gro_flush()     every group, at the end of each receive batch
 *                      (before its buffers are reused), in the order their
 *                      last packets came: one packet goes as it was
 *                      (tun_write()); more: the first packet's header made
 *                      the merged one's (lengths, IPv4 header checksum,
 *                      TCP's PSH of the last, the checksum field the
 *                      pseudo-header sum that NEEDS_CSUM asks for) and
 *                      written in one writev(); then, as for one packet,
 *                      the counters (gro_packets, gro_segments), the
 *                      learned entry and a NAT'd peer's endpoint.
 *
 * The learned table sees the packets in order: a packet that would make a
 * new entry has every held group written first (gro_learn_new), so that
 * no two groups wait to take the same free slot.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "proto.h"
#include "tpb.h"
#include "pop.h"

#define GRO_SEGS 64
#define GRO_FLOW_BITS 4
#define GRO_FLOWS (1u << GRO_FLOW_BITS)     /* slots; at most 32 (held) */
#define GRO_ALL GRO_FLOWS       /* c_slot of a packet without ports */
#define TCP_ACK 0x10
#define TCP_PSH 0x08

enum { ID_NEXT, ID_FIXED };

struct gro_group {
    uint32_t n;                 /* packets held; 0: none */
    struct peer *p;
    uint8_t *first;             /* the first packet, whole */
    size_t first_len;
    uint16_t proto;
    uint8_t udp;
    uint8_t id_mode;            /* IPv4 IDs: ID_NEXT, or ID_FIXED (UDP, DF) */
    size_t l4, thl;             /* its transport header's offset and length */
    size_t total;               /* the merged packet's length */
    uint16_t gso_size;          /* the first packet's payload */
    uint32_t next_seq;          /* TCP: the sequence number that joins */
    uint16_t next_id;           /* the IPv4 ID that joins (ID_NEXT) */
    uint8_t closed;             /* nothing more joins */
    uint8_t psh;                /* TCP: the last one held had PSH */
    uint64_t bytes;
    uint64_t stamp;             /* its last packet's place in the arrivals */
    /* what from_peer() commits once the group is written */
    struct gre_pkt gp;
    struct learned *slot;
    uint8_t a[16];
    struct sockaddr_in from;
    uint8_t has_from;
    struct iovec iov[2 + GRO_SEGS];
};

struct pop_gro {
    uint32_t held;              /* bit k: slot k holds a group */
    uint64_t stamp;             /* packets held so far */
    /* the last gro_verdict()'s findings, for gro_hold() */
    uint32_t c_slot;
    uint8_t c_udp, c_id_mode;
    size_t c_l4, c_thl, c_plen;
    struct gro_group g[GRO_FLOWS];
};

struct pop_gro *pop_gro_new(void)
{
    return calloc(1, sizeof(struct pop_gro));
}

/* 1. ------------------------------------------------------------------ */

/* Whether in's l4proto checksum (its header at l4) is right. */
static int l4_sum_ok(const uint8_t *in, size_t ilen, uint16_t proto, size_t l4, uint8_t l4proto)
{
    return csum_finish(csum_add(l4_pseudo(in, ilen, proto, l4, l4proto), in + l4, ilen - l4)) == 0;
}

static int tcp_candidate(const uint8_t *in, size_t ilen, uint16_t proto,
                         size_t *l4, size_t *thl)
{
    uint8_t fl;

    /* no payload (a pure ACK): alone; IPv4 options: GRO would not merge */
    if (!tcp_super(in, ilen, proto, l4, thl) || (proto == ETYPE_IPV4 && *l4 != 20))
        return 0;
    fl = in[*l4 + 13];
    if ((in[*l4 + 12] & 0x0f) || (fl != TCP_ACK && fl != (TCP_ACK | TCP_PSH)))
        return 0;
    return l4_sum_ok(in, ilen, proto, *l4, IPPROTO_TCP_);
}

/* The transport protocol and header offset of in, when it has ports: TCP
 * or UDP, no IPv4 options or fragment, no IPv6 extension header; else 0. */
static uint8_t l4_of(const uint8_t *in, size_t ilen, uint16_t proto, size_t *l4)
{
    uint8_t pr;

    if (proto == ETYPE_IPV4) {
        if ((in[0] & 0x0f) != 5 || (rd16(in + 6) & (IP_MF | IP_OFFMASK)))
            return 0;
        pr = in[9];
        *l4 = 20;
    } else {
        pr = in[6];
        *l4 = 40;
    }
    if ((pr != IPPROTO_TCP_ && pr != IPPROTO_UDP_) || *l4 + 4 > ilen)
        return 0;
    return pr;
}

static int udp_candidate(const uint8_t *in, size_t ilen, uint16_t proto, size_t l4)
{
    if (ilen <= l4 + UDP_HLEN || rd16(in + l4 + 4) != ilen - l4 || !rd16(in + l4 + 6))
        return 0;
    return l4_sum_ok(in, ilen, proto, l4, IPPROTO_UDP_);
}

/* The slot of in's flow from peer p: its addresses, protocol and ports. */
static uint32_t flow_slot(const struct tpb_pop *pop, const struct peer *p,
                          const uint8_t *in, uint16_t proto, size_t l4)
{
    uint32_t h = (uint32_t)(p - pop->peers) * 0x9e3779b1u ^ rd32(in + l4);
    size_t i, a = proto == ETYPE_IPV4 ? 12 : 8, end = proto == ETYPE_IPV4 ? 20 : 40;

    for (i = a; i < end; i += 4)
        h = (h ^ rd32(in + i)) * 0x01000193u;
    h ^= in[proto == ETYPE_IPV4 ? 9 : 6];
    h *= 0x9e3779b1u;
    return h >> (32 - GRO_FLOW_BITS);
}

/* 2. ------------------------------------------------------------------ */

/* Whether UDP datagram in is the next of g's flow (c_* found); sets
 * c_id_mode. */
static int udp_follows(struct pop_gro *x, const struct gro_group *g, const uint8_t *in,
                       uint16_t proto)
{
    const uint8_t *a = g->first;
    uint16_t id;

    if (proto == ETYPE_IPV6)
        return !memcmp(a, in, 4) && !memcmp(a + 6, in + 6, 34) && !memcmp(a + 40, in + 40, 4);
    /* TOS; flags (DF); TTL, protocol; addresses; ports */
    if (a[1] != in[1] || memcmp(a + 6, in + 6, 4) || memcmp(a + 12, in + 12, 12))
        return 0;
    id = rd16(in + 4);
    if (g->n == 1 && id == g->next_id) {
        x->c_id_mode = ID_NEXT;
        return 1;
    }
    if (g->n == 1 && (rd16(a + 6) & IP_DF) && id == rd16(a + 4)) {
        x->c_id_mode = ID_FIXED;
        return 1;
    }
    x->c_id_mode = g->id_mode;
    return g->id_mode == ID_NEXT ? id == g->next_id : id == rd16(a + 4);
}

static int joins(struct pop_gro *x, const struct gro_group *g, const struct peer *p,
                 const uint8_t *in, uint16_t proto)
{
    if (!g->n || g->closed || g->p != p || g->proto != proto || g->udp != x->c_udp ||
        g->thl != x->c_thl || x->c_plen > g->gso_size ||
        g->total + x->c_plen > (proto == ETYPE_IPV4 ? 65535u : 65535u + 40))
        return 0;
    if (g->udp)
        return udp_follows(x, g, in, proto);
    return tcp_seg_follows(g->first, in, proto, g->thl, g->next_id, g->next_seq);
}

int gro_verdict(struct tpb_pop *pop, const struct peer *p, const uint8_t *in,
                size_t ilen, uint16_t proto)
{
    struct pop_gro *x = pop->gro;
    size_t l4;
    uint8_t pr = l4_of(in, ilen, proto, &l4);

    x->c_slot = pr ? flow_slot(pop, p, in, proto, l4) : GRO_ALL;
    if (!pr || p->cfg.seq || ilen > pop->tun_mtu)
        return GRO_NONE;
    if (pr == IPPROTO_TCP_) {
        if (!tcp_candidate(in, ilen, proto, &x->c_l4, &x->c_thl))
            return GRO_NONE;
        x->c_udp = 0;
    } else {
        if (!pop->tun_uso || !udp_candidate(in, ilen, proto, l4))
            return GRO_NONE;
        x->c_l4 = l4;
        x->c_thl = UDP_HLEN;
        x->c_udp = 1;
    }
    x->c_plen = ilen - x->c_l4 - x->c_thl;
    return joins(x, &x->g[x->c_slot], p, in, proto) ? GRO_APPEND : GRO_START;
}

/* 3. ------------------------------------------------------------------ */

void gro_hold(struct tpb_pop *pop, int verdict, struct peer *p, uint8_t *in,
              size_t ilen, uint16_t proto, const struct gre_pkt *gp,
              struct learned *slot, const uint8_t a[16],
              const struct sockaddr_in *from)
{
    struct pop_gro *x = pop->gro;
    struct gro_group *g = &x->g[x->c_slot];
    uint8_t *t = in + x->c_l4;

    if (verdict == GRO_START) {
        g->n = 1;
        g->p = p;
        g->first = in;
        g->first_len = ilen;
        g->proto = proto;
        g->udp = x->c_udp;
        g->id_mode = ID_NEXT;
        g->psh = 0;
        g->l4 = x->c_l4;
        g->thl = x->c_thl;
        g->total = ilen;
        g->gso_size = (uint16_t)x->c_plen;
        g->next_id = (uint16_t)(proto == ETYPE_IPV4 ? rd16(in + 4) + 1 : 0);
        g->bytes = ilen;
        g->iov[1].iov_base = in;
        g->iov[1].iov_len = ilen;
        memcpy(g->a, a, 16);
        x->held |= 1u << x->c_slot;
    } else {
        g->iov[1 + g->n].iov_base = t + x->c_thl;
        g->iov[1 + g->n].iov_len = x->c_plen;
        g->n++;
        g->total += x->c_plen;
        g->next_id++;
        g->bytes += ilen;
        if (g->udp)
            g->id_mode = x->c_id_mode;
    }
    if (!g->udp) {
        g->next_seq = rd32(t + 4) + (uint32_t)x->c_plen;
        g->psh = (t[13] & TCP_PSH) != 0;
    }
    g->closed = g->psh || x->c_plen < g->gso_size || g->n >= GRO_SEGS;
    g->stamp = ++x->stamp;
    g->gp = *gp;
    g->slot = slot;
    g->has_from = from != NULL;
    if (from)
        g->from = *from;
}

/* 4. ------------------------------------------------------------------ */

static int write_merged(struct tpb_pop *pop, struct gro_group *g)
{
    struct virtio_net_hdr vh;
    uint8_t *f = g->first, *t = f + g->l4;
    ssize_t n;

    if (g->proto == ETYPE_IPV4) {
        wr16(f + 2, (uint16_t)g->total);
        ip4_set_csum(f);
    } else {
        wr16(f + 4, (uint16_t)(g->total - 40));
    }
    memset(&vh, 0, sizeof(vh));
    if (g->udp) {
        /* the pseudo-header over the whole length: __udp_gso_segment
         * takes each datagram's from it */
        wr16(t + 4, (uint16_t)(g->total - g->l4));
        wr16(t + 6, l4_pseudo(f, g->total, g->proto, g->l4, IPPROTO_UDP_));
        vh.csum_offset = 6;
        vh.gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
    } else {
        if (g->psh)
            t[13] |= TCP_PSH;
        wr16(t + 16, l4_pseudo(f, g->total, g->proto, g->l4, IPPROTO_TCP_));
        vh.csum_offset = 16;
        vh.gso_type = g->proto == ETYPE_IPV4 ? VIRTIO_NET_HDR_GSO_TCPV4
                                             : VIRTIO_NET_HDR_GSO_TCPV6;
    }
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vh.csum_start = (uint16_t)g->l4;
    vh.gso_size = g->gso_size;
    vh.hdr_len = (uint16_t)(g->l4 + g->thl);
    g->iov[0].iov_base = &vh;
    g->iov[0].iov_len = VNET_LEN;
    do
        n = writev(pop->tun, g->iov, (int)(1 + g->n));
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)(VNET_LEN + g->total))
        return n < 0 ? errno : EIO;        /* a short write: not the packet */
    return 0;
}

static void flush_group(struct tpb_pop *pop, uint32_t k)
{
    struct pop_gro *x = pop->gro;
    struct gro_group *g = &x->g[k];
    struct peer *p = g->p;
    int rc;

    x->held &= ~(1u << k);
    rc = g->n == 1 ? tun_write(pop, p, g->first, g->first_len, g->proto)
                   : write_merged(pop, g);
    if (rc) {
        p->c.drop[tun_drop(rc)] += g->n;
        g->n = 0;
        return;
    }
    /* Delivered: as from_peer() commits one packet */
    gre_commit_seq(&p->rx, &g->gp);
    if (g->slot)
        learn_put(g->slot, pop->peers, g->a, (uint32_t)(p - pop->peers),
                  pop->now_ns + pop->learn_ns);
    if (g->has_from)
        follow(p, &g->from, g->stamp);
    p->c.decap_packets += g->n;
    p->c.decap_bytes += g->bytes;
    if (g->n > 1) {
        p->c.gro_packets++;
        p->c.gro_segments += g->n;
    }
    g->n = 0;
}

void gro_flush(struct tpb_pop *pop)
{
    struct pop_gro *x = pop->gro;
    uint32_t k, best;

    while (x->held) {           /* the oldest last packet first */
        best = GRO_FLOWS;
        for (k = 0; k < GRO_FLOWS; k++)
            if ((x->held >> k & 1) && (best == GRO_FLOWS || x->g[k].stamp < x->g[best].stamp))
                best = k;
        flush_group(pop, best);
    }
}

void gro_make_way(struct tpb_pop *pop, int verdict)
{
    struct pop_gro *x = pop->gro;

    if (verdict == GRO_APPEND)
        return;
    if (x->c_slot == GRO_ALL)
        gro_flush(pop);
    else if (x->held >> x->c_slot & 1)
        flush_group(pop, x->c_slot);
}

int gro_learn_new(struct tpb_pop *pop, const struct learned *slot)
{
    struct pop_gro *x = pop->gro;

    if (!x->held || !slot || slot->expires > pop->now_ns)
        return 0;
    gro_flush(pop);
    return 1;
}

uint64_t gro_stamp(struct tpb_pop *pop)
{
    return ++pop->gro->stamp;
}
