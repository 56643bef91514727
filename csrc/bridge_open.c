/* bridge_open.c — a bridge set up (its sources, rings and queues; in
 * tunnel mode the tunnel's settings, reassembly and keepalive state),
 * closed, and reconfigured live: a new configuration is handed to the
 * loop (bridge.c), which swaps it in between passes (apply_pending), when
 * no frame is half-way through.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <sys/eventfd.h>

#include "bridge.h"

/* ---- setting up -------------------------------------------------------- */

/* cBPF for one ring of a source sorted by filters (no group, or a hash
 * group of workers): accept the frame iff its length puts it in that ring
 * (TPB_SMALL_MAX) and, with a mark test, iff (mark == sel) == want.
 * Returns the number of instructions (at most 6). */
static unsigned short ring_filter(struct sock_filter prog[6], int big, int test_mark,
                                  uint32_t sel, int want)
{
    unsigned short n = 0;

    if (test_mark) {
        prog[n++] = (struct sock_filter)BPF_STMT(
            BPF_LD | BPF_W | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_MARK));
        /* on to the length test, or to the reject at the end (3 ahead) */
        prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, sel,
                                                 want ? 0 : 3, want ? 3 : 0);
    }
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_LEN, 0);
    prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K,
                                             TPB_SMALL_MAX, big ? 0 : 1,
                                             big ? 1 : 0);
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, 0xffffffffu);
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, 0);
    return n;
}

/* The program of a source group (TPB_RING_FANOUT_CBPF, open_group): the
 * member that takes a frame, 2 * source + ring.  Ring 1, of big slots,
 * for a frame longer than TPB_SMALL_MAX.  The group's hook runs it on the
 * skb as delivered, its data at the network header: the 14 bytes of
 * Ethernet header (an outer VLAN tag already moved into the skb's
 * metadata) are not in its length, where tpacket_rcv() copies from the
 * Ethernet header.  A way (two sources): source 1, encapsulated, for a
 * frame with the selection mark sel.  Returns the number of instructions. */
static unsigned short sort_prog(struct sock_filter prog[10], int by_mark, uint32_t sel)
{
    unsigned short n = 0;
    int k;

    if (by_mark) {
        prog[n++] = (struct sock_filter)BPF_STMT(
            BPF_LD | BPF_W | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_MARK));
        prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, sel, 0, 4);
    }
    for (k = by_mark; k >= 0; k--) {
        prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_LEN, 0);
        prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K,
                                                 TPB_SMALL_MAX - ETH_HLEN, 0, 1);
        prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, (uint32_t)(2 * k + 1));
        prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, (uint32_t)(2 * k));
    }
    return n;
}

/* The rings of n sources (1; or 2, a way split by the mark, the bridged
 * source first) as the members of one TPB_RING_FANOUT_CBPF group, in the
 * order sort_prog numbers them: each frame meets one of their sockets,
 * and none runs a filter.  Why: every socket bound to a port costs every
 * frame a delivery, a filter run and a free, where the group's hook costs
 * one program run (measured, README "Design choices").  Every member takes
 * nothing until all have joined and the program is in place: meanwhile an
 * index past the members would wrap round to the wrong one.  -EOPNOTSUPP:
 * the kernel cannot (Linux < 6.2). */
static int open_group(struct source *s, int n, const struct tpb_bridge_config *cfg,
                      int ifindex, uint16_t proto, int promisc, char *err, size_t errlen)
{
    struct sock_filter prog[10];
    struct sock_fprog fp = {sort_prog(prog, n == 2, cfg->mark), prog};
    int i, rc = 0;

    for (i = 0; i < 2 * n && rc == 0; i++) {
        int big = i % 2;
        uint32_t group = TPB_RING_FANOUT_CBPF |
                         (i ? TPB_RING_FANOUT_JOIN | s[0].ring[0].fanout_id : TPB_RING_FANOUT_NEW);

        rc = tpb_ring_open(&s[i / 2].ring[big], ifindex, proto,
                           big ? TPB_BIG_FRAMES : cfg->ring_frames, big,
                           &tpb_ring_nothing, promisc && i == 0, group, err, errlen);
    }
    if (rc == 0)
        rc = tpb_ring_fanout_prog(&s[0].ring[0], &fp, err, errlen);
    for (i = 0; i < 2 * n && rc == 0; i++)
        rc = tpb_ring_filter(&s[i / 2].ring[i % 2], NULL, err, errlen);
    for (i = 0; i < 2 * n; i++) {
        if (rc < 0)
            tpb_ring_close(&s[i / 2].ring[i % 2]);
        else
            s[i / 2].group_len = (uint8_t)n;
    }
    return rc;
}

