/* common.c — what the harnesses share: reading the input, checksums and
 * parsing written afresh, frames in exact-size buffers, the txq sink, the
 * counters, and the checks of forward()'s outcome. */
#include "fuzz.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define VER_UNKNOWN (GRE_VER | GRE_UNKNOWN)

/* AddressSanitizer's defaults, tuned for throughput: a smaller quarantine
 * (freed memory is reused sooner, fewer page faults) and shorter
 * allocation stacks.  ASAN_OPTIONS still overrides them. */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "quarantine_size_mb=32:malloc_context_size=8";
}

/* ---- input ---- */

uint8_t fz_u8(struct fz_in *in)
{
    uint8_t v = 0;

    fz_bytes(in, &v, 1);
    return v;
}

uint16_t fz_u16(struct fz_in *in)
{
    uint8_t b[2] = {0, 0};

    fz_bytes(in, b, 2);
    return fz_rd16(b);
}

uint32_t fz_u32(struct fz_in *in)
{
    uint8_t b[4] = {0, 0, 0, 0};

    fz_bytes(in, b, 4);
    return fz_rd32(b);
}

size_t fz_bytes(struct fz_in *in, uint8_t *out, size_t want)
{
    size_t n = want < in->n ? want : in->n;

    memcpy(out, in->p, n);
    in->p += n;
    in->n -= n;
    return n;
}

void fz_fail(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "\n*** tpb fuzz invariant violated: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    abort();
}

