/* gre.c — the GRE codec (gre.c, csum.c): gre_decode() and
 * gre_keepalive_answer() on arbitrary bytes against a receive state from
 * the input; gre_encap() of the same bytes decoded back; RFC 6040 ECN;
 * ip_len(); csum_add() against RFC 1071 byte by byte.
 * Invariants: fuzz/README.md. */
#include "fuzz.h"

#include <stdlib.h>

#define MAX_LEN 65535

/* What RFC 2784/2890 and the tunnel's settings require of a data packet,
 * leaving out the sequence window's verdict (gre_decode() owns that). */
static int acceptable(const struct gre_rx *r, const uint8_t *g, size_t n,
                      int csum_checked, int keepalive)
{
    uint16_t flags, proto;
    size_t off = 4;

    if (n < 4)
        return 0;
    flags = fz_rd16(g);
    proto = fz_rd16(g + 2);
    if ((flags & (GRE_VER | GRE_UNKNOWN)) || n < fz_gre_hlen(flags))
        return 0;
    if (flags & GRE_C) {
        if (!csum_checked && fz_fold(fz_sum(0, g, n)) != 0)
            return 0;
        off += 4;
    } else if (r->csum) {
        return 0;
    }
    if (flags & GRE_K) {
        if (!r->has_key || fz_rd32(g + off) != r->key)
            return 0;
    } else if (r->has_key) {
        return 0;
    }
    if (keepalive)
        return proto == 0;
    if (!(flags & GRE_S) && r->seq)
        return 0;
    return proto == ETYPE_IPV4 || proto == ETYPE_IPV6;
}

static void decode(struct fz_in *in, uint8_t b0, const uint8_t *bytes, size_t n)
{
    struct gre_rx r, r0, r1;
    struct gre_pkt p;
    uint8_t *g = malloc(n ? n : 1);
    int rc, csum_checked = (b0 >> 4) & 1;
    uint16_t flags;

    if (!g)
        abort();
    memcpy(g, bytes, n);
    memset(&r, 0, sizeof(r));
    r.local = FZ_LOCAL;
    r.remote = fz_remotes[0];
    r.has_key = b0 & 1;
    r.csum = (b0 >> 1) & 1;
    r.seq = (b0 >> 2) & 1;
    r.seq_started = (b0 >> 3) & 1;
    r.key = fz_u32(in);
    r.next_seq = fz_u32(in);
    r0 = r;

    memset(&p, 0, sizeof(p));
    rc = gre_keepalive_answer(&r, g, n);
    FZ_CHECK(!memcmp(&r, &r0, sizeof(r)), "keepalive answer: state changed");
    FZ_CHECK((rc == 0) == acceptable(&r, g, n, 0, 1), "keepalive answer: rc %d", rc);
    FZ_CHECK(!rc || (rc >= TPB_DROP_GRE_TRUNCATED && rc <= TPB_DROP_GRE_PROTO),
             "keepalive answer: reason %d", rc);

    rc = gre_decode(&r, g, n, csum_checked, &p);
    FZ_CHECK(!memcmp(&r, &r0, sizeof(r)), "decode: the state changed (%d)", rc);
    FZ_CHECK(!rc || (rc >= TPB_DROP_GRE_TRUNCATED && rc <= TPB_DROP_GRE_PROTO),
             "decode: reason %d", rc);
    flags = n >= 4 ? fz_rd16(g) : 0;
    if (rc) {
        /* refused for a reason of its own, or by the window */
        FZ_CHECK(!acceptable(&r, g, n, csum_checked, 0) || rc == TPB_DROP_GRE_SEQ_STALE,
                 "decode: refused (%d) an acceptable packet", rc);
        FZ_CHECK(rc != TPB_DROP_GRE_SEQ_STALE ||
                     (r.seq && r.seq_started && (flags & GRE_S)),
                 "decode: stale without a window");
        goto out;
    }
    FZ_CHECK(acceptable(&r0, g, n, csum_checked, 0), "decode: accepted what it must refuse");
    FZ_CHECK(p.off == fz_gre_hlen(flags) && p.off <= n && p.proto == fz_rd16(g + 2),
             "decode: offset %u or protocol %04x", p.off, p.proto);
    FZ_CHECK(p.has_seq == (r.seq && (flags & GRE_S)), "decode: has_seq %u", p.has_seq);
    if (!p.has_seq) {
        gre_commit_seq(&r, &p);
        FZ_CHECK(!memcmp(&r, &r0, sizeof(r)), "commit: window moved without a sequence number");
        goto out;
    }
    FZ_CHECK(p.seq == fz_rd32(g + 4 + ((flags & GRE_C) ? 4 : 0) + ((flags & GRE_K) ? 4 : 0)),
             "decode: sequence number %u", p.seq);
    FZ_CHECK(!r.seq_started || (int32_t)(p.seq - r.next_seq) >= 0,
             "decode: a stale number taken");
    /* Delivered: the window moves past it and nothing else changes; RFC
     * 2890 2.2: the same number again is stale, and changes nothing. */
    gre_commit_seq(&r, &p);
    r1 = r0;
    r1.seq_started = 1;
    r1.next_seq = p.seq + 1;
    FZ_CHECK(!memcmp(&r, &r1, sizeof(r)), "commit: window not just past the number");
    r0 = r;
    rc = gre_decode(&r, g, n, csum_checked, &p);
    FZ_CHECK(rc == TPB_DROP_GRE_SEQ_STALE, "decode: a duplicate was taken (%d)", rc);
    FZ_CHECK(!memcmp(&r, &r0, sizeof(r)), "decode: a duplicate moved the window");
out:
    free(g);
}

