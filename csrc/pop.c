/* pop.c — `tpb pop`: one GRE endpoint for many bridges, on a host with an
 * IP stack, no kernel GRE needed.  The reply to a tunneled flow finds its
 * bridge by the inner destination address (one-to-many), not by a tunnel
 * device per bridge.
 *
 * From the bridges (raw IPv4 socket, protocol 47; the host kernel has
 * already reassembled fragments):
 *   1. from_bridges()  recvmmsg a batch; per packet:
 *   2. peer_by_addr()  the outer source must be a configured bridge;
 *   3. gre_decode()    (gre.c) version, flags, checksum, key, sequence;
 *   4. learn()         inner source -> that bridge, with expiry (sources
 *                      inside a configured prefix are not learned);
 *   5. tun_write()     into the TUN device behind a vnet header: the host
 *                      routes the inner packet on; what the host's GRO
 *                      merged goes as a TCP super-packet (tcp_super), and
 *                      its GRE checksum, only the first segment's, is not
 *                      held against it (gro_merged).
 * Toward the bridges (TUN device):
 *   6. to_bridges()    read a batch (a partial checksum completed); per packet:
 *   7. route()         the longest configured prefix for the inner
 *                      destination, else a learned entry; none -> counted drop;
 *   8. gre_header()    GRE with the peer's key/csum/seq; the kernel writes
 *                      the outer IPv4 header (TTL/TOS per packet by cmsg,
 *                      DF clear: too big is fragmented, the bridge
 *                      reassembles) and sendmmsg sends the batch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
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
#include <linux/virtio_net.h>

#include "proto.h"
#include "tpb.h"

#define MAX_BATCH 64
#define BUF_SIZE 65536
#define VNET_LEN sizeof(struct virtio_net_hdr)
#define TCP_CWR 0x80
#define LEARN_SLOTS 4096
#define LEARN_PROBE 8

struct peer {
    struct tpb_pop_peer_config cfg;
    struct gre_tx tx;
    struct gre_rx rx;
    struct sockaddr_in sa;
    struct tpb_tunnel_counters c;
};

struct learned {
    uint8_t addr[16];
    uint32_t peer;
    uint64_t expires;           /* 0: free */
};

struct out_msg {
    uint8_t gre[16];
    union {
        char buf[CMSG_SPACE(sizeof(int)) * 2];
        struct cmsghdr align;
    } ctl;
};

struct tpb_pop {
    int raw, tun, stop_fd, stop;
    uint32_t npeers, nprefixes, batch, tun_mtu;
    struct peer *peers;
    struct tpb_pop_prefix *prefixes;
    struct tpb_tunnel_counters global;      /* belongs to no peer */
    struct learned learn[LEARN_SLOTS];
    uint64_t learn_ns, now_ns;
    /* receive side */
    struct mmsghdr rmsg[MAX_BATCH];
    struct iovec riov[MAX_BATCH];
    uint8_t *rbuf;
    /* send side */
    struct mmsghdr smsg[MAX_BATCH];
    struct iovec siov[MAX_BATCH][2];
    struct out_msg so[MAX_BATCH];
    uint32_t speer[MAX_BATCH];
    uint8_t *sbuf;
};

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Inner addresses as 16 bytes, IPv4 mapped into ::ffff:0:0/96. */
static int inner_addr(const uint8_t *ip, size_t len, int dst, uint8_t out[16])
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

/* 2. ------------------------------------------------------------------ */

static struct peer *peer_by_addr(struct tpb_pop *pop, uint32_t addr)
{
    uint32_t i;

    for (i = 0; i < pop->npeers; i++)
        if (pop->peers[i].cfg.addr == addr)
            return &pop->peers[i];
    return NULL;
}

/* 4. ------------------------------------------------------------------ */

static int prefix_match(const uint8_t *a, const uint8_t *p, unsigned len)
{
    unsigned full = len / 8, rest = len % 8;

    if (memcmp(a, p, full))
        return 0;
    return !rest || ((a[full] ^ p[full]) & (uint8_t)(0xff << (8 - rest))) == 0;
}

static struct peer *by_prefix(struct tpb_pop *pop, const uint8_t dst[16])
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