void fz_trace(const char *fmt, ...)
{
    static int on = -1;
    va_list ap;

    if (on < 0)
        on = getenv("FZ_TRACE") != NULL;
    if (!on)
        return;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* ---- checksums ---- */

uint32_t fz_sum(uint32_t sum, const uint8_t *p, size_t len)
{
    uint64_t s = sum;
    size_t i;

    for (i = 0; i + 1 < len; i += 2)
        s += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1)
        s += (uint32_t)p[len - 1] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

uint16_t fz_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

int fz_ip4_csum_ok(const uint8_t *ip)
{
    return fz_fold(fz_sum(0, ip, (size_t)(ip[0] & 0x0f) * 4)) == 0;
}

void fz_ip4_set_csum(uint8_t *ip)
{
    ip[10] = ip[11] = 0;
    fz_wr16(ip + 10, fz_fold(fz_sum(0, ip, (size_t)(ip[0] & 0x0f) * 4)));
}

uint32_t fz_pseudo(const uint8_t *ip, uint8_t l4proto, uint32_t l4len)
{
    if (ip[0] >> 4 == 4)
        return fz_sum(0, ip + 12, 8) + l4proto + l4len;
    return fz_sum(0, ip + 8, 32) + l4proto + (l4len >> 16) + (l4len & 0xffff);
}

static size_t csum_field(uint8_t l4proto)
{
    return l4proto == IPPROTO_TCP_ ? 16 : 6;
}

int fz_l4_csum_ok(const uint8_t *ip, size_t l4, size_t len, uint8_t l4proto)
{
    if (l4proto == IPPROTO_UDP_ && ip[0] >> 4 == 4 && fz_rd16(ip + l4 + 6) == 0)
        return 1;                 /* RFC 768: no checksum */
    return fz_fold(fz_sum(fz_pseudo(ip, l4proto, (uint32_t)(len - l4)), ip + l4,
                          len - l4)) == 0;
}

void fz_l4_set_csum(uint8_t *ip, size_t l4, size_t len, uint8_t l4proto,
                    int partial)
{
    uint8_t *c = ip + l4 + csum_field(l4proto);
    uint32_t s = fz_pseudo(ip, l4proto, (uint32_t)(len - l4));
    uint16_t v;

    c[0] = c[1] = 0;
    if (partial) {
        while (s >> 16)
            s = (s & 0xffff) + (s >> 16);
        fz_wr16(c, (uint16_t)s);
        return;
    }
    v = fz_fold(fz_sum(s, ip + l4, len - l4));
    if (v == 0 && l4proto == IPPROTO_UDP_)
        v = 0xffff;
    fz_wr16(c, v);
}

/* ---- parsing ---- */

size_t fz_ip_len(const uint8_t *ip, size_t avail)
{
    size_t ihl, tot;

    if (avail >= 20 && ip[0] >> 4 == 4) {
        ihl = (size_t)(ip[0] & 0x0f) * 4;
        tot = fz_rd16(ip + 2);
        if (ihl < 20 || tot < ihl || tot > avail || !fz_ip4_csum_ok(ip))
            return 0;
        return tot;
    }
    if (avail >= 40 && ip[0] >> 4 == 6) {
        tot = fz_rd16(ip + 4);
        return tot && 40 + tot <= avail ? 40 + tot : 0;
    }
    return 0;
}

size_t fz_l4_off(const uint8_t *ip, size_t len, uint8_t *l4proto)
{
    size_t l4;

    if (ip[0] >> 4 == 4) {
        if (fz_rd16(ip + 6) & (IP_MF | IP_OFFMASK))
            return 0;
        l4 = (size_t)(ip[0] & 0x0f) * 4;
        *l4proto = ip[9];
    } else {
        l4 = 40;
        *l4proto = ip[6];
    }
    if (*l4proto == IPPROTO_TCP_ ? l4 + 20 > len
                                 : *l4proto != IPPROTO_UDP_ || l4 + 8 > len)
        return 0;
    return l4;
}

size_t fz_gre_hlen(uint16_t flags)
{
    return 4 + (flags & GRE_C ? 4 : 0) + (flags & GRE_K ? 4 : 0) +
           (flags & GRE_S ? 4 : 0);
}

void fz_check_gre_fields(const struct tpb_tunnel_config *t, const uint8_t *g, size_t len,
                         uint32_t *seq_next, const char *what)
{
    size_t off = 4;

    if (t->csum) {
        FZ_CHECK(fz_fold(fz_sum(0, g, len)) == 0, "%s: GRE checksum", what);
        off += 4;
    }
    if (t->has_key) {
        FZ_CHECK(fz_rd32(g + off) == t->key, "%s: key", what);
        off += 4;
    }
    if (t->seq) {
        FZ_CHECK(fz_rd32(g + off) == *seq_next, "%s: sequence number %u, not %u", what,
                 fz_rd32(g + off), *seq_next);
        (*seq_next)++;
    }
}

int fz_ecn_decap(uint8_t outer, uint8_t inner)
{
    /* rows: inner Not-ECT, ECT(1), ECT(0), CE; columns: the outer's */
    static const int8_t t[4][4] = {
        {0, 0, 0, -1},
        {1, 1, 1, 3},
        {2, 1, 2, 3},
        {3, 3, 3, 3},
    };

    return t[inner & 3][outer & 3];
}

/* ---- fixing inputs ---- */

static void fix_rec(uint8_t *ip, size_t avail, int partial, struct fz_l4 *l4,
                    size_t base, int depth);

/* The GRE packet at g (glen bytes, base its offset from the outermost
 * header): its inner packet, then its checksum. */
static void fix_gre(uint8_t *g, size_t glen, int partial, struct fz_l4 *l4,
                    size_t base, int depth)
{
    uint16_t flags = fz_rd16(g), ip_type = fz_rd16(g + 2);
    size_t gh = fz_gre_hlen(flags);

    if (glen >= gh && (ip_type == ETYPE_IPV4 || ip_type == ETYPE_IPV6))
        fix_rec(g + gh, glen - gh, partial, l4, base + gh, depth + 1);
    if ((flags & GRE_C) && glen >= gh) {
        g[4] = g[5] = 0;
        fz_wr16(g + 4, fz_fold(fz_sum(0, g, glen)));
    }
}

static void fix_rec(uint8_t *ip, size_t avail, int partial, struct fz_l4 *l4,
                    size_t base, int depth)
{
    size_t hl, plen;
    uint8_t proto, *pl;

    if (avail > 65535 + 40)
        avail = 65535;
    if (avail >= 20 && ip[0] >> 4 == 4) {
        hl = (size_t)(ip[0] & 0x0f) * 4;
        if (hl < 20 || hl > avail)
            return;
        if (avail > 65535)
            avail = 65535;
        fz_wr16(ip + 2, (uint16_t)avail);
        proto = ip[9];
        if (fz_rd16(ip + 6) & (IP_MF | IP_OFFMASK))
            proto = 0;               /* a fragment: nothing inside to fix */
    } else if (avail >= 40 && ip[0] >> 4 == 6) {
        hl = 40;
        if (avail - 40 > 65535)
            avail = 65535 + 40;
        fz_wr16(ip + 4, (uint16_t)(avail - 40));
        proto = ip[6];
    } else {
        return;
    }
    pl = ip + hl;
    plen = avail - hl;
    if (proto == IPPROTO_GRE_ && depth < 2 && plen >= 4) {
        fix_gre(pl, plen, partial, l4, base + hl, depth);
    } else if (proto == IPPROTO_UDP_ && depth < 2 && plen >= 8 + 4 &&
               (fz_rd16(pl) == FZ_GRE_UDP_PORT || fz_rd16(pl + 2) == FZ_GRE_UDP_PORT)) {
        /* GRE-in-UDP (RFC 8086): the GRE packet, then the UDP length and a
         * complete checksum over it (the innermost L4 takes the partial one) */
        fix_gre(pl + 8, plen - 8, partial, l4, base + hl + 8, depth);
        fz_wr16(pl + 4, (uint16_t)plen);
        if (ip[0] >> 4 == 4)
            fz_ip4_set_csum(ip);      /* the pseudo header is in it */
        fz_l4_set_csum(ip, hl, hl + plen, IPPROTO_UDP_, 0);
    } else if ((proto == 4 || proto == 41) && depth < 2) {
        fix_rec(pl, plen, partial, l4, base + hl, depth + 1);
    } else if ((proto == IPPROTO_TCP_ && plen >= 20) ||
               (proto == IPPROTO_UDP_ && plen >= 8)) {
        if (proto == IPPROTO_UDP_)
            fz_wr16(pl + 4, (uint16_t)plen);
        if (ip[0] >> 4 == 4)
            fz_ip4_set_csum(ip);      /* the pseudo header is in it */
        fz_l4_set_csum(ip, hl, hl + plen, proto, partial);
        l4->off = base + hl;
        l4->ip_off = base;
        l4->proto = proto;
        l4->ver = ip[0] >> 4;
    }
    if (ip[0] >> 4 == 4)
        fz_ip4_set_csum(ip);
}

void fz_l4_of(const uint8_t *frame, size_t len, struct fz_l4 *l4)
{
    uint8_t *scratch = malloc(len);

    if (!scratch)
        abort();
    memcpy(scratch, frame, len);
    fz_fix_ip(scratch + FZ_ETH, len - FZ_ETH, 1, l4);
    free(scratch);
}

void fz_fix_ip(uint8_t *ip, size_t avail, int partial, struct fz_l4 *l4)
{
    memset(l4, 0, sizeof(*l4));
    fix_rec(ip, avail, partial, l4, 0, 0);
}

/* ---- frames ---- */

void fz_frame_new(struct fz_frame *z, const uint8_t *data, size_t len,
                  const struct virtio_net_hdr *vh, int tagged,
                  const uint8_t tag[4])
{
    memset(z, 0, sizeof(*z));
    z->buf = malloc(VNET_LEN + len);
    z->orig = malloc(len ? len : 1);
    if (!z->buf || !z->orig)
        abort();
    memcpy(z->buf, vh, VNET_LEN);
    memcpy(z->buf + VNET_LEN, data, len);
    memcpy(z->orig, data, len);
    z->vh0 = *vh;
    z->f.mac = z->buf + VNET_LEN;
    z->f.vh = (struct virtio_net_hdr *)z->buf;
    z->f.len = (uint32_t)len;
    z->f.tagged = tagged;
    if (tagged)
        memcpy(z->f.tag, tag, 4);
}

void fz_frame_free(struct fz_frame *z)
{
    free(z->buf);
    free(z->orig);
    z->buf = z->orig = NULL;
}

void fz_vnet(struct virtio_net_hdr *vh, int mode, struct fz_in *in,
             const struct fz_l4 *l4, uint32_t l2)
{
    static const uint8_t types[8] = {
        VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
        VIRTIO_NET_HDR_GSO_UDP_L4, VIRTIO_NET_HDR_GSO_UDP,
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
        VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN,
        VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    };
    uint8_t raw[VNET_LEN], sel;
    uint16_t size;

    memset(vh, 0, sizeof(*vh));
    switch (mode) {
    case FZ_VNET_RAW:
        memset(raw, 0, sizeof(raw));
        fz_bytes(in, raw, sizeof(raw));
        memcpy(vh, raw, sizeof(raw));
        return;
    case FZ_VNET_GSO:
        sel = fz_u8(in);
        size = fz_u16(in);
        if (!l4->off)
            return;
        vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh->csum_start = (uint16_t)(l2 + l4->off);
        vh->csum_offset = (uint16_t)csum_field(l4->proto);
        /* the type that fits, or (1 in 8) any of them */
        if (sel & 0x80)
            vh->gso_type = types[sel & 7];
        else if (l4->proto == IPPROTO_UDP_)
            vh->gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
        else
            vh->gso_type = l4->ver == 4 ? VIRTIO_NET_HDR_GSO_TCPV4
                                        : VIRTIO_NET_HDR_GSO_TCPV6;
        /* sizes below 256 (thousands of segments, slow) 1 time in 4 */
        vh->gso_size = size < 256 && !(sel & 0x60) ? (uint16_t)(size + 256) : size;
        vh->hdr_len = (uint16_t)(vh->csum_start + (l4->proto == IPPROTO_TCP_ ? 20 : 8));
        return;
    case FZ_VNET_PARTIAL:
        if (!l4->off)
            return;
        vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh->csum_start = (uint16_t)(l2 + l4->off);
        vh->csum_offset = (uint16_t)csum_field(l4->proto);
        return;
    default:
        return;
    }
}

int fz_vnet_zero(const struct virtio_net_hdr *vh)
{
    static const struct virtio_net_hdr zero;

    return !memcmp(vh, &zero, sizeof(zero));
}

/* ---- output ---- */

struct fz_out *fz_outs;
size_t fz_nouts;
static size_t cap_outs;
static struct tpb_bridge *cap_br;

void fz_outs_clear(void)
{
    size_t i;

    for (i = 0; i < fz_nouts; i++)
        free(fz_outs[i].data);
    fz_nouts = 0;
}

int fz_refuse = -1;

static int sink(struct txq *q, uint32_t i)
{
    const struct msghdr *m = &q->msg[i].msg_hdr;
    struct fz_out *o;
    size_t k, total = 0, at = 0, n;
    uint8_t *all;

    FZ_CHECK(m->msg_iovlen >= 1 && m->msg_iovlen <= TXQ_XIOV,
             "txq: message with %zu iovecs", (size_t)m->msg_iovlen);
    FZ_CHECK(m->msg_iov[0].iov_len >= VNET_LEN, "txq: first iovec shorter than the vnet header");
    for (k = 0; k < m->msg_iovlen; k++) {
        FZ_CHECK(m->msg_iov[k].iov_base || !m->msg_iov[k].iov_len, "txq: NULL iovec");
        total += m->msg_iov[k].iov_len;
    }
    FZ_CHECK(total - VNET_LEN == q->len[i], "txq: len[] %u, iovecs %zu",
             q->len[i], total - VNET_LEN);
    all = malloc(total);
    if (!all)
        abort();
    for (k = 0; k < m->msg_iovlen; k++) {
        memcpy(all + at, m->msg_iov[k].iov_base, m->msg_iov[k].iov_len);
        at += m->msg_iov[k].iov_len;
    }
    if (fz_nouts == cap_outs) {
        cap_outs = cap_outs ? 2 * cap_outs : 64;
        fz_outs = realloc(fz_outs, cap_outs * sizeof(*fz_outs));
        if (!fz_outs)
            abort();
    }
    o = &fz_outs[fz_nouts++];
    o->port = !cap_br ? -1 : q == &cap_br->q[TPB_PORT_IN] ? TPB_PORT_IN
            : q == &cap_br->q[TPB_PORT_OUT] ? TPB_PORT_OUT : -1;
    o->qdisc = q->qdisc[i];
    memcpy(&o->vh, all, VNET_LEN);
    n = total - VNET_LEN;
    o->data = malloc(n ? n : 1);
    if (!o->data)
        abort();
    memcpy(o->data, all + VNET_LEN, n);
    o->len = n;
    free(all);
    o->refused = o->port >= 0 && o->port == fz_refuse;
    return !o->refused;
}

void fz_capture(struct tpb_bridge *br)
{
    cap_br = br;
    tpb_fuzz_tx = sink;
}

struct tpb_bridge *fz_bridge(const struct tpb_bridge_config *cfg, uint64_t now)
{
    struct tpb_bridge *br = tpb_fuzz_bridge_open(cfg, now);

    FZ_CHECK(br != NULL, "the harness's configuration was refused");
    fz_capture(br);
    return br;
}

void fz_flush(struct tpb_bridge *br)
{
    txq_flush(&br->q[TPB_PORT_IN]);
    txq_flush(&br->q[TPB_PORT_OUT]);
}

/* ---- counters ---- */

void fz_snap(const struct tpb_bridge *br, struct fz_snap *s)
{
    s->tc = br->tc;
    memcpy(s->c, br->c, sizeof(s->c));
}

uint64_t fz_tc_drops(const struct tpb_tunnel_counters *a,
                     const struct tpb_tunnel_counters *b, int *reason)
{
    const uint64_t *x = (const uint64_t *)a, *y = (const uint64_t *)b;
    size_t i, gauge = offsetof(struct tpb_tunnel_counters, reasm_memory) / 8;
    uint64_t d = 0;

    for (i = 0; i < sizeof(*a) / 8; i++)
        FZ_CHECK(i == gauge || y[i] >= x[i], "tunnel counter %zu went down", i);
    *reason = -1;
    for (i = 0; i < TPB_NDROP; i++)
        if (b->drop[i] != a->drop[i]) {
            d += b->drop[i] - a->drop[i];
            *reason = (int)i;
        }
    return d;
}

uint64_t fz_drops(const struct fz_snap *a, const struct fz_snap *b, int *reason)
{
    uint64_t d = fz_tc_drops(&a->tc, &b->tc, reason);
    int p;
    size_t i;

    for (p = 0; p < TPB_NPORTS; p++) {
        const uint64_t *x = (const uint64_t *)&a->c[p], *y = (const uint64_t *)&b->c[p];
        const struct tpb_port_counters *ca = &a->c[p], *cb = &b->c[p];

        for (i = 0; i < sizeof(a->c[p]) / 8; i++)
            FZ_CHECK(y[i] >= x[i], "port %d counter %zu went down", p, i);
        d += cb->drop_truncated - ca->drop_truncated;
        d += cb->drop_too_big - ca->drop_too_big;
        d += cb->drop_egress_full - ca->drop_egress_full;
        d += cb->drop_send_error - ca->drop_send_error;
        if (cb->drop_gso_bad != ca->drop_gso_bad) {
            d += cb->drop_gso_bad - ca->drop_gso_bad;
            *reason = -2;
        }
    }
    return d;
}

/* ---- shared checks ---- */

void fz_check_eth(const struct fz_out *o, const struct fz_frame *z,
                  const uint8_t *dst, const uint8_t *src, uint16_t type,
                  const char *what)
{
    size_t l2 = fz_l2(z);

    FZ_CHECK(o->len >= l2, "%s: %zu-byte frame", what, o->len);
    FZ_CHECK(!memcmp(o->data, dst, 6), "%s: Ethernet destination", what);
    FZ_CHECK(!memcmp(o->data + 6, src, 6), "%s: Ethernet source", what);
    if (z->f.tagged)
        FZ_CHECK(!memcmp(o->data + 12, z->f.tag, 4), "%s: VLAN tag lost", what);
    FZ_CHECK(fz_rd16(o->data + l2 - 2) == type, "%s: EtherType %04x, not %04x",
             what, fz_rd16(o->data + l2 - 2), type);
}

static void check_bridged(const struct fz_frame *z, const struct fz_out *o)
{
    const struct virtio_net_hdr *v = &z->vh0;
    struct virtio_net_hdr want = *v;
    size_t len = z->f.len;

    if (z->f.tagged) {
        FZ_CHECK(o->len == len + 4, "bridged: %zu bytes, not %zu", o->len, len + 4);
        FZ_CHECK(!memcmp(o->data, z->orig, 12) && !memcmp(o->data + 12, z->f.tag, 4) &&
                 !memcmp(o->data + 16, z->orig + 12, len - 12),
                 "bridged: the frame changed");
        if (v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
            want.csum_start = (uint16_t)(want.csum_start + 4);
        if (v->gso_type != VIRTIO_NET_HDR_GSO_NONE)
            want.hdr_len = (uint16_t)(want.hdr_len + 4);
    } else {
        FZ_CHECK(o->len == len && !memcmp(o->data, z->orig, len),
                 "bridged: the frame changed");
    }
    FZ_CHECK(!memcmp(&o->vh, &want, sizeof(want)), "bridged: vnet header changed");
    FZ_CHECK(o->qdisc == (v->gso_type != VIRTIO_NET_HDR_GSO_NONE),
             "bridged: a super-packet must go through the qdisc, nothing else");
}

/* What tunnel_inner() takes apart: IPv4 (not a fragment) or IPv6 carrying
 * IPv4, IPv6 or GRE. */
static int is_tunnel(const uint8_t *fr, size_t len)
{
    const uint8_t *ip = fr + FZ_ETH;
    uint16_t type = fz_rd16(fr + 12);
    uint8_t proto;

    if (type == ETYPE_IPV4 && len >= FZ_ETH + 20 && ip[0] >> 4 == 4 &&
        !(fz_rd16(ip + 6) & (IP_MF | IP_OFFMASK))) {
        /* a header length no IPv4 header has: a super-packet the kernel
         * could not segment either, so one TPB may drop (gso_bad) */
        if ((ip[0] & 0x0f) < 5 || (size_t)(ip[0] & 0x0f) * 4 > len - FZ_ETH)
            return 1;
        proto = ip[9];
    }
    else if (type == ETYPE_IPV6 && len >= FZ_ETH + 40 && ip[0] >> 4 == 6)
        proto = ip[6];
    else
        return 0;
    return proto == 4 || proto == 41 || proto == IPPROTO_GRE_;
}

/* Header bytes equal but for the listed offsets (all below 64). */
static int same_but(const uint8_t *a, const uint8_t *b, size_t n,
                    const size_t *skip, size_t nskip)
{
    uint64_t mask = 0;
    size_t i;

    for (i = 0; i < nskip; i++)
        mask |= 1ull << skip[i];
    for (i = 0; i < n; i++)
        if (a[i] != b[i] && (i >= 64 || !(mask >> i & 1)))
            return 0;
    return 1;
}

static void check_transit(const struct fz_frame *z, const struct fz_out *outs,
                          size_t n)
{
    static const size_t ip4_skip[] = {2, 3, 4, 5, 10, 11}, ip6_skip[] = {4, 5};
    static const size_t tcp_skip[] = {4, 5, 6, 7, 13, 16, 17};
    const uint8_t *fr = z->orig, *oip = fr + FZ_ETH, *in, *tcp;
    size_t avail = z->f.len - FZ_ETH, ohl, olen, gre = 0, ilen, l4, hl, plen;
    size_t mss = z->vh0.gso_size, nseg, k, l2 = fz_l2(z);
    int v4 = fz_rd16(fr + 12) == ETYPE_IPV4;
    uint8_t proto, fl;

    ohl = v4 ? (size_t)(oip[0] & 0x0f) * 4 : 40;
    proto = v4 ? oip[9] : oip[6];
    FZ_CHECK(ohl >= 20, "transit: segmented behind a %zu-byte outer IPv4 header", ohl);
    olen = ohl;
    if (proto == IPPROTO_GRE_) {
        uint16_t flags;

        FZ_CHECK(avail >= ohl + 4, "transit: GRE header cut short, yet segmented");
        flags = fz_rd16(oip + ohl);
        FZ_CHECK(!(flags & (VER_UNKNOWN | GRE_S)), "transit: GRE flags %04x segmented", flags);
        gre = ohl;
        olen += fz_gre_hlen(flags);
    }
    FZ_CHECK(avail >= olen, "transit: outer headers past the frame, yet segmented");
    in = oip + olen;
    ilen = fz_ip_len(in, avail - olen);
    FZ_CHECK(ilen, "transit: a malformed inner packet was segmented");
    FZ_CHECK(in[0] >> 4 != 4 || !(fz_rd16(in + 6) & (IP_MF | IP_OFFMASK)),
             "transit: an inner IPv4 fragment was segmented");
    l4 = in[0] >> 4 == 4 ? (size_t)(in[0] & 0x0f) * 4 : 40;
    FZ_CHECK((in[0] >> 4 == 4 ? in[9] : in[6]) == IPPROTO_TCP_,
             "transit: segmented an inner packet that is not TCP");
    FZ_CHECK(l4 + 20 <= ilen, "transit: inner TCP header cut short, yet segmented");
    tcp = in + l4;
    FZ_CHECK(tcp[12] >> 4 >= 5, "transit: TCP data offset %u segmented", tcp[12] >> 4);
    hl = l4 + (size_t)(tcp[12] >> 4) * 4;
    FZ_CHECK(hl <= ilen, "transit: TCP header past the packet, yet segmented");
    plen = ilen - hl;
    FZ_CHECK(mss > 0, "transit: segmented with gso_size 0");
    nseg = (plen + mss - 1) / mss;
    FZ_CHECK(n == nseg, "transit: %zu segments of %zu payload bytes by %zu, not %zu",
             n, plen, mss, nseg);
    for (k = 0; k < n; k++) {
        const struct fz_out *o = &outs[k];
        size_t d = plen - k * mss < mss ? plen - k * mss : mss;
        const uint8_t *so, *si;

        fz_check_eth(o, z, fr, fr + 6, fz_rd16(fr + 12), "transit segment");
        FZ_CHECK(fz_vnet_zero(&o->vh), "transit segment: vnet header left");
        FZ_CHECK(o->len == l2 + olen + hl + d, "transit segment %zu: %zu bytes, not %zu",
                 k, o->len, l2 + olen + hl + d);
        so = o->data + l2;
        if (v4) {
            FZ_CHECK(same_but(so, oip, ohl, ip4_skip, 6), "transit: outer IPv4 header changed");
            FZ_CHECK(fz_rd16(so + 2) == o->len - l2, "transit: outer total length");
            FZ_CHECK(fz_rd16(so + 4) == (uint16_t)(fz_rd16(oip + 4) + k), "transit: outer IP ID");
            FZ_CHECK(fz_ip4_csum_ok(so), "transit: outer IPv4 header checksum");
        } else {
            FZ_CHECK(same_but(so, oip, 40, ip6_skip, 2), "transit: outer IPv6 header changed");
            FZ_CHECK(fz_rd16(so + 4) == o->len - l2 - 40, "transit: outer payload length");
        }
        if (gre) {
            size_t gskip[2] = {4, 5};
            int c = (fz_rd16(oip + gre) & GRE_C) != 0;

            FZ_CHECK(same_but(so + gre, oip + gre, olen - gre, gskip, c ? 2 : 0),
                     "transit: GRE header changed");
            if (c)
                FZ_CHECK(fz_fold(fz_sum(0, so + gre, o->len - l2 - gre)) == 0,
                         "transit: GRE checksum");
        }
        si = so + olen;
        if (in[0] >> 4 == 4) {
            FZ_CHECK(same_but(si, in, l4, ip4_skip, 6), "transit: inner IPv4 header changed");
            FZ_CHECK(fz_rd16(si + 2) == hl + d, "transit: inner total length");
            FZ_CHECK(fz_rd16(si + 4) == (uint16_t)(fz_rd16(in + 4) + k), "transit: inner IP ID");
            FZ_CHECK(fz_ip4_csum_ok(si), "transit: inner IPv4 header checksum");
        } else {
            FZ_CHECK(same_but(si, in, 40, ip6_skip, 2), "transit: inner IPv6 header changed");
            FZ_CHECK(fz_rd16(si + 4) == hl - 40 + d, "transit: inner payload length");
        }
        FZ_CHECK(same_but(si + l4, tcp, hl - l4, tcp_skip, 7), "transit: TCP header changed");
        FZ_CHECK(fz_rd32(si + l4 + 4) == (uint32_t)(fz_rd32(tcp + 4) + k * mss),
                 "transit: TCP sequence number of segment %zu", k);
        fl = tcp[13];
        if (k > 0)
            fl &= (uint8_t)~0x80;
        if (k + 1 < n)
            fl &= (uint8_t)~0x09;
        FZ_CHECK(si[l4 + 13] == fl, "transit: TCP flags %02x, not %02x", si[l4 + 13], fl);
        FZ_CHECK(fz_l4_csum_ok(si, l4, hl + d, IPPROTO_TCP_), "transit: TCP checksum");
        FZ_CHECK(!memcmp(si + hl, in + hl + k * mss, d), "transit: payload of segment %zu", k);
    }
}

int fz_check_forward(const struct fz_frame *z, const struct fz_out *outs,
                     size_t n, uint64_t drops, uint64_t gso_bad)
{
    const struct virtio_net_hdr *vh = &z->vh0;
    uint8_t gso = vh->gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;

    if ((gso != VIRTIO_NET_HDR_GSO_TCPV4 && gso != VIRTIO_NET_HDR_GSO_TCPV6) ||
        !(vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || !is_tunnel(z->orig, z->f.len)) {
        FZ_CHECK(n == 1 && drops == 0,
                 "forward: a frame to bridge gave %zu frames and %llu drops", n,
                 (unsigned long long)drops);
        check_bridged(z, &outs[0]);
        return 0;
    }
    if (n == 0) {
        FZ_CHECK(drops == 1 && gso_bad == 1,
                 "forward: a transit super-packet gave no frame and %llu drops "
                 "(%llu gso_bad)", (unsigned long long)drops, (unsigned long long)gso_bad);
        return 0;
    }
    FZ_CHECK(drops == 0, "forward: transit segments and a drop");
    check_transit(z, outs, n);
    return 1;
}