/* n sources on ifindex for frames of proto (ETH_P_ALL or one EtherType):
 * n = 1, all of them, to `kind`; n = 2, a way split by the selection
 * mark, unselected frames bridged, selected ones encapsulated.  One loop:
 * a group if the kernel has it (TPB_FAULT_NO_SPLIT, tests only: as if it
 * had not); else, and for workers (one hash group per ring, joined in the
 * same order by every worker, so that the same flow hash picks the same
 * member index in each), a filter on each ring's socket. */
static int add_sources(struct tpb_bridge *br, const struct tpb_bridge_config *cfg,
                       int ifindex, uint16_t proto, int n, enum src_kind kind, int port,
                       int to, int promisc, char *err, size_t errlen)
{
    struct source *s = &br->src[br->nsrc];
    struct sock_filter prog[6];
    struct sock_fprog fp = {0, prog};
    int k, big, rc;

    for (k = 0; k < n; k++) {
        s[k].kind = n == 2 ? (k ? SRC_ENCAP : SRC_BRIDGE) : kind;
        s[k].port = port;
        s[k].to = to;
        s[k].group_len = 0;
    }
    if (cfg->fanout == TPB_FANOUT_NONE && !getenv("TPB_FAULT_NO_SPLIT")) {
        rc = open_group(s, n, cfg, ifindex, proto, promisc, err, errlen);
        if (rc == 0) {
            br->nsrc += n;
            return 0;
        }
        if (rc != -EOPNOTSUPP)
            return -1;
    }
    for (k = 0; k < n; k++, br->nsrc++)
        for (big = 0; big < 2; big++) {
            int i = 2 * br->nsrc + big;
            uint32_t group = cfg->fanout == TPB_FANOUT_NEW ? TPB_RING_FANOUT_NEW
                             : cfg->fanout == TPB_FANOUT_JOIN
                                 ? TPB_RING_FANOUT_JOIN | cfg->fanout_id[i]
                                 : 0;

            fp.len = ring_filter(prog, big, n == 2, cfg->mark, k);
            if (tpb_ring_open(&s[k].ring[big], ifindex, proto,
                              big ? TPB_BIG_FRAMES : cfg->ring_frames, big, &fp,
                              promisc && !big, group, err, errlen) < 0)
                return -1;
        }
    return 0;
}

static int open_gso(struct tpb_bridge *br, const struct tpb_bridge_config *cfg,
                    char *err, size_t errlen)
{
    int p;

    for (p = 0; p < TPB_NPORTS; p++) {
        br->gsofd[p] = tpb_txsock_open(cfg->ifindex[p], 0, 0, err, errlen);
        if (br->gsofd[p] < 0)
            return -1;
    }
    return 0;
}

static int tunnel_config_ok(const struct tpb_tunnel_config *t, char *err,
                            size_t errlen)
{
    if (t->nremotes < 1 || t->nremotes > TPB_MAX_REMOTES) {
        snprintf(err, errlen, "from 1 to %d remotes, not %u", TPB_MAX_REMOTES,
                 t->nremotes);
        return -1;
    }
    if (t->keepalive_ms && !t->keepalive_retries) {
        snprintf(err, errlen, "keepalive retries must be at least 1");
        return -1;
    }
    if (t->encap != TPB_ENCAP_GRE && t->encap != TPB_ENCAP_UDP) {
        snprintf(err, errlen, "unknown encapsulation %u", t->encap);
        return -1;
    }
    return 0;
}

/* Outer IPv4 (+ UDP with GRE-in-UDP) + GRE: what the tunnel adds. */
static size_t tunnel_overhead(const struct tpb_tunnel_config *t)
{
    return 20 + (t->encap == TPB_ENCAP_UDP ? UDP_HLEN : 0) +
           gre_hlen(t->csum, t->has_key, t->seq);
}

