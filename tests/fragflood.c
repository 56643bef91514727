/* fragflood.c — spoofed IPv4 fragments at a steady rate, for
 * tests/test_reasm_flood.py, which builds it with gcc and runs it in a lab
 * namespace:
 *
 *   fragflood SRC DST RATE SECONDS KIND KEY
 *
 * Each packet is a datagram of one fragment, IP protocol 47, a random ID:
 *   KIND "tail"   8 bytes far out (offset 64000..65496, MF random): what
 *                 reassembly cannot check, only hold;
 *   KIND "first"  offset 0, MF set: a GRE header with key KEY and 32 bytes
 *                 (the first fragment of a datagram, checked at once).
 * Sent through a raw socket (IP_HDRINCL: the source is whatever SRC says),
 * paced every millisecond with sendmmsg: RATE per second for SECONDS.
 * At the end one line on stdout: "sent N failed F in S s".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define PKT_MAX 64

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static uint16_t csum(const uint8_t *p, size_t n)
{
    uint32_t s = 0;
    size_t i;

    for (i = 0; i + 1 < n; i += 2)
        s += (uint32_t)(p[i] << 8 | p[i + 1]);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

/* One spoofed fragment into p; returns its length. */
static size_t build(uint8_t *p, uint32_t src, uint32_t dst, int first,
                    uint32_t key)
{
    size_t len = first ? 20 + 8 + 32 : 20 + 8;
    uint16_t off = first ? 0 : (uint16_t)((64000 + (rnd() % 187) * 8) / 8);
    int mf = first || (rnd() & 1);

    memset(p, 0, len);
    p[0] = 0x45;
    put16(p + 2, (uint16_t)len);
    put16(p + 4, (uint16_t)(rnd() % 65535 + 1));
    put16(p + 6, (uint16_t)((mf ? 0x2000 : 0) | off));
    p[8] = 64;
    p[9] = 47;
    memcpy(p + 12, &src, 4);
    memcpy(p + 16, &dst, 4);
    put16(p + 10, csum(p, 20));
    if (first) {
        put16(p + 20, 0x2000);           /* GRE: K */
        put16(p + 22, 0x0800);
        p[24] = (uint8_t)(key >> 24);
        p[25] = (uint8_t)(key >> 16);
        p[26] = (uint8_t)(key >> 8);
        p[27] = (uint8_t)key;
    } else {
        memcpy(p + 20, "SPOOFED!", 8);
    }
    return len;
}

int main(int argc, char **argv)
{
    static uint8_t pkt[BATCH][PKT_MAX];
    struct mmsghdr msg[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in to;
    struct timespec tick;
    uint32_t src, dst, key;
    uint64_t sent = 0, failed = 0, due;
    double rate, secs, t0, t;
    int fd, one = 1, first, n, k, rc;

    if (argc != 7) {
        fprintf(stderr, "usage: fragflood SRC DST RATE SECONDS tail|first KEY\n");
        return 2;
    }
    if (inet_pton(AF_INET, argv[1], &src) != 1 || inet_pton(AF_INET, argv[2], &dst) != 1) {
        fprintf(stderr, "fragflood: bad address\n");
        return 2;
    }
    rate = atof(argv[3]);
    secs = atof(argv[4]);
    first = strcmp(argv[5], "first") == 0;
    key = (uint32_t)strtoul(argv[6], NULL, 0);
    rng ^= (uint64_t)now() * 1000003u;
    fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (fd < 0 || setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof(one))) {
        perror("fragflood: raw socket");
        return 1;
    }
    memset(&to, 0, sizeof(to));
    to.sin_family = AF_INET;
    to.sin_addr.s_addr = dst;
    memset(msg, 0, sizeof(msg));
    for (k = 0; k < BATCH; k++) {
        iov[k].iov_base = pkt[k];
        msg[k].msg_hdr.msg_iov = &iov[k];
        msg[k].msg_hdr.msg_iovlen = 1;
        msg[k].msg_hdr.msg_name = &to;
        msg[k].msg_hdr.msg_namelen = sizeof(to);
    }
    t0 = now();
    clock_gettime(CLOCK_MONOTONIC, &tick);
    while ((t = now() - t0) < secs) {
        due = (uint64_t)(rate * t);
        while (sent + failed < due) {
            n = (int)(due - sent - failed < BATCH ? due - sent - failed : BATCH);
            for (k = 0; k < n; k++)
                iov[k].iov_len = build(pkt[k], src, dst, first, key);
            rc = sendmmsg(fd, msg, (unsigned)n, 0);
            if (rc > 0) {
                sent += (uint64_t)rc;
            } else if (errno != EINTR) {
                failed++;                /* ENOBUFS and the like: one lost */
            }
        }
        tick.tv_nsec += 1000000;
        if (tick.tv_nsec >= 1000000000) {
            tick.tv_nsec -= 1000000000;
            tick.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &tick, NULL);
    }
    printf("sent %llu failed %llu in %.3f s\n", (unsigned long long)sent,
           (unsigned long long)failed, now() - t0);
    return 0;
}
