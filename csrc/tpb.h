/* tpb.h — the one contract between the C helper and Python (cffi cdef).
 *
 * build.py hands this file to cffi's cdef() with every line that starts
 * with '#' removed, except '#define NAME <integer>'.  Keep it that way:
 * plain structs, integer constants and prototypes only.  The C files
 * include <stdint.h> before this header.
 */

#define TPB_PORT_IN 0
#define TPB_PORT_OUT 1
#define TPB_NPORTS 2

/* Per-port counters.  rx_* count what the port's ring handed us, tx_* what
 * went out of the port; each drop_* is one reason a frame did not make it.
 * kernel_* come from PACKET_STATISTICS (the kernel's own view of the ring).
 * Written only by the forwarding thread; read at any time by Python. */
struct tpb_port_counters {
    uint64_t rx_frames;
    uint64_t rx_bytes;
    uint64_t tx_frames;
    uint64_t tx_bytes;
    uint64_t drop_truncated;   /* larger than a ring slot: never half-sent */
    uint64_t drop_too_big;     /* EMSGSIZE: larger than the egress MTU */
    uint64_t drop_egress_full; /* ENOBUFS/EAGAIN: the egress device dropped it */
    uint64_t drop_send_error;  /* any other sendmmsg error */
    uint64_t drop_gso_bad;     /* a tunnel's super-packet TPB cannot segment */
    uint64_t kernel_packets;   /* frames the kernel offered this socket */
    uint64_t kernel_drops;     /* frames the kernel dropped: ring full */
    uint64_t polls;            /* times the loop slept in poll() */
    uint64_t batches;          /* sendmmsg batches sent */
    /* backend afxdp only (XDP_STATISTICS, the XDP program's own count): */
    uint64_t drop_fill_empty;  /* no free UMEM chunk in the fill ring */
    uint64_t drop_xsk_rx;      /* the kernel dropped it otherwise (rx_dropped) */
    uint64_t drop_xsk_invalid; /* descriptors the kernel refused (rx/tx_invalid) */
    uint64_t drop_no_socket;   /* came in on a queue with no socket */
    uint64_t xsk_tx_ring_empty; /* times the kernel found the TX ring empty */
    /* backend packet, overload shedding (csrc/shed.c): */
    uint64_t drop_shed;        /* dropped by the XDP program: TPB overloaded */
    uint64_t shed_engaged;     /* times shedding started on this port */
    uint64_t shed_refused;     /* 1: the kernel refused the program */
};

/* Outer DF policy and fragmentation mode (tunnel settings). */
#define TPB_DF_COPY 0
#define TPB_DF_SET 1
#define TPB_DF_CLEAR 2
#define TPB_FRAG_INNER 0
#define TPB_FRAG_OUTER 1

/* Drop reasons of the tunnel, the index into tpb_tunnel_counters.drop[];
 * tpb_drop_name() gives each its metric label. */
