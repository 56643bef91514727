/* pop.c — the POP's receive and send paths (csrc/pop.c) without sockets:
 * packets from the bridges (what the raw socket hands over: outer IPv4 on)
 * through from_bridge(), packets from the TUN device (a vnet header in
 * front) through to_bridges(), the keepalive step and live reloads on a
 * fake clock.  The harness stands in for the TUN device and the raw socket
 * (tpb_fuzz_read/writev/sendmsg/sendmmsg, below), can make them refuse,
 * and keeps its own model of the learned sources.  Invariants:
 * fuzz/README.md. */
#include "fuzz.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/uio.h>
#include <sanitizer/asan_interface.h>

#define MAX_OPS 48
#define MAX_PKT 9100
#define MAX_PEERS 4
#define MAX_PREFIXES 4
/* a super-packet read from the TUN device may leave as thousands of
 * segments (a gso_size of 1 over MAX_PKT bytes) */
#define MAX_IO 16384
#define MAX_LEARN 64
#define POP_LOCAL 0xc6336422u          /* 198.51.100.34 */

static const uint32_t pool[5] = {      /* the bridges' tunnel addresses */
    0xc6336403u, 0xc6336413u, 0xc6336423u, 0xc6336433u, 0xc0000201u,
};

/* ---- the TUN device and the raw socket ---- */

enum { IO_TUN, IO_SEND, IO_SENDMM, IO_SENDTO };

struct io {
    int kind, failed;
    int refused;                /* a UDP GSO message refused (fail_gso) */
    int fd;                     /* TPB_FUZZ_FD_*: which socket */
    uint32_t dst;
    uint16_t port;
    int ttl, tos;
    uint16_t gso_size;          /* UDP_SEGMENT; 0: none */
    struct virtio_net_hdr vh;   /* IO_TUN */
    uint8_t *data;
    size_t len;
};

static struct io ios[MAX_IO];
static size_t nios;
static int fail_tun, fail_send;
/* the UDP socket refuses GSO messages (EMSGSIZE: a path MTU below the
 * datagrams), as a route with a lower MTU toward a bridge makes it do */
static int fail_gso;
/* how the TUN device refuses a write (fail_tun): the errno, 0 a short write */
static const int tun_errnos[6] = {EIO, EAGAIN, ENOBUFS, ENOMEM, EINVAL, 0};
static int tun_errno;
static const uint8_t *tun_pkt;     /* what the next read() returns */
static size_t tun_len;
static struct virtio_net_hdr tun_vh;
static uint8_t *poisoned;
static size_t poisoned_len;

static void ios_clear(void)
{
    while (nios)
        free(ios[--nios].data);
}

static struct io *io_new(int kind, const struct iovec *iov, size_t n, size_t skip)
{
    struct io *o;
    size_t k, at = 0, len = 0;

    FZ_CHECK(nios < MAX_IO, "too much I/O");
    o = &ios[nios++];
    memset(o, 0, sizeof(*o));
    o->kind = kind;
    for (k = 0; k < n; k++)
        len += iov[k].iov_len;
    FZ_CHECK(len >= skip, "I/O shorter than its header");
    o->data = malloc(len ? len : 1);
    if (!o->data)
        abort();
    for (k = 0; k < n; k++) {
        memcpy(o->data + at, iov[k].iov_base, iov[k].iov_len);
        at += iov[k].iov_len;
    }
    if (skip) {
        memcpy(&o->vh, o->data, skip);
        memmove(o->data, o->data + skip, len - skip);
    }
    o->len = len - skip;
    return o;
}

static int fd_udp(const struct io *o)
{
    return o->fd == TPB_FUZZ_FD_UDP;
}

static void msg_meta(struct io *o, const struct msghdr *m)
{
    const struct sockaddr_in *sa = m->msg_name;
    struct cmsghdr *c;

    FZ_CHECK(sa && m->msg_namelen == sizeof(*sa) && sa->sin_family == AF_INET,
             "send: no IPv4 destination");
    o->dst = ntohl(sa->sin_addr.s_addr);
    o->port = ntohs(sa->sin_port);
    o->ttl = o->tos = -1;
    for (c = CMSG_FIRSTHDR((struct msghdr *)m); c; c = CMSG_NXTHDR((struct msghdr *)m, c)) {
        int v;

        if (c->cmsg_level == SOL_UDP) {
            FZ_CHECK(c->cmsg_type == UDP_SEGMENT && c->cmsg_len == CMSG_LEN(sizeof(uint16_t)) &&
                         fd_udp(o),
                     "send: odd UDP cmsg");
            memcpy(&o->gso_size, CMSG_DATA(c), sizeof(o->gso_size));
            FZ_CHECK(o->gso_size > 0 && o->len > o->gso_size &&
                         o->len <= (size_t)o->gso_size * 64,
                     "send: UDP_SEGMENT %u for %zu bytes", o->gso_size, o->len);
            continue;
        }
        FZ_CHECK(c->cmsg_level == IPPROTO_IP && c->cmsg_len == CMSG_LEN(sizeof(int)),
                 "send: odd cmsg");
        memcpy(&v, CMSG_DATA(c), sizeof(v));
        if (c->cmsg_type == IP_TTL)
            o->ttl = v;
        else if (c->cmsg_type == IP_TOS)
            o->tos = v;
    }
    FZ_CHECK(o->ttl >= 0 && o->ttl <= 255 && o->tos >= 0 && o->tos <= 255,
             "send: TTL %d / TOS %d", o->ttl, o->tos);
}

ssize_t tpb_fuzz_read(int fd, void *buf, size_t n)
{
    if (!tun_pkt) {
        errno = EAGAIN;
        return -1;
    }
    FZ_CHECK(n >= VNET_LEN + tun_len, "read: buffer of %zu bytes", n);
    memcpy(buf, &tun_vh, VNET_LEN);
    memcpy((uint8_t *)buf + VNET_LEN, tun_pkt, tun_len);
    /* what lies past the packet is not the packet's */
    poisoned = (uint8_t *)buf + VNET_LEN + tun_len;
    poisoned_len = n - VNET_LEN - tun_len;
    ASAN_POISON_MEMORY_REGION(poisoned, poisoned_len);
    tun_pkt = NULL;
    return (ssize_t)(VNET_LEN + tun_len);
}

ssize_t tpb_fuzz_writev(int fd, const struct iovec *iov, int n)
{
    struct io *o = io_new(IO_TUN, iov, (size_t)n, VNET_LEN);

    if (fail_tun) {
        o->failed = 1;
        if (!tun_errno)
            return (ssize_t)(VNET_LEN + o->len) - 1;
        errno = tun_errno;
        return -1;
    }
    return (ssize_t)(VNET_LEN + o->len);
}

ssize_t tpb_fuzz_sendmsg(int fd, const struct msghdr *m, int flags)
{
    struct io *o = io_new(IO_SEND, m->msg_iov, m->msg_iovlen, 0);

    o->fd = fd;
    msg_meta(o, m);
    if (fail_send) {
        o->failed = 1;
        errno = ENOBUFS;
        return -1;
    }
    return (ssize_t)o->len;
}

/* The IP_HDRINCL socket: a whole IPv4 packet (a reflected keepalive). */
ssize_t tpb_fuzz_sendto(int fd, const void *buf, size_t n, int flags,
                        const struct sockaddr *sa, socklen_t salen)
{
    struct iovec iov = {(void *)buf, n};
    struct io *o = io_new(IO_SENDTO, &iov, 1, 0);
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

    FZ_CHECK(sa && salen == sizeof(*in) && in->sin_family == AF_INET,
             "sendto: no IPv4 destination");
    o->fd = fd;
    o->dst = ntohl(in->sin_addr.s_addr);
    o->ttl = o->tos = -1;
    if (fail_send) {
        o->failed = 1;
        errno = ENOBUFS;
        return -1;
    }
    return (ssize_t)n;
}

int tpb_fuzz_sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
{
    unsigned int i;

    for (i = 0; i < n; i++) {
        struct io *o = io_new(IO_SENDMM, v[i].msg_hdr.msg_iov, v[i].msg_hdr.msg_iovlen, 0);

        o->fd = fd;
        msg_meta(o, &v[i].msg_hdr);
        if (fail_send) {
            o->failed = 1;
            errno = EPERM;
            return -1;
        }
        if (fail_gso && o->gso_size) {
            o->failed = o->refused = 1;
            errno = EMSGSIZE;
            return i ? (int)i : -1;
        }
        v[i].msg_len = (unsigned int)o->len;
    }
    return (int)n;
}

/* ---- the harness's view of the configuration ---- */

struct learned {
    uint8_t addr[16];
    uint64_t peer;              /* its peer_id() */
    uint64_t expires;           /* what learn() set then */
};

struct h {
    struct tpb_pop *pop;
    struct tpb_pop_config cfg;
    struct tpb_pop_peer_config peers[MAX_PEERS];
    struct tpb_pop_prefix prefixes[MAX_PREFIXES];
    uint64_t now;
    struct learned learned[MAX_LEARN];
    size_t nlearned;
    int64_t seq[MAX_PEERS];     /* the next GRE sequence number, -1: unknown */
    struct {                    /* the inner IP IDs of the last keepalives sent */
        uint32_t addr;
        uint16_t id[16];
        uint32_t n;
    } ka[8];
    uint32_t ovfl;              /* the last SO_RXQ_OVFL count taken */
    struct {                    /* a NAT'd peer's endpoint; port 0: none */
        uint32_t addr;
        uint16_t port;
    } ep[MAX_PEERS];
    uint8_t gso_off[MAX_PEERS]; /* its path refused UDP GSO (fail_gso) */
};

struct counters {
    struct tpb_tunnel_counters c[MAX_PEERS + 1];
    struct tpb_remote_state st[MAX_PEERS];
};

static void snap(struct h *h, struct counters *s)
{
    uint32_t i;

    for (i = 0; i <= h->cfg.npeers; i++)
        tpb_pop_counters(h->pop, i, &s->c[i]);
    for (i = 0; i < h->cfg.npeers; i++)
        FZ_CHECK(tpb_pop_peer_state(h->pop, i, &s->st[i]) == 0, "peer state refused");
}

