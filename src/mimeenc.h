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

#endif