/* Everything a tunnel configuration decides, at open and on reload; the
 * sequence number and IP ID go on counting, and a remote kept by address
 * keeps its state (ka_setup). */
static void tunnel_settings(struct tpb_bridge *br, const struct tpb_tunnel_config *t)
{
    uint32_t seqno = br->gtx.seqno;
    uint16_t ip_id = br->gtx.ip_id;
    struct gre_rx unused;

    ka_setup(br, t);            /* compares with the old br->cfg first */
    br->cfg = *t;
    gre_setup(&br->gtx, &unused, t->local, br->gtx.remote, t->key, t->has_key,
              t->csum, t->seq, t->ttl, t->tos);
    br->gtx.seqno = seqno;
    br->gtx.ip_id = ip_id;
    br->gtx.df = t->df;
    br->gtx.udp = t->encap == TPB_ENCAP_UDP;
    br->overhead = tunnel_overhead(t);
    /* A router the operator named wins over any frame (learn_router());
     * unpinned by a reload, the one it named stays until a selected frame
     * shows another. */
    if (t->router_mac_set) {
        memcpy(br->router_mac, t->router_mac, 6);
        br->have_router_mac = 1;
    }
    /* The port's own MTU, once the loop has read it, over the caller's. */
    encap_mtu(br, br->q[TPB_PORT_OUT].mtu ? br->q[TPB_PORT_OUT].mtu : t->mtu);
    if (br->icmp_tokens > t->icmp_rate)
        br->icmp_tokens = t->icmp_rate;
    if (br->echo_tokens > t->icmp_rate)
        br->echo_tokens = t->icmp_rate;
    if (br->reasm)
        reasm_limits(br->reasm, t->reasm_memory, t->reasm_timeout_ms);
}

/* The tunnel's state, before any socket: settings, remotes, reassembly. */
static int tunnel_state(struct tpb_bridge *br, const struct tpb_bridge_config *cfg,
                        uint64_t now, char *err, size_t errlen)
{
    const struct tpb_tunnel_config *t = &cfg->tun;
    size_t min = encap_min_mtu(tunnel_overhead(t));
    char name[IF_NAMESIZE];

    if (tunnel_config_ok(t, err, errlen))
        return -1;
    if (t->mtu < min) {
        snprintf(err, errlen, "--out %s: MTU %u is too small for the tunnel "
                 "(needs at least %zu)",
                 if_indextoname((unsigned)cfg->ifindex[TPB_PORT_OUT], name)
                     ? name : "?", t->mtu, min);
        return -1;
    }
    br->tunnel = 1;
    br->sel_ifindex = cfg->sel_ifindex;
    br->mark = cfg->mark;
    br->now_ns = now;
    br->gtx.ip_id = (uint16_t)br->now_ns;
    tunnel_settings(br, t);
    br->icmp_tokens = t->icmp_rate;
    br->icmp_last_ns = br->now_ns;
    br->echo_tokens = t->icmp_rate;
    br->echo_last_ns = br->now_ns;
    br->reasm = reasm_new(t->reasm_memory, t->reasm_timeout_ms);
    if (!br->reasm) {
        snprintf(err, errlen, "out of memory (reassembly)");
        return -1;
    }
    return 0;
}

