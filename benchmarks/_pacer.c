/*
 * The background load of benchmarks/latency.py: one frame sent on an interface at a steady
 * rate, every 1/RATE seconds, for SECONDS (0: until SIGTERM/SIGINT).
 *
 *     _pacer IFNAME RATE_PPS SECONDS HEXFRAME
 *
 * Why not trafgen --rate: trafgen paces by sending at full speed and then sleeping until the
 * average is right, so "240 kpps" arrives as ~400 ms bursts at the generator's full speed
 * with ~400 ms of silence between them (measured: 0 or 500-690 kpps per 10 ms).  A bridge
 * measured "under half its maximum load" would then be measured saturated half the time.
 *
 * Here a frame is due every 1/RATE s on CLOCK_MONOTONIC; the pacer busy-waits for the next
 * due time (a sleep would wake tens of microseconds late and come back in bursts) and sends
 * what is due, at most BATCH frames per call when it has fallen behind.  At the end it prints
 * one line: frames sent, seconds, the achieved rate, and how often (in 1 ms windows) the
 * rate strayed more than 10 % from RATE, so a run can show that its load was steady.
 * PACKET_QDISC_BYPASS as trafgen does.  Needs CAP_NET_RAW.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define MAX_FRAME 1514

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int parse_hex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = strlen(s);
    if (n % 2 || n / 2 > cap || n < 28)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    return (int)(n / 2);
}

int main(int argc, char **argv)
{
    static uint8_t frame[MAX_FRAME];
    if (argc != 5) {
        fprintf(stderr, "usage: %s IFNAME RATE_PPS SECONDS HEXFRAME\n", argv[0]);
        return 2;
    }
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    int len = parse_hex(argv[4], frame, sizeof(frame));
    unsigned ifindex = if_nametoindex(argv[1]);
    if (rate <= 0 || seconds < 0 || len < 0 || !ifindex) {
        fprintf(stderr, "pacer: bad arguments (interface %s, rate %s, frame of %zu hex digits)\n", argv[1],
                argv[2], strlen(argv[4]));
        return 2;
    }
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    int one = 1;
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_ifindex = (int)ifindex};
    if (fd < 0 || bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        perror("pacer: socket");
        return 1;
    }
    setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    struct mmsghdr msgs[BATCH];
    struct iovec iov = {.iov_base = frame, .iov_len = (size_t)len};
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    const double gap = 1e9 / rate;
    const uint64_t t0 = now_ns(), end = seconds > 0 ? t0 + (uint64_t)(seconds * 1e9) : UINT64_MAX;
    uint64_t slot = 0, sent = 0, errors = 0, windows = 0, off_windows = 0, win_start = t0, win_sent = 0;
    const double per_window = rate / 1000.0;
    while (!stop) {
        uint64_t t = now_ns();
        if (t >= end)
            break;
        uint64_t due = (uint64_t)((double)(t - t0) / gap) + 1; /* frames due by now */
        if (t - win_start >= 1000000u) {
            windows++;
            if ((double)win_sent < 0.9 * per_window || (double)win_sent > 1.1 * per_window)
                off_windows++;
            win_start = t;
            win_sent = 0;
        }
        if (due <= slot)
            continue; /* busy-wait: the next frame is not due yet */
        uint64_t n = due - slot;
        int k = sendmmsg(fd, msgs, n < BATCH ? (unsigned)n : BATCH, 0);
        if (k < 0) {
            if (errno != EINTR && errno != ENOBUFS && errno != EAGAIN) {
                perror("pacer: sendmmsg");
                return 1;
            }
            errors++;
            slot++; /* a frame the kernel refused is not retried: the schedule goes on */
            continue;
        }
        slot += (uint64_t)k;
        sent += (uint64_t)k;
        win_sent += (uint64_t)k;
    }
    double secs = (double)(now_ns() - t0) / 1e9;
    printf("sent %llu seconds %.3f rate %.0f errors %llu windows %llu off_windows %llu\n",
           (unsigned long long)sent, secs, secs > 0 ? (double)sent / secs : 0.0, (unsigned long long)errors,
           (unsigned long long)windows, (unsigned long long)off_windows);
    return 0;
}
