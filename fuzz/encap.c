/* encap.c — encapsulation: encap_frame() on one selected frame, under
 * tunnel settings taken from the input (MTU 68-9000, fragment mode, pmtud,
 * GRE key/csum/seq, DF policy, TTL/TOS, MSS, no POP up), the frame with a
 * vnet header (none, partial checksum, GSO of each type, or raw bytes).
 * Invariants: fuzz/README.md. */
#include "fuzz.h"

#include <stdio.h>
#include <stdlib.h>

#define MAX_FRAME (65535 + FZ_ETH)

struct pkt {                    /* one GRE packet's inner packet, a copy */
    uint8_t *p;
    size_t len;
};

struct h {
    struct tpb_bridge *br;
    const struct fz_frame *z;
    const uint8_t *post;        /* the frame after encap_frame() */
    size_t ilen;                /* the selected IP packet's length */
    uint16_t type;
    uint32_t seq_next;
    uint16_t sport[2];          /* GRE-in-UDP: the source port of [inner
                                 * IPv4 fragments, other packets]; 0: none */
    struct pkt *pk;
    size_t npk, cap;
};

static void add_pkt(struct h *h, const uint8_t *p, size_t len)
{
    if (h->npk == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 64;
        h->pk = realloc(h->pk, h->cap * sizeof(*h->pk));
        if (!h->pk)
            abort();
    }
    h->pk[h->npk].p = malloc(len ? len : 1);
    if (!h->pk[h->npk].p)
        abort();
    memcpy(h->pk[h->npk].p, p, len);
    h->pk[h->npk++].len = len;
}

/* The outer DF/TTL/TOS a GRE packet must have for its inner packet. */
static void check_outer_fields(struct h *h, const uint8_t *ip, const uint8_t *in,
                               size_t inlen, int fragmented)
{
    const struct tpb_tunnel_config *t = &h->br->cfg;
    int v4 = h->type == ETYPE_IPV4;
    uint8_t itos, ittl;
    int idf;

    FZ_CHECK(inlen >= (v4 ? 20u : 40u), "GRE: inner packet of %zu bytes", inlen);
    itos = v4 ? in[1] : (uint8_t)((in[0] & 0x0f) << 4 | in[1] >> 4);
    ittl = v4 ? in[8] : in[7];
    idf = v4 && (fz_rd16(in + 6) & IP_DF);
    FZ_CHECK(ip[8] == (t->ttl >= 0 ? (uint8_t)t->ttl : ittl), "GRE: outer TTL %u", ip[8]);
    FZ_CHECK(ip[1] == (uint8_t)(((t->tos >= 0 ? (uint8_t)t->tos : itos) & ~3) | (itos & 3)),
             "GRE: outer TOS %02x", ip[1]);
    if (!fragmented)
        FZ_CHECK(!!(fz_rd16(ip + 6) & IP_DF) ==
                     (t->df == TPB_DF_SET ? 1 : t->df == TPB_DF_CLEAR ? 0 : idf),
                 "GRE: outer DF against the policy (%u)", t->df);
}

/* GRE-in-UDP (RFC 8086): the UDP header of a whole datagram at ip (outer
 * fragments put together) whose inner packet is at in.  To port 4754,
 * from the dynamic range (3.2.1), its length, a checksum that verifies
 * and is not 0 (TPB always sends one, 3.1).  The source port is the
 * flow's entropy: one port for all of a frame's packets (segments of one
 * flow), but that inner IPv4 fragments, which carry no ports to hash, may
 * have another (one for all of them). */
static void check_udp(struct h *h, const uint8_t *ip, size_t len, const uint8_t *in,
                      size_t inlen)
{
    const uint8_t *u = ip + 20;
    int frag = h->type == ETYPE_IPV4 && inlen >= 20 &&
               (fz_rd16(in + 6) & (IP_MF | IP_OFFMASK));

    FZ_CHECK(len >= 28, "GRE-in-UDP: packet of %zu bytes", len);
    FZ_CHECK(fz_rd16(u + 2) == FZ_GRE_UDP_PORT, "GRE-in-UDP: destination port %u",
             fz_rd16(u + 2));
    FZ_CHECK(fz_rd16(u) >= 49152, "GRE-in-UDP: source port %u", fz_rd16(u));
    FZ_CHECK(fz_rd16(u + 4) == len - 20, "GRE-in-UDP: UDP length %u of %zu",
             fz_rd16(u + 4), len - 20);
    FZ_CHECK(fz_rd16(u + 6) != 0 && fz_l4_csum_ok(ip, 20, len, IPPROTO_UDP_),
             "GRE-in-UDP: UDP checksum");
    if (!h->sport[frag])
        h->sport[frag] = fz_rd16(u);
    FZ_CHECK(fz_rd16(u) == h->sport[frag], "GRE-in-UDP: source ports %u and %u in one flow",
             fz_rd16(u), h->sport[frag]);
}

/* One whole GRE packet (outer fragments put together): its GRE header
 * (behind the UDP header with GRE-in-UDP). */
static void check_gre(struct h *h, const uint8_t *ip, size_t len, int fragmented)
{
    const struct tpb_tunnel_config *t = &h->br->cfg;
    uint16_t flags = (uint16_t)((t->csum ? GRE_C : 0) | (t->has_key ? GRE_K : 0) |
                                (t->seq ? GRE_S : 0));
    size_t ulen = t->encap == TPB_ENCAP_UDP ? 8 : 0;
    size_t glen = fz_gre_hlen(flags);
    const uint8_t *g = ip + 20 + ulen;

    FZ_CHECK(len >= 20 + ulen + glen, "GRE: packet of %zu bytes", len);
    if (ulen)
        check_udp(h, ip, len, g + glen, len - 20 - ulen - glen);
    FZ_CHECK(fz_rd16(g) == flags, "GRE: flags %04x, not %04x", fz_rd16(g), flags);
    FZ_CHECK(fz_rd16(g + 2) == h->type, "GRE: protocol %04x", fz_rd16(g + 2));
    fz_check_gre_fields(t, g, len - 20 - ulen, &h->seq_next, "GRE");
    check_outer_fields(h, ip, g + glen, len - 20 - ulen - glen, fragmented);
    add_pkt(h, g + glen, len - 20 - ulen - glen);
}

