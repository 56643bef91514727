/* ring.c — a port's AF_PACKET sockets: TPACKET_V2 RX rings (which also
 * send, by sendmmsg), a TX ring for small frames (txq.c), and send-only
 * sockets; vnet header on all of them.
 *
 * Why these choices (measured, see ../shared/AF_PACKET-FACTS.md):
 *  - TPACKET_V2, not V3: V3 hands over whole blocks and holds a lone frame
 *    until the block retire timer fires (over 1 ms of added latency at
 *    idle); V2 hands over each frame as soon as it is written.
 *  - PACKET_VNET_HDR: GSO super-packets (up to 64 KB) and CHECKSUM_PARTIAL
 *    frames arrive with a virtio_net_hdr in front; sending them back with
 *    that header lets the egress device segment and checksum them.
 *  - Two rings per source, split by frame length: many small slots for
 *    ordinary frames, a few 68 KB ones for super-packets and jumbo frames
 *    (SMALL_SLOT).  One loop: both in a fanout group whose cBPF program
 *    picks the ring (bridge_open.c, sort_prog), so that a frame meets one
 *    socket; workers, or a kernel before 6.2: a filter on each socket.
 *  - PACKET_IGNORE_OUTGOING: the socket must not see what it sent itself
 *    (in a fanout group, the group's flag of the same name: fanout_join).
 *  - PACKET_QDISC_BYPASS: a bridge port needs no qdisc of its own; on
 *    while the port's root qdisc is noqueue, off while one queues (txq.c).
 *  - Promiscuous mode as a socket membership (PACKET_MR_PROMISC), not an
 *    interface flag: the kernel counts it and takes it back when the socket
 *    closes, so the port is restored even if TPB is killed.
 *  - The socket is bound (and so starts receiving) only once everything
 *    else is set, so no frame is seen by a half-configured socket.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/virtio_net.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <linux/filter.h>

#include "tpb.h"
#include "ring.h"

#ifndef PACKET_FANOUT_FLAG_IGNORE_OUTGOING
#define PACKET_FANOUT_FLAG_IGNORE_OUTGOING 0x4000   /* Linux 6.2 */
#endif

/* Two rings per source (see tpb.h, TPB_SMALL_MAX): small slots of 2 KB, a 1518-byte
 * frame and its TPACKET and vnet headers (up to TPB_SMALL_MAX bytes), many
 * of them, since many slots are what rides out a stall of TPB's CPU (8192:
 * 16 MB, 27 ms of 64-byte frames at 0.3 Mpps); and big slots of 17 pages,
 * a 65535-byte IP packet with Ethernet and headers, fewer of them.  A
 * kernel-side copy of a 64 KB frame into a big slot happens on the CPU
 * that received it, as before TPB's thread sees it. */
#define SMALL_SLOT 2048u
/* Where tpacket_rcv() puts a frame's Ethernet header in a slot (a vnet
 * header in front of the frame, the frame's IP header aligned). */
#define SLOT_MAC_OFF (TPACKET_ALIGN(TPACKET2_HDRLEN + 16) + \
                      sizeof(struct virtio_net_hdr) - ETH_HLEN)
_Static_assert(TPB_SMALL_MAX + SLOT_MAC_OFF == SMALL_SLOT,
               "TPB_SMALL_MAX is what a small slot holds past its headers");
#define SMALL_PER_BLOCK 32u                 /* 64 KB blocks */
#define BIG_SLOT (17u * 4096u)
#define BIG_PER_BLOCK 15u                   /* 255 pages: one page wasted per 2^8 */
#define SNDBUF_BYTES (8 * 1024 * 1024)

static int fail(char *err, size_t errlen, const char *what, int e)
{
    snprintf(err, errlen, "%s: %s", what, strerror(e));
    return -e;
}

static int setopt(int fd, int level, int name, const void *val, socklen_t len,
                  char *err, size_t errlen, const char *what)
{
    if (setsockopt(fd, level, name, val, len) < 0)
        return fail(err, errlen, what, errno);
    return 0;
}

