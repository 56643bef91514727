/* from_out.c — the out-port receive path in tunnel mode: from_out_frame()
 * on a sequence of frames, with the loop's clock steps (reasm_expire,
 * ka_tick), live reconfiguration and what --in's frames teach (router MAC,
 * keepalive next hop) in between.  Invariants: fuzz/README.md. */
#include "fuzz.h"

#include <stdio.h>
#include <stdlib.h>

#define MAX_OPS 48
#define MAX_FRAME 9100

struct h {
    struct tpb_bridge *br;
    struct tpb_tunnel_config t;
    uint64_t now;
    uint32_t seq_next;      /* the next GRE sequence number sent with gtx */
    struct {                /* the inner IP IDs of the last keepalives sent */
        uint32_t addr;
        uint16_t id[16];
        uint32_t n;
    } ka[FZ_NREMOTES];
};

static void ka_id_record(struct h *h, uint32_t addr, uint16_t id)
{
    size_t i;

    for (i = 0; i < FZ_NREMOTES && h->ka[i].addr && h->ka[i].addr != addr; i++)
        ;
    if (i == FZ_NREMOTES)
        return;
    h->ka[i].addr = addr;
    h->ka[i].id[h->ka[i].n++ % 16] = id;
}

static int ka_id_sent(const struct h *h, uint32_t addr, uint16_t id)
{
    size_t i, k;

    for (i = 0; i < FZ_NREMOTES && h->ka[i].addr; i++)
        if (h->ka[i].addr == addr)
            for (k = 0; k < 16 && k < h->ka[i].n; k++)
                if (h->ka[i].id[k] == id)
                    return 1;
    return 0;
}

static void config(struct tpb_tunnel_config *t, uint8_t b0, uint8_t b1,
                   uint32_t key)
{
    uint32_t i;

    t->nremotes = 1 + b1 % 3;
    for (i = 0; i < t->nremotes; i++)
        t->remote[i] = fz_remotes[(i + (b1 >> 6)) % FZ_NREMOTES];
    t->key = key;
    t->has_key = b0 & 1;
    t->csum = (b0 >> 1) & 1;
    t->seq = (b0 >> 2) & 1;
    t->keepalive_ms = (b0 & 8) ? 1000 : 0;
    t->keepalive_retries = 3;
    t->on_down = (b0 >> 7) & 1;
    t->ttl = (b1 & 4) ? -1 : 64;
    t->tos = (b1 & 8) ? -1 : 0;
    t->df = (uint8_t)((b1 >> 4) % 3);
    t->encap = (b0 & 0x40) ? TPB_ENCAP_UDP : TPB_ENCAP_GRE;
}

/* the router an operator names (router_mac): not the one frames teach */
static const uint8_t pinned_mac[6] = {2, 0, 0, 0, 0, 0x4e};

/* A pinned router stays whatever frames come (learn_router()). */
static void check_pin(const struct h *h)
{
    if (h->t.router_mac_set)
        FZ_CHECK(h->br->have_router_mac && !memcmp(h->br->router_mac, pinned_mac, 6),
                 "the pinned router MAC moved");
}

static void learn(struct h *h, uint8_t fl, const uint8_t *macs, const uint8_t *tag)
{
    uint8_t buf[14];
    struct frame f;

    memset(&f, 0, sizeof(f));
    memcpy(buf, macs, 12);
    fz_wr16(buf + 12, ETYPE_IPV4);
    f.mac = buf;
    f.len = sizeof(buf);
    f.tagged = (fl >> 2) & 1;
    memcpy(f.tag, tag, 4);
    if (fl & 1)
        learn_router(h->br, &f);
    if (fl & 2)
        ka_learn_hop(h->br, &f);
    check_pin(h);
}

/* ---- checks ---- */

static struct remote *remote_of(struct tpb_bridge *br, uint32_t addr)
{
    uint32_t i;

    for (i = 0; i < br->nremotes; i++)
        if (br->remote[i].addr == addr)
            return &br->remote[i];
    return NULL;
}

static void check_arp(const struct fz_frame *z, const struct fz_out *o)
{
    const uint8_t *req = z->orig + FZ_ETH, *a;
    size_t l2 = fz_l2(z), i;

    FZ_CHECK(o->len == 60, "ARP reply: %zu bytes, not 60", o->len);
    fz_check_eth(o, z, req + 8, fz_out_mac, ETYPE_ARP, "ARP reply");
    FZ_CHECK(fz_vnet_zero(&o->vh), "ARP reply: vnet header");
    a = o->data + l2;
    FZ_CHECK(fz_rd16(a) == 1 && fz_rd16(a + 2) == ETYPE_IPV4 && a[4] == 6 &&
             a[5] == 4 && fz_rd16(a + 6) == 2, "ARP reply: header");
    FZ_CHECK(!memcmp(a + 8, fz_out_mac, 6) && fz_rd32(a + 14) == FZ_LOCAL,
             "ARP reply: sender");
    FZ_CHECK(!memcmp(a + 18, req + 8, 10), "ARP reply: target");
    for (i = l2 + 28; i < o->len; i++)
        FZ_CHECK(o->data[i] == 0, "ARP reply: padding");
}

static void check_echo(const struct fz_frame *z, const struct fz_out *o)
{
    const uint8_t *ip = z->orig + FZ_ETH, *r, *ic;
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, tot = fz_rd16(ip + 2), l2 = fz_l2(z);

    fz_check_eth(o, z, z->orig + 6, z->orig, ETYPE_IPV4, "echo reply");
    FZ_CHECK(fz_vnet_zero(&o->vh), "echo reply: vnet header");
    FZ_CHECK(o->len == l2 + 20 + tot - ihl, "echo reply: %zu bytes", o->len);
    r = o->data + l2;
    FZ_CHECK(r[0] == 0x45 && r[1] == ip[1] && fz_rd16(r + 2) == o->len - l2 &&
             fz_rd16(r + 6) == 0 && r[8] == 64 && r[9] == IPPROTO_ICMP_ &&
             !memcmp(r + 12, ip + 16, 4) && !memcmp(r + 16, ip + 12, 4),
             "echo reply: IPv4 header");
    FZ_CHECK(fz_ip4_csum_ok(r), "echo reply: IPv4 header checksum");
    ic = r + 20;
    FZ_CHECK(ic[0] == 0 && ic[1] == 0, "echo reply: ICMP type");
    FZ_CHECK(!memcmp(ic + 4, ip + ihl + 4, tot - ihl - 4), "echo reply: data");
    /* RFC 792: only a request whose checksum verifies is answered */
    FZ_CHECK(fz_fold(fz_sum(0, ip + ihl, tot - ihl)) == 0, "echo reply to a bad checksum");
    FZ_CHECK(fz_fold(fz_sum(0, ic, tot - ihl)) == 0, "echo reply: ICMP checksum");
}