#define TPB_DROP_OUTER_BAD 0        /* outer IPv4 header malformed */
#define TPB_DROP_NOT_PEER 1         /* GRE to us from an unknown address */
#define TPB_DROP_GRE_TRUNCATED 2
#define TPB_DROP_GRE_VERSION 3      /* RFC 2784: version must be 0 */
#define TPB_DROP_GRE_FLAGS 4        /* reserved/routing flag bits set */
#define TPB_DROP_GRE_CSUM 5         /* checksum present and wrong */
#define TPB_DROP_GRE_CSUM_MISSING 6 /* checksum required, absent */
#define TPB_DROP_GRE_KEY 7          /* key absent, unexpected or wrong */
#define TPB_DROP_GRE_SEQ_STALE 8    /* RFC 2890: not after the last one */
#define TPB_DROP_GRE_SEQ_MISSING 9
#define TPB_DROP_GRE_PROTO 10       /* inner neither IPv4 nor IPv6 */
#define TPB_DROP_INNER_BAD 11       /* decapsulated packet malformed */
#define TPB_DROP_ECN 12             /* RFC 6040: CE outer, Not-ECT inner */
#define TPB_DROP_NO_ROUTER_MAC 13   /* in-side router MAC not learned yet */
#define TPB_DROP_LOCAL_OTHER 14     /* to the tunnel address, not GRE/echo */
#define TPB_DROP_ENCAP_NOT_IP 15    /* selected frame is not IPv4/IPv6 */
#define TPB_DROP_ENCAP_BAD 16       /* selected frame's IP header malformed */
#define TPB_DROP_TOO_BIG 17         /* DF set and too big: ICMP instead */
#define TPB_DROP_GSO_BAD 18         /* super-packet TPB cannot segment */
#define TPB_DROP_REASM_TIMEOUT 19   /* fragments of a datagram never completed */
#define TPB_DROP_REASM_OVERLAP 20   /* overlapping fragments: datagram dropped */
#define TPB_DROP_REASM_DUPLICATE 21 /* exact duplicate fragment */
#define TPB_DROP_REASM_BAD 22       /* inconsistent fragment / too large */
#define TPB_DROP_REASM_MEMORY 23    /* reassembly memory bound reached */
#define TPB_DROP_NO_PEER 24         /* POP: no bridge for the destination */
#define TPB_DROP_TUN_WRITE 25       /* POP: TUN write failed otherwise (down, gone) */
#define TPB_DROP_SEND 26            /* sendmmsg refused it */
#define TPB_DROP_TUNNEL_DOWN 27     /* no POP up and on_tunnel_down = drop */
#define TPB_DROP_SOURCE_OWNED 28    /* POP: inner source routed to another peer */
#define TPB_DROP_INNER_MARTIAN 29   /* POP: inner source no router forwards */
#define TPB_DROP_LEARN_FULL 30      /* POP: the peer's learned entries at budget */
#define TPB_DROP_RCVBUF_FULL 31     /* POP: the raw socket overflowed (SO_RXQ_OVFL) */
#define TPB_DROP_TUN_FULL 32        /* POP: TUN write EAGAIN/ENOBUFS/ENOMEM */
#define TPB_DROP_TUN_INVALID 33     /* POP: TUN write EINVAL */
#define TPB_DROP_ECHO_CSUM 34       /* echo request to the tunnel address, bad checksum */
#define TPB_DROP_ECHO_RATELIMITED 35 /* echo request over icmp_rate: no reply */
#define TPB_DROP_REASM_EVICTED 36   /* oldest datagram evicted for a newer one */
#define TPB_DROP_MTU_TOO_SMALL 37   /* --out's MTU below the tunnel's minimum */
#define TPB_DROP_FRAG_OVERFLOW 38   /* no IPv4 header can describe it: > 65535 */
#define TPB_DROP_KEEPALIVE_STALE 39 /* protocol 0 whose IP ID we never sent lately */
#define TPB_DROP_UDP_BAD 40         /* GRE-in-UDP: UDP header truncated, length wrong */
#define TPB_DROP_UDP_CSUM 41        /* GRE-in-UDP: UDP checksum wrong */
#define TPB_DROP_NO_ENDPOINT 42     /* POP: a NAT'd peer not heard from yet */
#define TPB_NDROP 43

/* The encapsulation: GRE (RFC 2784) straight in IPv4, or GRE-in-UDP
 * (RFC 8086: UDP destination port 4754, the source port a hash of the
 * inner flow), which crosses NAT and spreads over ECMP. */
#define TPB_ENCAP_GRE 0
#define TPB_ENCAP_UDP 1

/* What a selected frame becomes while no POP answers keepalives. */
#define TPB_DOWN_BYPASS 0           /* bridged unencapsulated (fail-open) */
#define TPB_DOWN_DROP 1             /* dropped, counted tunnel_down */

