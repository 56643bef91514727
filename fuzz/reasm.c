/* reasm.c — reassembly on its own: reasm_add() and reasm_expire() on a
 * fake clock.  Four datagrams are made from the input (header, length,
 * bytes); the operations cut fragments of them (honest, overlapping,
 * duplicate, with a false end, unaligned), feed raw fragments of a key
 * space of their own, and move the clock.  Invariants: fuzz/README.md. */
#include "fuzz.h"

#include <stdio.h>
#include <stdlib.h>

#define NDG 4
#define MAX_OPS 96
#define MAX_ENDS 128

struct dg {
    uint8_t hdr[60];
    size_t ihl, len;           /* header, payload length */
    const uint8_t *data;       /* into pattern[] */
    size_t ends[MAX_ENDS];     /* ends a fragment with MF clear has given */
    size_t nends;
};

static uint64_t drops_of(const struct tpb_tunnel_counters *a,
                         const struct tpb_tunnel_counters *b, int *reason)
{
    return fz_tc_drops(a, b, reason);
}

/* Bytes that tell offsets apart (a datagram's are a slice of these). */
static uint8_t pattern[65536 + 1024];

static void make_pattern(void)
{
    uint32_t x = 2463534242u;
    size_t i;

    for (i = 0; i < sizeof(pattern); i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        pattern[i] = (uint8_t)x;
    }
}

/* The datagram's header, as every fragment carries it but for total
 * length, fragment field and checksum. */
static void make_dg(struct dg *d, struct fz_in *in, int j)
{
    uint8_t b = fz_u8(in);
    size_t i;
    uint32_t x = fz_u32(in);

    d->ihl = 20 + 4 * (size_t)(b % 11);
    d->len = fz_u16(in) % (65535 - 60 + 1);
    if ((b & 0xc0) != 0xc0)
        d->len %= 3000;         /* mostly small */
    memset(d->hdr, 0, sizeof(d->hdr));
    d->hdr[0] = (uint8_t)(0x40 | d->ihl / 4);
    d->hdr[1] = (uint8_t)x;
    fz_wr16(d->hdr + 4, (uint16_t)(0x1000 + j));     /* distinct keys */
    d->hdr[8] = 64;
    d->hdr[9] = IPPROTO_GRE_;
    fz_wr32(d->hdr + 12, fz_remotes[0]);
    fz_wr32(d->hdr + 16, FZ_LOCAL);
    for (i = 20; i < d->ihl; i++)
        d->hdr[i] = (uint8_t)(x >> (i % 4 * 8));
    d->data = pattern + (x & 1023);
    d->nends = 0;
}

