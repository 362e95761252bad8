/* smtp_proto.h - the pure (no I/O) parts of the SMTP client: reply parsing, EHLO capabilities,
 * envelope address checks, DATA dot-stuffing (the byte buffer and base64 are in bytebuf.h).
 *
 * Nothing here touches a socket, the clock or global state: every function works on the bytes it is
 * given, so smtp.c can feed it whatever the network delivered and the unit tests and the fuzzer can
 * feed it anything at all. Every limit carries the RFC section it comes from. */
#ifndef MAILSHOT_SMTP_PROTO_H
#define MAILSHOT_SMTP_PROTO_H

#include <stddef.h>

#include "bytebuf.h"

/* RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets, but real servers send longer ones
 * (long EHLO lists, verbose policy rejections); we allow this many octets of one line, not counting
 * its CRLF, and call a longer line a protocol error. */
#define SMTP_LINE_MAX 8192
/* RFC 5321 §4.2.1 sets no bound on continuation lines; a hostile server could stream them forever. */
#define SMTP_REPLY_LINES_MAX 1000
/* Our own bound on the bytes of ONE reply (all its lines with their line ends). No RFC limit exists;
 * it keeps the caller's input buffer and the re-scan in smtp_reply_parse() bounded. A reply that
 * reaches it before its last line is a protocol error. */
#define SMTP_REPLY_BYTES_MAX 65536

/* Envelope limits, RFC 5321 §4.5.3.1.1 (local part), §4.5.3.1.2 (domain), §4.5.3.1.3 (path, counting
 * the '<' and '>' around the address). */
#define SMTP_LOCAL_MAX 64
#define SMTP_DOMAIN_MAX 255
#define SMTP_PATH_MAX 256

/* A parsed SMTP reply (RFC 5321 §4.2): code, optional enhanced status (RFC 3463/2034), text of all lines. */
#define SMTP_REPLY_TEXT_MAX 4096 /* we keep at most this much text (all lines joined by "\n") */
typedef struct {
  int code; /* 200..599 */
  char enhanced[16]; /* "5.1.1" or "" when the first line has none */
  char text
      [SMTP_REPLY_TEXT_MAX]; /* the text after "ddd " / "ddd-" of every line, joined by '\n', enhanced code of each line stripped when present; truncated safely */
  int nlines;
  int truncated; /* 1 when text had to be cut at SMTP_REPLY_TEXT_MAX - 1 bytes */
} smtp_reply;

/* Incremental parse of ONE reply from the front of buf/len (the bytes received so far; may hold part
 * of a reply, one reply, or several pipelined replies, RFC 2920 §3.1).
 * Returns >0: bytes consumed by one complete reply, *r filled; the caller drops them and calls again
 *             for the next pipelined reply.
 *          0: need more bytes (*r is scratch, not meaningful).
 *         <0: protocol error, reason in err (always NUL-terminated when errlen > 0): a line without a
 *             valid reply code, different codes in one multi-line reply (RFC 5321 §4.2.1), a line longer
 *             than SMTP_LINE_MAX, more than SMTP_REPLY_LINES_MAX lines or SMTP_REPLY_BYTES_MAX bytes.
 *             Errors are reported as soon as the bytes show them, without waiting for the line end, so a
 *             caller never needs to buffer more than SMTP_REPLY_BYTES_MAX bytes of an unfinished reply.
 * Lines end with CRLF or a bare LF. Text is made safe to log: control bytes other than TAB become '?';
 * bytes >= 0x80 (UTF-8 from SMTPUTF8 servers) are kept.
 * Enhanced status codes (RFC 2034 §4: class "." 1*3digit "." 1*3digit, class 2, 4 or 5) are taken from
 * the start of each line's text and stripped with the spaces after them: always when the class digit
 * equals the reply code's first digit; when `enhanced` is non-zero (server advertised
 * ENHANCEDSTATUSCODES) also when it does not (kept for logs; smtp_reply_class ignores it then). */
int smtp_reply_parse(const char *buf, size_t len, int enhanced, smtp_reply *r, char *err, size_t errlen);

