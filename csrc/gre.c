/* gre.c — GRE over IPv4, both ways, shared by the bridge and the POP.
 *
 *   gre_encap()   outer IPv4 (RFC 791) + GRE (RFC 2784, key and sequence
 *                 number per RFC 2890), or GRE-in-UDP (RFC 8086, the source
 *                 port a hash of the inner flow: gre_udp_sport()), TOS/TTL/DF
 *                 per the tunnel settings, ECN per RFC 6040 section 4.1
 *                 (normal mode: copy);
 *   gre_check()   what every GRE header from a remote gets (version,
 *                 flags, length, checksum, key, sequence number present);
 *   gre_decode()  gre_check(), the protocol, the sequence window, without
 *                 moving it;
 *   gre_commit_seq()  move the window, called by whoever delivers the
 *                 packet, only once it is delivered;
 *   gre_keepalive_answer()  gre_check() for a keepalive answer (protocol
 *                 0, no sequence number needed, window untouched);
 *   ka_id_check() and the answer's IP ID is one we sent lately;
 *   ecn_decap()   RFC 6040 section 4.2, figure 4.
 */
#include <sys/random.h>
#include <time.h>

#include "proto.h"
#include "tpb.h"

static void inner_fields(uint16_t proto, const uint8_t *in, uint8_t *tos,
                         uint8_t *ttl, int *df)
{
    if (proto == ETYPE_IPV4) {
        *tos = in[1];
        *ttl = in[8];
        *df = (rd16(in + 6) & IP_DF) != 0;
    } else {
        /* IPv6: traffic class straddles bytes 0 and 1.  No IPv6 router
         * fragments, but TPB has no IPv6 address to send Packet Too Big
         * from, so the outer packet may be fragmented instead. */
        *tos = (uint8_t)((in[0] & 0x0f) << 4 | in[1] >> 4);
        *ttl = in[7];
        *df = 0;
    }
}

uint8_t outer_tos(const struct gre_tx *t, uint16_t proto, const uint8_t *inner)
{
    uint8_t in_tos, in_ttl;
    int in_df;

    inner_fields(proto, inner, &in_tos, &in_ttl, &in_df);
    return (uint8_t)(((t->tos >= 0 ? (uint8_t)t->tos : in_tos) & ~ECN_MASK) |
                     (in_tos & ECN_MASK));
}

uint8_t outer_ttl(const struct gre_tx *t, uint16_t proto, const uint8_t *inner)
{
    uint8_t in_tos, in_ttl;
    int in_df;

    inner_fields(proto, inner, &in_tos, &in_ttl, &in_df);
    return t->ttl >= 0 ? (uint8_t)t->ttl : in_ttl;
}

size_t gre_header(struct gre_tx *t, uint8_t *g, uint16_t proto,
                  size_t plen, uint32_t psum)
{
    size_t glen = gre_hlen(t->csum, t->has_key, t->seq), off = 4;
    uint16_t flags = 0;

    (void)plen;
    if (t->csum) {
        flags |= GRE_C;
        wr32(g + off, 0);          /* checksum, reserved1: filled below */
        off += 4;
    }
    if (t->has_key) {
        flags |= GRE_K;
        wr32(g + off, t->key);
        off += 4;
    }
    if (t->seq) {
        flags |= GRE_S;
        wr32(g + off, t->seqno++);
        off += 4;
    }
    wr16(g, flags);
    wr16(g + 2, proto);
    if (t->csum)   /* RFC 2784 2.5: over the GRE header and the payload */
        wr16(g + 4, csum_finish(csum_add(psum, g, glen)));
    return glen;
}