static uint64_t drops(struct h *h, const struct counters *a, const struct counters *b,
                      int *reason, int *who)
{
    uint64_t d = 0;
    int r;
    uint32_t i;

    *reason = -1;
    *who = -1;
    for (i = 0; i <= h->cfg.npeers; i++) {
        uint64_t x = fz_tc_drops(&a->c[i], &b->c[i], &r);

        if (x) {
            *reason = r;
            *who = (int)i;
        }
        d += x;
    }
    return d;
}

/* What names a peer across reloads: its address, or behind NAT (any)
 * its key (never 0). */
static uint64_t peer_id(const struct tpb_pop_peer_config *c)
{
    return c->addr ? c->addr : 1ull << 32 | c->key;
}

static int peer_by_id(const struct h *h, uint64_t id)
{
    uint32_t i;

    for (i = 0; i < h->cfg.npeers; i++)
        if (peer_id(&h->peers[i]) == id)
            return (int)i;
    return -1;
}

/* The peer at addr whose encapsulation is encap (peer_index: any). */
static int peer_at(const struct h *h, uint32_t addr, int encap)
{
    uint32_t i;

    for (i = 0; i < h->cfg.npeers; i++)
        if (h->peers[i].addr == addr && (encap < 0 || h->peers[i].encap == encap))
            return (int)i;
    return -1;
}

static int peer_index(const struct h *h, uint32_t addr)
{
    return peer_at(h, addr, -1);
}

/* GRE-in-UDP from src, its payload g: the udp peer at src, else the NAT'd
 * peer whose key the GRE header carries (the key is all that tells two
 * bridges behind one NAT apart). */
static int peer_of_udp(const struct h *h, uint32_t src, const uint8_t *g, size_t glen)
{
    int p = peer_at(h, src, TPB_ENCAP_UDP);
    uint16_t fl;
    uint32_t i;

    if (p >= 0 || glen < 4)
        return p;
    fl = fz_rd16(g);
    if (!(fl & GRE_K) || glen < (fl & GRE_C ? 12u : 8u))
        return -1;
    for (i = 0; i < h->cfg.npeers; i++)
        if (!h->peers[i].addr && h->peers[i].has_key &&
            h->peers[i].key == fz_rd32(g + (fl & GRE_C ? 8 : 4)))
            return (int)i;
    return -1;
}

/* Where the POP must send peer i's packets: GRE to its address; GRE-in-UDP
 * to its address and port 4754, or behind NAT to the endpoint its last
 * accepted packet came from (port 0: none yet). */
static void endpoint(const struct h *h, int i, uint32_t *addr, uint16_t *port)
{
    const struct tpb_pop_peer_config *c = &h->peers[i];

    *addr = c->addr;
    *port = 0;
    if (c->encap == TPB_ENCAP_UDP && c->addr)
        *port = FZ_GRE_UDP_PORT;
    else if (c->encap == TPB_ENCAP_UDP) {
        *addr = h->ep[i].port ? h->ep[i].addr : 0;
        *port = h->ep[i].port;
    }
}

/* The POP's idea of each peer's endpoint is the model's: learned only from
 * accepted packets. */
static void check_endpoints(struct h *h)
{
    struct tpb_remote_state st;
    uint32_t i, a;
    uint16_t port;

    for (i = 0; i < h->cfg.npeers; i++) {
        FZ_CHECK(tpb_pop_peer_state(h->pop, i, &st) == 0, "peer state refused");
        endpoint(h, (int)i, &a, &port);
        if (h->peers[i].encap != TPB_ENCAP_UDP)
            a = port = 0;
        FZ_CHECK(st.endpoint_addr == (port ? a : 0) && st.endpoint_port == port,
                 "peer %u's endpoint %08x:%u, not %08x:%u", i, st.endpoint_addr,
                 st.endpoint_port, a, port);
    }
}

static void addr16(const uint8_t *ip, int dst, uint8_t out[16])
{
    if (ip[0] >> 4 == 4) {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, ip + (dst ? 16 : 12), 4);
    } else {
        memcpy(out, ip + (dst ? 24 : 8), 16);
    }
}

/* The longest configured prefix for a (the last one of equal length). */
static int lpm(const struct h *h, const uint8_t a[16])
{
    uint32_t i, best = 0;
    int p = -1;

    for (i = 0; i < h->cfg.nprefixes; i++) {
        const struct tpb_pop_prefix *x = &h->prefixes[i];
        unsigned full = x->len / 8, rest = x->len % 8;

        if (x->len < best || memcmp(a, x->addr, full) ||
            (rest && ((a[full] ^ x->addr[full]) & (uint8_t)(0xff << (8 - rest)))))
            continue;
        best = x->len;
        p = (int)x->peer;
    }
    return p;
}

/* Sources no router forwards, never learned nor written (RFC 1812 5.3.7,
 * RFC 3927 2.7, RFC 4291 2.5.2/2.5.3/2.5.5.2/2.5.6/2.7), the POP's own. */
static int model_martian(const uint8_t a[16], int v4)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    size_t i;

    if (v4)                     /* a: IPv4 mapped */
        return a[12] == 0 || a[12] == 127 || (a[12] & 0xf0) >= 0xe0 ||
               (a[12] == 169 && a[13] == 254) || fz_rd32(a + 12) == POP_LOCAL;
    /* an IPv6 source: IPv4-mapped never on the wire */
    if (!memcmp(a, mapped, 12) || a[0] == 0xff || (a[0] == 0xfe && (a[1] & 0xc0) == 0x80))
        return 1;
    for (i = 0; i < 15 && !a[i]; i++)
        ;
    return i == 15 && a[15] <= 1;
}

/* The peer a configured prefix (the longest) routes a to, else a live
 * learned entry; -1: none. */
static int route(const struct h *h, const uint8_t a[16]);

/* The peer a live learned entry routes a to (its peer_id), 0: none. */
static uint64_t model_owner(const struct h *h, const uint8_t a[16])
{
    size_t i;

    for (i = 0; i < h->nlearned; i++)
        if (!memcmp(h->learned[i].addr, a, 16) && h->learned[i].expires > h->now)
            return h->learned[i].peer;
    return 0;
}

static int route(const struct h *h, const uint8_t a[16])
{
    return lpm(h, a) >= 0 ? lpm(h, a) : model_owner(h, a) ? peer_by_id(h, model_owner(h, a)) : -1;
}

static void model_learn(struct h *h, const uint8_t a[16], uint64_t peer_addr)
{
    size_t i;

    if (lpm(h, a) >= 0)
        return;
    for (i = 0; i < h->nlearned && memcmp(h->learned[i].addr, a, 16); i++)
        ;
    if (i == h->nlearned) {
        if (h->nlearned == MAX_LEARN)
            return;
        h->nlearned++;
    }
    memcpy(h->learned[i].addr, a, 16);
    h->learned[i].peer = peer_addr;
    h->learned[i].expires = h->now + (uint64_t)h->cfg.learn_timeout_s * 1000000000ull;
}

static void ka_id_record(struct h *h, uint32_t addr, uint16_t id)
{
    size_t i;

    for (i = 0; i < 8 && h->ka[i].addr && h->ka[i].addr != addr; i++)
        ;
    if (i == 8)
        return;
    h->ka[i].addr = addr;
    h->ka[i].id[h->ka[i].n++ % 16] = id;
}

static int ka_id_sent(const struct h *h, uint32_t addr, uint16_t id)
{
    size_t i, k;

    for (i = 0; i < 8 && h->ka[i].addr; i++)
        if (h->ka[i].addr == addr)
            for (k = 0; k < 16 && k < h->ka[i].n; k++)
                if (h->ka[i].id[k] == id)
                    return 1;
    return 0;
}

/* ---- configuration from the input ---- */

static void read_config(struct h *h, struct fz_in *in)
{
    static const uint32_t learn_s[4] = {300, 0, 1, 4294967};
    uint8_t b = fz_u8(in);
    uint32_t i;

    memset(h->peers, 0, sizeof(h->peers));
    memset(h->prefixes, 0, sizeof(h->prefixes));
    h->cfg.local = POP_LOCAL;
    h->cfg.tun_fd = -1;
    h->cfg.npeers = 1 + b % MAX_PEERS;
    h->cfg.learn_timeout_s = learn_s[(b >> 2) & 3];
    h->cfg.batch = 64;
    h->cfg.tun_mtu = (b & 0x10) ? 68 + fz_u16(in) % (9000 - 68 + 1) : 1500;
    for (i = 0; i < h->cfg.npeers; i++) {
        struct tpb_pop_peer_config *p = &h->peers[i];
        uint8_t f = fz_u8(in), k;

        p->addr = pool[f & 3];
        p->has_key = (f >> 2) & 1;
        p->csum = (f >> 3) & 1;
        p->seq = (f >> 4) & 1;
        k = fz_u8(in);
        /* its top bits: GRE-in-UDP, and behind NAT (any: checked as
         * check_config() would, needing udp and a key and taking no
         * keepalives, or refused) */
        p->key = k & 0x3f;
        p->encap = (k & 0x40) ? TPB_ENCAP_UDP : TPB_ENCAP_GRE;
        if (k & 0x80)
            p->addr = 0;
        p->ttl = (f & 0x20) ? -1 : 64;
        p->tos = (f & 0x40) ? -1 : 0;
        if (f & 0x80) {
            p->keepalive_ms = 1000;
            p->keepalive_retries = 3;
        }
    }
    h->cfg.nprefixes = (b >> 5) % (MAX_PREFIXES + 1);
    for (i = 0; i < h->cfg.nprefixes; i++) {
        struct tpb_pop_prefix *x = &h->prefixes[i];
        uint8_t f = fz_u8(in), l = fz_u8(in);

        if (f & 1) {                  /* IPv6 2001:db8::/32 and bytes */
            x->addr[0] = 0x20;
            x->addr[1] = 0x01;
            x->addr[2] = 0x0d;
            x->addr[3] = 0xb8;
            x->addr[15] = fz_u8(in);
            x->len = l % 129;
        } else {                      /* IPv4 192.0.2.x */
            x->addr[10] = x->addr[11] = 0xff;
            x->addr[12] = 192;
            x->addr[14] = 2;
            x->addr[15] = fz_u8(in);
            x->len = (uint8_t)(96 + l % 33);
        }
        x->peer = (uint32_t)((f >> 1) % h->cfg.npeers);
    }
    /* a TUN device without USO (a kernel before 6.2) when the first peer's
     * key has bit 5: no byte of its own, so the corpus keeps its meaning */
    h->cfg.tun_uso = !(h->peers[0].key & 0x20);
}

