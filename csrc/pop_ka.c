/* pop_ka.c — `tpb pop`'s keepalives (stages 0., 3. and 5. of pop.c's
 * list), Cisco's format (pop.c's header says what it is):
 *   0. keepalives()    send the due ones, mark silent peers down;
 *   3. peer_ka_answer() an answer to ours: the peer up, its RTT;
 *   5. reflect()       a bridge's keepalive sent back to it as it came
 *                      (to a NAT'd bridge's endpoint, to_endpoint()).
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

/* Sends one IPv4 packet's payload (GRE) to a peer through the raw socket,
 * the kernel writing the outer header from our address; TTL and TOS by
 * cmsg.  Returns 0 or -1. */
static int send_gre(struct tpb_pop *pop, struct peer *p, struct iovec *iov,
                    size_t iovlen, int ttl, int tos)
{
    union {
        char buf[CMSG_SPACE(sizeof(int)) * 2];
        struct cmsghdr align;
    } ctl;
    struct msghdr m;
    struct cmsghdr *c = NULL;
    ssize_t want = 0, n;
    size_t i;

    for (i = 0; i < iovlen; i++)
        want += (ssize_t)iov[i].iov_len;
    memset(&m, 0, sizeof(m));
    m.msg_name = &p->sa;
    m.msg_namelen = sizeof(p->sa);
    if (p->cfg.encap == TPB_ENCAP_UDP && !p->sa.sin_port)
        return -1;                         /* a NAT'd peer not heard from */
    m.msg_iov = iov;
    m.msg_iovlen = iovlen;
    m.msg_control = ctl.buf;
    m.msg_controllen = sizeof(ctl.buf);
    add_cmsg_int(&m, &c, IP_TTL, ttl);
    add_cmsg_int(&m, &c, IP_TOS, tos);
    do
        n = sendmsg(p->cfg.encap == TPB_ENCAP_UDP ? pop->udp : pop->raw, &m, 0);
    while (n < 0 && errno == EINTR);
    return n == want ? 0 : -1;
}

void peer_set_up(struct peer *p, int up)
{
    if (p->ka.up != up) {
        p->ka.up = (uint8_t)up;
        p->ka.transitions++;
    }
}

/* 0. ------------------------------------------------------------------ */

/* One Cisco keepalive to peer p: outer GRE with the tunnel's key/csum/seq,
 * protocol 0x0800, around IPv4 from the peer to us (protocol 47, TTL 255,
 * DF clear) that carries a GRE header of protocol 0 with the tunnel's key
 * and checksum options, no sequence number (the peer reflects it as it
 * is, outside the sequenced data), and no payload.  One the kernel
 * refuses (no route, buffer full) counts as keepalives_unsent. */
static void ka_send(struct tpb_pop *pop, struct peer *p)
{
    uint8_t outer[16], inner[20 + UDP_HLEN + 12];
    struct gre_tx bare = p->tx;
    struct iovec iov[2];
    /* GRE-in-UDP: the inner GRE header rides in UDP to port 4754, so the
     * bridge's answer comes back as GRE-in-UDP (keepalive.c: ka_inner) */
    size_t ulen = p->cfg.encap == TPB_ENCAP_UDP ? UDP_HLEN : 0, ilen, glen;
    uint8_t *u = inner + 20;

    bare.seq = 0;                          /* only its seq differs */
    glen = gre_header(&bare, inner + 20 + ulen, 0, 0, 0);
    ilen = 20 + ulen + glen;
    inner[0] = 0x45;
    inner[1] = 0;
    wr16(inner + 2, (uint16_t)ilen);
    wr16(inner + 4, p->ka.ip_id);
    wr16(inner + 6, 0);                    /* DF clear, not a fragment */
    inner[8] = 255;
    inner[9] = ulen ? IPPROTO_UDP_ : IPPROTO_GRE_;
    wr32(inner + 12, p->cfg.addr);
    wr32(inner + 16, pop->local);
    ip4_set_csum(inner);
    if (ulen) {
        /* The ID again as the source port: the answer reaches the POP's
         * UDP socket, which sees no IP header (from_peer: ka_id_check).
         * Port 0 is RFC 768's "no port", legal too. */
        udp4_put(u, inner, p->ka.ip_id, GRE_UDP_PORT, UDP_HLEN + glen, UDP_HLEN + glen, 0);
    }
    p->ka.ip_id++;
    iov[0].iov_base = outer;
    iov[0].iov_len = gre_header(&p->tx, outer, ETYPE_IPV4, ilen,
                                p->tx.csum ? csum_add(0, inner, ilen) : 0);
    iov[1].iov_base = inner;
    iov[1].iov_len = ilen;
    if (send_gre(pop, p, iov, 2, outer_ttl(&p->tx, ETYPE_IPV4, inner),
                 outer_tos(&p->tx, ETYPE_IPV4, inner))) {
        p->ka.unsent++;                    /* the kernel refused it */
        return;
    }
    p->ka.sent++;
    p->ka.sent_ns = pop->now_ns;
}

