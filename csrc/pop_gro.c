/* pop_gro.c — `tpb pop` toward the TUN device: consecutive TCP segments
 * of one flow from one bridge, written as one super-packet.
 *
 * The bridges send a TCP flow as MTU-sized tunnel packets; written one by
 * one, each costs a write() and a trip through the host's stack.  What
 * the host's GRO would do for a NIC (net/ipv4/tcp_offload.c:
 * tcp_gro_receive) is done here for the TUN device, as wireguard-go's
 * tun/offload_linux.go does: a run of segments that the host could have
 * merged goes in one writev() behind a vnet header with
 * VIRTIO_NET_HDR_GSO_TCPV4/6, and the host segments it again only where it
 * must (a NIC with TSO, or a local socket, takes it whole).
 *
 * For each packet from_peer() (pop.c) accepted:
 *   1. candidate()     it may be merged at all: TCP right behind an IPv4
 *                      header without options (or IPv6 without extension
 *                      headers), not a fragment, no larger than the TUN
 *                      device's MTU (one the host's GRO merged, or that
 *                      was reassembled, goes alone as before), payload,
 *                      flags ACK or ACK|PSH only, and its TCP checksum
 *                      right (RFC 9293 3.1): merged, a segment's own
 *                      checksum is gone and the super-packet's is computed
 *                      afresh, so a damaged segment would otherwise be
 *                      delivered as intact.  A peer with sequence numbers
 *                      is never held (its window must move per packet,
 *                      before the next one is checked, RFC 2890);
 *   2. gro_verdict()   joins the held group (GRO_APPEND) when it is the
 *                      next segment of the same flow from the same peer as
 *                      tcp_gro_receive would take it: same addresses, TOS,
 *                      TTL, DF, IPv4 ID the next one, same ports, ACK
 *                      number, window, TCP options, its sequence number
 *                      the next byte, no longer than the first one's
 *                      payload (gso_size), the group not closed (a PSH or
 *                      a short segment ends a group), at most 64 segments
 *                      and 64 KB; else the group is written out first;
 *   3. gro_hold()      held: the first packet whole, the others' payloads
 *                      as iovecs into the receive buffers (no copy);
 *   4. gro_flush()     at the end of each receive batch (before its
 *                      buffers are reused) and before any packet that does
 *                      not join: one packet goes as it was (tun_write());
 *                      more: the first packet's header made the merged
 *                      one's (lengths, IPv4 header checksum, PSH of the
 *                      last, the TCP checksum field the pseudo-header sum
 *                      that NEEDS_CSUM asks for) and written in one
 *                      writev(); then, as for one packet, the counters
 *                      (gro_packets, gro_segments), the learned entry and
 *                      a NAT'd peer's endpoint.
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
#define TCP_ACK 0x10
#define TCP_PSH 0x08

struct pop_gro {
    uint32_t n;                 /* packets held; 0: none */
    struct peer *p;
    uint8_t *first;             /* the first packet, whole */
    size_t first_len;
    uint16_t proto;
    size_t l4, thl;             /* its TCP header's offset and length */
    size_t total;               /* the merged packet's length */
    uint16_t gso_size;          /* the first packet's payload */
    uint32_t next_seq;          /* the sequence number that joins */
    uint16_t next_id;           /* the IPv4 ID that joins */
    uint8_t closed;             /* nothing more joins */
    uint8_t psh;                /* the last one held had PSH */
    uint64_t bytes;
    /* what from_peer() commits once the group is written */
    struct gre_pkt gp;
    struct learned *slot;
    uint8_t a[16];
    struct sockaddr_in from;
    uint8_t has_from;
    /* the last candidate()'s findings, for gro_hold() */
    size_t c_l4, c_thl, c_plen;
    struct iovec iov[2 + GRO_SEGS];
};

struct pop_gro *pop_gro_new(void)
{
    return calloc(1, sizeof(struct pop_gro));
}

/* 1. ------------------------------------------------------------------ */

