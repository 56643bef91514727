/* decap.c — frames from the ISP side (--out) in tunnel mode.
 *
 * A frame passes these stages, in the order the functions below appear:
 *   1. from_out_frame()  classify: ARP asking for the tunnel address, IPv4
 *                        to the tunnel address, or anything else — bridged
 *                        unchanged toward --in (GRE between other addresses
 *                        is someone else's traffic, never unwrapped);
 *   2. arp_reply()       RFC 826: the tunnel address is at --out's MAC;
 *   3. to_local()        validate the outer IPv4 header; GRE or GRE-in-UDP
 *                        (RFC 8086: udp_check, the UDP header validated
 *                        before the GRE header is looked at) from the POP
 *                        (a partial inner checksum completed, reassembled
 *                        first if fragmented, reasm.c, a first fragment's
 *                        GRE header checked before it is kept:
 *                        first_fragment_gre), an echo request (echo_reply:
 *                        its checksum verified, replies rate-limited), or a
 *                        counted drop;
 *   4. decap()           from one of the remotes: a keepalive answer
 *                        (protocol 0, keepalive.c), else gre_decode()
 *                        (version, flags, checksum, key, sequence), inner
 *                        header valid, the POP's own keepalive reflected
 *                        (ka_reflect), a super-packet's offsets and L4
 *                        header inside it (gso_inner_ok), RFC 6040 ECN, MSS;
 *   5. deliver()         the inner packet out --in behind the received
 *                        Ethernet header — readdressed to the in-side router
 *                        when the frame was sent to TPB's own MAC (it found
 *                        TPB through arp_reply), since that router would
 *                        drop a frame not addressed to it; a super-packet
 *                        with its vnet header moved (inner_vnet), for the
 *                        kernel to segment on the way out.
 * Super-packets come from --out's GRO, which merges GRE packets of one TCP
 * flow: one frame through TPB instead of up to 45.
 */
#define _GNU_SOURCE
#include <string.h>
#include <linux/if_ether.h>

#include "bridge.h"

static void arp_reply(struct tpb_bridge *br, struct frame *f);
static void decap(struct tpb_bridge *br, struct remote *r, struct frame *f,
                  uint8_t *ip, uint8_t *gre, size_t glen,
                  const struct virtio_net_hdr *gso);
static void to_local(struct tpb_bridge *br, struct frame *f);

/* 1. ------------------------------------------------------------------ */

static int arp_for_us(const struct tpb_bridge *br, const struct frame *f)
{
    const uint8_t *a = f->mac + ETH_HLEN;

    return f->len >= ETH_HLEN + 28 && rd16(a) == 1 && rd16(a + 2) == ETYPE_IPV4 &&
           a[4] == 6 && a[5] == 4 && rd16(a + 6) == 1 &&
           rd32(a + 24) == br->cfg.local;
}

void from_out_frame(struct tpb_bridge *br, struct frame *f)
{
    uint16_t type = rd16(f->mac + 12);

    if (type == ETYPE_ARP && arp_for_us(br, f)) {
        arp_reply(br, f);
        return;
    }
    if (type == ETYPE_IPV4 && f->len >= ETH_HLEN + 20 &&
        rd32(f->mac + ETH_HLEN + 16) == br->cfg.local) {
        to_local(br, f);
        return;
    }
    forward(br, &br->q[TPB_PORT_IN], f);
}

/* 2. ------------------------------------------------------------------ */

