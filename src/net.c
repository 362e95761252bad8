/* net.c - non-blocking TCP and the plain/TLS byte stream.  See net.h. */
#include "net.h"
#include "loop.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int net_split_hostport(const char *s, char *host, size_t hostlen, char *port, size_t portlen,
                       const char *default_port) {
  const char *h = s, *p = NULL;
  size_t hl;
  if (*s == '[') {                              /* [v6]:port */
    const char *close = strchr(s, ']');
    if (!close) return -1;
    h = s + 1;
    hl = (size_t)(close - h);
    if (close[1] == ':') p = close + 2; else if (close[1] != '\0') return -1;
  } else {
    const char *colon = strrchr(s, ':');
    if (colon && strchr(s, ':') == colon) { hl = (size_t)(colon - s); p = colon + 1; }
    else hl = strlen(s);                        /* no port, or a bare IPv6 address */
  }
  if (!p) p = default_port;
  if (!p || !*p || hl == 0 || hl >= hostlen || strlen(p) >= portlen) return -1;
  for (const char *c = p; *c; c++) if (*c < '0' || *c > '9') return -1;
  long pn = strtol(p, NULL, 10);
  if (pn < 1 || pn > 65535) return -1;
  memcpy(host, h, hl);
  host[hl] = '\0';
  snprintf(port, portlen, "%s", p);
  return 0;
}

int net_numeric_addr(const char *host, const char *port, struct sockaddr_storage *ss, socklen_t *len) {
  struct addrinfo hints = { 0 }, *ai = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;   /* no lookup: returns at once */
  if (getaddrinfo(host, port, &hints, &ai) != 0) return -1;
  int ok = ai && ai->ai_addrlen <= sizeof *ss;
  if (ok) {
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    *len = ai->ai_addrlen;
  }
  freeaddrinfo(ai);
  return ok ? 0 : -1;
}

void net_addr_str(const struct sockaddr *sa, char *buf, size_t len) {
  const void *a = sa->sa_family == AF_INET6 ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
                                            : (const void *)&((const struct sockaddr_in *)sa)->sin_addr;
  if (!inet_ntop(sa->sa_family, a, buf, (socklen_t)len)) snprintf(buf, len, "?");
}

static int bind_source(int fd, int family, const char *source, char *err, size_t errlen) {
  struct sockaddr_storage ss = { 0 };
  socklen_t sl;
  if (family == AF_INET6) {
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    s6->sin6_family = AF_INET6;
    if (inet_pton(AF_INET6, source, &s6->sin6_addr) != 1) goto wrongfamily;
    sl = sizeof *s6;
  } else {
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    s4->sin_family = AF_INET;
    if (inet_pton(AF_INET, source, &s4->sin_addr) != 1) goto wrongfamily;
    sl = sizeof *s4;
  }
  if (bind(fd, (struct sockaddr *)&ss, sl) < 0) {
    snprintf(err, errlen, "cannot bind source address %s: %s", source, strerror(errno));
    return -1;
  }
  return 0;
wrongfamily:
  snprintf(err, errlen, "source address %s is not of the destination's address family", source);
  return -1;
}

int net_connect_start(const struct sockaddr *sa, socklen_t salen, const char *source,
                      char *err, size_t errlen) {
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) { snprintf(err, errlen, "socket: %s", strerror(errno)); return -1; }
  /* Commands are small writes that wait for a reply: without TCP_NODELAY each would wait for
   * the peer's delayed ACK (~40 ms) behind Nagle's algorithm. */
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
    snprintf(err, errlen, "setsockopt TCP_NODELAY: %s", strerror(errno));
    close(fd);
    return -1;
  }
  if (source && *source && bind_source(fd, sa->sa_family, source, err, errlen) < 0) { close(fd); return -1; }
  if (connect(fd, sa, salen) < 0 && errno != EINPROGRESS) {
    snprintf(err, errlen, "%s", strerror(errno));
    close(fd);
    return -1;
  }
  return fd;
}

int net_connect_finish(int fd, char *err, size_t errlen) {
  int soerr = 0;
  socklen_t len = sizeof soerr;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0) soerr = errno;
  if (soerr) { snprintf(err, errlen, "%s", strerror(soerr)); return -1; }
  return 0;
}

/* Describe the last TLS failure: the OpenSSL error queue, or the certificate check result. */
static void tls_error(net_stream *s, int sslerr) {
  unsigned long e = ERR_get_error();
  long vr = s->ssl ? SSL_get_verify_result(s->ssl) : X509_V_OK;
  if (vr != X509_V_OK)
    snprintf(s->err, sizeof s->err, "certificate verification failed: %s", X509_verify_cert_error_string(vr));
  else if (e)
    ERR_error_string_n(e, s->err, sizeof s->err);
  else if (sslerr == SSL_ERROR_SYSCALL)
    snprintf(s->err, sizeof s->err, "TLS: %s", errno ? strerror(errno) : "connection closed by peer");
  else
    snprintf(s->err, sizeof s->err, "TLS error %d", sslerr);
  ERR_clear_error();
}

static ssize_t tls_result(net_stream *s, int r, int *want) {
  int e = SSL_get_error(s->ssl, r);
  switch (e) {
  case SSL_ERROR_WANT_READ:  *want = LOOP_READ;  return NET_AGAIN;
  case SSL_ERROR_WANT_WRITE: *want = LOOP_WRITE; return NET_AGAIN;
  case SSL_ERROR_ZERO_RETURN: return NET_EOF;
  case SSL_ERROR_SSL:
    /* a peer that closes without close_notify: an end of stream like any other for SMTP,
     * where the protocol itself says when a message is complete */
    if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) { ERR_clear_error(); return NET_EOF; }
    /* fall through */
  default:
    tls_error(s, e);
    return NET_ERR;
  }
}

ssize_t net_read(net_stream *s, void *buf, size_t n, int *want) {
  if (s->ssl) {
    ERR_clear_error();
    int r = SSL_read(s->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
    return r > 0 ? r : tls_result(s, r, want);
  }
  for (;;) {
    ssize_t r = read(s->fd, buf, n);
    if (r > 0) return r;
    if (r == 0) return NET_EOF;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) { *want = LOOP_READ; return NET_AGAIN; }
    snprintf(s->err, sizeof s->err, "%s", strerror(errno));
    return NET_ERR;
  }
}

ssize_t net_write(net_stream *s, const void *buf, size_t n, int *want) {
  if (s->ssl) {
    ERR_clear_error();
    int r = SSL_write(s->ssl, buf, n > INT32_MAX ? INT32_MAX : (int)n);
    return r > 0 ? r : tls_result(s, r, want);
  }
  for (;;) {
    /* MSG_NOSIGNAL: a peer that went away must give EPIPE, not kill the process */
    ssize_t r = send(s->fd, buf, n, MSG_NOSIGNAL);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) { *want = LOOP_WRITE; return NET_AGAIN; }
    snprintf(s->err, sizeof s->err, "%s", strerror(errno));
    return NET_ERR;
  }
}

void net_close(net_stream *s) {
  if (s->ssl) { SSL_free(s->ssl); s->ssl = NULL; }
  if (s->fd >= 0) { close(s->fd); s->fd = -1; }
}