/* POPs a bridge may list in `remote`, in order of preference. */
#define TPB_MAX_REMOTES 8

/* Counters of one tunnel (the bridge's, or one POP peer's). */
struct tpb_tunnel_counters {
    uint64_t encap_packets;      /* GRE packets sent (after segmentation) */
    uint64_t encap_bytes;        /* their inner bytes */
    uint64_t decap_packets;
    uint64_t decap_bytes;
    uint64_t fragments;          /* fragments made (inner or outer) */
    uint64_t fragmented;         /* packets that needed fragmenting */
    uint64_t icmp_sent;          /* ICMP fragmentation-needed sent */
    uint64_t icmp_ratelimited;   /* ... and held back by the rate limit */
    uint64_t mss_clamped;
    uint64_t gso_packets;        /* super-packets segmented */
    uint64_t gso_segments;       /* segments they made */
    uint64_t gro_packets;        /* POP: super-packets written to the TUN
                                  * device, coalesced from several */
    uint64_t gro_segments;       /* the packets coalesced into them */
    uint64_t reasm_fragments;    /* fragments taken into reassembly */
    uint64_t reasm_done;         /* datagrams reassembled */
    uint64_t reasm_memory;       /* bytes held now (a gauge) */
    uint64_t reasm_memory_peak;
    uint64_t arp_replies;
    uint64_t echo_replies;
    uint64_t bypassed;           /* selected, no POP up: bridged as they are */
    uint64_t udp_gso_sent;       /* GRE-in-UDP UDP GSO messages sent (udpgso.c) */
    uint64_t udp_gso_received;   /* ... and received, taken apart (decap.c) */
    uint64_t udp_gso_coalesced;  /* ... their pieces merged into one (coalesce.c) */
    uint64_t drop[TPB_NDROP];
};

struct tpb_tunnel_config {
    uint32_t local;              /* tunnel address, host byte order */
    uint32_t remote[TPB_MAX_REMOTES]; /* the POPs, in order of preference */
    uint32_t nremotes;           /* 1..TPB_MAX_REMOTES */
    uint32_t key;
    uint8_t has_key;
    uint8_t csum;
    uint8_t seq;
    uint8_t df;                  /* TPB_DF_* */
    int16_t ttl;                 /* 1..255, or -1: inherit */
    int16_t tos;                 /* 0..255, or -1: inherit */
    uint8_t frag_mode;           /* TPB_FRAG_* */
    uint8_t pmtud;               /* 1: DF set and too big -> ICMP; 0: fragment */
    uint16_t mss;                /* clamp; 0: derived from the MTU */
    uint32_t mtu;                /* of --out */
    uint32_t icmp_rate;          /* ICMP per second */
    uint32_t reasm_memory;       /* bytes */
    uint32_t reasm_timeout_ms;
    uint8_t out_mac[6];          /* --out's MAC: ARP answers carry it */
    uint32_t keepalive_ms;       /* period; 0: no keepalives, every POP up */
    uint32_t keepalive_retries;  /* down after period x retries unanswered */
    uint8_t on_down;             /* TPB_DOWN_* */
    uint8_t encap;               /* TPB_ENCAP_* */
    uint8_t router_mac_set;      /* router_mac given: never learned */
    uint8_t router_mac[6];       /* --in's router, where unwrapped packets
                                  * addressed to TPB's own MAC go */
};

/* Keepalive state of one POP (a bridge's remote, or a POP's peer).  Cisco
 * format: outer GRE to the far end, whose inner packet is a GRE packet of
 * protocol 0 from the far end back to us; the far end routes it back. */