static void learn(struct tpb_pop *pop, const uint8_t a[16], uint32_t peer)
{
    uint32_t h = addr_hash(a), i;
    struct learned *e, *victim = NULL;

    if (by_prefix(pop, a))
        return;                 /* configured: nothing to learn */
    for (i = 0; i < LEARN_PROBE; i++) {
        e = &pop->learn[(h + i) % LEARN_SLOTS];
        if (e->expires && !memcmp(e->addr, a, 16)) {
            e->peer = peer;
            e->expires = pop->now_ns + pop->learn_ns;
            return;
        }
        /* Take a free or expired slot, else the one closest to expiry. */
        if (!victim || e->expires < victim->expires)
            victim = e;
    }
    memcpy(victim->addr, a, 16);
    victim->peer = peer;
    victim->expires = pop->now_ns + pop->learn_ns;
}

/* 5. ------------------------------------------------------------------ */

/* A TCP packet with nothing between the IP and TCP headers: where its
 * TCP header starts (*l4) and how long it is (*thl). */
static int tcp_super(const uint8_t *in, size_t ilen, uint16_t proto,
                     size_t *l4, size_t *thl)
{
    if (proto == ETYPE_IPV4) {
        if (in[9] != IPPROTO_TCP || (rd16(in + 6) & (IP_MF | IP_OFFMASK)))
            return 0;
        *l4 = (size_t)(in[0] & 0x0f) * 4;
    } else {
        if (in[6] != IPPROTO_TCP)
            return 0;
        *l4 = 40;
    }
    if (*l4 + 20 > ilen)
        return 0;
    *thl = (size_t)(in[*l4 + 12] >> 4) * 4;
    return *thl >= 20 && *l4 + *thl < ilen;
}

