/* reasm.c — outer IPv4 fragments of GRE from the POP, put back together
 * before decapsulation (RFC 791 section 3.2).
 *
 *   1. reasm_add()     the fragment on its own: a length that is a multiple
 *                      of 8 but for the last, nothing past 65535; then its
 *                      datagram (src, dst, id, protocol; a seeded hash);
 *   2. check()         consistent with what came before: exact duplicate ->
 *                      that fragment dropped; any other overlap, a second
 *                      different end, data past the end or a datagram over
 *                      65535 bytes with its first fragment's header -> the
 *                      whole datagram dropped (as Linux since 4.19 and RFC
 *                      5722 for IPv6: overlaps are attacks);
 *   3. make_room()     what the fragment will hold, charged as Linux charges
 *                      skb truesize: its bytes, plus the heap block around
 *                      them, plus the datagram's own block when it starts
 *                      one; over the bound (default 4 MiB, Linux's
 *                      ipfrag_high_thresh) the oldest datagrams are evicted
 *                      (counted reasm_evicted), unverified ones first;
 *   4. store()         only now is anything created or kept;
 *   5. complete()      every byte present: one datagram, into the tx arena;
 *   6. reasm_expire()  datagrams older than the timeout (30 s, as Linux's
 *                      ipfrag_time) dropped and counted; reasm_forget():
 *                      a first fragment decap.c refused takes its datagram
 *                      with it; reasm_memory_held(): the charge recomputed.
 *
 * Verified and unverified datagrams.  decap.c checks the GRE header of a
 * first fragment (offset 0) against the remote's settings before handing
 * it over, so a datagram holding its first fragment is verified: it came
 * with the tunnel's key.  One whose first fragment has not come yet is
 * unverified: anyone who can put the POP's address on a packet can make
 * one, and at most MAX_UNVERIFIED of them are kept (the oldest evicted).
 * The reason is the 16-bit IP ID (RFC 4963, 2): every ID held unverified
 * is one under which a real datagram from that POP meets a stranger's
 * fragment and is dropped with it.  64 keep that chance under 0.1 % per
 * datagram, where memory alone (4 MiB of 8-byte fragments) would hold
 * tens of thousands and lose a quarter of the real ones.  Real fragments
 * come in order (Linux sends the first first) or within milliseconds, and
 * under a flood of 10,000 a second an unverified datagram still has 6 ms.
 * An unverified fragment may evict only unverified datagrams; a verified
 * one evicts unverified ones first, then the oldest verified.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>

#include "bridge.h"

#define NBUCKETS 4096u         /* hash chains (power of 2) */
#define MAX_FRAGS 64           /* per datagram; more is reasm_bad */
#define MAX_DGRAM 65535        /* RFC 791: the total length field */
#define MAX_UNVERIFIED 64      /* datagrams without their first fragment */

struct frag {                  /* one fragment's data, as received */
    struct frag *next;         /* by offset */
    uint16_t start, len;
    uint8_t data[];
};

struct dgram {
    struct dgram *hnext;       /* hash chain */
    struct dgram *older, *newer;       /* every datagram, by age */
    struct dgram *uolder, *unewer;     /* the unverified ones, by age */
    uint64_t born;
    uint32_t src, dst;
    uint16_t id;
    uint8_t proto;
    uint32_t bucket;
    size_t ihl;                /* 0 until the first fragment came */
    size_t end;                /* data length, once the last fragment came */
    size_t maxend;             /* the furthest byte any fragment reaches */
    size_t have;               /* data bytes held */
    size_t charged;            /* what this datagram counts for in memory */
    uint16_t nfrags;
    struct frag *frags;
    uint8_t hdr[60];           /* the first fragment's header */
};

struct list {
    struct dgram *oldest, *newest;
};

struct reasm {
    struct dgram *bucket[NBUCKETS];
    struct list all;           /* linked through older/newer */
    struct list unv;           /* linked through uolder/unewer */
    uint32_t nunverified;
    size_t memory, unv_memory, limit;
    uint64_t timeout_ns;
    uint64_t seed;
};

/* What a heap block of n bytes takes (glibc: n plus its 8-byte size field,
 * rounded up to 16, at least 32): memory is charged for what is held. */
static size_t truesize(size_t n)
{
    size_t t = (n + 8 + 15) & ~(size_t)15;

    return t < 32 ? 32 : t;
}

#define DGRAM_COST truesize(sizeof(struct dgram))
#define FRAG_COST(n) truesize(sizeof(struct frag) + (n))

