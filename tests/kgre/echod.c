/*
 * tpb-echod: the small servers of the kernel GRE peer VM.
 *
 *   TCP port ECHO  (default 7): echoes every byte back (one forked child per
 *                              connection, so a slow client blocks only itself).
 *   UDP port ECHO  (default 7): sends every datagram back to its sender.
 *   TCP port SINK  (default 9): reads until the client shuts down its sending
 *                              side, then answers "<bytes received>\n" and
 *                              closes: a byte count the test checks from its
 *                              side of the wire.
 *   UDP port SINK  (default 9): counts datagrams and bytes; the totals are kept
 *                              in /tmp/udp-sink ("<datagrams> <bytes>\n").
 *
 * Every TCP connection is logged as a line in /tmp/tcp.log.
 * Usage: tpb-echod [ECHO_PORT [SINK_PORT]]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static char buf[65536];

static int listener(int type, int port)
{
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    int fd = socket(AF_INET6, type, 0), one = 1, zero = 0;
    if (fd < 0) {
        perror("socket");
        exit(1);
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("bind");
        exit(1);
    }
    if (type == SOCK_STREAM && listen(fd, 64) < 0) {
        perror("listen");
        exit(1);
    }
    return fd;
}

static void peer_name(const struct sockaddr_in6 *a, char *out, size_t n)
{
    char ip[INET6_ADDRSTRLEN];
    inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
    const char *p = strncmp(ip, "::ffff:", 7) == 0 ? ip + 7 : ip;
    snprintf(out, n, "%s:%u", p, ntohs(a->sin6_port));
}

static void tcp_log(const char *what, const char *peer, unsigned long long bytes)
{
    char line[256];
    int fd = open("/tmp/tcp.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0)
        return;
    int n = snprintf(line, sizeof line, "%s %s %llu\n", what, peer, bytes);
    if (write(fd, line, n) < 0) {
    }
    close(fd);
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

static void serve_tcp(int c, int echo, const char *peer)
{
    unsigned long long total = 0;
    for (;;) {
        ssize_t r = read(c, buf, sizeof buf);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        total += r;
        if (echo && write_all(c, buf, r) < 0)
            break;
    }
    if (!echo) {
        char line[32];
        int n = snprintf(line, sizeof line, "%llu\n", total);
        write_all(c, line, n);
    }
    tcp_log(echo ? "echo" : "sink", peer, total);
    close(c);
    _exit(0);
}

int main(int argc, char **argv)
{
    int echo_port = argc > 1 ? atoi(argv[1]) : 7;
    int sink_port = argc > 2 ? atoi(argv[2]) : 9;
    unsigned long long udp_pkts = 0, udp_bytes = 0;
    int udp_dirty = 0;
    struct pollfd p[4] = {
        {.fd = listener(SOCK_STREAM, echo_port), .events = POLLIN},
        {.fd = listener(SOCK_STREAM, sink_port), .events = POLLIN},
        {.fd = listener(SOCK_DGRAM, echo_port), .events = POLLIN},
        {.fd = listener(SOCK_DGRAM, sink_port), .events = POLLIN},
    };
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    signal(SIGPIPE, SIG_IGN);
    printf("tpb-echod: tcp+udp echo on %d, tcp+udp sink on %d\n", echo_port, sink_port);
    fflush(stdout);
    for (;;) {
        if (poll(p, 4, udp_dirty ? 100 : -1) == 0 && udp_dirty) {
            FILE *f = fopen("/tmp/udp-sink.tmp", "w");
            if (f) {
                fprintf(f, "%llu %llu\n", udp_pkts, udp_bytes);
                fclose(f);
                rename("/tmp/udp-sink.tmp", "/tmp/udp-sink");
            }
            udp_dirty = 0;
        }
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & POLLIN))
                continue;
            struct sockaddr_in6 a;
            socklen_t al = sizeof a;
            int c = accept(p[i].fd, (struct sockaddr *)&a, &al);
            if (c < 0)
                continue;
            char peer[80];
            peer_name(&a, peer, sizeof peer);
            pid_t pid = fork();
            if (pid == 0) {
                for (int j = 0; j < 4; j++)
                    close(p[j].fd);
                serve_tcp(c, i == 0, peer);
            }
            close(c);
        }
        if (p[2].revents & POLLIN) {
            struct sockaddr_in6 a;
            socklen_t al = sizeof a;
            ssize_t r = recvfrom(p[2].fd, buf, sizeof buf, 0, (struct sockaddr *)&a, &al);
            if (r >= 0)
                sendto(p[2].fd, buf, r, 0, (struct sockaddr *)&a, al);
        }
        if (p[3].revents & POLLIN) {
            ssize_t r = recv(p[3].fd, buf, sizeof buf, 0);
            if (r >= 0) {
                udp_pkts++;
                udp_bytes += r;
                udp_dirty = 1;
            }
        }
    }
}
