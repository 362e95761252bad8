/* l_text.c - module "mailshot.text": byte-crunching string primitives for the Lua modules.
 *
 * The MIME builder, the report and the journal stay in Lua (users read and change them); what
 * they do to every byte of every message, or to every field of every row, is done here once,
 * because a Lua loop or a gsub with a table costs ten times as much per message.
 *
 *   text.crlf(s [, max_line]) -> t | nil
 *       every line break of s (CRLF, lone CR, lone LF) as CRLF; s itself when it has none to
 *       change.  nil when a line is longer than max_line octets (line break not counted).
 *   text.kind(s [, first_8bit]) -> "7bit" | "8bit" | "nul"
 *       what a body's bytes allow: "nul" when s has a NUL byte, else "8bit" when it has a byte
 *       over 127, else "7bit" (RFC 2045 §2.7-2.8); a word at a time, where utf8.len decodes
 *       every character.  With first_8bit, "8bit" as soon as a byte over 127 is seen (there may
 *       be a NUL after it): for a caller to whom both mean "not 7bit".
 *   text.csv_row(t, keys) -> "v1,v2,...,vn"
 *       t[keys[1]] .. t[keys[n]] as one RFC 4180 row (no line break): nil is empty, other
 *       values go through tostring; a value is quoted when it has a quote, a comma or a line
 *       break, or white space at either end (a spreadsheet would trim it).  A value that starts
 *       with = + - @ TAB CR (a spreadsheet formula) or ' gets one ' prepended, and is quoted.
 *   text.tsv_record(kind, line, email [, t, keys]) -> "kind\tline\temail[\tt[k]...]\n"
 *       a journal record: tab, LF, CR and backslash in values escaped as \t \n \r \\.
 *   text.message_id(prefix, r, counter, domain), text.boundary(r, q) -> mime.lua's Message-ID and
 *       multipart boundary from its random numbers, in hex (below)
 *   text.fast_address(s) -> domain | nil: s is an address of the usual characters (mime.lua's
 *       FAST_ADDR pattern, without the pattern matcher's work per character)
 *   text.address_ok(addr) -> true | false, reason
 *       smtp_addr_ok, the rule the SMTP client applies to every MAIL FROM and RCPT TO: the one
 *       rule set for an address (mime.valid_address narrows it to what a header can carry).
 *   text.qp(s) -> quoted-printable of s, CRLF line breaks (mime.qp; mimeenc_qp)
 *   text.base64(s) -> base64 of s in lines of 76 joined by CRLF (mime.base64)
 *   text.encode_words(s, first) -> RFC 2047 encoded-words for s separated by spaces, the first at
 *       most `first` characters, the others at most 75 (mimeenc_words)
 *   text.header_text(s) -> s as header text (mime.header_text): each run of CR, LF and NUL with the
 *       blanks around it one space, no blanks at either end, invalid UTF-8 bytes U+FFFD; s itself
 *       when that changes nothing (mimeenc_header_text)
 *   text.header_words(s, first) -> v, encoded: v = text.header_text(s), as encoded-words
 *       (text.encode_words(v, first)) when it has to be: a byte that is not printable ASCII or tab,
 *       an "=?", or a word over 70 characters; encoded tells which
 *   text.fold(name, value) -> "name: value" folded at 78 (CRLF before the blanks before a word),
 *       blanks at the end of value dropped; nil when a line would still be over 998 (mimeenc_fold)
 * The encoders write into one buffer kept between calls (an upvalue), so encoding a message
 * allocates nothing but the resulting string. */
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <string.h>

#include "bytebuf.h"
#include "l_text.h"
#include "mimeenc.h"
#include "smtp_proto.h"

/* text.crlf's two walks over the lines (bytebuf_lines finds the breaks): is s already CRLF-only with
 * no line over max_line, and else the copy with every break as CRLF. */
typedef struct { luaL_Buffer *b; size_t max_line; } crlf_walk;

/* Stops (1) at a bare LF or CR, or a line over max_line: s must be copied (or is too long). */
static int check_line(void *ud, const char *line, size_t n, int brk) {
  crlf_walk *w = ud;
  (void)line;
  return brk == 1 || n > w->max_line;
}