struct reasm *reasm_new(uint32_t memory, uint32_t timeout_ms)
{
    struct reasm *r = calloc(1, sizeof(*r));
    struct timespec ts;

    if (!r)
        return NULL;
    r->limit = memory;
    r->timeout_ns = (uint64_t)timeout_ms * 1000000ull;
    /* Chains an attacker cannot aim at: the hash is keyed. */
    if (getrandom(&r->seed, sizeof(r->seed), GRND_NONBLOCK) != sizeof(r->seed)) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        r->seed = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)ts.tv_sec;
    }
    return r;
}

/* A smaller bound takes effect as fragments come: make_room() evicts down
 * to it before anything more is kept. */
void reasm_limits(struct reasm *r, uint32_t memory, uint32_t timeout_ms)
{
    r->limit = memory;
    r->timeout_ns = (uint64_t)timeout_ms * 1000000ull;
}

static void unlink_all(struct reasm *r, struct dgram *d)
{
    *(d->older ? &d->older->newer : &r->all.oldest) = d->newer;
    *(d->newer ? &d->newer->older : &r->all.newest) = d->older;
}

static void unlink_unverified(struct reasm *r, struct dgram *d)
{
    *(d->uolder ? &d->uolder->unewer : &r->unv.oldest) = d->unewer;
    *(d->unewer ? &d->unewer->uolder : &r->unv.newest) = d->uolder;
    d->uolder = d->unewer = NULL;
    r->nunverified--;
    r->unv_memory -= d->charged;
}

static void drop_dgram(struct reasm *r, struct tpb_tunnel_counters *tc,
                       struct dgram *d, int reason)
{
    struct dgram **pp = &r->bucket[d->bucket];
    struct frag *f, *next;

    if (reason >= 0)
        tc->drop[reason]++;
    while (*pp != d)
        pp = &(*pp)->hnext;
    *pp = d->hnext;
    unlink_all(r, d);
    if (!d->ihl)
        unlink_unverified(r, d);
    r->memory -= d->charged;
    for (f = d->frags; f; f = next) {
        next = f->next;
        free(f);
    }
    free(d);
    tc->reasm_memory = r->memory;
}

void reasm_free(struct reasm *r)
{
    struct dgram *d, *next;
    struct frag *f, *fn;

    for (d = r->all.oldest; d; d = next) {
        next = d->newer;
        for (f = d->frags; f; f = fn) {
            fn = f->next;
            free(f);
        }
        free(d);
    }
    free(r);
}

/* 1. ------------------------------------------------------------------ */

static uint32_t hash(const struct reasm *r, uint32_t src, uint32_t dst,
                     uint16_t id, uint8_t proto)
{
    uint64_t x = ((uint64_t)src << 32 | dst) ^ r->seed;

    x ^= ((uint64_t)id << 8 | proto) * 0x9e3779b97f4a7c15ull;
    x ^= x >> 30;                        /* splitmix64's finalizer */
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return (uint32_t)x & (NBUCKETS - 1);
}

static struct dgram *find(struct reasm *r, const uint8_t *ip, uint32_t *bucket)
{
    uint32_t src = rd32(ip + 12), dst = rd32(ip + 16);
    uint16_t id = rd16(ip + 4);
    struct dgram *d;

    *bucket = hash(r, src, dst, id, ip[9]);
    for (d = r->bucket[*bucket]; d; d = d->hnext)
        if (d->src == src && d->dst == dst && d->id == id && d->proto == ip[9])
            return d;
    return NULL;
}

static int check(const struct dgram *d, size_t start, size_t end, int last,
                 size_t ihl);
static int make_room(struct reasm *r, struct tpb_tunnel_counters *tc,
                     const struct dgram *d, size_t cost, int verified);
static struct dgram *store(struct reasm *r, struct dgram *d, uint32_t bucket,
                           const uint8_t *ip, size_t start, size_t dlen,
                           int last, uint64_t now_ns);
static uint8_t *complete(struct reasm *r, struct tpb_tunnel_counters *tc,
                         struct dgram *d, struct txq *q, size_t *out_len);