/* ---- checks ---- */

static void check_tun(struct h *h, const struct io *o, const uint8_t *ip, int p)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, tot = fz_rd16(ip + 2), gh, avail, i, l4;
    const uint8_t *g = ip + ihl, *src, *in = o->data;
    uint16_t proto = fz_rd16(g + 2);
    size_t len = o->len;
    const struct virtio_net_hdr *v = &o->vh;
    int v4 = proto == ETYPE_IPV4;
    uint8_t *cp, a[16], l4p = 0;

    gh = fz_gre_hlen(fz_rd16(g));
    FZ_CHECK(tot >= ihl + gh, "POP: GRE header past the packet, yet decapsulated");
    avail = tot - ihl - gh;
    src = g + gh;
    FZ_CHECK(len <= avail && len >= 1 && in[0] >> 4 == (v4 ? 4 : 6) && fz_ip_len(in, len) == len,
             "POP: TUN packet invalid, or not the length written (%zu)", len);
    {
        uint8_t st = v4 ? src[1] : (uint8_t)((src[0] & 0x0f) << 4 | src[1] >> 4);
        uint8_t ot = v4 ? in[1] : (uint8_t)((in[0] & 0x0f) << 4 | in[1] >> 4);
        int e = fz_ecn_decap(ip[1], st);

        FZ_CHECK(e >= 0 && (ot & 3) == e && (ot & ~3) == (st & ~3), "POP: ECN");
    }
    l4 = fz_l4_off(in, len, &l4p);
    cp = malloc(len);
    if (!cp)
        abort();
    memcpy(cp, src, len);
    cp[1] = in[1];
    if (v4) {
        cp[10] = in[10];
        cp[11] = in[11];
    }
    if (!fz_vnet_zero(v)) {
        size_t thl;

        FZ_CHECK(l4 && l4p == IPPROTO_TCP_, "POP: a super-packet that is not TCP");
        thl = (size_t)(in[l4 + 12] >> 4) * 4;
        FZ_CHECK(len > h->cfg.tun_mtu && v->flags == VIRTIO_NET_HDR_F_NEEDS_CSUM &&
                     v->csum_start == l4 && v->csum_offset == 16 && thl >= 20 &&
                     v->hdr_len == l4 + thl && l4 + thl < len &&
                     v->gso_size == h->cfg.tun_mtu - l4 - thl && v->gso_size > 0 &&
                     (v->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) ==
                         (v4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6) &&
                     !!(v->gso_type & VIRTIO_NET_HDR_GSO_ECN) == !!(in[l4 + 13] & 0x80),
                 "POP: super-packet's vnet header");
        {
            uint32_t s = fz_pseudo(in, IPPROTO_TCP_, (uint32_t)(len - l4));

            while (s >> 16)
                s = (s & 0xffff) + (s >> 16);
            FZ_CHECK(fz_rd16(in + l4 + 16) == s, "POP: super-packet's partial checksum");
        }
        cp[l4 + 16] = in[l4 + 16];
        cp[l4 + 17] = in[l4 + 17];
    } else if (l4 && l4p == IPPROTO_TCP_ && len > h->cfg.tun_mtu) {
        size_t thl = (size_t)(in[l4 + 12] >> 4) * 4;

        FZ_CHECK(!(thl >= 20 && l4 + thl < len && h->cfg.tun_mtu > l4 + thl),
                 "POP: a TCP packet over the TUN MTU written whole");
    }
    FZ_CHECK(!memcmp(cp, in, len), "POP: inner packet changed");
    free(cp);
    for (i = 0; i < 16; i++)
        a[i] = 0;
    addr16(in, 0, a);
    /* a peer is believed only for sources the POP routes back to it */
    FZ_CHECK(!model_martian(a, v4), "POP: a martian source written");
    FZ_CHECK(lpm(h, a) >= 0 ? lpm(h, a) == p
                            : !model_owner(h, a) || model_owner(h, a) == peer_id(&h->peers[p]),
             "POP: a source another peer owns written");
    if (!o->failed)
        model_learn(h, a, peer_id(&h->peers[p]));    /* only once written */
}

/* A packet dropped for its inner source: what the model says of it. */
static void check_source_drop(struct h *h, const uint8_t *ip, size_t tot, int p, int reason)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, gh;
    const uint8_t *in;
    uint8_t a[16];
    int owner, v4;

    gh = fz_gre_hlen(fz_rd16(ip + ihl));
    in = ip + ihl + gh;
    FZ_CHECK(tot >= ihl + gh + 20 && (in[0] >> 4 == 4 || tot >= ihl + gh + 40),
             "POP: %s without an inner header", tpb_drop_name(reason));
    addr16(in, 0, a);
    v4 = in[0] >> 4 == 4;
    owner = lpm(h, a);
    if (reason == TPB_DROP_INNER_MARTIAN) {
        FZ_CHECK(model_martian(a, v4), "POP: inner_martian for a source routers forward");
    } else if (reason == TPB_DROP_SOURCE_OWNED) {
        FZ_CHECK(!model_martian(a, v4) &&
                     (owner >= 0 ? owner != p
                                 : model_owner(h, a) && model_owner(h, a) != peer_id(&h->peers[p])),
                 "POP: source_owned for a source no other peer owns");
    } else {                    /* learn_full: only a new entry needed room */
        FZ_CHECK(!model_martian(a, v4) && owner < 0 && model_owner(h, a) != peer_id(&h->peers[p]),
                 "POP: learn_full for a source with nothing to learn");
    }
}

/* A reflection: the inner packet as it came, its IPv4 header (the ID)
 * included, through the IP_HDRINCL socket to the peer.  GRE-in-UDP: the
 * inner UDP to port 4754 from us; a NAT'd peer's goes to the endpoint this
 * packet came from (src:sport), its destination address and port made
 * that, the checksums updated (a valid UDP checksum stays valid, 0 stays
 * 0), nothing else changed. */
static void check_reflect(struct h *h, const struct io *o, const uint8_t *ip, int p,
                          uint32_t src, uint16_t sport)
{
    const struct tpb_pop_peer_config *c = &h->peers[p];
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, gh = fz_gre_hlen(fz_rd16(ip + ihl)), iihl, i;
    const uint8_t *in = ip + ihl + gh, *u, *ou;
    int udp = c->encap == TPB_ENCAP_UDP;
    uint32_t to = udp && !c->addr ? src : c->addr;
    uint16_t port = udp && !c->addr ? sport : FZ_GRE_UDP_PORT;

    FZ_CHECK(o->kind == IO_SENDTO && o->fd == TPB_FUZZ_FD_HDRINCL && o->dst == to,
             "reflection: not to its peer");
    FZ_CHECK(in[0] >> 4 == 4 && in[9] == (udp ? IPPROTO_UDP_ : IPPROTO_GRE_) &&
                 fz_rd32(in + 12) == POP_LOCAL && (!c->addr || fz_rd32(in + 16) == c->addr) &&
                 !(fz_rd16(in + 6) & (IP_MF | IP_OFFMASK)),
             "reflection: not a keepalive from us to that peer");
    iihl = (size_t)(in[0] & 0x0f) * 4;
    FZ_CHECK(o->len == fz_rd16(in + 2) && o->len >= iihl + (udp ? 8 : 0) + 4,
             "reflection: not the inner packet's length");
    if (!udp) {
        FZ_CHECK(!memcmp(o->data, in, o->len), "reflection: not the inner packet as it came");
        return;
    }
    u = in + iihl;
    ou = o->data + iihl;
    FZ_CHECK(fz_rd16(u + 2) == FZ_GRE_UDP_PORT, "reflection: not to port 4754");
    FZ_CHECK(fz_rd32(o->data + 16) == to && fz_rd16(ou + 2) == port && fz_ip4_csum_ok(o->data),
             "reflection: not to the peer's endpoint, or its IPv4 checksum");
    for (i = 0; i < o->len; i++)
        FZ_CHECK((i >= 10 && i < 12) || (i >= 16 && i < 20) ||
                     (i >= iihl + 2 && i < iihl + 4) || (i >= iihl + 6 && i < iihl + 8) ||
                     o->data[i] == in[i],
                 "reflection: byte %zu changed", i);
    if (!fz_rd16(u + 6))
        FZ_CHECK(!fz_rd16(ou + 6), "reflection: a UDP checksum where there was none");
    else if (fz_l4_csum_ok(in, iihl, o->len, IPPROTO_UDP_))
        FZ_CHECK(fz_rd16(ou + 6) && fz_l4_csum_ok(o->data, iihl, o->len, IPPROTO_UDP_),
                 "reflection: UDP checksum broken");
}

/* A packet from a bridge: through the raw GRE socket (outer IPv4 on), or
 * with udp through the UDP socket (the payload, from src:sport, the outer
 * TOS).  The checks see both as the raw socket's: a GRE-in-UDP datagram
 * is checked behind an outer IPv4 header the harness puts in front of its
 * payload (what the UDP socket hides). */
