/* pop_conf.c — `tpb pop`'s configuration: checked (check_config), built
 * beside the running one (reload_build), what a kept peer keeps (carry),
 * and swapped in by the loop at the start of a pass (take_reload, apply)
 * under the lock the readers take.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
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

/* ---- configuration: checked, built, swapped in ---------------------- */

static void gre_side(struct peer *p, uint32_t local)
{
    const struct tpb_pop_peer_config *c = &p->cfg;

    gre_setup(&p->tx, &p->rx, local, c->addr, c->key, c->has_key, c->csum,
              c->seq, c->ttl, c->tos);
    p->sa.sin_family = AF_INET;
    p->sa.sin_addr.s_addr = htonl(c->addr);
    /* GRE-in-UDP to a known address: to port 4754, as RFC 8086 and Linux's
     * FOU receive it (from the POP's port 4754: one socket for all).  A
     * NAT'd peer's endpoint is learned (from_peer). */
    p->sa.sin_port = c->encap == TPB_ENCAP_UDP && c->addr ? htons(GRE_UDP_PORT) : 0;
}

void peer_init(struct peer *p, const struct tpb_pop_peer_config *c,
               uint32_t local)
{
    p->cfg = *c;
    gre_side(p, local);
    p->ka.up = !c->keepalive_ms;    /* without keepalives a peer is up */
    p->ka.ip_id = ka_first_id();    /* a kept peer's goes on (carry()) */
}

static const char *ip4_text(uint32_t a, char buf[INET_ADDRSTRLEN])
{
    uint32_t n = htonl(a);

    return inet_ntop(AF_INET, &n, buf, INET_ADDRSTRLEN);
}

/* Everything tpb_pop_open() and tpb_pop_reconfigure() rely on: the peer
 * count, one peer per address, keepalive retries, every prefix behind a
 * peer of the list.  -EINVAL and one line in err, or 0. */
int check_config(const struct tpb_pop_config *cfg,
                 const struct tpb_pop_peer_config *peers,
                 const struct tpb_pop_prefix *prefixes,
                 char *err, size_t errlen)
{
    char a[INET_ADDRSTRLEN];
    uint32_t i, j;

    if (cfg->npeers < 1 || cfg->npeers > MAX_PEERS || !peers) {
        snprintf(err, errlen, "%u peers: from 1 to %u", cfg->npeers, MAX_PEERS);
        return -EINVAL;
    }
    if (cfg->nprefixes && !prefixes) {
        snprintf(err, errlen, "%u prefixes but no list", cfg->nprefixes);
        return -EINVAL;
    }
    for (i = 0; i < cfg->npeers; i++) {
        if (peers[i].encap != TPB_ENCAP_GRE && peers[i].encap != TPB_ENCAP_UDP) {
            snprintf(err, errlen, "peer %u: unknown encapsulation %u", i, peers[i].encap);
            return -EINVAL;
        }
        if (!peers[i].addr) {
            /* NAT'd: nothing but the key says which bridge a packet is
             * from, and the POP's own keepalives would need the bridge's
             * address inside them */
            if (peers[i].encap != TPB_ENCAP_UDP || !peers[i].has_key) {
                snprintf(err, errlen, "peer %u: a peer behind NAT (any) needs udp and a key", i);
                return -EINVAL;
            }
            if (peers[i].keepalive_ms) {
                snprintf(err, errlen, "peer %u: a peer behind NAT (any) takes no keepalives "
                         "from the POP: its bridge's keep the NAT open", i);
                return -EINVAL;
            }
        }
        for (j = 0; j < i; j++) {
            if (peers[i].addr && peers[j].addr == peers[i].addr) {
                snprintf(err, errlen, "peer %s is given twice", ip4_text(peers[i].addr, a));
                return -EINVAL;
            }
            if (!peers[i].addr && !peers[j].addr && peers[j].key == peers[i].key) {
                snprintf(err, errlen, "peers behind NAT (any) with the same key %u: "
                         "the key is what tells them apart", peers[i].key);
                return -EINVAL;
            }
        }
        if (peers[i].keepalive_ms && !peers[i].keepalive_retries) {
            snprintf(err, errlen, "peer %s: keepalives need at least one retry",
                     ip4_text(peers[i].addr, a));
            return -EINVAL;
        }
    }
    for (i = 0; i < cfg->nprefixes; i++)
        if (prefixes[i].peer >= cfg->npeers || prefixes[i].len > 128) {
            snprintf(err, errlen, "prefix %u: /%u behind peer %u of %u", i,
                     prefixes[i].len, prefixes[i].peer, cfg->npeers);
            return -EINVAL;
        }
    return 0;
}