uint8_t *reasm_add(struct reasm *r, struct tpb_tunnel_counters *tc,
                   struct txq *q, const uint8_t *ip, size_t len,
                   uint64_t now_ns, size_t *out_len)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    uint16_t frag = rd16(ip + 6);
    size_t start = (size_t)(frag & IP_OFFMASK) * 8, dlen = len - ihl;
    size_t end = start + dlen, cost;
    int last = !(frag & IP_MF), rc, verified;
    uint32_t bucket;
    struct dgram *d, *kept;

    tc->reasm_fragments++;
    /* RFC 791: all but the last fragment carry a multiple of 8 bytes. */
    if (end + ihl > MAX_DGRAM || (!last && (dlen & 7)) || !dlen) {
        tc->drop[TPB_DROP_REASM_BAD]++;
        return NULL;
    }
    d = find(r, ip, &bucket);
    if (d) {
        rc = check(d, start, end, last, start == 0 ? ihl : 0);
        if (rc == TPB_DROP_REASM_DUPLICATE) {
            tc->drop[rc]++;
            return NULL;
        }
        if (rc) {
            drop_dgram(r, tc, d, rc);
            return NULL;
        }
    }
    verified = start == 0 || (d && d->ihl);
    cost = FRAG_COST(dlen) + (d ? 0 : DGRAM_COST);
    if (make_room(r, tc, d, cost, verified)) {
        /* A datagram that cannot grow cannot complete: it goes too. */
        if (d)
            drop_dgram(r, tc, d, TPB_DROP_REASM_MEMORY);
        else
            tc->drop[TPB_DROP_REASM_MEMORY]++;
        return NULL;
    }
    /* A new unverified datagram takes the place of the oldest one. */
    if (!d && !verified && r->nunverified >= MAX_UNVERIFIED)
        drop_dgram(r, tc, r->unv.oldest, TPB_DROP_REASM_EVICTED);
    kept = store(r, d, bucket, ip, start, dlen, last, now_ns);
    if (!kept) {                         /* out of heap */
        if (d)
            drop_dgram(r, tc, d, TPB_DROP_REASM_MEMORY);
        else
            tc->drop[TPB_DROP_REASM_MEMORY]++;
        return NULL;
    }
    tc->reasm_memory = r->memory;
    if (r->memory > tc->reasm_memory_peak)
        tc->reasm_memory_peak = r->memory;
#ifdef TPB_DEBUG
    if (reasm_memory_held(r) != r->memory)
        abort();
#endif
    if (kept->ihl && kept->end && kept->have == kept->end)
        return complete(r, tc, kept, q, out_len);
    return NULL;
}

/* 2. ------------------------------------------------------------------ */

/* ihl: this fragment's header length if it is the first one, else 0. */
static int check(const struct dgram *d, size_t start, size_t end, int last,
                 size_t ihl)
{
    const struct frag *f;
    size_t hlen = ihl ? ihl : d->ihl ? d->ihl : 20;

    if (last && d->end && d->end != end)
        return TPB_DROP_REASM_BAD;            /* two different ends */
    if (d->end && end > d->end)
        return TPB_DROP_REASM_BAD;            /* data past the end */
    for (f = d->frags; f && f->start < end; f = f->next) {
        if (start >= (size_t)f->start + f->len)
            continue;
        if (start == f->start && end == (size_t)f->start + f->len)
            return TPB_DROP_REASM_DUPLICATE;
        return TPB_DROP_REASM_OVERLAP;
    }
    if (last && d->maxend > end)
        return TPB_DROP_REASM_BAD;            /* data past this end */
    /* With the first fragment's header the datagram must stay within
     * 65535 bytes (Linux: "Oversized IP packet"). */
    if (hlen + (end > d->maxend ? end : d->maxend) > MAX_DGRAM)
        return TPB_DROP_REASM_BAD;
    if (d->nfrags == MAX_FRAGS)
        return TPB_DROP_REASM_BAD;
    return 0;
}

/* 3. ------------------------------------------------------------------ */

/* Evicts until `cost` more bytes fit the bound, never d itself; returns -1
 * (having evicted nothing) if that cannot be done: what may not be evicted
 * — d, and for an unverified fragment every verified datagram — is too
 * much already. */
static int make_room(struct reasm *r, struct tpb_tunnel_counters *tc,
                     const struct dgram *d, size_t cost, int verified)
{
    size_t stays = d ? d->charged : 0;   /* d is unverified if !verified */
    struct dgram *v;

    if (!verified)
        stays += r->memory - r->unv_memory;
    if (stays + cost > r->limit)
        return -1;
    while (r->memory + cost > r->limit) {
        v = r->unv.oldest;
        if (v && v == d)
            v = v->unewer;
        if (!v) {
            v = r->all.oldest;           /* not NULL: stays fits */
            if (v == d)
                v = v->newer;
        }
        drop_dgram(r, tc, v, TPB_DROP_REASM_EVICTED);
    }
    return 0;
}