static void from_bridge_op(struct h *h, struct fz_in *in, uint8_t *buf, int udp)
{
    uint8_t fl = fz_u8(in), tos = udp ? fz_u8(in) : 0, *pkt;
    uint16_t sport = udp ? fz_u16(in) : 0, id;
    size_t len = fz_u16(in) % MAX_PKT, tot, plen;
    uint32_t src = 0;
    struct counters b, a;
    struct fz_l4 l4;
    int reason, who, p = -1, delivered;
    uint64_t d;
    struct gre_rx rx[MAX_PEERS];
    uint32_t i;

    if (udp) {
        /* IPv4 + UDP to 4754 in front of the payload, for the fix-up */
        src = pool[((fl >> 1) & 7) % 5];
        len = fz_bytes(in, buf + 28, len < MAX_PKT - 28 ? len : MAX_PKT - 28);
        memset(buf, 0, 28);
        buf[0] = 0x45;
        buf[1] = tos;
        fz_wr16(buf + 2, (uint16_t)(28 + len));
        buf[8] = 64;
        buf[9] = IPPROTO_UDP_;
        fz_wr32(buf + 12, src);
        fz_wr32(buf + 16, POP_LOCAL);
        fz_wr16(buf + 20, sport);
        fz_wr16(buf + 22, FZ_GRE_UDP_PORT);
        if (fl & 1)
            fz_fix_ip(buf, 28 + len, (fl >> 4) & 1, &l4);
        plen = len;
        pkt = malloc(plen ? plen : 1);  /* exact size: the UDP socket's payload */
        if (!pkt)
            abort();
        memcpy(pkt, buf + 28, plen);
        /* the checks' view: GRE straight behind the outer IPv4 header */
        memmove(buf + 20, buf + 28, len);
        len += 20;
        buf[9] = IPPROTO_GRE_;
        fz_wr16(buf + 2, (uint16_t)len);
        fz_ip4_set_csum(buf);
    } else {
        len = fz_bytes(in, buf, len);
        if (fl & 1 && len >= 20) {
            size_t ihl = (size_t)(buf[0] & 0x0f) * 4;

            if (buf[0] >> 4 != 4 || ihl < 20 || ihl > len)
                buf[0] = 0x45;
            buf[9] = IPPROTO_GRE_;
            fz_wr32(buf + 12, pool[((fl >> 1) & 7) % 5]);
            fz_wr32(buf + 16, POP_LOCAL);
            fz_wr16(buf + 6, 0);
            fz_fix_ip(buf, len, (fl >> 4) & 1, &l4);
        }
        plen = len;
        pkt = malloc(plen ? plen : 1);  /* exact size: the raw socket's datagram */
        if (!pkt)
            abort();
        memcpy(pkt, buf, plen);
    }
    fail_tun = (fl >> 5) & 1;
    fail_send = (fl >> 6) & 1;
    tun_errno = tun_errnos[(fl >> 7 | (len & 3) << 1) % 6];
    snap(h, &b);
    for (i = 0; i < h->cfg.npeers; i++)
        FZ_CHECK(tpb_fuzz_pop_rx(h->pop, i, &rx[i]) == 0, "no receive state");
    ios_clear();
    if (udp) {
        struct sockaddr_in from;

        memset(&from, 0, sizeof(from));
        from.sin_family = AF_INET;
        from.sin_addr.s_addr = htonl(src);
        from.sin_port = htons(sport);
        tpb_fuzz_pop_from_udp(h->pop, pkt, plen, &from, tos, h->now);
    } else {
        tpb_fuzz_pop_from_bridge(h->pop, pkt, plen, h->now);
    }
    snap(h, &a);
    tot = len >= 20 && buf[0] >> 4 == 4 ? fz_ip_len(buf, len) : 0;
    if (udp)
        p = peer_of_udp(h, src, buf + 20, len - 20);
    else if (tot)
        p = peer_at(h, fz_rd32(buf + 12), TPB_ENCAP_GRE);
    /* the sequence window moves only for what was delivered (written to
     * the TUN device, or reflected) */
    delivered = nios == 1 && !ios[0].failed;
    for (i = 0; i < h->cfg.npeers; i++) {
        struct gre_rx r;

        tpb_fuzz_pop_rx(h->pop, i, &r);
        FZ_CHECK((delivered && (int)i == p) || !memcmp(&r, &rx[i], sizeof(r)),
                 "POP: peer %u's receive state changed, nothing delivered from it", i);
    }
    d = drops(h, &b, &a, &reason, &who);
    fz_trace("pop: from a bridge%s, %zu bytes: %zu writes (%s%s), %llu drops (%s)",
             udp ? " (UDP)" : "", plen, nios,
             nios ? (ios[0].kind == IO_TUN ? "TUN" : "send") : "-",
             nios && ios[0].failed ? ", refused" : "", (unsigned long long)d,
             reason >= 0 ? tpb_drop_name(reason) : "-");
    FZ_CHECK(nios <= 1, "POP: %zu writes for one packet", nios);
    FZ_CHECK(d <= 1, "POP: %llu drops for one packet", (unsigned long long)d);
    if (!tot || p < 0) {
        FZ_CHECK(!nios && d == 1 && who == (int)h->cfg.npeers &&
                     reason == (tot ? TPB_DROP_NOT_PEER : TPB_DROP_OUTER_BAD),
                 "POP: bad outer header or no peer: %zu writes, %llu drops (%d)", nios,
                 (unsigned long long)d, reason);
        goto out;
    }
    FZ_CHECK(d == 0 || who == p, "POP: a drop counted on another peer");
    if (nios) {
        const struct io *o = &ios[0];

        FZ_CHECK(o->failed ? d == 1 : d == 0, "POP: a write %s, %llu drops",
                 o->failed ? "refused" : "done", (unsigned long long)d);
        if (o->kind == IO_TUN) {
            int want = tun_errno == EAGAIN || tun_errno == ENOBUFS || tun_errno == ENOMEM
                           ? TPB_DROP_TUN_FULL
                           : tun_errno == EINVAL ? TPB_DROP_TUN_INVALID : TPB_DROP_TUN_WRITE;

            FZ_CHECK(o->failed ? reason == want
                               : a.c[p].decap_packets == b.c[p].decap_packets + 1,
                     "POP: TUN write not counted (%d, not %d)", reason, want);
            check_tun(h, o, buf, p);
        } else {
            FZ_CHECK(o->failed ? reason == TPB_DROP_SEND
                               : a.st[p].keepalives_reflected ==
                                     b.st[p].keepalives_reflected + 1,
                     "POP: reflection not counted");
            check_reflect(h, o, buf, p, src, sport);
        }
        /* a NAT'd peer is answered where its accepted packets come from:
         * one written, or a keepalive of its bridge reflected */
        if (udp && !h->peers[p].addr && (o->kind != IO_TUN || !o->failed)) {
            if (h->ep[p].addr != src || h->ep[p].port != sport)
                h->gso_off[p] = 0;      /* a new path: GSO tried again */
            h->ep[p].addr = src;
            h->ep[p].port = sport;
        }
        goto out;
    }
    if (d == 1 && (reason == TPB_DROP_INNER_MARTIAN || reason == TPB_DROP_SOURCE_OWNED ||
                   reason == TPB_DROP_LEARN_FULL))
        check_source_drop(h, buf, tot, p, reason);
    if (d == 0) {
        FZ_CHECK(a.st[p].keepalives_received == b.st[p].keepalives_received + 1 &&
                     fz_rd16(buf + (size_t)(buf[0] & 0x0f) * 4 + 2) == 0,
                 "POP: consumed with no write, no drop, no keepalive answer");
        /* an answer carries back the ID of one of our keepalives: in its
         * IPv4 header, or with GRE-in-UDP as its UDP source port */
        id = udp ? sport : fz_rd16(buf + 4);
        FZ_CHECK(ka_id_sent(h, h->peers[p].addr, id),
                 "POP: a keepalive answer with an ID never sent (%04x)", id);
    }
out:
    free(pkt);
}

/* A super-packet read from the TUN device (pop_tx.c): dropped once
 * (gso_bad, or as a plain packet would be), or cut into segments that all
 * go to the routed peer, each GRE-wrapped (key, checksum, sequence number
 * its own), no tunnel packet larger than the TUN device's MTU where the
 * tunnel leaves room, their payloads the super-packet's in order, counted
 * as one gso_packet of that many segments.  A GRE-in-UDP message with
 * UDP_SEGMENT holds several, gso_size apart. */
static void gso_check(struct h *h, const uint8_t *buf, size_t len,
                      const struct counters *b, const struct counters *a,
                      uint64_t d, int reason)
{
    const struct tpb_pop_peer_config *c;
    uint8_t dst[16];
    int p, v4 = buf[0] >> 4 == 4, failed = 0, refused = 0, udp;
    size_t k, j, segs = 0, ihl, hl, iplen, gl, got = 0, chunk, slen, off, over;
    uint16_t flags;

    if (!nios) {
        FZ_CHECK(d == 1 && (reason == TPB_DROP_GSO_BAD || reason == TPB_DROP_INNER_BAD ||
                            reason == TPB_DROP_NO_PEER || reason == TPB_DROP_NO_ENDPOINT),
                 "POP: a super-packet neither sent nor dropped once (%d)", reason);
        return;
    }
    FZ_CHECK(len >= (v4 ? 20u : 40u) && (v4 || buf[0] >> 4 == 6), "POP: sent a non-IP super-packet");
    addr16(buf, 1, dst);
    p = route(h, dst);
    FZ_CHECK(p >= 0, "POP: a super-packet routed to no peer");
    c = &h->peers[p];
    udp = c->encap == TPB_ENCAP_UDP;
    flags = (uint16_t)((c->csum ? GRE_C : 0) | (c->has_key ? GRE_K : 0) | (c->seq ? GRE_S : 0));
    gl = fz_gre_hlen(flags);
    ihl = v4 ? (size_t)(buf[0] & 0x0f) * 4 : 40;
    hl = ihl + ((v4 ? buf[9] : buf[6]) == IPPROTO_TCP_ ? (size_t)(buf[ihl + 12] >> 4) * 4 : 8);
    iplen = v4 ? fz_rd16(buf + 2) : 40 + (size_t)fz_rd16(buf + 4);
    FZ_CHECK(hl < iplen && iplen <= len, "POP: a super-packet it could not have planned");
    over = 20 + (udp ? 8 : 0) + gl + hl;
    for (k = 0; k < nios; k++) {
        const struct io *o = &ios[k];

        FZ_CHECK((o->kind == IO_SENDMM || (o->kind == IO_SEND && refused && !o->gso_size)) &&
                     o->fd == (udp ? TPB_FUZZ_FD_UDP : TPB_FUZZ_FD_RAW) && (udp || !o->gso_size),
                 "POP: a segment through the wrong socket, or sent alone unrefused");
        FZ_CHECK(!h->gso_off[p] || !o->gso_size, "POP: UDP GSO to a peer whose path refused it");
        if (o->refused) {       /* its datagrams follow one by one */
            refused = 1;
            continue;
        }
        failed |= o->failed;
        chunk = o->gso_size ? o->gso_size : o->len;
        for (j = 0; j < o->len; j += chunk) {
            const uint8_t *g = o->data + j, *ip = g + gl;

            slen = o->len - j < chunk ? o->len - j : chunk;
            FZ_CHECK(slen > gl + hl && fz_rd16(g) == flags &&
                         fz_rd16(g + 2) == (v4 ? ETYPE_IPV4 : ETYPE_IPV6),
                     "POP: a segment's GRE header");
            off = 4;
            if (c->csum) {
                FZ_CHECK(fz_fold(fz_sum(0, g, slen)) == 0, "POP: a segment's GRE checksum");
                off += 4;
            }
            if (c->has_key) {
                FZ_CHECK(fz_rd32(g + off) == c->key, "POP: a segment's key");
                off += 4;
            }
            if (c->seq) {
                if (h->seq[p] >= 0)
                    FZ_CHECK(fz_rd32(g + off) == (uint32_t)h->seq[p],
                             "POP: a segment's sequence number");
                h->seq[p] = (int64_t)fz_rd32(g + off) + 1;
            }
            FZ_CHECK((v4 ? fz_rd16(ip + 2) : 40 + (size_t)fz_rd16(ip + 4)) == slen - gl,
                     "POP: a segment's IP length");
            FZ_CHECK(h->cfg.tun_mtu <= over + 64 || over - hl + slen - gl <= h->cfg.tun_mtu,
                     "POP: a segment of %zu bytes past the MTU %u", slen - gl, h->cfg.tun_mtu);
            FZ_CHECK(got + slen - gl - hl <= iplen - hl &&
                         !memcmp(ip + hl, buf + hl + got, slen - gl - hl),
                     "POP: a segment's payload is not the super-packet's at %zu", got);
            got += slen - gl - hl;
            segs++;
        }
    }
    if (refused)
        h->gso_off[p] = 1;
    fz_trace("pop: a super-packet to peer %d (%s): %zu segments in %zu sends%s", p,
             udp ? "udp" : "gre", segs, nios, refused ? ", GSO refused, one by one" : "");
    FZ_CHECK(got == iplen - hl, "POP: segments carry %zu of %zu payload bytes", got, iplen - hl);
    FZ_CHECK(a->c[p].gso_packets == b->c[p].gso_packets + 1 &&
                 a->c[p].gso_segments == b->c[p].gso_segments + segs,
             "POP: super-packet not counted");
    FZ_CHECK(failed ? d > 0 && reason == TPB_DROP_SEND
                    : d == 0 && a->c[p].encap_packets == b->c[p].encap_packets + segs,
             "POP: segments sent not counted");
}