uint16_t gre_udp_sport(uint16_t proto, const uint8_t *inner, size_t plen)
{
    uint32_t h = 2166136261u;      /* FNV-1a: cheap, and spreads well enough */
    const uint8_t *addrs, *ports = NULL;
    size_t alen, l4;
    uint8_t l4proto;
    size_t i;

    if (proto == ETYPE_IPV4) {
        addrs = inner + 12;
        alen = 8;
        l4proto = inner[9];
        l4 = (size_t)(inner[0] & 0x0f) * 4;
        if (!(rd16(inner + 6) & (IP_MF | IP_OFFMASK)))
            ports = inner + l4;
    } else {
        addrs = inner + 8;
        alen = 32;
        l4proto = inner[6];
        l4 = 40;
        ports = inner + l4;
    }
    /* TCP, UDP, SCTP (132): ports in the first 4 bytes of the L4 header */
    if (!(l4proto == IPPROTO_TCP_ || l4proto == IPPROTO_UDP_ || l4proto == 132) ||
        l4 + 4 > plen)
        ports = NULL;
    for (i = 0; i < alen; i++)
        h = (h ^ addrs[i]) * 16777619u;
    h = (h ^ l4proto) * 16777619u;
    for (i = 0; ports && i < 4; i++)
        h = (h ^ ports[i]) * 16777619u;
    h ^= h >> 16;
    return (uint16_t)(0xc000 | (h & 0x3fff));
}

/* The outer IPv4 header (RFC 791) for an inner packet: TOS/TTL/DF per the
 * tunnel settings, ECN per RFC 6040 4.1, and nids consecutive IDs taken
 * (a UDP GSO message's segments each get the next one, as the kernel's
 * inet_gso_segment gives them). */
static void outer_ip4(struct gre_tx *t, uint8_t *ip, uint16_t proto,
                      const uint8_t *inner, size_t tot, uint32_t nids)
{
    uint8_t in_tos, in_ttl;
    int in_df, df;

    inner_fields(proto, inner, &in_tos, &in_ttl, &in_df);
    df = t->df == TPB_DF_SET ? 1 : t->df == TPB_DF_CLEAR ? 0 : in_df;
    ip[0] = 0x45;
    ip[1] = outer_tos(t, proto, inner);
    wr16(ip + 2, (uint16_t)tot);
    wr16(ip + 4, t->ip_id);
    t->ip_id = (uint16_t)(t->ip_id + nids);
    wr16(ip + 6, df ? IP_DF : 0);
    ip[8] = outer_ttl(t, proto, inner);
    ip[9] = t->udp ? IPPROTO_UDP_ : IPPROTO_GRE_;
    wr32(ip + 12, t->local);
    wr32(ip + 16, t->remote);
    ip4_set_csum(ip);
}

size_t gre_encap(struct gre_tx *t, uint8_t *out, uint16_t proto,
                 const uint8_t *inner, size_t plen, uint32_t psum)
{
    uint8_t *ip = out, *u = out + 20;
    size_t glen = gre_hlen(t->csum, t->has_key, t->seq);
    size_t ulen = t->udp ? UDP_HLEN : 0;

    outer_ip4(t, ip, proto, inner, 20 + ulen + glen + plen, 1);
    gre_header(t, out + 20 + ulen, proto, plen, psum);
    if (!t->udp)
        return 20 + glen;
    /* RFC 8086 3.1: a real checksum, which also lets receivers' GRO merge
     * the datagrams; the payload's sum is psum. */
    udp4_put(u, ip, gre_udp_sport(proto, inner, plen), GRE_UDP_PORT,
             UDP_HLEN + glen + plen, UDP_HLEN + glen, psum);
    return 20 + UDP_HLEN + glen;
}

void udp4_put(uint8_t *u, const uint8_t *ip, uint16_t sport, uint16_t dport,
              size_t len, size_t covered, uint32_t psum)
{
    uint16_t c;

    wr16(u, sport);
    wr16(u + 2, dport);
    wr16(u + 4, (uint16_t)len);
    wr16(u + 6, 0);
    c = csum_finish(csum_add(csum_pseudo4(ip, IPPROTO_UDP_, (uint32_t)len), u, covered) +
                    psum);
    wr16(u + 6, c ? c : 0xffff);   /* RFC 768: a sum of zero goes as all ones */
}

