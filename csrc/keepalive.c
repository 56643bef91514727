/* keepalive.c — which POP the tunnel goes to, and whether any answers.
 *
 * Keepalives are Cisco's (Linux ip_gre reflects them too): an outer GRE
 * packet to the POP whose inner packet is a GRE packet of protocol 0 from
 * the POP back to us.  The POP decapsulates it, finds an IPv4 packet
 * addressed to us and sends it on as it is: a plain GRE packet of protocol
 * 0 from the POP, which is the answer.  No payload, no new protocol; the
 * far end needs no configuration.
 *
 * The stages, in the order the functions below appear:
 *   1. ka_setup()      the remotes of a (new) configuration, in order of
 *                      preference; a remote kept by address keeps its state
 *                      and its sequence window;
 *   2. choose()        traffic goes to the first remote that is up; with
 *                      none, tunnel_down(): bypass (fail-open) or drop;
 *   3. ka_learn_hop()  the Ethernet header a keepalive leaves with: TPB has
 *                      no route and no ARP of its own toward the ISP, so it
 *                      takes the MACs (and VLAN tag) of the last frame
 *                      selected for the tunnel, as the encapsulated flows
 *                      themselves leave (bypassed too, while no POP is up);
 *                      until one comes, of the first bridged IPv4 frame
 *                      from --in, which no later bridged frame replaces;
 *   4. ka_tick()       every loop pass: a remote unanswered for period x
 *                      retries goes down; every period, a keepalive to each
 *                      remote (ka_send);
 *   5. ka_answer()     a protocol-0 GRE packet from a remote that passed its
 *                      checks (gre_keepalive_answer, and ka_id_check: the
 *                      IP ID of one of our last keepalives): it is up; RTT;
 *   6. ka_reflect()    a decapsulated IPv4 GRE packet from us to the remote
 *                      it came from is that POP's keepalive: sent back to it.
 * With GRE-in-UDP the same, one layer down: the outer packet is GRE-in-UDP
 * and the inner one carries its GRE header in UDP to port 4754, so the
 * answer is GRE-in-UDP of protocol 0.
 * The sequence window of a remote never moves for a keepalive answer: the
 * answer is our own inner GRE header come back, which carries no number.
 */
#define _GNU_SOURCE
#include <string.h>
#include <linux/if_ether.h>

#include "bridge.h"

#define KA_TTL 255              /* as Cisco: the answer must survive the route back */

static void set_up(struct remote *r, int up)
{
    if (r->up == up)
        return;
    r->up = (uint8_t)up;
    r->st.up = (uint8_t)up;
    r->st.transitions++;
}

/* 2. ------------------------------------------------------------------ */

static void choose(struct tpb_bridge *br)
{
    int i, best = -1;

    for (i = 0; i < (int)br->nremotes; i++)
        if (br->remote[i].up) {
            best = i;
            break;
        }
    for (i = 0; i < (int)br->nremotes; i++)
        br->remote[i].st.active = i == best;
    br->active = best;
    if (best >= 0)
        br->gtx.remote = br->remote[best].addr;
}

/* 1. ------------------------------------------------------------------ */

void ka_setup(struct tpb_bridge *br, const struct tpb_tunnel_config *t)
{
    struct remote old[TPB_MAX_REMOTES];
    uint32_t nold = br->nremotes, i, j;
    /* A window means something only under the same key and options. */
    int same_opts = br->cfg.has_key == t->has_key && br->cfg.key == t->key &&
                    br->cfg.seq == t->seq && br->cfg.csum == t->csum;

    memcpy(old, br->remote, sizeof(old));
    memset(br->remote, 0, sizeof(br->remote));
    br->nremotes = t->nremotes;
    for (i = 0; i < t->nremotes; i++) {
        struct remote *r = &br->remote[i];
        int found = 0;

        for (j = 0; j < nold; j++)
            if (old[j].addr == t->remote[i]) {
                *r = old[j];
                found = 1;
                break;
            }
        if (!found) {
            r->addr = r->st.addr = t->remote[i];
            r->ka_id = ka_first_id();
            r->up = r->st.up = !t->keepalive_ms;
        }
        if (!found || !same_opts) {
            struct gre_tx unused;

            gre_setup(&unused, &r->grx, t->local, r->addr, t->key,
                      t->has_key, t->csum, t->seq, t->ttl, t->tos);
        }
        r->grx.local = t->local;
        if (!t->keepalive_ms)
            set_up(r, 1);
        else if (!r->reply_ns)
            r->reply_ns = br->now_ns;   /* the down timer starts now */
    }
    br->ka_due_ns = br->now_ns;         /* a first round at once */
    choose(br);
}