static int open_tunnel(struct tpb_bridge *br, const struct tpb_bridge_config *cfg,
                       char *err, size_t errlen)
{
    if (tunnel_state(br, cfg, mono_ns(), err, errlen))
        return -1;
    br->txfd_in = tpb_txsock_open(cfg->ifindex[TPB_PORT_IN], 1, 1, err, errlen);
    if (br->txfd_in < 0)
        return -1;
    /* --in's frames come two ways (tpb/select.py): untagged IPv4 frames
     * straight from --in to sockets bound to ETH_P_IP, which see a frame
     * after the ingress hook, its mark set; all others (tagged, whose tag
     * such a socket would not see, or not IPv4) forwarded by TPB's ingress
     * chain into the veth pair, whose far end ETH_P_ALL sockets read.  Each
     * frame takes one way, each way is split by the mark, and a flow never
     * changes ways (a way by frame length would let a short frame overtake
     * a super-packet of its flow still crossing the veth).  Sources 0-2
     * are those of before (txq_init below counts on src[2]). */
    if (add_sources(br, cfg, cfg->sel_ifindex, ETH_P_ALL, 2, SRC_BRIDGE, TPB_PORT_IN,
                    TPB_PORT_OUT, 0, err, errlen) ||
        add_sources(br, cfg, cfg->ifindex[TPB_PORT_OUT], ETH_P_ALL, 1, SRC_FROM_OUT,
                    TPB_PORT_OUT, TPB_PORT_IN, 1, err, errlen) ||
        add_sources(br, cfg, cfg->ifindex[TPB_PORT_IN], ETH_P_IP, 2, SRC_BRIDGE, TPB_PORT_IN,
                    TPB_PORT_OUT, 0, err, errlen))
        return -1;
    if (open_gso(br, cfg, err, errlen))
        return -1;
    if (ugso_init(br)) {
        snprintf(err, errlen, "out of memory (UDP GSO)");
        return -1;
    }
    if (txq_init(&br->q[TPB_PORT_IN], br->txfd_in, br->gsofd[TPB_PORT_IN],
                 cfg->ifindex[TPB_PORT_IN], &br->c[TPB_PORT_IN]) ||
        txq_init(&br->q[TPB_PORT_OUT], br->src[2].ring[0].fd,
                 br->gsofd[TPB_PORT_OUT], cfg->ifindex[TPB_PORT_OUT],
                 &br->c[TPB_PORT_OUT])) {
        snprintf(err, errlen, "out of memory (tx queues)");
        return -1;
    }
    br->q[TPB_PORT_OUT].tc = &br->tc;      /* encap counted as it leaves */
    return 0;
}

static int open_plain(struct tpb_bridge *br, const struct tpb_bridge_config *cfg,
                      char *err, size_t errlen)
{
    if (add_sources(br, cfg, cfg->ifindex[TPB_PORT_IN], ETH_P_ALL, 1, SRC_BRIDGE,
                    TPB_PORT_IN, TPB_PORT_OUT, 1, err, errlen) ||
        add_sources(br, cfg, cfg->ifindex[TPB_PORT_OUT], ETH_P_ALL, 1, SRC_BRIDGE,
                    TPB_PORT_OUT, TPB_PORT_IN, 1, err, errlen))
        return -1;
    if (open_gso(br, cfg, err, errlen))
        return -1;
    if (txq_init(&br->q[TPB_PORT_IN], br->src[0].ring[0].fd, br->gsofd[TPB_PORT_IN],
                 cfg->ifindex[TPB_PORT_IN], &br->c[TPB_PORT_IN]) ||
        txq_init(&br->q[TPB_PORT_OUT], br->src[1].ring[0].fd,
                 br->gsofd[TPB_PORT_OUT], cfg->ifindex[TPB_PORT_OUT],
                 &br->c[TPB_PORT_OUT])) {
        snprintf(err, errlen, "out of memory (tx queues)");
        return -1;
    }
    return 0;
}

#ifdef TPB_FUZZ
/* fuzz/: a harness opens and closes a bridge per input; the last one
 * closed is kept and cleared for the next, not unmapped and faulted in
 * again (370 KB: a third of a harness's time went to that). */
static struct tpb_bridge *fz_spare;
#endif

/* A bridge with nothing open yet. */
static struct tpb_bridge *bridge_new(const struct tpb_bridge_config *cfg)
{
    struct tpb_bridge *br;
    int i;

#ifdef TPB_FUZZ
    if (fz_spare) {
        br = fz_spare;
        fz_spare = NULL;
        memset(br, 0, sizeof(*br));
    } else
#endif
    br = calloc(1, sizeof(*br));
    if (!br)
        return NULL;
    for (i = 0; i < TPB_MAX_SOURCES; i++)
        br->src[i].ring[0].fd = br->src[i].ring[1].fd = -1;
    br->txfd_in = br->gsofd[0] = br->gsofd[1] = br->stop_fd = br->wake_fd = -1;
    br->batch = cfg->batch ? cfg->batch : 64;
    if (br->batch > MAX_BATCH)
        br->batch = MAX_BATCH;
    br->spin_us = cfg->spin_us;
    for (i = 0; i < TPB_NPORTS; i++) {
        shed_init(&br->shed[i], cfg->ifindex[i]);
        br->shed[i].c = &br->c[i];
    }
    pthread_mutex_init(&br->stats_lock, NULL);
    pthread_cond_init(&br->applied_cv, NULL);
    return br;
}