/* The checksum field a merge leaves: the pseudo-header sum, uncomplemented. */
static uint16_t tcp_pseudo(const uint8_t *in, size_t ilen, uint16_t proto, size_t l4)
{
    uint32_t sum = proto == ETYPE_IPV4
                       ? csum_pseudo4(in, IPPROTO_TCP, (uint32_t)(ilen - l4))
                       : csum_pseudo6(in, IPPROTO_TCP, (uint32_t)(ilen - l4));

    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* Whether a GRE packet whose checksum failed is one the host's GRO merged:
 * its inner TCP packet larger than the TUN device's MTU, its checksum field
 * the pseudo-header sum (a packet that crossed the wire, reassembled or
 * not, carries a complete one).  GRO checked every merged packet's GRE
 * checksum; the field left is only the first one's. */
static int gro_merged(const struct tpb_pop *pop, const uint8_t *g, size_t glen)
{
    uint16_t flags = rd16(g), proto = rd16(g + 2);
    size_t off = gre_hlen(!!(flags & GRE_C), !!(flags & GRE_K), !!(flags & GRE_S));
    size_t ilen, l4, thl;
    const uint8_t *in = g + off;

    if (glen <= off || (proto != ETYPE_IPV4 && proto != ETYPE_IPV6))
        return 0;
    ilen = ip_len(in, glen - off, proto);
    return ilen > pop->tun_mtu && tcp_super(in, ilen, proto, &l4, &thl) &&
           rd16(in + l4 + 16) == tcp_pseudo(in, ilen, proto, l4);
}

/* A packet larger than the TUN device's MTU did not cross the wire so: the
 * host's GRO merged GRE packets of one TCP flow (a NIC driver's GRO does,
 * for GRE without sequence numbers), and left the inner TCP checksum
 * partial.  It goes to the kernel as a super-packet of MTU-sized segments,
 * the checksum field set to the pseudo-header sum, for the egress device
 * to segment and checksum, as Linux's ip_gre hands on what GRO merged. */
static int tun_write(struct tpb_pop *pop, struct peer *p, uint8_t *in,
                     size_t ilen, uint16_t proto)
{
    struct virtio_net_hdr vh;
    struct iovec iov[2] = {{&vh, VNET_LEN}, {in, ilen}};
    size_t l4, thl;

    memset(&vh, 0, sizeof(vh));
    if (ilen > pop->tun_mtu && tcp_super(in, ilen, proto, &l4, &thl) &&
        pop->tun_mtu > l4 + thl) {
        wr16(in + l4 + 16, tcp_pseudo(in, ilen, proto, l4));
        vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh.csum_start = (uint16_t)l4;
        vh.csum_offset = 16;
        vh.gso_type = proto == ETYPE_IPV4 ? VIRTIO_NET_HDR_GSO_TCPV4
                                          : VIRTIO_NET_HDR_GSO_TCPV6;
        if (in[l4 + 13] & TCP_CWR)
            vh.gso_type |= VIRTIO_NET_HDR_GSO_ECN;
        vh.gso_size = (uint16_t)(pop->tun_mtu - l4 - thl);
        vh.hdr_len = (uint16_t)(l4 + thl);
        p->c.gso_packets++;
    }
    return writev(pop->tun, iov, 2) == (ssize_t)(VNET_LEN + ilen) ? 0 : -1;
}

/* 1. ------------------------------------------------------------------ */

static void from_bridge(struct tpb_pop *pop, uint8_t *ip, size_t n)
{
    size_t tot = ip4_check(ip, n), ihl, ilen;
    struct gre_pkt g;
    struct peer *p;
    uint8_t *in, a[16];
    int rc;

    if (!tot) {
        pop->global.drop[TPB_DROP_OUTER_BAD]++;
        return;
    }
    p = peer_by_addr(pop, rd32(ip + 12));
    if (!p) {
        pop->global.drop[TPB_DROP_NOT_PEER]++;
        return;
    }
    ihl = (size_t)(ip[0] & 0x0f) * 4;
    rc = gre_decode(&p->rx, ip + ihl, tot - ihl, 0, &g);
    if (rc == TPB_DROP_GRE_CSUM && gro_merged(pop, ip + ihl, tot - ihl))
        rc = gre_decode(&p->rx, ip + ihl, tot - ihl, 1, &g);
    if (rc) {
        p->c.drop[rc]++;
        return;
    }
    in = ip + ihl + g.off;
    ilen = ip_len(in, tot - ihl - g.off, g.proto);
    if (!ilen || inner_addr(in, ilen, 0, a) != g.proto) {
        p->c.drop[TPB_DROP_INNER_BAD]++;
        return;
    }
    if (ecn_decap_inner(ip[1], in, g.proto)) {    /* RFC 6040 4.2 */
        p->c.drop[TPB_DROP_ECN]++;
        return;
    }
    learn(pop, a, (uint32_t)(p - pop->peers));
    if (tun_write(pop, p, in, ilen, g.proto)) {
        p->c.drop[TPB_DROP_TUN_WRITE]++;
        return;
    }
    p->c.decap_packets++;
    p->c.decap_bytes += ilen;
}

static int from_bridges(struct tpb_pop *pop)
{
    int n, i;

    for (i = 0; i < (int)pop->batch; i++) {
        pop->riov[i].iov_base = pop->rbuf + (size_t)i * BUF_SIZE;
        pop->riov[i].iov_len = BUF_SIZE;
        memset(&pop->rmsg[i].msg_hdr, 0, sizeof(pop->rmsg[i].msg_hdr));
        pop->rmsg[i].msg_hdr.msg_iov = &pop->riov[i];
        pop->rmsg[i].msg_hdr.msg_iovlen = 1;
    }
    n = recvmmsg(pop->raw, pop->rmsg, pop->batch, MSG_DONTWAIT, NULL);
    for (i = 0; i < n; i++)
        from_bridge(pop, pop->riov[i].iov_base, pop->rmsg[i].msg_len);
    return n > 0 ? n : 0;
}

/* 7. ------------------------------------------------------------------ */

/* Configured prefixes win: a bridge cannot draw another site's traffic to
 * itself by sending from that site's addresses.  Learned entries serve
 * addresses no prefix covers. */
static struct peer *route(struct tpb_pop *pop, const uint8_t dst[16])
{
    uint32_t h = addr_hash(dst), i;
    struct peer *p = by_prefix(pop, dst);
    struct learned *e;

    if (p)
        return p;
    for (i = 0; i < LEARN_PROBE; i++) {
        e = &pop->learn[(h + i) % LEARN_SLOTS];
        if (e->expires > pop->now_ns && !memcmp(e->addr, dst, 16))
            return &pop->peers[e->peer];
    }
    return NULL;
}

/* 6. ------------------------------------------------------------------ */

static void add_cmsg_int(struct msghdr *m, struct cmsghdr **c, int type, int v)
{
    *c = *c ? CMSG_NXTHDR(m, *c) : CMSG_FIRSTHDR(m);
    (*c)->cmsg_level = IPPROTO_IP;
    (*c)->cmsg_type = type;
    (*c)->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(*c), &v, sizeof(int));
}

