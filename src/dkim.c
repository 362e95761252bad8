/* dkim.c - DKIM signing (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463) over OpenSSL 3.
 * No Lua, no I/O but reading a key file; see dkim.h for the contracts.
 *
 * The shape of dkim_sign: parse the header block once into a table of fields (pointers into the
 * message), hash the canonical body, write the DKIM-Signature field up to "b=" into the output
 * while hashing the signed fields in h= order, hash that field itself (b= empty, no CRLF, §3.7),
 * sign the SHA-256 digest, and append the folded signature.  Canonical text is never built as a
 * whole: it goes through a small staging buffer into the digest (struct sink). */
#include "dkim.h"
#include "seterr.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#define DKIM_KEY_FILE_MAX (64 * 1024) /* an 8192-bit RSA PEM is ~6.5 KB */
#define DKIM_SIG_MAX (DKIM_RSA_MAX_BITS / 8)
#define DKIM_NAME_MAX 253 /* RFC 1035 §2.3.4, for d= and s= */
#define DKIM_HDRNAME_MAX 200 /* ours: a header name in h= (RFC 5322 sets none) */

/* The contexts are made once per key and copied per message: cheaper than setting one up (an
 * OpenSSL 3 init looks the algorithm up in its provider tables every time). */
struct dkim_key {
  EVP_PKEY *pkey;
  int ed25519; /* 0: RSA */
  int bits;
  EVP_MD *sha256; /* fetched once */
  EVP_MD_CTX *ed_tmpl; /* Ed25519: DigestSign initialised with the key */
  EVP_PKEY_CTX *rsa_tmpl; /* RSA: sign initialised, PKCS#1 v1.5 padding, SHA-256 */
};

const char *const dkim_default_headers[] = {"from",
                                            "to",
                                            "subject",
                                            "date",
                                            "message-id",
                                            "mime-version",
                                            "content-type",
                                            "content-transfer-encoding",
                                            "list-unsubscribe",
                                            "list-unsubscribe-post",
                                            "reply-to",
                                            "cc",
                                            NULL};

/* ---------------------------------------------------------------- small helpers */

/* OpenSSL's reason for the last failure, and an empty error queue afterwards: a stale entry would
 * confuse the next SSL_get_error() of the TLS code. */
static const char *ssl_reason(char *buf, size_t len) {
  unsigned long e = ERR_peek_last_error();
  if (e)
    ERR_error_string_n(e, buf, len);
  else
    snprintf(buf, len, "unknown OpenSSL error");
  ERR_clear_error();
  return buf;
}

/* ASCII only: header names must not depend on the locale. */
static unsigned char lower(unsigned char c) {
  return (c >= 'A' && c <= 'Z') ? (unsigned char)(c - 'A' + 'a') : c;
}

static int name_eq(const char *a, size_t alen, const char *b) {
  size_t i;
  for (i = 0; i < alen; i++)
    if (b[i] == '\0' || lower((unsigned char)a[i]) != lower((unsigned char)b[i])) return 0;
  return b[i] == '\0';
}

/* Byte classes for the canonicalizers. */
enum { C_TEXT, C_WSP, C_CR, C_LF };
static const unsigned char cls[256] = {[' '] = C_WSP, ['\t'] = C_WSP, ['\r'] = C_CR, ['\n'] = C_LF};

/* ---------------------------------------------------------------- sink: canonical bytes out */

/* Canonical text goes into a digest (signing) or a buffer (dkim_canon_*), staged so that a digest
 * sees a few large updates instead of one per run of bytes. */
typedef struct sink {
  EVP_MD_CTX *md; /* hash into this, or */
  bytebuf *buf; /* append to this */
  int failed;
  size_t n;
  unsigned char stage[4096];
} sink;

static void sink_flush(sink *s) {
  if (s->n && !s->failed) {
    if (s->md ? EVP_DigestUpdate(s->md, s->stage, s->n) != 1 : bytebuf_append(s->buf, s->stage, s->n) < 0)
      s->failed = 1;
  }
  s->n = 0;
}

static void sink_put(sink *s, const void *p, size_t n) {
  if (n > sizeof s->stage - s->n) {
    sink_flush(s);
    if (n > sizeof s->stage) { /* a long run: straight through */
      if (!s->failed && (s->md ? EVP_DigestUpdate(s->md, p, n) != 1 : bytebuf_append(s->buf, p, n) < 0))
        s->failed = 1;
      return;
    }
  }
  memcpy(s->stage + s->n, p, n);
  s->n += n;
}

/* ---------------------------------------------------------------- canonicalization (§3.4) */