static int promisc_on(int fd, int ifindex, char *err, size_t errlen)
{
    struct packet_mreq mr;

    memset(&mr, 0, sizeof(mr));
    mr.mr_ifindex = ifindex;
    mr.mr_type = PACKET_MR_PROMISC;
    return setopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof(mr),
                  err, errlen, "PACKET_MR_PROMISC");
}

/* Binds fd to the port; protocol 0 receives nothing, ETH_P_ALL all. */
static int bind_port(int fd, int ifindex, uint16_t proto, char *err,
                     size_t errlen)
{
    struct sockaddr_ll sll;

    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(proto);
    sll.sll_ifindex = ifindex;
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
        return fail(err, errlen, "bind(AF_PACKET)", errno);
    return 0;
}

/* Unmaps a ring and closes its socket; either may be absent. */
static void unmap_close(uint8_t *map, size_t len, int fd)
{
    if (map)
        munmap(map, len);
    if (fd >= 0)
        close(fd);
}

/* Sets up an RX or TX ring (opt) of at least `frames` slots, whole
 * blocks of per_block, and maps it; returns its slot count or -errno. */
static long map_ring(int fd, int opt, uint32_t slot, uint32_t per_block,
                     uint32_t frames, uint8_t **map, size_t *len,
                     char *err, size_t errlen)
{
    const char *what = opt == PACKET_RX_RING ? "RX ring" : "TX ring";
    struct tpacket_req req;
    void *m;

    if (frames < per_block)
        frames = per_block;
    memset(&req, 0, sizeof(req));
    req.tp_frame_size = slot;
    req.tp_block_size = slot * per_block;
    req.tp_block_nr = (frames + per_block - 1) / per_block;
    req.tp_frame_nr = req.tp_block_nr * per_block;
    if (setsockopt(fd, SOL_PACKET, opt, &req, sizeof(req)) < 0)
        return fail(err, errlen, what, errno);
    *len = (size_t)req.tp_block_size * req.tp_block_nr;
    m = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
             fd, 0);
    if (m == MAP_FAILED)
        return fail(err, errlen, what, errno);
    *map = m;
    return (long)req.tp_frame_nr;
}

/* Options every TPB socket sends with.  Bypassing the qdisc is faster,
 * but dev_direct_xmit() drops a GSO packet the device would have to
 * segment in software, so super-packets go through a socket without it. */
static int tx_options(int fd, int bypass, char *err, size_t errlen)
{
    int one = 1, sndbuf = SNDBUF_BYTES, rc;

    if ((rc = setopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one),
                     err, errlen, "PACKET_VNET_HDR")) ||
        (bypass && (rc = setopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one,
                                sizeof(one), err, errlen,
                                "PACKET_QDISC_BYPASS"))))
        return rc;
    /* SO_SNDBUFFORCE needs CAP_NET_ADMIN, which we have; fall back quietly
     * to the capped SO_SNDBUF otherwise. */
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)))
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    return 0;
}

int tpb_txsock_open(int ifindex, int bypass, int promisc, char *err,
                    size_t errlen)
{
    int fd, rc;

    fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0)
        return fail(err, errlen, "socket(AF_PACKET)", errno);
    if ((rc = tx_options(fd, bypass, err, errlen)) ||
        (rc = bind_port(fd, ifindex, 0, err, errlen)) ||
        (promisc && (rc = promisc_on(fd, ifindex, err, errlen)))) {
        close(fd);
        return rc;
    }
    return fd;
}

/* A socket's filter from its bind until it has its place in a group: until
 * then it would take every frame for itself. */
static struct sock_filter take_none[1] = {BPF_STMT(BPF_RET | BPF_K, 0)};
const struct sock_fprog tpb_ring_nothing = {1, take_none};

int tpb_ring_filter(const struct tpb_ring *r, const struct sock_fprog *filter,
                    char *err, size_t errlen)
{
    int none = 0;

    if (filter)
        return setopt(r->fd, SOL_SOCKET, SO_ATTACH_FILTER, filter, sizeof(*filter), err,
                      errlen, "SO_ATTACH_FILTER");
    return setopt(r->fd, SOL_SOCKET, SO_DETACH_FILTER, &none, sizeof(none), err, errlen,
                  "SO_DETACH_FILTER");
}