/* Failure class from one place: */
typedef enum { SMTP_CLASS_OK, SMTP_CLASS_TEMPORARY, SMTP_CLASS_PERMANENT } smtp_class;
/* 2xx/3xx OK, 4xx temporary, 5xx permanent (RFC 5321 §4.2.1). A consistent enhanced code (RFC 3463 §3.1)
 * says the same; an inconsistent one (forbidden by RFC 2034 §4, e.g. "550 4.2.2") never changes the
 * class: the basic code wins. Anything else (no reply parsed, code out of range) is TEMPORARY: a reply
 * we could not understand says nothing final about the recipient. */
smtp_class smtp_reply_class(const smtp_reply *r);

/* EHLO capabilities (RFC 5321 §4.1.1.1, keywords case-insensitive) */
typedef struct {
  /* only what the client acts on; every other keyword is in names (for `mailshot check`) */
  unsigned pipelining : 1, starttls : 1, eightbitmime : 1, enhancedstatuscodes : 1, smtputf8 : 1,
      size_present : 1;
  unsigned long long size; /* SIZE value, 0 = no limit given */
  unsigned auth_plain : 1, auth_login : 1; /* the mechanisms we speak */
  char auth[256]; /* the AUTH mechanisms as advertised, space separated */
  char names
      [1024]; /* every keyword line as advertised (skip the first line = greeting domain), space separated, for display */
} smtp_caps;
/* Fills *caps (zeroed first) from a parsed EHLO reply. Handles the pre-RFC 2554 "AUTH=LOGIN PLAIN" form
 * and merges it with an "AUTH ..." line without duplicates. SIZE (RFC 1870): a missing or non-numeric
 * value gives size 0 with size_present 1; a value too big for the type saturates. auth and names keep
 * whole words / whole lines only: what does not fit is left out, never cut in the middle. */
void smtp_caps_parse(const smtp_reply *ehlo_reply, smtp_caps *caps);
/* The same from the raw bytes of ONE complete EHLO reply, as smtp_reply_parse() accepted them (buf/len:
 * exactly the bytes it consumed). Every line is read, so a reply whose text exceeds SMTP_REPLY_TEXT_MAX
 * (hundreds of long keyword lines: 4 KiB of text is easily reached) keeps every capability, where
 * smtp_caps_parse() on the truncated text would lose those past the cut. The parser's own bounds
 * (SMTP_REPLY_LINES_MAX lines, SMTP_REPLY_BYTES_MAX bytes) still apply, and beyond them the reply is a
 * protocol error: the session fails closed rather than going on without a capability. Control bytes in a
 * keyword line become '?', as in the reply text. */
void smtp_caps_parse_raw(const char *buf, size_t len, smtp_caps *caps);

/* Envelope address check against command injection: returns 1 if `addr` (WITHOUT the angle brackets)
 * may go inside MAIL FROM:<...> / RCPT TO:<...>, else 0 with a reason in why.
 * Rejects CR, LF, NUL, any control char, '<', '>' (even inside quotes), spaces outside a quoted local
 * part, an empty or over-long address (RFC 5321 §4.5.3.1: local 64, domain 255, path 256 with the
 * brackets, so at most 254 here), no '@' or more than one unquoted '@', an empty local part or domain.
 * The null sender "<>" of MAIL FROM is addr "" (len 0) with allow_empty=1.
 * Bytes >= 0x80 pass (RFC 6531 addresses); the caller must then only send them to a server that
 * advertised SMTPUTF8 (test with smtp_data_has_8bit). */
int smtp_addr_ok(const char *addr, size_t len, int allow_empty, char *why, size_t whylen);

/* Message data for DATA (RFC 5321 §4.5.2, §2.3.8): appends to out the message with every line ending
 * (CRLF, bare LF, bare CR) made CRLF, lines starting with '.' dot-stuffed, a CRLF added when the data does
 * not end with one, then ".\r\n". An empty message gives just ".\r\n" (the CRLF ending the DATA command
 * line is the first half of the terminator, RFC 5321 §4.1.1.4). Lines are not wrapped: the 1000-octet
 * limit of §4.5.3.1.6 is the message builder's job. 0 ok, -1 ENOMEM (out unchanged). */
int smtp_dot_stuff(bytebuf *out, const char *msg, size_t len);
int smtp_data_has_8bit(const char *msg, size_t len); /* 1 if any byte >= 0x80, else 0 */

#endif