struct tpb_remote_state {
    uint32_t addr;                 /* host order */
    uint8_t up;                    /* answering keepalives (or they are off) */
    uint8_t active;                /* bridge: selected traffic goes here */
    uint64_t transitions;          /* up <-> down changes */
    uint64_t keepalives_sent;
    uint64_t keepalives_unsent;    /* no next-hop MAC learned yet */
    uint64_t keepalives_received;  /* our own, come back */
    uint64_t keepalives_reflected; /* the far end's, sent back to it */
    uint64_t rtt_ns;               /* of the last answered one; 0: none yet */
    uint64_t since_reply_ns;       /* time since the last answer; 0: never */
    /* POP, GRE-in-UDP: where the peer's packets come from and the POP's
     * go (a NAT'd peer's learned from its checked packets); 0: none. */
    uint32_t endpoint_addr;        /* host order */
    uint16_t endpoint_port;
};

#define TPB_FANOUT_NONE 0
#define TPB_FANOUT_NEW 1
#define TPB_FANOUT_JOIN 2
#define TPB_FANOUT_RINGS 10     /* rings of one loop: 5 sources x 2 at most */
/* Frames up to this length (as the kernel hands them over, any outer VLAN
 * tag taken off) go to a source's ring of small slots, longer ones to its
 * ring of big slots.  A small slot is 2048 bytes and the frame starts at
 * 76 (af_packet.c tpacket_rcv: TPACKET_ALIGN(TPACKET2_HDRLEN + 16) plus
 * the 10-byte vnet header, less the 14 of the Ethernet header); a longer
 * frame would be cut short.  In tunnel mode tpb/select.py sends only
 * untagged IPv4 frames that fit one to TPB's sockets on --in itself
 * (csrc/bridge_open.c). */
#define TPB_SMALL_MAX 1972

struct tpb_bridge_config {
    int ifindex[2];          /* TPB_PORT_IN, TPB_PORT_OUT */
    uint32_t ring_frames;    /* RX ring slots per port */
    uint32_t batch;          /* frames per sendmmsg, <= 256 */
    uint32_t spin_us;        /* busy-poll this long before sleeping */
    /* Workers (plain mode), each its own loop: TPB_FANOUT_NONE, one loop
     * sees every frame; TPB_FANOUT_NEW, the first worker: each ring makes a
     * PACKET_FANOUT_HASH group with an id the kernel picks (read back with
     * tpb_bridge_fanout_ids); TPB_FANOUT_JOIN, every other worker: ring i
     * joins group fanout_id[i].  Each flow's frames go to one worker. */
    uint32_t fanout;
    uint16_t fanout_id[TPB_FANOUT_RINGS];
    /* Overload shedding (csrc/shed.c): an XDP program on a port TPB cannot
     * keep up with drops the excess fairly by flow.  One loop only. */
    int shed;
    int tunnel;              /* 0: plain bridge */
    int sel_ifindex;         /* tunnel: --in's frames after nftables */
    uint32_t mark;           /* tunnel: the mark that selects a frame */
    struct tpb_tunnel_config tun;
};

struct tpb_bridge;

/* Opens both ports' sockets and rings.  On failure returns NULL and writes
 * one line into err (errlen bytes). */
struct tpb_bridge *tpb_bridge_open(const struct tpb_bridge_config *cfg,
                                   char *err, size_t errlen);

/* Forwards until tpb_bridge_stop(); returns 0, or -errno on a fatal error. */
int tpb_bridge_run(struct tpb_bridge *br);

/* Safe from any thread: wakes the loop and makes tpb_bridge_run() return. */
void tpb_bridge_stop(struct tpb_bridge *br);

/* Live reload, safe from any thread while tpb_bridge_run() runs (or before
 * it): a new tunnel configuration (remotes, key/csum/seq, keepalive,
 * on_down, ICMP rate, MSS, mark ...) taken at the loop's next pass without
 * closing a ring.  Ports (ifindex, sel_ifindex) and the mode (plain or
 * tunnel) cannot change: refused with -EINVAL and a line in err.  State
 * that still applies carries over (a remote kept by address keeps its
 * keepalive state and sequence windows).  Returns 0 once applied. */