static void arp_reply(struct tpb_bridge *br, struct frame *f)
{
    struct txq *q = &br->q[TPB_PORT_OUT];
    const uint8_t *req = f->mac + ETH_HLEN;
    uint32_t i = txq_reserve(q);
    uint8_t *h = q->hdr[i], *a;
    size_t n, flen, pad;

    memset(h, 0, VNET_LEN);
    n = VNET_LEN + eth_write(h + VNET_LEN, req + 8, br->cfg.out_mac, f, ETYPE_ARP);
    a = h + n;
    wr16(a, 1);
    wr16(a + 2, ETYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    wr16(a + 6, 2);                          /* reply */
    memcpy(a + 8, br->cfg.out_mac, 6);
    wr32(a + 14, br->cfg.local);
    memcpy(a + 18, req + 8, 10);             /* the asker's MAC and IP */
    /* Pad to the 60-byte minimum: a veth does not, a NIC would. */
    flen = n - VNET_LEN + 28;
    pad = flen < ETH_ZLEN ? ETH_ZLEN - flen : 0;
    memset(a + 28, 0, pad);
    q->iov[i][0].iov_base = h;
    q->iov[i][0].iov_len = n + 28 + pad;
    txq_commit(q, i, 1);
    br->tc.arp_replies++;
}

/* 3. ------------------------------------------------------------------ */

static void decap(struct tpb_bridge *br, struct remote *r, struct frame *f,
                  uint8_t *ip, uint8_t *gre, size_t glen,
                  const struct virtio_net_hdr *gso);
static void echo_reply(struct tpb_bridge *br, struct frame *f, uint8_t *ip,
                       size_t tot);

/* The GRE header in a first fragment (offset 0), checked as far as it can
 * be before reassembly: version, flags, the options this remote must send,
 * its key, the protocol (gre_decode() and gre_keepalive_answer() check all
 * of it again on the whole).  The checksum covers the whole packet and the
 * sequence window moves only for a whole one.  A first fragment too short
 * to hold its GRE header is refused as RFC 1858 (3.2) refuses one too
 * short for its TCP header: any real sender's first fragment holds it. */
static int first_fragment_gre(const struct gre_rx *r, const uint8_t *g,
                              size_t glen)
{
    struct gre_pkt p;
    uint16_t proto;
    int rc = gre_check(r, g, glen, GRE_CHECK_SEQ, &p);

    if (rc)
        return rc;
    proto = rd16(g + 2);
    if (proto != ETYPE_IPV4 && proto != ETYPE_IPV6 && proto != 0)
        return TPB_DROP_GRE_PROTO;
    return 0;
}

/* GRE-in-UDP (RFC 8086) at ip, a whole datagram of tot bytes: the UDP
 * header validated as RFC 768 and Linux's udp_rcv do (the length within
 * the datagram, bytes past it ignored; the checksum verified unless it is
 * zero, "no checksum", which RFC 8086 6.1 allows over IPv4), and one of its
 * ports 4754: toward 4754 from the POP's flow-hashed port, or from 4754 —
 * where a NAT'd bridge's own port is answered.  Returns 0 with the GRE
 * header's place and length, or a drop reason. */
static int udp_check(const uint8_t *ip, size_t tot, uint8_t **gre, size_t *glen)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, ulen;
    const uint8_t *u = ip + ihl;

    if (tot - ihl < UDP_HLEN)
        return TPB_DROP_UDP_BAD;
    ulen = rd16(u + 4);
    if (ulen < UDP_HLEN || ulen > tot - ihl)
        return TPB_DROP_UDP_BAD;
    if (rd16(u) != GRE_UDP_PORT && rd16(u + 2) != GRE_UDP_PORT)
        return TPB_DROP_LOCAL_OTHER;
    if (rd16(u + 6) &&
        csum_finish(csum_add(csum_pseudo4(ip, IPPROTO_UDP_, (uint32_t)ulen), u, ulen)))
        return TPB_DROP_UDP_CSUM;
    *gre = (uint8_t *)u + UDP_HLEN;
    *glen = ulen - UDP_HLEN;
    return 0;
}

/* A first fragment (offset 0) of GRE-in-UDP: its UDP header's ports (the
 * length and checksum cover the whole datagram: checked once reassembled),
 * then its GRE header as first_fragment_gre() checks it. */