static int to_bridges(struct tpb_pop *pop)
{
    uint32_t n = 0, i, k;
    uint8_t dst[16], *pkt;
    struct virtio_net_hdr *vh;
    struct peer *p;
    struct msghdr *m;
    struct cmsghdr *c;
    ssize_t len;
    int proto, sent;
    size_t glen;

    while (n < pop->batch) {
        vh = (struct virtio_net_hdr *)(pop->sbuf + (size_t)n * (BUF_SIZE + VNET_LEN));
        pkt = (uint8_t *)vh + VNET_LEN;
        len = read(pop->tun, vh, BUF_SIZE + VNET_LEN) - (ssize_t)VNET_LEN;
        if (len <= 0)
            break;
        /* No offload was offered to the device, so the kernel sends no
         * super-packet; a partial checksum is completed all the same. */
        if ((vh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
            finish_csum(pkt, (size_t)len, vh)) {
            pop->global.drop[TPB_DROP_INNER_BAD]++;
            continue;
        }
        proto = inner_addr(pkt, (size_t)len, 1, dst);
        p = proto ? route(pop, dst) : NULL;
        if (!p) {
            pop->global.drop[proto ? TPB_DROP_NO_PEER : TPB_DROP_INNER_BAD]++;
            continue;
        }
        glen = gre_header(&p->tx, pop->so[n].gre, (uint16_t)proto, (size_t)len,
                          p->tx.csum ? csum_add(0, pkt, (size_t)len) : 0);
        m = &pop->smsg[n].msg_hdr;
        memset(m, 0, sizeof(*m));
        m->msg_name = &p->sa;
        m->msg_namelen = sizeof(p->sa);
        pop->siov[n][0].iov_base = pop->so[n].gre;
        pop->siov[n][0].iov_len = glen;
        pop->siov[n][1].iov_base = pkt;
        pop->siov[n][1].iov_len = (size_t)len;
        m->msg_iov = pop->siov[n];
        m->msg_iovlen = 2;
        m->msg_control = pop->so[n].ctl.buf;
        m->msg_controllen = sizeof(pop->so[n].ctl.buf);
        c = NULL;
        add_cmsg_int(m, &c, IP_TTL, outer_ttl(&p->tx, (uint16_t)proto, pkt));
        add_cmsg_int(m, &c, IP_TOS, outer_tos(&p->tx, (uint16_t)proto, pkt));
        pop->speer[n] = (uint32_t)(p - pop->peers);
        n++;
    }
    for (i = 0; i < n;) {
        sent = sendmmsg(pop->raw, &pop->smsg[i], n - i, 0);
        if (sent <= 0) {
            if (sent < 0 && errno == EINTR)
                continue;
            pop->peers[pop->speer[i]].c.drop[TPB_DROP_SEND]++;
            i++;
            continue;
        }
        for (k = i; k < i + (uint32_t)sent; k++) {
            pop->peers[pop->speer[k]].c.encap_packets++;
            pop->peers[pop->speer[k]].c.encap_bytes += pop->siov[k][1].iov_len;
        }
        i += (uint32_t)sent;
    }
    return (int)n;
}

/* ------------------------------------------------------------------ */

int tpb_pop_run(struct tpb_pop *pop)
{
    struct pollfd pfd[3] = {
        {pop->raw, POLLIN, 0}, {pop->tun, POLLIN, 0}, {pop->stop_fd, POLLIN, 0},
    };
    int work;

    while (!__atomic_load_n(&pop->stop, __ATOMIC_ACQUIRE)) {
        pop->now_ns = now_ns();
        work = from_bridges(pop);
        work += to_bridges(pop);
        if (work)
            continue;
        if (poll(pfd, 3, -1) < 0 && errno != EINTR)
            return -errno;
    }
    return 0;
}

void tpb_pop_stop(struct tpb_pop *pop)
{
    uint64_t one = 1;

    __atomic_store_n(&pop->stop, 1, __ATOMIC_RELEASE);
    if (write(pop->stop_fd, &one, sizeof(one)) < 0) {
        /* the flag alone ends the loop at its next wake-up */
    }
}

static void gre_side(struct peer *p, uint32_t local)
{
    const struct tpb_pop_peer_config *c = &p->cfg;

    gre_setup(&p->tx, &p->rx, local, c->addr, c->key, c->has_key, c->csum,
              c->seq, c->ttl, c->tos);
    p->sa.sin_family = AF_INET;
    p->sa.sin_addr.s_addr = htonl(c->addr);
}

struct tpb_pop *tpb_pop_open(const struct tpb_pop_config *cfg,
                             const struct tpb_pop_peer_config *peers,
                             const struct tpb_pop_prefix *prefixes,
                             char *err, size_t errlen)
{
    struct tpb_pop *pop = calloc(1, sizeof(*pop));
    struct sockaddr_in sa;
    int v = IP_PMTUDISC_DONT, rcv = 8 << 20;
    uint32_t i;

    if (!pop)
        goto oom;
    pop->raw = pop->stop_fd = -1;
    pop->tun = cfg->tun_fd;
    pop->tun_mtu = cfg->tun_mtu ? cfg->tun_mtu : 1500;
    pop->batch = cfg->batch && cfg->batch <= MAX_BATCH ? cfg->batch : MAX_BATCH;
    pop->learn_ns = (uint64_t)cfg->learn_timeout_s * 1000000000ull;
    pop->npeers = cfg->npeers;
    pop->nprefixes = cfg->nprefixes;
    pop->peers = calloc(cfg->npeers + 1, sizeof(*pop->peers));
    pop->prefixes = calloc(cfg->nprefixes + 1, sizeof(*pop->prefixes));
    pop->rbuf = malloc((size_t)MAX_BATCH * BUF_SIZE);
    pop->sbuf = malloc((size_t)MAX_BATCH * (BUF_SIZE + VNET_LEN));
    if (!pop->peers || !pop->prefixes || !pop->rbuf || !pop->sbuf)
        goto oom;
    for (i = 0; i < cfg->npeers; i++) {
        pop->peers[i].cfg = peers[i];
        gre_side(&pop->peers[i], cfg->local);
    }
    memcpy(pop->prefixes, prefixes, cfg->nprefixes * sizeof(*prefixes));
    if (fcntl(pop->tun, F_SETFL, fcntl(pop->tun, F_GETFL) | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "TUN device: %s", strerror(errno));
        goto fail;
    }
    pop->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pop->raw = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_GRE_);
    if (pop->stop_fd < 0 || pop->raw < 0) {
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
    return pop;
oom:
    snprintf(err, errlen, "out of memory");
fail:
    tpb_pop_close(pop);
    return NULL;
}

void tpb_pop_counters(struct tpb_pop *pop, uint32_t peer,
                      struct tpb_tunnel_counters *out)
{
    *out = peer < pop->npeers ? pop->peers[peer].c : pop->global;
}

uint32_t tpb_pop_learned(struct tpb_pop *pop)
{
    uint32_t i, n = 0;

    uint64_t now = now_ns();

    for (i = 0; i < LEARN_SLOTS; i++)
        n += pop->learn[i].expires > now;
    return n;
}

void tpb_pop_close(struct tpb_pop *pop)
{
    if (!pop)
        return;
    if (pop->raw >= 0)
        close(pop->raw);
    if (pop->stop_fd >= 0)
        close(pop->stop_fd);
    free(pop->peers);
    free(pop->prefixes);
    free(pop->rbuf);
    free(pop->sbuf);
    free(pop);
}

/* ---- contract stubs: replaced by the keepalive/reload work ---- */

int tpb_pop_peer_state(struct tpb_pop *pop, uint32_t peer,
                       struct tpb_remote_state *out)
{
    return -ENOSYS;
}

int tpb_pop_reconfigure(struct tpb_pop *pop, const struct tpb_pop_config *cfg,
                        const struct tpb_pop_peer_config *peers,
                        const struct tpb_pop_prefix *prefixes,
                        char *err, size_t errlen)
{
    snprintf(err, errlen, "live reload is not implemented yet");
    return -ENOSYS;
}

uint64_t tpb_pop_heartbeat(struct tpb_pop *pop)
{
    return 0;
}
