/* shed.c — overload shedding for the AF_PACKET backend: when TPB cannot
 * keep up with a port, an XDP program on that port drops the excess before
 * the kernel spends anything else on it, fairly by flow.
 *
 * Why.  Every frame a port receives costs the kernel its receive work
 * (skb, __netif_receive_skb_core, the copy into TPB's ring or the finding
 * that the ring is full, the free) before TPB sees it, and that work has
 * priority over any thread.  Where it runs on TPB's own core (a NIC's
 * interrupts there, or RPS), a flood past TPB's rate takes the core from
 * TPB: the more is offered, the less is delivered (receive livelock,
 * Mogul and Ramakrishnan 1997).  XDP runs first, in the driver, on a raw
 * buffer: a frame dropped there costs tens of nanoseconds, not the ~650 ns
 * its receive work costs (README, "Overload").
 *
 * A port passes these stages, each tick (TICK_NS) of the loop:
 *   1. shed_tick()    the port's ring drops and the frames TPB took from it
 *                     since the last tick;
 *   2. engage()       drops in SPELL ticks running, each at least one in
 *                     RING_SHARE of what TPB took: the program is loaded
 *                     and attached (bpf_link) with an admitted rate of what
 *                     TPB managed;
 *   3. steer()        while attached, the rate follows TPB: less by an
 *                     eighth when a ring dropped or holds a queue (a 16th
 *                     of its slots: frames waiting there are delay, and
 *                     its drops are blind to flows), more by a 32nd while
 *                     the program drops and TPB keeps up (AIMD, as TCP's);
 *                     per flow bucket, a quota per slot of 2^20 ns is the
 *                     admitted rate over the buckets seen lately;
 *   4. release()      no frame shed for CALM_NS: detached, so the port
 *                     works as before (on veth an XDP program also turns
 *                     the peer's TSO off: only for as long as it sheds).
 *
 * The program, per frame:  bucket = hash(IPv4 addresses, and TCP/UDP
 * ports when the header has no options; IPv6: the EtherType and the low
 * 64 bits of both addresses, and TCP/UDP ports right behind the header;
 * else the EtherType) into 1..256, behind up to two VLAN tags (802.1Q or
 * 802.1ad) whose VLAN IDs join the hash: on a trunk, flows are buckets of
 * their own as on an untagged link, and one VLAN's flood does not take
 * another's quota (a tag a driver moved out of the frame, as NICs with
 * VLAN offload do, is not seen: the flow is still hashed by its
 * addresses);
 * a bucket's count restarts with each slot; over the quota, XDP_DROP and
 * the map's drop counter counts it (drop reason `shed`).  Light flows
 * (ARP, pings, a TCP flow beside a UDP flood) stay under their bucket's
 * quota and pass; heavy ones are trimmed to it.  Frames the program does
 * not understand pass.  An IPv6 flow with extension headers is hashed
 * without its ports; a frame with a third tag by its VLAN IDs.
 *
 * The map is one BPF array, mmapped (BPF_F_MMAPABLE) so the loop reads
 * and writes it without a system call: [0] the quota (0: pass all), [1..256]
 * the buckets (slot << 32 | count), [257] frames dropped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <sys/mman.h>

#include "bpf.h"
#include "bridge.h"

#define NBUCKET 256u
#define KEY_QUOTA 0u
#define KEY_DROPS (NBUCKET + 1u)
#define NKEY (NBUCKET + 2u)
#define SLOT_SHIFT 20                 /* a slot: 2^20 ns, ~1 ms */
#define TICK_NS SHED_TICK_NS
#define SPELL 3                       /* ticks of ring drops that engage it */
#define RING_SHARE 16                 /* ring drops >= 1/16 of frames taken */
#define CALM_NS 2000000000ull         /* 2 s with nothing shed: released */
#define RECENT_SLOTS 16               /* a bucket seen this lately is active */
#define MIN_RATE 64u                  /* frames per tick admitted, at least */

#define LDX(sz, d, s, o) INSN(BPF_LDX | BPF_MEM | (sz), d, s, o, 0)
#define MOVK(d, k) INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, k)
#define MOVX(d, s) INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define ALUK(op, d, k) INSN(BPF_ALU64 | (op) | BPF_K, d, 0, 0, k)
#define ALUX(op, d, s) INSN(BPF_ALU64 | (op) | BPF_X, d, s, 0, 0)
#define CALL(f) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define MAP(fd) INSN(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, fd), \
                INSN(0, 0, 0, 0, 0)