/* RFC 768 and RFC 8086 on the UDP header of a whole GRE-in-UDP datagram
 * at ip (a valid IPv4 header): 0 if TPB must take it, else the drop it
 * must count (the header within the datagram, one port 4754, a checksum
 * that verifies unless it is 0). */
static int udp_verdict(const uint8_t *ip)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, tot = fz_rd16(ip + 2), ulen;
    const uint8_t *u = ip + ihl;

    if (tot - ihl < 8)
        return TPB_DROP_UDP_BAD;
    ulen = fz_rd16(u + 4);
    if (ulen < 8 || ulen > tot - ihl)
        return TPB_DROP_UDP_BAD;
    if (fz_rd16(u) != FZ_GRE_UDP_PORT && fz_rd16(u + 2) != FZ_GRE_UDP_PORT)
        return TPB_DROP_LOCAL_OTHER;
    return fz_l4_csum_ok(ip, ihl, ihl + ulen, IPPROTO_UDP_) ? 0 : TPB_DROP_UDP_CSUM;
}

/* The inner packet of a GRE or GRE-in-UDP frame to us as it came in (not
 * a fragment): behind the GRE header, to the end of the IPv4 datagram or
 * of the UDP datagram. */
static const uint8_t *gre_payload(const struct fz_frame *z, size_t *avail)
{
    const uint8_t *ip = z->orig + FZ_ETH, *g;
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, tot = fz_rd16(ip + 2), gh, glen;

    if (ip[9] == IPPROTO_UDP_) {
        FZ_CHECK(udp_verdict(ip) == 0, "GRE-in-UDP taken with a bad UDP header");
        g = ip + ihl + 8;
        glen = fz_rd16(ip + ihl + 4) - 8;
    } else {
        g = ip + ihl;
        glen = tot - ihl;
    }
    FZ_CHECK(glen >= 4, "decap: no GRE header, yet accepted");
    gh = fz_gre_hlen(fz_rd16(g));
    FZ_CHECK(glen >= gh, "decap: GRE header past the packet, yet accepted");
    *avail = glen - gh;
    return g + gh;
}

static void check_decap(struct h *h, const struct fz_frame *z, const struct fz_out *o,
                        const uint8_t *piece, size_t piece_avail);

/* Whether an inner packet out of --in is the one in a piece's GRE payload
 * (outer TOS otos): equal but for what decapsulation may change — ECN as
 * RFC 6040 says from otos, the IPv4 header checksum only with it, a SYN's
 * TCP options and checksum.  Pieces may differ in no more than that (ECN
 * and a checksum that no longer holds), and the first such piece may be
 * the one dropped.  Only to find the piece; check_decap() then checks the
 * one found, field by field. */
static int from_piece(const uint8_t *in, size_t ilen, const uint8_t *src, size_t avail,
                      uint8_t otos)
{
    size_t i, l4;
    uint8_t l4p, ecn_mask;
    int v4 = in[0] >> 4 == 4, e;

    if (ilen > avail || ilen < 2)
        return 0;
    /* ECN: IPv4's TOS bits 0-1; IPv6's traffic class straddles bytes 0-1 */
    ecn_mask = v4 ? 0x03 : 0x30;
    e = fz_ecn_decap(otos, v4 ? src[1] : (uint8_t)((src[0] & 0x0f) << 4 | src[1] >> 4));
    if (e < 0 || (in[1] & ecn_mask) != (v4 ? e : e << 4) ||
        (in[1] & ~ecn_mask) != (src[1] & ~ecn_mask))
        return 0;
    l4 = fz_l4_off(src, ilen, &l4p);
    for (i = 0; i < ilen; i++) {
        if (i == 1 || (v4 && (i == 10 || i == 11) && in[1] != src[1]))
            continue;
        if (l4 && l4p == IPPROTO_TCP_ && (src[l4 + 13] & 2) && i >= l4 + 16 &&
            i < l4 + (size_t)(src[l4 + 12] >> 4) * 4)
            continue;
        if (in[i] != src[i])
            return 0;
    }
    return 1;
}

/* A GRE-in-UDP UDP GSO super-packet taken apart (decap.c: udp_gso_split):
 * taken only as the vnet header and the UDP header describe one (pointing
 * at this UDP header, the UDP length the whole payload's, a port 4754, from
 * a remote, not a fragment); then each gso_size piece of its payload went
 * on as a datagram of its own: every frame out of --in is the inner
 * packet of a later piece than the one before, and every piece is
 * accounted for once (delivered, dropped or a keepalive answered). */