static void to_bridges_op(struct h *h, struct fz_in *in, uint8_t *buf)
{
    uint8_t fl = fz_u8(in), dst[16], *fixed;
    int mode = (fl >> 1) & 3, reason, who, p, v4;
    size_t len = fz_u16(in) % MAX_PKT, i;
    struct counters b, a;
    struct fz_l4 l4;
    uint64_t d;
    const struct io *o;

    len = fz_bytes(in, buf, len);
    if (!len)
        return;                 /* a TUN device hands over no empty packet */
    memset(&l4, 0, sizeof(l4));
    if (fl & 1)
        fz_fix_ip(buf, len, mode == FZ_VNET_PARTIAL, &l4);
    else if (mode == FZ_VNET_PARTIAL) {
        uint8_t *scratch = malloc(len ? len : 1);

        if (!scratch)
            abort();
        memcpy(scratch, buf, len);
        fz_fix_ip(scratch, len, 1, &l4);
        free(scratch);
    }
    fz_vnet(&tun_vh, mode, in, &l4, 0);
    fixed = malloc(len ? len : 1);
    if (!fixed)
        abort();
    memcpy(fixed, buf, len);
    tun_pkt = fixed;
    /* buf: the packet as to_bridges() will see it, its partial checksum
     * completed (finish_csum(), written afresh) */
    if (tun_vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        size_t st = tun_vh.csum_start, off = tun_vh.csum_offset;

        if (st + off + 2 <= len) {
            uint16_t c = fz_fold(fz_sum(0, buf + st, len - st));

            fz_wr16(buf + st + off, c == 0 && off == 6 ? 0xffff : c);
        }
    }
    tun_len = len;
    fail_send = (fl >> 3) & 1;
    fail_gso = (fl >> 4) & 1;
    snap(h, &b);
    ios_clear();
    tpb_fuzz_pop_to_bridges(h->pop, h->now);
    fail_gso = 0;
    FZ_CHECK(!tun_pkt, "POP: the TUN device was not read");
    ASAN_UNPOISON_MEMORY_REGION(poisoned, poisoned_len);
    snap(h, &a);
    d = drops(h, &b, &a, &reason, &who);
    fz_trace("pop: from the TUN device, %zu bytes: %zu sends%s, %llu drops (%s)", len, nios,
             nios && ios[0].failed ? " (refused)" : "", (unsigned long long)d,
             reason >= 0 ? tpb_drop_name(reason) : "-");
    if (tun_vh.gso_type != VIRTIO_NET_HDR_GSO_NONE) {
        gso_check(h, fixed, len, &b, &a, d, reason);  /* as read, not completed */
        goto out;
    }
    FZ_CHECK(nios <= 1 && d <= 1,
             "POP: %zu sends, %llu drops for one packet", nios, (unsigned long long)d);
    if (!nios && reason == TPB_DROP_NO_ENDPOINT) {
        uint32_t ea;
        uint16_t ep;

        /* routed to a NAT'd peer not heard from yet */
        FZ_CHECK(d == 1 && who >= 0 && who < (int)h->cfg.npeers, "POP: no_endpoint, no peer");
        endpoint(h, who, &ea, &ep);
        FZ_CHECK(h->peers[who].encap == TPB_ENCAP_UDP && !h->peers[who].addr && !ep,
                 "POP: no_endpoint for a peer with one");
        addr16(buf, 1, dst);
        FZ_CHECK(route(h, dst) == who, "POP: no_endpoint for a peer the route is not to");
        goto out;
    }
    if (!nios) {
        FZ_CHECK(d == 1 && who == (int)h->cfg.npeers &&
                     (reason == TPB_DROP_INNER_BAD || reason == TPB_DROP_NO_PEER),
                 "POP: from the TUN device, no send and no drop (%d)", reason);
        if (reason == TPB_DROP_NO_PEER && len >= 20 &&
            (buf[0] >> 4 == 4 || (buf[0] >> 4 == 6 && len >= 40))) {
            addr16(buf, 1, dst);
            FZ_CHECK(lpm(h, dst) < 0, "POP: no peer, yet a prefix covers the destination");
        }
        goto out;
    }
    o = &ios[0];
    FZ_CHECK(o->kind == IO_SENDMM, "POP: sent otherwise than by sendmmsg");
    v4 = buf[0] >> 4 == 4;
    FZ_CHECK(len >= (v4 ? 20u : 40u) && (v4 || buf[0] >> 4 == 6), "POP: sent a non-IP packet");
    /* the route: a configured prefix, else what was learned, and the
     * peer's socket and endpoint */
    addr16(buf, 1, dst);
    p = route(h, dst);
    FZ_CHECK(p >= 0, "POP: routed to a peer no prefix or live learned source gave");
    {
        uint32_t ea;
        uint16_t ep;
        int u = h->peers[p].encap == TPB_ENCAP_UDP;

        endpoint(h, p, &ea, &ep);
        FZ_CHECK(o->fd == (u ? TPB_FUZZ_FD_UDP : TPB_FUZZ_FD_RAW) && o->dst == ea &&
                     (!u || o->port == ep),
                 "POP: not sent to the routed peer's endpoint (%08x:%u, not %08x:%u)", o->dst,
                 o->port, ea, ep);
    }
    FZ_CHECK(o->failed ? (d == 1 && who == p && reason == TPB_DROP_SEND)
                       : (d == 0 && a.c[p].encap_packets == b.c[p].encap_packets + 1),
             "POP: send not counted");
    /* the GRE header */
    {
        const struct tpb_pop_peer_config *c = &h->peers[p];
        uint16_t flags = (uint16_t)((c->csum ? GRE_C : 0) | (c->has_key ? GRE_K : 0) |
                                    (c->seq ? GRE_S : 0));
        size_t gl = fz_gre_hlen(flags), off = 4;
        const uint8_t *g = o->data;
        uint8_t itos, ittl;

        FZ_CHECK(o->len == gl + len && fz_rd16(g) == flags &&
                     fz_rd16(g + 2) == (v4 ? ETYPE_IPV4 : ETYPE_IPV6),
                 "POP: GRE header");
        if (c->csum) {
            FZ_CHECK(fz_fold(fz_sum(0, g, o->len)) == 0, "POP: GRE checksum");
            off += 4;
        }
        if (c->has_key) {
            FZ_CHECK(fz_rd32(g + off) == c->key, "POP: key");
            off += 4;
        }
        if (c->seq) {
            if (h->seq[p] >= 0)
                FZ_CHECK(fz_rd32(g + off) == (uint32_t)h->seq[p], "POP: sequence number");
            h->seq[p] = (int64_t)fz_rd32(g + off) + 1;
        }
        for (i = 0; i < len; i++)
            FZ_CHECK(g[gl + i] == buf[i], "POP: packet changed at %zu", i);
        itos = v4 ? buf[1] : (uint8_t)((buf[0] & 0x0f) << 4 | buf[1] >> 4);
        ittl = v4 ? buf[8] : buf[7];
        FZ_CHECK(o->ttl == (c->ttl >= 0 ? c->ttl : ittl) &&
                     o->tos == (((c->tos >= 0 ? c->tos : itos) & ~3) | (itos & 3)),
                 "POP: outer TTL/TOS");
    }
out:
    free(fixed);
}

/* For a train: a GRE peer without sequence numbers with a prefix of its
 * own (v4-mapped; or IPv6 too if v6 is given), and a source a inside it
 * that is no martian; -1 if the configuration has none.  *v6: which. */
