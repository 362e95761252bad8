/*
 * tls_sink - a fast single-threaded epoll SMTP sink with STARTTLS, for benchmarks.
 *
 *   tls_sink [-c cert.pem [-k key.pem]] [-n] [-m N] HOST:PORT
 *
 *   -c FILE  certificate chain (PEM); enables STARTTLS
 *   -k FILE  private key (PEM); defaults to the -c file
 *   -n       do not offer STARTTLS (even with -c)
 *   -m N     exit after N accepted messages
 *
 * HOST:PORT may be "127.0.0.1:2525", "[::1]:0", "localhost:0".  Port 0 picks a free port.
 * Once listening it prints "READY <port>" on stdout.  At SIGTERM/SIGINT (or after -m N messages)
 * it prints
 *   messages=N connections=M tls_connections=K cpu_user=S cpu_sys=S cpu_us_per_msg=U
 * on stdout and exits 0.
 *
 * SMTP: 220 greeting; EHLO (PIPELINING 8BITMIME ENHANCEDSTATUSCODES SIZE STARTTLS AUTH), HELO,
 * STARTTLS (RFC 3207: pipelined plaintext after it is discarded, state reset after the handshake),
 * AUTH PLAIN (with or without initial response) and AUTH LOGIN accept any credentials, MAIL, RCPT,
 * DATA (up to CRLF.CRLF, split across reads), RSET, NOOP, QUIT; anything else gets 502.
 * Every complete command line in the input is answered, and the replies go out in one write.
 * Checks a real server makes are kept, so client bugs show: RCPT/DATA before MAIL, nested MAIL,
 * DATA without RCPT (503/554), SIZE= or a message over 52428800 bytes (552), over-long line (500).
 *
 * Build:
 *   gcc -O2 -std=c11 -Wall -Wextra -D_GNU_SOURCE -o build/tls_sink tests/servers/tls_sink.c \
 *       $(pkg-config --cflags --libs openssl)
 */
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define INBUF_SIZE   (128 * 1024)
#define OUTBUF_SIZE  (16 * 1024)
#define OUT_RESERVE  1024           /* process input only while this much output space is free */
#define MAX_SIZE     52428800UL
#define HOSTNAME     "tls-sink.test"

enum cstate { ST_CMD, ST_DATA, ST_AUTH_PLAIN, ST_AUTH_LOGIN_USER, ST_AUTH_LOGIN_PASS };

struct conn {
    struct conn *prev, *next;
    int fd;
    SSL *ssl;
    unsigned events;        /* registered epoll events */
    unsigned io_want;       /* events wanted by the last blocked I/O */
    enum cstate state;
    int dst;                /* DATA terminator scanner state */
    unsigned char handshaking, start_tls, want_close, skip_line, in_mail, authed, more_input;
    unsigned char pending;  /* complete lines left unprocessed (output space ran low) */
    unsigned rcpts;
    unsigned long dsize;
    size_t inlen, inpos;    /* unprocessed input is inbuf[inpos, inlen) */
    size_t outlen, outoff;  /* pending output is outbuf[outoff, outlen) */
    char outbuf[OUTBUF_SIZE];
    char inbuf[INBUF_SIZE];
};

