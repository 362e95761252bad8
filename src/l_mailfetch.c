/* l_mailfetch.c - Lua binding of libcurl's IMAP and POP3 client: module "mailshot.mailfetch".
 *
 *   local mailfetch = require "mailshot.mailfetch"
 *   local h = mailfetch.new{ user=, password=, ca_file=, insecure=false, timeout=30,
 *                            tls = "implicit" | "required" | "optional" }
 *   local body, err, kind, size, partial = h:perform(url[, request[, max_bytes]])
 *   h:connects()  -> how many connections this handle has opened so far
 *   h:close()
 *
 * One handle is one libcurl easy handle, so one connection that curl keeps open and reuses from one
 * perform to the next (one IMAP login, one selected mailbox, one POP3 session).  perform runs one
 * transfer: the URL alone fetches (imaps://host/INBOX;UID=12, pop3s://host/3), a request sends that
 * command instead (curl's CURLOPT_CUSTOMREQUEST: "UID SEARCH UNSEEN", "UIDL") and returns the
 * server's untagged lines (IMAP) or its multi-line answer (POP3).  The protocol logic (which commands,
 * parsing their answers, read-only fetches, moves) is in lua/mailshot/mailbox_curl.lua.
 *
 * Errors: nil, "curl's reason (server: its last line)", kind, size, partial.  kind is one of "login",
 * "mailbox" (no such mailbox), "dropped" (the connection broke, or an answer curl did not expect), "tls", "starttls", "connect", "timeout", "too-big", "gone", "refused", "error"; size is the
 * message's size when curl knew it, and partial its first max_bytes bytes ("too-big": the transfer
 * was cut off there, which also closes the connection).  The password never appears: it is given to curl as its own option
 * (never in the URL), only the server's lines are kept for messages (never ours, which carry the
 * AUTHENTICATE data), and anything curl says is scrubbed of it all the same.
 *
 * Why the easy (blocking) interface and not curl's multi interface on src/loop.c: reading a bounce
 * mailbox is `mailshot bounces`, a one-shot batch command that runs nothing else meanwhile, and one
 * mailbox is read one message at a time in order (list, fetch, mark).  Blocking calls keep this
 * binding a page long; a transfer that stalls is bounded by `timeout` (connect, and no byte for that
 * long).  It must not be called from a campaign's tasks while they send: it would stop their loop. */
#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>

#include "bytebuf.h"
#include "l_check.h"
#include "l_class.h"

#define FETCH_MT "mailshot.mailfetch"
#define DEFAULT_MAX (64 * 1024 * 1024)

typedef struct {
  CURL *curl;
  char *password;            /* a copy, to scrub it from anything curl says */
  char errbuf[CURL_ERROR_SIZE];
  char last_in[256];         /* the server's last line (CURLINFO_HEADER_IN), for error messages */
  int said_goodbye;          /* we sent LOGOUT/QUIT (curl closing after an error): keep last_in */
  long connects;
  /* the transfer in progress */
  bytebuf body;
  size_t max_bytes;
  int too_big;
} fetcher;

static size_t on_write(char *p, size_t size, size_t n, void *ud) {
  fetcher *f = ud;
  size_t add = size * n;
  if (add > f->max_bytes - f->body.len) {   /* keep the first max_bytes; curl aborts: WRITE_ERROR */
    if (bytebuf_append(&f->body, p, f->max_bytes - f->body.len) == 0) f->too_big = 1;
    return 0;
  }
  if (bytebuf_append(&f->body, p, add) != 0) return 0;
  return add;
}

/* Keeps the server's last line only: curl's own messages say little ("Quote command returned
 * error", "Select failed"), the server's NO says why.  Of the lines we send (HEADER_OUT, which hold the
 * AUTHENTICATE data) nothing is kept: they are only checked for the LOGOUT or QUIT that curl sends
 * when it closes the connection after an error, whose answer must not hide the server's reason. */
static int is_goodbye(const char *data, size_t n) {
  if (n >= 4 && strncmp(data, "QUIT", 4) == 0) return 1;
  const char *sp = memchr(data, ' ', n);
  return sp && (size_t)(data + n - sp) >= 7 && strncmp(sp, " LOGOUT", 7) == 0;
}