void gre_udp_outer(struct gre_tx *t, uint8_t *out, uint16_t proto,
                   const uint8_t *inner, size_t ilen, size_t ulen, uint32_t nseg)
{
    uint8_t *u = out + 20;

    outer_ip4(t, out, proto, inner, 20 + ulen, nseg);
    wr16(u, gre_udp_sport(proto, inner, ilen));
    wr16(u + 2, GRE_UDP_PORT);
    wr16(u + 4, (uint16_t)ulen);
    wr16(u + 6, 0);
}

/* What every GRE header from a remote gets, in this order: version,
 * flags, length, the checksum (verified with GRE_CHECK_CSUM, required
 * when this side wants them), the key, a sequence number (required with
 * GRE_CHECK_SEQ when this side wants them).  Fills out's off, has_seq and
 * seq (not proto); the window is left to the callers. */
int gre_check(const struct gre_rx *r, const uint8_t *g, size_t glen,
              unsigned what, struct gre_pkt *out)
{
    uint16_t flags;
    size_t off = 4;
    uint32_t seq = 0;

    if (glen < 4)
        return TPB_DROP_GRE_TRUNCATED;
    flags = rd16(g);
    if (flags & GRE_VER)
        return TPB_DROP_GRE_VERSION;
    if (flags & GRE_UNKNOWN)
        return TPB_DROP_GRE_FLAGS;
    if (glen < gre_hlen(!!(flags & GRE_C), !!(flags & GRE_K), !!(flags & GRE_S)))
        return TPB_DROP_GRE_TRUNCATED;
    if (flags & GRE_C) {
        if ((what & GRE_CHECK_CSUM) && csum_finish(csum_add(0, g, glen)) != 0)
            return TPB_DROP_GRE_CSUM;
        off += 4;
    } else if (r->csum) {
        return TPB_DROP_GRE_CSUM_MISSING;
    }
    if (flags & GRE_K) {
        if (!r->has_key || rd32(g + off) != r->key)
            return TPB_DROP_GRE_KEY;
        off += 4;
    } else if (r->has_key) {
        return TPB_DROP_GRE_KEY;
    }
    if (flags & GRE_S) {
        seq = rd32(g + off);
        off += 4;
    } else if ((what & GRE_CHECK_SEQ) && r->seq) {
        return TPB_DROP_GRE_SEQ_MISSING;
    }
    out->has_seq = r->seq && (flags & GRE_S);
    out->seq = seq;
    out->off = (uint16_t)off;
    return 0;
}

int gre_decode(const struct gre_rx *r, const uint8_t *g, size_t glen,
               int csum_checked, struct gre_pkt *out)
{
    int rc = gre_check(r, g, glen, (csum_checked ? 0 : GRE_CHECK_CSUM) | GRE_CHECK_SEQ,
                       out);

    if (rc)
        return rc;
    out->proto = rd16(g + 2);
    if (out->proto != ETYPE_IPV4 && out->proto != ETYPE_IPV6)
        return TPB_DROP_GRE_PROTO;
    /* RFC 2890 2.2: a number not after the last one accepted is stale (as
     * Linux, serial arithmetic; duplicates are stale too).  "Accepted" is
     * delivered: the window moves in gre_commit_seq(). */
    if (out->has_seq && r->seq_started && (int32_t)(out->seq - r->next_seq) < 0)
        return TPB_DROP_GRE_SEQ_STALE;
    return 0;
}

void gre_commit_seq(struct gre_rx *r, const struct gre_pkt *p)
{
    /* Only forward: a packet checked before a later one was committed
     * (none today: one packet at a time) must not pull the window back. */
    if (!p->has_seq || (r->seq_started && (int32_t)(p->seq - r->next_seq) < 0))
        return;
    r->next_seq = p->seq + 1;
    r->seq_started = 1;
}