static void check_udp_gso(struct h *h, const struct fz_frame *z, size_t n_in,
                          size_t n_out, uint64_t drops, uint64_t ka_rx, uint64_t ka_refl)
{
    const uint8_t *ip = z->orig + FZ_ETH, *u, *g;
    const struct virtio_net_hdr *v = &z->vh0;
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, tot = fz_rd16(ip + 2), seg = v->gso_size;
    size_t l2 = fz_l2(z), npieces, off, k = 0, j, n, gh;

    FZ_CHECK(ip[9] == IPPROTO_UDP_ && (v->gso_type & 0x7f) == VIRTIO_NET_HDR_GSO_UDP_L4 &&
             (v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && seg &&
             v->csum_start == FZ_ETH + ihl && v->csum_offset == 6 &&
             !(fz_rd16(ip + 6) & (IP_MF | IP_OFFMASK)) && tot > ihl + 8 &&
             remote_of(h->br, fz_rd32(ip + 12)),
             "UDP GSO: taken apart, yet not one");
    u = ip + ihl;
    FZ_CHECK(fz_rd16(u + 4) == tot - ihl &&
             (fz_rd16(u) == FZ_GRE_UDP_PORT || fz_rd16(u + 2) == FZ_GRE_UDP_PORT),
             "UDP GSO: taken apart with a wrong UDP header");
    npieces = (tot - ihl - 8 + seg - 1) / seg;
    FZ_CHECK(n_out == ka_refl && n_in + drops + ka_rx + ka_refl == npieces,
             "UDP GSO: %zu pieces, %zu out of --in, %zu of --out, %llu drops, %llu "
             "keepalives answered, %llu reflected", npieces, n_in, n_out,
             (unsigned long long)drops, (unsigned long long)ka_rx, (unsigned long long)ka_refl);
    off = ihl + 8;
    for (j = 0; j < fz_nouts; j++) {
        const struct fz_out *o = &fz_outs[j];
        int found = 0;

        if (o->port != TPB_PORT_IN)
            continue;               /* a reflected keepalive: counted above */
        for (; k < npieces && !found; k++) {
            g = ip + off + k * seg;
            n = tot - off - k * seg < seg ? tot - off - k * seg : seg;
            if (n < 4 || (gh = fz_gre_hlen(fz_rd16(g))) > n)
                continue;
            if (o->len > l2 &&
                from_piece(o->data + l2, o->len - l2, g + gh, n - gh, ip[1])) {
                check_decap(h, z, o, g + gh, n - gh);
                found = 1;
            }
        }
        FZ_CHECK(found, "UDP GSO: frame %zu out of --in is no later piece's inner packet", j);
    }
}

/* The pieces of a UDP GSO super-packet merged into one inner TCP
 * super-packet (coalesce.c): only pieces GRO would merge — inner IPv4
 * without options, TCP, right checksums, the IDs counting up by one, the
 * sequence numbers following on, all payloads the first's length but the
 * last (not longer) — and the merge is the first piece's headers with the
 * payloads of all behind them, the flags of all, a vnet header that lets
 * the kernel cut it back into the same segments. */
static void check_coalesced(const struct fz_frame *z, size_t n_in, size_t n_out,
                            uint64_t drops, int reason)
{
    const uint8_t *ip = z->orig + FZ_ETH, *g, *p0 = NULL, *in;
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, tot = fz_rd16(ip + 2), seg = z->vh0.gso_size;
    size_t off, n, gh, ilen, thl, plen, plen0 = 0, total = 0, k = 0, l2 = fz_l2(z);
    const struct fz_out *o;
    uint32_t seq = 0;
    uint8_t flags = 0;

    if (n_in == 0 && drops == 1 && reason == TPB_DROP_ECN)
        return;                                 /* CE on a Not-ECT inner packet */
    FZ_CHECK(n_in == 1 && n_out == 0 && drops == 0 && fz_outs[0].port == TPB_PORT_IN,
             "coalesced: %zu frames in, %zu out, %llu drops", n_in, n_out,
             (unsigned long long)drops);
    o = &fz_outs[0];
    in = o->data + l2;
    for (off = ihl + 8; off < tot; off += n, k++) {
        n = tot - off < seg ? tot - off : seg;
        g = ip + off;
        gh = fz_gre_hlen(fz_rd16(g));
        FZ_CHECK(n > gh + 40, "coalesced: piece %zu too short", k);
        g += gh;
        ilen = n - gh;
        thl = (size_t)(g[32] >> 4) * 4;
        FZ_CHECK(g[0] == 0x45 && g[9] == IPPROTO_TCP_ && fz_rd16(g + 2) == ilen &&
                 !(fz_rd16(g + 6) & (IP_MF | IP_OFFMASK)) && thl >= 20 && 20 + thl < ilen &&
                 fz_l4_csum_ok(g, 20, ilen, IPPROTO_TCP_),
                 "coalesced: piece %zu is no whole IPv4 TCP segment with a right checksum", k);
        plen = ilen - 20 - thl;
        if (!k) {
            p0 = g;
            plen0 = plen;
            seq = fz_rd32(g + 24);
        }
        /* flags: no SYN, RST, URG; CWR only first, PSH and FIN only last */
        FZ_CHECK(!(g[33] & 0x26) && (!k || !(g[33] & 0x80)) &&
                 (off + n >= tot || !(g[33] & 0x09)),
                 "coalesced: piece %zu's flags %02x", k, g[33]);
        FZ_CHECK(fz_rd16(g + 4) == (uint16_t)(fz_rd16(p0 + 4) + k) && fz_rd32(g + 24) == seq &&
                 (plen == plen0 || (off + n >= tot && plen <= plen0)) &&
                 !memcmp(g + 12, p0 + 12, 8) && !memcmp(g + 20, p0 + 20, 4),
                 "coalesced: piece %zu does not follow on", k);
        FZ_CHECK(l2 + 20 + thl + total + plen <= o->len &&
                 !memcmp(in + 20 + thl + total, g + 20 + thl, plen),
                 "coalesced: piece %zu's payload not in place", k);
        seq += (uint32_t)plen;
        total += plen;
        flags |= g[33];
    }
    FZ_CHECK(k >= 2 && p0, "coalesced: %zu pieces", k);
    thl = (size_t)(p0[32] >> 4) * 4;
    FZ_CHECK(o->len == l2 + 20 + thl + total, "coalesced: %zu bytes, not %zu", o->len,
             l2 + 20 + thl + total);
    FZ_CHECK(fz_rd16(in + 2) == 20 + thl + total && !memcmp(in + 4, p0 + 4, 6) &&
             !memcmp(in + 12, p0 + 12, 8) && (in[1] & ~3) == (p0[1] & ~3) &&
             !memcmp(in + 20, p0 + 20, 13) && in[33] == flags &&
             !memcmp(in + 34, p0 + 34, 2) && !memcmp(in + 38, p0 + 38, thl - 18),
             "coalesced: headers are not the first piece's");
    FZ_CHECK(o->qdisc && (o->vh.gso_type & 0x7f) == VIRTIO_NET_HDR_GSO_TCPV4 &&
             o->vh.gso_size == plen0 && (o->vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
             o->vh.csum_start == l2 + 20 && o->vh.csum_offset == 16,
             "coalesced: vnet header");
}

static void check_reflect(struct h *h, const struct fz_frame *z,
                          const struct fz_out *o, const struct fz_snap *b)
{
    const uint8_t *ip = z->orig + FZ_ETH, *in, *src;
    size_t l2 = fz_l2(z), ilen = o->len - l2, avail;
    struct remote *r = remote_of(h->br, fz_rd32(ip + 12));

    (void)b;
    fz_check_eth(o, z, z->orig + 6, z->orig, ETYPE_IPV4, "reflection");
    FZ_CHECK(fz_vnet_zero(&o->vh), "reflection: vnet header");
    in = o->data + l2;
    FZ_CHECK(fz_ip_len(in, ilen) == ilen && in[0] >> 4 == 4,
             "reflection: not a whole valid IPv4 packet");
    FZ_CHECK((in[9] == IPPROTO_GRE_ ||
              (in[9] == IPPROTO_UDP_ && ilen >= (size_t)(in[0] & 0x0f) * 4 + 8 &&
               fz_rd16(in + (in[0] & 0x0f) * 4 + 2) == FZ_GRE_UDP_PORT)) &&
             fz_rd32(in + 12) == FZ_LOCAL && r &&
             fz_rd32(in + 16) == r->addr && !(fz_rd16(in + 6) & (IP_MF | IP_OFFMASK)),
             "reflection: not a keepalive (GRE, or GRE-in-UDP to 4754) from us to the "
             "remote it came from");
    if (!(fz_rd16(ip + 6) & (IP_MF | IP_OFFMASK)) &&
        z->vh0.gso_type == VIRTIO_NET_HDR_GSO_NONE &&
        !(z->vh0.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) {
        src = gre_payload(z, &avail);
        FZ_CHECK(ilen <= avail && !memcmp(in, src, ilen), "reflection: packet changed");
    }
}

/* One inner packet out of --in: from the frame's GRE payload, or (piece:
 * a UDP GSO super-packet taken apart) from the piece's, avail bytes. */
static void check_decap(struct h *h, const struct fz_frame *z, const struct fz_out *o,
                        const uint8_t *piece, size_t piece_avail)
{
    const uint8_t *ip = z->orig + FZ_ETH, *in, *src, *dst;
    const struct virtio_net_hdr *v = &z->vh0;
    size_t l2 = fz_l2(z), ilen = o->len - l2, avail, i, l4 = 0, doff = 0;
    int gso = !piece && v->gso_type != VIRTIO_NET_HDR_GSO_NONE, v4;
    int frag = (fz_rd16(ip + 6) & (IP_MF | IP_OFFMASK)) != 0;
    uint8_t l4p = 0, *cp;
    uint16_t type;

    FZ_CHECK(o->len >= l2, "decap: runt");
    type = fz_rd16(o->data + l2 - 2);
    FZ_CHECK(type == ETYPE_IPV4 || type == ETYPE_IPV6, "decap: EtherType %04x", type);
    if (!memcmp(z->orig, fz_out_mac, 6)) {
        FZ_CHECK(h->br->have_router_mac, "decap: readdressed with no router MAC");
        dst = h->br->router_mac;
    } else {
        dst = z->orig;
    }
    fz_check_eth(o, z, dst, z->orig + 6, type, "decap");
    in = o->data + l2;
    v4 = type == ETYPE_IPV4;
    FZ_CHECK(ilen >= 1 && in[0] >> 4 == (v4 ? 4 : 6), "decap: version and EtherType differ");
    FZ_CHECK(fz_ip_len(in, ilen) == ilen,
             "decap: inner header invalid or its length is not the frame's (%zu)", ilen);
    if (gso) {
        const struct virtio_net_hdr *w = &o->vh;
        size_t l3 = v4 ? (size_t)(in[0] & 0x0f) * 4 : 40;

        FZ_CHECK(o->qdisc, "decap: a super-packet past the qdisc");
        FZ_CHECK(w->gso_type == v->gso_type && w->gso_size == v->gso_size &&
                 w->flags == v->flags && w->csum_offset == v->csum_offset,
                 "decap: super-packet's vnet header changed");
        FZ_CHECK(w->csum_start >= l2 + l3 &&
                 (size_t)w->csum_start + w->csum_offset + 2 <= o->len &&
                 w->hdr_len <= o->len,
                 "decap: super-packet's offsets outside the inner packet "
                 "(start %u offset %u hdr_len %u, %zu bytes)",
                 w->csum_start, w->csum_offset, w->hdr_len, o->len);
    } else {
        FZ_CHECK(fz_vnet_zero(&o->vh) && !o->qdisc, "decap: vnet header on a plain packet");
    }
    if (frag)
        return;                 /* reassembled: fuzz/reasm.c checks the bytes */
    if (piece) {
        src = piece;
        avail = piece_avail;
    } else {
        src = gre_payload(z, &avail);
    }
    FZ_CHECK(ilen <= avail, "decap: %zu bytes out of a %zu-byte payload", ilen, avail);
    /* ECN (RFC 6040) */
    {
        uint8_t st = v4 ? src[1] : (uint8_t)((src[0] & 0x0f) << 4 | src[1] >> 4);
        uint8_t ot = v4 ? in[1] : (uint8_t)((in[0] & 0x0f) << 4 | in[1] >> 4);
        int e = fz_ecn_decap(ip[1], st);

        FZ_CHECK(e >= 0, "decap: CE on a Not-ECT packet delivered");
        FZ_CHECK((ot & 3) == e && (ot & ~3) == (st & ~3), "decap: ECN %d, not %d", ot & 3, e);
    }
    /* Byte for byte, but ECN, the IPv4 header checksum, a SYN's options
     * (MSS clamp) and its checksum, and what finish_csum() wrote. */
    cp = malloc(ilen ? ilen : 1);
    if (!cp)
        abort();
    memcpy(cp, src, ilen);
    if (v4) {
        cp[1] = in[1];
        cp[10] = in[10];
        cp[11] = in[11];
    } else {
        cp[1] = in[1];
    }
    l4 = fz_l4_off(cp, ilen, &l4p);
    if (l4 && l4p == IPPROTO_TCP_ && (cp[l4 + 13] & 2)) {
        doff = (size_t)(cp[l4 + 12] >> 4) * 4;
        for (i = l4 + 20; i < l4 + doff && i < ilen; i++)
            cp[i] = in[i];
        cp[l4 + 16] = in[l4 + 16];
        cp[l4 + 17] = in[l4 + 17];
    }
    if (!gso && (v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) {
        size_t at = (size_t)v->csum_start + v->csum_offset, base = (size_t)(src - z->orig);

        for (i = at; i < at + 2; i++)
            if (i >= base && i < base + ilen)
                cp[i - base] = in[i - base];
    }
    FZ_CHECK(!memcmp(cp, in, ilen), "decap: inner packet changed");
    /* a valid L4 checksum stays valid (the MSS clamp updates it) */
    if (!gso && l4 && !(v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
        fz_l4_csum_ok(src, l4, ilen, l4p))
        FZ_CHECK(fz_l4_csum_ok(in, l4, ilen, l4p), "decap: L4 checksum broken");
    free(cp);
}

/* The UDP header of GRE-in-UDP at ip + l4, the datagram tot bytes: to
 * 4754, from the dynamic range (RFC 8086 3.2.1: the flow's entropy) or,
 * fixed, from 4754; its length the datagram's; a checksum that verifies
 * and is not 0 (TPB always sends one). */
static void check_udp(const uint8_t *ip, size_t l4, size_t tot, int fixed, const char *what)
{
    const uint8_t *u = ip + l4;

    FZ_CHECK(tot >= l4 + 8, "%s: truncated", what);
    FZ_CHECK(fz_rd16(u + 2) == FZ_GRE_UDP_PORT, "%s: destination port %u", what, fz_rd16(u + 2));
    FZ_CHECK(fixed ? fz_rd16(u) == FZ_GRE_UDP_PORT : fz_rd16(u) >= 49152,
             "%s: source port %u", what, fz_rd16(u));
    FZ_CHECK(fz_rd16(u + 4) == tot - l4, "%s: length %u of %zu", what, fz_rd16(u + 4), tot - l4);
    FZ_CHECK(fz_rd16(u + 6) != 0 && fz_l4_csum_ok(ip, l4, tot, IPPROTO_UDP_),
             "%s: checksum", what);
}

static void check_keepalive(struct h *h, const struct fz_out *o, const uint8_t **sent,
                            uint32_t *nsent)
{
    struct tpb_bridge *br = h->br;
    const struct tpb_tunnel_config *t = &br->cfg;
    size_t l2 = FZ_ETH + (br->hop_tagged ? 4 : 0), glen;
    const uint8_t *ip, *g, *in, *ig;
    uint16_t flags = (uint16_t)((t->csum ? GRE_C : 0) | (t->has_key ? GRE_K : 0) |
                                (t->seq ? GRE_S : 0));
    int udp = t->encap == TPB_ENCAP_UDP;
    size_t ulen = udp ? 8 : 0;
    uint32_t i;

    FZ_CHECK(o->port == TPB_PORT_OUT && o->len >= l2 + 20, "keepalive: where/size");
    FZ_CHECK(!memcmp(o->data, br->hop, 12), "keepalive: Ethernet header not the hop's");
    if (br->hop_tagged)
        FZ_CHECK(!memcmp(o->data + 12, br->hop_tag, 4), "keepalive: VLAN tag");
    FZ_CHECK(fz_rd16(o->data + l2 - 2) == ETYPE_IPV4, "keepalive: EtherType");
    FZ_CHECK(fz_vnet_zero(&o->vh), "keepalive: vnet header");
    ip = o->data + l2;
    FZ_CHECK(fz_ip_len(ip, o->len - l2) == o->len - l2 && ip[0] == 0x45,
             "keepalive: outer IPv4 header");
    FZ_CHECK(ip[9] == (udp ? IPPROTO_UDP_ : IPPROTO_GRE_) && fz_rd32(ip + 12) == FZ_LOCAL,
             "keepalive: outer protocol or addresses");
    for (i = 0; i < *nsent; i++)
        FZ_CHECK(fz_rd32(sent[i] + 16) != fz_rd32(ip + 16), "keepalive: two to one remote");
    FZ_CHECK(remote_of(br, fz_rd32(ip + 16)), "keepalive: to no remote");
    FZ_CHECK(!(fz_rd16(ip + 6) & (IP_MF | IP_OFFMASK)), "keepalive: a fragment");
    FZ_CHECK(ip[8] == (t->ttl >= 0 ? t->ttl : 255), "keepalive: TTL %u", ip[8]);
    if (udp)
        check_udp(ip, 20, o->len - l2, 0, "keepalive: outer UDP");
    g = ip + 20 + ulen;
    glen = fz_gre_hlen(flags);
    FZ_CHECK(o->len - l2 >= 20 + ulen + glen && fz_rd16(g) == flags &&
             fz_rd16(g + 2) == ETYPE_IPV4, "keepalive: GRE header");
    fz_check_gre_fields(t, g, o->len - l2 - 20 - ulen, &h->seq_next, "keepalive");
    in = g + glen;
    FZ_CHECK(fz_ip_len(in, o->len - l2 - 20 - ulen - glen) == o->len - l2 - 20 - ulen - glen,
             "keepalive: inner IPv4 header");
    FZ_CHECK(in[0] == 0x45 && in[8] == 255 && in[9] == (udp ? IPPROTO_UDP_ : IPPROTO_GRE_) &&
             fz_rd32(in + 12) == fz_rd32(ip + 16) && fz_rd32(in + 16) == FZ_LOCAL,
             "keepalive: inner header");
    /* GRE-in-UDP: the inner GRE header in UDP from and to 4754, so the
     * far end reflects it as GRE-in-UDP */
    if (udp)
        check_udp(in, 20, fz_rd16(in + 2), 1, "keepalive: inner UDP");
    ig = in + 20 + ulen;
    flags &= (uint16_t)~GRE_S;
    FZ_CHECK(fz_rd16(in + 2) == 20 + ulen + fz_gre_hlen(flags) && fz_rd16(ig) == flags &&
             fz_rd16(ig + 2) == 0, "keepalive: inner GRE header");
    if (t->csum)
        FZ_CHECK(fz_fold(fz_sum(0, ig, fz_gre_hlen(flags))) == 0, "keepalive: inner GRE checksum");
    if (t->has_key)
        FZ_CHECK(fz_rd32(ig + (t->csum ? 8 : 4)) == t->key, "keepalive: inner key");
    sent[(*nsent)++] = ip;
    ka_id_record(h, fz_rd32(ip + 16), fz_rd16(in + 4));
}

/* ka_rx, ka_refl: how far the remotes' keepalives_received and
 * keepalives_reflected moved. */
static void check_frame(struct h *h, const struct fz_frame *z, const struct fz_snap *b,
                        const struct fz_snap *a, uint64_t ka_rx, uint64_t ka_refl)
{
    const uint8_t *fr = z->orig, *ar = fr + FZ_ETH;
    size_t len = z->f.len, n_in = 0, n_out = 0, i;
    uint16_t type = fz_rd16(fr + 12);
    int reason, arp_us, local, udp, v;
    uint64_t drops = fz_drops(b, a, &reason);

    for (i = 0; i < fz_nouts; i++)
        if (fz_outs[i].port == TPB_PORT_IN)
            n_in++;
        else
            n_out++;
    arp_us = type == ETYPE_ARP && len >= FZ_ETH + 28 && fz_rd16(ar) == 1 &&
             fz_rd16(ar + 2) == ETYPE_IPV4 && ar[4] == 6 && ar[5] == 4 &&
             fz_rd16(ar + 6) == 1 && fz_rd32(ar + 24) == FZ_LOCAL;
    local = !arp_us && type == ETYPE_IPV4 && len >= FZ_ETH + 20 &&
            fz_rd32(fr + FZ_ETH + 16) == FZ_LOCAL;
    if (arp_us) {
        FZ_CHECK(n_out == 1 && n_in == 0 && drops == 0 &&
                 a->tc.arp_replies == b->tc.arp_replies + 1,
                 "ARP for us: %zu/%zu frames, %llu drops", n_in, n_out,
                 (unsigned long long)drops);
        check_arp(z, &fz_outs[0]);
        return;
    }
    if (!local) {
        FZ_CHECK(n_out == 0, "bridged toward --in, yet %zu frames out of --out", n_out);
        fz_check_forward(z, fz_outs, n_in,  drops,
                         a->c[TPB_PORT_IN].drop_gso_bad - b->c[TPB_PORT_IN].drop_gso_bad);
        return;
    }
    if (a->tc.udp_gso_coalesced != b->tc.udp_gso_coalesced) {
        check_coalesced(z, n_in, n_out, drops, reason);
        return;
    }
    if (a->tc.udp_gso_received != b->tc.udp_gso_received) {
        check_udp_gso(h, z, n_in, n_out, drops, ka_rx, ka_refl);
        return;
    }
    FZ_CHECK(n_in + n_out <= 1, "to us: %zu frames", n_in + n_out);
    udp = fr[FZ_ETH + 9] == IPPROTO_UDP_;
    FZ_CHECK(udp || (reason != TPB_DROP_UDP_BAD && reason != TPB_DROP_UDP_CSUM),
             "a UDP drop (%s) for protocol %u", tpb_drop_name(reason), fr[FZ_ETH + 9]);
    /* A whole GRE-in-UDP datagram from a remote, its checksum not left to
     * TPB to complete, is taken exactly when its UDP header is right, and
     * otherwise dropped for what is wrong with it. */
    if (udp && ar[0] >> 4 == 4 && fz_ip_len(ar, len - FZ_ETH) &&
        remote_of(h->br, fz_rd32(ar + 12)) &&
        !(fz_rd16(ar + 6) & (IP_MF | IP_OFFMASK)) &&
        z->vh0.gso_type == VIRTIO_NET_HDR_GSO_NONE &&
        !(z->vh0.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && (v = udp_verdict(ar)) != 0)
        FZ_CHECK(n_in + n_out == 0 && drops == 1 && reason == v,
                 "GRE-in-UDP with a bad UDP header: %zu frames, %llu drops (%s), not %s",
                 n_in + n_out, (unsigned long long)drops,
                 reason >= 0 ? tpb_drop_name(reason) : "-", tpb_drop_name(v));
    if (n_in + n_out == 1) {
        FZ_CHECK(drops == 0, "to us: a frame and %llu drops", (unsigned long long)drops);
        if (n_in) {
            FZ_CHECK(a->tc.decap_packets == b->tc.decap_packets + 1, "decap: not counted");
            check_decap(h, z, &fz_outs[0], NULL, 0);
        } else if (fr[FZ_ETH + 9] == IPPROTO_ICMP_) {
            FZ_CHECK(a->tc.echo_replies == b->tc.echo_replies + 1, "echo: not counted");
            check_echo(z, &fz_outs[0]);
        } else {
            FZ_CHECK(ka_refl == 1, "reflection: not counted");
            check_reflect(h, z, &fz_outs[0], b);
        }
        return;
    }
    FZ_CHECK(ka_refl == 0, "reflection counted, nothing sent");
    if (drops == 1)
        return;
    FZ_CHECK(drops == 0, "to us: %llu drops for one frame", (unsigned long long)drops);
    /* consumed, nothing out, nothing dropped: a fragment held, or the
     * answer to a keepalive */
    if ((fr[FZ_ETH + 9] == IPPROTO_GRE_ || udp) &&
        (fz_rd16(fr + FZ_ETH + 6) & (IP_MF | IP_OFFMASK)) &&
        a->tc.reasm_fragments == b->tc.reasm_fragments + 1 &&
        a->tc.reasm_done == b->tc.reasm_done)
        return;
    FZ_CHECK(ka_rx == 1 && (fr[FZ_ETH + 9] == IPPROTO_GRE_ || udp) &&
             remote_of(h->br, fz_rd32(fr + FZ_ETH + 12)),
             "to us: consumed with no frame, no drop, no fragment held, no keepalive answer");
    /* an answer carries back the IP ID of one of our keepalives to it */
    FZ_CHECK(ka_id_sent(h, fz_rd32(fr + FZ_ETH + 12), fz_rd16(fr + FZ_ETH + 4)),
             "keepalive answer with an ID never sent (%04x)", fz_rd16(fr + FZ_ETH + 4));
}

/* ---- driving ---- */

static void frame_op(struct h *h, struct fz_in *in, uint8_t *buf)
{
    struct tpb_bridge *br = h->br;
    uint8_t fl = fz_u8(in), tag[4], *ip;
    int mode = (fl >> 1) & 3, tagged = fl & 1;
    size_t len = fz_u16(in) % MAX_FRAME, i;
    struct virtio_net_hdr vh;
    struct fz_l4 l4;
    struct fz_frame z;
    struct fz_snap b, a;
    uint64_t rx = 0, refl = 0, evicted;
    struct gre_rx grx[TPB_MAX_REMOTES];
    size_t held;
    int delivered;

    fz_wr16(tag, (uint16_t[]){0x8100, 0x88a8, 0x9100, 0x8100}[fz_u8(in) & 3]);
    fz_wr16(tag + 2, fz_u16(in));
    len = fz_bytes(in, buf, len);
    if (len < FZ_ETH)
        return;                 /* collect() drops runts before dispatch */
    ip = buf + FZ_ETH;
    if ((fl & 0x10))
        memcpy(buf, fz_out_mac, 6);
    if ((fl & 0x20) && fz_rd16(buf + 12) == ETYPE_IPV4 && len >= FZ_ETH + 20) {
        fz_wr32(ip + 16, FZ_LOCAL);
        fz_wr32(ip + 12, (fl >> 6) < 3 ? fz_remotes[fl >> 6] : 0xc0000201u);
    }
    memset(&l4, 0, sizeof(l4));
    if (fl & 8) {
        if (mode == FZ_VNET_GSO && len >= FZ_ETH + 20 && ip[0] >> 4 == 4)
            fz_wr16(ip + 6, fz_rd16(ip + 6) & IP_DF);   /* GRO merges no fragment */
        if (fz_rd16(buf + 12) == ETYPE_IPV4 || fz_rd16(buf + 12) == ETYPE_IPV6)
            fz_fix_ip(ip, len - FZ_ETH, mode == FZ_VNET_GSO || mode == FZ_VNET_PARTIAL, &l4);
        if (len >= FZ_ETH + 28 && ip[0] >> 4 == 4 && ip[9] == IPPROTO_ICMP_ &&
            (size_t)(ip[0] & 0x0f) * 4 + 8 <= (size_t)fz_rd16(ip + 2) &&
            fz_rd16(ip + 2) <= len - FZ_ETH) {
            size_t ihl = (size_t)(ip[0] & 0x0f) * 4, tot = fz_rd16(ip + 2);

            ip[ihl + 2] = ip[ihl + 3] = 0;
            fz_wr16(ip + ihl + 2, fz_fold(fz_sum(0, ip + ihl, tot - ihl)));
        }
    } else if (mode == FZ_VNET_GSO || mode == FZ_VNET_PARTIAL) {
        fz_l4_of(buf, len, &l4);
    }
    fz_vnet(&vh, mode, in, &l4, FZ_ETH);
    fz_frame_new(&z, buf, len, &vh, tagged, tag);
    fz_snap(br, &b);
    held = reasm_datagrams(br->reasm);
    for (i = 0; i < br->nremotes; i++)
        grx[i] = br->remote[i].grx;
    for (i = 0; i < br->nremotes; i++) {
        rx -= br->remote[i].st.keepalives_received;
        refl -= br->remote[i].st.keepalives_reflected;
    }
    fz_outs_clear();
    from_out_frame(br, &z.f);
    fz_flush(br);
    fz_snap(br, &a);
    for (i = 0; i < br->nremotes; i++) {
        rx += br->remote[i].st.keepalives_received;
        refl += br->remote[i].st.keepalives_reflected;
    }
    /* A fragment may evict datagrams held before (their drops, not this
     * frame's): at most all of them.  The rest is this frame's outcome. */
    evicted = a.tc.drop[TPB_DROP_REASM_EVICTED] - b.tc.drop[TPB_DROP_REASM_EVICTED];
    FZ_CHECK(evicted <= held, "%llu evicted of %zu datagrams held",
             (unsigned long long)evicted, held);
    a.tc.drop[TPB_DROP_REASM_EVICTED] = b.tc.drop[TPB_DROP_REASM_EVICTED];
    /* The sequence window moves only for a packet delivered (decapsulated
     * out of --in, or a keepalive reflected): anything else leaves every
     * remote's receive state as it was. */
    delivered = a.tc.decap_packets != b.tc.decap_packets || refl;
    for (i = 0; i < br->nremotes; i++)
        FZ_CHECK(delivered || !memcmp(&grx[i], &br->remote[i].grx, sizeof(grx[i])),
                 "remote %zu's receive state changed, nothing delivered", i);
    FZ_CHECK(rx + refl <= 1 || a.tc.udp_gso_received != b.tc.udp_gso_received,
             "keepalive counters moved by %llu", (unsigned long long)(rx + refl));
    {
        int reason;
        uint64_t d = fz_drops(&b, &a, &reason);

        fz_trace("from_out: %u-byte frame: %zu frames out (%s), %llu drops (%s)%s", z.f.len,
                 fz_nouts, fz_nouts ? (fz_outs[0].port == TPB_PORT_IN ? "--in" : "--out") : "-",
                 (unsigned long long)d, reason >= 0 ? tpb_drop_name(reason) : "-",
                 a.tc.reasm_fragments > b.tc.reasm_fragments ? ", a fragment" : "");
    }
    check_frame(h, &z, &b, &a, rx, refl);
    fz_frame_free(&z);
}

static void tick_op(struct h *h, struct fz_in *in)
{
    struct tpb_bridge *br = h->br;
    struct fz_snap b, a;
    const uint8_t *sent[TPB_MAX_REMOTES];
    uint32_t nsent = 0;
    int reason;
    size_t i;
    uint64_t drops;

    h->now += (uint64_t)fz_u16(in) * 1000000ull;
    br->now_ns = h->now;
    fz_snap(br, &b);
    fz_outs_clear();
    reasm_expire(br->reasm, &br->tc, br->now_ns);
    ka_tick(br);
    fz_flush(br);
    fz_snap(br, &a);
    drops = fz_drops(&b, &a, &reason);
    FZ_CHECK(drops == a.tc.drop[TPB_DROP_REASM_TIMEOUT] - b.tc.drop[TPB_DROP_REASM_TIMEOUT],
             "tick: drops other than reassembly timeouts");
    fz_trace("from_out: tick to %llu ms: %zu keepalives, %llu drops",
             (unsigned long long)(h->now / 1000000), fz_nouts, (unsigned long long)drops);
    FZ_CHECK(fz_nouts <= br->nremotes, "tick: %zu frames", fz_nouts);
    for (i = 0; i < fz_nouts; i++)
        check_keepalive(h, &fz_outs[i], sent, &nsent);
}

static void reconfigure_op(struct h *h, struct fz_in *in)
{
    uint8_t b0 = fz_u8(in), b1 = fz_u8(in), kb = fz_u8(in);
    uint32_t key = kb & 1 ? h->t.key : fz_u32(in);

    config(&h->t, b0, b1, key);
    if (kb & 2) {               /* router_mac given, or taken away */
        h->t.router_mac_set ^= 1;
        memcpy(h->t.router_mac, pinned_mac, 6);
    }
    fz_outs_clear();
    tpb_fuzz_bridge_reconfigure(h->br, &h->t);
    fz_flush(h->br);
    FZ_CHECK(fz_nouts == 0, "reconfigure sent something");
    check_pin(h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[MAX_FRAME];
    static const uint32_t mem[8] = {4u << 20, 2048, 4096, 16384, 65536, 0, 1u << 20, 100000};
    static const uint32_t tmo[4] = {30000, 0, 1, 1000};
    struct fz_in in = {data, size};
    struct tpb_bridge_config cfg;
    struct h h;
    uint8_t b0 = fz_u8(&in), b1 = fz_u8(&in), b2, macs[12], tag[4];
    uint32_t key = fz_u32(&in), mtu;
    size_t min;
    int ops = 0;

    memset(&cfg, 0, sizeof(cfg));
    memset(&h, 0, sizeof(h));
    tpb_fuzz_ka_id = 0xfffe;        /* the first keepalives' IDs wrap */
    cfg.ifindex[TPB_PORT_IN] = 1;
    cfg.ifindex[TPB_PORT_OUT] = 2;
    cfg.tunnel = 1;
    cfg.sel_ifindex = 3;
    cfg.mark = 47;
    config(&cfg.tun, b0, b1, key);
    cfg.tun.local = FZ_LOCAL;
    /* 68-9000: one below what the tunnel needs is refused at start, so
     * it comes as the loop would see it, once running (encap_mtu) */
    mtu = 68 + fz_u16(&in) % (9000 - 68 + 1);
    min = encap_min_mtu(20 + (cfg.tun.encap == TPB_ENCAP_UDP ? 8 : 0) +
                        gre_hlen(cfg.tun.csum, cfg.tun.has_key, cfg.tun.seq));
    cfg.tun.mtu = mtu < min ? (uint32_t)min : mtu;
    b2 = fz_u8(&in);
    cfg.tun.reasm_memory = mem[b2 & 7];
    cfg.tun.reasm_timeout_ms = tmo[(b2 >> 3) & 3];
    cfg.tun.icmp_rate = 100;
    cfg.tun.pmtud = 1;
    memcpy(cfg.tun.out_mac, fz_out_mac, 6);
    if (b2 & 0x20) {
        cfg.tun.router_mac_set = 1;
        memcpy(cfg.tun.router_mac, pinned_mac, 6);
    }
    h.now = FZ_T0;
    h.t = cfg.tun;
    h.br = fz_bridge(&cfg, h.now);
    h.br->q[TPB_PORT_OUT].mtu = mtu;    /* as txq_check_mtu() reads it */
    encap_mtu(h.br, mtu);
    check_pin(&h);
    if (b0 & 0x10) {
        memcpy(macs, fz_out_mac, 6);      /* gw1 sends to the next hop */
        memcpy(macs + 6, fz_router_mac, 6);
        learn(&h, 1, macs, tag);
    }
    if (b0 & 0x20) {
        static const uint8_t gw2[6] = {2, 0, 0, 0, 0, 0x45};

        memcpy(macs, gw2, 6);
        memcpy(macs + 6, fz_router_mac, 6);
        fz_wr16(tag, 0x8100);
        fz_wr16(tag + 2, 100);
        learn(&h, (uint8_t)(2 | ((b0 >> 4) & 4)), macs, tag);
    }
    while (in.n && ops++ < MAX_OPS) {
        uint8_t op = fz_u8(&in);

        switch (op % 8) {
        case 5:
            tick_op(&h, &in);
            break;
        case 6:
            reconfigure_op(&h, &in);
            break;
        case 7: {
            uint8_t fl = fz_u8(&in);

            fz_bytes(&in, macs, 12);
            fz_bytes(&in, tag, 4);
            learn(&h, fl, macs, tag);
            break;
        }
        default:
            frame_op(&h, &in, buf);
        }
        FZ_CHECK(h.br->tc.reasm_memory == reasm_memory_held(h.br->reasm) &&
                 h.br->tc.reasm_memory <= h.br->cfg.reasm_memory,
                 "reassembly holds %zu bytes, counts %llu, bound %u",
                 reasm_memory_held(h.br->reasm),
                 (unsigned long long)h.br->tc.reasm_memory, h.br->cfg.reasm_memory);
    }
    fz_outs_clear();
    tpb_bridge_close(h.br);
    return 0;
}
