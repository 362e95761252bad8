/* tls.h - OpenSSL client side for the SMTP streams: contexts, handshake, what was negotiated. */
#ifndef MAILSHOT_TLS_H
#define MAILSHOT_TLS_H
#include <openssl/ssl.h>
#include "net.h"

/* A client context.  verify != 0: the peer's chain must check out against the system CA store
 * (plus ca_file when given) and, per connection, its name (tls_begin).  TLS 1.2 at least. */
SSL_CTX *tls_client_ctx(int verify, const char *ca_file, char *err, size_t errlen);

/* Attach TLS to s->fd.  host is the name (or IP literal) we meant to reach: sent as SNI when it
 * is a name, and checked against the certificate when verify is set (RFC 6125). */
int tls_begin(net_stream *s, SSL_CTX *ctx, const char *host, int verify);

/* 1 = done, NET_AGAIN (with *want), NET_ERR (reason in s->err). */
int tls_handshake(net_stream *s, int *want);

/* Negotiated version, cipher and peer certificate subject (one line), for `mailshot check`. */
void tls_describe(const net_stream *s, char *version, size_t vlen, char *cipher, size_t clen,
                  char *subject, size_t slen);

#endif
