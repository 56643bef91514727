/* pop_rx.c — `tpb pop` from the bridges: GRE and GRE-in-UDP in, checked,
 * unwrapped, into the TUN device (stages 1.-7. of pop.c's list):
 *   1. from_bridges()  recvmmsg a batch from the raw GRE socket and from the
 *                      UDP socket (UDP_GRO: from_udp_gro() takes merged
 *                      datagrams apart; SO_RXQ_OVFL: rx_drops());
 *   2. peer_by_addr()  the outer source a configured bridge, or for
 *      peer_by_udp()   GRE-in-UDP a NAT'd one found by its key;
 *   3.-5. from_peer()  a keepalive answer (pop_ka.c: peer_ka_answer),
 *                      the GRE header decoded (gre.c), a bridge's
 *                      keepalive reflected (pop_ka.c: reflect);
 *   6. learn_check()   (pop_learn.c) the inner source;
 *   7. tun_write()     into the TUN device, or held to be coalesced
 *                      (pop_gro.c); only then the sequence window moves,
 *                      the source is learned and a NAT'd peer followed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/udp.h>
#include <linux/virtio_net.h>

#include "proto.h"
#include "tpb.h"
#include "pop.h"

/* 2. ------------------------------------------------------------------ */

static struct peer *peer_by_addr(struct tpb_pop *pop, uint32_t addr, uint8_t encap)
{
    uint32_t i;

    for (i = 0; i < pop->npeers; i++)
        if (pop->peers[i].cfg.addr == addr && pop->peers[i].cfg.encap == encap)
            return &pop->peers[i];
    return NULL;
}

/* GRE-in-UDP from src: the peer at that address; else a NAT'd peer (its
 * address unknown, `any`), found by the key of the GRE header, which is
 * all that tells two bridges behind one NAT address apart.  The key picks
 * a peer; gre_decode() then checks the packet as that peer's. */
static struct peer *peer_by_udp(struct tpb_pop *pop, uint32_t src,
                                const uint8_t *g, size_t glen)
{
    struct peer *p = peer_by_addr(pop, src, TPB_ENCAP_UDP);
    uint16_t flags;
    uint32_t key, i;

    if (p || glen < 4)
        return p;
    flags = rd16(g);
    if (!(flags & GRE_K) || glen < ((flags & GRE_C) ? 12u : 8u))
        return NULL;
    key = rd32(g + ((flags & GRE_C) ? 8 : 4));
    for (i = 0; i < pop->npeers; i++)
        if (!pop->peers[i].cfg.addr && pop->peers[i].cfg.has_key &&
            pop->peers[i].cfg.key == key)
            return &pop->peers[i];
    return NULL;
}

/* 7. ------------------------------------------------------------------ */

int tcp_super(const uint8_t *in, size_t ilen, uint16_t proto,
              size_t *l4, size_t *thl)
{
    if (proto == ETYPE_IPV4) {
        if (in[9] != IPPROTO_TCP || (rd16(in + 6) & (IP_MF | IP_OFFMASK)))
            return 0;
        *l4 = (size_t)(in[0] & 0x0f) * 4;
    } else {
        if (in[6] != IPPROTO_TCP)
            return 0;
        *l4 = 40;
    }
    if (*l4 + 20 > ilen)
        return 0;
    *thl = (size_t)(in[*l4 + 12] >> 4) * 4;
    return *thl >= 20 && *l4 + *thl < ilen;
}

/* The checksum field a merge leaves (NEEDS_CSUM): the pseudo-header sum of
 * in's l4proto header at l4, over the rest of in, folded, uncomplemented. */
uint16_t l4_pseudo(const uint8_t *in, size_t ilen, uint16_t proto, size_t l4, uint8_t l4proto)
{
    uint32_t sum = proto == ETYPE_IPV4
                       ? csum_pseudo4(in, l4proto, (uint32_t)(ilen - l4))
                       : csum_pseudo6(in, l4proto, (uint32_t)(ilen - l4));

    return (uint16_t)~csum_finish(sum);
}