#define LOOKUP(fd) MOVX(BPF_REG_2, BPF_REG_10), ALUK(BPF_ADD, BPF_REG_2, -4), MAP(fd), \
                   CALL(BPF_FUNC_map_lookup_elem)

/* Jumps name a label (LABEL() marks one: it takes no instruction); asm_link()
 * turns each into its offset, so inserting instructions moves no jump. */
#define LABEL(l) INSN(PSEUDO_LABEL, 0, 0, (l), 0)
#define JK(op, d, k, l) INSN(BPF_JMP | (op) | BPF_K, d, 0, (l), k)
#define JX(op, d, s, l) INSN(BPF_JMP | (op) | BPF_X, d, s, (l), 0)
#define JA(l) INSN(BPF_JMP | BPF_JA, 0, 0, (l), 0)
#define PSEUDO_LABEL 0xff              /* no BPF opcode */
#define MAX_INSNS 160

enum {
    L_TAG1, L_TAG2, L_TYPE, L_IPV4, L_PORTS_IF, L_PORTS, L_HASH, L_SAME_SLOT, L_PASS, L_SHED,
    L_COUNTED, L_N
};

/* p without its labels into out (MAX_INSNS at most): the number of
 * instructions. */
static size_t asm_link(const struct bpf_insn *p, size_t n, struct bpf_insn *out)
{
    int at[L_N];
    size_t i, k = 0;

    for (i = 0; i < n; i++) {
        if (p[i].code == PSEUDO_LABEL)
            at[p[i].off] = (int)k;
        else
            k++;
    }
    for (i = 0, k = 0; i < n; i++) {
        uint8_t op = BPF_OP(p[i].code);

        if (p[i].code == PSEUDO_LABEL)
            continue;
        out[k] = p[i];
        if (BPF_CLASS(p[i].code) == BPF_JMP && op != BPF_CALL && op != BPF_EXIT)
            out[k].off = (int16_t)(at[p[i].off] - (int)k - 1);
        k++;
    }
    return k;
}

