/* reasm.c — outer IPv4 fragments of GRE from the POP, put back together
 * before decapsulation (RFC 791 section 3.2, RFC 815's hole idea kept as a
 * list of received ranges).
 *
 *   1. reasm_add()     find or start the datagram (src, dst, id, protocol);
 *   2. check()         fragment consistent with what came before: exact
 *                      duplicate -> that fragment dropped; any other
 *                      overlap, a second different end, data past the end
 *                      -> the whole datagram dropped (as Linux since 4.19
 *                      and RFC 5722 for IPv6: overlaps are attacks);
 *   3. store()         copy the data in, growing the buffer within the
 *                      memory bound (default 4 MiB, Linux's
 *                      ipfrag_high_thresh); over it -> datagram dropped;
 *   4. complete()      all ranges present: one datagram, into the tx arena;
 *   5. reasm_expire()  datagrams older than the timeout (30 s, as Linux's
 *                      ipfrag_time) are dropped and counted.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "bridge.h"

#define SLOTS 256
#define MAX_RANGES 64
#define MAX_DGRAM 65535

struct dgram {
    int used;
    uint32_t src, dst;
    uint16_t id;
    uint8_t proto;
    uint64_t deadline;
    uint8_t hdr[60];           /* the first fragment's header */
    size_t ihl;                /* 0 until the first fragment came */
    size_t end;                /* data length, once the last fragment came */
    size_t have;               /* bytes received */
    uint8_t *buf;
    size_t cap;
    uint16_t nr;
    struct { uint16_t start, end; } r[MAX_RANGES];
};

struct reasm {
    struct dgram d[SLOTS];
    size_t memory, limit;
    uint64_t timeout_ns;
};

struct reasm *reasm_new(uint32_t memory, uint32_t timeout_ms)
{
    struct reasm *r = calloc(1, sizeof(*r));

    if (r) {
        r->limit = memory;
        r->timeout_ns = (uint64_t)timeout_ms * 1000000ull;
    }
    return r;
}

void reasm_limits(struct reasm *r, uint32_t memory, uint32_t timeout_ms)
{
    r->limit = memory;
    r->timeout_ns = (uint64_t)timeout_ms * 1000000ull;
}

static void drop_dgram(struct reasm *r, struct tpb_tunnel_counters *tc,
                       struct dgram *d, int reason)
{
    if (reason >= 0)
        tc->drop[reason]++;
    r->memory -= d->cap;
    free(d->buf);
    memset(d, 0, sizeof(*d));
    tc->reasm_memory = r->memory;
}

void reasm_free(struct reasm *r)
{
    int i;

    for (i = 0; i < SLOTS; i++)
        free(r->d[i].buf);
    free(r);
}

/* 1. ------------------------------------------------------------------ */

static struct dgram *find(struct reasm *r, const uint8_t *ip, int create)
{
    uint32_t src = rd32(ip + 12), dst = rd32(ip + 16);
    uint16_t id = rd16(ip + 4);
    uint32_t h = (src ^ dst ^ id ^ ip[9]) * 2654435761u, i;
    struct dgram *free_slot = NULL, *d;

    for (i = 0; i < SLOTS; i++) {
        d = &r->d[(h + i) % SLOTS];
        if (!d->used) {
            if (!free_slot)
                free_slot = d;
            continue;
        }
        if (d->src == src && d->dst == dst && d->id == id && d->proto == ip[9])
            return d;
    }
    if (!create || !free_slot)
        return NULL;
    memset(free_slot, 0, sizeof(*free_slot));
    free_slot->used = 1;
    free_slot->src = src;
    free_slot->dst = dst;
    free_slot->id = id;
    free_slot->proto = ip[9];
    return free_slot;
}

static int check(struct dgram *d, size_t start, size_t end, int last);
static int store(struct reasm *r, struct dgram *d, size_t start,
                 const uint8_t *data, size_t len);
static uint8_t *complete(struct reasm *r, struct tpb_tunnel_counters *tc,
                         struct dgram *d, struct txq *q, size_t *out_len);

