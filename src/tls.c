/* tls.c - OpenSSL client contexts and handshakes.  See tls.h. */
#include "tls.h"
#include "loop.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>

static void ssl_err(char *err, size_t errlen, const char *what) {
  unsigned long e = ERR_get_error();
  char buf[200] = "unknown error";
  if (e) ERR_error_string_n(e, buf, sizeof buf);
  snprintf(err, errlen, "%s: %s", what, buf);
  ERR_clear_error();
}

SSL_CTX *tls_client_ctx(int verify, const char *ca_file, char *err, size_t errlen) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) { ssl_err(err, errlen, "SSL_CTX_new"); return NULL; }
  if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)) { ssl_err(err, errlen, "TLS version"); goto fail; }
  /* the SMTP layer owns timeouts; no renegotiation surprises inside SSL_read */
  SSL_CTX_set_mode(ctx, SSL_MODE_AUTO_RETRY | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (verify) {
    if (!SSL_CTX_set_default_verify_paths(ctx)) { ssl_err(err, errlen, "system CA store"); goto fail; }
    if (ca_file && *ca_file && !SSL_CTX_load_verify_locations(ctx, ca_file, NULL)) {
      ssl_err(err, errlen, ca_file);
      goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  } else {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  }
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

static int is_ip_literal(const char *host) {
  unsigned char buf[16];
  return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

int tls_begin(net_stream *s, SSL_CTX *ctx, const char *host, int verify) {
  s->ssl = SSL_new(ctx);
  if (!s->ssl) { ssl_err(s->err, sizeof s->err, "SSL_new"); return -1; }
  if (!SSL_set_fd(s->ssl, s->fd)) { ssl_err(s->err, sizeof s->err, "SSL_set_fd"); return -1; }
  int ip = is_ip_literal(host);
  /* RFC 6066 §3: SNI carries host names only, never address literals */
  if (!ip && !SSL_set_tlsext_host_name(s->ssl, host)) { ssl_err(s->err, sizeof s->err, "SNI"); return -1; }
  if (verify) {
    int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(s->ssl), host)
                : SSL_set1_host(s->ssl, host);
    if (!ok) { ssl_err(s->err, sizeof s->err, "certificate name check"); return -1; }
  }
  SSL_set_connect_state(s->ssl);
  s->tls_verified = verify;
  return 0;
}

int tls_handshake(net_stream *s, int *want) {
  ERR_clear_error();
  errno = 0;
  int r = SSL_do_handshake(s->ssl);
  if (r == 1) return 1;
  int e = SSL_get_error(s->ssl, r);
  if (e == SSL_ERROR_WANT_READ) { *want = LOOP_READ; return NET_AGAIN; }
  if (e == SSL_ERROR_WANT_WRITE) { *want = LOOP_WRITE; return NET_AGAIN; }
  long vr = SSL_get_verify_result(s->ssl);
  unsigned long q = ERR_peek_error();
  if (vr != X509_V_OK)
    snprintf(s->err, sizeof s->err, "certificate verification failed: %s", X509_verify_cert_error_string(vr));
  else if (q)
    ssl_err(s->err, sizeof s->err, "TLS handshake failed");
  else
    snprintf(s->err, sizeof s->err, "TLS handshake failed: %s",
             errno ? strerror(errno) : "connection closed by peer");
  ERR_clear_error();
  return NET_ERR;
}

void tls_describe(const net_stream *s, char *version, size_t vlen, char *cipher, size_t clen,
                  char *subject, size_t slen) {
  snprintf(version, vlen, "%s", s->ssl ? SSL_get_version(s->ssl) : "");
  snprintf(cipher, clen, "%s", s->ssl ? SSL_get_cipher_name(s->ssl) : "");
  subject[0] = '\0';
  if (!s->ssl) return;
  X509 *cert = SSL_get1_peer_certificate(s->ssl);
  if (!cert) return;
  X509_NAME_oneline(X509_get_subject_name(cert), subject, (int)slen);
  X509_free(cert);
}