static int first_fragment_udp(const struct gre_rx *r, const uint8_t *ip, size_t tot)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    const uint8_t *u = ip + ihl;

    if (tot - ihl < UDP_HLEN)
        return TPB_DROP_UDP_BAD;
    if (rd16(u) != GRE_UDP_PORT && rd16(u + 2) != GRE_UDP_PORT)
        return TPB_DROP_LOCAL_OTHER;
    return first_fragment_gre(r, u + UDP_HLEN, tot - ihl - UDP_HLEN);
}

/* A UDP GSO super-packet of GRE-in-UDP: another TPB's udpgso.c sent it
 * across a veth or a local bridge whole (or UDP GRO merged datagrams of
 * one size).  CHECKSUM_PARTIAL: the UDP checksums are to be computed, not
 * checked (the kernel's own rule for such an skb: made on this host, or
 * verified by GRO).  Every gso_size bytes of its payload are one datagram's:
 * a GRE header and an inner packet, each decapsulated as if it had come
 * alone, checks and sequence window included.  The vnet header must
 * point at this UDP header, whose length is the whole payload's. */
static void udp_gso_split(struct tpb_bridge *br, struct remote *r,
                          struct frame *f, uint8_t *ip, size_t tot)
{
    const struct virtio_net_hdr *vh = f->vh;
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, off, seg = vh->gso_size, n;
    const uint8_t *u = ip + ihl;