/* Whether a GRE packet whose checksum failed is one the host's GRO merged:
 * its inner TCP packet larger than the TUN device's MTU, its checksum field
 * the pseudo-header sum (a packet that crossed the wire, reassembled or
 * not, carries a complete one).  GRO checked every merged packet's GRE
 * checksum; the field left is only the first one's. */
static int gro_merged(const struct tpb_pop *pop, const uint8_t *g, size_t glen)
{
    uint16_t flags = rd16(g), proto = rd16(g + 2);
    size_t off = gre_hlen(!!(flags & GRE_C), !!(flags & GRE_K), !!(flags & GRE_S));
    size_t ilen, l4, thl;
    const uint8_t *in = g + off;

    if (glen <= off || (proto != ETYPE_IPV4 && proto != ETYPE_IPV6))
        return 0;
    ilen = ip_len(in, glen - off, proto);
    return ilen > pop->tun_mtu && tcp_super(in, ilen, proto, &l4, &thl) &&
           rd16(in + l4 + 16) == l4_pseudo(in, ilen, proto, l4, IPPROTO_TCP_);
}

/* A packet larger than the TUN device's MTU did not cross the wire so: the
 * host's GRO merged GRE packets of one TCP flow (a NIC driver's GRO does,
 * for GRE without sequence numbers), and left the inner TCP checksum
 * partial.  It goes to the kernel as a super-packet of MTU-sized segments,
 * the checksum field set to the pseudo-header sum, for the egress device
 * to segment and checksum, as Linux's ip_gre hands on what GRO merged. */
int tun_write(struct tpb_pop *pop, struct peer *p, uint8_t *in,
                     size_t ilen, uint16_t proto)
{
    struct virtio_net_hdr vh;
    struct iovec iov[2] = {{&vh, VNET_LEN}, {in, ilen}};
    size_t l4, thl;
    ssize_t n;

    memset(&vh, 0, sizeof(vh));
    if (ilen > pop->tun_mtu && tcp_super(in, ilen, proto, &l4, &thl) &&
        pop->tun_mtu > l4 + thl) {
        wr16(in + l4 + 16, l4_pseudo(in, ilen, proto, l4, IPPROTO_TCP_));
        vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh.csum_start = (uint16_t)l4;
        vh.csum_offset = 16;
        vh.gso_type = proto == ETYPE_IPV4 ? VIRTIO_NET_HDR_GSO_TCPV4
                                          : VIRTIO_NET_HDR_GSO_TCPV6;
        if (in[l4 + 13] & TCP_CWR)
            vh.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        vh.gso_size = (uint16_t)(pop->tun_mtu - l4 - thl);
        vh.hdr_len = (uint16_t)(l4 + thl);
    }
    do
        n = writev(pop->tun, iov, 2);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)(VNET_LEN + ilen))
        return n < 0 ? errno : EIO;        /* a short write: not the packet */
    if (vh.gso_type != VIRTIO_NET_HDR_GSO_NONE)
        p->c.gso_packets++;
    return 0;
}

/* A TUN write's failure, by what the device said: full (the device's
 * send buffer or the host's memory: the next one may pass), refused as
 * malformed, or anything else (the device down, gone). */
int tun_drop(int e)
{
    switch (e) {
    case EAGAIN:
    case ENOBUFS:
    case ENOMEM:
        return TPB_DROP_TUN_FULL;
    case EINVAL:
        return TPB_DROP_TUN_INVALID;
    default:
        return TPB_DROP_TUN_WRITE;
    }
}

/* A packet from a NAT'd peer passed its checks: answers go where it came
 * from.  A new endpoint is a new path, which may take UDP GSO again.
 * stamp: the packet's place in the arrivals (gro_stamp()); held groups
 * are written out of it, and an older packet's endpoint is not taken. */
void follow(struct peer *p, const struct sockaddr_in *from, uint64_t stamp)
{
    if (!from || p->cfg.addr || stamp < p->from_stamp)
        return;
    p->from_stamp = stamp;
    if (p->sa.sin_addr.s_addr != from->sin_addr.s_addr ||
        p->sa.sin_port != from->sin_port)
        p->udp_gso_off = 0;
    p->sa = *from;
}