static int epfd = -1;
static SSL_CTX *ssl_ctx;
static int offer_tls;
static unsigned long max_messages;
static unsigned long n_messages, n_connections, n_tls_connections;
static int stop;
static volatile sig_atomic_t got_signal;
static struct conn *conns;
static struct conn *free_conns;   /* a few freed connections kept for reuse: no malloc churn */
static unsigned n_free_conns;
#define MAX_FREE_CONNS 64

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("tls_sink: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

/* ---------------------------------------------------------------- output */

static void out_add(struct conn *c, const char *s, size_t n)
{
    if (c->outlen + n > OUTBUF_SIZE) {   /* cannot happen with OUT_RESERVE; be safe anyway */
        if (c->outoff) {
            memmove(c->outbuf, c->outbuf + c->outoff, c->outlen - c->outoff);
            c->outlen -= c->outoff;
            c->outoff = 0;
        }
        if (c->outlen + n > OUTBUF_SIZE)
            n = OUTBUF_SIZE - c->outlen;
    }
    memcpy(c->outbuf + c->outlen, s, n);
    c->outlen += n;
}
#define REPLY(c, lit) out_add((c), lit "\r\n", sizeof(lit "\r\n") - 1)

enum { IO_OK, IO_BLOCKED, IO_ERR };

static int want_from_ssl(struct conn *c, int ret)
{
    switch (SSL_get_error(c->ssl, ret)) {
    case SSL_ERROR_WANT_READ:  c->io_want = EPOLLIN;  return IO_BLOCKED;
    case SSL_ERROR_WANT_WRITE: c->io_want = EPOLLOUT; return IO_BLOCKED;
    default:                   ERR_clear_error();     return IO_ERR;
    }
}

/* Write out the pending output.  IO_OK means everything went. */
static int flush_out(struct conn *c)
{
    while (c->outoff < c->outlen) {
        size_t n = c->outlen - c->outoff;
        if (c->ssl) {
            ERR_clear_error();
            int r = SSL_write(c->ssl, c->outbuf + c->outoff, (int)n);
            if (r <= 0)
                return want_from_ssl(c, r);
            c->outoff += (size_t)r;
        } else {
            ssize_t r = send(c->fd, c->outbuf + c->outoff, n, MSG_NOSIGNAL);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    c->io_want = EPOLLOUT;
                    return IO_BLOCKED;
                }
                return IO_ERR;
            }
            c->outoff += (size_t)r;
        }
    }
    c->outlen = c->outoff = 0;
    return IO_OK;
}

/* ---------------------------------------------------------------- SMTP */

static void reset_txn(struct conn *c)
{
    c->in_mail = 0;
    c->rcpts = 0;
    c->dsize = 0;
}

/* Does line (length n) start with the keyword kw (upper case), followed by end of line or ' '? */
static int verb_is(const char *line, size_t n, const char *kw, size_t kwlen)
{
    return n >= kwlen && strncasecmp(line, kw, kwlen) == 0 && (n == kwlen || line[kwlen] == ' ');
}
#define VERB(lit) verb_is(line, n, lit, sizeof(lit) - 1)

static int prefix_is(const char *line, size_t n, const char *p, size_t plen)
{
    return n >= plen && strncasecmp(line, p, plen) == 0;
}

/* Value of the SIZE= parameter of a MAIL command, 0 when absent. */
static unsigned long mail_size_param(const char *line, size_t n)
{
    for (size_t i = 0; i + 6 <= n; i++) {
        if (line[i] == ' ' && strncasecmp(line + i + 1, "SIZE=", 5) == 0) {
            unsigned long v = 0;
            for (size_t j = i + 6; j < n && line[j] >= '0' && line[j] <= '9'; j++) {
                v = v * 10 + (unsigned long)(line[j] - '0');
                if (v > MAX_SIZE)
                    return MAX_SIZE + 1;
            }
            return v;
        }
    }
    return 0;
}

static void send_ehlo(struct conn *c)
{
    REPLY(c, "250-" HOSTNAME);
    REPLY(c, "250-PIPELINING");
    REPLY(c, "250-8BITMIME");
    REPLY(c, "250-ENHANCEDSTATUSCODES");
    REPLY(c, "250-SIZE 52428800");
    if (offer_tls && !c->ssl)
        REPLY(c, "250-STARTTLS");
    REPLY(c, "250 AUTH PLAIN LOGIN");
}

static void message_done(struct conn *c)
{
    if (c->dsize > MAX_SIZE) {
        REPLY(c, "552 5.3.4 Error: message too big");
    } else {
        REPLY(c, "250 2.0.0 Ok: queued");
        n_messages++;
        if (max_messages && n_messages >= max_messages)
            stop = 1;
    }
    reset_txn(c);
    c->state = ST_CMD;
}