/* Copies the line and a CRLF; stops (1) at a line over max_line. */
static int copy_line(void *ud, const char *line, size_t n, int brk) {
  crlf_walk *w = ud;
  if (n > w->max_line) return 1;
  luaL_addlstring(w->b, line, n);
  if (brk) luaL_addlstring(w->b, "\r\n", 2);
  return 0;
}

/* The usual case, without a call per line: every break a CRLF (no bare CR or LF) and no line over
 * max_line.  1 when so; 0 means "not sure", and the walk above decides. */
static int crlf_clean(const char *s, size_t n, size_t max_line) {
  const char *p = s, *end = s + n;
  while (p < end) {
    const char *lf = memchr(p, '\n', (size_t)(end - p));
    const char *stop = lf ? lf : end;
    const char *cr = memchr(p, '\r', (size_t)(stop - p));
    if (lf ? cr != lf - 1 : cr != NULL) return 0;                 /* a bare CR or LF */
    if ((size_t)((lf ? cr : end) - p) > max_line) return 0;
    if (!lf) return 1;
    p = lf + 1;
  }
  return 1;
}

static int t_crlf(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  size_t max_line = (size_t)-1;   /* none given: no limit */
  if (!lua_isnoneornil(L, 2)) {
    lua_Integer max = luaL_checkinteger(L, 2);
    luaL_argcheck(L, max >= 0, 2, "max_line must be >= 0");
    max_line = (size_t)max;
  }
  luaL_Buffer b;
  crlf_walk w = { &b, max_line };
  if (crlf_clean(s, n, max_line) || !bytebuf_lines(s, n, check_line, &w)) { lua_settop(L, 1); return 1; }
  luaL_buffinitsize(L, &b, n + n / 32 + 16);
  if (bytebuf_lines(s, n, copy_line, &w)) { luaL_pushresult(&b); lua_pushnil(L); return 1; }
  luaL_pushresult(&b);
  return 1;
}

static int t_kind(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  int first_8bit = lua_toboolean(L, 2);   /* the caller only tells 7bit from the rest */
  int high = 0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {   /* 8 bytes at a time: a NUL byte or a high bit in any of them */
    uint64_t w;
    memcpy(&w, s + i, 8);
    if (((w - 0x0101010101010101ull) & ~w & 0x8080808080808080ull) != 0) break;   /* a zero byte */
    high |= (w & 0x8080808080808080ull) != 0;
    if (high && first_8bit) break;
  }
  for (; i < n && !(high && first_8bit); i++) {
    if (s[i] == 0) { lua_pushliteral(L, "nul"); return 1; }
    high |= s[i] >= 0x80;
  }
  if (high) lua_pushliteral(L, "8bit"); else lua_pushliteral(L, "7bit");
  return 1;
}

static int is_space(unsigned char c) { return c == ' ' || (c >= 9 && c <= 13); }

/* Push t[keys[i]] for i = 1..#keys; returns how many.  Strings, integers and nil stay as they are
 * (field_text writes them); anything else goes through tostring (luaL_tolstring) here.  The values
 * are all on the stack before the output buffer is made. */
static int push_fields(lua_State *L, int t, int keys) {
  lua_Integer n = luaL_len(L, keys);
  luaL_argcheck(L, n >= 0 && n < 1000, keys, "too many keys");
  luaL_checkstack(L, (int)n + 8, "too many fields");
  for (lua_Integer i = 1; i <= n; i++) {
    lua_geti(L, keys, i);
    int ty = lua_gettable(L, t);
    if (ty != LUA_TSTRING && ty != LUA_TNIL && !lua_isinteger(L, -1)) {
      luaL_tolstring(L, -1, NULL);
      lua_remove(L, -2);
    }
  }
  return (int)n;
}

/* The most bytes field_text gives for the value at idx: an integer's 20 digits and sign */
static size_t field_max(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TSTRING) { size_t n; lua_tolstring(L, idx, &n); return n; }
  return lua_isnil(L, idx) ? 0 : 20;
}

/* The text of a value push_fields left: a string's bytes, "" for nil, an integer's digits in num
 * (as tostring writes them, "%lld", without the string it would make). */
