/* pop.c — `tpb pop`: one GRE endpoint for many bridges, on a host with an
 * IP stack, no kernel GRE needed.  The reply to a tunneled flow finds its
 * bridge by the inner destination address (one-to-many), not by a tunnel
 * device per bridge.
 *
 * Each pass of the loop (tpb_pop_run):
 *   0. take_reload()   a new configuration handed over by
 *                      tpb_pop_reconfigure() is swapped in here, at the
 *                      start of a pass, under the lock the readers take;
 *      keepalives()    the POP's own keepalives to the peers that have
 *                      keepalive_ms (send due ones, mark silent peers down);
 *      poll() sleeps until the next keepalive is due, at most a second
 *      (the heartbeat moves even when idle).
 * From the bridges (raw IPv4 socket, protocol 47, and a UDP socket on port
 * 4754 for GRE-in-UDP, RFC 8086; the host kernel has already reassembled
 * fragments and checked UDP headers):
 *   1. from_bridges()  recvmmsg a batch from each (the UDP socket with
 *                      UDP_GRO: up to 64 datagrams in one, from_udp_gro()
 *                      takes them apart); per packet:
 *   2. peer_by_addr()  the outer source must be a configured bridge; for
 *      peer_by_udp()   GRE-in-UDP, or a NAT'd one (address `any`) found by
 *                      its GRE key: from_peer() then checks it as any;
 *   3. ka_answer()     GRE of protocol 0 is the answer to one of our
 *                      keepalives (gre_keepalive_answer(): key and
 *                      checksum checked, no sequence number): the peer is
 *                      up, its RTT measured; never to the TUN device;
 *   4. gre_decode()    (gre.c) version, flags, checksum, key, sequence;
 *   5. reflect()       an inner IPv4 GRE packet from our own address to
 *                      that same peer is the bridge's keepalive: sent back
 *                      to it, never to the TUN device, never learned;
 *   6. learn_check()   the inner source: never a martian; not one another
 *                      peer owns (its prefix, its live learned entry: a
 *                      fresh entry never moves); within the peer's budget
 *                      of entries (sources inside its own prefixes are
 *                      not learned);
 *   7. gro_verdict()   (pop_gro.c) consecutive TCP segments of one flow
 *      gro_hold()      from one peer are held and written as one TCP
 *      gro_flush()     super-packet, at the latest at the batch's end;
 *      tun_write()     anything else into the TUN device behind a vnet
 *                      header: the host routes the inner packet on; what
 *                      the host's GRO
 *                      merged goes as a TCP super-packet (tcp_super), and
 *                      its GRE checksum, only the first segment's, is not
 *                      held against it (gro_merged); only once it is
 *                      written: the sequence window moves
 *                      (gre_commit_seq) and the source is learned
 *                      (learn_put), with expiry; a NAT'd peer's endpoint
 *                      (address and UDP port) is taken from it, so the
 *                      POP answers where the bridge's NAT now maps it.
 * Toward the bridges (TUN device), pop_tx.c:
 *   8. to_bridges()    read a batch, TCP super-packets among them (the
 *                      device offers TSO), each vnet header checked (a
 *                      partial checksum completed); per packet:
 *   9. route()         the longest configured prefix for the inner
 *                      destination, else a learned entry; none -> counted drop;
 *  10. split()         a super-packet cut into segments that fit the
 *                      tunnel; gre_header() with the peer's key/csum/seq
 *                      per packet; the kernel writes the outer IPv4 header
 *                      (TTL/TOS per message by cmsg, DF clear: too big is
 *                      fragmented, the bridge reassembles), a GRE-in-UDP
 *                      super-packet goes as one UDP_SEGMENT message, and
 *                      sendmmsg sends the batch.
 *
 * Keepalives are Cisco's (what Linux ip_gre reflects too; there is no RFC
 * for them): outer GRE to the far end F whose inner packet is IPv4 from F
 * back to the sender, protocol 47, carrying a bare GRE header of protocol
 * 0.  F decapsulates and routes the inner packet, which goes back as plain
 * GRE of protocol 0.
 *
 * Threads: only the loop touches packets and writes counters.  Readers
 * (tpb_pop_counters, tpb_pop_peer_state, tpb_pop_learned) and the swap of
 * a new configuration take pop->lock, so no reader sees a freed peer
 * array; the loop takes it only when a reload is pending, never per packet.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/udp.h>
#include <linux/virtio_net.h>

#include "proto.h"
#include "tpb.h"

#ifdef TPB_FUZZ
/* Fuzzing builds only (fuzz/README.md): fuzz/pop.c stands in for the TUN
 * device and the raw socket, and drives the loop's steps one at a time
 * (tpb_fuzz_pop_* at the end of this file). */
ssize_t tpb_fuzz_read(int fd, void *buf, size_t n);
ssize_t tpb_fuzz_writev(int fd, const struct iovec *iov, int iovcnt);
ssize_t tpb_fuzz_sendmsg(int fd, const struct msghdr *m, int flags);
int tpb_fuzz_sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags);
ssize_t tpb_fuzz_sendto(int fd, const void *buf, size_t n, int flags,
                        const struct sockaddr *sa, socklen_t salen);
