/* csv_encoding.c - checking and converting the encodings of csv_encoding.h.
 *
 * The single-byte encodings are tables of code points for 0x80-0xFF (0: not a character of the
 * encoding); UTF-8 is checked by the well-formed byte sequences of the Unicode Standard, table
 * 3-7.  Conversion only runs on fields that have a byte >= 0x80: an ASCII field is copied.
 */
#include "csv_encoding.h"

#include <stdint.h>
#include <string.h>
#include <strings.h>

/* windows-1252 0x80-0x9F (the rest is Latin-1); 0 where undefined. */
static const uint16_t cp1252_80[32] = {
    0x20AC, 0,      0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
    0x2039, 0x0152, 0,      0x017D, 0,      0,      0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0,      0x017E, 0x0178};

static const struct {
  const char *name;
  int enc;
} names[] = {{"utf-8", CSV_ENC_UTF8},          {"utf8", CSV_ENC_UTF8},         {"latin-1", CSV_ENC_LATIN1},
             {"latin1", CSV_ENC_LATIN1},       {"iso-8859-1", CSV_ENC_LATIN1}, {"windows-1252", CSV_ENC_CP1252},
             {"cp1252", CSV_ENC_CP1252},       {"iso-8859-15", CSV_ENC_LATIN9}, {"latin-9", CSV_ENC_LATIN9},
             {"latin9", CSV_ENC_LATIN9},       {NULL, 0}};

int csv_encoding_lookup(const char *name) {
  for (int i = 0; names[i].name; i++)
    if (strcasecmp(name, names[i].name) == 0) return names[i].enc;
  return -1;
}

const char *csv_encoding_name(int enc) {
  switch (enc) {
    case CSV_ENC_UTF8: return "utf-8";
    case CSV_ENC_LATIN1: return "latin-1";
    case CSV_ENC_CP1252: return "windows-1252";
    case CSV_ENC_LATIN9: return "iso-8859-15";
    default: return "bytes";
  }
}

int csv_encoding_converts(int enc) { return enc == CSV_ENC_LATIN1 || enc == CSV_ENC_CP1252 || enc == CSV_ENC_LATIN9; }

/* The code point of byte c >= 0x80 in a single-byte encoding; 0 when it is none. */
static uint32_t single(int enc, unsigned char c) {
  if (c < 0xA0) return enc == CSV_ENC_CP1252 ? cp1252_80[c - 0x80] : 0;
  if (enc == CSV_ENC_LATIN9) {
    switch (c) {
      case 0xA4: return 0x20AC;
      case 0xA6: return 0x0160;
      case 0xA8: return 0x0161;
      case 0xB4: return 0x017D;
      case 0xB8: return 0x017E;
      case 0xBC: return 0x0152;
      case 0xBD: return 0x0153;
      case 0xBE: return 0x0178;
      default: break;
    }
  }
  return c;
}

/* The length of the well-formed UTF-8 sequence at s, 0 when ill-formed, -1 when cut short. */
static int utf8_char(const unsigned char *s, size_t n) {
  unsigned char c = s[0], lo = 0x80, hi = 0xBF;
  int len;
  if (c < 0x80) return 1;
  if (c < 0xC2 || c > 0xF4) return 0;
  len = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (c == 0xE0) lo = 0xA0;      /* no overlong 3-byte forms */
  else if (c == 0xED) hi = 0x9F; /* no surrogates */
  else if (c == 0xF0) lo = 0x90; /* no overlong 4-byte forms */
  else if (c == 0xF4) hi = 0x8F; /* nothing past U+10FFFF */
  for (int i = 1; i < len; i++) {
    if ((size_t)i >= n) return -1;
    if (s[i] < (i == 1 ? lo : 0x80) || s[i] > (i == 1 ? hi : 0xBF)) return 0;
  }
  return len;
}

int csv_encoding_char(int enc, const unsigned char *s, size_t n) {
  if (s[0] < 0x80 || enc == CSV_ENC_BYTES) return 1;
  if (enc == CSV_ENC_UTF8) return utf8_char(s, n);
  return single(enc, s[0]) ? 1 : 0;
}

size_t csv_encoding_check(int enc, const unsigned char *s, size_t n) {
  size_t i = 0;
  if (enc == CSV_ENC_BYTES) return n;
  while (i < n) {
    uint64_t w;
    int k;
    while (i + 8 <= n) { /* ASCII runs: a word at a time */
      memcpy(&w, s + i, 8);
      if (w & UINT64_C(0x8080808080808080)) break;
      i += 8;
    }
    while (i < n && s[i] < 0x80) i++;
    if (i == n) break;
    k = csv_encoding_char(enc, s + i, n - i);
    if (k <= 0) return i;
    i += (size_t)k;
  }
  return n;
}

size_t csv_encoding_utf8_len(int enc, const unsigned char *s, size_t n) {
  size_t len = n;
  if (!csv_encoding_converts(enc)) return n;
  for (size_t i = 0; i < n; i++)
    if (s[i] >= 0x80) len += single(enc, s[i]) < 0x800 ? 1 : 2;
  return len;
}

/* Appends code point u (< 0x10000 here) as UTF-8. */
static unsigned char *put(unsigned char *o, uint32_t u) {
  if (u < 0x80) {
    *o++ = (unsigned char)u;
  } else if (u < 0x800) {
    *o++ = (unsigned char)(0xC0 | u >> 6);
    *o++ = (unsigned char)(0x80 | (u & 0x3F));
  } else {
    *o++ = (unsigned char)(0xE0 | u >> 12);
    *o++ = (unsigned char)(0x80 | ((u >> 6) & 0x3F));
    *o++ = (unsigned char)(0x80 | (u & 0x3F));
  }
  return o;
}

size_t csv_encoding_to_utf8(int enc, const unsigned char *s, size_t n, unsigned char *out) {
  unsigned char *o = out;
  if (!csv_encoding_converts(enc)) {
    if (n) memcpy(out, s, n);
    return n;
  }
  for (size_t i = 0; i < n; i++) o = s[i] < 0x80 ? (*o = s[i], o + 1) : put(o, single(enc, s[i]));
  return (size_t)(o - out);
}
