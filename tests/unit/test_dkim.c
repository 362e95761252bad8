/* test_dkim.c - DKIM signing (src/dkim.c): canonicalization against RFC 6376's own example, body
 * hashes of empty and blank-tailed bodies, signatures checked with OpenSSL against the published
 * key record, header selection (bottom up, From over-signed), folding, key loading errors, and the
 * signing rate (printed, not asserted). */
#include "check.h"
#include "dkim.h"

#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

static char dir[] = "/tmp/mailshot-test-dkim-XXXXXX";
static char err[512];

/* ---------------------------------------------------------------- helpers */

static const char *dkim_path (const char *name)
{
  static char buf[4][256];
  static int i;
  i = (i + 1) % 4;
  snprintf(buf[i], sizeof buf[i], "%s/%s", dir, name);
  return buf[i];
}

static void dkim_write (const char *path, const void *data, size_t len)
{
  FILE *f = fopen(path, "wb");
  if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
    perror(path);
    exit(2);
  }
}

/* canonical form of a header field / body as a fresh NUL-terminated string (static, 2 slots) */
static const char *dkim_ch (dkim_canon c, const char *field)
{
  static bytebuf b[2];
  static int i;
  i ^= 1;
  b[i].len = 0;
  if (b[i].data)
    b[i].data[0] = '\0';
  if (dkim_canon_header(c, field, strlen(field), &b[i]) < 0)
    return "(out of memory)";
  return b[i].data;
}

static const char *dkim_cb (dkim_canon c, const char *body)
{
  static bytebuf b[2];
  static int i;
  i ^= 1;
  b[i].len = 0;
  if (b[i].data)
    b[i].data[0] = '\0';
  if (dkim_canon_body(c, body, strlen(body), &b[i]) < 0)
    return "(out of memory)";
  return b[i].data;
}

static void dkim_b64 (const unsigned char *in, size_t n, char *out)
{
  EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

static void dkim_sha256_b64 (const char *data, size_t n, char *out)
{
  unsigned char md[32];
  unsigned int mdlen = 0;
  EVP_Digest(data, n, md, &mdlen, EVP_sha256(), NULL);
  dkim_b64(md, mdlen, out);
}

/* The value of tag name in a DKIM-Signature field, FWS removed (static). */
static const char *dkim_tag (const char *hdr, const char *name)
{
  static char val[2048];
  size_t nl = strlen(name), n = 0;
  const char *p = strchr(hdr, ':') + 1;
  while (*p) {
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n') p++;
    if (strncmp(p, name, nl) == 0 && p[nl] == '=') {
      for (p += nl + 1; *p && *p != ';' && n + 1 < sizeof val; p++)
        if (*p != ' ' && *p != '\t' && *p != '\r' && *p != '\n')
          val[n++] = *p;
      val[n] = '\0';
      return val;
    }
    p = strchr(p, ';');
    if (!p)
      break;
    p++;
  }
  return NULL;
}

/* A public key from a "v=DKIM1; k=...; p=..." record, as a verifier gets it from DNS. */
static EVP_PKEY *dkim_pub_from_record (const char *rec)
{
  const char *p = strstr(rec, "p=");
  unsigned char der[2048];
  const unsigned char *q = der;
  int n;
  if (!p)
    return NULL;
  n = EVP_DecodeBlock(der, (const unsigned char *)p + 2, (int)strlen(p + 2));
  if (n < 0)
    return NULL;
  n -= (int)(strlen(p + 2) - strcspn(p + 2, "=")) ;   /* DecodeBlock counts padding as zeros */
  if (strstr(rec, "k=ed25519"))
    return n == 32 ? EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, der, 32) : NULL;
  return d2i_PUBKEY(NULL, &q, n);
}

/* Verifies b= of hdr over data (the canonical signed fields, then hdr's own canonical form with
 * b= empty) with the key published in rec; 1 when the signature holds. */
