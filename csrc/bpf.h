/* bpf.h — the few bpf(2) calls TPB's two XDP programs need (xsk_open.c's
 * redirect to AF_XDP sockets, shed.c's overload shedding), without libbpf:
 * each program is assembled in C with INSN(). */
#ifndef TPB_BPF_H
#define TPB_BPF_H

#include <stddef.h>
#include <stdint.h>
#include <linux/bpf.h>

#define INSN(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), \
                                                .src_reg = (s), .off = (o), .imm = (i) })

int bpf_call(int cmd, union bpf_attr *attr);
/* An XDP program, GPL; the verifier's log into log (loglen bytes) if log. */
int bpf_load_xdp(const struct bpf_insn *p, size_t n, const char *name,
                 char *log, size_t loglen);
int bpf_map_new(uint32_t type, uint32_t value_size, uint32_t entries, uint32_t flags);
/* prog_fd on ifindex as a bpf_link (flags: XDP_FLAGS_*_MODE); -1, errno. */
int bpf_link_xdp(int prog_fd, int ifindex, uint32_t flags);

#endif