/* A UDP GSO message (udpgso.c) cut as the kernel's __udp_gso_segment and
 * inet_gso_segment cut it: every gso_size bytes of UDP payload a datagram
 * of its own, the IPv4 header copied with its length, the ID one more per
 * datagram and its checksum; the UDP header with its length and its
 * checksum completed.  First what the kernel asks of the message: IPv4
 * without options around UDP, through the qdisc (only there is it cut),
 * a partial checksum at the UDP header holding the pseudo-header sum of
 * the whole, lengths that agree, at most 64 datagrams (UDP_MAX_SEGMENTS). */
static size_t cut_udp_gso(const struct h *h, const struct fz_out *o, struct fz_out *out,
                          size_t room)
{
    const struct virtio_net_hdr *v = &o->vh;
    size_t l2 = fz_l2(h->z), len = o->len, plen, seg, k, n;
    const uint8_t *ip = o->data + l2;
    uint8_t *whole;

    FZ_CHECK(h->br->cfg.encap == TPB_ENCAP_UDP && v->gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 &&
                 v->flags == VIRTIO_NET_HDR_F_NEEDS_CSUM && o->qdisc,
             "GRE-in-UDP: a super-packet of GSO type %u, flags %u", v->gso_type, v->flags);
    FZ_CHECK(len >= l2 + 28 && ip[0] == 0x45 && ip[9] == IPPROTO_UDP_ &&
                 fz_rd16(ip + 2) == len - l2 && fz_rd16(ip + 24) == len - l2 - 20 &&
                 fz_ip4_csum_ok(ip),
             "UDP GSO: IPv4/UDP header or lengths wrong");
    FZ_CHECK(v->csum_start == l2 + 20 && v->csum_offset == 6 && v->hdr_len == l2 + 28,
             "UDP GSO: csum_start %u, csum_offset %u, hdr_len %u", v->csum_start,
             v->csum_offset, v->hdr_len);
    whole = malloc(len - l2);
    if (!whole)
        abort();
    memcpy(whole, ip, len - l2);
    fz_l4_set_csum(whole, 20, len - l2, IPPROTO_UDP_, 1);
    FZ_CHECK(!memcmp(whole + 26, ip + 26, 2), "UDP GSO: not the pseudo-header sum");
    free(whole);
    seg = v->gso_size;
    plen = len - l2 - 28;
    FZ_CHECK(seg > 0 && plen > seg, "UDP GSO: gso_size %zu for %zu bytes", seg, plen);
    n = (plen + seg - 1) / seg;
    FZ_CHECK(n <= 64 && n <= room, "UDP GSO: %zu datagrams", n);
    for (k = 0; k < n; k++) {
        size_t sl = k + 1 < n ? seg : plen - k * seg;
        struct fz_out *d = &out[k];
        uint8_t *dip;

        *d = *o;
        memset(&d->vh, 0, sizeof(d->vh));
        d->len = l2 + 28 + sl;
        d->data = malloc(d->len);
        if (!d->data)
            abort();
        memcpy(d->data, o->data, l2 + 28);
        memcpy(d->data + l2 + 28, o->data + l2 + 28 + k * seg, sl);
        dip = d->data + l2;
        fz_wr16(dip + 2, (uint16_t)(28 + sl));
        fz_wr16(dip + 4, (uint16_t)(fz_rd16(ip + 4) + k));
        fz_ip4_set_csum(dip);
        fz_wr16(dip + 24, (uint16_t)(8 + sl));
        fz_l4_set_csum(dip, 20, 28 + sl, IPPROTO_UDP_, 0);
    }
    return n;
}

/* Every frame out of --out: GRE, outer fragments put back together. */
static void parse_frames(struct h *h, const struct fz_out *outs, size_t n);

static void parse_out(struct h *h, const struct fz_out *outs, size_t n)
{
    struct fz_out *all = NULL;
    uint8_t *cut = NULL;        /* all[k] is a datagram cut here: its own data */
    size_t k, m = 0, cap = 0, c;

    for (k = 0; k < n; k++) {
        if (m + 64 > cap) {
            cap = 2 * cap + 128;
            all = realloc(all, cap * sizeof(*all));
            cut = realloc(cut, cap);
            if (!all || !cut)
                abort();
        }
        if (outs[k].vh.gso_type != VIRTIO_NET_HDR_GSO_NONE) {
            c = cut_udp_gso(h, &outs[k], all + m, cap - m);
            memset(cut + m, 1, c);
            m += c;
            continue;
        }
        all[m] = outs[k];       /* the sink's exact-size copy, as it was */
        cut[m++] = 0;
    }
    parse_frames(h, all, m);
    for (k = 0; k < m; k++)
        if (cut[k])
            free(all[k].data);
    free(all);
    free(cut);
}

