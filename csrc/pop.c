/* pop.c — `tpb pop`: one GRE endpoint for many bridges, on a host with an
 * IP stack, no kernel GRE needed.  The reply to a tunneled flow finds its
 * bridge by the inner destination address (one-to-many), not by a tunnel
 * device per bridge.
 *
 * Each pass of the loop (tpb_pop_run):
 *   0. take_reload()   a new configuration handed over by
 *                      tpb_pop_reconfigure() is swapped in here, at the
 *                      start of a pass, under the lock the readers take;
 *      keepalives()    the POP's own keepalives to the peers that have
 *                      keepalive_ms (send due ones, mark silent peers down);
 *      poll() sleeps until the next keepalive is due, at most a second
 *      (the heartbeat moves even when idle).
 * From the bridges (raw IPv4 socket, protocol 47, and a UDP socket on port
 * 4754 for GRE-in-UDP, RFC 8086; the host kernel has already reassembled
 * fragments and checked UDP headers):
 *   1. from_bridges()  recvmmsg a batch from each (the UDP socket with
 *                      UDP_GRO: up to 64 datagrams in one, from_udp_gro()
 *                      takes them apart); per packet:
 *   2. peer_by_addr()  the outer source must be a configured bridge; for
 *      peer_by_udp()   GRE-in-UDP, or a NAT'd one (address `any`) found by
 *                      its GRE key: from_peer() then checks it as any;
 *   3. peer_ka_answer() GRE of protocol 0 is the answer to one of our
 *                      keepalives (gre_keepalive_answer(): key and
 *                      checksum checked, no sequence number): the peer is
 *                      up, its RTT measured; never to the TUN device;
 *   4. gre_decode()    (gre.c) version, flags, checksum, key, sequence;
 *   5. reflect()       an inner IPv4 GRE packet from our own address to
 *                      that same peer is the bridge's keepalive: sent back
 *                      to it, never to the TUN device, never learned;
 *   6. learn_check()   the inner source: never a martian; not one another
 *                      peer owns (its prefix, its live learned entry: a
 *                      fresh entry never moves); within the peer's budget
 *                      of entries (sources inside its own prefixes are
 *                      not learned);
 *   7. gro_verdict()   (pop_gro.c) consecutive TCP segments or UDP
 *      gro_hold()      datagrams of one flow from one peer (up to 16
 *      gro_flush()     flows at once) are held and written as one TCP or
 *                      UDP super-packet, at the latest at the batch's end;
 *      tun_write()     anything else into the TUN device behind a vnet
 *                      header: the host routes the inner packet on; what
 *                      the host's GRO
 *                      merged goes as a TCP super-packet (tcp_super), and
 *                      its GRE checksum, only the first segment's, is not
 *                      held against it (gro_merged); only once it is
 *                      written: the sequence window moves
 *                      (gre_commit_seq) and the source is learned
 *                      (learn_put), with expiry; a NAT'd peer's endpoint
 *                      (address and UDP port) is taken from it, so the
 *                      POP answers where the bridge's NAT now maps it.
 * Toward the bridges (TUN device), pop_tx.c:
 *   8. to_bridges()    read a batch, TCP super-packets among them (the
 *                      device offers TSO), each vnet header checked (a
 *                      partial checksum completed); per packet:
 *   9. route()         the longest configured prefix for the inner
 *                      destination, else a learned entry; none -> counted drop;
 *  10. split()         a super-packet cut into segments that fit the
 *                      tunnel; gre_header() with the peer's key/csum/seq
 *                      per packet; the kernel writes the outer IPv4 header
 *                      (TTL/TOS per message by cmsg, DF clear: too big is
 *                      fragmented, the bridge reassembles), a GRE-in-UDP
 *                      super-packet goes as one UDP_SEGMENT message, and
 *                      sendmmsg sends the batch.
 *
 * Keepalives are Cisco's (what Linux ip_gre reflects too; there is no RFC
 * for them): outer GRE to the far end F whose inner packet is IPv4 from F
 * back to the sender, protocol 47, carrying a bare GRE header of protocol
 * 0.  F decapsulates and routes the inner packet, which goes back as plain
 * GRE of protocol 0.
 *
 * Where: the loop, opening and the readers here; 1.-7. pop_rx.c (7. with
 * pop_gro.c); 0./3./5. keepalives pop_ka.c; 6./9. the learned table and
 * routing pop_learn.c; 8.-11. pop_tx.c; configuration and reloads
 * pop_conf.c.
 *
 * Threads: only the loop touches packets and writes counters.  Readers
 * (tpb_pop_counters, tpb_pop_peer_state, tpb_pop_learned) and the swap of
 * a new configuration take pop->lock, so no reader sees a freed peer
 * array; the loop takes it only when a reload is pending, never per packet.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/udp.h>
#include <linux/virtio_net.h>

#include "proto.h"
#include "tpb.h"

#include "pop.h"

/* Inner addresses as 16 bytes, IPv4 mapped into ::ffff:0:0/96. */
int inner_addr(const uint8_t *ip, size_t len, int dst, uint8_t out[16])
{
    if (len >= 20 && (ip[0] >> 4) == 4) {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, ip + (dst ? 16 : 12), 4);
        return ETYPE_IPV4;
    }
    if (len >= 40 && (ip[0] >> 4) == 6) {
        memcpy(out, ip + (dst ? 24 : 8), 16);
        return ETYPE_IPV6;
    }
    return 0;
}

