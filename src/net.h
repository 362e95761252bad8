/* net.h - non-blocking TCP: address lookup, connect, and the byte stream (plain or TLS) that
 * the SMTP client reads and writes.  Every function follows one convention for I/O results:
 *   > 0  bytes moved;  NET_AGAIN  would block (*want says LOOP_READ or LOOP_WRITE);
 *   NET_EOF  the peer closed;  NET_ERR  an error, described in the stream's err buffer. */
#ifndef MAILSHOT_NET_H
#define MAILSHOT_NET_H
#include <stddef.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <openssl/ssl.h>

#define NET_AGAIN (-2)
#define NET_EOF   0
#define NET_ERR   (-1)

typedef struct net_stream {
  int fd;
  SSL *ssl;             /* NULL until TLS starts */
  int tls_verified;     /* handshake done with certificate checks */
  char err[256];
} net_stream;

/* host:port when host is an IP address ("192.0.2.1", "::1", "fe80::1%eth0"): 0 with the socket
 * address filled in; -1 for anything else (a name: resolve it with dns_resolve, on the loop).
 * Never blocks: no name service is asked. */
int net_numeric_addr(const char *host, const char *port, struct sockaddr_storage *ss, socklen_t *len);

/* Split "host:port", "[v6]:port" or "host" (then default_port) into its parts. */
int net_split_hostport(const char *s, char *host, size_t hostlen, char *port, size_t portlen,
                       const char *default_port);

/* Start a non-blocking connect; returns the fd (connect in progress or done) or -1 with err.
 * `source`, when non-NULL, is a numeric local address to bind first. */
int net_connect_start(const struct sockaddr *sa, socklen_t salen, const char *source,
                      char *err, size_t errlen);
/* After the fd became writable: 0 if connected, -1 with the reason in err. */
int net_connect_finish(int fd, char *err, size_t errlen);

/* Text form of an address, "127.0.0.1" or "::1". */
void net_addr_str(const struct sockaddr *sa, char *buf, size_t len);

ssize_t net_read(net_stream *s, void *buf, size_t n, int *want);
ssize_t net_write(net_stream *s, const void *buf, size_t n, int *want);
void net_close(net_stream *s);   /* frees SSL, closes fd; safe twice */

#endif