static int dkim_verify_with (const char *rec, const char *hdr, const char *data, size_t datalen)
{
  unsigned char sig[1024], md[32];
  unsigned int mdlen = 0;
  const char *b = dkim_tag(hdr, "b");
  EVP_PKEY *pk = dkim_pub_from_record(rec);
  EVP_MD_CTX *mc = EVP_MD_CTX_new();
  int n, ok = 0, pad;
  if (!pk || !b || !mc)
    goto done;
  pad = (int)(strlen(b) - strcspn(b, "="));
  n = EVP_DecodeBlock(sig, (const unsigned char *)b, (int)strlen(b)) - pad;
  if (strstr(rec, "k=ed25519")) {   /* RFC 8463: Ed25519 over the SHA-256 of the data */
    EVP_Digest(data, datalen, md, &mdlen, EVP_sha256(), NULL);
    ok = EVP_DigestVerifyInit_ex(mc, NULL, NULL, NULL, NULL, pk, NULL) == 1 &&
         EVP_DigestVerify(mc, sig, (size_t)n, md, mdlen) == 1;
  } else {
    ok = EVP_DigestVerifyInit(mc, NULL, EVP_sha256(), NULL, pk) == 1 &&
         EVP_DigestVerify(mc, sig, (size_t)n, (const unsigned char *)data, datalen) == 1;
  }
done:
  EVP_MD_CTX_free(mc);
  EVP_PKEY_free(pk);
  return ok;
}

/* hdr with the value of b= removed (what a verifier hashes), canonicalized without CRLF. */
static void dkim_unsigned_header (dkim_canon c, const char *hdr, bytebuf *out)
{
  const char *b = strstr(hdr, " b=");
  bytebuf tmp = { 0 };
  if (!b)
    b = strstr(hdr, "\n b=");
  bytebuf_append(&tmp, hdr, (size_t)(strstr(b, "b=") + 2 - hdr));
  dkim_canon_header(c, tmp.data, tmp.len, out);
  out->len -= 2;   /* the field being verified is hashed without its CRLF (§3.7) */
  out->data[out->len] = '\0';
  bytebuf_free(&tmp);
}

static dkim_key *dkim_new_key (const char *alg, const char *file)
{
  dkim_key *k = dkim_key_generate(alg, 0, err, sizeof err), *k2;
  bytebuf pem = { 0 };
  if (!k) {
    fprintf(stderr, "keygen: %s\n", err);
    exit(2);
  }
  CHECK(dkim_key_private_pem(k, &pem) == 0);
  CHECK(strncmp(pem.data, "-----BEGIN PRIVATE KEY-----", 27) == 0);
  dkim_write(dkim_path(file), pem.data, pem.len);
  bytebuf_free(&pem);
  dkim_key_free(k);
  k2 = dkim_key_load(dkim_path(file), err, sizeof err);   /* the round trip through a file */
  CHECK(k2 != NULL);
  if (!k2) {
    fprintf(stderr, "load: %s\n", err);
    exit(2);
  }
  return k2;
}

/* ---------------------------------------------------------------- canonicalization */

/* RFC 6376 §3.4.5, the example of both algorithms */
static void dkim_test_rfc_example (void)
{
  CHECK_STR(dkim_ch(DKIM_RELAXED, "A: X\r\n"), "a:X\r\n");
  CHECK_STR(dkim_ch(DKIM_RELAXED, "B : Y\t\r\n\tZ  \r\n"), "b:Y Z\r\n");
  CHECK_STR(dkim_ch(DKIM_SIMPLE, "A: X\r\n"), "A: X\r\n");
  CHECK_STR(dkim_ch(DKIM_SIMPLE, "B : Y\t\r\n\tZ  \r\n"), "B : Y\t\r\n\tZ  \r\n");
  CHECK_STR(dkim_cb(DKIM_RELAXED, " C \r\nD \t E\r\n\r\n\r\n"), " C\r\nD E\r\n");
  CHECK_STR(dkim_cb(DKIM_SIMPLE, " C \r\nD \t E\r\n\r\n\r\n"), " C \r\nD \t E\r\n");
}