static int on_debug(CURL *c, curl_infotype type, char *data, size_t n, void *ud) {
  (void)c;
  fetcher *f = ud;
  if (type == CURLINFO_HEADER_OUT && is_goodbye(data, n)) f->said_goodbye = 1;
  if (type != CURLINFO_HEADER_IN || f->said_goodbye) return 0;
  while (n > 0 && (data[n - 1] == '\n' || data[n - 1] == '\r')) n--;
  if (n == 0) return 0;
  if (n >= sizeof f->last_in) n = sizeof f->last_in - 1;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)data[i];
    f->last_in[i] = ch < 0x20 || ch == 0x7f ? '?' : (char)ch;
  }
  f->last_in[n] = '\0';
  return 0;
}

static fetcher *check_fetcher(lua_State *L) {
  fetcher *f = luaL_checkudata(L, 1, FETCH_MT);
  l_checkopen(L, f->curl != NULL, "mail connection");
  return f;
}

/* Option `key` of the table at t: a string without NUL, or NULL.  Left on the stack (a number
 * converted to a string lives only there). */
static const char *opt_string(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  if (lua_isnil(L, -1)) return NULL;
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  if (!s) luaL_error(L, "mailfetch.new: option '%s' must be a string", key);
  if (memchr(s, '\0', len)) luaL_error(L, "mailfetch.new: option '%s' must not contain a NUL byte", key);
  return s;
}

static int opt_bool(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  int b = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return b;
}

#define SETOPT(f, opt, val) do { if (curl_easy_setopt((f)->curl, opt, val) != CURLE_OK) return #opt; } while (0)

/* Every option of the connection; the name of the one curl refused, or NULL. */
static const char *configure(fetcher *f, const char *user, const char *ca_file, int insecure,
                             long timeout, long use_ssl) {
  SETOPT(f, CURLOPT_NOSIGNAL, 1L);                   /* no SIGALRM for DNS timeouts: one thread */
#if LIBCURL_VERSION_NUM >= 0x075500
  SETOPT(f, CURLOPT_PROTOCOLS_STR, "imap,imaps,pop3,pop3s");
#else
  SETOPT(f, CURLOPT_PROTOCOLS, (long)(CURLPROTO_IMAP | CURLPROTO_IMAPS | CURLPROTO_POP3 | CURLPROTO_POP3S));
#endif
  SETOPT(f, CURLOPT_ERRORBUFFER, f->errbuf);
  SETOPT(f, CURLOPT_WRITEFUNCTION, on_write);
  SETOPT(f, CURLOPT_WRITEDATA, f);
  SETOPT(f, CURLOPT_DEBUGFUNCTION, on_debug);
  SETOPT(f, CURLOPT_DEBUGDATA, f);
  SETOPT(f, CURLOPT_VERBOSE, 1L);                    /* feeds on_debug only: nothing is printed */
  SETOPT(f, CURLOPT_CONNECTTIMEOUT, timeout);
  SETOPT(f, CURLOPT_SERVER_RESPONSE_TIMEOUT, timeout);   /* a greeting or reply that never comes */
  SETOPT(f, CURLOPT_LOW_SPEED_LIMIT, 1L);            /* a stalled server: no byte for `timeout` s */
  SETOPT(f, CURLOPT_LOW_SPEED_TIME, timeout);
  SETOPT(f, CURLOPT_USE_SSL, use_ssl);
  if (user) SETOPT(f, CURLOPT_USERNAME, user);
  if (f->password) SETOPT(f, CURLOPT_PASSWORD, f->password);
  if (ca_file) {
    /* CAINFO alone would replace the system's CAs: keep them too, as `mailshot check` does */
    SETOPT(f, CURLOPT_CAINFO, ca_file);
    const char *capath = curl_version_info(CURLVERSION_NOW)->capath;
    if (capath) SETOPT(f, CURLOPT_CAPATH, capath);
  }
  if (insecure) {
    SETOPT(f, CURLOPT_SSL_VERIFYPEER, 0L);
    SETOPT(f, CURLOPT_SSL_VERIFYHOST, 0L);
  }
  return NULL;
}