static int candidate(const uint8_t *in, size_t ilen, uint16_t proto,
                     size_t *l4, size_t *thl)
{
    uint8_t fl;
    uint32_t sum;

    /* no payload (a pure ACK): alone; IPv4 options: GRO would not merge */
    if (!tcp_super(in, ilen, proto, l4, thl) || (proto == ETYPE_IPV4 && *l4 != 20))
        return 0;
    fl = in[*l4 + 13];
    if ((in[*l4 + 12] & 0x0f) || (fl != TCP_ACK && fl != (TCP_ACK | TCP_PSH)))
        return 0;
    sum = proto == ETYPE_IPV4 ? csum_pseudo4(in, IPPROTO_TCP_, (uint32_t)(ilen - *l4))
                              : csum_pseudo6(in, IPPROTO_TCP_, (uint32_t)(ilen - *l4));
    return csum_finish(csum_add(sum, in + *l4, ilen - *l4)) == 0;
}

/* 2. ------------------------------------------------------------------ */

/* Whether in (a candidate, c_l4/c_thl/c_plen found) is the held group's
 * next segment. */
static int joins(const struct pop_gro *g, const uint8_t *in, uint16_t proto)
{
    if (g->proto != proto || g->c_thl != g->thl || g->c_plen > g->gso_size ||
        g->total + g->c_plen > (proto == ETYPE_IPV4 ? 65535u : 65535u + 40))
        return 0;
    return tcp_seg_follows(g->first, in, proto, g->thl, g->next_id, g->next_seq);
}

int gro_verdict(struct tpb_pop *pop, const struct peer *p, const uint8_t *in,
                size_t ilen, uint16_t proto)
{
    struct pop_gro *g = pop->gro;

    if (p->cfg.seq || ilen > pop->tun_mtu ||
        !candidate(in, ilen, proto, &g->c_l4, &g->c_thl))
        return GRO_NONE;
    g->c_plen = ilen - g->c_l4 - g->c_thl;
    if (g->n && !g->closed && g->p == p && joins(g, in, proto))
        return GRO_APPEND;
    return GRO_START;
}

/* 3. ------------------------------------------------------------------ */

void gro_hold(struct tpb_pop *pop, int verdict, struct peer *p, uint8_t *in,
              size_t ilen, uint16_t proto, const struct gre_pkt *gp,
              struct learned *slot, const uint8_t a[16],
              const struct sockaddr_in *from)
{
    struct pop_gro *g = pop->gro;
    uint8_t *t = in + g->c_l4;

    if (verdict == GRO_START) {
        g->n = 1;
        g->p = p;
        g->first = in;
        g->first_len = ilen;
        g->proto = proto;
        g->l4 = g->c_l4;
        g->thl = g->c_thl;
        g->total = ilen;
        g->gso_size = (uint16_t)g->c_plen;
        g->next_id = (uint16_t)(proto == ETYPE_IPV4 ? rd16(in + 4) + 1 : 0);
        g->bytes = ilen;
        g->iov[1].iov_base = in;
        g->iov[1].iov_len = ilen;
        memcpy(g->a, a, 16);
    } else {
        g->iov[1 + g->n].iov_base = t + g->c_thl;
        g->iov[1 + g->n].iov_len = g->c_plen;
        g->n++;
        g->total += g->c_plen;
        g->next_id++;
        g->bytes += ilen;
    }
    g->next_seq = rd32(t + 4) + (uint32_t)g->c_plen;
    g->psh = (t[13] & TCP_PSH) != 0;
    g->closed = g->psh || g->c_plen < g->gso_size || g->n >= GRO_SEGS;
    g->gp = *gp;
    g->slot = slot;
    g->has_from = from != NULL;
    if (from)
        g->from = *from;
}

/* 4. ------------------------------------------------------------------ */

static int write_merged(struct tpb_pop *pop, struct pop_gro *g)
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
    if (g->psh)
        t[13] |= TCP_PSH;
    wr16(t + 16, tcp_pseudo(f, g->total, g->proto, g->l4));
    memset(&vh, 0, sizeof(vh));
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vh.csum_start = (uint16_t)g->l4;
    vh.csum_offset = 16;
    vh.gso_type = g->proto == ETYPE_IPV4 ? VIRTIO_NET_HDR_GSO_TCPV4
                                         : VIRTIO_NET_HDR_GSO_TCPV6;
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

void gro_flush(struct tpb_pop *pop)
{
    struct pop_gro *g = pop->gro;
    struct peer *p = g->p;
    int rc;

    if (!g->n)
        return;
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
    if (g->has_from && !p->cfg.addr)
        p->sa = g->from;
    p->c.decap_packets += g->n;
    p->c.decap_bytes += g->bytes;
    if (g->n > 1) {
        p->c.gro_packets++;
        p->c.gro_segments += g->n;
    }
    g->n = 0;
}
