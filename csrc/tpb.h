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
    uint64_t kernel_packets;   /* frames the kernel offered this socket */
    uint64_t kernel_drops;     /* frames the kernel dropped: ring full */
    uint64_t polls;            /* times the loop slept in poll() */
    uint64_t batches;          /* sendmmsg batches sent */
};

struct tpb_bridge_config {
    int ifindex[2];          /* TPB_PORT_IN, TPB_PORT_OUT */
    uint32_t ring_frames;    /* RX ring slots per port */
    uint32_t batch;          /* frames per sendmmsg, <= 256 */
    uint32_t spin_us;        /* busy-poll this long before sleeping */
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

/* Copies one port's counters (after folding in PACKET_STATISTICS). */
void tpb_bridge_counters(struct tpb_bridge *br, int port,
                         struct tpb_port_counters *out);

void tpb_bridge_close(struct tpb_bridge *br);

/* ---- ring.c: exposed for unit tests ---- */

/* Writes a frame's 802.1Q/802.1ad tag (TPID, TCI) into out[4]. */
void tpb_vlan_tag(uint16_t tpid, uint16_t tci, uint8_t *out);

/* Internet checksum (RFC 1071) over len bytes, folded, not inverted. */
uint16_t tpb_csum_fold(const uint8_t *data, size_t len, uint32_t seed);