/* One command line without its CRLF. */
static void command(struct conn *c, const char *line, size_t n)
{
    switch (c->state) {
    case ST_AUTH_PLAIN:
    case ST_AUTH_LOGIN_PASS:
        c->state = ST_CMD;
        if (n == 1 && line[0] == '*') {
            REPLY(c, "501 5.7.0 Authentication aborted");
        } else {
            c->authed = 1;
            REPLY(c, "235 2.7.0 Authentication successful");
        }
        return;
    case ST_AUTH_LOGIN_USER:
        if (n == 1 && line[0] == '*') {
            c->state = ST_CMD;
            REPLY(c, "501 5.7.0 Authentication aborted");
        } else {
            c->state = ST_AUTH_LOGIN_PASS;
            REPLY(c, "334 UGFzc3dvcmQ6");
        }
        return;
    default:
        break;
    }

    if (prefix_is(line, n, "MAIL FROM:", 10)) {
        if (c->in_mail) {
            REPLY(c, "503 5.5.1 Error: nested MAIL command");
        } else if (mail_size_param(line, n) > MAX_SIZE) {
            REPLY(c, "552 5.3.4 Message size exceeds fixed limit");
        } else {
            c->in_mail = 1;
            REPLY(c, "250 2.1.0 Ok");
        }
    } else if (prefix_is(line, n, "RCPT TO:", 8)) {
        if (!c->in_mail) {
            REPLY(c, "503 5.5.1 Error: need MAIL command");
        } else {
            c->rcpts++;
            REPLY(c, "250 2.1.5 Ok");
        }
    } else if (VERB("DATA")) {
        if (n != 4) {
            REPLY(c, "501 5.5.4 Syntax: DATA");
        } else if (!c->in_mail) {
            REPLY(c, "503 5.5.1 Error: need MAIL command");
        } else if (!c->rcpts) {
            REPLY(c, "554 5.5.1 Error: no valid recipients");
        } else {
            c->state = ST_DATA;
            c->dst = 1;   /* at the beginning of a line */
            c->dsize = 0;
            REPLY(c, "354 End data with <CR><LF>.<CR><LF>");
        }
    } else if (VERB("EHLO")) {
        reset_txn(c);
        send_ehlo(c);
    } else if (VERB("HELO")) {
        reset_txn(c);
        REPLY(c, "250 " HOSTNAME);
    } else if (VERB("RSET")) {
        reset_txn(c);
        REPLY(c, "250 2.0.0 Ok");
    } else if (VERB("NOOP")) {
        REPLY(c, "250 2.0.0 Ok");
    } else if (VERB("QUIT")) {
        REPLY(c, "221 2.0.0 Bye");
        c->want_close = 1;
    } else if (VERB("AUTH")) {
        const char *mech = line + 4;
        size_t m = n - 4;
        while (m && *mech == ' ')
            mech++, m--;
        const char *arg = memchr(mech, ' ', m);
        size_t mlen = arg ? (size_t)(arg - mech) : m;
        while (arg && arg < line + n && *arg == ' ')
            arg++;
        int has_arg = arg && arg < line + n;
        if (c->authed) {
            REPLY(c, "503 5.5.1 Error: already authenticated");
        } else if (c->in_mail) {
            REPLY(c, "503 5.5.1 Error: MAIL transaction in progress");
        } else if (mlen == 5 && strncasecmp(mech, "PLAIN", 5) == 0) {
            if (has_arg && !(line + n - arg == 1 && *arg == '*')) {
                c->authed = 1;
                REPLY(c, "235 2.7.0 Authentication successful");
            } else if (has_arg) {
                REPLY(c, "501 5.7.0 Authentication aborted");
            } else {
                c->state = ST_AUTH_PLAIN;
                REPLY(c, "334 ");
            }
        } else if (mlen == 5 && strncasecmp(mech, "LOGIN", 5) == 0) {
            if (has_arg) {
                c->state = ST_AUTH_LOGIN_PASS;
                REPLY(c, "334 UGFzc3dvcmQ6");
            } else {
                c->state = ST_AUTH_LOGIN_USER;
                REPLY(c, "334 VXNlcm5hbWU6");
            }
        } else if (mlen == 0) {
            REPLY(c, "501 5.5.4 Syntax: AUTH mechanism");
        } else {
            REPLY(c, "504 5.5.4 Unrecognized authentication type");
        }
    } else if (VERB("STARTTLS")) {
        if (!offer_tls) {
            REPLY(c, "502 5.5.1 Error: command not implemented");
        } else if (c->ssl) {
            REPLY(c, "503 5.5.1 Error: TLS already active");
        } else if (n != 8) {
            REPLY(c, "501 5.5.4 Syntax: STARTTLS");
        } else {
            REPLY(c, "220 2.0.0 Ready to start TLS");
            c->start_tls = 1;
        }
    } else {
        REPLY(c, "502 5.5.2 Error: command not recognized");
    }
}