void add_cmsg_int(struct msghdr *m, struct cmsghdr **c, int type, int v)
{
    *c = *c ? CMSG_NXTHDR(m, *c) : CMSG_FIRSTHDR(m);
    (*c)->cmsg_level = IPPROTO_IP;
    (*c)->cmsg_type = type;
    (*c)->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(*c), &v, sizeof(int));
}

/* 1. ------------------------------------------------------------------ */

/* The GRE header at g (glen bytes to the end of the datagram) from peer p,
 * its outer TOS `tos`; ka_id: the keepalive ID a keepalive answer would
 * carry (GRE: the outer IP ID; GRE-in-UDP: the UDP source port, ka_send);
 * `from`: GRE-in-UDP's source address and port, which
 * become the peer's endpoint once the packet is accepted (a NAT'd peer is
 * answered where its packets come from, and followed when its NAT mapping
 * changes, as WireGuard follows a roaming peer), or NULL. */
static void from_peer(struct tpb_pop *pop, struct peer *p, uint8_t tos, uint16_t ka_id,
                      uint8_t *g, size_t glen, const struct sockaddr_in *from)
{
    size_t ilen;
    struct gre_pkt gp;
    struct learned *slot;
    uint8_t *in, a[16];
    int rc, verdict;

    if (glen >= 4 && rd16(g + 2) == 0) {    /* protocol 0 */
        rc = gre_keepalive_answer(&p->rx, g, glen);
        if (!rc)    /* ip_id is the next one: the last sent is one before */
            rc = ka_id_check((uint16_t)(p->ka.ip_id - 1), p->ka.sent + p->ka.unsent,
                             ka_id, p->cfg.keepalive_retries);
        if (rc) {
            p->c.drop[rc]++;
            return;
        }
        /* (no endpoint learned: a NAT'd peer gets no keepalives of ours,
         * so every answer from one is stale) */
        peer_ka_answer(pop, p);
        return;
    }
    rc = gre_decode(&p->rx, g, glen, 0, &gp);
    if (rc == TPB_DROP_GRE_CSUM && gro_merged(pop, g, glen))
        rc = gre_decode(&p->rx, g, glen, 1, &gp);
    if (rc) {
        p->c.drop[rc]++;
        return;
    }
    in = g + gp.off;
    ilen = ip_len(in, glen - gp.off, gp.proto);
    if (!ilen || inner_addr(in, ilen, 0, a) != gp.proto) {
        p->c.drop[TPB_DROP_INNER_BAD]++;
        return;
    }
    if (is_keepalive(pop, p, in, ilen, gp.proto)) {
        reflect(pop, p, in, ilen, &gp, from);
        return;
    }
    if (ecn_decap_inner(tos, in, gp.proto)) {    /* RFC 6040 4.2 */
        p->c.drop[TPB_DROP_ECN]++;
        return;
    }
    /* 7. a TCP segment or UDP datagram that may join its flow's group
     * (pop_gro.c) waits for the next ones; anything else writes its
     * flow's group out first */
    verdict = gro_verdict(pop, p, in, ilen, gp.proto);
    gro_make_way(pop, verdict);
    rc = learn_check(pop, p, a, gp.proto, &slot);
    if (!rc && gro_learn_new(pop, slot)) {
        /* every group written: the table as this packet must find it */
        rc = learn_check(pop, p, a, gp.proto, &slot);
        if (verdict == GRO_APPEND)
            verdict = GRO_START;
    }
    if (!rc && verdict != GRO_NONE) {
        gro_hold(pop, verdict, p, in, ilen, gp.proto, &gp, slot, a, from);
        return;
    }
    if (!rc && (rc = tun_write(pop, p, in, ilen, gp.proto)) != 0)
        rc = tun_drop(rc);
    if (rc) {
        p->c.drop[rc]++;
        return;
    }
    /* Delivered: only now does the packet count, move the sequence window,
     * teach the POP where its source is and, behind NAT, where its bridge
     * is now. */
    gre_commit_seq(&p->rx, &gp);
    if (slot)
        learn_put(slot, pop->peers, a, (uint32_t)(p - pop->peers),
                  pop->now_ns + pop->learn_ns);
    follow(p, from, gro_stamp(pop));
    p->c.decap_packets++;
    p->c.decap_bytes += ilen;
}