/* Every keepalive_ms a keepalive to each peer that has them; a peer up
 * whose last answer is more than keepalive_ms x retries old goes down.
 * The earliest next event is kept in ka_due_ns, so a pass with nothing
 * due costs one comparison. */
void keepalives(struct tpb_pop *pop)
{
    uint64_t now = pop->now_ns, due = UINT64_MAX, period, dead;
    struct peer *p;
    uint32_t i;

    if (now < pop->ka_due_ns)
        return;
    for (i = 0; i < pop->npeers; i++) {
        p = &pop->peers[i];
        if (!p->cfg.keepalive_ms)
            continue;
        period = (uint64_t)p->cfg.keepalive_ms * 1000000ull;
        dead = p->ka.reply_ns + period * p->cfg.keepalive_retries;
        if (p->ka.up && now > dead)
            peer_set_up(p, 0);
        if (now >= p->ka.next_ns) {
            ka_send(pop, p);
            /* on the period's grid; after a stall, from now */
            p->ka.next_ns = p->ka.next_ns && p->ka.next_ns + period > now
                                ? p->ka.next_ns + period : now + period;
        }
        if (p->ka.next_ns < due)
            due = p->ka.next_ns;
        if (p->ka.up && dead + 1 < due)
            due = dead + 1;
    }
    pop->ka_due_ns = due;
}

/* Milliseconds poll() may sleep: until the next keepalive event, at most
 * IDLE_WAKE_MS, rounded up (waking early would only spin). */
int poll_timeout(const struct tpb_pop *pop)
{
    uint64_t left;

    if (pop->ka_due_ns <= pop->now_ns)
        return 0;
    left = pop->ka_due_ns - pop->now_ns;          /* UINT64_MAX: none due */
    if (left >= (uint64_t)IDLE_WAKE_MS * 1000000ull)
        return IDLE_WAKE_MS;
    return (int)((left + 999999) / 1000000);
}

/* 3. ------------------------------------------------------------------ */

/* The answer to one of our keepalives (it passed gre_keepalive_answer()). */
void peer_ka_answer(struct tpb_pop *pop, struct peer *p)
{
    p->ka.received++;
    p->ka.reply_ns = pop->now_ns;
    if (!p->cfg.keepalive_ms)
        return;                 /* a late one after a reload: up anyway */
    if (p->ka.sent_ns)
        p->ka.rtt_ns = mono_ns() - p->ka.sent_ns;
    peer_set_up(p, 1);
}

/* 5. ------------------------------------------------------------------ */

/* A bridge's keepalive: the decapsulated packet is IPv4 GRE from our own
 * address to the peer it came from.  Routed by the host it would be
 * dropped (Linux takes a packet arriving with one of its own addresses as
 * source for a martian), so it goes back from here, as the far end of a
 * Cisco keepalive does: the inner packet as it is, through a socket that
 * sends our own IPv4 header (IP_HDRINCL), so its IP ID goes back too (the
 * bridge takes only the IDs it sent for answers: ka_id_check()).  Only to
 * the peer it came from: the POP reflects nothing toward any other
 * address. */
