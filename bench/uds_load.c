/*
 * uds_load: a small HTTP/1.1 load generator for Unix sockets (and loopback TCP).
 *
 * wrk has no Unix-socket support, and a Python client cannot saturate a fast server on two
 * cores, so the benchmark builds this with the system compiler. One thread, epoll, N
 * connections; each sends one GET, waits for the whole response (Content-Length framing),
 * then sends the next: keep-alive, no pipelining (like wrk). Latency is measured per request
 * from the write to the last byte of the response, at 1 us resolution up to 1 s.
 *
 *   uds_load (-u PATH | -t HOST:PORT) [-c CONNS] (-d SECONDS | -n REQUESTS) [-w WARMUP]
 *            [-p URL_PATH] [-H 'Name: value']... [-k 0]
 *
 * -k 0: one request per connection ("Connection: close"; the client closes after reading the
 * response and opens a new connection), for the descriptor test. The result is one JSON line
 * on stdout, including this process's own CPU use over the measured window (to show the
 * generator is not the bottleneck).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#define MAX_CONNS 4096
#define BUF_SIZE 16384
#define HIST_US 1000000 /* 1 s at 1 us resolution; slower answers land in the last bucket */

typedef struct {
    int fd;
    size_t got;      /* bytes of the current response read so far */
    uint64_t sent;   /* ns timestamp of the request's write */
    char buf[BUF_SIZE];
} conn_t;

static struct sockaddr_storage addr;
static socklen_t addr_len;
static int addr_family;
static char request[8192];
static size_t request_len;
static uint32_t *hist;
static uint64_t completed, errors, non2xx, connects;
static int counting;
static int keep_alive = 1;
static int epfd;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int open_conn(void) {
    int fd = socket(addr_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    /* Blocking connect: with a full backlog it waits for the server instead of failing. */
    while (connect(fd, (struct sockaddr *)&addr, addr_len) < 0) {
        if (errno != EINTR && errno != EAGAIN) die("connect");
    }
    if (addr_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    connects++;
    return fd;
}

static void send_request(conn_t *c) {
    c->got = 0;
    c->sent = now_ns();
    ssize_t n = write(c->fd, request, request_len);
    if (n != (ssize_t)request_len) die("write"); /* a few hundred bytes into an empty buffer */
}

static void attach(conn_t *c, int fd) {
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

static void reopen(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    attach(c, open_conn());
}

/* Total response length once the head is complete; 0 while incomplete; -1 if unframed. */
static long response_length(conn_t *c, int *status) {
    char *end = memmem(c->buf, c->got, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    long head = end - c->buf + 4;
    *status = (c->got > 12) ? atoi(c->buf + 9) : 0;
    for (char *line = memchr(c->buf, '\n', head); line && line < end; line = memchr(line + 1, '\n', end - line)) {
        if (strncasecmp(line + 1, "content-length:", 15) == 0) return head + atol(line + 16);
    }
    return -1;
}

static void record(uint64_t sent) {
    if (!counting) return;
    uint64_t us = (now_ns() - sent) / 1000;
    hist[us < HIST_US ? us : HIST_US - 1]++;
    completed++;
}

static void on_readable(conn_t *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->got, BUF_SIZE - c->got);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) { /* closed or reset under us */
            if (counting) errors++;
            reopen(c);
            send_request(c);
            return;
        }
        c->got += (size_t)n;
        int status = 0;
        long total = response_length(c, &status);
        if (total < 0 || c->got >= BUF_SIZE) {
            if (counting) errors++;
            reopen(c);
            send_request(c);
            return;
        }
        if (total == 0 || c->got < (size_t)total) continue;
        if (c->got > (size_t)total) die("pipelined bytes: the server answered twice");
        record(c->sent);
        if (counting && (status < 200 || status > 299)) non2xx++;
        if (!keep_alive) reopen(c);
        send_request(c);
        return;
    }
}

static uint64_t max_latency(void) {
    for (uint64_t us = HIST_US; us-- > 0;)
        if (hist[us]) return us;
    return 0;
}

static uint64_t percentile(double p) {
    uint64_t want = (uint64_t)(p * (double)completed), seen = 0;
    if (want >= completed && completed) want = completed - 1;
    for (uint64_t us = 0; us < HIST_US; us++) {
        seen += hist[us];
        if (seen > want) return us;
    }
    return HIST_US;
}

static void parse_target(const char *unix_path, const char *tcp) {
    memset(&addr, 0, sizeof addr);
    if (unix_path) {
        struct sockaddr_un *un = (struct sockaddr_un *)&addr;
        un->sun_family = AF_UNIX;
        if (strlen(unix_path) >= sizeof un->sun_path) die("socket path too long");
        strcpy(un->sun_path, unix_path);
        addr_len = sizeof *un;
        addr_family = AF_UNIX;
        return;
    }
    char host[256];
    const char *colon = strrchr(tcp, ':');
    if (!colon || (size_t)(colon - tcp) >= sizeof host) die("-t HOST:PORT");
    memcpy(host, tcp, colon - tcp);
    host[colon - tcp] = 0;
    struct sockaddr_in *in = (struct sockaddr_in *)&addr;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &in->sin_addr) != 1) die("-t needs an IPv4 address");
    addr_len = sizeof *in;
    addr_family = AF_INET;
}