/* The program of the header comment. */
static int shed_prog(int map_fd, char *log, size_t loglen)
{
    const struct bpf_insn p[] = {
        MOVX(BPF_REG_6, BPF_REG_1),
        LDX(BPF_W, BPF_REG_2, BPF_REG_6, offsetof(struct xdp_md, data)),
        LDX(BPF_W, BPF_REG_3, BPF_REG_6, offsetof(struct xdp_md, data_end)),
        MOVK(BPF_REG_7, 0),
        MOVK(BPF_REG_8, 0),                     /* the tags' VLAN IDs */
        MOVX(BPF_REG_4, BPF_REG_2),
        ALUK(BPF_ADD, BPF_REG_4, 14),
        JX(BPF_JGT, BPF_REG_4, BPF_REG_3, L_HASH),
        LDX(BPF_H, BPF_REG_7, BPF_REG_2, 12),  /* EtherType, as stored */
        JK(BPF_JEQ, BPF_REG_7, 0x0081, L_TAG1),   /* 802.1Q */
        JK(BPF_JNE, BPF_REG_7, 0xa888, L_TYPE),   /* nor 802.1ad */
    LABEL(L_TAG1),
        MOVX(BPF_REG_4, BPF_REG_2),
        ALUK(BPF_ADD, BPF_REG_4, 18),           /* the tag and the next type */
        JX(BPF_JGT, BPF_REG_4, BPF_REG_3, L_HASH),
        LDX(BPF_H, BPF_REG_4, BPF_REG_2, 14),  /* TCI, as stored */
        ALUK(BPF_AND, BPF_REG_4, 0xff0f),       /* its VLAN ID */
        ALUX(BPF_XOR, BPF_REG_8, BPF_REG_4),
        ALUK(BPF_LSH, BPF_REG_8, 16),
        ALUK(BPF_ADD, BPF_REG_2, 4),            /* on as if untagged */
        LDX(BPF_H, BPF_REG_7, BPF_REG_2, 12),
        JK(BPF_JEQ, BPF_REG_7, 0x0081, L_TAG2),   /* an inner tag */
        JK(BPF_JNE, BPF_REG_7, 0xa888, L_TYPE),
    LABEL(L_TAG2),
        MOVX(BPF_REG_4, BPF_REG_2),
        ALUK(BPF_ADD, BPF_REG_4, 18),
        JX(BPF_JGT, BPF_REG_4, BPF_REG_3, L_HASH),
        LDX(BPF_H, BPF_REG_4, BPF_REG_2, 14),
        ALUK(BPF_AND, BPF_REG_4, 0xff0f),
        ALUX(BPF_XOR, BPF_REG_8, BPF_REG_4),
        ALUK(BPF_ADD, BPF_REG_2, 4),            /* a third tag: its type's bucket */
        LDX(BPF_H, BPF_REG_7, BPF_REG_2, 12),
    LABEL(L_TYPE),
        JK(BPF_JEQ, BPF_REG_7, 0x0008, L_IPV4),
        JK(BPF_JNE, BPF_REG_7, 0xdd86, L_HASH),   /* nor IPv6 */
        MOVX(BPF_REG_4, BPF_REG_2),
        ALUK(BPF_ADD, BPF_REG_4, 58),           /* Ethernet + IPv6 + ports */
        JX(BPF_JGT, BPF_REG_4, BPF_REG_3, L_HASH),
        LDX(BPF_W, BPF_REG_4, BPF_REG_2, 30),  /* source, its low 64 bits */
        ALUX(BPF_XOR, BPF_REG_7, BPF_REG_4),
        LDX(BPF_W, BPF_REG_4, BPF_REG_2, 34),
        ALUX(BPF_XOR, BPF_REG_7, BPF_REG_4),
        LDX(BPF_W, BPF_REG_4, BPF_REG_2, 46),  /* destination, the same */
        ALUX(BPF_XOR, BPF_REG_7, BPF_REG_4),
        LDX(BPF_W, BPF_REG_4, BPF_REG_2, 50),
        ALUX(BPF_XOR, BPF_REG_7, BPF_REG_4),
        LDX(BPF_B, BPF_REG_4, BPF_REG_2, 20),  /* next header */
        MOVX(BPF_REG_5, BPF_REG_2),
        ALUK(BPF_ADD, BPF_REG_5, 54),           /* its ports */
        JA(L_PORTS_IF),
    LABEL(L_IPV4),
        MOVX(BPF_REG_4, BPF_REG_2),
        ALUK(BPF_ADD, BPF_REG_4, 38),           /* Ethernet + IPv4 + ports */
        JX(BPF_JGT, BPF_REG_4, BPF_REG_3, L_HASH),
        LDX(BPF_W, BPF_REG_7, BPF_REG_2, 26),  /* source address */
        LDX(BPF_W, BPF_REG_4, BPF_REG_2, 30),  /* destination */
        ALUX(BPF_XOR, BPF_REG_7, BPF_REG_4),
        LDX(BPF_B, BPF_REG_4, BPF_REG_2, 14),
        JK(BPF_JNE, BPF_REG_4, 0x45, L_HASH),     /* options: no ports */
        LDX(BPF_B, BPF_REG_4, BPF_REG_2, 23),  /* protocol */
        MOVX(BPF_REG_5, BPF_REG_2),
        ALUK(BPF_ADD, BPF_REG_5, 34),           /* its ports */
    LABEL(L_PORTS_IF),
        JK(BPF_JEQ, BPF_REG_4, 6, L_PORTS),       /* TCP */
        JK(BPF_JNE, BPF_REG_4, 17, L_HASH),       /* nor UDP */
    LABEL(L_PORTS),
        LDX(BPF_W, BPF_REG_4, BPF_REG_5, 0),   /* both ports */
        ALUX(BPF_XOR, BPF_REG_7, BPF_REG_4),
    LABEL(L_HASH),
        ALUX(BPF_XOR, BPF_REG_7, BPF_REG_8),
        INSN(BPF_ALU | BPF_MUL | BPF_K, BPF_REG_7, 0, 0, (int32_t)0x9E3779B1u),
        INSN(BPF_ALU | BPF_RSH | BPF_K, BPF_REG_7, 0, 0, 24),
        ALUK(BPF_ADD, BPF_REG_7, 1),            /* bucket 1..256 */
        INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -4, KEY_QUOTA),
        LOOKUP(map_fd),
        JK(BPF_JEQ, BPF_REG_0, 0, L_PASS),
        LDX(BPF_DW, BPF_REG_8, BPF_REG_0, 0),
        JK(BPF_JEQ, BPF_REG_8, 0, L_PASS),        /* not shedding */
        INSN(BPF_STX | BPF_MEM | BPF_W, BPF_REG_10, BPF_REG_7, -4, 0),
        LOOKUP(map_fd),
        JK(BPF_JEQ, BPF_REG_0, 0, L_PASS),
        MOVX(BPF_REG_9, BPF_REG_0),
        CALL(BPF_FUNC_ktime_get_ns),
        ALUK(BPF_RSH, BPF_REG_0, SLOT_SHIFT),
        ALUK(BPF_LSH, BPF_REG_0, 32),
        LDX(BPF_DW, BPF_REG_1, BPF_REG_9, 0),
        MOVX(BPF_REG_2, BPF_REG_1),
        ALUK(BPF_RSH, BPF_REG_2, 32),
        ALUK(BPF_LSH, BPF_REG_2, 32),
        JX(BPF_JEQ, BPF_REG_2, BPF_REG_0, L_SAME_SLOT),
        ALUK(BPF_ADD, BPF_REG_0, 1),            /* a new slot: count 1 */
        INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_9, BPF_REG_0, 0, 0),
        JA(L_PASS),
    LABEL(L_SAME_SLOT),
        ALUK(BPF_ADD, BPF_REG_1, 1),
        INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_9, BPF_REG_1, 0, 0),
        ALUK(BPF_LSH, BPF_REG_1, 32),
        ALUK(BPF_RSH, BPF_REG_1, 32),           /* this slot's count */
        JX(BPF_JGT, BPF_REG_1, BPF_REG_8, L_SHED),
    LABEL(L_PASS),
        MOVK(BPF_REG_0, XDP_PASS),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    LABEL(L_SHED),
        INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -4, KEY_DROPS),
        LOOKUP(map_fd),
        JK(BPF_JEQ, BPF_REG_0, 0, L_COUNTED),
        MOVK(BPF_REG_1, 1),
        INSN(BPF_STX | BPF_ATOMIC | BPF_DW, BPF_REG_0, BPF_REG_1, 0, BPF_ADD),
    LABEL(L_COUNTED),
        MOVK(BPF_REG_0, XDP_DROP),
        INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
    };
    struct bpf_insn out[MAX_INSNS];
    _Static_assert(sizeof(p) / sizeof(p[0]) <= MAX_INSNS, "MAX_INSNS");

    return bpf_load_xdp(out, asm_link(p, sizeof(p) / sizeof(p[0]), out), "tpb_shed", log, loglen);
}