int is_keepalive(const struct tpb_pop *pop, const struct peer *p,
                 const uint8_t *in, size_t ilen, uint16_t proto)
{
    size_t ihl = (size_t)(in[0] & 0x0f) * 4;

    if (proto != ETYPE_IPV4 || rd32(in + 12) != pop->local)
        return 0;
    if (p->cfg.encap != TPB_ENCAP_UDP)
        return in[9] == IPPROTO_GRE_ && rd32(in + 16) == p->cfg.addr;
    /* GRE-in-UDP: GRE in UDP to port 4754, to the peer's address (a NAT'd
     * peer's own address is one the POP never learns: any) */
    return in[9] == IPPROTO_UDP_ && (!p->cfg.addr || rd32(in + 16) == p->cfg.addr) &&
           ilen >= ihl + UDP_HLEN && rd16(in + ihl + 2) == GRE_UDP_PORT;
}

/* GRE-in-UDP: the bridge's keepalive is addressed to the bridge's own
 * address and port 4754, but a NAT'd bridge is reached only where its NAT
 * maps it (the endpoint): the packet goes there, its checksums updated as
 * a NAT's would be (RFC 1624) and its IP ID kept, which the bridge wants
 * back (ka_id_check()); the NAT maps it back to the bridge.  A peer at a
 * known address is its own endpoint: nothing changes. */
static void to_endpoint(uint8_t *in, size_t ihl, const struct sockaddr_in *ep)
{
    uint8_t *u = in + ihl;
    uint32_t addr = ntohl(ep->sin_addr.s_addr);
    uint16_t port = ntohs(ep->sin_port), c = rd16(u + 6);

    if (rd32(in + 16) == addr && rd16(u + 2) == port)
        return;
    if (c) {                    /* zero: sent without one (RFC 768), stays so */
        c = csum_replace16(c, rd16(in + 16), (uint16_t)(addr >> 16));
        c = csum_replace16(c, rd16(in + 18), (uint16_t)addr);
        c = csum_replace16(c, rd16(u + 2), port);
        wr16(u + 6, c ? c : 0xffff);
    }
    wr32(in + 16, addr);
    wr16(u + 2, port);
    ip4_set_csum(in);
}

void reflect(struct tpb_pop *pop, struct peer *p, uint8_t *in, size_t ilen,
             const struct gre_pkt *g, const struct sockaddr_in *from)
{
    size_t ihl = (size_t)(in[0] & 0x0f) * 4;
    int udp = p->cfg.encap == TPB_ENCAP_UDP;
    struct sockaddr_in to;
    ssize_t n;

    /* a fragment, or no room for a GRE header (behind its UDP header with
     * GRE-in-UDP): not a keepalive */
    if ((rd16(in + 6) & (IP_MF | IP_OFFMASK)) || ilen < ihl + (udp ? UDP_HLEN : 0) + 4) {
        p->c.drop[TPB_DROP_INNER_BAD]++;
        return;
    }
    /* It passed the peer's checks: a NAT'd peer's answer goes where it
     * came from. */
    follow(p, from, gro_stamp(pop));
    if (udp)
        to_endpoint(in, ihl, &p->sa);
    /* a raw socket routes by the address alone (its port is no port) */
    memset(&to, 0, sizeof(to));
    to.sin_family = AF_INET;
    to.sin_addr.s_addr = htonl(rd32(in + 16));
    do
        n = sendto(pop->hdrincl, in, ilen, 0, (struct sockaddr *)&to, sizeof(to));
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)ilen) {
        p->c.drop[TPB_DROP_SEND]++;
        return;
    }
    gre_commit_seq(&p->rx, g);
    p->ka.reflected++;
}

