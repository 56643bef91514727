/* coalesce.c — the pieces of a GRE-in-UDP UDP GSO super-packet back into
 * one inner TCP super-packet, as GRO would have merged them.
 *
 * Another TPB (udpgso.c) sends a TCP super-packet as one UDP GSO message
 * whose pieces are consecutive segments of one flow; a veth or a local
 * bridge hands it to this TPB whole.  Sent on as its ~45 inner segments it
 * would cost --in 45 skbs; merged back it is one frame, which the kernel
 * (or the NIC) segments again on the way out, or the next hop takes
 * whole.  Merging must never change what the receiver gets, so a piece is
 * merged only where GRO would merge it (net/ipv4/tcp_offload.c,
 * tcp_gro_receive; net/ipv4/af_inet.c, inet_gro_receive):
 *
 *   1. pieces_mergeable()  every piece's GRE header checked (gre_decode:
 *                          version, key, checksum; no sequence numbers,
 *                          whose window each piece must pass on its own);
 *                          inner IPv4 without options or fragments, TCP
 *                          with no SYN/RST/URG; all headers equal but for
 *                          the IPv4 length, ID (+1 a piece) and checksum,
 *                          the TCP sequence number (following on), flags
 *                          (CWR only on the first, PSH/FIN only on the
 *                          last) and checksum; every TCP checksum right
 *                          (RFC 9293 3.1: a segment GRO would not merge
 *                          with a wrong one, nor may TPB); every piece's
 *                          payload gso_size long but the last's;
 *   2. coalesce()          the first piece's headers, copied, lengths and
 *                          the IPv4 checksum set, the TCP checksum left
 *                          partial (the pseudo-header sum), a vnet header
 *                          of TCPV4 and gso_size; every payload behind
 *                          them where it lies in the ring slot (the frame
 *                          is held until its messages have left), not
 *                          copied: the kernel copies them into its skb.
 * Anything else: decap.c takes the pieces one by one.
 */
#define _GNU_SOURCE
#include <string.h>
#include <linux/if_ether.h>

#include "bridge.h"

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_URG 0x20
#define TCP_CWR 0x80
#define MAX_PIECES 64u

struct piece {
    uint8_t *in;               /* inner IPv4 header */
    size_t ilen;               /* inner packet */
    size_t plen;               /* its TCP payload */
};

/* 1. ------------------------------------------------------------------ */

/* An inner packet merge may take: IPv4, 20-byte header, TCP, whole. */
static int plain_tcp4(const uint8_t *in, size_t len, size_t *thl)
{
    if (len < 40 || in[0] != 0x45 || in[9] != IPPROTO_TCP_ ||
        (rd16(in + 6) & (IP_MF | IP_OFFMASK)) || rd16(in + 2) != len)
        return 0;
    *thl = (size_t)(in[32] >> 4) * 4;
    return *thl >= 20 && 20 + *thl <= len &&
           !(in[33] & (TCP_SYN | TCP_RST | TCP_URG));
}

static int tcp_csum_ok(const uint8_t *in, size_t len)
{
    return csum_finish(csum_add(csum_pseudo4(in, IPPROTO_TCP_, (uint32_t)(len - 20)),
                                in + 20, len - 20)) == 0;
}

/* Piece k (k > 0) follows piece 0 as a segment of the same flow would;
 * the flags as tcp_gro_receive rules: CWR only on the first (it ends a
 * merge), PSH/FIN only on the last. */
static int follows(const struct piece *p0, const struct piece *pk, size_t k,
                   uint32_t seq, int last, size_t thl)
{
    uint8_t fa = p0->in[33], fb = pk->in[33];

    if (!tcp_seg_follows(p0->in, pk->in, ETYPE_IPV4, thl,
                         (uint16_t)(rd16(p0->in + 4) + k), seq))
        return 0;
    fa &= (uint8_t)~(TCP_CWR | TCP_PSH | TCP_FIN);
    if (!last && (fb & (TCP_PSH | TCP_FIN)))
        return 0;
    return (fb & (uint8_t)~(TCP_PSH | TCP_FIN)) == fa;
}