/* 4. ------------------------------------------------------------------ */

static void charge(struct reasm *r, struct dgram *d, size_t cost)
{
    d->charged += cost;
    r->memory += cost;
    if (!d->ihl)
        r->unv_memory += cost;
}

static struct dgram *new_dgram(struct reasm *r, uint32_t bucket,
                               const uint8_t *ip, uint64_t now_ns)
{
    struct dgram *d = calloc(1, sizeof(*d));

    if (!d)
        return NULL;
    d->src = rd32(ip + 12);
    d->dst = rd32(ip + 16);
    d->id = rd16(ip + 4);
    d->proto = ip[9];
    d->born = now_ns;
    d->bucket = bucket;
    d->hnext = r->bucket[bucket];
    r->bucket[bucket] = d;
    d->older = r->all.newest;
    *(d->older ? &d->older->newer : &r->all.oldest) = d;
    r->all.newest = d;
    d->uolder = r->unv.newest;         /* unverified until its first fragment */
    *(d->uolder ? &d->uolder->unewer : &r->unv.oldest) = d;
    r->unv.newest = d;
    r->nunverified++;
    charge(r, d, DGRAM_COST);
    return d;
}

static struct dgram *store(struct reasm *r, struct dgram *d, uint32_t bucket,
                           const uint8_t *ip, size_t start, size_t dlen,
                           int last, uint64_t now_ns)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    struct frag *f = malloc(sizeof(*f) + dlen), **pp;

    if (!f)
        return NULL;
    if (!d && !(d = new_dgram(r, bucket, ip, now_ns))) {
        free(f);
        return NULL;
    }
    f->start = (uint16_t)start;
    f->len = (uint16_t)dlen;
    memcpy(f->data, ip + ihl, dlen);
    for (pp = &d->frags; *pp && (*pp)->start < start; pp = &(*pp)->next)
        ;
    f->next = *pp;
    *pp = f;
    d->nfrags++;
    d->have += dlen;
    if (start + dlen > d->maxend)
        d->maxend = start + dlen;
    if (last)
        d->end = start + dlen;
    if (start == 0) {                    /* verified from now on */
        unlink_unverified(r, d);
        memcpy(d->hdr, ip, ihl);
        d->ihl = ihl;
    }
    charge(r, d, FRAG_COST(dlen));
    return d;
}

/* 5. ------------------------------------------------------------------ */

static uint8_t *complete(struct reasm *r, struct tpb_tunnel_counters *tc,
                         struct dgram *d, struct txq *q, size_t *out_len)
{
    size_t tot = d->ihl + d->end;        /* <= 65535: check() */
    uint8_t *out = txq_alloc(q, tot);
    const struct frag *f;

    if (out) {
        memcpy(out, d->hdr, d->ihl);
        wr16(out + 2, (uint16_t)tot);
        wr16(out + 6, 0);
        ip4_set_csum(out);
        for (f = d->frags; f; f = f->next)
            memcpy(out + d->ihl + f->start, f->data, f->len);
        *out_len = tot;
        tc->reasm_done++;
    }
    drop_dgram(r, tc, d, out ? -1 : TPB_DROP_REASM_MEMORY);
    return out;
}

/* 6. ------------------------------------------------------------------ */

void reasm_expire(struct reasm *r, struct tpb_tunnel_counters *tc,
                  uint64_t now_ns)
{
    /* Oldest first: the first one not yet due ends the walk. */
    while (r->all.oldest && r->all.oldest->born + r->timeout_ns <= now_ns)
        drop_dgram(r, tc, r->all.oldest, TPB_DROP_REASM_TIMEOUT);
}

void reasm_forget(struct reasm *r, struct tpb_tunnel_counters *tc,
                  const uint8_t *ip)
{
    uint32_t bucket;
    struct dgram *d = find(r, ip, &bucket);

    if (d)
        drop_dgram(r, tc, d, -1);
}

size_t reasm_memory_held(const struct reasm *r)
{
    const struct dgram *d;
    const struct frag *f;
    size_t sum = 0;

    for (d = r->all.oldest; d; d = d->newer) {
        sum += DGRAM_COST;
        for (f = d->frags; f; f = f->next)
            sum += FRAG_COST(f->len);
    }
    return sum;
}

#ifdef TPB_FUZZ
size_t reasm_datagrams(const struct reasm *r)
{
    const struct dgram *d;
    size_t n = 0;

    for (d = r->all.oldest; d; d = d->newer)
        n++;
    return n;
}
#endif