int tpb_ring_fanout_prog(const struct tpb_ring *r, const struct sock_fprog *prog,
                         char *err, size_t errlen)
{
    return setopt(r->fd, SOL_PACKET, PACKET_FANOUT_DATA, prog, sizeof(*prog), err,
                  errlen, "PACKET_FANOUT_DATA");
}

/* Joins fanout group `id` (hash by flow, or by a program) without a moment in which the
 * socket takes frames on its own: a member outside the group would get a
 * copy of every frame the group also hands out.  So the socket is bound
 * with a filter that takes nothing, joins (which needs it bound), and only
 * then gets its real filter.  Hash fanout, no rollover: a flow stays with
 * one worker, so its frames stay in order; a worker's full ring drops (and
 * counts) rather than reorder.  Symmetric hash: both directions of a flow
 * go to the same worker index on either port. */
static int fanout_join(struct tpb_ring *r, int ifindex, uint16_t proto,
                       uint32_t id, const struct sock_fprog *filter, char *err,
                       size_t errlen)
{
    int by_prog = (id & TPB_RING_FANOUT_CBPF) != 0;
    int flags = (id & TPB_RING_FANOUT_NEW ? PACKET_FANOUT_FLAG_UNIQUEID : 0) |
                PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
    int type = by_prog ? PACKET_FANOUT_CBPF : PACKET_FANOUT_HASH;
    int arg = (int)((id & 0xffffu) | ((type | flags) << 16));
    socklen_t len = sizeof(arg);
    int rc;

    if ((rc = tpb_ring_filter(r, &tpb_ring_nothing, err, errlen)) ||
        (rc = bind_port(r->fd, ifindex, proto, err, errlen)))
        return rc;
    /* In a group the group's hook is the one registered, and it ignores
     * outgoing frames only with this flag (Linux >= 6.2): the socket's own
     * PACKET_IGNORE_OUTGOING no longer applies, and a worker would take
     * in what TPB's transmit-only sockets sent out of the port and forward
     * it back.  An older kernel refuses the flag: groups made there see
     * TPB's qdisc-path sends (super-packets, a port with a qdisc). */
    if (setsockopt(r->fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg)) < 0) {
        if (errno != EINVAL)
            return fail(err, errlen, "PACKET_FANOUT", errno);
        if (by_prog)            /* the caller filters each socket instead */
            return fail(err, errlen, "PACKET_FANOUT_FLAG_IGNORE_OUTGOING", EOPNOTSUPP);
        arg &= ~(PACKET_FANOUT_FLAG_IGNORE_OUTGOING << 16);
        if ((rc = setopt(r->fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg),
                         err, errlen, "PACKET_FANOUT")))
            return rc;
    }
    if (getsockopt(r->fd, SOL_PACKET, PACKET_FANOUT, &arg, &len) < 0)
        return fail(err, errlen, "PACKET_FANOUT", errno);
    r->fanout_id = (uint16_t)(arg & 0xffff);
    return tpb_ring_filter(r, filter, err, errlen);
}