/* gre_encap() of a payload, and gre_decode() of the result. */
static void roundtrip(struct fz_in *in, uint8_t b0, const uint8_t *bytes, size_t n)
{
    struct gre_tx t;
    struct gre_rx r, unused;
    struct gre_pkt p;
    uint8_t b = fz_u8(in), *out, ttl = fz_u8(in), tos = fz_u8(in), itos;
    uint16_t proto = (b & 1) ? ETYPE_IPV6 : ETYPE_IPV4;
    uint32_t key = fz_u32(in), seqno = fz_u32(in);
    size_t hl, need = proto == ETYPE_IPV4 ? 20 : 40, plen = n < need ? need : n;
    int df, idf;

    out = calloc(1, 20 + 16 + plen);
    if (!out)
        abort();
    memcpy(out + 36, bytes, n);               /* the payload, at least a header */
    memset(&t, 0, sizeof(t));
    gre_setup(&t, &r, FZ_LOCAL, fz_remotes[1], key, (b >> 1) & 1, (b >> 2) & 1,
              (b >> 3) & 1, (b & 0x10) ? -1 : ttl, (b & 0x20) ? -1 : tos);
    t.df = (uint8_t)((b >> 6) % 3);
    t.seqno = seqno;
    r.seq_started = 0;
    r.next_seq = 0;
    hl = gre_hlen(t.csum, t.has_key, t.seq);
    /* encapsulate where the payload already is: header in front of it */
    {
        uint8_t hdr[36];
        uint32_t psum = t.csum ? csum_add(0, out + 36, plen) : 0;

        FZ_CHECK(gre_encap(&t, hdr, proto, out + 36, plen, psum) == 20 + hl,
                 "encap: header length");
        memmove(out + 36 - 20 - hl, hdr, 20 + hl);
    }
    {
        const uint8_t *ip = out + 16 - hl, *in4 = out + 36;
        size_t tot = 20 + hl + plen;

        FZ_CHECK(tot > 65535 || fz_ip_len(ip, tot) == tot, "encap: outer header invalid");
        FZ_CHECK(ip[0] == 0x45 && ip[9] == IPPROTO_GRE_ && fz_rd32(ip + 12) == FZ_LOCAL &&
                     fz_rd32(ip + 16) == fz_remotes[1],
                 "encap: outer fields");
        itos = proto == ETYPE_IPV4 ? in4[1] : (uint8_t)((in4[0] & 0x0f) << 4 | in4[1] >> 4);
        FZ_CHECK(ip[8] == (t.ttl >= 0 ? (uint8_t)t.ttl : proto == ETYPE_IPV4 ? in4[8] : in4[7]),
                 "encap: TTL");
        FZ_CHECK(ip[1] == (uint8_t)(((t.tos >= 0 ? (uint8_t)t.tos : itos) & ~3) | (itos & 3)),
                 "encap: TOS");
        idf = proto == ETYPE_IPV4 && (fz_rd16(in4 + 6) & IP_DF);
        df = t.df == TPB_DF_SET ? 1 : t.df == TPB_DF_CLEAR ? 0 : idf;
        FZ_CHECK(!!(fz_rd16(ip + 6) & IP_DF) == df && !(fz_rd16(ip + 6) & ~IP_DF),
                 "encap: DF/fragment field");
        if (tot <= 65535) {
            FZ_CHECK(gre_decode(&r, ip + 20, hl + plen, 0, &p) == 0 && p.proto == proto &&
                         p.off == hl,
                     "encap: its own packet not decoded");
            if (t.seq)
                FZ_CHECK(fz_rd32(ip + 20 + 4 + (t.csum ? 4 : 0) + (t.has_key ? 4 : 0)) == seqno &&
                             t.seqno == seqno + 1,
                         "encap: sequence number");
        }
    }
    /* a keepalive's inner GRE header comes back as an answer */
    {
        uint8_t g[16];
        struct gre_tx bare = t;
        size_t gl;

        bare.seq = 0;
        gl = gre_header(&bare, g, 0, 0, 0);
        FZ_CHECK(gre_keepalive_answer(&r, g, gl) == 0, "keepalive: its own answer refused");
    }
    (void)unused;
    (void)b0;
    free(out);
}