/* The checks of gre_decode() for a keepalive answer: a Cisco keepalive
 * comes back as the inner GRE header its sender wrote, protocol 0, with
 * the tunnel's key and checksum options but no sequence number.  So none
 * is required, and one that is there is not held against the window (the
 * window belongs to the data packets, RFC 2890 2.2). */
int gre_keepalive_answer(const struct gre_rx *r, const uint8_t *g, size_t glen)
{
    struct gre_pkt p;
    int rc = gre_check(r, g, glen, GRE_CHECK_CSUM, &p);

    if (rc)
        return rc;
    return rd16(g + 2) == 0 ? 0 : TPB_DROP_GRE_PROTO;
}

int ecn_decap(uint8_t outer_tos, uint8_t inner_tos)
{
    int o = outer_tos & ECN_MASK, i = inner_tos & ECN_MASK;

    if (o == ECN_CE)
        return i == ECN_NOT_ECT ? -1 : ECN_CE;
    if (o == 1 && i == 2)          /* outer ECT(1), inner ECT(0) */
        return 1;
    return i;
}

int ecn_decap_inner(uint8_t outer_tos, uint8_t *in, uint16_t proto)
{
    uint8_t tos = proto == ETYPE_IPV4 ? in[1]
                                      : (uint8_t)((in[0] & 0x0f) << 4 | in[1] >> 4);
    int e = ecn_decap(outer_tos, tos);
    uint16_t old;

    if (e < 0)
        return -1;
    if (e == (tos & ECN_MASK))
        return 0;
    if (proto == ETYPE_IPV4) {
        old = rd16(in);
        in[1] = (uint8_t)((tos & ~ECN_MASK) | e);
        wr16(in + 10, csum_replace16(rd16(in + 10), old, rd16(in)));
    } else {
        in[1] = (uint8_t)((in[1] & 0xcf) | e << 4);
    }
    return 0;
}

void gre_setup(struct gre_tx *tx, struct gre_rx *rx, uint32_t local,
               uint32_t remote, uint32_t key, uint8_t has_key, uint8_t csum,
               uint8_t seq, int16_t ttl, int16_t tos)
{
    tx->local = rx->local = local;
    tx->remote = rx->remote = remote;
    tx->key = rx->key = key;
    tx->has_key = rx->has_key = has_key;
    tx->csum = rx->csum = csum;
    tx->seq = rx->seq = seq;
    tx->ttl = ttl;
    tx->tos = tos;
}

size_t ip_len(const uint8_t *ip, size_t avail, uint16_t proto)
{
    size_t plen;

    if (proto == ETYPE_IPV4)
        return ip4_check(ip, avail);
    if (avail < 40 || (ip[0] >> 4) != 6)
        return 0;
    plen = rd16(ip + 4);
    return plen && 40 + plen <= avail ? 40 + plen : 0;
}

int ka_id_check(uint16_t last_id, uint64_t sent, uint16_t id, unsigned window)
{
    if (window < 1)
        window = 1;
    if (window > KA_ID_WINDOW_MAX)
        window = KA_ID_WINDOW_MAX;
    if (sent < window)
        window = (unsigned)sent;
    return (uint16_t)(last_id - id) < window ? 0 : TPB_DROP_KEEPALIVE_STALE;
}

#ifdef TPB_FUZZ
/* fuzz/: the harness's, so that an input always runs the same way */
uint16_t tpb_fuzz_ka_id;
#endif

uint16_t ka_first_id(void)
{
    uint16_t id;
    struct timespec ts;

#ifdef TPB_FUZZ
    return tpb_fuzz_ka_id;
#endif

    if (getrandom(&id, sizeof(id), GRND_NONBLOCK) != sizeof(id)) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        id = (uint16_t)(ts.tv_nsec ^ ts.tv_nsec >> 16);
    }
    return id;
}