#define read tpb_fuzz_read
#define writev tpb_fuzz_writev
#define sendmsg tpb_fuzz_sendmsg
#define sendmmsg tpb_fuzz_sendmmsg
#define sendto tpb_fuzz_sendto
#endif

#include "pop.h"

/* Inner addresses as 16 bytes, IPv4 mapped into ::ffff:0:0/96. */
int inner_addr(const uint8_t *ip, size_t len, int dst, uint8_t out[16])
{
    if (len >= 20 && (ip[0] >> 4) == 4) {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, ip + (dst ? 16 : 12), 4);
        return ETYPE_IPV4;
    }
    if (len >= 40 && (ip[0] >> 4) == 6) {
        memcpy(out, ip + (dst ? 24 : 8), 16);
        return ETYPE_IPV6;
    }
    return 0;
}

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

/* 6. ------------------------------------------------------------------ */

static int prefix_match(const uint8_t *a, const uint8_t *p, unsigned len)
{
    unsigned full = len / 8, rest = len % 8;

    if (memcmp(a, p, full))
        return 0;
    return !rest || ((a[full] ^ p[full]) & (uint8_t)(0xff << (8 - rest))) == 0;
}

static struct peer *by_prefix(struct tpb_pop *pop, const uint8_t dst[16])
{
    uint32_t i, best = 0;
    struct peer *p = NULL;

    for (i = 0; i < pop->nprefixes; i++)
        if (pop->prefixes[i].len >= best &&
            prefix_match(dst, pop->prefixes[i].addr, pop->prefixes[i].len)) {
            best = pop->prefixes[i].len;
            p = &pop->peers[pop->prefixes[i].peer];
        }
    return p;
}


static uint32_t addr_hash(const uint8_t a[16])
{
    uint32_t h = 2166136261u;
    int i;

    for (i = 0; i < 16; i++)
        h = (h ^ a[i]) * 16777619u;
    return h;
}

/* Sources that are never learned, and never written to the TUN device:
 * no router forwards a packet from them (RFC 1812 5.3.7: 0/8, 127/8,
 * class D and E, 255.255.255.255; RFC 3927 2.7: 169.254/16; RFC 4291:
 * 2.7 no multicast source, 2.5.2 the unspecified ::, 2.5.3 ::1, 2.5.6
 * fe80::/10 (whose scope is one link, and every site is another one),
 * 2.5.5.2 ::ffff:0:0/96 on the wire, which would also alias an IPv4
 * entry here) and the POP's own address (Linux drops it as a martian
 * source after the TUN write, where no counter sees it). */
static int martian(const struct tpb_pop *pop, const uint8_t a[16], int proto)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const uint8_t zero[15];

    if (proto == ETYPE_IPV4)
        return a[12] == 0 || a[12] == 127 || a[12] >= 224 ||
               (a[12] == 169 && a[13] == 254) || rd32(a + 12) == pop->local;
    return a[0] == 0xff || (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) ||
           !memcmp(a, mapped, 12) || (!memcmp(a, zero, 15) && a[15] <= 1);
}

static uint32_t learn_budget(uint32_t npeers)
{
    uint32_t most = LEARN_SLOTS_MAX / 2 / (npeers ? npeers : 1);

    return most < LEARN_PER_PEER ? most : LEARN_PER_PEER;
}

/* A table for npeers: twice the entries they may hold, a power of two. */
static int learn_alloc(struct learn_table *t, uint32_t npeers)
{
    uint64_t want;
    uint32_t slots = LEARN_SLOTS_MIN;

    t->budget = learn_budget(npeers);
    want = 2ull * npeers * t->budget;
    while (slots < want && slots < LEARN_SLOTS_MAX)
        slots <<= 1;
    t->e = calloc(slots, sizeof(*t->e));
    t->mask = slots - 1;
    return t->e ? 0 : -1;
}

/* Where a's entry is (live or not), or NULL; *free_slot: the first slot
 * of its window an entry could take (free, or expired), or NULL. */
static struct learned *learn_find(const struct learn_table *t, const uint8_t a[16],
                                  uint64_t now, struct learned **free_slot)
{
    uint32_t h = addr_hash(a), i;
    struct learned *e, *found = NULL;

    *free_slot = NULL;
    for (i = 0; i < LEARN_PROBE; i++) {
        e = &t->e[(h + i) & t->mask];
        if (!found && e->used && !memcmp(e->addr, a, 16))
            found = e;
        if (!*free_slot && e->expires <= now)
            *free_slot = e;
        if (!e->used || (found && *free_slot))
            break;
    }
    return found;
}

/* a's entry, if it is live. */
static struct learned *learn_live(const struct tpb_pop *pop, const uint8_t a[16])
{
    struct learned *slot, *e = learn_find(&pop->learn, a, pop->now_ns, &slot);

    return e && e->expires > pop->now_ns ? e : NULL;
}

/* Takes slot e for a behind peer (an index of peers[]); e is free or
 * expired (its old owner gives it up) or already a's. */
