/* bridge.c — the loop: every frame from one port out the other, and in
 * tunnel mode the selected ones into GRE and GRE from the POP out of it.
 *
 * A frame passes these stages, in the order the functions below appear:
 *   1. collect()   take the next filled slot of a source, the earlier of
 *                  its two rings' (next_frame); a frame cut short by its
 *                  slot (or a runt) is dropped whole, never sent on;
 *   2. dispatch()  by the source: bridge it unchanged (txq.c), encapsulate
 *                  it (encap.c), or look at it as coming from the ISP side
 *                  (decap.c);
 *   3. pass()      flush both ports' queues (txq_flush, one sendmmsg per
 *                  batch), then hand the slots back to the kernel;
 *   4. run()       go round the sources; when all rings are empty, spin
 *                  briefly, then sleep in poll() on them and the stop fd;
 *                  every second the ports' MTUs are read again
 *                  (txq_check_mtu) and the tunnel follows --out's
 *                  (encap_mtu), reassembly and keepalives get their clock.
 *
 * Sources.  Each is two rings, split by frame length (tpb.h; by a fanout
 * group's program or by filters, bridge_open.c) and merged back in
 * arrival order.  Plain mode: one ETH_P_ALL source per port.
 * Tunnel mode: --in's frames are taken after nftables has seen them (an
 * ETH_P_ALL socket on --in would see them before the ingress hook, without
 * the mark), two ways (tpb/select.py): untagged IPv4 frames by sockets on
 * --in bound to ETH_P_IP, all others from a veth pair that TPB's nftables
 * table forwards them to (an ETH_P_IP socket would not see their VLAN
 * tag).  Each way is two sources split by the mark (SKF_AD_MARK):
 * selected -> encapsulate, others -> bridge.  A fifth
 * source takes --out.  Every frame is seen exactly once, VLAN tag
 * included.
 *
 * Setting a bridge up, closing it and live reloads: bridge_open.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <sys/eventfd.h>

#include "bridge.h"

/* 1. ------------------------------------------------------------------ */

static int earlier(const struct tpacket2_hdr *a, const struct tpacket2_hdr *b)
{
    return a->tp_sec < b->tp_sec ||
           (a->tp_sec == b->tp_sec && a->tp_nsec <= b->tp_nsec);
}

/* The earlier of the two rings' next frames.  The kernel fills a port's
 * rings one frame after another on the CPU that receives them, each slot's
 * status flipped before the next frame is taken, so a frame visible in one
 * ring while the other is empty came before anything that ring will get. */
static struct tpacket2_hdr *next_frame(struct source *s, struct tpb_ring **from,
                                       uint32_t *st)
{
    uint32_t st0, st1;
    struct tpacket2_hdr *a = tpb_ring_peek(&s->ring[0], s->ring[0].head, &st0);
    struct tpacket2_hdr *b = tpb_ring_peek(&s->ring[1], s->ring[1].head, &st1);

    if (a && (!b || earlier(a, b))) {
        *from = &s->ring[0];
        *st = st0;
        return a;
    }
    *from = &s->ring[1];
    *st = st1;
    return b;
}

static struct tpacket2_hdr *collect(struct tpb_bridge *br, struct source *s,
                                    struct frame *f)
{
    struct tpb_port_counters *c = &br->c[s->port];
    struct tpacket2_hdr *h;
    struct tpb_ring *r;
    uint32_t st;

    while ((h = next_frame(s, &r, &st)) != NULL) {
        r->head = tpb_ring_next(r, r->head);
        c->rx_frames++;
        c->rx_bytes += h->tp_len;
        if (h->tp_snaplen < h->tp_len || h->tp_snaplen < ETH_HLEN) {
            c->drop_truncated++;
            tpb_ring_release(h);
            continue;
        }
        f->h = h;
        f->mac = (uint8_t *)h + h->tp_mac;
        f->len = h->tp_snaplen;
        f->vh = (struct virtio_net_hdr *)(f->mac - VNET_LEN);
        f->tagged = (st & TP_STATUS_VLAN_VALID) != 0;
        /* Counted as on the wire: with the tag the kernel took off. */
        c->rx_bytes += f->tagged ? 4 : 0;
        if (f->tagged)
            /* Without a valid TPID the kernel only ever strips 802.1Q. */
            tpb_vlan_tag((st & TP_STATUS_VLAN_TPID_VALID) ? h->tp_vlan_tpid
                                                          : ETH_P_8021Q,
                         h->tp_vlan_tci, f->tag);
        return h;
    }
    return NULL;
}