static void reload_free(struct reload *r)
{
    if (!r)
        return;
    free(r->peers);
    free(r->prefixes);
    free(r->from);
    free(r->to);
    free(r->learn.e);
    free(r);
}

/* The new peer array, built beside the running one; which new peer is
 * which old one (by address).  pop->peers cannot change meanwhile: only
 * a reconfigure call swaps it, and the caller holds reload_lock. */
static struct reload *reload_build(struct tpb_pop *pop,
                                   const struct tpb_pop_config *cfg,
                                   const struct tpb_pop_peer_config *peers,
                                   const struct tpb_pop_prefix *prefixes)
{
    struct reload *r = calloc(1, sizeof(*r));
    uint32_t i, j;

    if (!r)
        return NULL;
    r->npeers = cfg->npeers;
    r->nprefixes = cfg->nprefixes;
    r->peers = calloc(cfg->npeers + 1, sizeof(*r->peers));
    r->prefixes = calloc(cfg->nprefixes + 1, sizeof(*r->prefixes));
    r->from = calloc(cfg->npeers + 1, sizeof(*r->from));
    r->to = calloc(pop->npeers + 1, sizeof(*r->to));
    if (!r->peers || !r->prefixes || !r->from || !r->to ||
        learn_alloc(&r->learn, cfg->npeers)) {
        reload_free(r);
        return NULL;
    }
    for (j = 0; j < pop->npeers; j++)
        r->to[j] = NO_PEER;
    for (i = 0; i < cfg->npeers; i++) {
        peer_init(&r->peers[i], &peers[i], pop->local);
        r->from[i] = NO_PEER;
        for (j = 0; j < pop->npeers; j++)
            if (pop->peers[j].cfg.addr == peers[i].addr &&
                (peers[i].addr || pop->peers[j].cfg.key == peers[i].key)) {
                r->from[i] = j;
                r->to[j] = i;
                break;
            }
    }
    memcpy(r->prefixes, prefixes, cfg->nprefixes * sizeof(*prefixes));
    r->batch = cfg->batch && cfg->batch <= MAX_BATCH ? cfg->batch : MAX_BATCH;
    r->tun_mtu = cfg->tun_mtu ? cfg->tun_mtu : 1500;
    r->learn_ns = (uint64_t)cfg->learn_timeout_s * NSEC;
    return r;
}

/* What a peer kept by address keeps: its counters and keepalive state;
 * its sequence windows only while key and seq settings stay the same
 * (RFC 2890: sequence numbers belong to the flow the key identifies;
 * another key, another flow, numbered afresh). */
static void carry(struct peer *n, const struct peer *o)
{
    const struct tpb_pop_peer_config *a = &o->cfg, *b = &n->cfg;

    n->c = o->c;
    n->ka = o->ka;
    if (!b->addr && b->encap == TPB_ENCAP_UDP)
        n->sa = o->sa;                     /* a NAT'd peer stays where it was */
    if (a->has_key == b->has_key && a->key == b->key && a->seq == b->seq) {
        n->rx.seq_started = o->rx.seq_started;
        n->rx.next_seq = o->rx.next_seq;
        n->tx.seqno = o->tx.seqno;
        n->tx.ip_id = o->tx.ip_id;
    }
    if (!b->keepalive_ms) {
        peer_set_up(n, 1);                      /* off: up */
    } else if (!a->keepalive_ms) {
        peer_set_up(n, 0);                      /* on now: down until answered */
        n->ka.next_ns = 0;
    } else if (a->keepalive_ms != b->keepalive_ms) {
        n->ka.next_ns = o->ka.sent_ns
                            ? o->ka.sent_ns + (uint64_t)b->keepalive_ms * 1000000ull : 0;
    }
}

/* Swaps the new configuration in; pop->lock held, the loop between passes
 * (or not running).  The learned table is made anew, sized for the new
 * peers: live entries behind a peer that is gone are dropped, the others
 * follow their peer's new index, as long as its (new) budget lasts; an
 * entry now inside a configured prefix goes too (such sources are never
 * learned). */