/* mailfetch.new{ user=, password=, ca_file=, insecure=, timeout=, tls= } -> handle | nil, err */
static int l_new(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  const char *user = opt_string(L, 1, "user");
  const char *password = opt_string(L, 1, "password");
  const char *ca_file = opt_string(L, 1, "ca_file");
  int insecure = opt_bool(L, 1, "insecure");
  lua_getfield(L, 1, "timeout");
  int isnum;
  lua_Number timeout = lua_isnil(L, -1) ? 30 : lua_tonumberx(L, -1, &isnum);
  if (!lua_isnil(L, -1) && !isnum) return luaL_error(L, "mailfetch.new: option 'timeout' must be a number");
  lua_pop(L, 1);
  if (!(timeout >= 1 && timeout <= 3600)) return luaL_error(L, "mailfetch.new: timeout must be in [1, 3600] seconds");
  static const char *const modes[] = { "implicit", "required", "optional", NULL };
  static const long use_ssl[] = { CURLUSESSL_NONE, CURLUSESSL_ALL, CURLUSESSL_TRY };
  lua_getfield(L, 1, "tls");
  const char *tls = luaL_optstring(L, -1, "implicit");
  int mode = 0;
  while (modes[mode] && strcmp(modes[mode], tls) != 0) mode++;
  if (!modes[mode]) return luaL_error(L, "mailfetch.new: option 'tls' must be implicit, required or optional");
  lua_pop(L, 1);

  fetcher *f = lua_newuserdatauv(L, sizeof *f, 0);
  memset(f, 0, sizeof *f);
  luaL_setmetatable(L, FETCH_MT);
  if (password && !(f->password = strdup(password))) return luaL_error(L, "out of memory");
  if (!(f->curl = curl_easy_init())) return luaL_error(L, "curl_easy_init failed");
  const char *bad = configure(f, user, ca_file, insecure, (long)timeout, use_ssl[mode]);
  if (bad) {
    lua_pushnil(L);
    lua_pushfstring(L, "libcurl refused option %s (libcurl %s)", bad, curl_version_info(CURLVERSION_NOW)->version);
    return 2;
  }
  return 1;
}

static const char *kind_of(CURLcode rc, int too_big, const char *errbuf) {
  if (too_big) return "too-big";
  switch (rc) {
  case CURLE_LOGIN_DENIED:   /* curl says so for a SELECT refused too */
    return strncmp(errbuf, "Select failed", 13) == 0 ? "mailbox" : "login";
  case CURLE_PEER_FAILED_VERIFICATION: case CURLE_SSL_CONNECT_ERROR: case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CACERT_BADFILE: case CURLE_SSL_CIPHER: case CURLE_SSL_ISSUER_ERROR:
    return "tls";
  case CURLE_USE_SSL_FAILED: return "starttls";
  case CURLE_COULDNT_RESOLVE_HOST: case CURLE_COULDNT_CONNECT: return "connect";
  case CURLE_OPERATION_TIMEDOUT: return "timeout";
  case CURLE_REMOTE_FILE_NOT_FOUND: return "gone";
  case CURLE_QUOTE_ERROR: return "refused";
  /* the server closed a connection curl kept (an idle timeout, a restart, an admin's kick): a new
   * connection may well work.  IMAP shows it as a failed read after "* BYE", POP3 as an unexpected
   * reply ("-ERR [SYS/TEMP] Server shutting down." to RETR) */
  case CURLE_RECV_ERROR: case CURLE_SEND_ERROR: case CURLE_GOT_NOTHING: case CURLE_WEIRD_SERVER_REPLY:
    return "dropped";
  default: return "error";
  }
}

/* Pushes msg with every copy of the password replaced by "***": a second guard, since neither curl's
 * messages nor the server's lines carry it.  Not for passwords under 4 bytes, which would only mangle
 * words ("p" in "port"). */
static void push_scrubbed(lua_State *L, const fetcher *f, const char *msg) {
  const char *pw = f->password;
  size_t pwlen = pw && strlen(pw) >= 4 ? strlen(pw) : 0;
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  const char *hit;
  while (pwlen > 0 && (hit = strstr(msg, pw)) != NULL) {
    luaL_addlstring(&b, msg, (size_t)(hit - msg));
    luaL_addstring(&b, "***");
    msg = hit + pwlen;
  }
  luaL_addstring(&b, msg);
  luaL_pushresult(&b);
}

/* curl URL-decodes a custom request (so "%" must be sent as "%25"); NULL for no request. */
static int push_request(lua_State *L, int idx) {
  size_t len;
  const char *s = luaL_optlstring(L, idx, NULL, &len);
  if (!s) { lua_pushnil(L); return 0; }
  for (size_t i = 0; i < len; i++)
    if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) return luaL_argerror(L, idx, "a request must be one line of text");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (size_t i = 0; i < len; i++) {
    if (s[i] == '%') luaL_addstring(&b, "%25"); else luaL_addchar(&b, s[i]);
  }
  luaL_pushresult(&b);
  return 0;
}