void learn_put(struct learned *e, struct peer *peers, const uint8_t a[16],
                      uint32_t peer, uint64_t expires)
{
    if (e->expires && (e->peer != peer || memcmp(e->addr, a, 16))) {
        peers[e->peer].learned--;
        e->expires = 0;
    }
    if (!e->expires)
        peers[peer].learned++;
    memcpy(e->addr, a, 16);
    e->peer = peer;
    e->used = 1;
    e->expires = expires;
}

/* Frees every expired entry, so that a peer's budget counts live ones;
 * at most once a second (it reads the whole table). */
static void learn_reclaim(struct tpb_pop *pop)
{
    uint32_t i;
    struct learned *e;

    if (pop->reclaim_ns && pop->now_ns - pop->reclaim_ns < NSEC)
        return;
    pop->reclaim_ns = pop->now_ns;
    for (i = 0; i <= pop->learn.mask; i++) {
        e = &pop->learn.e[i];
        if (e->expires && e->expires <= pop->now_ns) {
            pop->peers[e->peer].learned--;
            e->expires = 0;
        }
    }
}

/* 6. Whether peer p may send from inner source a (proto: its family),
 * before the packet goes anywhere.  0, with *slot the entry to make or
 * refresh once the packet is delivered (NULL: nothing to learn), or the
 * drop reason:
 *   inner_martian  a is a source no router forwards (martian());
 *   source_owned   a is routed to another peer, by its configured prefix
 *                  or its live learned entry: a fresh entry never moves,
 *                  and the packet is dropped, since its replies would go
 *                  to that other peer (RFC 3704 2.2, strict reverse path
 *                  forwarding: a peer is believed only for the sources
 *                  the POP would route back to it; BCP 38);
 *   learn_full     p holds its budget of entries, or no slot is free near
 *                  a's hash: the reply could not find p either. */
