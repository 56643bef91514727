/* pop_learn.c — `tpb pop`'s routing toward the bridges (stages 6. and 9.
 * of pop.c's list): configured prefixes, the longest first, then the
 * table of inner sources learned from what the bridges sent, each entry
 * with an expiry, a budget of entries per peer, martians and sources
 * another peer owns never learned.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/udp.h>
#include <linux/virtio_net.h>

#include "proto.h"
#include "tpb.h"
#include "pop.h"

/* 6. ------------------------------------------------------------------ */

static int prefix_match(const uint8_t *a, const uint8_t *p, unsigned len)
{
    unsigned full = len / 8, rest = len % 8;

    if (memcmp(a, p, full))
        return 0;
    return !rest || ((a[full] ^ p[full]) & (uint8_t)(0xff << (8 - rest))) == 0;
}

struct peer *by_prefix(struct tpb_pop *pop, const uint8_t dst[16])
{
    uint32_t i, best = 0;
    struct peer *p = NULL;

    for (i = 0; i < pop->nprefixes; i++)
        if (pop->prefixes[i].len >= best &&
            prefix_match(dst, pop->prefixes[i].addr, pop->prefixes[i].len)) {
            best = pop->prefixes[i].len;
            p = &pop->peers[pop->prefixes[i].peer];
        }
    return p;
}


static uint32_t addr_hash(const uint8_t a[16])
{
    uint32_t h = 2166136261u;
    int i;

    for (i = 0; i < 16; i++)
        h = (h ^ a[i]) * 16777619u;
    return h;
}

/* Sources that are never learned, and never written to the TUN device:
 * no router forwards a packet from them (RFC 1812 5.3.7: 0/8, 127/8,
 * class D and E, 255.255.255.255; RFC 3927 2.7: 169.254/16; RFC 4291:
 * 2.7 no multicast source, 2.5.2 the unspecified ::, 2.5.3 ::1, 2.5.6
 * fe80::/10 (whose scope is one link, and every site is another one),
 * 2.5.5.2 ::ffff:0:0/96 on the wire, which would also alias an IPv4
 * entry here) and the POP's own address (Linux drops it as a martian
 * source after the TUN write, where no counter sees it). */
static int martian(const struct tpb_pop *pop, const uint8_t a[16], int proto)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const uint8_t zero[15];

    if (proto == ETYPE_IPV4)
        return a[12] == 0 || a[12] == 127 || a[12] >= 224 ||
               (a[12] == 169 && a[13] == 254) || rd32(a + 12) == pop->local;
    return a[0] == 0xff || (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) ||
           !memcmp(a, mapped, 12) || (!memcmp(a, zero, 15) && a[15] <= 1);
}

static uint32_t learn_budget(uint32_t npeers)
{
    uint32_t most = LEARN_SLOTS_MAX / 2 / (npeers ? npeers : 1);

    return most < LEARN_PER_PEER ? most : LEARN_PER_PEER;
}

/* A table for npeers: twice the entries they may hold, a power of two. */
int learn_alloc(struct learn_table *t, uint32_t npeers)
{
    uint64_t want;
    uint32_t slots = LEARN_SLOTS_MIN;

    t->budget = learn_budget(npeers);
    want = 2ull * npeers * t->budget;
    while (slots < want && slots < LEARN_SLOTS_MAX)
        slots <<= 1;
    t->e = calloc(slots, sizeof(*t->e));
    t->mask = slots - 1;
    return t->e ? 0 : -1;
}

/* Where a's entry is (live or not), or NULL; *free_slot: the first slot
 * of its window an entry could take (free, or expired), or NULL. */
struct learned *learn_find(const struct learn_table *t, const uint8_t a[16],
                           uint64_t now, struct learned **free_slot)
{
    uint32_t h = addr_hash(a), i;
    struct learned *e, *found = NULL;

    *free_slot = NULL;
    for (i = 0; i < LEARN_PROBE; i++) {
        e = &t->e[(h + i) & t->mask];
        if (!found && e->used && !memcmp(e->addr, a, 16))
            found = e;
        if (!*free_slot && e->expires <= now)
            *free_slot = e;
        if (!e->used || (found && *free_slot))
            break;
    }
    return found;
}