static int train_peer(const struct h *h, uint8_t fl, uint8_t a[16], int *v6)
{
    uint32_t i;

    for (i = 0; i < h->cfg.nprefixes; i++) {
        const struct tpb_pop_prefix *x = &h->prefixes[(i + fl) % h->cfg.nprefixes];
        const struct tpb_pop_peer_config *c = &h->peers[x->peer];
        int m = x->addr[10] == 0xff && x->addr[11] == 0xff;

        if (((m && x->len >= 96) || (v6 && !m && x->addr[0] == 0x20)) && x->len <= 128 &&
            c->encap == TPB_ENCAP_GRE && c->addr && !c->seq) {
            memcpy(a, x->addr, 16);
            a[15] ^= (uint8_t)(x->len < 128 ? 1 : 0);
            if (!model_martian(a, m) && lpm(h, a) == (int)x->peer) {
                if (v6)
                    *v6 = !m;
                return (int)x->peer;
            }
        }
    }
    return -1;
}

/* The outer IPv4 and GRE headers of a train's packet from peer c, its
 * inner packet ilen bytes of proto to come at ip + 20 + gl. */
static void train_outer(uint8_t *ip, const struct tpb_pop_peer_config *c, uint16_t flags,
                        size_t gl, size_t ilen, uint16_t proto)
{
    uint8_t *g = ip + 20;

    memset(ip, 0, 20 + gl + ilen);
    ip[0] = 0x45;
    fz_wr16(ip + 2, (uint16_t)(20 + gl + ilen));
    ip[8] = 64;
    ip[9] = IPPROTO_GRE_;
    fz_wr32(ip + 12, c->addr);
    fz_wr32(ip + 16, POP_LOCAL);
    fz_ip4_set_csum(ip);
    fz_wr16(g, flags);
    fz_wr16(g + 2, proto);
    if (c->has_key)
        fz_wr32(g + (c->csum ? 8 : 4), c->key);
}

/* A train handed over as one batch: the packets stay where they are (as
 * in recvmmsg()'s buffers) until the flush; b, aft: the counters around
 * it; returns the drops it made (reason, who as drops() gives them). */
static uint64_t train_run(struct h *h, uint8_t (*pk)[20 + 16 + 60 + 1500], const size_t *len,
                          size_t n, struct counters *b, struct counters *aft, int *reason,
                          int *who)
{
    size_t k;

    fail_tun = 0;
    snap(h, b);
    ios_clear();
    for (k = 0; k < n; k++)
        tpb_fuzz_pop_from_bridge_held(h->pop, pk[k], len[k], h->now);
    tpb_fuzz_pop_flush(h->pop);
    snap(h, aft);
    return drops(h, b, aft, reason, who);
}

/* A train of TCP segments of one flow from one GRE peer (without sequence
 * numbers, with a prefix of its own to send from), each possibly spoilt
 * (a wrong TCP checksum, PSH, FIN, a short payload, a gap in the sequence
 * numbers, another TOS or TCP option), handed over in one batch
 * (pop_gro.c).  What reaches the TUN device, in order, is every packet:
 * alone and byte for byte, or merged into a super-packet whose vnet
 * header is right and whose payload is the merged packets', each of them
 * one that may be merged (checksum right, ACK or ACK|PSH, no PSH before
 * the last, payloads gso_size but the last), counted as gro_*. */
#define TRAIN_MAX 8
static void train_op(struct h *h, struct fz_in *in)
{
    static uint8_t pk[TRAIN_MAX][20 + 16 + 60 + 1500];
    size_t plen[TRAIN_MAX], ilen[TRAIN_MAX], tot[TRAIN_MAX], s, gl, thl, k, n, j, at;
    uint8_t mut[TRAIN_MAX], good[TRAIN_MAX], tf[TRAIN_MAX], a[16], fl = fz_u8(in), *ip, *g, *t;
    uint32_t seq = fz_u32(in), i;
    int p = -1, reason, who;
    const struct tpb_pop_peer_config *c;
    struct counters b, aft;
    uint64_t d;
    uint16_t flags;
    size_t merged = 0, alone = 0;

    p = train_peer(h, fl, a, NULL);
    n = 2 + fl % (TRAIN_MAX - 1);
    s = 1 + fz_u16(in) % 1400;
    thl = (fl & 0x80) ? 32 : 20;
    for (k = 0; k < n; k++)
        mut[k] = fz_u8(in);
    if (p < 0)
        return;
    c = &h->peers[p];
    flags = (uint16_t)((c->csum ? GRE_C : 0) | (c->has_key ? GRE_K : 0));
    gl = fz_gre_hlen(flags);
    for (k = 0; k < n; k++) {
        ip = pk[k];
        g = ip + 20;
        t = g + gl + 20;
        /* 1 in 8 a short one, 1 in 16 a gap */
        plen[k] = (mut[k] & 7) == 1 ? s / 2 + 1 : s;
        ilen[k] = 20 + thl + plen[k];
        train_outer(ip, c, flags, gl, ilen[k], ETYPE_IPV4);
        ip = g + gl;                          /* the inner packet */
        ip[0] = 0x45;
        ip[1] = (mut[k] & 0x70) == 0x10 ? 0x20 : 0;
        fz_wr16(ip + 2, (uint16_t)ilen[k]);
        fz_wr16(ip + 4, (uint16_t)(0x1234 + k));
        fz_wr16(ip + 6, 0x4000);
        ip[8] = 64;
        ip[9] = IPPROTO_TCP_;
        memcpy(ip + 12, a + 12, 4);
        fz_wr32(ip + 16, 0xcb007105u);        /* 203.0.113.5 */
        fz_ip4_set_csum(ip);
        fz_wr16(t, 40000);
        fz_wr16(t + 2, 5201);
        if ((mut[k] & 0x0f) == 2)
            seq += 7;                         /* a gap */
        fz_wr32(t + 4, seq);
        seq += (uint32_t)plen[k];
        fz_wr32(t + 8, 777);
        t[12] = (uint8_t)(thl / 4) << 4;
        t[13] = 0x10 | ((mut[k] & 0x70) == 0x20 ? 0x08 : 0) | ((mut[k] & 0x70) == 0x30 ? 0x01 : 0);
        fz_wr16(t + 14, 500);
        if (thl > 20) {                       /* NOP NOP timestamps */
            t[20] = t[21] = 1;
            t[22] = 8;
            t[23] = 10;
            fz_wr32(t + 24, (mut[k] & 0x70) == 0x40 ? 99 : 1);
        }
        for (j = 0; j < plen[k]; j++)
            t[thl + j] = (uint8_t)(k * 31 + j);
        fz_l4_set_csum(ip, 20, ilen[k], IPPROTO_TCP_, 0);
        if ((mut[k] & 0x0f) == 3)
            t[16] ^= 0x40;                    /* a wrong checksum */
        good[k] = fz_fold(fz_sum(fz_pseudo(ip, IPPROTO_TCP_, (uint32_t)(ilen[k] - 20)),
                                 t, ilen[k] - 20)) == 0;
        tf[k] = t[13];          /* (a merged group's first header is rewritten) */
        if (c->csum)
            fz_wr16(g + 4, fz_fold(fz_sum(0, g, gl + ilen[k])));
    }
    for (k = 0; k < n; k++)
        tot[k] = 20 + gl + ilen[k];
    d = train_run(h, pk, tot, n, &b, &aft, &reason, &who);
    fz_trace("pop: a train of %zu from peer %d: %zu TUN writes, %llu drops", n, p, nios,
             (unsigned long long)d);
    FZ_CHECK(d == 0 && aft.c[p].decap_packets == b.c[p].decap_packets + n,
             "POP: a train not all delivered (%llu drops, %s)", (unsigned long long)d,
             reason >= 0 ? tpb_drop_name(reason) : "-");
    for (i = 0, k = 0; i < nios; i++) {
        const struct io *o = &ios[i];
        const struct virtio_net_hdr *v = &o->vh;

        FZ_CHECK(o->kind == IO_TUN && k < n, "POP: a train's packet not to the TUN device");
        if (fz_vnet_zero(v)) {            /* alone, as it came */
            FZ_CHECK(o->len == ilen[k] && !memcmp(o->data, pk[k] + 20 + gl, ilen[k]),
                     "POP: a train's packet %zu changed", k);
            k++;
            alone++;
            continue;
        }
        if (ilen[k] > h->cfg.tun_mtu && o->len == ilen[k]) {
            /* alone, larger than the device's MTU: a super-packet of
             * MTU-sized segments (tun_write(), checked by check_tun());
             * only its TCP checksum field differs */
            FZ_CHECK(!memcmp(o->data, pk[k] + 20 + gl, 36) &&
                         !memcmp(o->data + 38, pk[k] + 20 + gl + 38, ilen[k] - 38),
                     "POP: a train's packet %zu over the MTU changed", k);
            k++;
            alone++;
            continue;
        }
        merged++;
        FZ_CHECK(v->flags == VIRTIO_NET_HDR_F_NEEDS_CSUM &&
                     v->gso_type == VIRTIO_NET_HDR_GSO_TCPV4 && v->csum_start == 20 &&
                     v->csum_offset == 16 && v->hdr_len == 20 + thl && v->gso_size == plen[k] &&
                     o->len > 20 + thl + v->gso_size && fz_ip_len(o->data, o->len) == o->len,
                 "POP: a train's super-packet's vnet header");
        {
            uint32_t sm = fz_pseudo(o->data, IPPROTO_TCP_, (uint32_t)(o->len - 20));

            while (sm >> 16)
                sm = (sm & 0xffff) + (sm >> 16);
            FZ_CHECK(fz_rd16(o->data + 36) == sm, "POP: a train's partial checksum");
        }
        FZ_CHECK(!memcmp(o->data + 12, pk[k] + 20 + gl + 12, 8) &&
                     !memcmp(o->data + 20, pk[k] + 20 + gl + 20, 8),
                 "POP: a train's super-packet's addresses, ports or sequence number");
        for (at = 20 + thl; at < o->len; k++) {
            t = pk[k] + 20 + gl + 20;
            FZ_CHECK(k < n && good[k] && (tf[k] == 0x10 || tf[k] == 0x18) &&
                         plen[k] <= v->gso_size && at + plen[k] <= o->len &&
                         !memcmp(o->data + at, t + thl, plen[k]),
                     "POP: a train's packet %zu merged that must not be, or changed", k);
            FZ_CHECK(at + plen[k] == o->len || (plen[k] == v->gso_size && tf[k] == 0x10),
                     "POP: a short or PSH segment %zu merged before others", k);
            at += plen[k];
        }
        FZ_CHECK(!!(o->data[33] & 0x08) == !!(tf[k - 1] & 0x08),
                 "POP: a train's super-packet's PSH is not its last segment's");
    }
    FZ_CHECK(k == n, "POP: %zu of a train's %zu packets written", k, n);
    FZ_CHECK(aft.c[p].gro_packets - b.c[p].gro_packets == merged &&
                 aft.c[p].gro_segments - b.c[p].gro_segments + alone == n,
             "POP: a train's gro counters");
}