static size_t map_len(void)
{
    long pg = sysconf(_SC_PAGESIZE);

    return ((NKEY * 8u + (size_t)pg - 1) / (size_t)pg) * (size_t)pg;
}

/* The map and the program, not attached: 0, or -errno with err filled. */
int shed_load(struct shed *s, char *err, size_t errlen)
{
    char log[2048] = "";

    s->map_fd = bpf_map_new(BPF_MAP_TYPE_ARRAY, 8, NKEY, BPF_F_MMAPABLE);
    if (s->map_fd < 0) {
        snprintf(err, errlen, "shedding: its BPF map: %s", strerror(errno));
        return -errno;
    }
    s->map = mmap(NULL, map_len(), PROT_READ | PROT_WRITE, MAP_SHARED, s->map_fd, 0);
    if (s->map == MAP_FAILED) {
        s->map = NULL;
        snprintf(err, errlen, "shedding: mapping its BPF map: %s", strerror(errno));
        return -errno;
    }
    s->prog_fd = shed_prog(s->map_fd, NULL, 0);
    if (s->prog_fd < 0)              /* again, for the verifier's reason */
        s->prog_fd = shed_prog(s->map_fd, log, sizeof(log));
    if (s->prog_fd < 0) {
        int e = errno;
        char *nl = strrchr(log, '\n');

        if (nl && nl > log)      /* the verifier's last line says why */
            *nl = '\0';
        nl = strrchr(log, '\n');
        snprintf(err, errlen, "shedding: loading its XDP program: %s%s%s", strerror(e),
                 log[0] ? ": " : "", nl ? nl + 1 : log);
        return -e;
    }
    return 0;
}

void shed_init(struct shed *s, int ifindex)
{
    memset(s, 0, sizeof(*s));
    s->ifindex = ifindex;
    s->map_fd = s->prog_fd = s->link_fd = -1;
}

void shed_free(struct shed *s)
{
    if (s->link_fd >= 0)
        close(s->link_fd);           /* detaches the program */
    if (s->map)
        munmap((void *)s->map, map_len());
    if (s->prog_fd >= 0)
        close(s->prog_fd);
    if (s->map_fd >= 0)
        close(s->map_fd);
    shed_init(s, s->ifindex);
}

/* A bpf_link (as afxdp's, xsk_open.c): the kernel detaches it with the
 * process, however that ends.  Driver mode first; where the driver has none
 * (or refuses, as veth does for a peer MTU past a page), generic XDP, which
 * still runs before RPS and the packet taps. */
