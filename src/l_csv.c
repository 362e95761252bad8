/* l_csv.c - Lua binding of the streaming CSV reader: require "mailshot.csv".
 *
 *   local reader, err = csv.open(path, { delimiter = ";", encoding = "windows-1252" })
 *   for the rows:  row, line = reader:read()   -- row: { column = "value", ... }
 *                  false, line, message        -- a bad row, skipped: report it and read on
 *                  nil                         -- end of file
 *                  nil, nil, message           -- read error
 *   ok, info = csv.check_encoding(path, options)  -- the whole file against its encoding
 *   name = csv.encoding("Latin1")                 -- "latin-1", or nil when unknown
 *
 * Following liolib.c: failures of the world (missing file, bad header, bad row, read error) are
 * return values; misuse (bad option, closed reader) raises.  Documented in README.md,
 * "mailshot.csv: streaming CSV reader".
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#include "csv_reader.h"
#include "l_check.h"
#include "l_class.h"

#define READER_MT "mailshot.csv.reader"

/* The userdata holds only the C reader; its user value 1 is the list of column names as Lua
 * strings, made once at open so that building each row table creates no key strings. */
typedef struct LReader {
  csv_reader *r; /* NULL when closed */
} LReader;

#define toLReader(L) ((LReader *)luaL_checkudata(L, 1, READER_MT))

static csv_reader *toreader(lua_State *L) {
  LReader *p = toLReader(L);
  l_checkopen(L, p->r != NULL, "csv reader");
  return p->r;
}

/* ---------------------------------------------------------------- module functions */

/* A delimiter: one byte, or a name for the usual ones. */
static unsigned char getdelimiter(lua_State *L, int arg) {
  static const char *const names[] = {"comma", "semicolon", "tab", NULL};
  static const unsigned char bytes[] = {',', ';', '\t'};
  size_t len = 0;
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
  if (s == NULL) luaL_argerror(L, arg, "delimiter must be a string");
  if (len == 1 && s[0] != '\r' && s[0] != '\n') return (unsigned char)s[0];
  for (int i = 0; names[i]; i++)
    if (strcmp(s, names[i]) == 0) return bytes[i];
  luaL_argerror(L, arg,
                lua_pushfstring(L,
                                "invalid delimiter '%s' (one character, or "
                                "\"comma\", \"semicolon\", \"tab\")",
                                s));
  return 0;
}

static unsigned char getquote(lua_State *L, int arg) {
  size_t len = 0;
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
  luaL_argcheck(L, s && len == 1 && s[0] != '\r' && s[0] != '\n', arg, "quote must be one character");
  return (unsigned char)s[0];
}

/* An encoding name (csv_encoding_lookup's). */
static int getencoding(lua_State *L, int arg) {
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
  int enc = s ? csv_encoding_lookup(s) : -1;
  if (enc < 0)
    luaL_argerror(L, arg,
                  lua_pushfstring(L, "unknown encoding '%s' (\"utf-8\", \"latin-1\", \"windows-1252\", \"iso-8859-15\")",
                                  s ? s : luaL_typename(L, -1)));
  return enc;
}

/* Reads the options table at arg; an unknown key is an error, so that a typo is not ignored. */
static void getoptions(lua_State *L, int arg, csv_options *opt) {
  if (lua_isnoneornil(L, arg)) return;
  luaL_checktype(L, arg, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, arg) != 0) {
    const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
    if (strcmp(key, "delimiter") == 0)
      opt->delimiter = getdelimiter(L, arg);
    else if (strcmp(key, "quote") == 0)
      opt->quote = getquote(L, arg);
    else if (strcmp(key, "encoding") == 0)
      opt->encoding = getencoding(L, arg);
    else
      luaL_argerror(L, arg, lua_pushfstring(L, "unknown option '%s'", key));
    lua_pop(L, 1);
  }
  luaL_argcheck(L, (opt->delimiter ? opt->delimiter : ',') != (opt->quote ? opt->quote : '"'), arg,
                "delimiter and quote must differ");
}

/* csv.open(path [, options]) -> reader | nil, "path: reason" */
static int csv_open(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  csv_options opt = {0, 0, CSV_ENC_BYTES};
  char err[256];
  LReader *p;
  size_t n;

  getoptions(L, 2, &opt);
  p = (LReader *)lua_newuserdatauv(L, sizeof(LReader), 1);
  p->r = NULL; /* closed until the file is open: an error below leaves nothing half-built */
  luaL_setmetatable(L, READER_MT);
  p->r = csv_reader_open(path, &opt, err, sizeof err);
  if (p->r == NULL) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  n = csv_reader_ncols(p->r);
  lua_createtable(L, n <= INT_MAX ? (int)n : 0, 0); /* always fits, see r_read */
  for (size_t i = 0; i < n; i++) {
    lua_pushstring(L, csv_reader_colname(p->r, i));
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setiuservalue(L, -2, 1);
  return 1;
}

/* ---------------------------------------------------------------- reader methods */

/* reader:read() -> row, line | false, line, message | nil | nil, nil, message */
static int r_read(lua_State *L) {
  csv_reader *r = toreader(L);
  csv_row row;
  switch (csv_reader_next(r, &row)) {
    case CSV_ROW_OK:
      lua_getiuservalue(L, 1, 1); /* column names */
      lua_createtable(L, 0, (int)row.nfields); /* fits: each field costs 17+ bytes of a 16 MiB row */
      for (size_t i = 0; i < row.nfields; i++) {
        lua_rawgeti(L, -2, (lua_Integer)i + 1);
        lua_pushlstring(L, row.fields[i].ptr, row.fields[i].len);
        lua_rawset(L, -3);
      }
      lua_pushinteger(L, (lua_Integer)row.line);
      return 2;
    case CSV_ROW_BAD:
      lua_pushboolean(L, 0);
      lua_pushinteger(L, (lua_Integer)row.line);
      lua_pushstring(L, row.error);
      return 3;
    case CSV_ROW_EOF:
      lua_pushnil(L);
      return 1;
    default: /* CSV_ROW_IOERR */
      lua_pushnil(L);
      lua_pushnil(L);
      lua_pushstring(L, row.error);
      return 3;
  }
}

/* reader:header() -> { "email", "name", ... }, a fresh list each call */
static int r_header(lua_State *L) {
  csv_reader *r = toreader(L);
  size_t n = csv_reader_ncols(r);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_pushstring(L, csv_reader_colname(r, i));
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

/* reader:line() -> the physical line of the last byte read: after a row, the line it ends on */
static int r_line(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)csv_reader_line(toreader(L)));
  return 1;
}