struct remote *ka_remote(struct tpb_bridge *br, uint32_t addr)
{
    uint32_t i;

    for (i = 0; i < br->nremotes; i++)
        if (br->remote[i].addr == addr)
            return &br->remote[i];
    return NULL;
}

void tunnel_down(struct tpb_bridge *br, struct frame *f)
{
    if (br->cfg.on_down == TPB_DOWN_DROP) {
        br->tc.drop[TPB_DROP_TUNNEL_DOWN]++;
        return;
    }
    br->tc.bypassed++;
    forward(br, &br->q[TPB_PORT_OUT], f);
}

/* 3. ------------------------------------------------------------------ */

void ka_learn_hop(struct tpb_bridge *br, const struct frame *f)
{
    if (rd16(f->mac + 12) != ETYPE_IPV4 || (f->mac[0] & 1))
        return;
    if (br->have_hop && !memcmp(br->hop, f->mac, 12) &&
        br->hop_tagged == f->tagged &&
        (!f->tagged || !memcmp(br->hop_tag, f->tag, 4)))
        return;
    memcpy(br->hop, f->mac, 12);
    br->hop_tagged = f->tagged;
    memcpy(br->hop_tag, f->tag, 4);
    if (!br->have_hop)
        br->ka_due_ns = br->now_ns;     /* what could not be sent, now */
    br->have_hop = 1;
}

/* 4. ------------------------------------------------------------------ */

/* The inner packet: IPv4 from the remote to us, GRE of protocol 0 with the
 * tunnel's key and checksum but no sequence number (RFC 2890 numbers are
 * the sender's; this header comes back to us).  With GRE-in-UDP the GRE
 * header rides in UDP to port 4754 (from it too: RFC 8086 asks entropy of
 * data flows, and this one is a single fixed flow), so that the far end
 * sends it back as GRE-in-UDP, which crosses NAT where plain GRE cannot. */
static size_t ka_inner(const struct tpb_bridge *br, const struct remote *r,
                       uint8_t *in)
{
    size_t glen = gre_hlen(br->cfg.csum, br->cfg.has_key, 0), off = 4;
    size_t ulen = br->gtx.udp ? UDP_HLEN : 0;
    uint8_t *u = in + 20, *g = in + 20 + ulen;

    in[0] = 0x45;
    in[1] = 0;
    wr16(in + 2, (uint16_t)(20 + ulen + glen));
    wr16(in + 4, r->ka_id);
    wr16(in + 6, 0);
    in[8] = KA_TTL;
    in[9] = br->gtx.udp ? IPPROTO_UDP_ : IPPROTO_GRE_;
    wr32(in + 12, r->addr);
    wr32(in + 16, br->cfg.local);
    ip4_set_csum(in);
    wr16(g, (uint16_t)((br->cfg.csum ? GRE_C : 0) | (br->cfg.has_key ? GRE_K : 0)));
    wr16(g + 2, 0);
    if (br->cfg.csum) {
        wr32(g + off, 0);
        off += 4;
    }
    if (br->cfg.has_key)
        wr32(g + off, br->cfg.key);
    if (br->cfg.csum)           /* RFC 2784 2.5 */
        wr16(g + 4, csum_finish(csum_add(0, g, glen)));
    if (ulen)
        udp4_put(u, in, GRE_UDP_PORT, GRE_UDP_PORT, UDP_HLEN + glen, UDP_HLEN + glen, 0);
    return 20 + ulen + glen;
}