static void from_bridge(struct tpb_pop *pop, uint8_t *ip, size_t n)
{
    size_t tot = ip4_check(ip, n), ihl;
    struct peer *p;

    if (!tot) {
        pop->global.drop[TPB_DROP_OUTER_BAD]++;
        return;
    }
    p = peer_by_addr(pop, rd32(ip + 12), TPB_ENCAP_GRE);
    if (!p) {
        pop->global.drop[TPB_DROP_NOT_PEER]++;
        return;
    }
    ihl = (size_t)(ip[0] & 0x0f) * 4;
    from_peer(pop, p, ip[1], rd16(ip + 4), ip + ihl, tot - ihl, NULL);
}

/* One GRE-in-UDP datagram's payload: the kernel checked its UDP length and
 * checksum (a wrong one never reaches the socket: its UdpInCsumErrors). */
static void from_bridge_udp(struct tpb_pop *pop, uint8_t *g, size_t glen,
                            const struct sockaddr_in *from, uint8_t tos)
{
    struct peer *p;

    if (from->sin_family != AF_INET) {
        pop->global.drop[TPB_DROP_OUTER_BAD]++;
        return;
    }
    p = peer_by_udp(pop, ntohl(from->sin_addr.s_addr), g, glen);
    if (!p) {
        pop->global.drop[TPB_DROP_NOT_PEER]++;
        return;
    }
    from_peer(pop, p, tos, ntohs(from->sin_port), g, glen, from);
}

/* UDP_GRO (udp(7)): the kernel hands over up to 64 datagrams of one
 * sender at once, each gro_size bytes but the last (shorter or equal),
 * each with its UDP checksum verified (GRO merges no others); they are
 * taken apart here and each goes its own way, as if received alone.
 * gro_size 0: one datagram. */
static void from_udp_gro(struct tpb_pop *pop, uint8_t *buf, size_t len,
                         const struct sockaddr_in *from, uint8_t tos, int gro_size)
{
    size_t off, d;

    if (gro_size <= 0 || (size_t)gro_size >= len) {
        from_bridge_udp(pop, buf, len, from, tos);
        return;
    }
    for (off = 0; off < len; off += d) {
        d = len - off < (size_t)gro_size ? len - off : (size_t)gro_size;
        from_bridge_udp(pop, buf + off, d, from, tos);
    }
}

/* SO_RXQ_OVFL: the packet carries the socket's drop count (sk_drops) as
 * it stood when the packet was queued; what grew since the last one seen
 * is what the kernel dropped meanwhile, its receive buffer full.  (So the
 * count of an overflow arrives with the first packet queued after it.) */
static void rx_drops(struct tpb_pop *pop, struct msghdr *m, uint32_t *last,
                     uint8_t *tos, int *gro_size)
{
    struct cmsghdr *c;
    uint32_t v;

    for (c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL &&
            c->cmsg_len >= CMSG_LEN(sizeof(v))) {
            memcpy(&v, CMSG_DATA(c), sizeof(v));
            if ((int32_t)(v - *last) > 0) {
                pop->global.drop[TPB_DROP_RCVBUF_FULL] += v - *last;
                *last = v;
            }
        }
        if (tos && c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_TOS &&
            c->cmsg_len >= CMSG_LEN(1))
            *tos = *(uint8_t *)CMSG_DATA(c);
        if (gro_size && c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO &&
            c->cmsg_len >= CMSG_LEN(sizeof(int)))
            memcpy(gro_size, CMSG_DATA(c), sizeof(int));
    }
}