/* §3.4.3 simple: lines as they are, empty lines at the end dropped, and a body that is empty or
 * does not end in a line break ends in CRLF.  §3.4.4 relaxed: WSP at line ends dropped, other WSP
 * runs made one SP, empty lines at the end dropped, CRLF added after a last line without one; an
 * empty body stays empty.  Empty lines are counted and written only when text follows them. */
static void canon_body(sink *s, dkim_canon c, const unsigned char *p, size_t len) {
  const unsigned char *end = p + len, *q;
  const int relaxed = c == DKIM_RELAXED;
  size_t blank = 0; /* empty lines not written yet */
  int wsp = 0, text = 0, any = 0; /* WSP pending; this line has text; any text at all */

  while (p < end) {
    unsigned char k = cls[*p];
    if (k == C_CR || k == C_LF) { /* CRLF, bare LF or bare CR: one line break */
      p += (k == C_CR && p + 1 < end && p[1] == '\n') ? 2 : 1;
      if (text)
        sink_put(s, "\r\n", 2);
      else
        blank++;
      text = wsp = 0;
      continue;
    }
    if (relaxed && k == C_WSP) {
      wsp = 1;
      p++;
      continue;
    }
    q = p + 1;
    if (relaxed)
      while (q < end && cls[*q] == C_TEXT) q++;
    else
      while (q < end && cls[*q] <= C_WSP) q++;
    for (; blank; blank--) sink_put(s, "\r\n", 2);
    if (wsp) sink_put(s, " ", 1);
    sink_put(s, p, (size_t)(q - p));
    wsp = 0;
    text = any = 1;
    p = q;
  }
  if (text || (!any && !relaxed)) sink_put(s, "\r\n", 2);
}

/* One header field, [p, p + len), its final line break optional (§3.4.1, §3.4.2).  last: the
 * DKIM-Signature field being made, which is hashed without its CRLF (§3.7). */
static void canon_header(sink *s, dkim_canon c, const unsigned char *p, size_t len, int last) {
  const unsigned char *end = p + len, *colon, *q;
  while (end > p && (end[-1] == '\r' || end[-1] == '\n')) end--;
  if (c == DKIM_SIMPLE) { /* as it is, line breaks made CRLF */
    while (p < end) {
      for (q = p; q < end && cls[*q] < C_CR; q++) {}
      sink_put(s, p, (size_t)(q - p));
      if (q == end) break;
      sink_put(s, "\r\n", 2);
      p = q + 1 + (*q == '\r' && q + 1 < end && q[1] == '\n');
    }
  } else { /* relaxed */
    unsigned char name[256];
    const unsigned char *ne;
    int wsp = 0, started = 0;
    colon = memchr(p, ':', (size_t)(end - p));
    if (colon == NULL) colon = end;
    for (ne = colon; ne > p && cls[ne[-1]] == C_WSP; ne--) {} /* no WSP before the colon */
    while (p < ne) { /* name in lower case, in pieces */
      size_t i, n = (size_t)(ne - p) < sizeof name ? (size_t)(ne - p) : sizeof name;
      for (i = 0; i < n; i++) name[i] = lower(p[i]);
      sink_put(s, name, n);
      p += n;
    }
    sink_put(s, ":", 1);
    for (p = colon < end ? colon + 1 : end; p < end;) { /* value: unfolded, WSP runs one SP */
      unsigned char k = cls[*p];
      if (k != C_TEXT) {
        if (k == C_WSP) wsp = 1; /* CR and LF vanish: unfolding */
        p++;
        continue;
      }
      for (q = p + 1; q < end && cls[*q] == C_TEXT; q++) {}
      if (wsp && started) /* WSP after the colon and at the end is dropped */
        sink_put(s, " ", 1);
      sink_put(s, p, (size_t)(q - p));
      wsp = 0;
      started = 1;
      p = q;
    }
  }
  if (!last) sink_put(s, "\r\n", 2);
}

int dkim_canon_header(dkim_canon c, const char *field, size_t len, bytebuf *out) {
  sink s;
  size_t start = out->len;
  s.md = NULL, s.buf = out, s.failed = 0, s.n = 0;
  canon_header(&s, c, (const unsigned char *)field, len, 0);
  sink_flush(&s);
  if (s.failed && out->data) {
    out->len = start;
    out->data[start] = '\0';
  }
  return s.failed ? -1 : 0;
}

int dkim_canon_body(dkim_canon c, const char *body, size_t len, bytebuf *out) {
  sink s;
  size_t start = out->len;
  s.md = NULL, s.buf = out, s.failed = 0, s.n = 0;
  canon_body(&s, c, (const unsigned char *)body, len);
  sink_flush(&s);
  if (s.failed && out->data) {
    out->len = start;
    out->data[start] = '\0';
  }
  return s.failed ? -1 : 0;
}