static const char *field_text(lua_State *L, int idx, char num[24], size_t *n) {
  if (lua_type(L, idx) == LUA_TSTRING) return lua_tolstring(L, idx, n);
  if (lua_isnil(L, idx)) { *n = 0; return ""; }
  lua_Integer v = lua_tointeger(L, idx);
  unsigned long long u = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
  char *p = num + 24;
  do { *--p = (char)('0' + u % 10); u /= 10; } while (u);
  if (v < 0) *--p = '-';
  *n = (size_t)(num + 24 - p);
  return p;
}

/* The output of one row or record: on the C stack when `max` (an upper bound) fits, else in a
 * luaL_Buffer of that size; out_push makes the string of the `used` bytes. */
typedef struct { char local[1024]; luaL_Buffer b; char *p; } outbuf;
static char *out_init(lua_State *L, outbuf *o, size_t max) {
  o->p = max <= sizeof o->local ? o->local : luaL_buffinitsize(L, &o->b, max);
  return o->p;
}
static void out_push(lua_State *L, outbuf *o, const char *end) {
  if (o->p == o->local) lua_pushlstring(L, o->local, (size_t)(end - o->p));
  else luaL_pushresultsize(&o->b, (size_t)(end - o->p));
}

static int needs_prefix(const char *v, size_t n) {
  static const char lead[] = "=+-@\t\r'";
  return n > 0 && memchr(lead, v[0], sizeof lead - 1) != NULL;
}

/* One CSV cell at d (at most 2 n + 3 bytes); returns its end. */
static char *put_csv_field(char *d, const char *v, size_t n) {
  int prefix = needs_prefix(v, n);
  int quote = prefix || (n > 0 && (memchr(v, '"', n) || memchr(v, ',', n) || memchr(v, '\r', n)
                                   || memchr(v, '\n', n) || is_space((unsigned char)v[0])
                                   || is_space((unsigned char)v[n - 1])));
  if (!quote) { memcpy(d, v, n); return d + n; }
  *d++ = '"';
  if (prefix) *d++ = '\'';
  for (const char *p = v, *end = v + n; p < end;) {
    const char *q = memchr(p, '"', (size_t)(end - p));
    size_t run = q ? (size_t)(q - p) + 1 : (size_t)(end - p);
    memcpy(d, p, run);
    d += run;
    if (q) *d++ = '"';   /* "" inside quotes */
    p += run;
  }
  *d++ = '"';
  return d;
}

/* One journal field at d with \t \n \r \\ escaped (at most 2 n bytes); returns its end.  Runs of
 * plain bytes are copied whole. */
static char *put_escaped(char *d, const char *v, size_t n) {
  size_t i = 0;
  while (i < n) {
    size_t j = i;
    while (j < n && v[j] != '\t' && v[j] != '\n' && v[j] != '\r' && v[j] != '\\') j++;
    memcpy(d, v + i, j - i);
    d += j - i;
    if (j == n) break;
    *d++ = '\\';
    *d++ = v[j] == '\t' ? 't' : v[j] == '\n' ? 'n' : v[j] == '\r' ? 'r' : '\\';
    i = j + 1;
  }
  return d;
}

static int t_csv_row(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  int n = push_fields(L, 1, 2);
  size_t max = (size_t)n;
  for (int i = 0; i < n; i++) max += 2 * field_max(L, 3 + i) + 3;
  outbuf o;
  char *d = out_init(L, &o, max), num[24];
  for (int i = 0; i < n; i++) {
    size_t len;
    const char *v = field_text(L, 3 + i, num, &len);
    if (i > 0) *d++ = ',';
    d = put_csv_field(d, v, len);
  }
  out_push(L, &o, d);
  return 1;
}

static int t_tsv_record(lua_State *L) {
  luaL_checkstring(L, 1);
  int n = 0;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    luaL_checktype(L, 5, LUA_TTABLE);
  }
  lua_settop(L, 5);
  for (int i = 2; i <= 3; i++)     /* line and email: as tostring would give them, nil as "" */
    if (lua_type(L, i) != LUA_TSTRING && !lua_isnil(L, i) && !lua_isinteger(L, i)) {
      luaL_tolstring(L, i, NULL);
      lua_replace(L, i);
    }
  if (!lua_isnil(L, 4)) n = push_fields(L, 4, 5);
  size_t max = 1;
  for (int i = 1; i <= 3 + n; i++) max += 2 * field_max(L, i <= 3 ? i : 6 + (i - 4)) + 1;
  outbuf o;
  char *d = out_init(L, &o, max), num[24];
  for (int i = 1; i <= 3 + n; i++) {
    size_t len;
    const char *v = field_text(L, i <= 3 ? i : 6 + (i - 4), num, &len);
    if (i > 1) *d++ = '\t';
    d = put_escaped(d, v, len);
  }
  *d++ = '\n';
  out_push(L, &o, d);
  return 1;
}