static int attach(struct shed *s)
{
    static const uint32_t modes[] = { XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE };
    unsigned i;

    for (i = 0; i < 2; i++) {
        s->link_fd = bpf_link_xdp(s->prog_fd, s->ifindex, modes[i]);
        if (s->link_fd >= 0)
            return 0;
        if (errno == EBUSY || errno == EEXIST)
            break;                   /* someone else's program: leave it */
    }
    return -errno;
}

/* 2. */
static void engage(struct shed *s, uint64_t taken, uint64_t now_ns)
{
    char err[256];

    if (s->refused)
        return;
    if ((!s->map && shed_load(s, err, sizeof(err)) < 0) || attach(s) < 0) {
        s->refused = 1;              /* once: counted, never retried */
        s->c->shed_refused++;
        return;
    }
    s->shed_ns = now_ns;
    s->rate = taken > MIN_RATE ? taken : MIN_RATE;
    s->c->shed_engaged++;
}

/* 3. */
static void steer(struct shed *s, int behind, uint64_t shed, uint64_t now_ns)
{
    volatile uint64_t *m = s->map;
    uint64_t now_slot = now_ns >> SLOT_SHIFT, per_slot, active = 0;
    uint32_t b;

    if (behind)
        s->rate -= s->rate / 8;
    else if (shed)
        s->rate += s->rate / 32 + 1;
    if (s->rate < MIN_RATE)
        s->rate = MIN_RATE;
    for (b = 1; b <= NBUCKET; b++) {
        uint32_t slot = (uint32_t)(m[b] >> 32);

        if ((uint32_t)now_slot - slot < RECENT_SLOTS)
            active++;
    }
    per_slot = (s->rate << SLOT_SHIFT) / TICK_NS;
    per_slot /= active ? active : 1;
    m[KEY_QUOTA] = per_slot ? per_slot : 1;
}

/* 4. */
static void release(struct shed *s)
{
    close(s->link_fd);
    s->link_fd = -1;
    s->map[KEY_QUOTA] = 0;
}

/* 1. Called by the loop once a tick (SHED_TICK_NS), the port's kernel
 * counters just folded in. */
void shed_tick(struct shed *s, uint64_t now_ns, int queued)
{
    uint64_t kd, taken, dropped = 0;

    kd = s->c->kernel_drops - s->last_kdrops;
    taken = s->c->rx_frames - s->last_rx;
    s->last_kdrops = s->c->kernel_drops;
    s->last_rx = s->c->rx_frames;
    if (s->map) {
        uint64_t all = __atomic_load_n(&s->map[KEY_DROPS], __ATOMIC_RELAXED);

        dropped = all - s->c->drop_shed;
        s->c->drop_shed = all;
    }
    if (s->link_fd < 0) {
        s->spell = kd >= MIN_RATE && kd * RING_SHARE >= taken ? s->spell + 1 : 0;
        if (s->spell >= SPELL) {
            s->spell = 0;
            engage(s, taken, now_ns);
        }
        return;
    }
    if (dropped)
        s->shed_ns = now_ns;
    if (now_ns - s->shed_ns >= CALM_NS)
        release(s);
    else
        steer(s, kd || queued, dropped, now_ns);
}

/* ---- the program on its own, for tests (BPF_PROG_TEST_RUN) ------------- */

struct tpb_shed {
    struct shed s;
};

struct tpb_shed *tpb_shed_new(char *err, size_t errlen)
{
    struct tpb_shed *t = calloc(1, sizeof(*t));

    if (!t) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    shed_init(&t->s, 0);
    if (shed_load(&t->s, err, errlen) < 0) {
        tpb_shed_free(t);
        return NULL;
    }
    return t;
}

void tpb_shed_free(struct tpb_shed *t)
{
    if (!t)
        return;
    shed_free(&t->s);
    free(t);
}

int tpb_shed_run(struct tpb_shed *t, const uint8_t *frame, uint32_t len, uint64_t quota)
{
    union bpf_attr a;

    t->s.map[KEY_QUOTA] = quota;
    memset(&a, 0, sizeof(a));
    a.test.prog_fd = (uint32_t)t->s.prog_fd;
    a.test.data_in = (uint64_t)(uintptr_t)frame;
    a.test.data_size_in = len;
    a.test.repeat = 1;
    if (bpf_call(BPF_PROG_TEST_RUN, &a) < 0)
        return -errno;
    return (int)a.test.retval;
}

uint64_t tpb_shed_map(struct tpb_shed *t, uint32_t key)
{
    return key < NKEY ? t->s.map[key] : 0;
}