/* 2. ------------------------------------------------------------------ */

static void dispatch(struct tpb_bridge *br, struct source *s, struct frame *f)
{
    switch (s->kind) {
    case SRC_BRIDGE:
        /* Anyone upstream can send a frame with a stranger's MACs (a
         * 64-byte flood from a spoofed source, say): a bridged frame must
         * not readdress what TPB unwraps (learn_router: selected frames
         * only), and teaches the keepalives' hop only while no frame has. */
        if (br->tunnel && s->port == TPB_PORT_IN && !br->have_hop)
            ka_learn_hop(br, f);
        forward(br, &br->q[s->to], f);
        break;
    case SRC_ENCAP:
        ka_learn_hop(br, f);
        encap_frame(br, f);
        break;
    case SRC_FROM_OUT:
        from_out_frame(br, f);
        break;
    }
}

/* 3. ------------------------------------------------------------------ */

static uint32_t pass(struct tpb_bridge *br, struct source *s)
{
    struct tpacket2_hdr *held[MAX_BATCH];
    struct frame f;
    int p;
    /* Never more than a ring has slots: past that, its head would wrap
     * onto slots this pass still holds. */
    uint32_t n = 0, i, limit = br->batch;

    for (i = 0; i < 2; i++)
        if (s->ring[i].frame_nr < limit)
            limit = s->ring[i].frame_nr;

    while (n < limit && (held[n] = collect(br, s, &f)) != NULL) {
        dispatch(br, s, &f);
        n++;
    }
    if (!n)
        return 0;
    for (p = 0; p < TPB_NPORTS; p++)
        if (br->q[p].n)
            txq_flush(&br->q[p]);
    for (i = 0; i < n; i++)
        tpb_ring_release(held[i]);
    return n;
}

/* 4. ------------------------------------------------------------------ */

static int rings_ready(struct tpb_bridge *br)
{
    uint32_t st;
    int i;

    for (i = 0; i < 2 * br->nsrc; i++) {
        struct tpb_ring *r = &br->src[i / 2].ring[i % 2];

        if (tpb_ring_peek(r, r->head, &st))
            return 1;
    }
    return 0;
}

/* Spinning a few microseconds catches the next frame of a burst without a
 * sleep/wake-up (a cross-CPU kick costs several microseconds here).  And
 * while TPB sleeps in poll(), the CPU that fills its rings pays for every
 * frame it queues until TPB is running again: each one wakes the sleeper
 * (sock_def_readable, the wait queue's and the task's locks).  Under a
 * flood that is the generator's or the NIC's CPU, and it cost the 64-byte
 * rate a fifth in tunnel mode (README, "Selecting flows").  So without
 * spin_us the loop spins SPIN_AUTO_US once SPIN_BURST frames came since it
 * last slept, which a flood does and a TCP flow's super-packets, each
 * waking it alone, do not: spinning there took TCP's time on a CPU shared
 * with its receive work (one core: 16.6 against 15.3 Gbit/s at 5 us). */
#define SPIN_BURST 16u
#define SPIN_AUTO_US 5u

static int spin(struct tpb_bridge *br, uint32_t burst)
{
    uint32_t us = br->spin_us ? br->spin_us : burst >= SPIN_BURST ? SPIN_AUTO_US : 0;
    uint64_t until;

    if (!us)
        return 0;
    until = mono_ns() + (uint64_t)us * 1000u;
    do {
        if (rings_ready(br))
            return 1;
        __builtin_ia32_pause();
    } while (mono_ns() < until &&
             !__atomic_load_n(&br->stop, __ATOMIC_RELAXED));
    return 0;
}


static void fold_kernel_stats(struct tpb_bridge *br);

/* Whether a ring of the port holds a queue: its slot a 16th of the ring
 * past the head is filled already (the kernel fills slots in order). */
static int queued(const struct tpb_bridge *br, int port)
{
    uint32_t st;
    int i, k;

    for (i = 0; i < br->nsrc; i++) {
        if (br->src[i].port != port)
            continue;
        for (k = 0; k < 2; k++) {
            const struct tpb_ring *r = &br->src[i].ring[k];

            if (r->frame_nr &&
                tpb_ring_peek(r, (r->head + r->frame_nr / 16) % r->frame_nr, &st))
                return 1;
        }
    }
    return 0;
}