    if ((vh->gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_UDP_L4 ||
        !(vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || !seg ||
        vh->csum_start != (size_t)(ip - f->mac) + ihl || vh->csum_offset != 6 ||
        (rd16(ip + 6) & (IP_MF | IP_OFFMASK)) || tot < ihl + UDP_HLEN + 1 ||
        rd16(u + 4) != tot - ihl) {
        br->tc.drop[TPB_DROP_GSO_BAD]++;
        return;
    }
    if (rd16(u) != GRE_UDP_PORT && rd16(u + 2) != GRE_UDP_PORT) {
        br->tc.drop[TPB_DROP_LOCAL_OTHER]++;
        return;
    }
    br->tc.udp_gso_received++;
    if (udp_gso_coalesce(br, r, f, ip, tot, seg))
        return;
    for (off = ihl + UDP_HLEN; off < tot; off += n) {
        n = tot - off < seg ? tot - off : seg;
        decap(br, r, f, ip, ip + off, n, NULL);
    }
}

static void to_local(struct tpb_bridge *br, struct frame *f)
{
    uint8_t *ip = f->mac + ETH_HLEN, *gre;
    size_t tot = ip4_check(ip, f->len - ETH_HLEN), ihl, glen;
    int udp;

    if (!tot) {
        br->tc.drop[TPB_DROP_OUTER_BAD]++;
        return;
    }
    ihl = (size_t)(ip[0] & 0x0f) * 4;
    udp = ip[9] == IPPROTO_UDP_;
    if (ip[9] == IPPROTO_GRE_ || udp) {
        struct remote *r = ka_remote(br, rd32(ip + 12));
        int rc;

        if (!r) {
            br->tc.drop[TPB_DROP_NOT_PEER]++;
            return;
        }
        if (f->vh->gso_type != VIRTIO_NET_HDR_GSO_NONE) {
            if (udp)
                udp_gso_split(br, r, f, ip, tot);
            else
                decap(br, r, f, ip, ip + ihl, tot - ihl, f->vh);
            return;
        }
        /* A sender on this host leaves the inner checksum partial (a NIC
         * would fill it in): finish it, or the GRE checksum cannot add up
         * and the packet would leave --in with a wrong one (with GRE-in-UDP
         * it is the UDP checksum the host left partial).  It lies past the
         * outer header (which is checked already) and the sum ends with the
         * packet, not with any Ethernet padding. */
        if ((f->vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
            finish_csum(f->mac, ETH_HLEN + tot, f->vh, ETH_HLEN + ihl)) {
            br->tc.drop[TPB_DROP_INNER_BAD]++;
            return;
        }
        if (rd16(ip + 6) & (IP_MF | IP_OFFMASK)) {
            rc = (rd16(ip + 6) & IP_OFFMASK) ? 0
                 : udp ? first_fragment_udp(&r->grx, ip, tot)
                       : first_fragment_gre(&r->grx, ip + ihl, tot - ihl);
            if (rc) {
                /* Refused at once, and what its datagram held with it. */
                br->tc.drop[rc]++;
                reasm_forget(br->reasm, &br->tc, ip);
                return;
            }
            ip = reasm_add(br->reasm, &br->tc, &br->q[TPB_PORT_IN], ip, tot,
                           br->now_ns, &tot);
            if (!ip)
                return;             /* kept for later, or counted as dropped */
        }
        if (!udp) {
            decap(br, r, f, ip, ip + ihl, tot - ihl, NULL);
            return;
        }
        rc = udp_check(ip, tot, &gre, &glen);
        if (rc) {
            br->tc.drop[rc]++;
            return;
        }
        decap(br, r, f, ip, gre, glen, NULL);
        return;
    }
    if (ip[9] == IPPROTO_ICMP_ && !(rd16(ip + 6) & (IP_MF | IP_OFFMASK)) &&
        tot >= ihl + 8 && ip[ihl] == 8 && ip[ihl + 1] == 0) {
        echo_reply(br, f, ip, tot);
        return;
    }
    br->tc.drop[TPB_DROP_LOCAL_OTHER]++;
}

/* Echo replies at most icmp_rate a second, a burst of one second's: a
 * bucket of their own, so that a flood of pings cannot use up what
 * fragmentation-needed messages need (encap.c: icmp_too_big; RFC 1812
 * 4.3.2.8: a router limits the rate of the ICMP it sends). */
static int echo_allowed(struct tpb_bridge *br)
{
    double rate = br->cfg.icmp_rate;

    br->echo_tokens += (double)(br->now_ns - br->echo_last_ns) * rate / 1e9;
    br->echo_last_ns = br->now_ns;
    if (br->echo_tokens > rate)
        br->echo_tokens = rate;
    if (br->echo_tokens < 1.0)
        return 0;
    br->echo_tokens -= 1.0;
    return 1;
}

static void echo_reply(struct tpb_bridge *br, struct frame *f, uint8_t *ip,
                       size_t tot)
{
    struct txq *q = &br->q[TPB_PORT_OUT];
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, n;
    uint32_t i;
    uint8_t *h, *rip, *ic;
    uint16_t c;

    /* RFC 792: the checksum covers the whole ICMP message; the reply's is
     * derived from the request's (RFC 1624), so a wrong one would go back
     * out wrong.  A request that does not verify is not answered. */
    if (csum_finish(csum_add(0, ip + ihl, tot - ihl)) != 0) {
        br->tc.drop[TPB_DROP_ECHO_CSUM]++;
        return;
    }
    if (!echo_allowed(br)) {
        br->tc.drop[TPB_DROP_ECHO_RATELIMITED]++;
        return;
    }
    i = txq_reserve(q);
    h = q->hdr[i];

    memset(h, 0, VNET_LEN);
    /* From the MAC the request was sent to: TPB's own, or the router's
     * whose address it borrowed on this link. */
    n = VNET_LEN + eth_write(h + VNET_LEN, f->mac + 6, f->mac, f, ETYPE_IPV4);
    rip = h + n;
    ic = rip + 20;
    rip[0] = 0x45;
    rip[1] = ip[1];
    wr16(rip + 2, (uint16_t)(20 + tot - ihl));
    wr16(rip + 4, br->gtx.ip_id++);
    wr16(rip + 6, 0);
    rip[8] = 64;
    rip[9] = IPPROTO_ICMP_;
    memcpy(rip + 12, ip + 16, 4);
    memcpy(rip + 16, ip + 12, 4);
    ip4_set_csum(rip);
    memcpy(ic, ip + ihl, 8);
    ic[0] = 0;                                   /* echo reply */
    /* RFC 1624 eqn. 3 yields 0 where the rest of the message may be all
     * zero (id, sequence number, data): only 0xffff sums to -0 with that,
     * and 0xffff is right for any other message that yields 0 too. */
    c = csum_replace16(rd16(ic + 2), 0x0800, 0x0000);
    wr16(ic + 2, c ? c : 0xffff);
    q->iov[i][0].iov_base = h;
    q->iov[i][0].iov_len = n + 28;
    q->iov[i][1].iov_base = ip + ihl + 8;
    q->iov[i][1].iov_len = tot - ihl - 8;
    txq_commit(q, i, 2);
    br->tc.echo_replies++;
}

/* 4. ------------------------------------------------------------------ */

static int deliver(struct tpb_bridge *br, struct frame *f, uint8_t *in,
                   size_t ilen, uint16_t proto,
                   const struct virtio_net_hdr *gso);

/* A GRE super-packet: the port's GRO merged consecutive GRE packets of one
 * inner TCP flow (the kernel does for GRE without sequence numbers) and
 * checked every checksum on the way.  The vnet header's offsets count from
 * the outer Ethernet header; the inner L4 header must lie inside the inner
 * packet, whole (a TCP one with a data offset of at least 5, RFC 9293
 * 3.1), or the kernel could not segment it on the way out. */
static int gso_inner_ok(const struct frame *f, const uint8_t *in, size_t ilen,
                        const struct virtio_net_hdr *vh)
{
    size_t ioff = (size_t)(in - f->mac), start = vh->csum_start, l4len;
    size_t l3 = in[0] >> 4 == 4 ? (size_t)(in[0] & 0x0f) * 4 : 40;

    if (!(vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || !vh->gso_size ||
        start < ioff + l3 || start + vh->csum_offset + 2 > ioff + ilen)
        return 0;
    if ((vh->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_UDP_L4)
        return start + 8 <= ioff + ilen;
    if (start + 20 > ioff + ilen)
        return 0;
    l4len = (size_t)(f->mac[start + 12] >> 4) * 4;
    return l4len >= 20 && start + l4len <= ioff + ilen;
}

/* gre: the GRE header (right behind the outer IPv4 header, or behind its
 * UDP header), glen bytes to the end of the datagram. */
static void decap(struct tpb_bridge *br, struct remote *r, struct frame *f,
                  uint8_t *ip, uint8_t *gre, size_t glen,
                  const struct virtio_net_hdr *gso)
{
    size_t ilen;
    struct gre_pkt g;
    uint8_t *in;
    int rc;

    /* Protocol 0: the answer to one of our keepalives (keepalive.c). */
    if (!gso && glen >= 4 && rd16(gre + 2) == 0) {
        rc = gre_keepalive_answer(&r->grx, gre, glen);
        if (!rc)
            rc = ka_id_check(r->ka_id, r->st.keepalives_sent, rd16(ip + 4),
                             br->cfg.keepalive_retries);
        if (rc) {
            br->tc.drop[rc]++;
            return;
        }
        ka_answer(br, r, ip);
        return;
    }
    rc = gre_decode(&r->grx, gre, glen, gso != NULL, &g);
    if (rc) {
        br->tc.drop[rc]++;
        return;
    }
    in = gre + g.off;
    ilen = ip_len(in, glen - g.off, g.proto);
    if (!ilen) {
        br->tc.drop[TPB_DROP_INNER_BAD]++;
        return;
    }
    /* The POP's keepalive: an IPv4 GRE packet from us back to it. */
    if (!gso && g.proto == ETYPE_IPV4 && ka_reflect(br, f, r, in, ilen)) {
        gre_commit_seq(&r->grx, &g);
        return;
    }
    if (gso && !gso_inner_ok(f, in, ilen, gso)) {
        br->tc.drop[TPB_DROP_GSO_BAD]++;
        return;
    }
    if (ecn_decap_inner(ip[1], in, g.proto)) {
        br->tc.drop[TPB_DROP_ECN]++;
        return;
    }
    clamp_mss(br, in, ilen, g.proto, 0);
    /* Every check passed and the packet is on its way: only now does its
     * sequence number count as received (gre.c: gre_commit_seq). */
    if (deliver(br, f, in, ilen, g.proto, gso) == 0)
        gre_commit_seq(&r->grx, &g);
}

/* 5. ------------------------------------------------------------------ */

/* The super-packet's vnet header for the inner packet behind an Ethernet
 * header of elen bytes: offsets moved by what was stripped. */
static void inner_vnet(struct virtio_net_hdr *vh, const struct frame *f,
                       const uint8_t *in, size_t ilen, size_t elen)
{
    size_t shift = (size_t)(in - f->mac) - elen;
    const uint8_t *l4 = f->mac + vh->csum_start;

    size_t l4len = (vh->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) ==
                           VIRTIO_NET_HDR_GSO_UDP_L4
                       ? 8
                       : (size_t)(l4[12] >> 4) * 4;

    vh->csum_start = (uint16_t)(vh->csum_start - shift);
    /* A hint of the headers' length; never past the packet's end. */
    vh->hdr_len = (uint16_t)(vh->csum_start + l4len < elen + ilen
                                 ? vh->csum_start + l4len
                                 : elen + ilen);
}

/* Returns 0 once the packet is queued, -1 if it was dropped (counted).
 * The inner packet, ilen bytes, is pkt[0..npkt) (coalesce.c gathers a
 * super-packet from its pieces' payloads in the ring).  gso's offsets
 * count from the outer Ethernet header (a GRE super-packet GRO merged), or
 * with gso_inner from the inner packet (coalesce.c). */
static int deliver_iov(struct tpb_bridge *br, struct frame *f,
                       const struct iovec *pkt, uint32_t npkt, size_t ilen,
                       uint16_t proto, const struct virtio_net_hdr *gso,
                       int gso_inner)
{
    struct txq *q = &br->q[TPB_PORT_IN];
    const uint8_t *dst = f->mac, *src = f->mac + 6;
    struct iovec *iov;
    uint32_t i;
    uint8_t *h;
    size_t n;

    if (!memcmp(f->mac, br->cfg.out_mac, 6)) {
        if (!br->have_router_mac) {
            br->tc.drop[TPB_DROP_NO_ROUTER_MAC]++;
            return -1;
        }
        dst = br->router_mac;
    }
    i = txq_reserve_long(q, 1 + npkt);
    iov = q->msg[i].msg_hdr.msg_iov;
    h = q->hdr[i];
    memset(h, 0, VNET_LEN);
    n = VNET_LEN + eth_write(h + VNET_LEN, dst, src, f, proto);
    if (gso) {
        struct virtio_net_hdr *vh = (struct virtio_net_hdr *)h;

        memcpy(h, gso, VNET_LEN);
        if (gso_inner) {
            vh->csum_start = (uint16_t)(vh->csum_start + n - VNET_LEN);
            vh->hdr_len = (uint16_t)(vh->hdr_len + n - VNET_LEN);
        } else {
            inner_vnet(vh, f, pkt[0].iov_base, ilen, n - VNET_LEN);
        }
    }
    iov[0].iov_base = h;
    iov[0].iov_len = n;
    memcpy(iov + 1, pkt, npkt * sizeof(*pkt));
    if (gso)
        txq_commit_queued(q, i, (int)(1 + npkt));
    else
        txq_commit(q, i, (int)(1 + npkt));
    br->tc.decap_packets++;
    br->tc.decap_bytes += ilen;
    return 0;
}

static int deliver(struct tpb_bridge *br, struct frame *f, uint8_t *in,
                   size_t ilen, uint16_t proto,
                   const struct virtio_net_hdr *gso)
{
    struct iovec v = { in, ilen };

    return deliver_iov(br, f, &v, 1, ilen, proto, gso, 0);
}

int decap_deliver_inner(struct tpb_bridge *br, struct frame *f,
                        const struct iovec *pkt, uint32_t npkt, size_t ilen,
                        const struct virtio_net_hdr *vh)
{
    return deliver_iov(br, f, pkt, npkt, ilen, ETYPE_IPV4, vh, 1);
}