/* ---------------------------------------------------------------- header block */

typedef struct field {
  const char *p; /* "Name: value", folded lines included ... */
  size_t len; /* ... up to, not including, its last line break */
  size_t namelen; /* bytes before the colon, trailing WSP excluded */
} field;

typedef struct fields {
  field *v;
  size_t n, cap;
  int heap; /* v was malloc'd (it starts as an array on the caller's stack) */
} fields;

static int fields_push(fields *f, field x) {
  if (f->n == f->cap) {
    size_t cap = f->cap * 2;
    field *v = f->heap ? realloc(f->v, cap * sizeof *v) : malloc(cap * sizeof *v);
    if (v == NULL) return -1;
    if (!f->heap) memcpy(v, f->v, f->n * sizeof *v);
    f->v = v, f->cap = cap, f->heap = 1;
  }
  f->v[f->n++] = x;
  return 0;
}

/* Splits the header block (RFC 5322 §2.2) into f; *body is the offset of the body (len when the
 * message has no blank line).  -1 with a reason for a line that is neither a field nor a
 * continuation, a continuation before any field, or out of memory. */
static int parse_header(const char *msg, size_t len, fields *f, size_t *body, char *err, size_t errlen) {
  size_t pos = 0, line = 1;
  *body = len;
  while (pos < len) {
    size_t e = pos, next;
    while (e < len && cls[(unsigned char)msg[e]] < C_CR) e++;
    next = e == len ? len : e + 1 + (msg[e] == '\r' && e + 1 < len && msg[e + 1] == '\n');
    if (e == pos) { /* the blank line */
      *body = next;
      return 0;
    }
    if (cls[(unsigned char)msg[pos]] == C_WSP) {
      if (f->n == 0) {
        seterr(err, errlen, "header line 1 starts with white space (a continuation of nothing)");
        return -1;
      }
      f->v[f->n - 1].len = e - (size_t)(f->v[f->n - 1].p - msg);
    } else {
      const char *colon = memchr(msg + pos, ':', e - pos);
      field x;
      if (colon == NULL || colon == msg + pos) {
        seterr(err, errlen, "header line %zu is not a header field (no name and ':')", line);
        return -1;
      }
      x.p = msg + pos, x.len = e - pos, x.namelen = (size_t)(colon - x.p);
      while (x.namelen && cls[(unsigned char)x.p[x.namelen - 1]] == C_WSP) x.namelen--;
      if (fields_push(f, x) < 0) {
        seterr(err, errlen, "out of memory");
        return -1;
      }
    }
    pos = next;
    line++;
  }
  return 0;
}

static size_t count_fields(const fields *f, const char *name) {
  size_t n = 0;
  for (size_t i = 0; i < f->n; i++) n += (size_t)name_eq(f->v[i].p, f->v[i].namelen, name);
  return n;
}

/* The j-th field called name counting from the bottom (§5.4.2), or NULL. */
static const field *nth_from_bottom(const fields *f, const char *name, size_t j) {
  for (size_t i = f->n; i-- > 0;)
    if (name_eq(f->v[i].p, f->v[i].namelen, name) && j-- == 0) return &f->v[i];
  return NULL;
}

/* ---------------------------------------------------------------- folding the field */

/* Writes the DKIM-Signature field token by token, starting a new line ("CRLF SP", which is FWS
 * wherever we break) when a token would pass DKIM_FOLD_COLUMN. */
typedef struct folder {
  bytebuf *out;
  size_t col;
  int failed;
} folder;

static void fold_raw(folder *f, const char *s, size_t n) {
  if (!f->failed && bytebuf_append(f->out, s, n) < 0) f->failed = 1;
  f->col += n;
}

static void fold_break(folder *f) {
  fold_raw(f, "\r\n ", 3);
  f->col = 1;
}

/* A token; space: a tag (separated by SP when it stays on the line), else glued to the last one. */
static void fold_tok(folder *f, const char *s, size_t n, int space) {
  if (f->col + (size_t)space + n > DKIM_FOLD_COLUMN && f->col > 1)
    fold_break(f);
  else if (space)
    fold_raw(f, " ", 1);
  fold_raw(f, s, n);
}

static void fold_tag(folder *f, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void fold_tag(folder *f, const char *fmt, ...) {
  char tmp[DKIM_NAME_MAX + 64];
  va_list ap;
  int n;
  va_start(ap, fmt);
  n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof tmp) { /* cannot happen after dkim_opts_check */
    f->failed = 1;
    return;
  }
  fold_tok(f, tmp, (size_t)n, 1);
}