/*
 * Scan message data for the end-of-data line.  States: 0 inside a line, 1 at the start of a
 * line, 2 after "." at the start of a line, 3 after ".\r".  Returns the bytes consumed;
 * sets *done when the terminating ".\r\n" was consumed.
 */
static size_t data_scan(struct conn *c, const char *p, size_t n, int *done)
{
    size_t i = 0;
    int st = c->dst;
    while (i < n) {
        if (st == 0) {
            const char *nl = memchr(p + i, '\n', n - i);
            if (!nl) {
                i = n;
                break;
            }
            i = (size_t)(nl - p) + 1;
            st = 1;
            continue;
        }
        char ch = p[i++];
        if (st == 1)
            st = ch == '.' ? 2 : ch == '\n' ? 1 : 0;
        else if (st == 2)
            st = ch == '\r' ? 3 : ch == '\n' ? 1 : 0;
        else if (ch == '\n') {
            *done = 1;
            c->dst = 0;
            return i;
        } else
            st = 0;
    }
    c->dst = st;
    return i;
}

/*
 * Answer every complete command line in the input (and consume message data).  Stops early when
 * output space runs low (returns 1: the caller flushes, then calls again), and at STARTTLS and QUIT
 * (discarding the rest of the input).
 */
static int process(struct conn *c)
{
    while (c->inpos < c->inlen && !c->start_tls && !c->want_close) {
        char *p = c->inbuf + c->inpos;
        size_t avail = c->inlen - c->inpos;
        if (c->state == ST_DATA) {
            int done = 0;
            size_t used = data_scan(c, p, avail, &done);
            c->inpos += used;
            c->dsize += used;
            if (done)
                message_done(c);
            continue;
        }
        if (OUTBUF_SIZE - c->outlen < OUT_RESERVE)
            return 1;
        char *nl = memchr(p, '\n', avail);
        if (!nl)
            break;
        c->inpos += (size_t)(nl - p) + 1;
        if (c->skip_line) {          /* tail of an over-long line */
            c->skip_line = 0;
            continue;
        }
        size_t n = (size_t)(nl - p);
        if (n && p[n - 1] == '\r')
            n--;
        command(c, p, n);
    }
    if (c->start_tls || c->want_close) {
        /* RFC 3207 section 4.2: discard anything pipelined after STARTTLS. */
        c->inpos = c->inlen = 0;
        return 0;
    }
    /* Keep the partial line at the start of the buffer. */
    if (c->inpos == c->inlen) {
        c->inpos = c->inlen = 0;
    } else if (c->inpos) {
        memmove(c->inbuf, c->inbuf + c->inpos, c->inlen - c->inpos);
        c->inlen -= c->inpos;
        c->inpos = 0;
    }
    if (c->inlen == INBUF_SIZE && c->state != ST_DATA) {
        REPLY(c, "500 5.5.2 Error: line too long");
        c->inlen = 0;
        c->skip_line = 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- connections */

static void set_events(struct conn *c, unsigned ev)
{
    if (c->events == ev)
        return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e) == 0)
        c->events = ev;
}