int tpb_bridge_reconfigure(struct tpb_bridge *br,
                           const struct tpb_bridge_config *cfg,
                           char *err, size_t errlen);

/* Keepalive state of each remote, in configured order; returns how many
 * (0 in plain mode). */
uint32_t tpb_bridge_remotes(struct tpb_bridge *br,
                            struct tpb_remote_state *out, uint32_t n);

/* Passes of the forwarding loop so far: it wakes at least once a second,
 * so a value that stops moving means the loop is stuck (the watchdog). */
uint64_t tpb_bridge_heartbeat(struct tpb_bridge *br);

/* Whether the frames that may skip `port`'s qdisc do (PACKET_QDISC_BYPASS).
 * Open leaves it on; the caller turns it off while the port's root qdisc
 * is one that queues (anything but noqueue).  Safe from any thread.
 * Returns 0 or -errno. */
int tpb_bridge_bypass_qdisc(struct tpb_bridge *br, int port, int on);

/* Copies one port's counters (after folding in PACKET_STATISTICS). */
void tpb_bridge_counters(struct tpb_bridge *br, int port,
                         struct tpb_port_counters *out);

void tpb_bridge_close(struct tpb_bridge *br);

/* The fanout group id of each ring (0 for a ring in no group), in the
 * order TPB_FANOUT_JOIN takes them; returns how many rings. */
uint32_t tpb_bridge_fanout_ids(struct tpb_bridge *br, uint16_t *out);
/* Why overload shedding was asked for and could not be loaded ("" if it
 * was, or was not asked for): TPB then runs without it. */
const char *tpb_bridge_shed_error(struct tpb_bridge *br);

/* Overload shedding's XDP program on its own, for tests: loaded with its
 * map (NULL and err on failure); run once on a frame with the quota set
 * (BPF_PROG_TEST_RUN): its verdict, XDP_PASS (2) or XDP_DROP (1), or
 * -errno; tpb_shed_map() reads the map: 0 the quota, 1..256 the buckets
 * (slot << 32 | count), 257 the frames dropped. */
struct tpb_shed;
struct tpb_shed *tpb_shed_new(char *err, size_t errlen);
int tpb_shed_run(struct tpb_shed *t, const uint8_t *frame, uint32_t len, uint64_t quota);
uint64_t tpb_shed_map(struct tpb_shed *t, uint32_t key);
void tpb_shed_free(struct tpb_shed *t);

/* The tunnel's counters (zero in plain mode). */
void tpb_bridge_tunnel_counters(struct tpb_bridge *br,
                                struct tpb_tunnel_counters *out);

const char *tpb_drop_name(int reason);

/* ---- xsk.c: the AF_XDP backend (plain bridging) ---- */

#define TPB_XSK_MAX_QUEUES 16

struct tpb_xsk_config {
    int ifindex[2];          /* TPB_PORT_IN, TPB_PORT_OUT */
    uint32_t queues[2];      /* receive queues of each: one socket each */
    uint32_t ring_size;      /* descriptors per ring and socket, a power of two */
    uint32_t batch;          /* RX descriptors taken per port and pass */
    uint32_t spin_us;        /* spin this long before sleeping in poll() */
    uint32_t busy_poll_us;   /* SO_BUSY_POLL with SO_PREFER_BUSY_POLL; 0: off */
    int force_copy;          /* bind with XDP_COPY (else the kernel chooses) */
};

struct tpb_xsk;

/* Makes the UMEM, both ports' sockets (one per receive queue) and one XDP
 * program per port, attached as a bpf_link: detached by tpb_xsk_close or
 * when the process ends.  NULL and one line in err on failure. */