static void ka_send(struct tpb_bridge *br, struct remote *r)
{
    struct txq *q = &br->q[TPB_PORT_OUT];
    struct frame f;
    uint32_t i, save = br->gtx.remote;
    uint8_t *h, *in;
    size_t n, ilen;

    if (!br->have_hop) {
        r->st.keepalives_unsent++;
        return;
    }
    memset(&f, 0, sizeof(f));
    f.tagged = br->hop_tagged;
    memcpy(f.tag, br->hop_tag, 4);
    i = txq_reserve(q);
    h = q->hdr[i];
    memset(h, 0, VNET_LEN);
    n = VNET_LEN + eth_write(h + VNET_LEN, br->hop, br->hop + 6, &f, ETYPE_IPV4);
    in = h + n + br->overhead;
    r->ka_id++;
    ilen = ka_inner(br, r, in);
    br->gtx.remote = r->addr;
    n += gre_encap(&br->gtx, h + n, ETYPE_IPV4, in, ilen,
                   gre_wants_psum(&br->gtx) ? csum_add(0, in, ilen) : 0);
    br->gtx.remote = save;
    q->iov[i][0].iov_base = h;
    q->iov[i][0].iov_len = n + ilen;
    txq_commit(q, i, 1);
    r->sent_ns = br->now_ns;
    r->st.keepalives_sent++;
}

void ka_tick(struct tpb_bridge *br)
{
    uint64_t period = (uint64_t)br->cfg.keepalive_ms * 1000000ull;
    uint64_t dead = period * br->cfg.keepalive_retries;
    uint32_t i;
    int changed = 0;

    if (!period)
        return;
    for (i = 0; i < br->nremotes; i++) {
        struct remote *r = &br->remote[i];

        if (r->up && br->now_ns - r->reply_ns > dead) {
            set_up(r, 0);
            changed = 1;
        }
    }
    if (changed)
        choose(br);
    if (br->now_ns < br->ka_due_ns)
        return;
    br->ka_due_ns = br->now_ns + period;
    for (i = 0; i < br->nremotes; i++)
        ka_send(br, &br->remote[i]);
}

/* How long poll() may sleep before ka_tick() has something to do. */
int ka_timeout_ms(const struct tpb_bridge *br, int max_ms)
{
    uint64_t period = (uint64_t)br->cfg.keepalive_ms * 1000000ull;
    uint64_t next = br->ka_due_ns, dead = period * br->cfg.keepalive_retries;
    uint32_t i;

    if (!br->tunnel || !period)
        return max_ms;
    for (i = 0; i < br->nremotes; i++)
        if (br->remote[i].up && br->remote[i].reply_ns + dead + 1 < next)
            next = br->remote[i].reply_ns + dead + 1;
    if (next <= br->now_ns)
        return 0;
    next = (next - br->now_ns + 999999) / 1000000;
    return next < (uint64_t)max_ms ? (int)next : max_ms;
}

/* 5. ------------------------------------------------------------------ */

void ka_answer(struct tpb_bridge *br, struct remote *r, const uint8_t *ip)
{
    (void)ip;
    r->st.keepalives_received++;
    r->reply_ns = br->now_ns;
    if (r->sent_ns)
        r->st.rtt_ns = mono_ns() - r->sent_ns;
    if (!r->up) {
        set_up(r, 1);
        choose(br);
    }
}

/* 6. ------------------------------------------------------------------ */

int ka_reflect(struct tpb_bridge *br, struct frame *f, struct remote *r,
               const uint8_t *in, size_t ilen)
{
    struct txq *q = &br->q[TPB_PORT_OUT];
    uint32_t i;
    uint8_t *h;
    size_t n;

    /* The POP's keepalive: GRE, or GRE-in-UDP to port 4754 (the POP's own
     * keepalives follow its peer's encapsulation), from us to that POP. */
    if ((in[9] != IPPROTO_GRE_ && in[9] != IPPROTO_UDP_) ||
        rd32(in + 12) != br->cfg.local ||
        rd32(in + 16) != r->addr || (rd16(in + 6) & (IP_MF | IP_OFFMASK)))
        return 0;
    if (in[9] == IPPROTO_UDP_ &&
        (ilen < (size_t)(in[0] & 0x0f) * 4 + UDP_HLEN ||
         rd16(in + (size_t)(in[0] & 0x0f) * 4 + 2) != GRE_UDP_PORT))
        return 0;
    i = txq_reserve(q);
    h = q->hdr[i];
    memset(h, 0, VNET_LEN);
    /* Back to whoever handed it to us, from the address it was sent to. */
    n = VNET_LEN + eth_write(h + VNET_LEN, f->mac + 6, f->mac, f, ETYPE_IPV4);
    q->iov[i][0].iov_base = h;
    q->iov[i][0].iov_len = n;
    q->iov[i][1].iov_base = (void *)in;
    q->iov[i][1].iov_len = ilen;
    txq_commit(q, i, 2);
    r->st.keepalives_reflected++;
    return 1;
}
