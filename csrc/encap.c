/* encap.c — a selected frame into GRE toward the POP.
 *
 * A frame passes these stages, in the order the functions below appear:
 *   0. encap_mtu()     (not per frame) --out's MTU, followed while running:
 *                      below RFC 791's 68 bytes plus the overhead the
 *                      tunnel carries nothing; the MSS clamps;
 *   1. encap_frame()   no POP up: bypass or drop (keepalive.c: tunnel_down);
 *                      MTU too small: drop (mtu_too_small);
 *                      validate the inner IP header (trimming Ethernet
 *                      padding), learn_router(): the in-side router's MAC;
 *   2. clamp_mss()     SYN / SYN-ACK MSS down to what fits the tunnel,
 *                      checksum updated per RFC 1624;
 *   3. segment() / finish_csum() (segment.c): super-packets cut into
 *                      segments, partial checksums completed — a GRE packet
 *                      can carry neither on to the POP; with GRE-in-UDP the
 *                      segments that fit go on as one UDP GSO message
 *                      (udpgso.c), the others to encap_fit();
 *   4. encap_fit()     fits the --out MTU: push_gre(); too big with DF and
 *                      pmtud: icmp_too_big(); fragments no IPv4 header can
 *                      describe (past 65535 bytes): dropped; otherwise
 *                      fragment;
 *   5. push_gre()      one message: vnet | Ethernet as received | outer
 *                      IPv4 + GRE | inner packet, zero copy from the ring;
 *   6. frag_inner()    RFC 791 fragments of the inner IPv4 packet, each
 *                      its own GRE packet (as Linux ip_gre: the POP need not
 *                      reassemble); frag_outer(): encapsulate, then
 *                      fragment the outer packet (RFC 2784 style);
 *   7. icmp_too_big()  RFC 792 type 3 code 4 with the RFC 1191 next-hop
 *                      MTU, back out --in from the tunnel address,
 *                      rate-limited by a token bucket.
 */
#define _GNU_SOURCE
#include <string.h>
#include <linux/if_ether.h>

#include "bridge.h"

#define TCP_SYN 0x02
#define ICMP_QUOTE_MAX (576 - 20 - 8)   /* RFC 1812 4.3.2.3 */
#define IP_MAX 65535u                   /* RFC 791: the total length field */


/* 0. ------------------------------------------------------------------ */

/* RFC 791: "Every internet module must be able to forward a datagram of 68
 * octets without further fragmentation" — a header of up to 60 bytes and
 * the smallest fragment, 8.  Inside the tunnel that is what an inner
 * fragment needs (frag_inner cuts at multiples of 8 behind the inner
 * header), and the least next-hop MTU an ICMP "fragmentation needed" may
 * announce (RFC 1191, 3).  So --out must carry 68 + the outer IPv4 and GRE
 * headers: 92 bytes without GRE options, 104 with checksum, key and
 * sequence number.  (IPv6 inner packets, whose links must carry 1280
 * bytes, RFC 8200 5, are fragmented in the outer header below that.) */
size_t encap_min_mtu(size_t overhead)
{
    return 68 + overhead;
}

void encap_mtu(struct tpb_bridge *br, uint32_t mtu)
{
    /* No outer IPv4 datagram is longer than 65535 bytes, whatever the link
     * carries (lo: 65536): the fit, the ICMP next-hop MTU and the MSS clamp
     * stay within what the 16-bit fields hold. */
    if (mtu > IP_MAX)
        mtu = IP_MAX;
    br->cfg.mtu = mtu;
    br->mtu_ok = mtu >= encap_min_mtu(br->overhead);
    if (br->cfg.mss) {
        br->mss4 = br->mss6 = br->cfg.mss;
    } else if (br->mtu_ok) {
        /* RFC 879 / RFC 6691: MSS = MTU - IP header - TCP header */
        br->mss4 = (uint16_t)(mtu - br->overhead - 40);
        br->mss6 = (uint16_t)(mtu - br->overhead - 60);
    }   /* else: nothing selected leaves; the clamp of the way back stays */
}

/* 1. ------------------------------------------------------------------ */

/* --in faces one router, the enterprise gateway: the source of the
 * frames selected for the tunnel tells TPB where unwrapped packets go when
 * they were addressed to TPB's own MAC (see decap.c: deliver).  Never a
 * bridged frame: any host upstream can send one from any MAC.  Never when
 * the operator named it (router_mac): on a segment where several hosts'
 * flows are selected, the last to send would win. */