static void ecn_and_len(struct fz_in *in, const uint8_t *bytes, size_t n)
{
    uint8_t o = fz_u8(in), i = fz_u8(in), *h;
    size_t k;

    FZ_CHECK(ecn_decap(o, i) == fz_ecn_decap(o, i), "ecn_decap(%u, %u)", o & 3, i & 3);
    FZ_CHECK(ip_len(bytes, n, ETYPE_IPV4) == (n && bytes[0] >> 4 == 4 ? fz_ip_len(bytes, n) : 0),
             "ip_len (IPv4)");
    FZ_CHECK(ip_len(bytes, n, ETYPE_IPV6) == (n && bytes[0] >> 4 == 6 ? fz_ip_len(bytes, n) : 0),
             "ip_len (IPv6)");
    if (n < 40)
        return;
    h = malloc(n);
    if (!h)
        abort();
    memcpy(h, bytes, n);
    if (h[0] >> 4 == 4 && fz_ip_len(h, n)) {
        int e = fz_ecn_decap(o, h[1]), rc = ecn_decap_inner(o, h, ETYPE_IPV4);

        FZ_CHECK((rc < 0) == (e < 0), "ecn_decap_inner: drop");
        if (!rc) {
            FZ_CHECK((h[1] & 3) == e && (h[1] & ~3) == (bytes[1] & ~3) && fz_ip4_csum_ok(h),
                     "ecn_decap_inner: IPv4 TOS or checksum");
            for (k = 0; k < n; k++)
                FZ_CHECK(k == 1 || k == 10 || k == 11 || h[k] == bytes[k],
                         "ecn_decap_inner: byte %zu", k);
        }
    } else if (h[0] >> 4 == 6) {
        uint8_t tc = (uint8_t)((h[0] & 0x0f) << 4 | h[1] >> 4);
        int e = fz_ecn_decap(o, tc), rc = ecn_decap_inner(o, h, ETYPE_IPV6);

        FZ_CHECK((rc < 0) == (e < 0), "ecn_decap_inner (IPv6): drop");
        if (!rc)
            FZ_CHECK((h[1] >> 4 & 3) == e && h[0] == bytes[0] &&
                         (h[1] & 0xcf) == (bytes[1] & 0xcf) && !memcmp(h + 2, bytes + 2, n - 2),
                     "ecn_decap_inner (IPv6)");
    }
    free(h);
}

/* csum_add() against the byte-at-a-time sum of RFC 1071, from any start
 * (its wide loops read unaligned words) and any length, whatever path
 * (AVX2 or scalar) the length takes. */
static void sums(const uint8_t *p, size_t n)
{
    /* from the bytes themselves: the parameters' layout stays the seeds' */
    size_t off = n ? p[0] % 64 : 0;
    uint32_t init = n >= 3 ? (uint32_t)(p[1] << 8 | p[2]) : 0;

    if (off > n)
        off = n;
    FZ_CHECK(csum_add(init, p + off, n - off) == fz_sum(init, p + off, n - off),
             "csum_add: %u bytes from %zu differ from RFC 1071", (unsigned)(n - off), off);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_in in = {data, size};
    uint8_t b0 = fz_u8(&in), params[32];
    size_t n;

    /* the parameters first (fixed size), the bytes are the rest */
    memset(params, 0, sizeof(params));
    fz_bytes(&in, params, 8 + 11 + 2);
    n = in.n > MAX_LEN ? MAX_LEN : in.n;
    {
        struct fz_in pin = {params, sizeof(params)};

        decode(&pin, b0, in.p, n);
        roundtrip(&pin, b0, in.p, n);
        ecn_and_len(&pin, in.p, n);
        sums(in.p, n);
    }
    return 0;
}