uint8_t *reasm_add(struct reasm *r, struct tpb_tunnel_counters *tc,
                   struct txq *q, const uint8_t *ip, size_t len,
                   uint64_t now_ns, size_t *out_len)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
    uint16_t frag = rd16(ip + 6);
    size_t start = (size_t)(frag & IP_OFFMASK) * 8, dlen = len - ihl;
    size_t end = start + dlen;
    int last = !(frag & IP_MF), rc;
    struct dgram *d;

    tc->reasm_fragments++;
    /* RFC 791: all but the last fragment carry a multiple of 8 bytes. */
    if (end + ihl > MAX_DGRAM || (!last && (dlen & 7)) || !dlen) {
        tc->drop[TPB_DROP_REASM_BAD]++;
        return NULL;
    }
    d = find(r, ip, 1);
    if (!d) {
        tc->drop[TPB_DROP_REASM_MEMORY]++;   /* table full */
        return NULL;
    }
    if (!d->deadline)
        d->deadline = now_ns + r->timeout_ns;
    rc = check(d, start, end, last);
    if (rc == TPB_DROP_REASM_DUPLICATE) {
        tc->drop[rc]++;
        return NULL;
    }
    if (rc) {
        drop_dgram(r, tc, d, rc);
        return NULL;
    }
    if (store(r, d, start, ip + ihl, dlen)) {
        drop_dgram(r, tc, d, TPB_DROP_REASM_MEMORY);
        return NULL;
    }
    tc->reasm_memory = r->memory;
    if (r->memory > tc->reasm_memory_peak)
        tc->reasm_memory_peak = r->memory;
    if (last)
        d->end = end;
    if (start == 0) {
        memcpy(d->hdr, ip, ihl);
        d->ihl = ihl;
    }
    if (d->ihl && d->end && d->have == d->end)
        return complete(r, tc, d, q, out_len);
    return NULL;
}

/* 2. ------------------------------------------------------------------ */

static int check(struct dgram *d, size_t start, size_t end, int last)
{
    uint16_t i;

    if (last && d->end && d->end != end)
        return TPB_DROP_REASM_BAD;            /* two different ends */
    if (d->end && end > d->end)
        return TPB_DROP_REASM_BAD;            /* data past the end */
    for (i = 0; i < d->nr; i++) {
        if (start >= d->r[i].end || end <= d->r[i].start)
            continue;
        if (start == d->r[i].start && end == d->r[i].end)
            return TPB_DROP_REASM_DUPLICATE;
        return TPB_DROP_REASM_OVERLAP;
    }
    if (last)
        for (i = 0; i < d->nr; i++)
            if (d->r[i].end > end)
                return TPB_DROP_REASM_BAD;
    if (d->nr == MAX_RANGES)
        return TPB_DROP_REASM_BAD;
    return 0;
}

/* 3. ------------------------------------------------------------------ */

static int store(struct reasm *r, struct dgram *d, size_t start,
                 const uint8_t *data, size_t len)
{
    size_t need = start + len, cap;
    uint8_t *nb;

    if (need > d->cap) {
        /* Grow in 2 KiB steps: memory is charged for what is held. */
        cap = (need + 2047) & ~(size_t)2047;
        if (r->memory - d->cap + cap > r->limit)
            return -1;
        nb = realloc(d->buf, cap);
        if (!nb)
            return -1;
        r->memory += cap - d->cap;
        d->buf = nb;
        d->cap = cap;
    }
    memcpy(d->buf + start, data, len);
    d->r[d->nr].start = (uint16_t)start;
    d->r[d->nr].end = (uint16_t)need;
    d->nr++;
    d->have += len;
    return 0;
}

/* 4. ------------------------------------------------------------------ */

static uint8_t *complete(struct reasm *r, struct tpb_tunnel_counters *tc,
                         struct dgram *d, struct txq *q, size_t *out_len)
{
    size_t tot = d->ihl + d->end;
    uint8_t *out = txq_alloc(q, tot);

    if (out) {
        memcpy(out, d->hdr, d->ihl);
        wr16(out + 2, (uint16_t)tot);
        wr16(out + 6, 0);
        ip4_set_csum(out);
        memcpy(out + d->ihl, d->buf, d->end);
        *out_len = tot;
        tc->reasm_done++;
    }
    drop_dgram(r, tc, d, out ? -1 : TPB_DROP_REASM_MEMORY);
    return out;
}

/* 5. ------------------------------------------------------------------ */

void reasm_expire(struct reasm *r, struct tpb_tunnel_counters *tc,
                  uint64_t now_ns)
{
    int i;

    if (!r->memory)
        return;
    for (i = 0; i < SLOTS; i++)
        if (r->d[i].used && r->d[i].deadline <= now_ns)
            drop_dgram(r, tc, &r->d[i], TPB_DROP_REASM_TIMEOUT);
}

#ifdef TPB_FUZZ
size_t reasm_memory_held(const struct reasm *r)
{
    size_t held = 0;
    int i;

    for (i = 0; i < SLOTS; i++)
        if (r->d[i].used)
            held += r->d[i].cap;
    return held;
}
#endif
