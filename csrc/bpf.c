/* bpf.c — bpf(2), as bpf.h declares it. */
#define _GNU_SOURCE
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#include "bpf.h"

int bpf_call(int cmd, union bpf_attr *attr)
{
    return (int)syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

int bpf_load_xdp(const struct bpf_insn *p, size_t n, const char *name,
                 char *log, size_t loglen)
{
    union bpf_attr a;

    memset(&a, 0, sizeof(a));
    a.prog_type = BPF_PROG_TYPE_XDP;
    a.insns = (uint64_t)(uintptr_t)p;
    a.insn_cnt = (uint32_t)n;
    a.license = (uint64_t)(uintptr_t)"GPL";
    a.log_buf = (uint64_t)(uintptr_t)log;
    a.log_size = log ? (uint32_t)loglen : 0;
    a.log_level = log ? 1 : 0;
    strncpy(a.prog_name, name, sizeof(a.prog_name) - 1);
    return bpf_call(BPF_PROG_LOAD, &a);
}

int bpf_map_new(uint32_t type, uint32_t value_size, uint32_t entries, uint32_t flags)
{
    union bpf_attr a;

    memset(&a, 0, sizeof(a));
    a.map_type = type;
    a.key_size = 4;
    a.value_size = value_size;
    a.max_entries = entries;
    a.map_flags = flags;
    return bpf_call(BPF_MAP_CREATE, &a);
}

int bpf_link_xdp(int prog_fd, int ifindex, uint32_t flags)
{
    union bpf_attr a;

    memset(&a, 0, sizeof(a));
    a.link_create.prog_fd = (uint32_t)prog_fd;
    a.link_create.target_ifindex = (uint32_t)ifindex;
    a.link_create.attach_type = BPF_XDP;
    a.link_create.flags = flags;
    return bpf_call(BPF_LINK_CREATE, &a);
}