/* Two or three UDP flows (IPv4, or IPv6 from a peer's IPv6 prefix) from
 * one GRE peer (as train_op's), their
 * datagrams interleaved in one batch, each possibly spoilt (a wrong or no
 * checksum, a short payload, an ID out of turn, another TOS); a flow has
 * DF or not, and consecutive IDs or one ID for all (pop_gro.c).  What
 * reaches the TUN device is every datagram, each flow's in order: alone
 * and byte for byte, or merged into a UDP super-packet
 * (VIRTIO_NET_HDR_GSO_UDP_L4) whose headers are the first one's with the
 * lengths and the pseudo-header sum NEEDS_CSUM asks for, and whose
 * payload is the merged datagrams', each of them one that may be merged
 * (checksum right and not 0, same TOS/DF/TTL, IDs consecutive or all the
 * same with DF, payloads gso_size but the last), counted as gro_*. */
#define UTRAIN_MAX 16
static void udp_train_op(struct h *h, struct fz_in *in)
{
    static uint8_t pk[UTRAIN_MAX][20 + 16 + 60 + 1500];
    size_t L, plen[UTRAIN_MAX], ilen[UTRAIN_MAX], tot[UTRAIN_MAX], s, gl, k, n, j, at, nf, nxt[3] = {0, 0, 0};
    uint8_t mut[UTRAIN_MAX], good[UTRAIN_MAX], flow[UTRAIN_MAX], a[16], fl = fz_u8(in);
    uint8_t *ip, *g, *u;
    uint16_t id[3];
    uint32_t i;
    int p = -1, reason, who, v6 = 0;
    const struct tpb_pop_peer_config *c;
    struct counters b, aft;
    uint64_t d;
    uint16_t flags;
    size_t merged = 0, alone = 0, per[3] = {0, 0, 0};

    p = train_peer(h, fl, a, &v6);
    nf = 2 + (fl & 1);
    n = 2 + fz_u8(in) % (UTRAIN_MAX - 1);
    s = 1 + fz_u16(in) % 1400;
    for (k = 0; k < 3; k++)
        id[k] = fz_u16(in);
    for (k = 0; k < n; k++) {
        mut[k] = fz_u8(in);
        /* in turn, and 1 in 4 out of turn */
        flow[k] = (uint8_t)((mut[k] & 0x80) && (mut[k] & 0x40) ? (k + 1) % nf : k % nf);
    }
    if (p < 0)
        return;
    c = &h->peers[p];
    L = v6 ? 40 : 20;
    flags = (uint16_t)((c->csum ? GRE_C : 0) | (c->has_key ? GRE_K : 0));
    gl = fz_gre_hlen(flags);
    for (k = 0; k < n; k++) {
        uint8_t f = flow[k], df = (fl >> (1 + f)) & 1, fixed = (fl >> (4 + f)) & 1;

        ip = pk[k];
        g = ip + 20;
        plen[k] = (mut[k] & 7) == 1 ? s / 2 + 1 : s;   /* 1 in 8 a short one */
        ilen[k] = L + 8 + plen[k];
        train_outer(ip, c, flags, gl, ilen[k], v6 ? ETYPE_IPV6 : ETYPE_IPV4);
        ip = g + gl;                          /* the inner packet */
        u = ip + L;
        if (v6) {
            ip[0] = 0x60;
            ip[1] = (mut[k] & 0x38) == 0x08 ? 0x02 : 0;   /* another class */
            ip[3] = (uint8_t)(f + 1);                     /* flow label */
            fz_wr16(ip + 4, (uint16_t)(8 + plen[k]));
            ip[6] = IPPROTO_UDP_;
            ip[7] = (mut[k] & 0x38) == 0x10 ? 63 : 64;    /* another hop limit */
            memcpy(ip + 8, a, 16);
            memset(ip + 24, 0, 16);
            ip[24] = 0x20;
            ip[25] = 0x01;
            ip[26] = 0x0d;
            ip[27] = 0xb8;
            ip[39] = 5;                                   /* 2001:db8::5 */
        } else {
            ip[0] = 0x45;
            ip[1] = (mut[k] & 0x38) == 0x08 ? 0x20 : 0;
            fz_wr16(ip + 2, (uint16_t)ilen[k]);
            fz_wr16(ip + 4, (uint16_t)(id[f] + ((mut[k] & 0x38) == 0x10 ? 5 : 0)));
            if (!fixed)
                id[f]++;
            fz_wr16(ip + 6, df ? 0x4000 : 0);
            ip[8] = 64;
            ip[9] = IPPROTO_UDP_;
            memcpy(ip + 12, a + 12, 4);
            fz_wr32(ip + 16, 0xcb007105u);    /* 203.0.113.5 */
            fz_ip4_set_csum(ip);
        }
        fz_wr16(u, (uint16_t)(7000 + f));
        fz_wr16(u + 2, 443);
        fz_wr16(u + 4, (uint16_t)(8 + plen[k]));
        for (j = 0; j < plen[k]; j++)
            u[8 + j] = (uint8_t)(k * 31 + j);
        fz_l4_set_csum(ip, L, ilen[k], IPPROTO_UDP_, 0);
        if ((mut[k] & 0x38) == 0x18)
            u[6] ^= 0x40;                     /* a wrong checksum */
        else if ((mut[k] & 0x38) == 0x20)
            fz_wr16(u + 6, 0);                /* none */
        good[k] = fz_rd16(u + 6) != 0 &&
                  fz_fold(fz_sum(fz_pseudo(ip, IPPROTO_UDP_, (uint32_t)(ilen[k] - L)), u,
                                 ilen[k] - L)) == 0;
        if (c->csum)
            fz_wr16(g + 4, fz_fold(fz_sum(0, g, gl + ilen[k])));
    }
    for (k = 0; k < n; k++)
        tot[k] = 20 + gl + ilen[k];
    d = train_run(h, pk, tot, n, &b, &aft, &reason, &who);
    fz_trace("pop: %zu datagrams of %zu flows from peer %d: %zu TUN writes, %llu drops", n, nf,
             p, nios, (unsigned long long)d);
    FZ_CHECK(d == 0 && aft.c[p].decap_packets == b.c[p].decap_packets + n,
             "POP: UDP flows not all delivered (%llu drops, %s)", (unsigned long long)d,
             reason >= 0 ? tpb_drop_name(reason) : "-");
    for (k = 0; k < n; k++)
        per[flow[k]]++;
    for (i = 0; i < nios; i++) {
        const struct io *o = &ios[i];
        const struct virtio_net_hdr *v = &o->vh;
        const uint8_t *f0;
        size_t ff, k0, seg;
        uint32_t sm;
        int cons = 1, same = 1;

        FZ_CHECK(o->kind == IO_TUN && o->len >= L + 8, "POP: a datagram not to the TUN device");
        ff = fz_rd16(o->data + L) - 7000u;
        FZ_CHECK(ff < nf, "POP: a datagram of no flow");
        /* the flow's next datagram */
        for (k0 = 0, j = 0; k0 < n; k0++)
            if (flow[k0] == ff && j++ == nxt[ff])
                break;
        FZ_CHECK(k0 < n, "POP: more of flow %zu written than sent", ff);
        f0 = pk[k0] + 20 + gl;
        if (fz_vnet_zero(v)) {
            FZ_CHECK(o->len == ilen[k0] && !memcmp(o->data, f0, ilen[k0]),
                     "POP: flow %zu's datagram %zu changed or out of order", ff, k0);
            nxt[ff]++;
            alone++;
            continue;
        }
        merged++;
        FZ_CHECK(h->cfg.tun_uso, "POP: a UDP super-packet to a TUN device without USO");
        FZ_CHECK(v->flags == VIRTIO_NET_HDR_F_NEEDS_CSUM &&
                     v->gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 && v->csum_start == L &&
                     v->csum_offset == 6 && v->hdr_len == L + 8 && v->gso_size == plen[k0] &&
                     o->len > L + 8 + v->gso_size && fz_ip_len(o->data, o->len) == o->len &&
                     fz_rd16(o->data + L + 4) == o->len - L,
                 "POP: a UDP super-packet's vnet header or lengths");
        sm = fz_pseudo(o->data, IPPROTO_UDP_, (uint32_t)(o->len - L));
        while (sm >> 16)
            sm = (sm & 0xffff) + (sm >> 16);
        FZ_CHECK(fz_rd16(o->data + L + 6) == sm, "POP: a UDP super-packet's partial checksum");
        FZ_CHECK(v6 ? !memcmp(o->data, f0, 4) && !memcmp(o->data + 6, f0 + 6, 38)
                    : !memcmp(o->data, f0, 2) && !memcmp(o->data + 4, f0 + 4, 6) &&
                          !memcmp(o->data + 12, f0 + 12, 12),
                 "POP: a UDP super-packet's header is not its first datagram's");
        for (at = L + 8, seg = 0; at < o->len; seg++) {
            const uint8_t *q;
            uint16_t want = (uint16_t)(fz_rd16(f0 + 4) + seg);

            for (k = 0, j = 0; k < n; k++)
                if (flow[k] == ff && j++ == nxt[ff])
                    break;
            FZ_CHECK(k < n, "POP: a super-packet holds more of flow %zu than was sent", ff);
            q = pk[k] + 20 + gl;
            FZ_CHECK(good[k] && plen[k] <= v->gso_size && at + plen[k] <= o->len &&
                         !memcmp(o->data + at, q + L + 8, plen[k]) &&
                         (v6 ? !memcmp(q, f0, 4) && q[7] == f0[7]
                             : q[1] == f0[1] && !memcmp(q + 6, f0 + 6, 4)),
                     "POP: datagram %zu merged that must not be, or changed", k);
            cons &= fz_rd16(q + 4) == want;
            same &= fz_rd16(q + 4) == fz_rd16(f0 + 4);
            FZ_CHECK(at + plen[k] == o->len || plen[k] == v->gso_size,
                     "POP: a short datagram %zu merged before others", k);
            at += plen[k];
            nxt[ff]++;
        }
        FZ_CHECK(seg >= 2, "POP: a super-packet of one datagram");
        /* IPv4 IDs: consecutive, or with DF all the first one's (RFC 6864) */
        FZ_CHECK(v6 || cons || (same && (f0[6] & 0x40)),
                 "POP: datagrams merged with IDs out of turn");
    }
    for (k = 0; k < nf; k++)
        FZ_CHECK(nxt[k] == per[k], "POP: %zu of flow %zu's %zu datagrams written", nxt[k], k,
                 per[k]);
    FZ_CHECK(aft.c[p].gro_packets - b.c[p].gro_packets == merged &&
                 aft.c[p].gro_segments - b.c[p].gro_segments + alone == n,
             "POP: UDP flows' gro counters");
}