static void conn_free(struct conn *c)
{
    if (c->ssl) {
        if (!c->handshaking) {
            ERR_clear_error();
            SSL_shutdown(c->ssl);   /* one non-blocking attempt at close_notify */
        }
        SSL_free(c->ssl);
        ERR_clear_error();
    }
    close(c->fd);   /* also removes it from the epoll set */
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (n_free_conns < MAX_FREE_CONNS && !stop) {
        c->next = free_conns;
        free_conns = c;
        n_free_conns++;
    } else {
        free(c);
    }
}

/* Read into the input buffer: >0 bytes, 0 blocked (io_want set), -1 EOF or error. */
static ssize_t conn_read(struct conn *c)
{
    char *p = c->inbuf + c->inlen;
    size_t space = INBUF_SIZE - c->inlen;
    if (!space)   /* cannot happen: process() always leaves room */
        return -1;
    if (c->ssl) {
        ERR_clear_error();
        int r = SSL_read(c->ssl, p, space > INT_MAX ? INT_MAX : (int)space);
        if (r <= 0)
            return want_from_ssl(c, r) == IO_BLOCKED ? 0 : -1;
        c->more_input = (size_t)r == space || SSL_has_pending(c->ssl);
        return r;
    }
    for (;;) {
        ssize_t r = recv(c->fd, p, space, 0);
        if (r > 0) {
            /* A short read means the socket is (most likely) drained: let epoll say otherwise. */
            c->more_input = (size_t)r == space;
            return r;
        }
        if (r == 0)
            return -1;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->io_want = EPOLLIN;
            return 0;
        }
        return -1;
    }
}

/* Write what is buffered.  1: all written; 0: the connection is gone, or waits for the socket with
 * its epoll interest set: the caller returns. */
static int flush_or_park(struct conn *c)
{
    if (!c->outlen)
        return 1;
    int r = flush_out(c);
    if (r == IO_ERR) {
        conn_free(c);
        return 0;
    }
    if (r == IO_BLOCKED) {
        set_events(c, c->io_want);
        return 0;
    }
    return 1;
}

/* Make all the progress possible on a connection; returns with the right epoll interest set. */
static void conn_drive(struct conn *c)
{
    for (;;) {
        if (!flush_or_park(c))
            return;
        if (c->want_close || stop) {
            if (c->want_close)
                conn_free(c);
            return;
        }
        if (c->start_tls) {
            c->start_tls = 0;
            c->ssl = SSL_new(ssl_ctx);
            if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) {
                conn_free(c);
                return;
            }
            c->handshaking = 1;
        }
        if (c->handshaking) {
            ERR_clear_error();
            int r = SSL_accept(c->ssl);
            if (r <= 0) {
                if (want_from_ssl(c, r) == IO_ERR) {
                    conn_free(c);
                    return;
                }
                set_events(c, c->io_want);
                return;
            }
            c->handshaking = 0;
            n_tls_connections++;
            /* RFC 3207 section 4.2: forget everything learned before TLS. */
            reset_txn(c);
            c->authed = 0;
            c->state = ST_CMD;
            c->skip_line = 0;
            c->more_input = 1;
        }
        if (c->pending) {
            c->pending = (unsigned char)process(c);
            continue;
        }
        ssize_t n = conn_read(c);
        if (n < 0) {
            conn_free(c);
            return;
        }
        if (n == 0) {
            set_events(c, c->io_want);
            return;
        }
        c->inlen += (size_t)n;
        c->pending = (unsigned char)process(c);
        if (!c->pending && !c->more_input && !c->start_tls && !c->want_close && !stop) {
            if (!flush_or_park(c))
                return;
            set_events(c, EPOLLIN);
            return;
        }
    }
}

/* Linux copies TCP_NODELAY from the listening socket to accepted ones: checked at the first accept. */
static int nodelay_inherited = -1;

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                perror("tls_sink: accept");
            return;
        }
        struct conn *c = free_conns;
        if (c) {
            free_conns = c->next;
            n_free_conns--;
        } else if (!(c = malloc(sizeof *c))) {
            close(fd);
            continue;
        }
        memset(c, 0, offsetof(struct conn, outbuf));
        c->fd = fd;
        c->state = ST_CMD;
        c->events = EPOLLIN;
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
            close(fd);
            free(c);
            continue;
        }
        if (nodelay_inherited < 0) {
            int v = 0;
            socklen_t vl = sizeof v;
            nodelay_inherited = getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, &vl) == 0 && v;
        }
        if (!nodelay_inherited) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        c->next = conns;
        if (conns)
            conns->prev = c;
        conns = c;
        n_connections++;
        REPLY(c, "220 " HOSTNAME " ESMTP tls_sink");
        if (flush_out(c) == IO_ERR)
            conn_free(c);
        else if (c->outlen)
            set_events(c, c->io_want);
    }
}