int main(int argc, char **argv) {
    const char *unix_path = NULL, *tcp = NULL, *path = "/v1/token";
    char headers[4096] = "";
    int conns = 16, opt;
    double seconds = 0, warmup = 0;
    uint64_t limit = 0;
    while ((opt = getopt(argc, argv, "u:t:c:d:n:w:p:H:k:")) != -1) {
        switch (opt) {
        case 'u': unix_path = optarg; break;
        case 't': tcp = optarg; break;
        case 'c': conns = atoi(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'n': limit = strtoull(optarg, NULL, 10); break;
        case 'w': warmup = atof(optarg); break;
        case 'p': path = optarg; break;
        case 'H':
            if (strlen(headers) + strlen(optarg) + 3 >= sizeof headers) die("too many headers");
            strcat(headers, optarg);
            strcat(headers, "\r\n");
            break;
        case 'k': keep_alive = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: %s (-u PATH|-t HOST:PORT) [-c N] (-d S|-n REQ) [-w S] "
                            "[-p PATH] [-H HDR]... [-k 0|1]\n", argv[0]);
            return 2;
        }
    }
    if ((!unix_path == !tcp) || conns < 1 || conns > MAX_CONNS || (seconds <= 0 && !limit)) {
        fprintf(stderr, "need one of -u/-t, 1 <= -c <= %d, and -d or -n\n", MAX_CONNS);
        return 2;
    }
    parse_target(unix_path, tcp);
    request_len = (size_t)snprintf(request, sizeof request,
                                   "GET %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n", path,
                                   tcp ? tcp : "localhost", headers,
                                   keep_alive ? "" : "Connection: close\r\n");
    hist = calloc(HIST_US, sizeof *hist);
    conn_t *pool = calloc((size_t)conns, sizeof *pool);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!hist || !pool || epfd < 0) die("setup");
    for (int i = 0; i < conns; i++) attach(&pool[i], open_conn());

    uint64_t start = now_ns(), measure_from = start + (uint64_t)(warmup * 1e9), until = 0;
    counting = warmup <= 0;
    double cpu0 = counting ? cpu_seconds() : 0;
    uint64_t t0 = start;
    if (counting) until = seconds > 0 ? t0 + (uint64_t)(seconds * 1e9) : UINT64_MAX;
    for (int i = 0; i < conns; i++) send_request(&pool[i]);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) on_readable(events[i].data.ptr);
        uint64_t t = now_ns();
        if (!counting && t >= measure_from) {
            counting = 1;
            t0 = t;
            cpu0 = cpu_seconds();
            until = seconds > 0 ? t0 + (uint64_t)(seconds * 1e9) : UINT64_MAX;
        }
        if (counting && (t >= until || (limit && completed >= limit))) break;
    }
    double elapsed = (now_ns() - t0) / 1e9, cpu = cpu_seconds() - cpu0;
    printf("{\"requests\": %llu, \"errors\": %llu, \"non2xx\": %llu, \"connects\": %llu, "
           "\"seconds\": %.4f, \"rps\": %.1f, \"p50_us\": %llu, \"p99_us\": %llu, "
           "\"max_us\": %llu, \"cpu_seconds\": %.4f, \"cpu_pct\": %.1f}\n",
           (unsigned long long)completed, (unsigned long long)errors,
           (unsigned long long)non2xx, (unsigned long long)connects, elapsed,
           completed / elapsed, (unsigned long long)percentile(0.50),
           (unsigned long long)percentile(0.99), (unsigned long long)max_latency(),
           cpu, 100.0 * cpu / elapsed);
    return 0;
}