static size_t pieces_mergeable(struct remote *r, uint8_t *ip, size_t tot, size_t seg,
                               struct piece *pc)
{
    size_t ihl = (size_t)(ip[0] & 0x0f) * 4, off, n = 0, glen, thl = 0, thl0 = 0;
    uint32_t seq = 0;
    struct gre_pkt g;

    for (off = ihl + UDP_HLEN; off < tot; off += glen) {
        glen = tot - off < seg ? tot - off : seg;
        if (n == MAX_PIECES || gre_decode(&r->grx, ip + off, glen, 0, &g) ||
            g.has_seq || g.proto != ETYPE_IPV4)
            return 0;
        pc[n].in = ip + off + g.off;
        pc[n].ilen = glen - g.off;
        if (!plain_tcp4(pc[n].in, pc[n].ilen, &thl) || !tcp_csum_ok(pc[n].in, pc[n].ilen))
            return 0;
        pc[n].plen = pc[n].ilen - 20 - thl;
        if (n == 0) {
            thl0 = thl;
            seq = rd32(pc[0].in + 24);
            if (pc[0].in[33] & (TCP_PSH | TCP_FIN) && off + glen < tot)
                return 0;          /* GRO ends a merge there */
        } else if (thl != thl0 || pc[n - 1].plen != pc[0].plen ||
                   !follows(&pc[0], &pc[n], n, seq, off + glen >= tot, thl)) {
            return 0;
        }
        seq += (uint32_t)pc[n].plen;
        n++;
    }
    return n >= 2 && pc[0].plen && pc[n - 1].plen && pc[n - 1].plen <= pc[0].plen ? n : 0;
}

/* 2. ------------------------------------------------------------------ */

int udp_gso_coalesce(struct tpb_bridge *br, struct remote *r, struct frame *f,
                     uint8_t *ip, size_t tot, size_t seg)
{
    struct piece pc[MAX_PIECES];
    struct iovec iov[1 + MAX_PIECES];
    struct virtio_net_hdr vh;
    size_t n = pieces_mergeable(r, ip, tot, seg, pc), k, hl, len;
    uint8_t *buf, *t, flags = 0;

    if (!n)
        return 0;
    hl = 20 + (size_t)(pc[0].in[32] >> 4) * 4;
    for (len = hl, k = 0; k < n; k++)
        len += pc[k].plen;
    if (len > 65535)
        return 0;
    buf = txq_alloc(&br->q[TPB_PORT_IN], hl);
    if (!buf)
        return 0;
    memcpy(buf, pc[0].in, hl);
    iov[0].iov_base = buf;
    iov[0].iov_len = hl;
    for (k = 0; k < n; k++) {
        iov[1 + k].iov_base = pc[k].in + hl;
        iov[1 + k].iov_len = pc[k].plen;
        flags |= pc[k].in[33];
    }
    wr16(buf + 2, (uint16_t)len);
    ip4_set_csum(buf);
    t = buf + 20;
    t[13] = flags;
    wr16(t + 16, (uint16_t)~csum_finish(csum_pseudo4(buf, IPPROTO_TCP_,
                                                     (uint32_t)(len - 20))));
    memset(&vh, 0, sizeof(vh));
    vh.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vh.csum_start = 20;        /* from the inner packet: decap.c moves it */
    vh.csum_offset = 16;
    vh.gso_type = VIRTIO_NET_HDR_GSO_TCPV4 |
                  (pc[0].in[33] & TCP_CWR ? VIRTIO_NET_HDR_GSO_ECN : 0);
    vh.gso_size = (uint16_t)pc[0].plen;
    vh.hdr_len = (uint16_t)hl;
    if (ecn_decap_inner(ip[1], buf, ETYPE_IPV4)) {
        br->tc.drop[TPB_DROP_ECN]++;
        return 1;
    }
    if (decap_deliver_inner(br, f, iov, (uint32_t)(1 + n), len, &vh) == 0) {
        br->tc.decap_packets += n - 1;   /* deliver counted one */
        br->tc.udp_gso_coalesced++;
    }
    return 1;
}