static void parse_frames(struct h *h, const struct fz_out *outs, size_t n)
{
    const struct fz_frame *z = h->z;
    size_t k, l2 = fz_l2(z), acc = 0;
    uint8_t *buf = NULL;
    uint16_t id = 0;
    uint32_t mtu = h->br->cfg.mtu;

    for (k = 0; k < n; k++) {
        const struct fz_out *o = &outs[k];
        const uint8_t *ip = o->data + l2;
        size_t len = o->len - l2, off;
        uint16_t frag;

        fz_check_eth(o, z, z->orig, z->orig + 6, ETYPE_IPV4, "GRE");
        FZ_CHECK(fz_vnet_zero(&o->vh) && o->qdisc, "GRE: vnet header, or past the qdisc");
        FZ_CHECK(fz_ip_len(ip, len) == len && ip[0] == 0x45,
                 "GRE: outer IPv4 header invalid or not the frame's length");
        FZ_CHECK(len <= mtu, "GRE: %zu-byte packet over the MTU %u", len, mtu);
        FZ_CHECK(ip[9] == (h->br->cfg.encap == TPB_ENCAP_UDP ? IPPROTO_UDP_ : IPPROTO_GRE_) &&
                 fz_rd32(ip + 12) == FZ_LOCAL &&
                 h->br->active >= 0 &&
                 fz_rd32(ip + 16) == h->br->remote[h->br->active].addr,
                 "GRE: outer protocol or addresses");
        frag = fz_rd16(ip + 6);
        if (!buf && !(frag & (IP_MF | IP_OFFMASK))) {
            check_gre(h, ip, len, 0);
            continue;
        }
        FZ_CHECK(!(frag & IP_DF), "GRE: a fragment with DF");
        off = (size_t)(frag & IP_OFFMASK) * 8;
        if (!buf) {
            FZ_CHECK(off == 0 && (frag & IP_MF), "GRE: fragments start at 0");
            buf = malloc(65536 + 20);
            if (!buf)
                abort();
            memcpy(buf, ip, 20);
            id = fz_rd16(ip + 4);
            acc = 0;
        }
        FZ_CHECK(fz_rd16(ip + 4) == id, "GRE: fragments of two packets interleaved");
        FZ_CHECK(off == acc, "GRE: fragment at %zu, expected %zu", off, acc);
        FZ_CHECK(acc + len - 20 <= 65535 - 20, "GRE: fragments past 64 KiB");
        if (frag & IP_MF)
            FZ_CHECK((len - 20) % 8 == 0, "GRE: a fragment of %zu bytes, not 8k", len - 20);
        memcpy(buf + 20 + acc, ip + 20, len - 20);
        acc += len - 20;
        if (!(frag & IP_MF)) {
            fz_wr16(buf + 2, (uint16_t)(20 + acc));
            fz_wr16(buf + 6, 0);
            check_gre(h, buf, 20 + acc, 1);
            free(buf);
            buf = NULL;
        }
    }
    FZ_CHECK(!buf, "GRE: last outer fragment missing");
}

/* Inner IPv4 fragments pk[*i..] put back together into out (ihl header +
 * payload); returns its length; *first_off the first offset, *mf the
 * last one's MF. */
static size_t join_inner(struct h *h, size_t *i, uint8_t *out, size_t *first_off,
                         int *mf)
{
    static const size_t skip[] = {2, 3, 6, 7, 10, 11};
    const uint8_t *h0 = h->pk[*i].p;
    size_t ihl = (size_t)(h0[0] & 0x0f) * 4, acc = 0, k, j;

    *first_off = (size_t)(fz_rd16(h0 + 6) & IP_OFFMASK) * 8;
    memcpy(out, h0, ihl);
    for (; *i < h->npk; (*i)++) {
        const uint8_t *f = h->pk[*i].p;
        size_t len = h->pk[*i].len;
        uint16_t frag;

        FZ_CHECK(len >= 20 && f[0] >> 4 == 4 && fz_ip_len(f, len) == len,
                 "inner fragment: header invalid or not the GRE payload's length");
        FZ_CHECK((size_t)(f[0] & 0x0f) * 4 == ihl, "inner fragments: header lengths differ");
        for (j = 0; j < ihl; j++) {
            for (k = 0; k < 6 && skip[k] != j; k++)
                ;
            FZ_CHECK(k < 6 || f[j] == h0[j], "inner fragments: headers differ at %zu", j);
        }
        frag = fz_rd16(f + 6);
        FZ_CHECK((size_t)(frag & IP_OFFMASK) * 8 == *first_off + acc,
                 "inner fragment at %u, expected %zu", (frag & IP_OFFMASK) * 8,
                 *first_off + acc);
        FZ_CHECK(ihl + acc + len - ihl <= 65535, "inner fragments past 64 KiB");
        memcpy(out + ihl + acc, f + ihl, len - ihl);
        acc += len - ihl;
        *mf = (frag & IP_MF) != 0;
        if (*i + 1 == h->npk || !(frag & IP_MF) ||
            fz_rd16(h->pk[*i + 1].p + 4) != fz_rd16(h0 + 4))
            break;
        FZ_CHECK((len - ihl) % 8 == 0, "inner fragment of %zu bytes, not 8k", len - ihl);
    }
    (*i)++;
    return ihl + acc;
}

/* Where a SYN's TCP header is that clamp_mss() may edit: in a whole
 * packet, or in a first fragment (offset 0, MF set) that holds the whole
 * header — the checksum, updated by difference, stays right for the
 * datagram the fragments make (RFC 1624).  0: none. */
static size_t syn_tcp_off(const uint8_t *ip, size_t len)
{
    size_t l4;

    if (ip[0] >> 4 == 4) {
        if (ip[9] != IPPROTO_TCP_ || (fz_rd16(ip + 6) & IP_OFFMASK))
            return 0;
        l4 = (size_t)(ip[0] & 0x0f) * 4;
    } else {
        if (ip[6] != IPPROTO_TCP_)
            return 0;
        l4 = 40;
    }
    return l4 + 20 <= len && (ip[l4 + 13] & 2) ? l4 : 0;
}

/* Which bytes the pipeline may change in the selected packet: a SYN's
 * options (MSS clamp) and TCP checksum, the partial checksum's field. */