/* A base64 value that may be split anywhere (base64string allows FWS between characters). */
static void fold_base64(folder *f, const char *s, size_t n) {
  while (n) {
    size_t room = f->col < DKIM_FOLD_COLUMN ? DKIM_FOLD_COLUMN - f->col : 0, k;
    if (room == 0) {
      fold_break(f);
      continue;
    }
    k = n < room ? n : room;
    fold_raw(f, s, k);
    s += k, n -= k;
  }
}

/* One name of h=.  The previous one is written now that we know whether ':' or ';' follows it;
 * name NULL ends the list.  The first carries "h=" and is a tag; later ones are glued on, so a
 * line break in h= always comes after a ':' (§3.5 allows FWS there). */
typedef struct hlist {
  const char *pending;
  int written;
} hlist;

static void fold_hname(folder *f, hlist *h, const char *name) {
  char tmp[DKIM_HDRNAME_MAX + 4];
  size_t n = 0;
  if (h->pending) {
    if (!h->written) tmp[n++] = 'h', tmp[n++] = '=';
    for (const char *p = h->pending; *p; p++) tmp[n++] = (char)lower((unsigned char)*p);
    tmp[n++] = name ? ':' : ';';
    fold_tok(f, tmp, n, !h->written);
    h->written = 1;
  }
  h->pending = name;
}

/* ---------------------------------------------------------------- options */

static int name_ok(const char *s) {
  size_t n = 0, label = 0;
  if (s == NULL || *s == '\0') return 0;
  for (; s[n]; n++) {
    unsigned char c = (unsigned char)s[n];
    if (c == '.') {
      if (label == 0) return 0;
      label = 0;
    } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
               c == '_') {
      label++;
    } else {
      return 0;
    }
  }
  return label > 0 && n <= DKIM_NAME_MAX;
}

static int hdrname_ok(const char *s) {
  size_t n;
  for (n = 0; s[n]; n++) {
    unsigned char c = (unsigned char)s[n];
    if (c < 33 || c > 126 || c == ':' || c == ';') /* RFC 5322 §2.2 ftext; ';' would end h= */
      return 0;
  }
  return n > 0 && n <= DKIM_HDRNAME_MAX;
}

int dkim_opts_check(const dkim_opts *o, char *err, size_t errlen) {
  if (!name_ok(o->domain)) {
    seterr(err, errlen, "invalid domain '%s' (d=: a domain name in ASCII)", o->domain ? o->domain : "");
    return -1;
  }
  if (!name_ok(o->selector)) {
    seterr(err, errlen, "invalid selector '%s' (s=: letters, digits, '-', '_', '.')",
           o->selector ? o->selector : "");
    return -1;
  }
  for (const char *const *h = o->headers; h && *h; h++)
    if (!hdrname_ok(*h)) {
      seterr(err, errlen, "invalid header name '%s'", *h);
      return -1;
    }
  if ((o->header_canon != DKIM_RELAXED && o->header_canon != DKIM_SIMPLE) ||
      (o->body_canon != DKIM_RELAXED && o->body_canon != DKIM_SIMPLE)) {
    seterr(err, errlen, "invalid canonicalization");
    return -1;
  }
  if (o->timestamp < 0 || o->expire < 0 || (o->timestamp > 0 && o->expire > 0 && o->expire <= o->timestamp)) {
    seterr(err, errlen, "x= must be later than t= (RFC 6376 §3.5)");
    return -1;
  }
  return 0;
}

int dkim_parse_canon(const char *s, dkim_canon *header, dkim_canon *body) {
  const char *slash = strchr(s, '/');
  size_t n = slash ? (size_t)(slash - s) : strlen(s);
  if (n == 7 && memcmp(s, "relaxed", 7) == 0)
    *header = DKIM_RELAXED;
  else if (n == 6 && memcmp(s, "simple", 6) == 0)
    *header = DKIM_SIMPLE;
  else
    return -1;
  if (slash == NULL)
    *body = DKIM_SIMPLE; /* §3.5: "c=relaxed" is relaxed/simple */
  else if (strcmp(slash + 1, "relaxed") == 0)
    *body = DKIM_RELAXED;
  else if (strcmp(slash + 1, "simple") == 0)
    *body = DKIM_SIMPLE;
  else
    return -1;
  return 0;
}

/* ---------------------------------------------------------------- signing */

