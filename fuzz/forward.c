/* forward.c — plain forwarding: forward() on one frame, out of either
 * port, with a vnet header; GRE and IP-in-IP super-packets (what GRO
 * merges on a port carrying someone else's tunnel) are segmented in C,
 * everything else is bridged unchanged.  Invariants: fuzz/README.md. */
#include "fuzz.h"

#include <stdlib.h>

#define MAX_FRAME (65535 + FZ_ETH)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[MAX_FRAME];
    struct fz_in in = {data, size}, vin;
    struct tpb_bridge_config cfg;
    static struct tpb_bridge *br;
    struct virtio_net_hdr vh;
    struct fz_frame z;
    struct fz_snap b, a;
    struct fz_l4 l4;
    uint8_t b0 = fz_u8(&in), tag[4], *ip, skip[VNET_LEN];
    int mode = (b0 >> 1) & 3, port = (b0 >> 4) & 1, reason;
    size_t len, i;
    uint64_t drops;

    fz_wr16(tag, (uint16_t[]){0x8100, 0x88a8, 0x9100, 0x8100}[fz_u8(&in) & 3]);
    fz_wr16(tag + 2, fz_u16(&in));
    vin = in;                  /* the vnet bytes, then the frame: the rest */
    fz_bytes(&in, skip, mode == FZ_VNET_RAW ? VNET_LEN : mode == FZ_VNET_GSO ? 3 : 0);
    len = fz_bytes(&in, buf, in.n < MAX_FRAME ? in.n : MAX_FRAME);
    in = vin;
    if (len < FZ_ETH)
        return 0;
    ip = buf + FZ_ETH;
    memset(&l4, 0, sizeof(l4));
    if (b0 & 8) {
        if (fz_rd16(buf + 12) == ETYPE_IPV4 || fz_rd16(buf + 12) == ETYPE_IPV6)
            fz_fix_ip(ip, len - FZ_ETH, mode == FZ_VNET_GSO || mode == FZ_VNET_PARTIAL, &l4);
    } else if (mode == FZ_VNET_GSO || mode == FZ_VNET_PARTIAL) {
        fz_l4_of(buf, len, &l4);
    }
    fz_vnet(&vh, mode, &in, &l4, FZ_ETH);

    /* Plain bridging keeps no state between frames (counters are compared
     * by difference): one bridge for the whole run, not 370 KB allocated
     * and freed per input. */
    if (!br) {
        memset(&cfg, 0, sizeof(cfg));
        cfg.ifindex[TPB_PORT_IN] = 1;
        cfg.ifindex[TPB_PORT_OUT] = 2;
        br = fz_bridge(&cfg, FZ_T0);
    }
    fz_frame_new(&z, buf, len, &vh, b0 & 1, tag);
    fz_snap(br, &b);
    fz_outs_clear();
    forward(br, &br->q[port], &z.f);
    fz_flush(br);
    fz_snap(br, &a);
    drops = fz_drops(&b, &a, &reason);
    for (i = 0; i < fz_nouts; i++)
        FZ_CHECK(fz_outs[i].port == port, "forward: out of the other port");
    FZ_CHECK(!memcmp(z.f.mac, z.orig, len), "forward: the frame was written to");
    fz_check_forward(&z, fz_outs, fz_nouts, drops,
                     a.c[port].drop_gso_bad - b.c[port].drop_gso_bad);
    fz_outs_clear();
    fz_frame_free(&z);
    return 0;
}
