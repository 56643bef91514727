/* ring.h — internal to the C helper: AF_PACKET sockets with an RX ring or a TX ring. */
#ifndef TPB_RING_H
#define TPB_RING_H

#include <stdint.h>
#include <stddef.h>
#include <linux/if_packet.h>

struct tpb_ring {
    int fd;
    int ifindex;
    uint8_t *map;
    size_t map_len;
    uint32_t frame_size;
    uint32_t frame_nr;
    uint32_t head;          /* next slot the kernel will hand us */
    uint16_t fanout_id;     /* its PACKET_FANOUT group, if it joined one */
};

struct sock_fprog;

/* fanout argument of tpb_ring_open: 0 for none, this for a new group whose
 * id the kernel picks (PACKET_FANOUT_FLAG_UNIQUEID), or JOIN | id.  Group 0
 * is a real group: the kernel's first unique id after boot, and again each
 * time its 16-bit counter wraps. */
#define TPB_RING_FANOUT_NEW 0x10000u
#define TPB_RING_FANOUT_JOIN 0x20000u
/* ... or TPB_RING_FANOUT_CBPF | NEW or JOIN | id: a group whose cBPF
 * program (tpb_ring_fanout_prog) hands each frame to one member
 * (PACKET_FANOUT_CBPF; the member index is what it returns, modulo the
 * number of members).  A kernel that cannot make a group ignore outgoing
 * frames (Linux < 6.2) refuses it with -EOPNOTSUPP. */
#define TPB_RING_FANOUT_CBPF 0x40000u

/* TPB_SMALL_MAX (tpb.h): the longest frame a ring of small slots takes. */
/* Slots of the big ring (70 MB): super-packets are fewer, each up to 64 KB, and
 * come in bursts (a 512-slot ring overflowed at the far end of a loaded tunnel). */
#define TPB_BIG_FRAMES 1024u

/* An RX ring on ifindex, of small slots or big ones, with an optional
 * cBPF filter and promiscuous membership; the same socket sends out of
 * that port.  proto: ETH_P_ALL (every frame, before the netdev ingress
 * hook) or one EtherType (only its frames, after the hook: their mark is
 * set, their VLAN tag gone).  fanout: 0, TPB_RING_FANOUT_JOIN | a
 * PACKET_FANOUT_HASH group's id, or TPB_RING_FANOUT_NEW; a member shares
 * the port's frames by flow with the others (r->fanout_id: the group's
 * id). */
int tpb_ring_open(struct tpb_ring *r, int ifindex, uint16_t proto,
                  uint32_t frames, int big, const struct sock_fprog *filter,
                  int promisc, uint32_t fanout, char *err, size_t errlen);
/* A socket that only sends out of ifindex (protocol 0: it receives
 * nothing), with or without qdisc bypass and promiscuous membership.
 * Returns fd or -errno. */
int tpb_txsock_open(int ifindex, int bypass, int promisc, char *err,
                    size_t errlen);
void tpb_ring_close(struct tpb_ring *r);
/* A filter that takes no frame (BPF_RET 0). */
extern const struct sock_fprog tpb_ring_nothing;
/* r's socket filter swapped for `filter` (atomically), or removed (NULL). */
int tpb_ring_filter(const struct tpb_ring *r, const struct sock_fprog *filter,
                    char *err, size_t errlen);
/* The program of r's TPB_RING_FANOUT_CBPF group, set or swapped (the
 * kernel swaps it atomically for the whole group). */
int tpb_ring_fanout_prog(const struct tpb_ring *r, const struct sock_fprog *prog,
                         char *err, size_t errlen);
/* txq.c: ifindex's MTU now (SIOCGIFMTU through any socket fd); 0 if it
 * cannot be read (the device gone). */
uint32_t port_mtu(int fd, int ifindex);

/* A TX ring (PACKET_TX_RING) on a socket of its own, which only sends.
 * Frames are copied into its slots and go with one send() per flush
 * (txq.c); the socket has PACKET_LOSS, so a slot txq.c invalidates (to
 * give up on a frame the device keeps refusing) is skipped. */
struct tpb_txring {
    int fd;                 /* -1: no ring, everything by sendmmsg */
    uint8_t *map;
    size_t map_len;
    uint32_t frame_size;
    uint32_t frame_nr;
    uint32_t head;          /* the next slot we fill */
    uint32_t tail;          /* the oldest slot handed over, not seen sent */
    uint32_t pending;       /* slots from tail to head */
    uint32_t *len;          /* per slot: frame length, or TXRING_GAVE_UP */
};
#define TXRING_GAVE_UP UINT32_MAX
/* A TX slot: a 1518-byte frame and the vnet header fit. */
#define TPB_TXRING_SLOT 2048u
/* Where a TX slot's data (vnet header, then the frame) starts. */
#define TPB_TXRING_OFF (TPACKET2_HDRLEN - sizeof(struct sockaddr_ll))

int tpb_txring_open(struct tpb_txring *t, int ifindex, int bypass,
                    uint32_t frames, char *err, size_t errlen);
void tpb_txring_close(struct tpb_txring *t);

static inline struct tpacket2_hdr *tpb_ring_slot(const struct tpb_ring *r,
                                                 uint32_t i)
{
    return (struct tpacket2_hdr *)(r->map + (size_t)i * r->frame_size);
}

/* The slot at head if the kernel has filled it, else NULL.  The acquire
 * load pairs with the kernel's smp_wmb() before it flips tp_status. */
static inline struct tpacket2_hdr *tpb_ring_peek(const struct tpb_ring *r,
                                                 uint32_t i, uint32_t *status)
{
    struct tpacket2_hdr *h = tpb_ring_slot(r, i);
    uint32_t st = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
    if (!(st & TP_STATUS_USER))
        return NULL;
    *status = st;
    return h;
}

static inline void tpb_ring_release(struct tpacket2_hdr *h)
{
    __atomic_store_n(&h->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
}

static inline uint32_t tpb_ring_next(const struct tpb_ring *r, uint32_t i)
{
    return i + 1 == r->frame_nr ? 0 : i + 1;
}

#endif