/* What one signature needs besides the key: a digest context to hash into, and the signing
 * templates to copy.  dkim_sign uses the key's own templates.  A dkim_ctx (one per signing thread)
 * has its own copy of the key (EVP_PKEY_dup) and templates made from that copy, so threads signing
 * at once share no OpenSSL object at all.  openssl-threads(7) allows less: "two threads can
 * calculate a signature using two different EVP_PKEY_CTX objects", over a shared key, since
 * "Objects are thread-safe as long as the API's being invoked don't modify the object"; but an RSA
 * key shared by threads keeps one blinding value for all but its first user, behind a lock taken
 * at every signature (crypto/rsa/rsa_ossl.c), which a copy per thread avoids. */
struct dkim_ctx {
  const dkim_key *k;
  EVP_PKEY *pkey; /* a dkim_ctx's own copy of the key (NULL in dkim_sign's) */
  EVP_MD_CTX *md; /* hashing; reused from message to message */
  EVP_MD_CTX *ed_tmpl; /* Ed25519: DigestSign initialised with the key */
  EVP_PKEY_CTX *rsa_tmpl; /* RSA: sign initialised, PKCS#1 v1.5 padding, SHA-256 */
};

/* RSASSA-PKCS1-v1_5 over the digest (RFC 8017 §8.2: the DigestInfo is added by OpenSSL), or Ed25519
 * over the 32 digest bytes themselves (RFC 8463 §3: PureEdDSA of the SHA-256 hash).  The template
 * is copied, never used itself: a context is good for one signature. */
static int sign_digest(const dkim_ctx *c, const unsigned char *dg, size_t dglen, unsigned char *sig,
                       size_t *siglen) {
  int ok;
  if (!c->k->ed25519) {
    EVP_PKEY_CTX *pc = EVP_PKEY_CTX_dup(c->rsa_tmpl);
    ok = pc && EVP_PKEY_sign(pc, sig, siglen, dg, dglen) == 1;
    EVP_PKEY_CTX_free(pc);
  } else {
    EVP_MD_CTX *mc = EVP_MD_CTX_new();
    ok = mc && EVP_MD_CTX_copy_ex(mc, c->ed_tmpl) == 1 && EVP_DigestSign(mc, sig, siglen, dg, dglen) == 1;
    EVP_MD_CTX_free(mc);
  }
  return ok ? 0 : -1;
}

/* Every occurrence of one name: hashed bottom up (§5.4.2) and listed in h=; "from" once more,
 * an entry that matches no field (§5.4: it then makes an added From: break the signature). */
static void sign_name(folder *f, sink *s, dkim_canon c, const fields *fl, hlist *h, const char *name) {
  size_t n = count_fields(fl, name), extra = (size_t)name_eq(name, strlen(name), "from");
  for (size_t j = 0; j < n + extra; j++) {
    const field *x = nth_from_bottom(fl, name, j);
    if (x) canon_header(s, c, (const unsigned char *)x->p, x->len, 0);
    fold_hname(f, h, name);
  }
}

/* The h= list and the hash of the fields it names, in its order.  "from" comes first when the
 * list lacks it; a name listed twice counts once. */
static void sign_fields(folder *f, sink *s, const dkim_opts *o, const fields *fl) {
  const char *const *list = o->headers ? o->headers : dkim_default_headers;
  hlist h = {NULL, 0};
  int has_from = 0;

  for (size_t i = 0; list[i]; i++) has_from |= name_eq(list[i], strlen(list[i]), "from");
  if (!has_from) sign_name(f, s, o->header_canon, fl, &h, "from");
  for (size_t i = 0; list[i]; i++) {
    int dup = 0;
    for (size_t j = 0; j < i && !dup; j++) dup = name_eq(list[j], strlen(list[j]), list[i]);
    if (!dup) sign_name(f, s, o->header_canon, fl, &h, list[i]);
  }
  fold_hname(f, &h, NULL);
}

/* bh= (§3.7): SHA-256 of the canonical body, base64, as "bh=...;" into tag (60 bytes). */
static int body_hash(const dkim_key *k, sink *s, dkim_canon c, const char *body, size_t len, char *tag) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0;
  int n;
  if (EVP_DigestInit_ex(s->md, k->sha256, NULL) != 1) return -1;
  canon_body(s, c, (const unsigned char *)body, len);
  sink_flush(s);
  if (s->failed || EVP_DigestFinal_ex(s->md, md, &mdlen) != 1) return -1;
  memcpy(tag, "bh=", 3);
  n = EVP_EncodeBlock((unsigned char *)tag + 3, md, (int)mdlen);
  memcpy(tag + 3 + n, ";", 2);
  return 0;
}