/* Overload shedding's clock (shed.c), with the ports' ring drops fresh. */
static void shed_ticks(struct tpb_bridge *br)
{
    int p;

    br->shed_tick_ns = br->now_ns;
    pthread_mutex_lock(&br->stats_lock);
    fold_kernel_stats(br);
    pthread_mutex_unlock(&br->stats_lock);
    for (p = 0; p < TPB_NPORTS; p++)
        shed_tick(&br->shed[p], br->now_ns, queued(br, p));
}

/* While a port sheds, the loop wakes often enough to see the flood end. */
static int shedding(const struct tpb_bridge *br)
{
    return br->shed[0].link_fd >= 0 || br->shed[1].link_fd >= 0;
}

/* Drains an eventfd that only wakes the loop. */
static void drain(int fd)
{
    uint64_t v;

    if (read(fd, &v, sizeof(v)) < 0) {
        /* EAGAIN: someone else drained it; nothing is lost */
    }
}

int tpb_bridge_run(struct tpb_bridge *br)
{
    struct pollfd pfd[2 * TPB_MAX_SOURCES + 2];
    int i, e, nfd = 2 * br->nsrc;
    socklen_t elen = sizeof(e);
    uint32_t burst = 0;       /* frames since the loop last slept */

    for (i = 0; i < nfd; i++) {
        pfd[i].fd = br->src[i / 2].ring[i % 2].fd;
        pfd[i].events = POLLIN;
    }
    pfd[nfd].fd = br->stop_fd;
    pfd[nfd].events = POLLIN;
    pfd[nfd + 1].fd = br->wake_fd;
    pfd[nfd + 1].events = POLLIN;
    __atomic_store_n(&br->running, 1, __ATOMIC_RELEASE);

    while (!__atomic_load_n(&br->stop, __ATOMIC_ACQUIRE)) {
        uint32_t work = 0;

        br->now_ns = mono_ns();
        __atomic_store_n(&br->passes, br->passes + 1, __ATOMIC_RELAXED);
        if (__atomic_load_n(&br->pending, __ATOMIC_ACQUIRE))
            apply_pending(br);
        if (br->now_ns - br->mtu_checked_ns >= 1000000000ull) {
            br->mtu_checked_ns = br->now_ns;
            txq_check_mtu(&br->q[TPB_PORT_IN]);
            txq_check_mtu(&br->q[TPB_PORT_OUT]);
            if (br->tunnel && br->q[TPB_PORT_OUT].mtu)
                encap_mtu(br, br->q[TPB_PORT_OUT].mtu);
        }
        if (br->shed_on && br->now_ns - br->shed_tick_ns >= SHED_TICK_NS)
            shed_ticks(br);
        for (i = 0; i < br->nsrc; i++)
            work += pass(br, &br->src[i]);
        if (br->reasm)
            reasm_expire(br->reasm, &br->tc, br->now_ns);
        if (br->tunnel) {
            ka_tick(br);
            if (br->q[TPB_PORT_OUT].n)
                txq_flush(&br->q[TPB_PORT_OUT]);
        }
        burst += work;
        if (work || spin(br, burst))
            continue;
        burst = 0;
        br->c[TPB_PORT_IN].polls++;
        /* At least once a second: reassembly and keepalives need a clock,
         * and the heartbeat shows a watchdog the loop is alive. */
        if (poll(pfd, (nfds_t)nfd + 2, ka_timeout_ms(br, shedding(br) ? 100 : 1000)) < 0) {
            if (errno == EINTR)
                continue;
            __atomic_store_n(&br->running, 0, __ATOMIC_RELEASE);
            return -errno;
        }
        if (pfd[nfd + 1].revents & POLLIN)
            drain(br->wake_fd);
        for (i = 0; i < nfd; i++)
            if (pfd[i].revents & POLLERR)
                getsockopt(pfd[i].fd, SOL_SOCKET, SO_ERROR, &e, &elen);
    }
    /* A reconfigure still waiting is taken, so its caller need not time out. */
    pthread_mutex_lock(&br->stats_lock);
    __atomic_store_n(&br->running, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&br->stats_lock);
    if (__atomic_load_n(&br->pending, __ATOMIC_ACQUIRE))
        apply_pending(br);
    return 0;
}