/* a's entry, if it is live. */
static struct learned *learn_live(const struct tpb_pop *pop, const uint8_t a[16])
{
    struct learned *slot, *e = learn_find(&pop->learn, a, pop->now_ns, &slot);

    return e && e->expires > pop->now_ns ? e : NULL;
}

/* Takes slot e for a behind peer (an index of peers[]); e is free or
 * expired (its old owner gives it up) or already a's. */
void learn_put(struct learned *e, struct peer *peers, const uint8_t a[16],
                      uint32_t peer, uint64_t expires)
{
    if (e->expires && (e->peer != peer || memcmp(e->addr, a, 16))) {
        peers[e->peer].learned--;
        e->expires = 0;
    }
    if (!e->expires)
        peers[peer].learned++;
    memcpy(e->addr, a, 16);
    e->peer = peer;
    e->used = 1;
    e->expires = expires;
}

/* Frees every expired entry, so that a peer's budget counts live ones;
 * at most once a second (it reads the whole table). */
static void learn_reclaim(struct tpb_pop *pop)
{
    uint32_t i;
    struct learned *e;

    if (pop->reclaim_ns && pop->now_ns - pop->reclaim_ns < NSEC)
        return;
    pop->reclaim_ns = pop->now_ns;
    for (i = 0; i <= pop->learn.mask; i++) {
        e = &pop->learn.e[i];
        if (e->expires && e->expires <= pop->now_ns) {
            pop->peers[e->peer].learned--;
            e->expires = 0;
        }
    }
}

/* 6. Whether peer p may send from inner source a (proto: its family),
 * before the packet goes anywhere.  0, with *slot the entry to make or
 * refresh once the packet is delivered (NULL: nothing to learn), or the
 * drop reason:
 *   inner_martian  a is a source no router forwards (martian());
 *   source_owned   a is routed to another peer, by its configured prefix
 *                  or its live learned entry: a fresh entry never moves,
 *                  and the packet is dropped, since its replies would go
 *                  to that other peer (RFC 3704 2.2, strict reverse path
 *                  forwarding: a peer is believed only for the sources
 *                  the POP would route back to it; BCP 38);
 *   learn_full     p holds its budget of entries, or no slot is free near
 *                  a's hash: the reply could not find p either. */
int learn_check(struct tpb_pop *pop, struct peer *p, const uint8_t a[16],
                int proto, struct learned **slot)
{
    uint32_t idx = (uint32_t)(p - pop->peers);
    struct peer *owner;
    struct learned *e, *free_slot;

    *slot = NULL;
    if (martian(pop, a, proto))
        return TPB_DROP_INNER_MARTIAN;
    owner = by_prefix(pop, a);
    if (owner)                  /* configured: nothing to learn */
        return owner == p ? 0 : TPB_DROP_SOURCE_OWNED;
    e = learn_find(&pop->learn, a, pop->now_ns, &free_slot);
    if (e && e->expires > pop->now_ns) {
        if (e->peer != idx)
            return TPB_DROP_SOURCE_OWNED;
        *slot = e;              /* refreshed */
        return 0;
    }
    if (p->learned >= pop->learn.budget) {
        learn_reclaim(pop);
        e = learn_find(&pop->learn, a, pop->now_ns, &free_slot);
    }
    if (p->learned >= pop->learn.budget || !free_slot)
        return TPB_DROP_LEARN_FULL;
    *slot = e ? e : free_slot;  /* a's own expired entry, else a free one */
    return 0;
}

/* 9. ------------------------------------------------------------------ */

/* Configured prefixes win: a bridge cannot draw another site's traffic to
 * itself by sending from that site's addresses.  Learned entries serve
 * addresses no prefix covers. */
struct peer *route(struct tpb_pop *pop, const uint8_t dst[16])
{
    struct peer *p = by_prefix(pop, dst);
    struct learned *e;

    if (p)
        return p;
    e = learn_live(pop, dst);
    return e ? &pop->peers[e->peer] : NULL;
}