static void check_out(const struct dg *d, const uint8_t *out, size_t n, int raw)
{
    static const size_t skip[] = {2, 3, 6, 7, 10, 11};
    size_t i, k, ihl = (size_t)(out[0] & 0x0f) * 4, end;

    FZ_CHECK(n >= 20 && ihl >= 20 && ihl <= n && fz_rd16(out + 2) == n &&
                 fz_ip4_csum_ok(out) && !(fz_rd16(out + 6) & (IP_MF | IP_OFFMASK)),
             "reassembled: header invalid (%zu bytes)", n);
    if (raw)
        return;
    FZ_CHECK(ihl == d->ihl, "reassembled: header length %zu, not %zu", ihl, d->ihl);
    for (i = 0; i < ihl; i++) {
        for (k = 0; k < 6 && skip[k] != i; k++)
            ;
        FZ_CHECK(k < 6 || out[i] == d->hdr[i], "reassembled: header byte %zu", i);
    }
    end = n - ihl;
    for (k = 0; k < d->nends && d->ends[k] != end; k++)
        ;
    FZ_CHECK(k < d->nends, "reassembled: %zu bytes, an end no last fragment gave", end);
    FZ_CHECK(end <= d->len && !memcmp(out + ihl, d->data, end),
             "reassembled: the bytes are not the fragments' bytes");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t mem[8] = {4u << 20, 0, 2048, 4096, 8192, 65536, 131072, 1u << 20};
    static const uint32_t tmo[4] = {30000, 0, 1, 1000};
    struct fz_in in = {data, size};
    struct tpb_tunnel_counters tc, before;
    struct tpb_port_counters pc;
    static struct txq q_;
    struct txq *q = &q_;
    struct reasm *r;
    struct dg dg[NDG];
    uint8_t b0 = fz_u8(&in), *frag;
    uint32_t limit = mem[b0 & 7], timeout_ms = tmo[(b0 >> 3) & 3];
    uint64_t now = FZ_T0, last_add = 0, timeout_ns = (uint64_t)timeout_ms * 1000000ull;
    int j, ops = 0, reason, any = 0;

    if (!pattern[0] && !pattern[1])
        make_pattern();
    memset(q, 0, sizeof(*q));
    if (txq_init(q, -1, -1, 0, &pc))
        abort();
    memset(&tc, 0, sizeof(tc));
    fz_capture(NULL);
    r = reasm_new(limit, timeout_ms);
    if (!r)
        abort();
    for (j = 0; j < NDG; j++)
        make_dg(&dg[j], &in, j);
    while (in.n && ops++ < MAX_OPS) {
        uint8_t op = fz_u8(&in), v = fz_u8(&in);
        struct dg *d = &dg[op >> 6];
        size_t start = (size_t)fz_u16(&in) * 8, len = fz_u16(&in), out_len = 0, tot;
        int mf, raw = 0;
        uint8_t *out;
        uint64_t evicted;
        size_t held;

        before = tc;
        if ((op & 7) == 7) {                       /* the clock moves */
            now += (uint64_t)fz_u16(&in) * 1000000ull * ((v & 1) ? 1 : 100);
            reasm_expire(r, &tc, now);
            FZ_CHECK(drops_of(&before, &tc, &reason) ==
                         tc.drop[TPB_DROP_REASM_TIMEOUT] - before.drop[TPB_DROP_REASM_TIMEOUT],
                     "expire: drops other than timeouts");
            if (any && now >= last_add + timeout_ns)
                FZ_CHECK(reasm_memory_held(r) == 0,
                         "expire: a datagram outlived its timeout (%zu bytes held)",
                         reasm_memory_held(r));
        } else {
            if ((op & 7) == 6) {                   /* raw: a key space of its own */
                size_t ihl;

                tot = 20 + len % 1500;
                frag = calloc(1, tot);
                if (!frag)
                    abort();
                fz_bytes(&in, frag, tot);
                ihl = (size_t)(frag[0] & 0x0f) * 4;
                if (ihl < 20 || ihl > tot)
                    ihl = 20;
                frag[0] = (uint8_t)(0x40 | ihl / 4);
                fz_wr16(frag + 2, (uint16_t)tot);
                if (!(fz_rd16(frag + 6) & (IP_MF | IP_OFFMASK)))
                    fz_wr16(frag + 6, IP_MF);
                frag[12] = 10;
                frag[13] = 255;              /* 10.255.x.x: never a made datagram */
                fz_ip4_set_csum(frag);
                raw = 1;
            } else {
                /* a piece of datagram d: [start, start + len) clipped */
                start = d->len ? start % (d->len + 8) : 0;
                start &= ~(size_t)7;
                if (start > d->len)
                    start = d->len & ~(size_t)7;
                len %= d->len - start + 1;
                if (!(v & 2) && !len)
                    len = d->len - start;
                mf = start + len < d->len;
                if (v & 4)
                    mf = 0;                  /* a false end */
                if ((v & 8) || (!mf && start == 0))
                    mf = 1;                  /* (to_local passes only fragments) */
                if (mf && !(v & 16))
                    len &= ~(size_t)7;       /* mostly aligned */
                tot = d->ihl + len;
                frag = malloc(tot);
                if (!frag)
                    abort();
                memcpy(frag, d->hdr, d->ihl);
                fz_wr16(frag + 2, (uint16_t)tot);
                fz_wr16(frag + 6, (uint16_t)((start / 8) | (mf ? IP_MF : 0)));
                fz_ip4_set_csum(frag);
                memcpy(frag + d->ihl, d->data + start, len);
                if (!mf && d->nends < MAX_ENDS)
                    d->ends[d->nends++] = start + len;
            }
            /* what to_local() hands over: a valid IPv4 header, a fragment */
            FZ_CHECK(ip4_check(frag, tot) == tot, "harness: not a valid fragment");
            any = 1;
            last_add = now;
            held = reasm_datagrams(r);
            out = reasm_add(r, &tc, q, frag, tot, now, &out_len);
            FZ_CHECK(tc.reasm_fragments == before.reasm_fragments + 1, "fragment not counted");
            /* Evictions are drops of datagrams held before (earlier
             * fragments), at most all of them; the rest is this one's. */
            evicted = tc.drop[TPB_DROP_REASM_EVICTED] - before.drop[TPB_DROP_REASM_EVICTED];
            FZ_CHECK(evicted <= held, "%llu evicted of %zu datagrams held",
                     (unsigned long long)evicted, held);
            if (out) {
                FZ_CHECK(drops_of(&before, &tc, &reason) == evicted &&
                             tc.reasm_done == before.reasm_done + 1,
                         "reassembled, yet a drop or not counted");
                check_out(d, out, out_len, raw);
            } else {
                uint64_t n = drops_of(&before, &tc, &reason) - evicted;

                FZ_CHECK(tc.reasm_done == before.reasm_done, "counted done, no datagram");
                FZ_CHECK(n <= 1, "%llu drops for one fragment", (unsigned long long)n);
                if (n == 0)
                    FZ_CHECK(reasm_memory_held(r) > 0, "fragment neither kept nor dropped");
            }
            free(frag);
        }
        FZ_CHECK(reasm_memory_held(r) == tc.reasm_memory,
                 "reassembly holds %zu bytes, counts %llu", reasm_memory_held(r),
                 (unsigned long long)tc.reasm_memory);
        FZ_CHECK(tc.reasm_memory <= limit, "reassembly holds %llu bytes, bound %u",
                 (unsigned long long)tc.reasm_memory, limit);
        FZ_CHECK(tc.reasm_memory_peak >= tc.reasm_memory, "peak below the gauge");
        txq_flush(q);
    }
    reasm_free(r);
    txq_free(q);
    return 0;
}