/* ---------------------------------------------------------------- setup */

static int listen_on(const char *spec)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    if (!colon || (size_t)(colon - spec) >= sizeof host)
        die("bad address %s (want HOST:PORT)", spec);
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (!colon[1] || *end || port < 0 || port > 65535)
        die("bad port in %s", spec);
    size_t hl = (size_t)(colon - spec);
    memcpy(host, spec, hl);
    host[hl] = 0;
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV}, *res;
    int err = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res);
    if (err)
        die("%s: %s", spec, gai_strerror(err));
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0)
        die("bind %s: %s", spec, strerror(errno));
    freeaddrinfo(res);
    if (listen(fd, 4096) < 0)
        die("listen: %s", strerror(errno));
    return fd;
}

static int bound_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0)
        die("getsockname: %s", strerror(errno));
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static SSL_CTX *make_ctx(const char *cert, const char *key)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx)
        die("SSL_CTX_new failed");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(ctx, 1);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        ERR_print_errors_fp(stderr);
        die("cannot load certificate %s", cert);
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_print_errors_fp(stderr);
        die("cannot load private key %s", key);
    }
    return ctx;
}

static void on_signal(int sig)
{
    (void)sig;
    got_signal = 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: tls_sink [-c cert.pem [-k key.pem]] [-n] [-m N] HOST:PORT\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *cert = NULL, *key = NULL;
    int no_tls = 0, opt;
    while ((opt = getopt(argc, argv, "c:k:nm:h")) != -1) {
        switch (opt) {
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'n': no_tls = 1; break;
        case 'm': {
            char *end;
            max_messages = strtoul(optarg, &end, 10);
            if (*end || !*optarg)
                usage();
            break;
        }
        default: usage();
        }
    }
    if (optind != argc - 1 || (key && !cert))
        usage();
    if (cert) {
        ssl_ctx = make_ctx(cert, key ? key : cert);
        offer_tls = !no_tls;
    }

    /* SIGTERM/SIGINT stay blocked except inside epoll_pwait(), which they interrupt. */
    sigset_t sigs, waitmask;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    if (sigprocmask(SIG_BLOCK, &sigs, &waitmask) < 0)
        die("sigprocmask: %s", strerror(errno));
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct rlimit rl;   /* as many connections as allowed */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    int lfd = listen_on(argv[optind]);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1: %s", strerror(errno));
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = &lfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &e) < 0)
        die("epoll_ctl: %s", strerror(errno));

    printf("READY %d\n", bound_port(lfd));
    fflush(stdout);

    struct epoll_event evs[256];
    while (!stop && !got_signal) {
        int n = epoll_pwait(epfd, evs, 256, -1, &waitmask);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n && !stop; i++) {
            void *ptr = evs[i].data.ptr;
            if (ptr == &lfd)
                accept_all(lfd);
            else
                conn_drive(ptr);
        }
    }

    while (conns)
        conn_free(conns);
    while (free_conns) {
        struct conn *c = free_conns;
        free_conns = c->next;
        free(c);
    }
    close(lfd);
    close(epfd);
    SSL_CTX_free(ssl_ctx);

    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double u = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    double s = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    printf("messages=%lu connections=%lu tls_connections=%lu cpu_user=%.3f cpu_sys=%.3f "
           "cpu_us_per_msg=%.1f\n",
           n_messages, n_connections, n_tls_connections, u, s,
           n_messages ? (u + s) * 1e6 / (double)n_messages : 0.0);
    fflush(stdout);
    return 0;
}