struct tpb_xsk *tpb_xsk_open(const struct tpb_xsk_config *cfg, char *err, size_t errlen);
/* 1: zero-copy, 0: copy mode, -errno: unknown. */
int tpb_xsk_zerocopy(struct tpb_xsk *x);
int tpb_xsk_run(struct tpb_xsk *x);
void tpb_xsk_stop(struct tpb_xsk *x);
uint64_t tpb_xsk_heartbeat(struct tpb_xsk *x);
void tpb_xsk_counters(struct tpb_xsk *x, int port, struct tpb_port_counters *out);
void tpb_xsk_close(struct tpb_xsk *x);

/* ---- pop.c: the far end of many bridges' tunnels ---- */

struct tpb_pop_peer_config {
    uint32_t addr;               /* the bridge's tunnel address, host order;
                                  * 0: behind NAT (GRE-in-UDP, identified by
                                  * its key, answered where it sends from) */
    uint32_t key;
    uint8_t has_key;
    uint8_t csum;
    uint8_t seq;
    int16_t ttl;                 /* -1: inherit */
    int16_t tos;                 /* -1: inherit */
    uint32_t keepalive_ms;       /* the POP's own keepalives; 0: off */
    uint32_t keepalive_retries;
    uint8_t encap;               /* TPB_ENCAP_* */
};

/* An inner prefix behind a peer; IPv4 as ::ffff:a.b.c.d with len + 96. */
struct tpb_pop_prefix {
    uint8_t addr[16];
    uint8_t len;
    uint32_t peer;
};

struct tpb_pop_config {
    uint32_t local;              /* host order */
    int tun_fd;
    uint32_t npeers;
    uint32_t nprefixes;
    uint32_t learn_timeout_s;    /* learned inner source -> peer entries */
    uint32_t batch;
    uint32_t tun_mtu;            /* the TUN device (IFF_VNET_HDR) */
    uint32_t tun_uso;            /* it takes UDP super-packets (TUN_F_USO4/6
                                  * accepted: Linux >= 6.2): pop_gro.c merges
                                  * UDP datagrams */
};

struct tpb_pop;

struct tpb_pop *tpb_pop_open(const struct tpb_pop_config *cfg,
                             const struct tpb_pop_peer_config *peers,
                             const struct tpb_pop_prefix *prefixes,
                             char *err, size_t errlen);
int tpb_pop_run(struct tpb_pop *pop);
void tpb_pop_stop(struct tpb_pop *pop);
/* peer < npeers: that peer's counters; peer == npeers: what belongs to no
 * peer (GRE from unknown addresses, packets no bridge is behind). */
void tpb_pop_counters(struct tpb_pop *pop, uint32_t peer,
                      struct tpb_tunnel_counters *out);
uint32_t tpb_pop_learned(struct tpb_pop *pop);
/* A peer's keepalive state (the POP reflects every bridge's keepalives and,
 * where a peer has keepalive_ms, sends its own).  Returns 0, or -EINVAL
 * for peer >= npeers. */
int tpb_pop_peer_state(struct tpb_pop *pop, uint32_t peer,
                       struct tpb_remote_state *out);
/* Live reload of the peers and prefixes, as tpb_bridge_reconfigure: the
 * TUN device and socket stay; a peer kept by address keeps its counters,
 * keepalive state and sequence windows; peer indexes follow the new list.
 * Returns 0 once applied. */
int tpb_pop_reconfigure(struct tpb_pop *pop, const struct tpb_pop_config *cfg,
                        const struct tpb_pop_peer_config *peers,
                        const struct tpb_pop_prefix *prefixes,
                        char *err, size_t errlen);
uint64_t tpb_pop_heartbeat(struct tpb_pop *pop);
void tpb_pop_close(struct tpb_pop *pop);

/* ---- ring.c: exposed for unit tests ---- */

/* Writes a frame's 802.1Q/802.1ad tag (TPID, TCI) into out[4]. */
void tpb_vlan_tag(uint16_t tpid, uint16_t tci, uint8_t *out);

/* Internet checksum (RFC 1071) over len bytes, folded, not inverted. */
uint16_t tpb_csum_fold(const uint8_t *data, size_t len, uint32_t seed);