/* Loaded now, so that a kernel without it says so at start (the loop
 * attaches a program only when a port is overloaded); TPB runs on without. */
static void open_shed(struct tpb_bridge *br)
{
    int i;

    for (i = 0; i < TPB_NPORTS; i++)
        if (shed_load(&br->shed[i], br->shed_err, sizeof(br->shed_err)) < 0) {
            br->shed[i].refused = 1;
            br->c[i].shed_refused = 1;
            return;
        }
    br->shed_on = 1;
}

const char *tpb_bridge_shed_error(struct tpb_bridge *br)
{
    return br->shed_err;
}

struct tpb_bridge *tpb_bridge_open(const struct tpb_bridge_config *cfg,
                                   char *err, size_t errlen)
{
    struct tpb_bridge *br = bridge_new(cfg);

    if (!br) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    br->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    br->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (br->stop_fd < 0 || br->wake_fd < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        goto fail;
    }
    if (cfg->fanout > TPB_FANOUT_JOIN ||
        (cfg->fanout != TPB_FANOUT_NONE && cfg->tunnel)) {
        snprintf(err, errlen, "workers: plain bridging only");
        goto fail;
    }
    if ((cfg->tunnel ? open_tunnel(br, cfg, err, errlen)
                     : open_plain(br, cfg, err, errlen)) < 0)
        goto fail;
    if (cfg->shed && cfg->fanout == TPB_FANOUT_NONE)
        open_shed(br);
    return br;
fail:
    tpb_bridge_close(br);
    return NULL;
}

void tpb_bridge_close(struct tpb_bridge *br)
{
    int i;

    if (!br)
        return;
    for (i = 0; i < TPB_NPORTS; i++)
        shed_free(&br->shed[i]);     /* first: frames go back to the stack */
    for (i = 0; i < TPB_MAX_SOURCES; i++) {
        tpb_ring_close(&br->src[i].ring[0]);
        tpb_ring_close(&br->src[i].ring[1]);
    }
    if (br->txfd_in >= 0)
        close(br->txfd_in);
    for (i = 0; i < TPB_NPORTS; i++)
        if (br->gsofd[i] >= 0)
            close(br->gsofd[i]);
    for (i = 0; i < TPB_NPORTS; i++)
        txq_free(&br->q[i]);
    if (br->reasm)
        reasm_free(br->reasm);
    ugso_free(br);
    if (br->stop_fd >= 0)
        close(br->stop_fd);
    if (br->wake_fd >= 0)
        close(br->wake_fd);
    free(br->pending);
    pthread_cond_destroy(&br->applied_cv);
    pthread_mutex_destroy(&br->stats_lock);
#ifdef TPB_FUZZ
    if (!fz_spare) {
        fz_spare = br;
        return;
    }
#endif
    free(br);
}

/* ---- live reload -------------------------------------------------------- */

/* A new selection mark: each way's group gets its program again, which
 * the kernel swaps for the whole group at once; sorted by filters, each
 * ring of the two selecting sources gets its filter again (SO_ATTACH_FILTER
 * swaps it atomically, per socket). */
static void set_mark(struct tpb_bridge *br, uint32_t mark)
{
    struct sock_filter prog[10];
    struct sock_fprog fp = {0, prog};
    char err[128];
    int i, big;

    for (i = 0; i < br->nsrc; i++) {
        struct source *s = &br->src[i];

        if (s->kind == SRC_FROM_OUT)
            continue;
        if (s->group_len) {
            /* a way's group: its program set once, through its first source */
            if (s->group_len == 2 && s->kind == SRC_BRIDGE) {
                fp.len = sort_prog(prog, 1, mark);
                tpb_ring_fanout_prog(&s->ring[0], &fp, err, sizeof(err));
            }
            continue;
        }
        for (big = 0; big < 2; big++) {
            fp.len = ring_filter(prog, big, 1, mark, s->kind == SRC_ENCAP);
            tpb_ring_filter(&s->ring[big], &fp, err, sizeof(err));
        }
    }
    br->mark = mark;
}