/* ---- the loop ---------------------------------------------------------- */

int tpb_pop_run(struct tpb_pop *pop)
{
    struct pollfd pfd[4] = {
        {pop->raw, POLLIN, 0}, {pop->tun, POLLIN, 0}, {pop->stop_fd, POLLIN, 0},
        {pop->udp, POLLIN, 0},
    };
    uint64_t wakes;
    int work, rc = 0;

    pthread_mutex_lock(&pop->lock);
    pop->running = 1;
    pthread_mutex_unlock(&pop->lock);
    while (!__atomic_load_n(&pop->stop, __ATOMIC_ACQUIRE)) {
        pop->now_ns = mono_ns();
        __atomic_store_n(&pop->passes, pop->passes + 1, __ATOMIC_RELAXED);
        if (__atomic_load_n(&pop->pending, __ATOMIC_ACQUIRE))
            take_reload(pop);
        keepalives(pop);
        work = from_bridges(pop);
        work += to_bridges(pop);
        if (work)
            continue;
        if (poll(pfd, 4, poll_timeout(pop)) < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
        if ((pfd[2].revents & POLLIN) &&
            read(pop->stop_fd, &wakes, sizeof(wakes)) < 0) {
            /* EAGAIN: someone else's wake-up was read already */
        }
    }
    /* A reload handed over as the loop ended is applied here. */
    pthread_mutex_lock(&pop->lock);
    pop->running = 0;
    pthread_mutex_unlock(&pop->lock);
    take_reload(pop);
    return rc;
}

void tpb_pop_stop(struct tpb_pop *pop)
{
    uint64_t one = 1;

    __atomic_store_n(&pop->stop, 1, __ATOMIC_RELEASE);
    if (write(pop->stop_fd, &one, sizeof(one)) < 0) {
        /* the flag alone ends the loop at its next wake-up */
    }
}

/* The POP's state, no file descriptor opened yet; NULL: out of memory. */
static struct tpb_pop *pop_new(const struct tpb_pop_config *cfg,
                               const struct tpb_pop_peer_config *peers,
                               const struct tpb_pop_prefix *prefixes)
{
    struct tpb_pop *pop = calloc(1, sizeof(*pop));
    pthread_condattr_t ca;
    uint32_t i;

    if (!pop)
        return NULL;
    pthread_mutex_init(&pop->lock, NULL);
    pthread_mutex_init(&pop->reload_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&pop->applied, &ca);
    pthread_condattr_destroy(&ca);
    pop->raw = pop->stop_fd = pop->hdrincl = pop->udp = -1;
    pop->tun = cfg->tun_fd;
    pop->local = cfg->local;
    pop->tun_mtu = cfg->tun_mtu ? cfg->tun_mtu : 1500;
    pop->tun_uso = cfg->tun_uso != 0;
    pop->batch = cfg->batch && cfg->batch <= MAX_BATCH ? cfg->batch : MAX_BATCH;
    pop->learn_ns = (uint64_t)cfg->learn_timeout_s * NSEC;
    pop->npeers = cfg->npeers;
    pop->nprefixes = cfg->nprefixes;
    pop->peers = calloc(cfg->npeers + 1, sizeof(*pop->peers));
    pop->prefixes = calloc(cfg->nprefixes + 1, sizeof(*pop->prefixes));
#ifndef TPB_FUZZ
    pop->rbuf = malloc((size_t)MAX_BATCH * BUF_SIZE);
    pop->sbuf = malloc((size_t)MAX_BATCH * (BUF_SIZE + VNET_LEN));
#else
    /* fuzz/pop.c hands over one packet per call: one slot of each (and
     * 8 MB allocated and freed per input would be most of the time) */
    pop->rbuf = malloc(BUF_SIZE);
    pop->sbuf = malloc(BUF_SIZE + VNET_LEN);
#endif
    pop->tx = pop_tx_new();
    pop->gro = pop_gro_new();
    if (!pop->peers || !pop->prefixes || !pop->rbuf || !pop->sbuf || !pop->tx ||
        !pop->gro || learn_alloc(&pop->learn, cfg->npeers)) {
        tpb_pop_close(pop);
        return NULL;
    }
    for (i = 0; i < cfg->npeers; i++)
        peer_init(&pop->peers[i], &peers[i], cfg->local);
    memcpy(pop->prefixes, prefixes, cfg->nprefixes * sizeof(*prefixes));
    return pop;
}

struct tpb_pop *tpb_pop_open(const struct tpb_pop_config *cfg,
                             const struct tpb_pop_peer_config *peers,
                             const struct tpb_pop_prefix *prefixes,
                             char *err, size_t errlen)
{
    struct tpb_pop *pop;
    struct sockaddr_in sa;
    int v = IP_PMTUDISC_DONT, rcv = 8 << 20, one = 1;

    if (check_config(cfg, peers, prefixes, err, errlen))
        return NULL;
    pop = pop_new(cfg, peers, prefixes);
    if (!pop)
        goto oom;
    if (fcntl(pop->tun, F_SETFL, fcntl(pop->tun, F_GETFL) | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "TUN device: %s", strerror(errno));
        goto fail;
    }
    pop->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pop->raw = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_GRE_);
    /* IPPROTO_RAW receives nothing: not on any packet's receive path. */
    pop->hdrincl = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
    if (pop->stop_fd < 0 || pop->raw < 0 || pop->hdrincl < 0) {
        snprintf(err, errlen, "raw GRE socket: %s", strerror(errno));
        goto fail;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(cfg->local);
    if (bind(pop->raw, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        snprintf(err, errlen, "cannot use local address %s: %s",
                 inet_ntoa(sa.sin_addr), strerror(errno));
        goto fail;
    }
    setsockopt(pop->raw, IPPROTO_IP, IP_MTU_DISCOVER, &v, sizeof(v));
    if (setsockopt(pop->raw, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof(rcv)))
        setsockopt(pop->raw, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    /* Each packet then carries the socket's drop count (rx_drops()). */
    if (setsockopt(pop->raw, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one))) {
        snprintf(err, errlen, "SO_RXQ_OVFL: %s", strerror(errno));
        goto fail;
    }
    /* GRE-in-UDP (RFC 8086): one socket on port 4754 of the local address;
     * the kernel checks each datagram's UDP header and checksum and
     * reassembles fragments; DF clear as on the raw socket. */
    pop->udp = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, IPPROTO_UDP);
    sa.sin_port = htons(GRE_UDP_PORT);
    if (pop->udp < 0 || bind(pop->udp, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        snprintf(err, errlen, "cannot use UDP port %d on %s: %s", GRE_UDP_PORT,
                 inet_ntoa(sa.sin_addr), strerror(errno));
        goto fail;
    }
    setsockopt(pop->udp, IPPROTO_IP, IP_MTU_DISCOVER, &v, sizeof(v));
    if (setsockopt(pop->udp, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof(rcv)))
        setsockopt(pop->udp, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    if (setsockopt(pop->udp, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one)) ||
        setsockopt(pop->udp, IPPROTO_IP, IP_RECVTOS, &one, sizeof(one))) {
        snprintf(err, errlen, "UDP socket options: %s", strerror(errno));
        goto fail;
    }
    /* UDP GRO (Linux >= 5.0): a bridge's datagrams handed over up to 64 at
     * once (from_udp_gro()); without it, one by one as before. */
    setsockopt(pop->udp, SOL_UDP, UDP_GRO, &one, sizeof(one));
    return pop;
oom:
    snprintf(err, errlen, "out of memory");
fail:
    tpb_pop_close(pop);
    return NULL;
}

/* ---- readers, from any thread ------------------------------------------ */

void tpb_pop_counters(struct tpb_pop *pop, uint32_t peer,
                      struct tpb_tunnel_counters *out)
{
    pthread_mutex_lock(&pop->lock);
    *out = peer < pop->npeers ? pop->peers[peer].c : pop->global;
    pthread_mutex_unlock(&pop->lock);
}

uint32_t tpb_pop_learned(struct tpb_pop *pop)
{
    uint32_t i, n = 0;
    uint64_t now = mono_ns();

    pthread_mutex_lock(&pop->lock);
    for (i = 0; i <= pop->learn.mask; i++)
        n += pop->learn.e[i].expires > now;
    pthread_mutex_unlock(&pop->lock);
    return n;
}

int tpb_pop_peer_state(struct tpb_pop *pop, uint32_t peer,
                       struct tpb_remote_state *out)
{
    const struct ka *k;
    uint64_t now;

    pthread_mutex_lock(&pop->lock);
    if (peer >= pop->npeers) {
        pthread_mutex_unlock(&pop->lock);
        return -EINVAL;
    }
    now = mono_ns();
    k = &pop->peers[peer].ka;
    memset(out, 0, sizeof(*out));
    out->addr = pop->peers[peer].cfg.addr;
    if (pop->peers[peer].cfg.encap == TPB_ENCAP_UDP && pop->peers[peer].sa.sin_port) {
        out->endpoint_addr = ntohl(pop->peers[peer].sa.sin_addr.s_addr);
        out->endpoint_port = ntohs(pop->peers[peer].sa.sin_port);
    }
    out->up = out->active = k->up;
    out->transitions = k->transitions;
    out->keepalives_sent = k->sent;
    out->keepalives_unsent = k->unsent;
    out->keepalives_received = k->received;
    out->keepalives_reflected = k->reflected;
    out->rtt_ns = k->rtt_ns;
    if (k->reply_ns)   /* never 0 once answered, even within a clock tick */
        out->since_reply_ns = now > k->reply_ns ? now - k->reply_ns : 1;
    pthread_mutex_unlock(&pop->lock);
    return 0;
}

uint64_t tpb_pop_heartbeat(struct tpb_pop *pop)
{
    return __atomic_load_n(&pop->passes, __ATOMIC_RELAXED);
}

void tpb_pop_close(struct tpb_pop *pop)
{
    if (!pop)
        return;
    if (pop->raw >= 0)
        close(pop->raw);
    if (pop->hdrincl >= 0)
        close(pop->hdrincl);
    if (pop->udp >= 0)
        close(pop->udp);
    if (pop->stop_fd >= 0)
        close(pop->stop_fd);
    free(pop->peers);
    free(pop->prefixes);
    free(pop->learn.e);
    free(pop->rbuf);
    free(pop->sbuf);
    free(pop->tx);
    free(pop->gro);
    pthread_cond_destroy(&pop->applied);
    pthread_mutex_destroy(&pop->reload_lock);
    pthread_mutex_destroy(&pop->lock);
    free(pop);
}

#ifdef TPB_FUZZ
/* ---- fuzz/: the loop's steps, one at a time, on a clock of the caller's -- */

struct tpb_pop *tpb_fuzz_pop_open(const struct tpb_pop_config *cfg,
                                  const struct tpb_pop_peer_config *peers,
                                  const struct tpb_pop_prefix *prefixes)
{
    struct tpb_pop *pop;
    char err[128];

    if (check_config(cfg, peers, prefixes, err, sizeof(err)))
        return NULL;
    pop = pop_new(cfg, peers, prefixes);
    if (pop) {              /* the harness tells the sockets apart by them */
        pop->raw = TPB_FUZZ_FD_RAW;
        pop->udp = TPB_FUZZ_FD_UDP;
        pop->hdrincl = TPB_FUZZ_FD_HDRINCL;
    }
    return pop;
}

void tpb_fuzz_pop_flush(struct tpb_pop *pop)
{
    gro_flush(pop);
}

int tpb_fuzz_pop_to_bridges(struct tpb_pop *pop, uint64_t now)
{
    pop->now_ns = now;
    return to_bridges(pop);
}

void tpb_fuzz_pop_keepalives(struct tpb_pop *pop, uint64_t now)
{
    pop->now_ns = now;
    keepalives(pop);
}

/* Peer i's receive state (its sequence window); -1: no such peer. */
int tpb_fuzz_pop_rx(struct tpb_pop *pop, uint32_t i, struct gre_rx *out)
{
    if (i >= pop->npeers)
        return -1;
    *out = pop->peers[i].rx;
    return 0;
}
#endif