/* h:perform(url[, request[, max_bytes]]) -> body | nil, message, kind, size, partial */
static int l_perform(lua_State *L) {
  fetcher *f = check_fetcher(L);
  const char *url = l_checkcstring(L, 2);
  lua_Integer max = luaL_optinteger(L, 4, DEFAULT_MAX);
  luaL_argcheck(L, max > 0, 4, "max_bytes must be positive");
  lua_settop(L, 4);
  push_request(L, 3);   /* at 5 */
  const char *request = lua_tostring(L, 5);
  bytebuf_free(&f->body);
  f->max_bytes = (size_t)max;
  f->too_big = 0;
  f->errbuf[0] = f->last_in[0] = '\0';
  f->said_goodbye = 0;
  if (curl_easy_setopt(f->curl, CURLOPT_URL, url) != CURLE_OK ||
      curl_easy_setopt(f->curl, CURLOPT_CUSTOMREQUEST, request) != CURLE_OK)
    return luaL_error(L, "out of memory");
  CURLcode rc = curl_easy_perform(f->curl);
  long n = 0;
  if (curl_easy_getinfo(f->curl, CURLINFO_NUM_CONNECTS, &n) == CURLE_OK) f->connects += n;
  if (rc == CURLE_OK) {
    lua_pushlstring(L, f->body.data ? f->body.data : "", f->body.len);
    bytebuf_free(&f->body);
    return 1;
  }
  lua_pushnil(L);
  if (f->too_big) lua_pushfstring(L, "over the limit of %I bytes", max);
  else {
    const char *why = f->errbuf[0] ? f->errbuf : curl_easy_strerror(rc);
    if (f->last_in[0] && rc != CURLE_PEER_FAILED_VERIFICATION && rc != CURLE_COULDNT_CONNECT)
      lua_pushfstring(L, "%s (server: %s)", why, f->last_in);
    else
      lua_pushstring(L, why);
    push_scrubbed(L, f, lua_tostring(L, -1));
    lua_remove(L, -2);
  }
  lua_pushstring(L, kind_of(rc, f->too_big, f->errbuf));
  curl_off_t size = -1;
  if (curl_easy_getinfo(f->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &size) == CURLE_OK && size >= 0)
    lua_pushinteger(L, (lua_Integer)size);
  else
    lua_pushnil(L);
  if (f->too_big) lua_pushlstring(L, f->body.data ? f->body.data : "", f->body.len); else lua_pushnil(L);
  bytebuf_free(&f->body);
  return 5;
}

static int l_connects(lua_State *L) {
  fetcher *f = check_fetcher(L);
  lua_pushinteger(L, f->connects);
  return 1;
}

/* Closing sends LOGOUT (IMAP) or QUIT (POP3) on the open connection. */
static int l_close(lua_State *L) {
  fetcher *f = luaL_checkudata(L, 1, FETCH_MT);
  if (f->curl) { curl_easy_cleanup(f->curl); f->curl = NULL; }
  if (f->password) {
    memset(f->password, 0, strlen(f->password));
    free(f->password);
    f->password = NULL;
  }
  bytebuf_free(&f->body);
  return 0;
}

static int l_version(lua_State *L) {
  lua_pushstring(L, curl_version_info(CURLVERSION_NOW)->version);
  return 1;
}

int luaopen_mailshot_mailfetch(lua_State *L) {
  static const luaL_Reg methods[] = { { "perform", l_perform }, { "connects", l_connects },
                                      { "close", l_close }, { NULL, NULL } };
  static const luaL_Reg meta[] = { { "__gc", l_close }, { "__close", l_close }, { NULL, NULL } };
  static const luaL_Reg funcs[] = { { "new", l_new }, { "version", l_version }, { NULL, NULL } };
  static int initialised;
  if (!initialised) {
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) return luaL_error(L, "libcurl: %s", curl_easy_strerror(rc));
    atexit(curl_global_cleanup);
    initialised = 1;
  }
  l_newclass(L, FETCH_MT, meta, methods);
  luaL_newlib(L, funcs);
  return 1;
}