static void keepalive_op(struct h *h, struct fz_in *in)
{
    struct counters b, a;
    int reason, who;
    size_t i;

    h->now += (uint64_t)fz_u16(in) * 1000000ull;
    fail_send = fz_u8(in) & 1;
    snap(h, &b);
    ios_clear();
    tpb_fuzz_pop_keepalives(h->pop, h->now);
    snap(h, &a);
    FZ_CHECK(drops(h, &b, &a, &reason, &who) == 0, "keepalives: a drop");
    fz_trace("pop: keepalives at %llu ms: %zu sent", (unsigned long long)(h->now / 1000000), nios);
    for (i = 0; i < nios; i++) {
        const struct io *o = &ios[i];
        int p = peer_index(h, o->dst), udp;
        const struct tpb_pop_peer_config *c;
        uint16_t flags;
        size_t gl, off = 4, ul;
        const uint8_t *g = o->data, *ip, *ig;

        FZ_CHECK(o->kind == IO_SEND && p >= 0 && h->peers[p].keepalive_ms,
                 "keepalive: to a peer without keepalives");
        c = &h->peers[p];
        udp = c->encap == TPB_ENCAP_UDP;
        ul = udp ? 8 : 0;
        FZ_CHECK(udp ? o->fd == TPB_FUZZ_FD_UDP && o->port == FZ_GRE_UDP_PORT
                     : o->fd == TPB_FUZZ_FD_RAW,
                 "keepalive: through the wrong socket, or not to port 4754");
        FZ_CHECK(o->failed ? a.st[p].keepalives_unsent == b.st[p].keepalives_unsent + 1
                           : a.st[p].keepalives_sent == b.st[p].keepalives_sent + 1,
                 "keepalive: not counted");
        flags = (uint16_t)((c->csum ? GRE_C : 0) | (c->has_key ? GRE_K : 0) | (c->seq ? GRE_S : 0));
        gl = fz_gre_hlen(flags);
        FZ_CHECK(o->len >= gl + 20 && fz_rd16(g) == flags && fz_rd16(g + 2) == ETYPE_IPV4,
                 "keepalive: GRE header");
        if (c->csum) {
            FZ_CHECK(fz_fold(fz_sum(0, g, o->len)) == 0, "keepalive: GRE checksum");
            off += 4;
        }
        if (c->has_key)
            FZ_CHECK(fz_rd32(g + off) == c->key, "keepalive: key");
        if (c->seq) {
            off += c->has_key ? 4 : 0;
            if (h->seq[p] >= 0)
                FZ_CHECK(fz_rd32(g + off) == (uint32_t)h->seq[p], "keepalive: sequence number");
            h->seq[p] = (int64_t)fz_rd32(g + off) + 1;
        }
        ip = g + gl;
        FZ_CHECK(fz_ip_len(ip, o->len - gl) == o->len - gl && ip[0] == 0x45 && ip[8] == 255 &&
                     ip[9] == (udp ? IPPROTO_UDP_ : IPPROTO_GRE_) && fz_rd32(ip + 12) == c->addr &&
                     fz_rd32(ip + 16) == POP_LOCAL,
                 "keepalive: inner IPv4 header");
        /* GRE-in-UDP: the inner GRE header in UDP to 4754, from the ID
         * (the POP's UDP socket sees no IP header of the answer) */
        if (udp)
            FZ_CHECK(o->len - gl >= 28 && fz_rd16(ip + 20) == fz_rd16(ip + 4) &&
                         fz_rd16(ip + 22) == FZ_GRE_UDP_PORT &&
                         fz_rd16(ip + 24) == o->len - gl - 20 && fz_rd16(ip + 26) != 0 &&
                         fz_l4_csum_ok(ip, 20, o->len - gl, IPPROTO_UDP_),
                     "keepalive: inner UDP header");
        ig = ip + 20 + ul;
        flags &= (uint16_t)~GRE_S;
        FZ_CHECK(o->len - gl - 20 - ul == fz_gre_hlen(flags) && fz_rd16(ig) == flags &&
                     fz_rd16(ig + 2) == 0,
                 "keepalive: inner GRE header");
        if (c->csum)
            FZ_CHECK(fz_fold(fz_sum(0, ig, fz_gre_hlen(flags))) == 0, "keepalive: inner checksum");
        FZ_CHECK(o->ttl == (c->ttl >= 0 ? c->ttl : 255), "keepalive: TTL");
        ka_id_record(h, c->addr, fz_rd16(ip + 4));
    }
}

/* SO_RXQ_OVFL: the socket's drop count as a packet carries it; what grew
 * since the last count seen is what the kernel dropped (rcvbuf_full, on
 * the POP's own counters), a count not after it (serial arithmetic) adds
 * nothing. */
static void ovfl_op(struct h *h, struct fz_in *in)
{
    struct counters b, a;
    int reason, who;
    uint8_t k = fz_u8(in);
    uint32_t v = k & 1 ? fz_u32(in) : h->ovfl + (k >> 1);
    uint64_t d, want = (int32_t)(v - h->ovfl) > 0 ? v - h->ovfl : 0;

    snap(h, &b);
    tpb_fuzz_pop_rx_ovfl(h->pop, v);
    snap(h, &a);
    d = drops(h, &b, &a, &reason, &who);
    fz_trace("pop: SO_RXQ_OVFL %u after %u: %llu drops", v, h->ovfl, (unsigned long long)d);
    FZ_CHECK(d == want && (!d || (who == (int)h->cfg.npeers && reason == TPB_DROP_RCVBUF_FULL)),
             "rcvbuf_full: %llu drops (reason %d), not %llu", (unsigned long long)d, reason,
             (unsigned long long)want);
    if (want)
        h->ovfl = v;
}

static void reload_op(struct h *h, struct fz_in *in)
{
    struct h n = *h;
    char err[256];
    int rc;
    size_t i, k;

    read_config(&n, in);
    rc = tpb_pop_reconfigure(h->pop, &n.cfg, n.peers, n.prefixes, err, sizeof(err));
    FZ_CHECK(rc == 0 || rc == -EINVAL, "reload: %d (%s)", rc, err);
    if (rc)
        return;                 /* refused: nothing changed */
    /* a NAT'd peer kept (by its key) keeps its endpoint */
    for (i = 0; i < n.cfg.npeers; i++) {
        int o = n.peers[i].addr ? -1 : peer_by_id(h, peer_id(&n.peers[i]));

        n.ep[i].addr = o >= 0 ? h->ep[o].addr : 0;
        n.ep[i].port = o >= 0 ? h->ep[o].port : 0;
    }
    memcpy(h->ep, n.ep, sizeof(h->ep));
    memset(h->gso_off, 0, sizeof(h->gso_off));  /* new peers: GSO tried again */
    n.cfg.tun_uso = h->cfg.tun_uso;     /* the same TUN device */
    h->cfg = n.cfg;
    memcpy(h->peers, n.peers, sizeof(h->peers));
    memcpy(h->prefixes, n.prefixes, sizeof(h->prefixes));
    for (i = 0; i < MAX_PEERS; i++)
        h->seq[i] = -1;
    /* learned entries behind a peer that is gone go, as do those a
     * prefix now covers */
    for (i = k = 0; i < h->nlearned; i++)
        if (peer_by_id(h, h->learned[i].peer) >= 0 && lpm(h, h->learned[i].addr) < 0)
            h->learned[k++] = h->learned[i];
    h->nlearned = k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[MAX_PKT];
    struct fz_in in = {data, size};
    struct h h;
    int ops = 0;
    size_t i;

    memset(&h, 0, sizeof(h));
    tpb_fuzz_ka_id = 0xfffe;        /* the first keepalives' IDs wrap */
    read_config(&h, &in);
    for (i = 0; i < MAX_PEERS; i++)
        h.seq[i] = 0;
    h.now = FZ_T0;
    h.pop = tpb_fuzz_pop_open(&h.cfg, h.peers, h.prefixes);
    if (!h.pop)
        return 0;               /* a configuration check_config() refuses */
    while (in.n && ops++ < MAX_OPS) {
        uint8_t op = fz_u8(&in);

        switch (op % 8) {
        case 3:
        case 4:
            to_bridges_op(&h, &in, buf);
            break;
        case 2:
            ovfl_op(&h, &in);
            break;
        case 5:
            keepalive_op(&h, &in);
            break;
        case 6:
            reload_op(&h, &in);
            break;
        case 7:
            h.now += (uint64_t)fz_u32(&in) * 1000000ull;
            break;
        case 1:
            from_bridge_op(&h, &in, buf, 1);    /* GRE-in-UDP */
            break;
        default:
            if ((op & 0xc0) == 0xc0)
                udp_train_op(&h, &in);
            else if (op & 0x80)
                train_op(&h, &in);
            else
                from_bridge_op(&h, &in, buf, 0);
        }
        check_endpoints(&h);
    }
    ios_clear();
    tpb_pop_close(h.pop);
    return 0;
}