static void apply(struct tpb_pop *pop, struct reload *r)
{
    struct peer *old = pop->peers;
    struct tpb_pop_prefix *old_prefixes = pop->prefixes;
    struct learn_table old_learn = pop->learn;
    struct learned *e, *slot;
    uint64_t now = mono_ns();
    uint32_t i, to;

    for (i = 0; i < r->npeers; i++)
        if (r->from[i] != NO_PEER)
            carry(&r->peers[i], &old[r->from[i]]);
    pop->peers = r->peers;
    pop->npeers = r->npeers;
    pop->prefixes = r->prefixes;
    pop->nprefixes = r->nprefixes;
    pop->batch = r->batch;
    pop->tun_mtu = r->tun_mtu;
    pop->learn_ns = r->learn_ns;
    for (i = 0; i <= old_learn.mask; i++) {
        e = &old_learn.e[i];
        if (e->expires <= now)
            continue;
        to = r->to[e->peer];
        if (to == NO_PEER || by_prefix(pop, e->addr) ||
            r->peers[to].learned >= r->learn.budget)
            continue;
        learn_find(&r->learn, e->addr, now, &slot);
        if (slot)
            learn_put(slot, r->peers, e->addr, to, e->expires);
    }
    pop->learn = r->learn;
    pop->reclaim_ns = 0;
    pop->ka_due_ns = 0;                    /* keepalives(): look again */
    r->peers = old;                        /* for reload_free() */
    r->prefixes = old_prefixes;
    r->learn = old_learn;
    r->done = 1;
}

/* 0. A reload handed over by tpb_pop_reconfigure(), at a pass's start. */
void take_reload(struct tpb_pop *pop)
{
    pthread_mutex_lock(&pop->lock);
    if (pop->pending) {
        apply(pop, pop->pending);
        __atomic_store_n(&pop->pending, NULL, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&pop->applied);
    }
    pthread_mutex_unlock(&pop->lock);
}

/* ---- the loop --------------------------------------------------------- */

/* Live reload (tpb.h).  Checked whole before anything changes; built
 * beside the running configuration; swapped in by the loop at the start
 * of its next pass (woken through stop_fd), or here if it is not running.
 * Calls are serialized by reload_lock. */
int tpb_pop_reconfigure(struct tpb_pop *pop, const struct tpb_pop_config *cfg,
                        const struct tpb_pop_peer_config *peers,
                        const struct tpb_pop_prefix *prefixes,
                        char *err, size_t errlen)
{
    struct reload *r;
    struct timespec ts;
    uint64_t one = 1;
    char a[INET_ADDRSTRLEN];
    int rc;

    if (cfg->tun_fd != pop->tun) {
        snprintf(err, errlen, "the TUN device cannot change on reload (fd %d, not %d)",
                 cfg->tun_fd, pop->tun);
        return -EINVAL;
    }
    if (cfg->local != pop->local) {
        snprintf(err, errlen, "the local address cannot change on reload (%s)",
                 ip4_text(pop->local, a));
        return -EINVAL;
    }
    rc = check_config(cfg, peers, prefixes, err, errlen);
    if (rc)
        return rc;
    pthread_mutex_lock(&pop->reload_lock);
    r = reload_build(pop, cfg, peers, prefixes);
    if (!r) {
        pthread_mutex_unlock(&pop->reload_lock);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_lock(&pop->lock);
    if (!pop->running) {
        apply(pop, r);
    } else {
        __atomic_store_n(&pop->pending, r, __ATOMIC_RELEASE);
        if (write(pop->stop_fd, &one, sizeof(one)) < 0) {
            /* the counter is full: the loop is being woken anyway */
        }
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += RELOAD_WAIT_S;
        while (!r->done &&
               pthread_cond_timedwait(&pop->applied, &pop->lock, &ts) != ETIMEDOUT) {
        }
        if (!r->done) {
            __atomic_store_n(&pop->pending, NULL, __ATOMIC_RELEASE);
            snprintf(err, errlen, "the loop did not take the new configuration "
                     "within %d s", RELOAD_WAIT_S);
            rc = -ETIMEDOUT;
        }
    }
    pthread_mutex_unlock(&pop->lock);
    reload_free(r);            /* the old arrays, or the refused new ones */
    pthread_mutex_unlock(&pop->reload_lock);
    return rc;
}