/* n hex digits (lowercase) of v's low 4 n bits at d; returns the end */
static char *put_hex(char *d, uint64_t v, int n) {
  static const char hex[] = "0123456789abcdef";
  for (int i = n - 1; i >= 0; i--) d[i] = hex[v & 15], v >>= 4;
  return d + n;
}

/* text.message_id(prefix, r, counter, domain) -> prefix .. 8 hex digits of r's high half .. "." ..
 * counter in hex (as %x) .. 8 hex digits of r's low half .. "@" .. domain .. ">" (mime.lua's
 * Message-ID: r from math.random(0), so its ids follow the Lua generator as before). */
static int t_message_id(lua_State *L) {
  size_t np, nd;
  const char *prefix = luaL_checklstring(L, 1, &np);
  uint64_t r = (uint64_t)luaL_checkinteger(L, 2), counter = (uint64_t)luaL_checkinteger(L, 3);
  const char *domain = luaL_checklstring(L, 4, &nd);
  int ndig = 1;
  while (ndig < 16 && counter >> (4 * ndig)) ndig++;
  luaL_Buffer b;
  char *d = luaL_buffinitsize(L, &b, np + nd + 40), *start = d;
  memcpy(d, prefix, np);
  d = put_hex(d + np, r >> 32, 8);
  *d++ = '.';
  d = put_hex(d, counter, ndig);
  d = put_hex(d, r & 0xffffffffu, 8);
  *d++ = '@';
  memcpy(d, domain, nd);
  d += nd;
  *d++ = '>';
  luaL_pushresultsize(&b, (size_t)(d - start));
  return 1;
}

/* text.boundary(r, q) -> "=_ms_" .. 16 hex digits of r .. 8 of q's low half (mime.lua's multipart
 * boundary, from two math.random(0)) */
static int t_boundary(lua_State *L) {
  uint64_t r = (uint64_t)luaL_checkinteger(L, 1), q = (uint64_t)luaL_checkinteger(L, 2);
  char buf[32] = "=_ms_";
  put_hex(put_hex(buf + 5, r, 16), q & 0xffffffffu, 8);
  lua_pushlstring(L, buf, 29);
  return 1;
}

/* The usual address, as mime.lua's pattern "^[a-z0-9A-Z_+%-][a-z0-9.A-Z_+%-]*[a-z0-9A-Z_+%-]@([a-z0-9.A-Z%-]+)$"
 * takes it: a local part of two or more of letters, digits, "_", "+", "-" and inner dots, one "@",
 * a domain of letters, digits, dots and "-".  Neither part can hold an "@", so the one "@" splits. */
static int addr_local_ch(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '+'
         || c == '-';
}
static int addr_domain_ch(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-';
}

/* text.fast_address(s) -> domain | nil: the domain when s is such an address (the pattern's capture) */
static int t_fast_address(lua_State *L) {
  size_t n;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  const unsigned char *at = memchr(s, '@', n);
  if (!at || at - s < 2 || at + 1 == s + n) return 0;
  if (!addr_local_ch(s[0]) || !addr_local_ch(at[-1])) return 0;
  for (const unsigned char *p = s + 1; p < at - 1; p++)
    if (!addr_local_ch(*p) && *p != '.') return 0;
  for (const unsigned char *p = at + 1; p < s + n; p++)
    if (!addr_domain_ch(*p)) return 0;
  lua_pushlstring(L, (const char *)at + 1, (size_t)(s + n - at - 1));
  return 1;
}