static int r_path(lua_State *L) {
  lua_pushstring(L, csv_reader_path(toreader(L)));
  return 1;
}

/* reader:close() -> true; closing twice is an error, as with files */
static int r_close(lua_State *L) {
  LReader *p = toLReader(L);
  toreader(L);
  csv_reader_close(p->r);
  p->r = NULL;
  lua_pushboolean(L, 1);
  return 1;
}

/* __gc and __close: quiet on a reader already closed */
static int r_gc(lua_State *L) {
  LReader *p = toLReader(L);
  csv_reader_close(p->r);
  p->r = NULL;
  return 0;
}

static int r_tostring(lua_State *L) {
  LReader *p = toLReader(L);
  lua_pushfstring(L, "csv reader (%s)", p->r ? csv_reader_path(p->r) : "closed");
  return 1;
}

/* csv.count_lines(path) -> number of line ends (plus one for a last line without one), or
 * nil, err.  memchr over 64 KiB blocks: a million-row list is counted in milliseconds, which
 * lets a progress view show a total (rows = lines - 1 when no quoted field holds a newline). */
static int csv_count_lines(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  FILE *f = fopen(path, "rb");
  if (f == NULL) return luaL_fileresult(L, 0, path);
  static char buf[65536];
  lua_Integer lines = 0;
  size_t n;
  char last = '\n';
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
    for (const char *p = buf, *end = buf + n; (p = memchr(p, '\n', (size_t)(end - p))) != NULL; p++) lines++;
    last = buf[n - 1];
  }
  int err = ferror(f);
  fclose(f);
  if (err) return luaL_fileresult(L, 0, path);
  if (last != '\n') lines++;
  lua_pushinteger(L, lines);
  return 1;
}

/* csv.check_encoding(path [, options]) -> true | false, { line, field, offset, byte, lines,
 * encoding } | nil, err.  The options of csv.open; the encoding defaults to UTF-8.  One pass over
 * a clean file (a word at a time through ASCII); a second, byte by byte, only when a byte is bad. */
static int csv_check_encoding(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  csv_options opt = {0, 0, CSV_ENC_UTF8};
  csv_scan scan;
  char err[256];
  getoptions(L, 2, &opt);
  if (opt.encoding == CSV_ENC_BYTES) opt.encoding = CSV_ENC_UTF8;
  if (csv_scan_encoding(path, &opt, &scan, err, sizeof err) != 0) {
    luaL_pushfail(L);
    lua_pushstring(L, err);
    return 2;
  }
  if (scan.bad_lines == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushboolean(L, 0);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)scan.line);
  lua_setfield(L, -2, "line");
  lua_pushinteger(L, (lua_Integer)scan.field);
  lua_setfield(L, -2, "field");
  lua_pushinteger(L, (lua_Integer)scan.offset);
  lua_setfield(L, -2, "offset");
  lua_pushinteger(L, scan.byte);
  lua_setfield(L, -2, "byte");
  lua_pushinteger(L, (lua_Integer)scan.bad_lines);
  lua_setfield(L, -2, "lines");
  lua_pushstring(L, csv_encoding_name(opt.encoding));
  lua_setfield(L, -2, "encoding");
  return 2;
}

/* csv.encoding(name) -> the canonical name ("latin1" -> "latin-1") | nil when unknown */
static int csv_encoding(lua_State *L) {
  int enc = csv_encoding_lookup(luaL_checkstring(L, 1));
  if (enc < 0) return 0;
  lua_pushstring(L, csv_encoding_name(enc));
  return 1;
}

/* ---------------------------------------------------------------- registration */

static const luaL_Reg csvlib[] = {{"open", csv_open},
                                  {"count_lines", csv_count_lines},
                                  {"check_encoding", csv_check_encoding},
                                  {"encoding", csv_encoding},
                                  {NULL, NULL}};

static const luaL_Reg methods[] = {{"read", r_read}, {"header", r_header}, {"line", r_line},
                                   {"path", r_path}, {"close", r_close},   {NULL, NULL}};

static const luaL_Reg metameth[] = {
    {"__gc", r_gc}, {"__close", r_gc}, {"__tostring", r_tostring}, {NULL, NULL}};

int luaopen_mailshot_csv(lua_State *L) {
  luaL_newlib(L, csvlib);
  l_newclass(L, READER_MT, metameth, methods);
  return 1;
}