/* The tags before h=, in the order verifiers' logs are used to. */
static void put_tags(folder *f, const dkim_key *k, const dkim_opts *o) {
  static const char *const canon_name[] = {"relaxed", "simple"};
  fold_raw(f, "DKIM-Signature:", 15);
  fold_tag(f, "v=1;");
  fold_tag(f, "a=%s;", dkim_key_algorithm(k));
  fold_tag(f, "c=%s/%s;", canon_name[o->header_canon], canon_name[o->body_canon]);
  fold_tag(f, "d=%s;", o->domain);
  fold_tag(f, "s=%s;", o->selector);
  if (o->timestamp > 0) fold_tag(f, "t=%lld;", o->timestamp);
  if (o->expire > 0) fold_tag(f, "x=%lld;", o->expire);
}

/* b= (§3.7): hashes the field written so far (out from start: it ends in "b="), without CRLF,
 * after the signed fields already in the digest; signs; appends the value and the CRLF. */
static int put_signature(folder *f, const dkim_ctx *dc, sink *s, dkim_canon c, size_t start) {
  unsigned char md[EVP_MAX_MD_SIZE], sig[DKIM_SIG_MAX];
  char b64[DKIM_SIG_MAX / 3 * 4 + 8];
  unsigned int mdlen = 0;
  size_t siglen = sizeof sig;
  int n;
  canon_header(s, c, (const unsigned char *)f->out->data + start, f->out->len - start, 1);
  sink_flush(s);
  if (s->failed || EVP_DigestFinal_ex(s->md, md, &mdlen) != 1 || sign_digest(dc, md, mdlen, sig, &siglen) < 0)
    return -1;
  n = EVP_EncodeBlock((unsigned char *)b64, sig, (int)siglen);
  fold_base64(f, b64, (size_t)n);
  fold_raw(f, "\r\n", 2);
  return 0;
}

static int sign_with(const dkim_ctx *dc, const dkim_opts *o, const char *msg, size_t len, bytebuf *out, char *err,
                     size_t errlen) {
  const dkim_key *k = dc->k;
  field stackv[64];
  fields fl = {stackv, 0, sizeof stackv / sizeof stackv[0], 0};
  char bh[64], why[256];
  size_t start = out->len, body;
  folder f = {out, 0, 0};
  sink s;
  int rc = -1;

  s.md = dc->md, s.buf = NULL, s.failed = 0, s.n = 0;
  if (dkim_opts_check(o, err, errlen) < 0 || parse_header(msg, len, &fl, &body, err, errlen) < 0) goto done;
  if (count_fields(&fl, "from") == 0) {
    seterr(err, errlen, "the message has no From: header field (RFC 6376 §5.4 requires signing it)");
    goto done;
  }
  if (body_hash(k, &s, o->body_canon, msg + body, len - body, bh) < 0 ||
      EVP_DigestInit_ex(s.md, k->sha256, NULL) != 1)
    goto ssl_fail;
  put_tags(&f, k, o);
  sign_fields(&f, &s, o, &fl); /* h=, and the signed fields into the digest */
  fold_tok(&f, bh, strlen(bh), 1); /* whole on a line: some verifiers mishandle FWS in bh= */
  if (f.col + 1 + 2 + 8 > DKIM_FOLD_COLUMN) /* "b=" with some of its value, or on a new line */
    fold_break(&f);
  else
    fold_raw(&f, " ", 1);
  fold_raw(&f, "b=", 2);
  if (f.failed) goto oom;
  if (put_signature(&f, dc, &s, o->header_canon, start) < 0) goto ssl_fail;
  if (f.failed) goto oom;
  rc = 0;
  goto done;

oom:
  seterr(err, errlen, "out of memory");
  goto done;
ssl_fail:
  seterr(err, errlen, "signing failed: %s", ssl_reason(why, sizeof why));
done:
  if (fl.heap) free(fl.v);
  if (rc < 0 && out->data) {
    out->len = start;
    out->data[start] = '\0';
  }
  return rc;
}

int dkim_sign(const dkim_key *k, const dkim_opts *o, const char *msg, size_t len, bytebuf *out, char *err,
              size_t errlen) {
  dkim_ctx c = {k, NULL, EVP_MD_CTX_new(), k->ed_tmpl, k->rsa_tmpl};
  int rc;
  if (c.md == NULL) {
    seterr(err, errlen, "out of memory");
    return -1;
  }
  rc = sign_with(&c, o, msg, len, out, err, errlen);
  EVP_MD_CTX_free(c.md);
  return rc;
}

static int make_templates(EVP_PKEY *pk, int ed25519, EVP_MD *sha256, EVP_MD_CTX **ed, EVP_PKEY_CTX **rsa);