void tpb_bridge_stop(struct tpb_bridge *br)
{
    uint64_t one = 1;

    __atomic_store_n(&br->stop, 1, __ATOMIC_RELEASE);
    if (write(br->stop_fd, &one, sizeof(one)) < 0) {
        /* The eventfd counter cannot overflow from a handful of stops;
         * the flag alone still ends the loop at its next wake-up. */
    }
}

/* ---- readers, from any thread ------------------------------------------ */

/* PACKET_STATISTICS resets on every read: fold it into the counters under
 * a lock, so concurrent readers never lose a count. */
static void fold_kernel_stats(struct tpb_bridge *br)
{
    struct tpacket_stats st;
    socklen_t len;
    int i;

    for (i = 0; i < 2 * br->nsrc; i++) {
        len = sizeof(st);
        if (getsockopt(br->src[i / 2].ring[i % 2].fd, SOL_PACKET,
                       PACKET_STATISTICS, &st, &len) == 0) {
            br->c[br->src[i / 2].port].kernel_packets += st.tp_packets;
            br->c[br->src[i / 2].port].kernel_drops += st.tp_drops;
        }
    }
}

int tpb_bridge_bypass_qdisc(struct tpb_bridge *br, int port, int on)
{
    if (port < 0 || port >= TPB_NPORTS)
        return -EINVAL;
    return txq_bypass(&br->q[port], on);
}

void tpb_bridge_counters(struct tpb_bridge *br, int port,
                         struct tpb_port_counters *out)
{
    if (port < 0 || port >= TPB_NPORTS) {
        memset(out, 0, sizeof(*out));
        return;
    }
    pthread_mutex_lock(&br->stats_lock);
    fold_kernel_stats(br);
    *out = br->c[port];
    pthread_mutex_unlock(&br->stats_lock);
}

uint32_t tpb_bridge_fanout_ids(struct tpb_bridge *br, uint16_t *out)
{
    int i;

    for (i = 0; i < 2 * br->nsrc; i++)
        out[i] = br->src[i / 2].ring[i % 2].fanout_id;
    return (uint32_t)(2 * br->nsrc);
}

void tpb_bridge_tunnel_counters(struct tpb_bridge *br,
                                struct tpb_tunnel_counters *out)
{
    *out = br->tc;
}

const char *tpb_drop_name(int reason)
{
    static const char *const names[TPB_NDROP] = {
        "outer_bad", "not_peer", "gre_truncated", "gre_version", "gre_flags",
        "gre_csum", "gre_csum_missing", "gre_key", "gre_seq_stale",
        "gre_seq_missing", "gre_proto", "inner_bad", "ecn", "no_router_mac",
        "local_other", "encap_not_ip", "encap_bad", "too_big", "gso_bad",
        "reasm_timeout", "reasm_overlap", "reasm_duplicate", "reasm_bad",
        "reasm_memory", "no_peer", "tun_write", "send", "tunnel_down",
        "source_owned", "inner_martian", "learn_full", "rcvbuf_full", "tun_full",
        "tun_invalid", "echo_csum", "echo_ratelimited", "reasm_evicted", "mtu_too_small",
        "frag_overflow", "keepalive_stale", "udp_bad", "udp_csum", "no_endpoint",
    };

    return reason >= 0 && reason < TPB_NDROP ? names[reason] : "unknown";
}

uint32_t tpb_bridge_remotes(struct tpb_bridge *br,
                            struct tpb_remote_state *out, uint32_t n)
{
    uint64_t now = mono_ns();
    uint32_t i;

    pthread_mutex_lock(&br->stats_lock);
    for (i = 0; i < br->nremotes && i < n; i++) {
        const struct remote *r = &br->remote[i];

        out[i] = r->st;
        out[i].since_reply_ns = r->st.keepalives_received && now > r->reply_ns
                                    ? now - r->reply_ns
                                    : 0;
    }
    pthread_mutex_unlock(&br->stats_lock);
    return i;
}

uint64_t tpb_bridge_heartbeat(struct tpb_bridge *br)
{
    return __atomic_load_n(&br->passes, __ATOMIC_RELAXED);
}