int tpb_ring_open(struct tpb_ring *r, int ifindex, uint16_t proto,
                  uint32_t frames, int big, const struct sock_fprog *filter,
                  int promisc, uint32_t fanout, char *err, size_t errlen)
{
    int one = 1, ver = TPACKET_V2, rc;
    uint32_t slot = big ? BIG_SLOT : SMALL_SLOT;
    uint32_t per_block = big ? BIG_PER_BLOCK : SMALL_PER_BLOCK;
    long n;

    memset(r, 0, sizeof(*r));
    r->fd = -1;
    r->ifindex = ifindex;

    /* Protocol 0: receives nothing until bind() names its protocol. */
    r->fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (r->fd < 0)
        return fail(err, errlen, "socket(AF_PACKET)", errno);

    if ((rc = setopt(r->fd, SOL_PACKET, PACKET_VERSION, &ver, sizeof(ver),
                     err, errlen, "PACKET_VERSION")) ||
        (rc = tx_options(r->fd, 1, err, errlen)) ||
        (rc = setopt(r->fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one,
                     sizeof(one), err, errlen, "PACKET_IGNORE_OUTGOING")))
        goto out;
    if (!fanout && filter &&
        (rc = setopt(r->fd, SOL_SOCKET, SO_ATTACH_FILTER, filter,
                     sizeof(*filter), err, errlen, "SO_ATTACH_FILTER")))
        goto out;

    n = map_ring(r->fd, PACKET_RX_RING, slot, per_block, frames, &r->map,
                 &r->map_len, err, errlen);
    if (n < 0) {
        rc = (int)n;
        goto out;
    }
    r->frame_size = slot;
    r->frame_nr = (uint32_t)n;

    if (fanout ? (rc = fanout_join(r, ifindex, proto, fanout, filter, err, errlen))
               : (rc = bind_port(r->fd, ifindex, proto, err, errlen)))
        goto out;
    if (promisc && (rc = promisc_on(r->fd, ifindex, err, errlen)))
        goto out;
    return 0;
out:
    tpb_ring_close(r);
    return rc;
}

void tpb_ring_close(struct tpb_ring *r)
{
    unmap_close(r->map, r->map_len, r->fd);
    r->map = NULL;
    r->fd = -1;
}

#define TX_SLOT TPB_TXRING_SLOT
#define TX_PER_BLOCK 32u
/* A TX slot stays taken until its skb is freed; a ring in flight must not
 * be cut short by the send buffer. */
#define TX_SNDBUF_BYTES (32 * 1024 * 1024)

int tpb_txring_open(struct tpb_txring *t, int ifindex, int bypass,
                    uint32_t frames, char *err, size_t errlen)
{
    int one = 1, ver = TPACKET_V2, sndbuf = TX_SNDBUF_BYTES, rc;
    long n;

    memset(t, 0, sizeof(*t));
    t->fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (t->fd < 0)
        return fail(err, errlen, "socket(AF_PACKET)", errno);
    /* The vnet header and PACKET_LOSS must be set before the ring. */
    if ((rc = setopt(t->fd, SOL_PACKET, PACKET_VERSION, &ver, sizeof(ver),
                     err, errlen, "PACKET_VERSION")) ||
        (rc = tx_options(t->fd, bypass, err, errlen)) ||
        (rc = setopt(t->fd, SOL_PACKET, PACKET_LOSS, &one, sizeof(one),
                     err, errlen, "PACKET_LOSS")))
        goto out;
    setsockopt(t->fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf));
    n = map_ring(t->fd, PACKET_TX_RING, TX_SLOT, TX_PER_BLOCK, frames,
                 &t->map, &t->map_len, err, errlen);
    if (n < 0) {
        rc = (int)n;
        goto out;
    }
    t->frame_size = TX_SLOT;
    t->frame_nr = (uint32_t)n;
    t->len = calloc(t->frame_nr, sizeof(*t->len));
    if (!t->len) {
        rc = fail(err, errlen, "TX ring", ENOMEM);
        goto out;
    }
    if ((rc = bind_port(t->fd, ifindex, 0, err, errlen)))
        goto out;
    return 0;
out:
    tpb_txring_close(t);
    return rc;
}

void tpb_txring_close(struct tpb_txring *t)
{
    unmap_close(t->map, t->map_len, t->fd);
    free(t->len);
    memset(t, 0, sizeof(*t));
    t->fd = -1;
}

void tpb_vlan_tag(uint16_t tpid, uint16_t tci, uint8_t *out)
{
    out[0] = tpid >> 8;
    out[1] = tpid & 0xff;
    out[2] = tci >> 8;
    out[3] = tci & 0xff;
}

uint16_t tpb_csum_fold(const uint8_t *data, size_t len, uint32_t seed)
{
    uint64_t sum = seed;
    size_t i;

    for (i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)(data[i] << 8 | data[i + 1]);
    if (len & 1)
        sum += (uint32_t)data[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}