static void check_changes(struct h *h)
{
    const struct fz_frame *z = h->z;
    const uint8_t *o = z->orig + FZ_ETH, *p = h->post + FZ_ETH;
    size_t i, l4 = h->ilen ? syn_tcp_off(o, h->ilen) : 0, doff = 0, at = SIZE_MAX;

    if (l4)
        doff = (size_t)(o[l4 + 12] >> 4) * 4;
    if (z->vh0.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
        at = (size_t)z->vh0.csum_start + z->vh0.csum_offset - FZ_ETH;
    for (i = 0; i < z->f.len - FZ_ETH; i++) {
        if (o[i] == p[i] || (i >= at && i < at + 2))
            continue;
        FZ_CHECK(doff && ((i >= l4 + 20 && i < l4 + doff) || i == l4 + 16 || i == l4 + 17),
                 "encap: byte %zu of the packet changed", i);
    }
}

/* The MSS option a SYN leaves with. */
static void check_mss(struct h *h)
{
    const struct tpb_bridge *br = h->br;
    const uint8_t *o = h->z->orig + FZ_ETH, *p = h->post + FZ_ETH;
    size_t l4 = h->ilen ? syn_tcp_off(o, h->ilen) : 0, doff, i;
    long clamp;

    if (!l4)
        return;
    doff = (size_t)(o[l4 + 12] >> 4) * 4;
    if (doff < 20 || l4 + doff > h->ilen)
        return;
    clamp = br->cfg.mss ? (long)br->cfg.mss
                        : (long)br->cfg.mtu - (long)br->overhead -
                              (h->type == ETYPE_IPV4 ? 40 : 60);
    for (i = l4 + 20; i < l4 + doff && o[i] != 0;) {
        if (o[i] == 1) {
            i++;
            continue;
        }
        if (i + 1 >= l4 + doff || o[i + 1] < 2 || i + o[i + 1] > l4 + doff)
            return;
        if (o[i] == 2 && o[i + 1] == 4) {
            long want = fz_rd16(o + i + 2) > clamp ? clamp : fz_rd16(o + i + 2);

            FZ_CHECK(fz_rd16(p + i + 2) == want,
                     "encap: MSS %u leaves as %u, not %ld (MTU %u)", fz_rd16(o + i + 2),
                     fz_rd16(p + i + 2), want, br->cfg.mtu);
            return;
        }
        i += o[i + 1];
    }
}

/* A whole (non-GSO) packet's L4 checksum: valid out if it was valid in,
 * or if it was partial with the pseudo-header sum in its field. */
static void check_l4(struct h *h)
{
    const struct fz_frame *z = h->z;
    const uint8_t *o = z->orig + FZ_ETH, *p = h->post + FZ_ETH;
    const struct virtio_net_hdr *v = &z->vh0;
    uint8_t l4p = 0, *cp;
    size_t l4 = fz_l4_off(o, h->ilen, &l4p), field;
    int valid;

    if (!l4)
        return;
    field = l4 + (l4p == IPPROTO_TCP_ ? 16 : 6);
    if (v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (v->csum_start != FZ_ETH + l4 || v->csum_start + v->csum_offset != FZ_ETH + field)
            return;
        cp = malloc(h->ilen);
        if (!cp)
            abort();
        memcpy(cp, o, h->ilen);
        fz_wr16(cp + field, fz_fold(fz_sum(0, cp + l4, h->ilen - l4)));
        if (l4p == IPPROTO_UDP_ && fz_rd16(cp + field) == 0)
            fz_wr16(cp + field, 0xffff);
        valid = fz_l4_csum_ok(cp, l4, h->ilen, l4p);
        free(cp);
    } else {
        valid = fz_l4_csum_ok(o, l4, h->ilen, l4p);
    }
    if (valid)
        FZ_CHECK(fz_l4_csum_ok(p, l4, h->ilen, l4p), "encap: L4 checksum broken");
}

static void check_icmp(struct h *h, const struct fz_out *o, int gso)
{
    const struct fz_frame *z = h->z;
    const struct tpb_bridge *br = h->br;
    size_t l2 = fz_l2(z), len = o->len - l2, q;
    const uint8_t *ip = o->data + l2, *ic, *orig = z->orig + FZ_ETH;

    fz_check_eth(o, z, z->orig + 6, z->orig, ETYPE_IPV4, "ICMP");
    FZ_CHECK(fz_vnet_zero(&o->vh), "ICMP: vnet header");
    FZ_CHECK(len >= 28 && fz_ip_len(ip, len) == len && ip[0] == 0x45 && ip[1] == 0xc0 &&
             fz_rd16(ip + 6) == 0 && ip[8] == 64 && ip[9] == IPPROTO_ICMP_ &&
             fz_rd32(ip + 12) == FZ_LOCAL && !memcmp(ip + 16, orig + 12, 4),
             "ICMP: IPv4 header");
    ic = ip + 20;
    FZ_CHECK(ic[0] == 3 && ic[1] == 4 && fz_rd16(ic + 4) == 0 &&
             fz_rd16(ic + 6) == (uint16_t)(br->cfg.mtu - br->overhead),
             "ICMP: not fragmentation needed with the next-hop MTU");
    FZ_CHECK(fz_fold(fz_sum(0, ic, len - 20)) == 0, "ICMP: checksum");
    q = len - 28;
    FZ_CHECK(q <= 548, "ICMP: quotes %zu bytes", q);
    if (!gso)
        FZ_CHECK(q == (h->ilen < 548 ? h->ilen : 548) &&
                     !memcmp(ic + 8, h->post + FZ_ETH, q),
                 "ICMP: quote");
    else
        FZ_CHECK(q >= 20 && !memcmp(ic + 8 + 12, orig + 12, 8), "ICMP: quote's addresses");
}

/* A segment's IP (+ L4) header against the super-packet's; k from the
 * TCP sequence number or the IPv4 ID (UDP over IPv6: the next payload
 * that matches). */
static void check_segment(struct h *h, const uint8_t *s, size_t len, size_t *next_k,
                          size_t nseg)
{
    static const size_t ip4_skip[] = {2, 3, 4, 5, 10, 11}, tcp_skip[] = {4, 5, 6, 7, 13, 16, 17};
    static const size_t udp_skip[] = {4, 5, 6, 7};
    const uint8_t *o = h->post + FZ_ETH;
    int v4 = h->type == ETYPE_IPV4, tcp;
    size_t l4 = v4 ? (size_t)(o[0] & 0x0f) * 4 : 40, hl, plen, mss = h->z->vh0.gso_size;
    size_t k, d, j, m;
    uint8_t fl;

    tcp = (v4 ? o[9] : o[6]) == IPPROTO_TCP_;
    hl = l4 + (tcp ? (size_t)(o[l4 + 12] >> 4) * 4 : 8);
    plen = h->ilen - hl;
    FZ_CHECK(len >= hl && fz_ip_len(s, len) == len && s[0] >> 4 == o[0] >> 4,
             "segment: IP header invalid or not the GRE payload's length");
    for (j = 0; j < l4; j++) {
        if (v4)
            for (m = 0; m < 6 && ip4_skip[m] != j; m++)
                ;
        else
            m = j == 4 || j == 5 ? 0 : 6;
        FZ_CHECK(m < 6 || s[j] == o[j], "segment: IP header byte %zu changed", j);
    }
    for (j = 0; j < hl - l4; j++) {
        for (m = 0; m < (tcp ? 7u : 4u) && (tcp ? tcp_skip : udp_skip)[m] != j; m++)
            ;
        FZ_CHECK(m < (tcp ? 7u : 4u) || s[l4 + j] == o[l4 + j],
                 "segment: L4 header byte %zu changed", j);
    }
    d = len - hl;
    if (tcp) {
        uint32_t delta = fz_rd32(s + l4 + 4) - fz_rd32(o + l4 + 4);

        FZ_CHECK(delta % mss == 0, "segment: sequence number off the grid");
        k = delta / mss;
    } else if (v4) {
        k = (uint16_t)(fz_rd16(s + 4) - fz_rd16(o + 4));
    } else {
        for (k = *next_k; k < nseg; k++)
            if (d == (plen - k * mss < mss ? plen - k * mss : mss) &&
                !memcmp(s + hl, o + hl + k * mss, d))
                break;
    }
    FZ_CHECK(k >= *next_k && k < nseg, "segment %zu out of order or past %zu", k, nseg);
    FZ_CHECK(d == (plen - k * mss < mss ? plen - k * mss : mss), "segment %zu: %zu bytes", k, d);
    FZ_CHECK(!memcmp(s + hl, o + hl + k * mss, d), "segment %zu: payload", k);
    if (v4)
        FZ_CHECK(fz_rd16(s + 4) == (uint16_t)(fz_rd16(o + 4) + k), "segment %zu: IP ID", k);
    if (tcp) {
        fl = o[l4 + 13];
        if (k > 0)
            fl &= (uint8_t)~0x80;
        if (k + 1 < nseg)
            fl &= (uint8_t)~0x09;
        FZ_CHECK(s[l4 + 13] == fl, "segment %zu: TCP flags %02x, not %02x", k, s[l4 + 13], fl);
        FZ_CHECK(fz_l4_csum_ok(s, l4, len, IPPROTO_TCP_), "segment %zu: TCP checksum", k);
    } else {
        FZ_CHECK(fz_rd16(s + l4 + 4) == 8 + d, "segment %zu: UDP length", k);
        FZ_CHECK(fz_rd16(s + l4 + 6) != 0 && fz_l4_csum_ok(s, l4, len, IPPROTO_UDP_),
                 "segment %zu: UDP checksum", k);
    }
    *next_k = k + 1;
}

static void check(struct h *h, const struct fz_snap *b, const struct fz_snap *a, int down)
{
    const struct fz_frame *z = h->z;
    struct tpb_bridge *br = h->br;
    const struct tpb_tunnel_config *t = &br->cfg;
    uint8_t gso = z->vh0.gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;
    const uint8_t *oip = z->orig + FZ_ETH;
    size_t n_in = 0, n_out = 0, i, k, first;
    int reason, seg, v4;
    uint64_t drops = fz_drops(b, a, &reason), nseg, icmp;
    const struct fz_out *outs_out = NULL;

    for (i = 0; i < fz_nouts; i++)
        if (fz_outs[i].port == TPB_PORT_IN) {
            n_in++;
        } else {
            if (!outs_out)
                outs_out = &fz_outs[i];
            n_out++;
        }
    if (down) {
        if (t->on_down == TPB_DOWN_DROP) {
            FZ_CHECK(fz_nouts == 0 && drops == 1 && reason == TPB_DROP_TUNNEL_DOWN,
                     "no POP up, on_down drop: %zu frames, %llu drops", fz_nouts,
                     (unsigned long long)drops);
            return;
        }
        FZ_CHECK(n_in == 0 && a->tc.bypassed == b->tc.bypassed + 1,
                 "no POP up, bypass: not bypassed out of --out");
        for (i = 0; i < fz_nouts; i++)
            FZ_CHECK(fz_outs[i].port == TPB_PORT_OUT, "bypass: out of --in");
        fz_check_forward(z, fz_outs, n_out, drops,
                         a->c[TPB_PORT_OUT].drop_gso_bad - b->c[TPB_PORT_OUT].drop_gso_bad);
        return;
    }
    /* RFC 791's 68 bytes inside the tunnel, or nothing selected leaves */
    if (t->mtu < 68 + 20 + (t->encap == TPB_ENCAP_UDP ? 8 : 0) +
                 fz_gre_hlen((uint16_t)((t->csum ? GRE_C : 0) | (t->has_key ? GRE_K : 0) |
                                        (t->seq ? GRE_S : 0)))) {
        FZ_CHECK(fz_nouts == 0 && drops == 1 && reason == TPB_DROP_MTU_TOO_SMALL,
                 "MTU %u too small: %zu frames, %llu drops (reason %d)", t->mtu, fz_nouts,
                 (unsigned long long)drops, reason);
        return;
    }
    if (h->type != ETYPE_IPV4 && h->type != ETYPE_IPV6) {
        FZ_CHECK(fz_nouts == 0 && drops == 1 && reason == TPB_DROP_ENCAP_NOT_IP,
                 "not IP: %zu frames, %llu drops", fz_nouts, (unsigned long long)drops);
        return;
    }
    if (!h->ilen) {
        FZ_CHECK(fz_nouts == 0 && drops == 1 && reason == TPB_DROP_ENCAP_BAD,
                 "bad IP header: %zu frames, %llu drops (reason %d)", fz_nouts,
                 (unsigned long long)drops, reason);
        return;
    }
    v4 = h->type == ETYPE_IPV4;
    parse_out(h, outs_out ? outs_out : fz_outs, n_out);
    /* every GRE packet that left is counted once (txq.c: account) */
    {
        uint64_t bytes = 0;

        for (i = 0; i < h->npk; i++)
            bytes += h->pk[i].len;
        if (fz_refuse == TPB_PORT_OUT)
            bytes = 0;          /* none left */
        FZ_CHECK(a->tc.encap_packets - b->tc.encap_packets ==
                         (fz_refuse == TPB_PORT_OUT ? 0 : h->npk) &&
                     a->tc.encap_bytes - b->tc.encap_bytes == bytes,
                 "%zu GRE packets (%llu bytes) left, %llu (%llu bytes) counted",
                 fz_refuse == TPB_PORT_OUT ? 0 : h->npk,
                 (unsigned long long)bytes,
                 (unsigned long long)(a->tc.encap_packets - b->tc.encap_packets),
                 (unsigned long long)(a->tc.encap_bytes - b->tc.encap_bytes));
    }
    icmp = a->tc.icmp_sent - b->tc.icmp_sent;
    FZ_CHECK(icmp == n_in, "%zu ICMP frames, %llu counted", n_in, (unsigned long long)icmp);
    FZ_CHECK(icmp + a->tc.icmp_ratelimited - b->tc.icmp_ratelimited <=
                 a->tc.drop[TPB_DROP_TOO_BIG] - b->tc.drop[TPB_DROP_TOO_BIG],
             "ICMP without a too_big drop");
    seg = gso == VIRTIO_NET_HDR_GSO_TCPV4 || gso == VIRTIO_NET_HDR_GSO_TCPV6 ||
          gso == VIRTIO_NET_HDR_GSO_UDP_L4;
    if (gso != VIRTIO_NET_HDR_GSO_NONE && a->tc.gso_packets == b->tc.gso_packets) {
        FZ_CHECK(h->npk == 0 && n_in == 0 && drops == 1 &&
                     (reason == TPB_DROP_GSO_BAD || reason == TPB_DROP_ENCAP_BAD),
                 "a super-packet not taken: %zu packets, %llu drops (reason %d)", h->npk,
                 (unsigned long long)drops, reason);
        return;
    }
    if (!seg) {
        int fits = h->ilen + br->overhead <= t->mtu;
        int df = v4 && (fz_rd16(oip + 6) & IP_DF) && t->pmtud;
        /* RFC 791: no IPv4 header can describe a fragment past 65535
         * (the inner offset, or the outer datagram, GRE included) */
        int overflow = v4 && t->frag_mode == TPB_FRAG_INNER
                           ? (size_t)(fz_rd16(oip + 6) & IP_OFFMASK) * 8 + h->ilen > 65535
                           : h->ilen + br->overhead > 65535;
        /* a partial checksum must lie in the L4 header's place: past the
         * IP header, inside the packet (the sum is finished first) */
        size_t cs = z->vh0.csum_start, ihl = v4 ? (size_t)(oip[0] & 0x0f) * 4 : 40;
        int csum_bad = gso == VIRTIO_NET_HDR_GSO_NONE &&
                       (z->vh0.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
                       (cs < FZ_ETH + ihl || cs + z->vh0.csum_offset + 2 > FZ_ETH + h->ilen);

        if (gso != VIRTIO_NET_HDR_GSO_NONE)
            FZ_CHECK(a->tc.gso_packets == b->tc.gso_packets + 1 &&
                         a->tc.gso_segments == b->tc.gso_segments + 1,
                     "UFO: not counted as one segment");
        check_changes(h);
        check_mss(h);
        check_l4(h);
        if (!h->npk) {
            FZ_CHECK(drops == 1, "encap: no GRE packet and %llu drops",
                     (unsigned long long)drops);
            FZ_CHECK(reason != TPB_DROP_TOO_BIG || (!fits && df), "too_big, yet it fits");
            /* gso_bad: a vnet header with the ECN bit alone takes the
             * super-packet path, which refuses it before the checksum */
            FZ_CHECK(csum_bad ? reason == TPB_DROP_ENCAP_BAD || reason == TPB_DROP_GSO_BAD
                              : reason != TPB_DROP_ENCAP_BAD,
                     "encap_bad (reason %d), the partial checksum's place bad %d", reason,
                     csum_bad);
            FZ_CHECK((reason == TPB_DROP_FRAG_OVERFLOW) == (!csum_bad && !fits && !df && overflow),
                     "frag_overflow (reason %d) and fits %d, DF %d, overflow %d", reason,
                     fits, df, overflow);
            FZ_CHECK(n_in == 0 || reason == TPB_DROP_TOO_BIG, "ICMP without too_big");
            for (i = 0; i < fz_nouts; i++)
                check_icmp(h, &fz_outs[i], 0);
            return;
        }
        FZ_CHECK(drops == 0 && n_in == 0, "encap: GRE packets and drops or ICMP");
        FZ_CHECK(fits || !df, "encap: DF set and too big, yet sent");
        FZ_CHECK(fits || !overflow, "encap: fragments past 65535 sent");
        if (fits || !v4 || t->frag_mode == TPB_FRAG_OUTER) {
            FZ_CHECK(h->npk == 1 && h->pk[0].len == h->ilen &&
                         !memcmp(h->pk[0].p, h->post + FZ_ETH, h->ilen),
                     "encap: the inner packet changed on the way (%zu packets)", h->npk);
        } else {
            uint8_t *j = malloc(65536 + 60);
            size_t off, len, ihl = (size_t)(oip[0] & 0x0f) * 4;
            int mf;
            static const size_t skip[] = {2, 3, 6, 7, 10, 11};
            const uint8_t *p = h->post + FZ_ETH;

            if (!j)
                abort();
            FZ_CHECK(h->npk >= 2, "inner fragments: only one");
            i = 0;
            len = join_inner(h, &i, j, &off, &mf);
            FZ_CHECK(i == h->npk, "inner fragments of two packets");
            FZ_CHECK(len == h->ilen && !memcmp(j + ihl, p + ihl, len - ihl),
                     "inner fragments: payload");
            for (k = 0; k < ihl; k++) {
                size_t m;

                for (m = 0; m < 6 && skip[m] != k; m++)
                    ;
                FZ_CHECK(m < 6 || j[k] == p[k], "inner fragments: header byte %zu", k);
            }
            FZ_CHECK(off == (size_t)(fz_rd16(p + 6) & IP_OFFMASK) * 8 &&
                         mf == !!(fz_rd16(p + 6) & IP_MF),
                     "inner fragments: offset or MF of the original lost");
            free(j);
        }
        return;
    }
    /* GSO: cut into segments, each one encapsulated, fragmented or dropped */
    nseg = a->tc.gso_segments - b->tc.gso_segments;
    FZ_CHECK(a->tc.gso_packets == b->tc.gso_packets + 1, "GSO: not counted");
    FZ_CHECK(nseg >= 1, "GSO: a super-packet vanished (no segment, no drop)");
    FZ_CHECK(drops == (a->tc.drop[TPB_DROP_TOO_BIG] - b->tc.drop[TPB_DROP_TOO_BIG]) +
                         (a->tc.drop[TPB_DROP_ENCAP_BAD] - b->tc.drop[TPB_DROP_ENCAP_BAD]) +
                         (a->tc.drop[TPB_DROP_FRAG_OVERFLOW] -
                          b->tc.drop[TPB_DROP_FRAG_OVERFLOW]),
             "GSO: a segment dropped other than too_big, encap_bad, frag_overflow");
    for (i = 0; i < fz_nouts; i++)
        if (fz_outs[i].port == TPB_PORT_IN)
            check_icmp(h, &fz_outs[i], 1);
    if (v4 && (fz_rd16(oip + 6) & (IP_MF | IP_OFFMASK)))
        return;                 /* a fragment with a vnet header: nothing to compare */
    {
        uint8_t *j = malloc(65536 + 60);
        size_t next_k = 0, npkt = 0, off;

        int mf;

        if (!j)
            abort();
        for (i = 0; i < h->npk;) {
            const uint8_t *p = h->pk[i].p;

            if (v4 && h->pk[i].len >= 20 && (fz_rd16(p + 6) & (IP_MF | IP_OFFMASK))) {
                first = i;
                k = join_inner(h, &i, j, &off, &mf);
                (void)first;
                FZ_CHECK(off == 0 && !mf, "segment fragments: incomplete");
                /* fragmenting clears DF: compare with the segment's */
                fz_wr16(j + 2, (uint16_t)k);
                fz_wr16(j + 6, fz_rd16(h->post + FZ_ETH + 6));
                fz_ip4_set_csum(j);
                check_segment(h, j, k, &next_k, nseg);
            } else {
                check_segment(h, p, h->pk[i].len, &next_k, nseg);
                i++;
            }
            npkt++;
        }
        FZ_CHECK(npkt + drops == nseg, "GSO: %zu segments sent, %llu dropped, %llu made",
                 npkt, (unsigned long long)drops, (unsigned long long)nseg);
        free(j);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t rates[4] = {0, 1, 100, 1000000};
    static uint8_t buf[MAX_FRAME];
    struct fz_in in = {data, size};
    struct tpb_bridge_config cfg;
    struct virtio_net_hdr vh;
    struct fz_frame z;
    struct fz_snap b, a;
    struct fz_l4 l4;
    struct h h;
    uint8_t b0 = fz_u8(&in), b1 = fz_u8(&in), b2, ttl, tos, tag[4], *ip;
    int mode = (b1 >> 4) & 3, down;
    size_t len, min;
    uint32_t mtu;

    memset(&cfg, 0, sizeof(cfg));
    memset(&h, 0, sizeof(h));
    cfg.ifindex[TPB_PORT_IN] = 1;
    cfg.ifindex[TPB_PORT_OUT] = 2;
    cfg.tunnel = 1;
    cfg.sel_ifindex = 3;
    cfg.mark = 47;
    cfg.tun.local = FZ_LOCAL;
    cfg.tun.nremotes = 1;
    cfg.tun.remote[0] = fz_remotes[0];
    cfg.tun.has_key = b0 & 1;
    cfg.tun.csum = (b0 >> 1) & 1;
    cfg.tun.seq = (b0 >> 2) & 1;
    cfg.tun.pmtud = (b0 >> 3) & 1;
    cfg.tun.frag_mode = (b0 >> 4) & 1;
    cfg.tun.on_down = (b0 >> 6) & 1;
    cfg.tun.keepalive_ms = (b0 & 0x80) ? 1000 : 0;    /* on: no POP up yet */
    cfg.tun.keepalive_retries = 3;
    cfg.tun.df = (uint8_t)(b1 % 3);
    /* 68-9000: one too small for the tunnel is refused at start, so it
     * comes as the loop finds it on the port while running (encap_mtu) */
    mtu = 68 + fz_u16(&in) % (9000 - 68 + 1);
    cfg.tun.mss = (b1 & 0x80) ? fz_u16(&in) : 0;
    b2 = fz_u8(&in);
    cfg.tun.icmp_rate = rates[b2 & 3];
    cfg.tun.encap = (b2 & 8) ? TPB_ENCAP_UDP : TPB_ENCAP_GRE;
    min = encap_min_mtu(20 + (cfg.tun.encap == TPB_ENCAP_UDP ? 8 : 0) +
                        gre_hlen(cfg.tun.csum, cfg.tun.has_key, cfg.tun.seq));
    cfg.tun.mtu = mtu < min ? (uint32_t)min : mtu;
    /* --out refuses every frame (a full device queue): each one counted
     * egress_full, and no GRE packet counted as encapsulated */
    fz_refuse = (b2 & 4) ? TPB_PORT_OUT : -1;
    cfg.tun.key = fz_u32(&in);
    ttl = fz_u8(&in);
    tos = fz_u8(&in);
    cfg.tun.ttl = (b1 & 4) ? -1 : ttl ? ttl : 1;
    cfg.tun.tos = (b1 & 8) ? -1 : tos;
    cfg.tun.reasm_memory = 4u << 20;
    cfg.tun.reasm_timeout_ms = 30000;
    memcpy(cfg.tun.out_mac, fz_out_mac, 6);
    fz_wr16(tag, (uint16_t[]){0x8100, 0x88a8, 0x9100, 0x8100}[fz_u8(&in) & 3]);
    fz_wr16(tag + 2, fz_u16(&in));
    {
        /* the vnet bytes, then the frame: the frame is the rest */
        struct fz_in vin = in;
        uint8_t sink[VNET_LEN];

        fz_bytes(&in, sink, mode == FZ_VNET_RAW ? VNET_LEN : mode == FZ_VNET_GSO ? 3 : 0);
        len = fz_bytes(&in, buf, in.n < MAX_FRAME ? in.n : MAX_FRAME);
        in = vin;
    }
    if (len < FZ_ETH)
        return 0;
    ip = buf + FZ_ETH;
    memset(&l4, 0, sizeof(l4));
    if (b1 & 0x40) {
        if (mode == FZ_VNET_GSO && len >= FZ_ETH + 20 && ip[0] >> 4 == 4)
            fz_wr16(ip + 6, fz_rd16(ip + 6) & IP_DF);   /* TSO/GRO: no fragment */
        if (fz_rd16(buf + 12) == ETYPE_IPV4 || fz_rd16(buf + 12) == ETYPE_IPV6)
            fz_fix_ip(ip, len - FZ_ETH, mode == FZ_VNET_GSO || mode == FZ_VNET_PARTIAL, &l4);
    } else if (mode == FZ_VNET_GSO || mode == FZ_VNET_PARTIAL) {
        fz_l4_of(buf, len, &l4);
    }
    fz_vnet(&vh, mode, &in, &l4, FZ_ETH);

    h.br = fz_bridge(&cfg, FZ_T0);
    if (b2 & 0x10)
        ugso_free(h.br);                /* a kernel before 6.2: no UDP GSO */
    h.br->q[TPB_PORT_OUT].mtu = mtu;    /* as txq_check_mtu() reads it */
    encap_mtu(h.br, mtu);
    down = h.br->active < 0;
    fz_frame_new(&z, buf, len, &vh, (b0 >> 5) & 1, tag);
    h.z = &z;
    h.post = z.f.mac;
    h.type = fz_rd16(buf + 12);
    /* the EtherType says which version the header must be */
    h.ilen = len > FZ_ETH && ((h.type == ETYPE_IPV4 && ip[0] >> 4 == 4) ||
                              (h.type == ETYPE_IPV6 && ip[0] >> 4 == 6))
                 ? fz_ip_len(ip, len - FZ_ETH) : 0;
    fz_snap(h.br, &b);
    fz_outs_clear();
    encap_frame(h.br, &z.f);
    fz_flush(h.br);
    fz_snap(h.br, &a);
    {
        int reason;
        uint64_t d = fz_drops(&b, &a, &reason);

        fz_trace("encap: %zu-byte frame, MTU %u: %zu frames out, %llu drops (%s), "
                 "%llu segments, %llu fragments", len, cfg.tun.mtu, fz_nouts,
                 (unsigned long long)d, reason >= 0 ? tpb_drop_name(reason) : "-",
                 (unsigned long long)(a.tc.gso_segments - b.tc.gso_segments),
                 (unsigned long long)(a.tc.fragments - b.tc.fragments));
    }
    {
        /* what --out refused: exactly the frames handed to it, each one
         * egress_full, none sent; from here on they are the frames out */
        uint64_t refused = 0, egress = a.c[TPB_PORT_OUT].drop_egress_full -
                                      b.c[TPB_PORT_OUT].drop_egress_full;
        size_t i;

        for (i = 0; i < fz_nouts; i++)
            refused += fz_outs[i].refused;
        FZ_CHECK(egress == refused && (!refused || a.c[TPB_PORT_OUT].tx_frames ==
                                                       b.c[TPB_PORT_OUT].tx_frames),
                 "--out refused %llu frames, %llu counted egress_full",
                 (unsigned long long)refused, (unsigned long long)egress);
        a.c[TPB_PORT_OUT].drop_egress_full = b.c[TPB_PORT_OUT].drop_egress_full;
    }
    check(&h, &b, &a, down);
    fz_refuse = -1;
    while (h.npk)
        free(h.pk[--h.npk].p);
    free(h.pk);
    fz_outs_clear();
    fz_frame_free(&z);
    tpb_bridge_close(h.br);
    return 0;
}