static int t_address_ok(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  char why[128];
  if (smtp_addr_ok(s, n, 0, why, sizeof why)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_pushstring(L, why);
  return 2;
}

/* The encoders' shared output buffer: emptied before each call; one that grew past SCRATCH_KEEP
 * (a large attachment) is given back after the call. */
#define SCRATCH_KEEP (1u << 20)
#define SCRATCH_META "mailshot.text.scratch"

static bytebuf *scratch(lua_State *L) {
  bytebuf *b = lua_touserdata(L, lua_upvalueindex(1));
  b->len = 0;
  return b;
}

/* Push the buffer's contents (or raise on ENOMEM: rc < 0) and release a large buffer. */
static int push_scratch(lua_State *L, bytebuf *b, int rc) {
  if (rc < 0) return luaL_error(L, "not enough memory");
  lua_pushlstring(L, b->data, b->len);
  if (b->cap > SCRATCH_KEEP) bytebuf_free(b);
  return 1;
}

static int scratch_gc(lua_State *L) {
  bytebuf_free(luaL_checkudata(L, 1, SCRATCH_META));
  return 0;
}

static int t_qp(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  bytebuf *b = scratch(L);
  return push_scratch(L, b, mimeenc_qp(b, s, n));
}

static int t_base64(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  bytebuf *b = scratch(L);
  return push_scratch(L, b, mimeenc_base64_lines(b, s, n));
}

static int t_encode_words(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_Integer first = luaL_checkinteger(L, 2);
  luaL_argcheck(L, first > 0, 2, "first must be > 0");
  bytebuf *b = scratch(L);
  return push_scratch(L, b, mimeenc_words(b, s, n, (size_t)first));
}

/* Push mimeenc_header_text's result for the string at index 1: s itself (no copy) when it is all of
 * s, else the slice or the buffer's contents. */
static void push_header_text(lua_State *L, const char *s, size_t n, bytebuf *b) {
  size_t a, e;
  int rc = mimeenc_header_text(b, s, n, &a, &e);
  if (rc < 0) luaL_error(L, "not enough memory");
  if (rc == 0 && a == 0 && e == n) lua_pushvalue(L, 1);
  else if (rc == 0) lua_pushlstring(L, s + a, e - a);
  else lua_pushlstring(L, b->data, b->len);
  if (b->cap > SCRATCH_KEEP) bytebuf_free(b);
}

static int t_header_text(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  push_header_text(L, s, n, scratch(L));
  return 1;
}

static int t_header_words(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_Integer first = luaL_checkinteger(L, 2);
  luaL_argcheck(L, first > 0, 2, "first must be > 0");
  bytebuf *b = scratch(L);
  push_header_text(L, s, n, b);
  s = lua_tolstring(L, -1, &n);
  if (!mimeenc_needs_words(s, n)) {
    lua_pushboolean(L, 0);
    return 2;
  }
  b->len = 0;
  push_scratch(L, b, mimeenc_words(b, s, n, (size_t)first));
  lua_pushboolean(L, 1);
  return 2;
}

static int t_fold(lua_State *L) {
  size_t nl, vl;
  const char *name = luaL_checklstring(L, 1, &nl);
  const char *value = luaL_checklstring(L, 2, &vl);
  bytebuf *b = scratch(L);
  int rc = mimeenc_fold(b, name, nl, value, vl);
  if (rc == 1) {
    lua_pushnil(L);
    return 1;
  }
  return push_scratch(L, b, rc);
}

int luaopen_mailshot_text(lua_State *L) {
  static const luaL_Reg fns[] = {
    { "crlf", t_crlf }, { "kind", t_kind }, { "csv_row", t_csv_row }, { "tsv_record", t_tsv_record },
    { "address_ok", t_address_ok }, { "message_id", t_message_id }, { "boundary", t_boundary },
    { "fast_address", t_fast_address }, { NULL, NULL }
  };
  static const luaL_Reg encoders[] = {
    { "qp", t_qp }, { "base64", t_base64 }, { "encode_words", t_encode_words },
    { "header_text", t_header_text }, { "header_words", t_header_words }, { "fold", t_fold }, { NULL, NULL }
  };
  luaL_newlib(L, fns);
  bytebuf *b = lua_newuserdatauv(L, sizeof *b, 0);
  *b = (bytebuf){ 0 };
  if (luaL_newmetatable(L, SCRATCH_META)) {
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  luaL_setfuncs(L, encoders, 1);   /* each with the buffer as its upvalue */
  return 1;
}