static void dkim_test_header_canon (void)
{
  /* the final line break is optional, LF and bare CR are line breaks too */
  CHECK_STR(dkim_ch(DKIM_RELAXED, "Subject:  Hello   World  "), "subject:Hello World\r\n");
  CHECK_STR(dkim_ch(DKIM_RELAXED, "SUBJECT:\n folded\n\tthrice\n  x"), "subject:folded thrice x\r\n");
  CHECK_STR(dkim_ch(DKIM_SIMPLE, "Subject: a\n b\n"), "Subject: a\r\n b\r\n");
  CHECK_STR(dkim_ch(DKIM_SIMPLE, "Subject: a\r b"), "Subject: a\r\n b\r\n");
  CHECK_STR(dkim_ch(DKIM_RELAXED, "X-Empty:"), "x-empty:\r\n");
  CHECK_STR(dkim_ch(DKIM_RELAXED, "X-Empty:   \r\n  "), "x-empty:\r\n");
  /* 8-bit bytes (RFC 6532) pass untouched; only ASCII letters are lowered in the name */
  CHECK_STR(dkim_ch(DKIM_RELAXED, "Subject: \xc3\xa9t\xc3\xa9"), "subject:\xc3\xa9t\xc3\xa9\r\n");
  CHECK_STR(dkim_ch(DKIM_RELAXED, "Subject: =?UTF-8?B?w6l0w6k=?=\r\n =?UTF-8?B?w6k=?="),
            "subject:=?UTF-8?B?w6l0w6k=?= =?UTF-8?B?w6k=?=\r\n");
}

static void dkim_test_body_canon (void)
{
  /* RFC 6376 §3.4.3: an empty body is CRLF for simple; §3.4.4: empty for relaxed */
  CHECK_STR(dkim_cb(DKIM_SIMPLE, ""), "\r\n");
  CHECK_STR(dkim_cb(DKIM_RELAXED, ""), "");
  CHECK_STR(dkim_cb(DKIM_SIMPLE, "\r\n\r\n\r\n"), "\r\n");
  CHECK_STR(dkim_cb(DKIM_RELAXED, "\r\n\r\n\r\n"), "");
  CHECK_STR(dkim_cb(DKIM_RELAXED, " \t \r\n  \r\n"), "");           /* WSP-only lines are empty */
  CHECK_STR(dkim_cb(DKIM_SIMPLE, " \t \r\n  \r\n"), " \t \r\n  \r\n"); /* ... but not for simple */
  /* trailing blank lines go, inner ones stay */
  CHECK_STR(dkim_cb(DKIM_SIMPLE, "a\r\n\r\nb\r\n\r\n\r\n"), "a\r\n\r\nb\r\n");
  CHECK_STR(dkim_cb(DKIM_RELAXED, "a\r\n  \r\nb\r\n \r\n\t\r\n"), "a\r\n\r\nb\r\n");
  /* a last line without a line break gets one */
  CHECK_STR(dkim_cb(DKIM_SIMPLE, "abc"), "abc\r\n");
  CHECK_STR(dkim_cb(DKIM_RELAXED, "abc  "), "abc\r\n");
  /* LF and bare CR count as CRLF, as smtp_dot_stuff will send them */
  CHECK_STR(dkim_cb(DKIM_SIMPLE, "a\nb\rc\r\n\n"), "a\r\nb\r\nc\r\n");
  CHECK_STR(dkim_cb(DKIM_RELAXED, "  lead\tand  inner \t\n"), " lead and inner\r\n");
  /* a dot at the start of a line is the message's own (dot-stuffing is the transport's) */
  CHECK_STR(dkim_cb(DKIM_SIMPLE, ".\r\n..x\r\n"), ".\r\n..x\r\n");
}

