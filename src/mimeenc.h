/* mimeenc.h - the MIME encodings mime.lua applies to every message, written into a bytebuf:
 * quoted-printable bodies (RFC 2045 6.7), base64 in lines (RFC 2045 6.8) and RFC 2047 encoded-words
 * for header text.  Their output is byte for byte what mime.lua's Lua versions of them wrote (the
 * tests compare the two on random input).  No I/O, no global state.  Each returns 0, or -1 on
 * ENOMEM with out as it was before the call. */
#ifndef MAILSHOT_MIMEENC_H
#define MAILSHOT_MIMEENC_H
#include <stddef.h>

#include "bytebuf.h"

#define MIMEENC_QP_LINE 76      /* RFC 2045 6.7 (5): encoded lines at most 76 characters */
#define MIMEENC_B64_LINE 76     /* RFC 2045 6.8 */
#define MIMEENC_WORD_MAX 75     /* RFC 2047 2: an encoded-word is at most 75 characters */

/* Quoted-printable of s: every line break of s (CRLF, lone CR, lone LF) a CRLF; bytes other than
 * printable ASCII, tab and space, and "=", as =XX; a space or tab ending a line as =20 / =09; a line
 * over 76 characters cut by soft breaks ("=" CRLF) after at most 75, never inside an =XX. */
int mimeenc_qp(bytebuf *out, const char *s, size_t n);

/* base64 of s in lines of 76 characters joined by CRLF (no CRLF after the last line). */
int mimeenc_base64_lines(bytebuf *out, const void *s, size_t n);

/* RFC 2047 encoded-words (charset UTF-8, Q or B, whichever makes s shorter) for s, separated by one
 * space: the first word at most `first` characters, the others at most 75.  A word never ends inside
 * a UTF-8 sequence (a lead byte and up to three continuation bytes stay together); a full word ends
 * after the last space in it when it has one.  Nothing for an empty s. */
int mimeenc_words(bytebuf *out, const char *s, size_t n, size_t first);

#define MIMEENC_FOLD_AT 78      /* RFC 5322 2.1.1: header lines SHOULD stay within 78 characters */
#define MIMEENC_MAX_LINE 998    /* RFC 5322 2.1.1: and MUST within 998 */
#define MIMEENC_LONG_WORD 70    /* a plain word longer than this is encoded (it could not be folded) */

/* A header value as data (mime.header_text): each run of CR, LF and NUL, with the blanks (space, tab)
 * around it, becomes one space, so no value can start a header line of its own; then leading and
 * trailing blanks go, and each byte that does not start a valid UTF-8 character (as Lua's utf8.len
 * decodes: no overlong forms, surrogates or code points over U+10FFFF) becomes U+FFFD.  Returns 0 when
 * the result is s[*a, *b) (nothing written: the usual case), 1 when it was written to out, -1 on
 * ENOMEM. */
int mimeenc_header_text(bytebuf *out, const char *s, size_t n, size_t *a, size_t *b);

/* Must header text s go as encoded-words: a byte that is not printable ASCII or tab, an "=?" (a reader
 * would take it for an encoded-word), or a word (a run without space or tab) over 70 characters? */
int mimeenc_needs_words(const char *s, size_t n);

/* "name: value", and when that is over 78 characters, CRLF + the blanks before a word wherever a line
 * would pass 78 (RFC 5322 2.2.3): each line but the first starts with the blanks that preceded its
 * first word, blanks at the end of value go.  Returns 0, 1 when a line would still be over 998 (out as
 * it was), -1 on ENOMEM. */
int mimeenc_fold(bytebuf *out, const char *name, size_t nl, const char *value, size_t vl);

#endif