/* In the loop's thread, between passes: no frame is half-way through. */
void apply_pending(struct tpb_bridge *br)
{
    pthread_mutex_lock(&br->stats_lock);
    if (br->pending) {
        if (br->tunnel) {
            if (br->pending->mark != br->mark)
                set_mark(br, br->pending->mark);
            tunnel_settings(br, &br->pending->tun);
        }
        free(br->pending);
        __atomic_store_n(&br->pending, NULL, __ATOMIC_RELEASE);
        br->applied++;
        pthread_cond_broadcast(&br->applied_cv);
    }
    pthread_mutex_unlock(&br->stats_lock);
}

int tpb_bridge_reconfigure(struct tpb_bridge *br,
                           const struct tpb_bridge_config *cfg,
                           char *err, size_t errlen)
{
    struct tpb_bridge_config *c;
    struct timespec until;
    uint64_t one = 1, want;
    int rc = 0;

    if (!!cfg->tunnel != br->tunnel) {
        snprintf(err, errlen, "plain and tunnel mode cannot change on reload");
        return -EINVAL;
    }
    if (cfg->ifindex[0] != br->q[0].ifindex || cfg->ifindex[1] != br->q[1].ifindex ||
        (br->tunnel && cfg->sel_ifindex != br->sel_ifindex)) {
        snprintf(err, errlen, "the ports cannot change on reload");
        return -EINVAL;
    }
    if (br->tunnel && tunnel_config_ok(&cfg->tun, err, errlen))
        return -EINVAL;
    c = malloc(sizeof(*c));
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    *c = *cfg;
    pthread_mutex_lock(&br->stats_lock);
    free(br->pending);          /* a newer one replaces one not yet taken */
    __atomic_store_n(&br->pending, c, __ATOMIC_RELEASE);
    want = br->applied + 1;
    if (!__atomic_load_n(&br->running, __ATOMIC_ACQUIRE)) {
        pthread_mutex_unlock(&br->stats_lock);
        br->now_ns = mono_ns();
        apply_pending(br);
        return 0;
    }
    if (write(br->wake_fd, &one, sizeof(one)) < 0) {
        /* the counter is full only if the loop never drains: it will */
    }
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 2;
    while (br->applied < want && rc == 0)
        rc = pthread_cond_timedwait(&br->applied_cv, &br->stats_lock, &until);
    pthread_mutex_unlock(&br->stats_lock);
    if (rc) {
        snprintf(err, errlen, "the forwarding loop did not take the new configuration");
        return -ETIMEDOUT;
    }
    return 0;
}

#ifdef TPB_FUZZ
/* ---- fuzz/: the pipeline without sockets (bridge.h) --------------------- */

struct tpb_bridge *tpb_fuzz_bridge_open(const struct tpb_bridge_config *cfg,
                                        uint64_t now)
{
    struct tpb_bridge *br = bridge_new(cfg);
    char err[128];
    int p;

    if (!br)
        return NULL;
    if (cfg->tunnel && tunnel_state(br, cfg, now, err, sizeof(err)))
        goto fail;
    /* UDP GSO as on a kernel that takes it (a harness may ugso_free() it) */
    if (ugso_init(br))
        goto fail;
    /* txq.c's fuzzing build opens no socket and sends to tpb_fuzz_tx */
    for (p = 0; p < TPB_NPORTS; p++)
        if (txq_init(&br->q[p], -1, -1, cfg->ifindex[p], &br->c[p]))
            goto fail;
    if (cfg->tunnel)
        br->q[TPB_PORT_OUT].tc = &br->tc;  /* as open_tunnel() */
    return br;
fail:
    tpb_bridge_close(br);
    return NULL;
}

void tpb_fuzz_bridge_reconfigure(struct tpb_bridge *br,
                                 const struct tpb_tunnel_config *t)
{
    tunnel_settings(br, t);
}
#endif