dkim_ctx *dkim_ctx_new(const dkim_key *k, char *err, size_t errlen) {
  dkim_ctx *c = calloc(1, sizeof *c);
  char why[256];
  if (c == NULL) {
    seterr(err, errlen, "out of memory");
    return NULL;
  }
  c->k = k;
  if ((c->md = EVP_MD_CTX_new()) == NULL || (c->pkey = EVP_PKEY_dup(k->pkey)) == NULL ||
      make_templates(c->pkey, k->ed25519, k->sha256, &c->ed_tmpl, &c->rsa_tmpl) < 0)
    goto fail;
  return c;
fail:
  seterr(err, errlen, "signing context: %s", ssl_reason(why, sizeof why));
  dkim_ctx_free(c);
  return NULL;
}

void dkim_ctx_free(dkim_ctx *c) {
  if (c) {
    EVP_MD_CTX_free(c->md);
    EVP_MD_CTX_free(c->ed_tmpl);
    EVP_PKEY_CTX_free(c->rsa_tmpl);
    EVP_PKEY_free(c->pkey);
    free(c);
  }
}

int dkim_sign_ctx(dkim_ctx *c, const dkim_opts *o, const char *msg, size_t len, bytebuf *out, char *err,
                  size_t errlen) {
  return sign_with(c, o, msg, len, out, err, errlen);
}

/* ---------------------------------------------------------------- keys */

/* The signing templates for pk: DigestSign for Ed25519, or an RSA sign context with PKCS#1 v1.5
 * padding and SHA-256.  -1 on an OpenSSL failure (what was made is in *ed or *rsa, to free). */
static int make_templates(EVP_PKEY *pk, int ed25519, EVP_MD *sha256, EVP_MD_CTX **ed, EVP_PKEY_CTX **rsa) {
  if (ed25519)
    return (*ed = EVP_MD_CTX_new()) != NULL && EVP_DigestSignInit_ex(*ed, NULL, NULL, NULL, NULL, pk, NULL) == 1
               ? 0
               : -1;
  return (*rsa = EVP_PKEY_CTX_new_from_pkey(NULL, pk, NULL)) != NULL && EVP_PKEY_sign_init(*rsa) == 1 &&
                 EVP_PKEY_CTX_set_rsa_padding(*rsa, RSA_PKCS1_PADDING) == 1 &&
                 EVP_PKEY_CTX_set_signature_md(*rsa, sha256) == 1
             ? 0
             : -1;
}

/* Checks the type and size of pk and wraps it; pk is freed on failure. */
static dkim_key *key_wrap(EVP_PKEY *pk, const char *what, char *err, size_t errlen) {
  dkim_key *k;
  char why[256];
  int id = EVP_PKEY_get_base_id(pk), bits = EVP_PKEY_get_bits(pk);
  if (id == EVP_PKEY_RSA && (bits < DKIM_RSA_MIN_BITS || bits > DKIM_RSA_MAX_BITS)) {
    seterr(err, errlen, "%s: RSA key of %d bits (DKIM needs %d to %d, RFC 8301 §3.2)", what, bits,
           DKIM_RSA_MIN_BITS, DKIM_RSA_MAX_BITS);
    goto fail;
  }
  if (id != EVP_PKEY_RSA && id != EVP_PKEY_ED25519) {
    const char *t = EVP_PKEY_get0_type_name(pk);
    seterr(err, errlen, "%s: unsupported key type %s (DKIM signs with RSA or Ed25519)", what,
           t ? t : "unknown");
    goto fail;
  }
  if ((k = calloc(1, sizeof *k)) == NULL) {
    seterr(err, errlen, "%s: out of memory", what);
    goto fail;
  }
  k->pkey = pk;
  k->ed25519 = id == EVP_PKEY_ED25519;
  k->bits = bits;
  if ((k->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL)) == NULL ||
      make_templates(pk, k->ed25519, k->sha256, &k->ed_tmpl, &k->rsa_tmpl) < 0)
    goto ssl_fail;
  return k;
ssl_fail:
  seterr(err, errlen, "%s: %s", what, ssl_reason(why, sizeof why));
  dkim_key_free(k);
  return NULL;
fail:
  EVP_PKEY_free(pk);
  return NULL;
}

/* Passphrase callback: never prompt, remember that the key was encrypted. */
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
  (void)buf, (void)size, (void)rwflag;
  *(int *)u = 1;
  return -1;
}