static int learn_check(struct tpb_pop *pop, struct peer *p, const uint8_t a[16],
                       int proto, struct learned **slot)
{
    uint32_t idx = (uint32_t)(p - pop->peers);
    struct peer *owner;
    struct learned *e, *free_slot;

    *slot = NULL;
    if (martian(pop, a, proto))
        return TPB_DROP_INNER_MARTIAN;
    owner = by_prefix(pop, a);
    if (owner)                  /* configured: nothing to learn */
        return owner == p ? 0 : TPB_DROP_SOURCE_OWNED;
    e = learn_find(&pop->learn, a, pop->now_ns, &free_slot);
    if (e && e->expires > pop->now_ns) {
        if (e->peer != idx)
            return TPB_DROP_SOURCE_OWNED;
        *slot = e;              /* refreshed */
        return 0;
    }
    if (p->learned >= pop->learn.budget) {
        learn_reclaim(pop);
        e = learn_find(&pop->learn, a, pop->now_ns, &free_slot);
    }
    if (p->learned >= pop->learn.budget || !free_slot)
        return TPB_DROP_LEARN_FULL;
    *slot = e ? e : free_slot;  /* a's own expired entry, else a free one */
    return 0;
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

/* The checksum field a merge leaves: the pseudo-header sum, uncomplemented. */
uint16_t tcp_pseudo(const uint8_t *in, size_t ilen, uint16_t proto, size_t l4)
{
    uint32_t sum = proto == ETYPE_IPV4
                       ? csum_pseudo4(in, IPPROTO_TCP, (uint32_t)(ilen - l4))
                       : csum_pseudo6(in, IPPROTO_TCP, (uint32_t)(ilen - l4));

    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
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
           rd16(in + l4 + 16) == tcp_pseudo(in, ilen, proto, l4);
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
        wr16(in + l4 + 16, tcp_pseudo(in, ilen, proto, l4));
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
 * from.  A new endpoint is a new path, which may take UDP GSO again. */
void follow(struct peer *p, const struct sockaddr_in *from)
{
    if (!from || p->cfg.addr)
        return;
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

static void set_up(struct peer *p, int up)
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
static void keepalives(struct tpb_pop *pop)
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
            set_up(p, 0);
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
static int poll_timeout(const struct tpb_pop *pop)
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
static void ka_answer(struct tpb_pop *pop, struct peer *p)
{
    p->ka.received++;
    p->ka.reply_ns = pop->now_ns;
    if (!p->cfg.keepalive_ms)
        return;                 /* a late one after a reload: up anyway */
    if (p->ka.sent_ns)
        p->ka.rtt_ns = mono_ns() - p->ka.sent_ns;
    set_up(p, 1);
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
static int is_keepalive(const struct tpb_pop *pop, const struct peer *p,
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

static void reflect(struct tpb_pop *pop, struct peer *p, uint8_t *in, size_t ilen,
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
    follow(p, from);
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
        ka_answer(pop, p);
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
    /* 7. a TCP segment that may join the held group (pop_gro.c) waits
     * for the next ones; anything else writes the group out first */
    verdict = gro_verdict(pop, p, in, ilen, gp.proto);
    if (verdict != GRO_APPEND)
        gro_flush(pop);
    rc = learn_check(pop, p, a, gp.proto, &slot);
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
    follow(p, from);
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

static int from_bridges(struct tpb_pop *pop)
{
    return receive(pop, pop->raw, 0) + receive(pop, pop->udp, 1);
}

/* 9. ------------------------------------------------------------------ */

/* Configured prefixes win: a bridge cannot draw another site's traffic to
 * itself by sending from that site's addresses.  Learned entries serve
 * addresses no prefix covers. */
struct peer *route(struct tpb_pop *pop, const uint8_t dst[16])
{
    struct peer *p = by_prefix(pop, dst);
    struct learned *e;

    if (p)
        return p;
    e = learn_live(pop, dst);
    return e ? &pop->peers[e->peer] : NULL;
}

/* ---- configuration: checked, built, swapped in ---------------------- */

static void gre_side(struct peer *p, uint32_t local)
{
    const struct tpb_pop_peer_config *c = &p->cfg;

    gre_setup(&p->tx, &p->rx, local, c->addr, c->key, c->has_key, c->csum,
              c->seq, c->ttl, c->tos);
    p->sa.sin_family = AF_INET;
    p->sa.sin_addr.s_addr = htonl(c->addr);
    /* GRE-in-UDP to a known address: to port 4754, as RFC 8086 and Linux's
     * FOU receive it (from the POP's port 4754: one socket for all).  A
     * NAT'd peer's endpoint is learned (from_peer). */
    p->sa.sin_port = c->encap == TPB_ENCAP_UDP && c->addr ? htons(GRE_UDP_PORT) : 0;
}

static void peer_init(struct peer *p, const struct tpb_pop_peer_config *c,
                      uint32_t local)
{
    p->cfg = *c;
    gre_side(p, local);
    p->ka.up = !c->keepalive_ms;    /* without keepalives a peer is up */
    p->ka.ip_id = ka_first_id();    /* a kept peer's goes on (carry()) */
}

static const char *ip4_text(uint32_t a, char buf[INET_ADDRSTRLEN])
{
    uint32_t n = htonl(a);

    return inet_ntop(AF_INET, &n, buf, INET_ADDRSTRLEN);
}

/* Everything tpb_pop_open() and tpb_pop_reconfigure() rely on: the peer
 * count, one peer per address, keepalive retries, every prefix behind a
 * peer of the list.  -EINVAL and one line in err, or 0. */
static int check_config(const struct tpb_pop_config *cfg,
                        const struct tpb_pop_peer_config *peers,
                        const struct tpb_pop_prefix *prefixes,
                        char *err, size_t errlen)
{
    char a[INET_ADDRSTRLEN];
    uint32_t i, j;

    if (cfg->npeers < 1 || cfg->npeers > MAX_PEERS || !peers) {
        snprintf(err, errlen, "%u peers: from 1 to %u", cfg->npeers, MAX_PEERS);
        return -EINVAL;
    }
    if (cfg->nprefixes && !prefixes) {
        snprintf(err, errlen, "%u prefixes but no list", cfg->nprefixes);
        return -EINVAL;
    }
    for (i = 0; i < cfg->npeers; i++) {
        if (peers[i].encap != TPB_ENCAP_GRE && peers[i].encap != TPB_ENCAP_UDP) {
            snprintf(err, errlen, "peer %u: unknown encapsulation %u", i, peers[i].encap);
            return -EINVAL;
        }
        if (!peers[i].addr) {
            /* NAT'd: nothing but the key says which bridge a packet is
             * from, and the POP's own keepalives would need the bridge's
             * address inside them */
            if (peers[i].encap != TPB_ENCAP_UDP || !peers[i].has_key) {
                snprintf(err, errlen, "peer %u: a peer behind NAT (any) needs udp and a key", i);
                return -EINVAL;
            }
            if (peers[i].keepalive_ms) {
                snprintf(err, errlen, "peer %u: a peer behind NAT (any) takes no keepalives "
                         "from the POP: its bridge's keep the NAT open", i);
                return -EINVAL;
            }
        }
        for (j = 0; j < i; j++) {
            if (peers[i].addr && peers[j].addr == peers[i].addr) {
                snprintf(err, errlen, "peer %s is given twice", ip4_text(peers[i].addr, a));
                return -EINVAL;
            }
            if (!peers[i].addr && !peers[j].addr && peers[j].key == peers[i].key) {
                snprintf(err, errlen, "peers behind NAT (any) with the same key %u: "
                         "the key is what tells them apart", peers[i].key);
                return -EINVAL;
            }
        }
        if (peers[i].keepalive_ms && !peers[i].keepalive_retries) {
            snprintf(err, errlen, "peer %s: keepalives need at least one retry",
                     ip4_text(peers[i].addr, a));
            return -EINVAL;
        }
    }
    for (i = 0; i < cfg->nprefixes; i++)
        if (prefixes[i].peer >= cfg->npeers || prefixes[i].len > 128) {
            snprintf(err, errlen, "prefix %u: /%u behind peer %u of %u", i,
                     prefixes[i].len, prefixes[i].peer, cfg->npeers);
            return -EINVAL;
        }
    return 0;
}

static void reload_free(struct reload *r)
{
    if (!r)
        return;
    free(r->peers);
    free(r->prefixes);
    free(r->from);
    free(r->to);
    free(r->learn.e);
    free(r);
}

/* The new peer array, built beside the running one; which new peer is
 * which old one (by address).  pop->peers cannot change meanwhile: only
 * a reconfigure call swaps it, and the caller holds reload_lock. */
static struct reload *reload_build(struct tpb_pop *pop,
                                   const struct tpb_pop_config *cfg,
                                   const struct tpb_pop_peer_config *peers,
                                   const struct tpb_pop_prefix *prefixes)
{
    struct reload *r = calloc(1, sizeof(*r));
    uint32_t i, j;

    if (!r)
        return NULL;
    r->npeers = cfg->npeers;
    r->nprefixes = cfg->nprefixes;
    r->peers = calloc(cfg->npeers + 1, sizeof(*r->peers));
    r->prefixes = calloc(cfg->nprefixes + 1, sizeof(*r->prefixes));
    r->from = calloc(cfg->npeers + 1, sizeof(*r->from));
    r->to = calloc(pop->npeers + 1, sizeof(*r->to));
    if (!r->peers || !r->prefixes || !r->from || !r->to ||
        learn_alloc(&r->learn, cfg->npeers)) {
        reload_free(r);
        return NULL;
    }
    for (j = 0; j < pop->npeers; j++)
        r->to[j] = NO_PEER;
    for (i = 0; i < cfg->npeers; i++) {
        peer_init(&r->peers[i], &peers[i], pop->local);
        r->from[i] = NO_PEER;
        for (j = 0; j < pop->npeers; j++)
            if (pop->peers[j].cfg.addr == peers[i].addr &&
                (peers[i].addr || pop->peers[j].cfg.key == peers[i].key)) {
                r->from[i] = j;
                r->to[j] = i;
                break;
            }
    }
    memcpy(r->prefixes, prefixes, cfg->nprefixes * sizeof(*prefixes));
    r->batch = cfg->batch && cfg->batch <= MAX_BATCH ? cfg->batch : MAX_BATCH;
    r->tun_mtu = cfg->tun_mtu ? cfg->tun_mtu : 1500;
    r->learn_ns = (uint64_t)cfg->learn_timeout_s * NSEC;
    return r;
}

/* What a peer kept by address keeps: its counters and keepalive state;
 * its sequence windows only while key and seq settings stay the same
 * (RFC 2890: sequence numbers belong to the flow the key identifies;
 * another key, another flow, numbered afresh). */
static void carry(struct peer *n, const struct peer *o)
{
    const struct tpb_pop_peer_config *a = &o->cfg, *b = &n->cfg;

    n->c = o->c;
    n->ka = o->ka;
    if (!b->addr && b->encap == TPB_ENCAP_UDP)
        n->sa = o->sa;                     /* a NAT'd peer stays where it was */
    if (a->has_key == b->has_key && a->key == b->key && a->seq == b->seq) {
        n->rx.seq_started = o->rx.seq_started;
        n->rx.next_seq = o->rx.next_seq;
        n->tx.seqno = o->tx.seqno;
        n->tx.ip_id = o->tx.ip_id;
    }
    if (!b->keepalive_ms) {
        set_up(n, 1);                      /* off: up */
    } else if (!a->keepalive_ms) {
        set_up(n, 0);                      /* on now: down until answered */
        n->ka.next_ns = 0;
    } else if (a->keepalive_ms != b->keepalive_ms) {
        n->ka.next_ns = o->ka.sent_ns
                            ? o->ka.sent_ns + (uint64_t)b->keepalive_ms * 1000000ull : 0;
    }
}

/* Swaps the new configuration in; pop->lock held, the loop between passes
 * (or not running).  The learned table is made anew, sized for the new
 * peers: live entries behind a peer that is gone are dropped, the others
 * follow their peer's new index, as long as its (new) budget lasts; an
 * entry now inside a configured prefix goes too (such sources are never
 * learned). */
static void apply(struct tpb_pop *pop, struct reload *r)
{
    struct peer *old = pop->peers;
    struct tpb_pop_prefix *old_prefixes = pop->prefixes;
    struct learn_table old_learn = pop->learn;
    struct learned *e, *slot;
    uint64_t now = mono_ns();
    uint32_t i, to;

    for (i = 0; i < r->npeers; i++)
        if (r->from[i] != NO_PEER)
            carry(&r->peers[i], &old[r->from[i]]);
    pop->peers = r->peers;
    pop->npeers = r->npeers;
    pop->prefixes = r->prefixes;
    pop->nprefixes = r->nprefixes;
    pop->batch = r->batch;
    pop->tun_mtu = r->tun_mtu;
    pop->learn_ns = r->learn_ns;
    for (i = 0; i <= old_learn.mask; i++) {
        e = &old_learn.e[i];
        if (e->expires <= now)
            continue;
        to = r->to[e->peer];
        if (to == NO_PEER || by_prefix(pop, e->addr) ||
            r->peers[to].learned >= r->learn.budget)
            continue;
        learn_find(&r->learn, e->addr, now, &slot);
        if (slot)
            learn_put(slot, r->peers, e->addr, to, e->expires);
    }
    pop->learn = r->learn;
    pop->reclaim_ns = 0;
    pop->ka_due_ns = 0;                    /* keepalives(): look again */
    r->peers = old;                        /* for reload_free() */
    r->prefixes = old_prefixes;
    r->learn = old_learn;
    r->done = 1;
}

/* 0. A reload handed over by tpb_pop_reconfigure(), at a pass's start. */
static void take_reload(struct tpb_pop *pop)
{
    pthread_mutex_lock(&pop->lock);
    if (pop->pending) {
        apply(pop, pop->pending);
        __atomic_store_n(&pop->pending, NULL, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&pop->applied);
    }
    pthread_mutex_unlock(&pop->lock);
}

/* ---- the loop --------------------------------------------------------- */

int tpb_pop_run(struct tpb_pop *pop)
{
    struct pollfd pfd[4] = {
        {pop->raw, POLLIN, 0}, {pop->tun, POLLIN, 0}, {pop->stop_fd, POLLIN, 0},
        {pop->udp, POLLIN, 0},
    };
    uint64_t wakes;
    int work, rc = 0;

    pthread_mutex_lock(&pop->lock);
    pop->running = 1;
    pthread_mutex_unlock(&pop->lock);
    while (!__atomic_load_n(&pop->stop, __ATOMIC_ACQUIRE)) {
        pop->now_ns = mono_ns();
        __atomic_store_n(&pop->passes, pop->passes + 1, __ATOMIC_RELAXED);
        if (__atomic_load_n(&pop->pending, __ATOMIC_ACQUIRE))
            take_reload(pop);
        keepalives(pop);
        work = from_bridges(pop);
        work += to_bridges(pop);
        if (work)
            continue;
        if (poll(pfd, 4, poll_timeout(pop)) < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
        if ((pfd[2].revents & POLLIN) &&
            read(pop->stop_fd, &wakes, sizeof(wakes)) < 0) {
            /* EAGAIN: someone else's wake-up was read already */
        }
    }
    /* A reload handed over as the loop ended is applied here. */
    pthread_mutex_lock(&pop->lock);
    pop->running = 0;
    pthread_mutex_unlock(&pop->lock);
    take_reload(pop);
    return rc;
}

void tpb_pop_stop(struct tpb_pop *pop)
{
    uint64_t one = 1;

    __atomic_store_n(&pop->stop, 1, __ATOMIC_RELEASE);
    if (write(pop->stop_fd, &one, sizeof(one)) < 0) {
        /* the flag alone ends the loop at its next wake-up */
    }
}

/* The POP's state, no file descriptor opened yet; NULL: out of memory. */
static struct tpb_pop *pop_new(const struct tpb_pop_config *cfg,
                               const struct tpb_pop_peer_config *peers,
                               const struct tpb_pop_prefix *prefixes)
{
    struct tpb_pop *pop = calloc(1, sizeof(*pop));
    pthread_condattr_t ca;
    uint32_t i;

    if (!pop)
        return NULL;
    pthread_mutex_init(&pop->lock, NULL);
    pthread_mutex_init(&pop->reload_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&pop->applied, &ca);
    pthread_condattr_destroy(&ca);
    pop->raw = pop->stop_fd = pop->hdrincl = pop->udp = -1;
    pop->tun = cfg->tun_fd;
    pop->local = cfg->local;
    pop->tun_mtu = cfg->tun_mtu ? cfg->tun_mtu : 1500;
    pop->batch = cfg->batch && cfg->batch <= MAX_BATCH ? cfg->batch : MAX_BATCH;
    pop->learn_ns = (uint64_t)cfg->learn_timeout_s * NSEC;
    pop->npeers = cfg->npeers;
    pop->nprefixes = cfg->nprefixes;
    pop->peers = calloc(cfg->npeers + 1, sizeof(*pop->peers));
    pop->prefixes = calloc(cfg->nprefixes + 1, sizeof(*pop->prefixes));
#ifndef TPB_FUZZ
    pop->rbuf = malloc((size_t)MAX_BATCH * BUF_SIZE);
    pop->sbuf = malloc((size_t)MAX_BATCH * (BUF_SIZE + VNET_LEN));
#else
    /* fuzz/pop.c hands over one packet per call: one slot of each (and
     * 8 MB allocated and freed per input would be most of the time) */
    pop->rbuf = malloc(BUF_SIZE);
    pop->sbuf = malloc(BUF_SIZE + VNET_LEN);
#endif
    pop->tx = pop_tx_new();
    pop->gro = pop_gro_new();
    if (!pop->peers || !pop->prefixes || !pop->rbuf || !pop->sbuf || !pop->tx ||
        !pop->gro || learn_alloc(&pop->learn, cfg->npeers)) {
        tpb_pop_close(pop);
        return NULL;
    }
    for (i = 0; i < cfg->npeers; i++)
        peer_init(&pop->peers[i], &peers[i], cfg->local);
    memcpy(pop->prefixes, prefixes, cfg->nprefixes * sizeof(*prefixes));
    return pop;
}

struct tpb_pop *tpb_pop_open(const struct tpb_pop_config *cfg,
                             const struct tpb_pop_peer_config *peers,
                             const struct tpb_pop_prefix *prefixes,
                             char *err, size_t errlen)
{
    struct tpb_pop *pop;
    struct sockaddr_in sa;
    int v = IP_PMTUDISC_DONT, rcv = 8 << 20, one = 1;

    if (check_config(cfg, peers, prefixes, err, errlen))
        return NULL;
    pop = pop_new(cfg, peers, prefixes);
    if (!pop)
        goto oom;
    if (fcntl(pop->tun, F_SETFL, fcntl(pop->tun, F_GETFL) | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "TUN device: %s", strerror(errno));
        goto fail;
    }
    pop->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pop->raw = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_GRE_);
    /* IPPROTO_RAW receives nothing: not on any packet's receive path. */
    pop->hdrincl = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
    if (pop->stop_fd < 0 || pop->raw < 0 || pop->hdrincl < 0) {
        snprintf(err, errlen, "raw GRE socket: %s", strerror(errno));
        goto fail;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(cfg->local);
    if (bind(pop->raw, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        snprintf(err, errlen, "cannot use local address %s: %s",
                 inet_ntoa(sa.sin_addr), strerror(errno));
        goto fail;
    }
    setsockopt(pop->raw, IPPROTO_IP, IP_MTU_DISCOVER, &v, sizeof(v));
    if (setsockopt(pop->raw, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof(rcv)))
        setsockopt(pop->raw, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    /* Each packet then carries the socket's drop count (rx_drops()). */
    if (setsockopt(pop->raw, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one))) {
        snprintf(err, errlen, "SO_RXQ_OVFL: %s", strerror(errno));
        goto fail;
    }
    /* GRE-in-UDP (RFC 8086): one socket on port 4754 of the local address;
     * the kernel checks each datagram's UDP header and checksum and
     * reassembles fragments; DF clear as on the raw socket. */
    pop->udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, IPPROTO_UDP);
    sa.sin_port = htons(GRE_UDP_PORT);
    if (pop->udp < 0 || bind(pop->udp, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        snprintf(err, errlen, "cannot use UDP port %d on %s: %s", GRE_UDP_PORT,
                 inet_ntoa(sa.sin_addr), strerror(errno));
        goto fail;
    }
    setsockopt(pop->udp, IPPROTO_IP, IP_MTU_DISCOVER, &v, sizeof(v));
    if (setsockopt(pop->udp, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof(rcv)))
        setsockopt(pop->udp, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    if (setsockopt(pop->udp, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one)) ||
        setsockopt(pop->udp, IPPROTO_IP, IP_RECVTOS, &one, sizeof(one))) {
        snprintf(err, errlen, "UDP socket options: %s", strerror(errno));
        goto fail;
    }
    /* UDP GRO (Linux >= 5.0): a bridge's datagrams handed over up to 64 at
     * once (from_udp_gro()); without it, one by one as before. */
    setsockopt(pop->udp, SOL_UDP, UDP_GRO, &one, sizeof(one));
    return pop;
oom:
    snprintf(err, errlen, "out of memory");
fail:
    tpb_pop_close(pop);
    return NULL;
}

/* Live reload (tpb.h).  Checked whole before anything changes; built
 * beside the running configuration; swapped in by the loop at the start
 * of its next pass (woken through stop_fd), or here if it is not running.
 * Calls are serialized by reload_lock. */
int tpb_pop_reconfigure(struct tpb_pop *pop, const struct tpb_pop_config *cfg,
                        const struct tpb_pop_peer_config *peers,
                        const struct tpb_pop_prefix *prefixes,
                        char *err, size_t errlen)
{
    struct reload *r;
    struct timespec ts;
    uint64_t one = 1;
    char a[INET_ADDRSTRLEN];
    int rc;

    if (cfg->tun_fd != pop->tun) {
        snprintf(err, errlen, "the TUN device cannot change on reload (fd %d, not %d)",
                 cfg->tun_fd, pop->tun);
        return -EINVAL;
    }
    if (cfg->local != pop->local) {
        snprintf(err, errlen, "the local address cannot change on reload (%s)",
                 ip4_text(pop->local, a));
        return -EINVAL;
    }
    rc = check_config(cfg, peers, prefixes, err, errlen);
    if (rc)
        return rc;
    pthread_mutex_lock(&pop->reload_lock);
    r = reload_build(pop, cfg, peers, prefixes);
    if (!r) {
        pthread_mutex_unlock(&pop->reload_lock);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_lock(&pop->lock);
    if (!pop->running) {
        apply(pop, r);
    } else {
        __atomic_store_n(&pop->pending, r, __ATOMIC_RELEASE);
        if (write(pop->stop_fd, &one, sizeof(one)) < 0) {
            /* the counter is full: the loop is being woken anyway */
        }
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += RELOAD_WAIT_S;
        while (!r->done &&
               pthread_cond_timedwait(&pop->applied, &pop->lock, &ts) != ETIMEDOUT) {
        }
        if (!r->done) {
            __atomic_store_n(&pop->pending, NULL, __ATOMIC_RELEASE);
            snprintf(err, errlen, "the loop did not take the new configuration "
                     "within %d s", RELOAD_WAIT_S);
            rc = -ETIMEDOUT;
        }
    }
    pthread_mutex_unlock(&pop->lock);
    reload_free(r);            /* the old arrays, or the refused new ones */
    pthread_mutex_unlock(&pop->reload_lock);
    return rc;
}

/* ---- readers, from any thread ------------------------------------------ */

void tpb_pop_counters(struct tpb_pop *pop, uint32_t peer,
                      struct tpb_tunnel_counters *out)
{
    pthread_mutex_lock(&pop->lock);
    *out = peer < pop->npeers ? pop->peers[peer].c : pop->global;
    pthread_mutex_unlock(&pop->lock);
}

uint32_t tpb_pop_learned(struct tpb_pop *pop)
{
    uint32_t i, n = 0;
    uint64_t now = mono_ns();

    pthread_mutex_lock(&pop->lock);
    for (i = 0; i <= pop->learn.mask; i++)
        n += pop->learn.e[i].expires > now;
    pthread_mutex_unlock(&pop->lock);
    return n;
}

int tpb_pop_peer_state(struct tpb_pop *pop, uint32_t peer,
                       struct tpb_remote_state *out)
{
    const struct ka *k;
    uint64_t now;

    pthread_mutex_lock(&pop->lock);
    if (peer >= pop->npeers) {
        pthread_mutex_unlock(&pop->lock);
        return -EINVAL;
    }
    now = mono_ns();
    k = &pop->peers[peer].ka;
    memset(out, 0, sizeof(*out));
    out->addr = pop->peers[peer].cfg.addr;
    if (pop->peers[peer].cfg.encap == TPB_ENCAP_UDP && pop->peers[peer].sa.sin_port) {
        out->endpoint_addr = ntohl(pop->peers[peer].sa.sin_addr.s_addr);
        out->endpoint_port = ntohs(pop->peers[peer].sa.sin_port);
    }
    out->up = out->active = k->up;
    out->transitions = k->transitions;
    out->keepalives_sent = k->sent;
    out->keepalives_unsent = k->unsent;
    out->keepalives_received = k->received;
    out->keepalives_reflected = k->reflected;
    out->rtt_ns = k->rtt_ns;
    if (k->reply_ns)   /* never 0 once answered, even within a clock tick */
        out->since_reply_ns = now > k->reply_ns ? now - k->reply_ns : 1;
    pthread_mutex_unlock(&pop->lock);
    return 0;
}

uint64_t tpb_pop_heartbeat(struct tpb_pop *pop)
{
    return __atomic_load_n(&pop->passes, __ATOMIC_RELAXED);
}

void tpb_pop_close(struct tpb_pop *pop)
{
    if (!pop)
        return;
    if (pop->raw >= 0)
        close(pop->raw);
    if (pop->hdrincl >= 0)
        close(pop->hdrincl);
    if (pop->udp >= 0)
        close(pop->udp);
    if (pop->stop_fd >= 0)
        close(pop->stop_fd);
    free(pop->peers);
    free(pop->prefixes);
    free(pop->learn.e);
    free(pop->rbuf);
    free(pop->sbuf);
    free(pop->tx);
    free(pop->gro);
    pthread_cond_destroy(&pop->applied);
    pthread_mutex_destroy(&pop->reload_lock);
    pthread_mutex_destroy(&pop->lock);
    free(pop);
}

#ifdef TPB_FUZZ
/* ---- fuzz/: the loop's steps, one at a time, on a clock of the caller's -- */

struct tpb_pop *tpb_fuzz_pop_open(const struct tpb_pop_config *cfg,
                                  const struct tpb_pop_peer_config *peers,
                                  const struct tpb_pop_prefix *prefixes)
{
    struct tpb_pop *pop;
    char err[128];

    if (check_config(cfg, peers, prefixes, err, sizeof(err)))
        return NULL;
    pop = pop_new(cfg, peers, prefixes);
    if (pop) {              /* the harness tells the sockets apart by them */
        pop->raw = TPB_FUZZ_FD_RAW;
        pop->udp = TPB_FUZZ_FD_UDP;
        pop->hdrincl = TPB_FUZZ_FD_HDRINCL;
    }
    return pop;
}

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

void tpb_fuzz_pop_flush(struct tpb_pop *pop)
{
    gro_flush(pop);
}

int tpb_fuzz_pop_to_bridges(struct tpb_pop *pop, uint64_t now)
{
    pop->now_ns = now;
    return to_bridges(pop);
}

void tpb_fuzz_pop_keepalives(struct tpb_pop *pop, uint64_t now)
{
    pop->now_ns = now;
    keepalives(pop);
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

/* Peer i's receive state (its sequence window); -1: no such peer. */
int tpb_fuzz_pop_rx(struct tpb_pop *pop, uint32_t i, struct gre_rx *out)
{
    if (i >= pop->npeers)
        return -1;
    *out = pop->peers[i].rx;
    return 0;
}
#endif