/* bh= of a signed message is the base64 SHA-256 of the canonical body */
static void dkim_test_body_hashes (dkim_key *k)
{
  static const struct { dkim_canon c; const char *body, *bh; } cases[] = {
    { DKIM_RELAXED, "", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" },   /* SHA-256("") */
    { DKIM_SIMPLE, "", "frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=" },    /* SHA-256("\r\n") */
    { DKIM_RELAXED, "\r\n\r\n", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" },
    { DKIM_SIMPLE, "\r\n\r\n", "frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=" },
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char msg[256];
    bytebuf out = { 0 };
    dkim_opts o = { "acme.example", "s1", NULL, DKIM_RELAXED, cases[i].c, 0, 0 };
    snprintf(msg, sizeof msg, "From: a@acme.example\r\n\r\n%s", cases[i].body);
    CHECK(dkim_sign(k, &o, msg, strlen(msg), &out, err, sizeof err) == 0);
    CHECK_STR(dkim_tag(out.data ? out.data : ":", "bh"), cases[i].bh);
    bytebuf_free(&out);
  }
  /* a message without a blank line has an empty body */
  {
    bytebuf out = { 0 };
    dkim_opts o = { "acme.example", "s1", NULL, DKIM_RELAXED, DKIM_RELAXED, 0, 0 };
    CHECK(dkim_sign(k, &o, "From: a@acme.example", 20, &out, err, sizeof err) == 0);
    CHECK_STR(dkim_tag(out.data ? out.data : ":", "bh"), "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
    bytebuf_free(&out);
  }
}

/* ---------------------------------------------------------------- signatures */

static const char dkim_msg[] =
  "Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
  "From: \"A. Sender\" <a@acme.example>\r\n"
  "To: b@example.net,\r\n"
  "  c@example.net\r\n"
  "Subject: =?UTF-8?Q?caf=C3=A9?=   menu\r\n"
  "X-Tag: first\r\n"
  "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
  "X-Tag: second\r\n"
  "Message-ID: <1@acme.example>\r\n"
  "\r\n"
  "Hello   there, \t\r\n"
  "\r\n"
  ".a line starting with a dot\r\n"
  "\r\n\r\n";

/* Signs dkim_msg, then checks b= with OpenSSL over the data a verifier would hash, rebuilt here
 * from the canonical fields in the expected order. */
static void dkim_test_sign_verify (dkim_key *k, dkim_canon hc, dkim_canon bc)
{
  static const char *const hdrs[] = { "subject", "x-tag", "from", "to", "X-TAG", "cc", NULL };
  dkim_opts o = { "acme.example", "sel-1", hdrs, hc, bc, 1700000000, 1700086400 };
  bytebuf out = { 0 }, data = { 0 }, rec = { 0 }, body = { 0 };
  const char *body_start = strstr(dkim_msg, "\r\n\r\n") + 4;
  char bh[64];

  CHECK(dkim_sign(k, &o, dkim_msg, sizeof dkim_msg - 1, &out, err, sizeof err) == 0);
  CHECK(dkim_key_public_record(k, &rec) == 0);
  if (!out.data || !rec.data) {
    fprintf(stderr, "sign: %s\n", err);
    return;
  }
  /* h=: the list's order, duplicates once, each name as often as it occurs, From once more */
  CHECK_STR(dkim_tag(out.data, "h"), "subject:x-tag:x-tag:from:from:to");
  CHECK_STR(dkim_tag(out.data, "a"), dkim_key_algorithm(k));
  CHECK_STR(dkim_tag(out.data, "c"), hc == DKIM_RELAXED ? (bc == DKIM_RELAXED ? "relaxed/relaxed" : "relaxed/simple")
                                                      : (bc == DKIM_RELAXED ? "simple/relaxed" : "simple/simple"));
  CHECK_STR(dkim_tag(out.data, "d"), "acme.example");
  CHECK_STR(dkim_tag(out.data, "s"), "sel-1");
  CHECK_STR(dkim_tag(out.data, "t"), "1700000000");
  CHECK_STR(dkim_tag(out.data, "x"), "1700086400");
  CHECK(dkim_tag(out.data, "l") == NULL);

  dkim_canon_body(bc, body_start, strlen(body_start), &body);
  dkim_sha256_b64(body.data, body.len, bh);
  CHECK_STR(dkim_tag(out.data, "bh"), bh);

  /* the signed data: fields bottom up, the extra From matching nothing, then the field itself */
  dkim_canon_header(hc, "Subject: =?UTF-8?Q?caf=C3=A9?=   menu\r\n", strlen("Subject: =?UTF-8?Q?caf=C3=A9?=   menu\r\n"), &data);
  dkim_canon_header(hc, "X-Tag: second\r\n", strlen("X-Tag: second\r\n"), &data);
  dkim_canon_header(hc, "X-Tag: first\r\n", strlen("X-Tag: first\r\n"), &data);
  dkim_canon_header(hc, "From: \"A. Sender\" <a@acme.example>\r\n", strlen("From: \"A. Sender\" <a@acme.example>\r\n"), &data);
  dkim_canon_header(hc, "To: b@example.net,\r\n  c@example.net\r\n", strlen("To: b@example.net,\r\n  c@example.net\r\n"), &data);
  dkim_unsigned_header(hc, out.data, &data);
  CHECK(dkim_verify_with(rec.data, out.data, data.data, data.len));

  /* and a changed byte in the signed data does not verify */
  data.data[3] ^= 1;
  CHECK(!dkim_verify_with(rec.data, out.data, data.data, data.len));

  bytebuf_free(&out);
  bytebuf_free(&data);
  bytebuf_free(&rec);
  bytebuf_free(&body);
}

/* The field: lines at most 78 columns, continuation lines start with SP, CRLF at the end only
 * once, b= last; a LF message gives the same field as its CRLF form. */
static void dkim_test_fold (dkim_key *k)
{
  static const char *const many[] = { "from", "to", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post",
    "reply-to", "cc", "x-a-rather-long-header-name-that-takes-room", NULL };
  const char *lfmsg =
    "From: a@acme.example\nTo: b@example.net\nSubject: hi\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
    "Message-ID: <1@acme.example>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\nList-Unsubscribe: <mailto:u@acme.example>\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\nReply-To: r@acme.example\nCc: c@example.net\n"
    "X-A-Rather-Long-Header-Name-That-Takes-Room: 1\n\nbody\n";
  dkim_opts o = { "a-long-subdomain.of-a-long-domain-name.acme.example", "selector2024", many,
                  DKIM_RELAXED, DKIM_RELAXED, 1700000000, 0 };
  bytebuf out = { 0 }, crlf = { 0 }, out2 = { 0 };
  size_t col = 0, lines = 0, bad = 0;

  CHECK(dkim_sign(k, &o, lfmsg, strlen(lfmsg), &out, err, sizeof err) == 0);
  if (!out.data)
    return;
  CHECK(strncmp(out.data, "DKIM-Signature: v=1; ", 21) == 0);
  for (size_t i = 0; i < out.len; i++) {   /* every line: CRLF-terminated, not too long */
    if (out.data[i] == '\r' && out.data[i + 1] == '\n') {
      bad += col > DKIM_FOLD_COLUMN || (i + 2 < out.len && out.data[i + 2] != ' ');
      col = 0;
      lines++;
      i++;
    } else {
      bad += out.data[i] == '\r' || out.data[i] == '\n';
      col++;
    }
  }
  CHECK_INT(bad, 0);
  CHECK(out.len >= 2 && out.data[out.len - 2] == '\r' && out.data[out.len - 1] == '\n');
  CHECK(lines >= 5);
  CHECK(strstr(out.data, "; b=") || strstr(out.data, "\r\n b="));
  CHECK(dkim_tag(out.data, "h") && strstr(dkim_tag(out.data, "h"), "from:from:to:subject:"));

  CHECK(bytebuf_crlf(&crlf, lfmsg, strlen(lfmsg), 0) == 0);
  CHECK(strstr(crlf.data, "\n\n") == NULL && strstr(crlf.data, "\r\n\r\nbody\r\n"));
  CHECK(dkim_sign(k, &o, crlf.data, crlf.len, &out2, err, sizeof err) == 0);
  if (k && strcmp(dkim_key_algorithm(k), "ed25519-sha256") == 0)   /* deterministic signatures */
    CHECK_STR(out2.data, out.data);
  else
    CHECK_STR(dkim_tag(out2.data, "bh"), dkim_tag(out.data, "bh"));
  bytebuf_free(&out);
  bytebuf_free(&out2);
  bytebuf_free(&crlf);
}

static void dkim_test_default_headers (dkim_key *k)
{
  const char *msg = "Subject: s\r\nFrom: a@acme.example\r\nX-Other: 1\r\nList-Unsubscribe: <u>\r\n"
                    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nTo: b@example.net\r\n\r\nx\r\n";
  dkim_opts o = { "acme.example", "s1", NULL, DKIM_RELAXED, DKIM_RELAXED, 0, 0 };
  bytebuf out = { 0 };
  CHECK(dkim_sign(k, &o, msg, strlen(msg), &out, err, sizeof err) == 0);
  CHECK_STR(out.data ? dkim_tag(out.data, "h") : "", "from:from:to:subject:list-unsubscribe:list-unsubscribe-post");
  CHECK(out.data && dkim_tag(out.data, "t") == NULL && dkim_tag(out.data, "x") == NULL);
  bytebuf_free(&out);
}

/* past the 64 fields kept on the stack: every one of 100 fields signed, in h= once each */
static void dkim_test_many_fields (dkim_key *k)
{
  static const char *const hdrs[] = { "x-n", NULL };
  dkim_opts o = { "acme.example", "s1", hdrs, DKIM_RELAXED, DKIM_RELAXED, 0, 0 };
  bytebuf msg = { 0 }, out = { 0 };
  const char *h;
  size_t n = 0;
  for (int i = 0; i < 100; i++)
    bytebuf_printf(&msg, "X-N: %d\r\n", i);
  bytebuf_printf(&msg, "From: a@acme.example\r\n\r\nbody\r\n");
  CHECK(dkim_sign(k, &o, msg.data, msg.len, &out, err, sizeof err) == 0);
  h = out.data ? dkim_tag(out.data, "h") : NULL;
  CHECK(h != NULL);
  for (const char *p = h; p && (p = strstr(p, "x-n")) != NULL; p += 3)
    n++;
  CHECK_INT(n, 100);
  CHECK(h && strncmp(h, "from:from:x-n:", 14) == 0);
  bytebuf_free(&msg);
  bytebuf_free(&out);
}

static void dkim_test_errors (dkim_key *k)
{
  bytebuf out = { 0 };
  dkim_opts o = { "acme.example", "s1", NULL, DKIM_RELAXED, DKIM_RELAXED, 0, 0 };
  static const char *const badh[] = { "from", "x;y", NULL };

  bytebuf_append(&out, "kept", 4);   /* a failure leaves out as it was */
  CHECK(dkim_sign(k, &o, "To: b@x\r\n\r\nhi\r\n", 15, &out, err, sizeof err) == -1);
  CHECK(strstr(err, "no From:") != NULL);
  CHECK(dkim_sign(k, &o, "From: a@x\r\nnot a header\r\n\r\n", 26, &out, err, sizeof err) == -1);
  CHECK(strstr(err, "header line 2") != NULL);
  CHECK(dkim_sign(k, &o, " From: a@x\r\n\r\n", 14, &out, err, sizeof err) == -1);
  CHECK(dkim_sign(k, &o, ": x\r\nFrom: a@x\r\n\r\n", 18, &out, err, sizeof err) == -1);
  CHECK(dkim_sign(k, &o, "", 0, &out, err, sizeof err) == -1);
  CHECK_INT(out.len, 4);
  CHECK_STR(out.data, "kept");

  o.domain = "bad domain";
  CHECK(dkim_sign(k, &o, "From: a@x\r\n\r\n", 13, &out, err, sizeof err) == -1);
  CHECK(strstr(err, "invalid domain") != NULL);
  o.domain = "acme..example";
  CHECK(dkim_opts_check(&o, err, sizeof err) == -1);
  o.domain = "acme.example";
  o.selector = "s1;x=1";
  CHECK(dkim_opts_check(&o, err, sizeof err) == -1);
  o.selector = "";
  CHECK(dkim_opts_check(&o, err, sizeof err) == -1);
  o.selector = "s1";
  o.headers = badh;
  CHECK(dkim_opts_check(&o, err, sizeof err) == -1);
  o.headers = NULL;
  o.timestamp = 100, o.expire = 100;
  CHECK(dkim_opts_check(&o, err, sizeof err) == -1);
  o.expire = 101;
  CHECK(dkim_opts_check(&o, err, sizeof err) == 0);

  dkim_canon h = DKIM_SIMPLE, b = DKIM_RELAXED;
  CHECK(dkim_parse_canon("relaxed/relaxed", &h, &b) == 0 && h == DKIM_RELAXED && b == DKIM_RELAXED);
  CHECK(dkim_parse_canon("simple/relaxed", &h, &b) == 0 && h == DKIM_SIMPLE && b == DKIM_RELAXED);
  CHECK(dkim_parse_canon("relaxed", &h, &b) == 0 && h == DKIM_RELAXED && b == DKIM_SIMPLE);
  CHECK(dkim_parse_canon("relaxed/", &h, &b) == -1);
  CHECK(dkim_parse_canon("Relaxed/simple", &h, &b) == -1);
  CHECK(dkim_parse_canon("nofws", &h, &b) == -1);
  bytebuf_free(&out);
}

static void dkim_write_pkey (const char *file, EVP_PKEY *pk, const EVP_CIPHER *enc)
{
  FILE *f = fopen(dkim_path(file), "w");
  if (!f || !pk || PEM_write_PrivateKey(f, pk, enc, NULL, 0, NULL, (void *)"secret") != 1 || fclose(f) != 0) {
    fprintf(stderr, "cannot write %s\n", file);
    exit(2);
  }
  EVP_PKEY_free(pk);
}

static void dkim_test_key_load (void)
{
  dkim_key *k;
  k = dkim_key_load(dkim_path("missing.pem"), err, sizeof err);
  CHECK(k == NULL && strstr(err, "missing.pem: No such file or directory"));
  k = dkim_key_load(dir, err, sizeof err);
  CHECK(k == NULL && strstr(err, "Is a directory"));
  dkim_write(dkim_path("empty.pem"), "", 0);
  k = dkim_key_load(dkim_path("empty.pem"), err, sizeof err);
  CHECK(k == NULL && strstr(err, "empty file"));
  dkim_write(dkim_path("junk.pem"), "hello\n", 6);
  k = dkim_key_load(dkim_path("junk.pem"), err, sizeof err);
  CHECK(k == NULL && strstr(err, "no PEM private key"));

  /* a public key is not a private key */
  {
    EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    FILE *f = fopen(dkim_path("pub.pem"), "w");
    CHECK(f && PEM_write_PUBKEY(f, pk) == 1);
    if (f)
      fclose(f);
    EVP_PKEY_free(pk);
    k = dkim_key_load(dkim_path("pub.pem"), err, sizeof err);
    CHECK(k == NULL && strstr(err, "no PEM private key"));
  }
  dkim_write_pkey("ec.pem", EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256"), NULL);
  k = dkim_key_load(dkim_path("ec.pem"), err, sizeof err);
  CHECK(k == NULL && strstr(err, "unsupported key type EC (DKIM signs with RSA or Ed25519)"));
  dkim_write_pkey("small.pem", EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)768), NULL);
  k = dkim_key_load(dkim_path("small.pem"), err, sizeof err);
  CHECK(k == NULL && strstr(err, "RSA key of 768 bits"));
  dkim_write_pkey("enc.pem", EVP_PKEY_Q_keygen(NULL, NULL, "ED25519"), EVP_aes_128_cbc());
  k = dkim_key_load(dkim_path("enc.pem"), err, sizeof err);
  CHECK(k == NULL && strstr(err, "encrypted"));
  /* a PKCS#1 "RSA PRIVATE KEY" loads too */
  {
    EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    FILE *f = fopen(dkim_path("pkcs1.pem"), "w");
    CHECK(f && PEM_write_PrivateKey_ex(f, pk, NULL, NULL, 0, NULL, NULL, NULL, "type-specific") == 1);
    if (f)
      fclose(f);
    EVP_PKEY_free(pk);
    k = dkim_key_load(dkim_path("pkcs1.pem"), err, sizeof err);
    CHECK(k != NULL);
    if (k) {
      CHECK_STR(dkim_key_algorithm(k), "rsa-sha256");
      CHECK_INT(dkim_key_bits(k), 1024);
    }
    dkim_key_free(k);
  }
  CHECK(dkim_key_generate("rsa-sha1", 0, err, sizeof err) == NULL && strstr(err, "unknown algorithm"));
  CHECK(dkim_key_generate("rsa-sha256", 512, err, sizeof err) == NULL);
  CHECK(dkim_key_generate("ed25519-sha256", 2048, err, sizeof err) == NULL);
}

static void dkim_test_records (dkim_key *rsa, dkim_key *ed)
{
  bytebuf r = { 0 }, e = { 0 };
  CHECK(dkim_key_public_record(rsa, &r) == 0 && strncmp(r.data, "v=DKIM1; k=rsa; p=MIIBIjAN", 26) == 0);
  CHECK(dkim_key_public_record(ed, &e) == 0 && strncmp(e.data, "v=DKIM1; k=ed25519; p=", 22) == 0);
  CHECK_INT(e.len, 22 + 44);   /* RFC 8463 §4.2: the bare 32-byte key, not the SPKI */
  CHECK_INT(dkim_key_bits(rsa), 2048);
  CHECK_STR(dkim_key_algorithm(ed), "ed25519-sha256");
  bytebuf_free(&r);
  bytebuf_free(&e);
}

/* ---------------------------------------------------------------- rate */

static double dkim_now (void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void dkim_rate (dkim_key *k)
{
  char msg[2048];
  size_t n = (size_t)snprintf(msg, sizeof msg,
    "From: \"Acme\" <news@acme.example>\r\nTo: someone@example.net\r\nSubject: November news\r\n"
    "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <123.456@acme.example>\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "List-Unsubscribe: <https://acme.example/u/123>\r\n\r\n");
  dkim_opts o = { "acme.example", "s1", NULL, DKIM_RELAXED, DKIM_RELAXED, 1700000000, 0 };
  bytebuf out = { 0 };
  double t0, t;
  long count = 0;
  while (n < sizeof msg - 1) {   /* a 2 KB message: lines of text to fill it */
    static const char line[] = "Lorem ipsum dolor sit amet,  consectetur adipiscing elit, sed do eiusmod.\r\n";
    size_t l = sizeof line - 1 < sizeof msg - 1 - n ? sizeof line - 1 : sizeof msg - 1 - n;
    memcpy(msg + n, line, l);
    n += l;
  }
  t0 = dkim_now();
  do {
    for (int i = 0; i < 50; i++) {
      out.len = 0;
      if (dkim_sign(k, &o, msg, n, &out, err, sizeof err) < 0) {
        CHECK(0);
        goto done;
      }
      count++;
    }
    t = dkim_now() - t0;
  } while (t < 0.5);
  printf("dkim sign rate, %s (%d bits), %zu-byte message: %.0f messages/s (%.1f us each)\n",
         dkim_key_algorithm(k), dkim_key_bits(k), n, (double)count / t, t / (double)count * 1e6);
done:
  bytebuf_free(&out);
}

/* A dkim_ctx (one per signing thread, its own copy of the key) signs the same bytes as the key
 * itself, message after message (its digest context is reused). */
static void dkim_test_ctx (dkim_key *k)
{
  dkim_opts o = { "acme.example", "s1", NULL, DKIM_RELAXED, DKIM_RELAXED, 1700000000, 0 };
  dkim_ctx *c = dkim_ctx_new(k, err, sizeof err);
  bytebuf a = { 0 }, b = { 0 };
  CHECK(c != NULL);
  if (!c)
    return;
  for (int i = 0; i < 3; i++) {
    a.len = b.len = 0;
    o.timestamp = 1700000000 + i;
    CHECK(dkim_sign(k, &o, dkim_msg, sizeof dkim_msg - 1 - (size_t)i, &a, err, sizeof err) == 0);
    CHECK(dkim_sign_ctx(c, &o, dkim_msg, sizeof dkim_msg - 1 - (size_t)i, &b, err, sizeof err) == 0);
    CHECK(a.len > 0 && a.len == b.len && memcmp(a.data, b.data, a.len) == 0);
  }
  a.len = 0;
  CHECK(dkim_sign_ctx(c, &o, "Subject: x\r\n\r\n", 15, &a, err, sizeof err) == -1);   /* no From: */
  CHECK(strstr(err, "no From:") != NULL);
  dkim_ctx_free(c);
  bytebuf_free(&a);
  bytebuf_free(&b);
}

int main (void)
{
  dkim_key *rsa, *ed;
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 2;
  }
  rsa = dkim_new_key("rsa-sha256", "rsa.pem");
  ed = dkim_new_key("ed25519-sha256", "ed.pem");

  dkim_test_rfc_example();
  dkim_test_header_canon();
  dkim_test_body_canon();
  dkim_test_body_hashes(rsa);
  dkim_test_body_hashes(ed);
  for (int hc = 0; hc < 2; hc++)
    for (int bc = 0; bc < 2; bc++) {
      dkim_test_sign_verify(rsa, (dkim_canon)hc, (dkim_canon)bc);
      dkim_test_sign_verify(ed, (dkim_canon)hc, (dkim_canon)bc);
    }
  dkim_test_fold(rsa);
  dkim_test_fold(ed);
  dkim_test_default_headers(ed);
  dkim_test_many_fields(ed);
  dkim_test_errors(ed);
  dkim_test_key_load();
  dkim_test_records(rsa, ed);
  dkim_test_ctx(rsa);
  dkim_test_ctx(ed);
  dkim_rate(rsa);
  dkim_rate(ed);

  dkim_key_free(rsa);
  dkim_key_free(ed);
  {
    static const char *const files[] = { "rsa.pem", "ed.pem", "empty.pem", "junk.pem", "pub.pem", "ec.pem",
                                         "small.pem", "enc.pem", "pkcs1.pem", NULL };
    for (int i = 0; files[i]; i++)
      unlink(dkim_path(files[i]));
    rmdir(dir);
  }
  return DONE();
}