dkim_key *dkim_key_load(const char *path, char *err, size_t errlen) {
  FILE *fp;
  char *data;
  size_t n = 0;
  int encrypted = 0, rerr;
  BIO *bio;
  EVP_PKEY *pk;

  if ((fp = fopen(path, "rb")) == NULL) {
    seterr(err, errlen, "%s: %s", path, strerror(errno));
    return NULL;
  }
  if ((data = malloc(DKIM_KEY_FILE_MAX + 1)) == NULL) {
    fclose(fp);
    seterr(err, errlen, "%s: out of memory", path);
    return NULL;
  }
  n = fread(data, 1, DKIM_KEY_FILE_MAX + 1, fp);
  rerr = ferror(fp) ? errno : 0;
  fclose(fp);
  if (rerr || n > DKIM_KEY_FILE_MAX || n == 0) {
    if (rerr)
      seterr(err, errlen, "%s: %s", path, strerror(rerr));
    else
      seterr(err, errlen, "%s: %s", path, n ? "too large for a key file" : "empty file");
    OPENSSL_cleanse(data, n);
    free(data);
    return NULL;
  }
  bio = BIO_new_mem_buf(data, (int)n);
  pk = bio ? PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, &encrypted) : NULL;
  BIO_free(bio);
  OPENSSL_cleanse(data, n);
  free(data);
  if (pk == NULL) {
    ERR_clear_error();
    if (encrypted)
      seterr(err, errlen,
             "%s: the private key is encrypted (store it unencrypted, readable only by the sender)", path);
    else
      seterr(err, errlen, "%s: no PEM private key in the file (want \"-----BEGIN PRIVATE KEY-----\")", path);
    return NULL;
  }
  return key_wrap(pk, path, err, errlen);
}

dkim_key *dkim_key_generate(const char *algorithm, int bits, char *err, size_t errlen) {
  EVP_PKEY *pk;
  char why[256];
  if (strcmp(algorithm, "rsa-sha256") == 0) {
    if (bits == 0) bits = 2048;
    if (bits < DKIM_RSA_MIN_BITS || bits > 4096) {
      seterr(err, errlen, "RSA keys of %d to 4096 bits, not %d", DKIM_RSA_MIN_BITS, bits);
      return NULL;
    }
    pk = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits);
  } else if (strcmp(algorithm, "ed25519-sha256") == 0) {
    if (bits != 0) {
      seterr(err, errlen, "Ed25519 keys have no size to choose");
      return NULL;
    }
    pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
  } else {
    seterr(err, errlen, "unknown algorithm '%s' (rsa-sha256 or ed25519-sha256)", algorithm);
    return NULL;
  }
  if (pk == NULL) {
    seterr(err, errlen, "key generation failed: %s", ssl_reason(why, sizeof why));
    return NULL;
  }
  return key_wrap(pk, "generated key", err, errlen);
}

void dkim_key_free(dkim_key *k) {
  if (k) {
    EVP_MD_CTX_free(k->ed_tmpl);
    EVP_PKEY_CTX_free(k->rsa_tmpl);
    EVP_MD_free(k->sha256);
    EVP_PKEY_free(k->pkey);
    free(k);
  }
}

const char *dkim_key_algorithm(const dkim_key *k) { return k->ed25519 ? "ed25519-sha256" : "rsa-sha256"; }

int dkim_key_bits(const dkim_key *k) { return k->bits; }

int dkim_key_public_record(const dkim_key *k, bytebuf *out) {
  size_t start = out->len;
  unsigned char raw[32], *der = NULL, *p;
  size_t rawlen = sizeof raw;
  int rc = -1, n;

  if (k->ed25519) {
    if (EVP_PKEY_get_raw_public_key(k->pkey, raw, &rawlen) == 1 &&
        bytebuf_append(out, "v=DKIM1; k=ed25519; p=", 22) == 0 &&
        bytebuf_base64_encode(out, raw, rawlen) == 0)
      rc = 0;
  } else if ((n = i2d_PUBKEY(k->pkey, NULL)) > 0 && (der = p = malloc((size_t)n)) != NULL &&
             i2d_PUBKEY(k->pkey, &p) == n) {
    if (bytebuf_append(out, "v=DKIM1; k=rsa; p=", 18) == 0 && bytebuf_base64_encode(out, der, (size_t)n) == 0)
      rc = 0;
  }
  free(der);
  ERR_clear_error();
  if (rc < 0 && out->data) {
    out->len = start;
    out->data[start] = '\0';
  }
  return rc;
}

int dkim_key_private_pem(const dkim_key *k, bytebuf *out) {
  BIO *bio = BIO_new(BIO_s_secmem()); /* wiped when freed */
  char *p;
  long n;
  int rc = -1;
  if (bio && PEM_write_bio_PrivateKey(bio, k->pkey, NULL, NULL, 0, NULL, NULL) == 1 &&
      (n = BIO_get_mem_data(bio, &p)) > 0 && bytebuf_append(out, p, (size_t)n) == 0)
    rc = 0;
  BIO_free(bio);
  ERR_clear_error();
  return rc;
}
