/* dkim.h - DKIM signatures (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463), over OpenSSL.
 *
 * A key is loaded once (dkim_key_load) and then signs any number of messages (dkim_sign).  Signing is
 * one pass over the body and one over the header block, with no allocation per line; the only
 * allocations per message are OpenSSL's contexts and, past 64 header fields, the field table.
 *
 * Messages are RFC 5322 text.  Line breaks may be CRLF, bare LF or bare CR: each counts as one CRLF,
 * exactly as bytebuf_crlf() writes it and smtp_dot_stuff() sends it, so a message signed with LF endings verifies after it
 * went through DATA.  Bytes >= 0x80 are signed as they are (RFC 6532 headers, 8-bit bodies).
 *
 * Not done, on purpose: l= (a body length limit lets anyone append to the body), i=, z=, q= (the
 * default dns/txt is the only method), rsa-sha1 (RFC 8301 §3.1 forbids signing with it).
 */
#ifndef MAILSHOT_DKIM_H
#define MAILSHOT_DKIM_H

#include <stddef.h>

#include "bytebuf.h"

#define DKIM_RSA_MIN_BITS 1024   /* RFC 8301 §3.2: signers MUST use at least 1024 bits */
#define DKIM_RSA_MAX_BITS 8192   /* our limit: signatures are built in a fixed buffer */
#define DKIM_FOLD_COLUMN  78     /* RFC 5322 §2.1.1: lines SHOULD be at most 78 characters */

typedef struct dkim_key dkim_key;

typedef enum { DKIM_RELAXED = 0, DKIM_SIMPLE = 1 } dkim_canon;   /* RFC 6376 §3.4 */

/* The header fields signed when dkim_opts.headers is NULL (lower case, NULL-terminated): RFC 6376
 * §5.4.1's core set, plus RFC 8058 §4's List-Unsubscribe(-Post), which MUST be covered. */
extern const char *const dkim_default_headers[];

typedef struct dkim_opts {
  const char *domain;           /* d=, required: letters, digits, '-', '_', '.'; A-labels for IDNs */
  const char *selector;         /* s=, required: same characters */
  const char *const *headers;   /* names to sign, NULL-terminated; NULL: dkim_default_headers */
  dkim_canon header_canon;      /* c= header part (DKIM_RELAXED is the zero value) */
  dkim_canon body_canon;        /* c= body part */
  long long timestamp;          /* t= (seconds since the epoch) when > 0 */
  long long expire;             /* x= (absolute, seconds since the epoch) when > 0 */
} dkim_opts;

/* Reads a PEM private key (PKCS#8 "PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY"): RSA of
 * DKIM_RSA_MIN_BITS..DKIM_RSA_MAX_BITS bits, or Ed25519.  Encrypted keys are refused (no prompt).
 * Returns NULL with "path: reason" in err for a missing or unreadable file, a file that holds no
 * private key, an encrypted key, another key type, or an RSA key of the wrong size. */
dkim_key *dkim_key_load(const char *path, char *err, size_t errlen);

/* A new key: algorithm "rsa-sha256" (bits: DKIM_RSA_MIN_BITS..4096; 0 means 2048) or
 * "ed25519-sha256" (bits must be 0).  NULL with a reason in err. */
dkim_key *dkim_key_generate(const char *algorithm, int bits, char *err, size_t errlen);

void dkim_key_free(dkim_key *k);                   /* k may be NULL */
const char *dkim_key_algorithm(const dkim_key *k); /* "rsa-sha256" or "ed25519-sha256" */
int dkim_key_bits(const dkim_key *k);              /* RSA modulus size; 256 for Ed25519 */

/* Appends the DNS TXT value to publish at SELECTOR._domainkey.DOMAIN (RFC 6376 §3.6.1):
 * "v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo DER>" or, RFC 8463 §4.2,
 * "v=DKIM1; k=ed25519; p=<base64 of the raw 32-byte public key>".  0 ok, -1 out of memory. */
int dkim_key_public_record(const dkim_key *k, bytebuf *out);

/* Appends the private key as unencrypted PKCS#8 PEM.  0 ok, -1 out of memory. */
int dkim_key_private_pem(const dkim_key *k, bytebuf *out);

/* "relaxed/simple" and the like into *header and *body.  A single word names the header part and
 * the body part is then "simple" (RFC 6376 §3.5, c=).  0 ok, -1 for anything else. */
int dkim_parse_canon(const char *s, dkim_canon *header, dkim_canon *body);

/* 0 when o can sign: domain and selector well formed, header names printable without ':' or ';',
 * x= later than t=.  Otherwise -1 with the reason in err.  dkim_sign checks this too. */
int dkim_opts_check(const dkim_opts *o, char *err, size_t errlen);

/* Appends to out the DKIM-Signature header field for msg (a whole RFC 5322 message), folded at
 * DKIM_FOLD_COLUMN where it can be, ending in CRLF.  Prepend it to the message as it is.
 *
 * Signed (h=): every name of the list that occurs in the message, as many times as it occurs,
 * picked from the bottom up (§5.4.2); "from" is always signed (§5.4) and listed once more than it
 * occurs, so that a From: added later breaks the signature.  0 ok; -1 with a reason in err for bad
 * options, a malformed header block (a line without ':' or a continuation line first), a message
 * without From:, an OpenSSL failure or out of memory.  On failure out is left as it was. */
int dkim_sign(const dkim_key *k, const dkim_opts *o, const char *msg, size_t len, bytebuf *out,
              char *err, size_t errlen);

/* A signing context for one thread: its own copy of the key and OpenSSL contexts made from it, so
 * that several threads can sign with one key at once, each with its own dkim_ctx, sharing nothing
 * (dkim_sign itself uses the key's contexts: one thread at a time).  Make it on the thread that
 * uses the key (the copy reads it); the key must outlive it.  NULL with a reason in err. */
typedef struct dkim_ctx dkim_ctx;
dkim_ctx *dkim_ctx_new(const dkim_key *k, char *err, size_t errlen);
void dkim_ctx_free(dkim_ctx *c); /* c may be NULL */

/* dkim_sign with the key of c, on the thread that owns c; no allocation but out's growth (and the
 * field table past 64 header fields). */
int dkim_sign_ctx(dkim_ctx *c, const dkim_opts *o, const char *msg, size_t len, bytebuf *out, char *err,
                  size_t errlen);

/* The canonical forms that are hashed (RFC 6376 §3.4), appended to out; for tests and debugging.
 * dkim_canon_header: field is one header field as in the message ("Name: value", maybe folded,
 * with or without its final line break); the result ends in CRLF.  dkim_canon_body: body is
 * everything after the blank line.  0 ok, -1 out of memory. */
int dkim_canon_header(dkim_canon c, const char *field, size_t len, bytebuf *out);
int dkim_canon_body(dkim_canon c, const char *body, size_t len, bytebuf *out);

#endif