void learn_router(struct tpb_bridge *br, const struct frame *f)
{
    if (br->cfg.router_mac_set || (f->mac[6] & 1) ||
        (br->have_router_mac && !memcmp(br->router_mac, f->mac + 6, 6)))
        return;
    memcpy(br->router_mac, f->mac + 6, 6);
    br->have_router_mac = 1;
}

void encap_frame(struct tpb_bridge *br, struct frame *f)
{
    uint8_t *ip = f->mac + ETH_HLEN;
    uint16_t proto = rd16(f->mac + 12);
    const struct virtio_net_hdr *vh = f->vh;
    int partial = (vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0;
    int udp_gso = br->gtx.udp && br->ugso.buf;
    struct inner p;
    size_t len;

    if (br->active < 0) {          /* no POP answers: keepalive.c */
        tunnel_down(br, f);
        return;
    }
    if (!br->mtu_ok) {             /* the loop goes on; ARP, echo, decap too */
        br->tc.drop[TPB_DROP_MTU_TOO_SMALL]++;
        return;
    }
    if (proto != ETYPE_IPV4 && proto != ETYPE_IPV6) {
        br->tc.drop[TPB_DROP_ENCAP_NOT_IP]++;
        return;
    }
    len = ip_len(ip, f->len - ETH_HLEN, proto);
    if (!len) {
        br->tc.drop[TPB_DROP_ENCAP_BAD]++;
        return;
    }
    learn_router(br, f);
    clamp_mss(br, ip, len, proto, partial);
    if (vh->gso_type != VIRTIO_NET_HDR_GSO_NONE) {
        /* GRE-in-UDP: the segments leave as UDP GSO messages (udpgso.c) */
        int n = segment(br, &br->q[TPB_PORT_OUT], f, ip, len, proto, vh,
                        udp_gso ? ugso_add : encap_fit);

        if (udp_gso)
            ugso_flush(br, f);

        if (n < 0) {
            br->tc.drop[TPB_DROP_GSO_BAD]++;
            return;
        }
        br->tc.gso_packets++;
        br->tc.gso_segments += (uint64_t)n;
        return;
    }
    if (partial && finish_csum(f->mac, ETH_HLEN + len, vh, ETH_HLEN + ip_hlen(ip, proto))) {
        br->tc.drop[TPB_DROP_ENCAP_BAD]++;
        return;
    }
    p.hdr = ip;
    p.hlen = len;
    p.data = NULL;
    p.dlen = 0;
    p.proto = proto;
    encap_fit(br, f, &p);
}

/* 2. ------------------------------------------------------------------ */

int clamp_mss(struct tpb_bridge *br, uint8_t *ip, size_t len, uint16_t proto,
              int partial)
{
    size_t ihl, doff, i;
    uint8_t *tcp;
    uint16_t clamp, mss;

    if (proto == ETYPE_IPV4) {
        ihl = (size_t)(ip[0] & 0x0f) * 4;
        if (ip[9] != IPPROTO_TCP_ || (rd16(ip + 6) & IP_OFFMASK))
            return 0;
        clamp = br->mss4;
    } else {
        ihl = 40;
        if (ip[6] != IPPROTO_TCP_)
            return 0;
        clamp = br->mss6;
    }
    if (len < ihl + 20)
        return 0;
    tcp = ip + ihl;
    doff = (size_t)(tcp[12] >> 4) * 4;
    if (!(tcp[13] & TCP_SYN) || doff < 20 || ihl + doff > len)
        return 0;
    for (i = 20; i < doff && tcp[i] != 0;) {
        if (tcp[i] == 1) {            /* NOP */
            i++;
            continue;
        }
        if (i + 1 >= doff || tcp[i + 1] < 2 || i + tcp[i + 1] > doff)
            return 0;
        if (tcp[i] == 2 && tcp[i + 1] == 4) {
            mss = rd16(tcp + i + 2);
            if (mss <= clamp)
                return 0;             /* smaller MSS options stay */
            wr16(tcp + i + 2, clamp);
            /* A partial checksum is finished later over the new bytes.
             * A field at an odd offset enters the sum byte-swapped. */
            if (!partial)
                wr16(tcp + 16, (i & 1)
                     ? csum_replace16(rd16(tcp + 16), __builtin_bswap16(mss),
                                      __builtin_bswap16(clamp))
                     : csum_replace16(rd16(tcp + 16), mss, clamp));
            br->tc.mss_clamped++;
            return 1;
        }
        i += tcp[i + 1];
    }
    return 0;
}

/* 4. ------------------------------------------------------------------ */

static void push_gre(struct tpb_bridge *br, struct frame *f, struct inner *p);
static void frag_inner(struct tpb_bridge *br, struct frame *f, struct inner *p);
static void frag_outer(struct tpb_bridge *br, struct frame *f, struct inner *p);
static void icmp_too_big(struct tpb_bridge *br, struct frame *f,
                         struct inner *p);

/* Whether IPv4 headers can describe the fragments (RFC 791): an inner
 * fragment's offset counts in the inner datagram, which with its header
 * ends by 65535 bytes — the packet being cut may be a fragment already,
 * claiming more; an outer datagram is at most 65535 bytes, GRE included,
 * which a near-64 KiB inner packet (IPv6's payload alone may be 65535)
 * exceeds.  Past that the offset would reach 8192 x 8 and spill into the
 * flag bits (8192 reads as MF with offset 0). */
static int fragments_fit(const struct tpb_bridge *br, const struct inner *p)
{
    size_t ilen = p->hlen + p->dlen;

    if (br->cfg.frag_mode == TPB_FRAG_INNER && p->proto == ETYPE_IPV4)
        return (size_t)(rd16(p->hdr + 6) & IP_OFFMASK) * 8 + ilen <= IP_MAX;
    return br->overhead + ilen <= IP_MAX;
}

void encap_fit(struct tpb_bridge *br, struct frame *f, struct inner *p)
{
    /* cfg.mtu <= 65535 (encap_mtu): what fits is one outer datagram. */
    if (p->hlen + p->dlen + br->overhead <= br->cfg.mtu) {
        push_gre(br, f, p);
        return;
    }
    if (p->proto == ETYPE_IPV4 && (rd16(p->hdr + 6) & IP_DF) && br->cfg.pmtud) {
        icmp_too_big(br, f, p);
        br->tc.drop[TPB_DROP_TOO_BIG]++;
        return;
    }
    if (!fragments_fit(br, p)) {
        br->tc.drop[TPB_DROP_FRAG_OVERFLOW]++;
        return;
    }
    br->tc.fragmented++;
    if (br->cfg.frag_mode == TPB_FRAG_INNER && p->proto == ETYPE_IPV4)
        frag_inner(br, f, p);
    else
        frag_outer(br, f, p);
}

/* 5. ------------------------------------------------------------------ */

/* vnet header (all zero: nothing left for the kernel to do) + Ethernet
 * header as received, now carrying IPv4. */
static size_t outer_eth(uint8_t *h, const struct frame *f)
{
    memset(h, 0, VNET_LEN);
    return VNET_LEN + eth_write(h + VNET_LEN, f->mac, f->mac + 6, f, ETYPE_IPV4);
}

static void push_gre(struct tpb_bridge *br, struct frame *f, struct inner *p)
{
    struct txq *q = &br->q[TPB_PORT_OUT];
    uint32_t psum = 0, i;
    uint8_t *h;
    size_t n;
    int niov = 2;

    if (gre_wants_psum(&br->gtx))
        psum = csum_add(csum_add(0, p->hdr, p->hlen), p->data, p->dlen);
    i = txq_reserve(q);
    h = q->hdr[i];
    n = outer_eth(h, f);
    n += gre_encap(&br->gtx, h + n, p->proto, p->hdr, p->hlen + p->dlen, psum);
    q->iov[i][0].iov_base = h;
    q->iov[i][0].iov_len = n;
    q->iov[i][1].iov_base = p->hdr;
    q->iov[i][1].iov_len = p->hlen;
    if (p->dlen) {
        q->iov[i][2].iov_base = (void *)p->data;
        q->iov[i][2].iov_len = p->dlen;
        niov = 3;
    }
    txq_commit_queued(q, i, niov);
    /* encap_packets/bytes: counted once it has left (txq.c: account) */
    txq_account(q, i, TXQ_ACCT_ENCAP, (uint32_t)(p->hlen + p->dlen));
}

/* 6. ------------------------------------------------------------------ */

/* Copies the inner packet to dst + at (bounce memory from q).  A segment's
 * header lives in that same arena, which txq_alloc() may recycle: it is
 * saved on the stack first. */
static uint8_t *bounce(struct txq *q, const struct inner *p, size_t at)
{
    uint8_t saved[128], *buf;

    if (p->hlen > sizeof(saved) && p->dlen)
        return NULL;
    if (p->dlen)
        memcpy(saved, p->hdr, p->hlen);
    buf = txq_alloc(q, at + p->hlen + p->dlen);
    if (!buf)
        return NULL;
    memcpy(buf + at, p->dlen ? saved : p->hdr, p->hlen);
    if (p->dlen)
        memcpy(buf + at + p->hlen, p->data, p->dlen);
    return buf;
}

/* The inner packet in one piece (fragmentation slices across it). */
static uint8_t *linear(struct txq *q, const struct inner *p)
{
    return p->dlen ? bounce(q, p, 0) : p->hdr;
}

static void frag_inner(struct tpb_bridge *br, struct frame *f, struct inner *p)
{
    struct txq *q = &br->q[TPB_PORT_OUT];
    uint8_t *ip = linear(q, p), *h, *ih;
    size_t ihl, plen, maxd, off, d, n, gl = br->overhead;
    uint16_t frag0, off0;
    uint32_t i, psum;

    if (!ip) {
        br->tc.drop[TPB_DROP_ENCAP_BAD]++;
        return;
    }
    ihl = (size_t)(ip[0] & 0x0f) * 4;
    plen = p->hlen + p->dlen - ihl;
    maxd = (br->cfg.mtu - gl - ihl) & ~(size_t)7;
    frag0 = rd16(ip + 6);
    off0 = (uint16_t)((frag0 & IP_OFFMASK) * 8);
    for (off = 0; off < plen; off += d) {
        d = plen - off > maxd ? maxd : plen - off;
        i = txq_reserve(q);
        h = q->hdr[i];
        n = outer_eth(h, f);
        /* The fragment's own header goes after the outer headers; options
         * are copied into every fragment (a simplification of RFC 791's
         * copied flag: options are rare on forwarded traffic). */
        ih = h + n + gl;
        memcpy(ih, ip, ihl);
        wr16(ih + 2, (uint16_t)(ihl + d));
        wr16(ih + 6, (uint16_t)(((off0 + off) / 8) |
                                ((off + d < plen || (frag0 & IP_MF)) ? IP_MF : 0)));
        ip4_set_csum(ih);
        psum = gre_wants_psum(&br->gtx)
                   ? csum_add(csum_add(0, ih, ihl), ip + ihl + off, d) : 0;
        gre_encap(&br->gtx, h + n, ETYPE_IPV4, ih, ihl + d, psum);
        q->iov[i][0].iov_base = h;
        q->iov[i][0].iov_len = n + gl + ihl;
        q->iov[i][1].iov_base = ip + ihl + off;
        q->iov[i][1].iov_len = d;
        txq_commit_queued(q, i, 2);
        /* each inner fragment is a GRE packet of its own: counted once it
         * has left (txq.c: account) */
        txq_account(q, i, TXQ_ACCT_ENCAP, (uint32_t)(ihl + d));
        br->tc.fragments++;
    }
}

static void frag_outer(struct tpb_bridge *br, struct frame *f, struct inner *p)
{
    struct txq *q = &br->q[TPB_PORT_OUT];
    size_t ilen = p->hlen + p->dlen, total = br->overhead + ilen;
    size_t plen = total - 20, maxd = (br->cfg.mtu - 20) & ~(size_t)7, off, d, n;
    uint8_t *buf = bounce(q, p, br->overhead), *h, *oh;
    uint32_t i;

    if (!buf) {
        br->tc.drop[TPB_DROP_ENCAP_BAD]++;
        return;
    }
    gre_encap(&br->gtx, buf, p->proto, buf + br->overhead, ilen,
              gre_wants_psum(&br->gtx) ? csum_add(0, buf + br->overhead, ilen) : 0);
    for (off = 0; off < plen; off += d) {
        d = plen - off > maxd ? maxd : plen - off;
        i = txq_reserve(q);
        h = q->hdr[i];
        n = outer_eth(h, f);
        oh = h + n;
        memcpy(oh, buf, 20);
        wr16(oh + 2, (uint16_t)(20 + d));
        /* Fragmenting means DF is off, whatever the policy said. */
        wr16(oh + 6, (uint16_t)((off / 8) | (off + d < plen ? IP_MF : 0)));
        ip4_set_csum(oh);
        q->iov[i][0].iov_base = h;
        q->iov[i][0].iov_len = n + 20;
        q->iov[i][1].iov_base = buf + 20 + off;
        q->iov[i][1].iov_len = d;
        txq_commit_queued(q, i, 2);
        /* one GRE packet: counted when its last fragment has left, and
         * only if none of the others was refused (txq.c: account) */
        if (off + d < plen)
            txq_account(q, i, TXQ_ACCT_ENCAP_FRAG, 0);
        else
            txq_account(q, i, TXQ_ACCT_ENCAP, (uint32_t)ilen);
        br->tc.fragments++;
    }
}

/* 7. ------------------------------------------------------------------ */

static int icmp_allowed(struct tpb_bridge *br)
{
    double rate = br->cfg.icmp_rate;

    br->icmp_tokens += (double)(br->now_ns - br->icmp_last_ns) * rate / 1e9;
    br->icmp_last_ns = br->now_ns;
    if (br->icmp_tokens > rate)
        br->icmp_tokens = rate;      /* a burst of at most one second's */
    if (br->icmp_tokens < 1.0)
        return 0;
    br->icmp_tokens -= 1.0;
    return 1;
}

/* RFC 1812 4.3.2.7: no ICMP error about an ICMP error, a non-initial
 * fragment, or a packet from a broadcast, multicast or zero source. */
static int icmp_wanted(const uint8_t *ip, size_t len)
{
    uint32_t src = rd32(ip + 12);
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    uint8_t type;

    if ((rd16(ip + 6) & IP_OFFMASK) || src == 0 || src == 0xffffffffu ||
        (src >> 28) == 0xe)
        return 0;
    if (ip[9] == IPPROTO_ICMP_ && len > ihl) {
        type = ip[ihl];
        if (type != 0 && type != 8 && type != 13 && type != 14)
            return 0;
    }
    return 1;
}

static void icmp_too_big(struct tpb_bridge *br, struct frame *f,
                         struct inner *p)
{
    struct txq *q = &br->q[TPB_PORT_IN];
    size_t ilen = p->hlen + p->dlen;
    size_t quote = ilen < ICMP_QUOTE_MAX ? ilen : ICMP_QUOTE_MAX, n, hq;
    uint8_t *qbuf, *h, *ip, *ic;
    uint32_t i;

    if (!icmp_wanted(p->hdr, p->hlen))
        return;
    if (!icmp_allowed(br)) {
        br->tc.icmp_ratelimited++;
        return;
    }
    qbuf = txq_alloc(q, quote);
    if (!qbuf)
        return;
    hq = p->hlen < quote ? p->hlen : quote;
    memcpy(qbuf, p->hdr, hq);
    if (quote > hq)
        memcpy(qbuf + hq, p->data, quote - hq);

    i = txq_reserve(q);
    h = q->hdr[i];
    memset(h, 0, VNET_LEN);
    /* Back the way the packet came: the MACs swapped, as the next router
     * (whose MAC the frame was sent to) would have answered. */
    n = VNET_LEN + eth_write(h + VNET_LEN, f->mac + 6, f->mac, f, ETYPE_IPV4);
    ip = h + n;
    ic = ip + 20;
    ip[0] = 0x45;
    ip[1] = 0xc0;                     /* precedence: internetwork control */
    wr16(ip + 2, (uint16_t)(28 + quote));
    wr16(ip + 4, br->gtx.ip_id++);
    wr16(ip + 6, 0);
    ip[8] = 64;
    ip[9] = IPPROTO_ICMP_;
    wr32(ip + 12, br->cfg.local);
    memcpy(ip + 16, p->hdr + 12, 4);  /* to the inner source */
    ip4_set_csum(ip);
    ic[0] = 3;                        /* destination unreachable */
    ic[1] = 4;                        /* fragmentation needed and DF set */
    wr16(ic + 2, 0);
    wr16(ic + 4, 0);
    wr16(ic + 6, (uint16_t)(br->cfg.mtu - br->overhead));   /* RFC 1191 */
    wr16(ic + 2, csum_finish(csum_add(csum_add(0, ic, 8), qbuf, quote)));
    q->iov[i][0].iov_base = h;
    q->iov[i][0].iov_len = n + 28;
    q->iov[i][1].iov_base = qbuf;
    q->iov[i][1].iov_len = quote;
    txq_commit(q, i, 2);
    br->tc.icmp_sent++;
}