/* recvmmsg a batch from fd (the raw GRE socket, or the UDP socket). */
static int receive(struct tpb_pop *pop, int fd, int udp)
{
    struct msghdr *m;
    uint8_t tos;
    int n, i, gro_size;

    for (i = 0; i < (int)pop->batch; i++) {
        m = &pop->rmsg[i].msg_hdr;
        pop->riov[i].iov_base = pop->rbuf + (size_t)i * BUF_SIZE;
        pop->riov[i].iov_len = BUF_SIZE;
        memset(m, 0, sizeof(*m));
        m->msg_iov = &pop->riov[i];
        m->msg_iovlen = 1;
        m->msg_control = pop->rctl[i].buf;
        m->msg_controllen = sizeof(pop->rctl[i].buf);
        if (udp) {
            m->msg_name = &pop->rsrc[i];
            m->msg_namelen = sizeof(pop->rsrc[i]);
        }
    }
    n = recvmmsg(fd, pop->rmsg, pop->batch, MSG_DONTWAIT, NULL);
    for (i = 0; i < n; i++) {
        m = &pop->rmsg[i].msg_hdr;
        tos = 0;
        gro_size = 0;
        rx_drops(pop, m, udp ? &pop->udp_rx_drops : &pop->rx_drops, udp ? &tos : NULL,
                 udp ? &gro_size : NULL);
        if (!udp)
            from_bridge(pop, pop->riov[i].iov_base, pop->rmsg[i].msg_len);
        else if (m->msg_flags & MSG_TRUNC)
            pop->global.drop[TPB_DROP_UDP_BAD]++;
        else
            from_udp_gro(pop, pop->riov[i].iov_base, pop->rmsg[i].msg_len,
                         &pop->rsrc[i], tos, gro_size);
    }
    /* the group held refers to this batch's buffers: written before the
     * next recvmmsg() reuses them */
    gro_flush(pop);
    return n > 0 ? n : 0;
}

int from_bridges(struct tpb_pop *pop)
{
    return receive(pop, pop->raw, 0) + receive(pop, pop->udp, 1);
}

#ifdef TPB_FUZZ
/* ---- fuzz/: the receive steps, one at a time (pop.c has the others) -- */

/* One datagram as the UDP socket would have handed it over: its payload
 * (the GRE header on), source and outer TOS (IP_TOS). */
void tpb_fuzz_pop_from_udp(struct tpb_pop *pop, uint8_t *g, size_t n,
                           const struct sockaddr_in *from, uint8_t tos, uint64_t now)
{
    pop->now_ns = now;
    from_bridge_udp(pop, g, n, from, tos);
    gro_flush(pop);             /* as receive() does at a batch's end */
}

/* One packet as recvmmsg() would have handed it over (outer IPv4 on). */
void tpb_fuzz_pop_from_bridge(struct tpb_pop *pop, uint8_t *ip, size_t n,
                              uint64_t now)
{
    pop->now_ns = now;
    from_bridge(pop, ip, n);
    gro_flush(pop);
}

/* The same, the group pop_gro.c holds left held: a train of packets is
 * handed over one by one, then tpb_fuzz_pop_flush() ends the batch. */
void tpb_fuzz_pop_from_bridge_held(struct tpb_pop *pop, uint8_t *ip, size_t n,
                                   uint64_t now)
{
    pop->now_ns = now;
    from_bridge(pop, ip, n);
}

/* A received packet's SO_RXQ_OVFL count v, as from_bridges() reads it. */
void tpb_fuzz_pop_rx_ovfl(struct tpb_pop *pop, uint32_t v)
{
    union {
        char buf[CMSG_SPACE(sizeof(uint32_t))];
        struct cmsghdr align;
    } ctl;
    struct msghdr m;
    struct cmsghdr *c;

    memset(&m, 0, sizeof(m));
    memset(&ctl, 0, sizeof(ctl));
    m.msg_control = ctl.buf;
    m.msg_controllen = sizeof(ctl.buf);
    c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SO_RXQ_OVFL;
    c->cmsg_len = CMSG_LEN(sizeof(v));
    memcpy(CMSG_DATA(c), &v, sizeof(v));
    rx_drops(pop, &m, &pop->rx_drops, NULL, NULL);
}
#endif
