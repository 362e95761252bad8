/* l_util.c - module "mailshot.util": the few system services the campaign runner's journal
 * and graceful stop need, that plain Lua cannot do.
 *
 *   util.sha256(s) -> hex                 util.sha256_file(path) -> hex | nil, err
 *   util.lock(path) -> lock | nil, err    (an exclusive flock held until lock:unlock() or exit)
 *   util.fsync(file) -> true | nil, err   (a Lua file handle: its buffer flushed, then fsync(2))
 *   util.wait_signal() -> "INT" | "TERM"  (suspends the task until SIGINT or SIGTERM; after the
 *                                          first call those signals no longer kill the process)
 *   util.exit_now(status)                 (_exit: no flushing of other handles, no atexit)
 *   util.write_secret(path, data)         (a new file, mode 0600 from the start)
 *   util.replace_file(path, data) -> true | nil, err
 *                                         (a fresh 0600 file renamed over path: never writes
 *                                          through a symlink or into a file already there)
 *   util.temp_file(path) -> file, tmp_path | nil, err
 *                                         (a new 0600 file beside path, opened for writing: to
 *                                          build a file's next version, then os.rename it over)
 *   util.new_set() -> set                 (set:add(s) -> true if new; set:count(): compact)
 *   util.line_index([limit]) -> index     (index:set(i, v), index:get(i) -> v | nil, index:size():
 *                                          an integer per line 1..limit, 8 bytes each, grown to
 *                                          the highest line set; what --resume keeps)
 *   util.list_dir(path) -> { name, ... } | nil, err
 *                                         (a folder's entries but . and .., in no order; what
 *                                          reading a Maildir needs)
 *   util.mkdir(path) -> true | nil, err, "exists"
 *                                         (a new folder, mode 0700)
 *   util.stat(path) -> "file"|"dir"|"other", size, mtime | nil, err
 *                                         (stat(2), following symlinks) */
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "l_check.h"
#include "l_class.h"
#include "task.h"

static void push_hex(lua_State *L, const unsigned char *d, unsigned n) {
  static const char hex[] = "0123456789abcdef";
  char out[2 * EVP_MAX_MD_SIZE];
  for (unsigned i = 0; i < n; i++) { out[2 * i] = hex[d[i] >> 4]; out[2 * i + 1] = hex[d[i] & 15]; }
  lua_pushlstring(L, out, 2 * n);
}

static int u_sha256(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  if (!EVP_Digest(s, len, d, &n, EVP_sha256(), NULL)) return luaL_error(L, "sha256 failed");
  push_hex(L, d, n);
  return 1;
}

/* util.hmac_sha256(key, data) -> hex: HMAC-SHA256 (RFC 2104) of data under key, both binary-safe
 * strings (an empty key is allowed here; callers that need a real secret check for it). */
static int u_hmac_sha256(lua_State *L) {
  size_t klen, dlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *data = luaL_checklstring(L, 2, &dlen);
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  if (klen > INT_MAX) return luaL_argerror(L, 1, "key too long");
  if (!HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)data, dlen, d, &n))
    return luaL_error(L, "hmac_sha256 failed");
  push_hex(L, d, n);
  return 1;
}

static int u_sha256_file(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  FILE *f = fopen(path, "rb");
  if (!f) return luaL_fileresult(L, 0, path);
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
  char buf[65536];
  size_t n;
  while (ok && (n = fread(buf, 1, sizeof buf, f)) > 0) ok = EVP_DigestUpdate(ctx, buf, n);
  int readerr = ferror(f);
  fclose(f);
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned dn = 0;
  if (ok && !readerr) ok = EVP_DigestFinal_ex(ctx, d, &dn);
  EVP_MD_CTX_free(ctx);
  if (readerr) return luaL_fileresult(L, 0, path);
  if (!ok) return luaL_error(L, "sha256 failed");
  push_hex(L, d, dn);
  return 1;
}

/* ---- locks ---- */

#define LOCK_MT "mailshot.lock"
typedef struct { int fd; } ulock;

static int u_lock(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  ulock *lk = lua_newuserdatauv(L, sizeof *lk, 0);
  lk->fd = -1;
  luaL_setmetatable(L, LOCK_MT);
  lk->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lk->fd < 0) return luaL_fileresult(L, 0, path);
  if (flock(lk->fd, LOCK_EX | LOCK_NB) < 0) {
    int e = errno;
    close(lk->fd);
    lk->fd = -1;
    lua_pushnil(L);
    lua_pushstring(L, e == EWOULDBLOCK ? "locked by another process" : strerror(e));
    return 2;
  }
  return 1;
}

static int u_unlock(lua_State *L) {
  ulock *lk = luaL_checkudata(L, 1, LOCK_MT);
  if (lk->fd >= 0) { close(lk->fd); lk->fd = -1; }   /* closing releases the flock */
  return 0;
}

/* ---- fsync of a Lua file ---- */

static int u_fsync(lua_State *L) {
  luaL_Stream *p = luaL_checkudata(L, 1, LUA_FILEHANDLE);
  if (!p->closef || !p->f) return luaL_error(L, "attempt to use a closed file");
  if (fflush(p->f) != 0) return luaL_fileresult(L, 0, NULL);
  return luaL_fileresult(L, fsync(fileno(p->f)) == 0, NULL);
}

/* ---- signals through signalfd, on the loop ---- */

static int sigfd = -1;
static task_wait sig_wait;       /* the task parked in wait_signal(): only a signal wakes it */
static int sig_pending;          /* a signal that came while nobody waited */

/* The task parked in wait_signal, if it still waits there (else its wait is released). */
static lua_State *sig_waiter(void) {
  lua_State *co = task_wait_target(&sig_wait);
  if (!co) task_wait_cancel(&sig_wait);
  return co;
}

static void on_signal(loop *l, int fd, int events, void *data) {
  struct signalfd_siginfo si;
  while (read(fd, &si, sizeof si) == (ssize_t)sizeof si) {
    int name = si.ssi_signo == SIGINT ? 'I' : 'T';
    lua_State *co = sig_waiter();
    if (co && lua_checkstack(co, 1)) {
      lua_pushstring(co, name == 'I' ? "INT" : "TERM");
      task_wait_done(&sig_wait, 1);
    } else {
      sig_pending = name;
    }
  }
}

static int u_wait_signal(lua_State *L) {
  if (sigfd < 0) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &set, NULL) < 0) return luaL_error(L, "sigprocmask: %s", strerror(errno));
    sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sigfd < 0) return luaL_error(L, "signalfd: %s", strerror(errno));
    if (loop_watch(task_loop(L), sigfd, LOOP_READ, on_signal, NULL) < 0) return luaL_error(L, "epoll: %s", strerror(errno));
  }
  if (sig_pending) {
    lua_pushstring(L, sig_pending == 'I' ? "INT" : "TERM");
    sig_pending = 0;
    return 1;
  }
  if (sig_waiter()) return luaL_error(L, "another task already waits for signals");
  if (!task_can_wait(L)) return task_suspend(L);   /* raises the "inside a task" error */
  task_wait_begin(L, &sig_wait, "util.wait_signal");
  return task_suspend(L);
}

/* Stop waiting for signals (the run is over): the loop must not keep the fd alive. */
static int u_stop_signals(lua_State *L) {
  if (sigfd >= 0) {
    loop_unwatch(task_loop(L), sigfd);
    close(sigfd);
    sigfd = -1;
  }
  task_wait_cancel(&sig_wait);   /* the waiting task, if any, is not woken any more */
  return 0;
}

/* util.write_secret(path, data): create path (it must not exist) with mode 0600 and write data:
 * a private key is never readable by others, not even for a moment. */
static int u_write_secret(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return luaL_fileresult(L, 0, path);
  size_t off = 0;
  while (off < len) {
    ssize_t n = write(fd, data + off, len - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) { int e = errno; close(fd); errno = e; return luaL_fileresult(L, 0, path); }
    off += (size_t)n;
  }
  if (fsync(fd) < 0 || close(fd) < 0) return luaL_fileresult(L, 0, path);
  lua_pushboolean(L, 1);
  return 1;
}

/* Writes len bytes of data to fd; 0, or -1 with errno. */
static int write_all(int fd, const char *data, size_t len) {
  size_t off = 0;
  while (off < len) {
    ssize_t n = write(fd, data + off, len - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    off += (size_t)n;
  }
  return 0;
}

/* util.replace_file(path, data) -> true | nil, "path: reason"
 * Outbox files live in a folder others may write to, or that a previous run filled: a symlink
 * planted at path must not redirect the write.  So data goes to a new file in the same folder
 * (mkostemp: O_CREAT|O_EXCL, a random name, mode 0600; O_EXCL never follows a symlink), which is
 * then renamed over path: rename() replaces whatever path is, a symlink included, and never
 * follows it.  A file from a previous run is replaced, as a plain open for writing would. */
static int u_replace_file(lua_State *L) {
  size_t plen, len;
  const char *path = luaL_checklstring(L, 1, &plen);
  const char *data = luaL_checklstring(L, 2, &len);
  static const char suffix[] = ".tmp-XXXXXX";
  if (strlen(path) != plen) return luaL_argerror(L, 1, "path contains a NUL byte");
  char *tmp = malloc(plen + sizeof suffix);
  if (!tmp) return luaL_error(L, "out of memory");
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, suffix, sizeof suffix);
  int e = 0, fd = mkostemp(tmp, O_CLOEXEC);
  if (fd < 0) e = errno;
  else {
    if (write_all(fd, data, len) != 0) e = errno;
    if (close(fd) != 0 && !e) e = errno;
    if (!e && rename(tmp, path) != 0) e = errno;
    if (e) unlink(tmp);  /* best effort: the error reported is the first one */
  }
  free(tmp);
  if (e) { errno = e; return luaL_fileresult(L, 0, path); }
  lua_pushboolean(L, 1);
  return 1;
}

/* The close function of a util.temp_file handle (liolib's own is static). */
static int temp_fclose(lua_State *L) {
  luaL_Stream *p = luaL_checkudata(L, 1, LUA_FILEHANDLE);
  return luaL_fileresult(L, fclose(p->f) == 0, NULL);
}

/* util.temp_file(path) -> file, tmp_path | nil, "path: reason"
 * A new file in path's folder (mkostemp: O_EXCL, a random name, mode 0600, never through a
 * symlink), as a Lua file open for writing: a file too big to build in memory (the report
 * rewritten in CSV order) is written there, then renamed over path by the caller. */
static int u_temp_file(lua_State *L) {
  size_t plen;
  const char *path = luaL_checklstring(L, 1, &plen);
  static const char suffix[] = ".tmp-XXXXXX";
  if (strlen(path) != plen) return luaL_argerror(L, 1, "path contains a NUL byte");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addlstring(&b, path, plen);
  luaL_addlstring(&b, suffix, sizeof suffix);     /* with its NUL: mkostemp edits it in place */
  luaL_pushresult(&b);
  char *tmp = (char *)lua_tostring(L, -1);        /* a fresh string of ours: safe to edit */
  luaL_Stream *p = lua_newuserdatauv(L, sizeof *p, 0);
  p->closef = NULL;                               /* not open yet: __gc does nothing */
  luaL_setmetatable(L, LUA_FILEHANDLE);
  int fd = mkostemp(tmp, O_CLOEXEC);
  if (fd < 0) return luaL_fileresult(L, 0, path);
  p->f = fdopen(fd, "wb");
  if (!p->f) {
    int e = errno;
    close(fd);
    unlink(tmp);
    errno = e;
    return luaL_fileresult(L, 0, path);
  }
  p->closef = temp_fclose;
  lua_pushlstring(L, tmp, plen + sizeof suffix - 1);
  return 2;
}

/* ---- a compact set of strings, for "each address once" over million-row lists ----
 * Only a 64-bit keyed hash of each string is kept (8 bytes a slot, the table at most half
 * full: ~16-32 bytes per address instead of ~100 for a Lua table of strings).  The key is
 * random per process, so a crafted list cannot aim collisions at the probing; two different
 * addresses sharing a 64-bit hash is a 1-in-10^7 event for a million addresses. */
#define SET_MT "mailshot.set"
typedef struct { uint64_t *slots; size_t cap, count; uint64_t k0, k1; } uset;

static uint64_t mix64(uint64_t x) {          /* splitmix64's finalizer */
  x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27; x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

static uint64_t set_hash(const uset *st, const char *p, size_t n) {
  uint64_t h = st->k0 ^ (uint64_t)n;
  for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 0x100000001b3ULL;   /* FNV-1a */
  h = mix64(h ^ st->k1);
  return h ? h : 1;                          /* 0 marks an empty slot */
}

static int set_insert(uset *st, uint64_t h) {  /* 1 new, 0 present */
  size_t i = (size_t)h & (st->cap - 1);
  while (st->slots[i]) {
    if (st->slots[i] == h) return 0;
    i = (i + 1) & (st->cap - 1);
  }
  st->slots[i] = h;
  st->count++;
  return 1;
}

static int set_grow(uset *st) {
  size_t ncap = st->cap ? st->cap * 2 : 1024;
  uint64_t *old = st->slots, *ns = calloc(ncap, sizeof *ns);
  if (!ns) return -1;
  size_t ocap = st->cap;
  st->slots = ns;
  st->cap = ncap;
  st->count = 0;
  for (size_t i = 0; i < ocap; i++) if (old[i]) set_insert(st, old[i]);
  free(old);
  return 0;
}

static int u_new_set(lua_State *L) {
  uset *st = lua_newuserdatauv(L, sizeof *st, 0);
  memset(st, 0, sizeof *st);
  luaL_setmetatable(L, SET_MT);
  unsigned char seed[16];
  FILE *r = fopen("/dev/urandom", "rb");
  if (!r || fread(seed, 1, sizeof seed, r) != sizeof seed) {
    if (r) fclose(r);
    return luaL_error(L, "cannot read /dev/urandom");
  }
  fclose(r);
  memcpy(&st->k0, seed, 8);
  memcpy(&st->k1, seed + 8, 8);
  if (set_grow(st) < 0) return luaL_error(L, "out of memory");
  return 1;
}

/* set:add(s) -> true when s was not in the set yet */
static int set_add(lua_State *L) {
  uset *st = luaL_checkudata(L, 1, SET_MT);
  size_t n;
  const char *p = luaL_checklstring(L, 2, &n);
  if ((st->count + 1) * 2 > st->cap && set_grow(st) < 0) return luaL_error(L, "out of memory");
  lua_pushboolean(L, set_insert(st, set_hash(st, p, n)));
  return 1;
}

static int set_count(lua_State *L) {
  uset *st = luaL_checkudata(L, 1, SET_MT);
  lua_pushinteger(L, (lua_Integer)st->count);
  return 1;
}

static int set_gc(lua_State *L) {
  uset *st = luaL_checkudata(L, 1, SET_MT);
  free(st->slots);
  st->slots = NULL;
  st->cap = st->count = 0;
  return 0;
}

/* ---- an integer per CSV line, for --resume over million-record journals ----
 * A Lua table of a million records costs over a gigabyte; the journal's reader keeps here,
 * per line, where that line's last record starts in the file (and its kind), 8 bytes a line,
 * and reads the record itself again when the campaign reaches the line.  0 means "none".
 * The array grows (doubling) to the highest line set, never past `limit`. */
#define INDEX_MT "mailshot.line_index"
typedef struct { int64_t *v; lua_Integer n, limit; } lindex;

static int u_line_index(lua_State *L) {
  lua_Integer limit = luaL_optinteger(L, 1, LUA_MAXINTEGER);
  luaL_argcheck(L, limit >= 0, 1, "negative limit");
  lindex *ix = lua_newuserdatauv(L, sizeof *ix, 0);
  ix->v = NULL;
  ix->n = 0;
  ix->limit = limit;
  luaL_setmetatable(L, INDEX_MT);
  return 1;
}

/* Room for lines 1..i (i <= limit): 0 or -1 (out of memory). */
static int index_grow(lindex *ix, lua_Integer i) {
  lua_Integer n = ix->n < 512 ? 1024 : ix->n * 2;
  if (n < i) n = i;
  if (n > ix->limit) n = ix->limit;
  if ((uint64_t)n >= SIZE_MAX / sizeof(int64_t) - 1) return -1;
  int64_t *v = realloc(ix->v, ((size_t)n + 1) * sizeof *v);
  if (!v) return -1;
  memset(v + ix->n + 1, 0, (size_t)(n - ix->n) * sizeof *v);
  if (ix->n == 0) v[0] = 0;
  ix->v = v;
  ix->n = n;
  return 0;
}

/* index:set(i, v) -> true, or false when i is outside 1..limit (the caller ignores that line) */
static int index_set(lua_State *L) {
  lindex *ix = luaL_checkudata(L, 1, INDEX_MT);
  lua_Integer i = luaL_checkinteger(L, 2), v = luaL_checkinteger(L, 3);
  if (i < 1 || i > ix->limit) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (i > ix->n && index_grow(ix, i) < 0) return luaL_error(L, "out of memory (an index of %I lines)", i);
  ix->v[i] = (int64_t)v;
  lua_pushboolean(L, 1);
  return 1;
}

/* index:get(i) -> v, or nil when line i was never set (or set to 0) */
static int index_get(lua_State *L) {
  lindex *ix = luaL_checkudata(L, 1, INDEX_MT);
  lua_Integer i = luaL_checkinteger(L, 2);
  if (i < 1 || i > ix->n || ix->v[i] == 0) lua_pushnil(L);
  else lua_pushinteger(L, (lua_Integer)ix->v[i]);
  return 1;
}

static int index_size(lua_State *L) {
  lindex *ix = luaL_checkudata(L, 1, INDEX_MT);
  lua_pushinteger(L, ix->n);
  return 1;
}

static int index_gc(lua_State *L) {
  lindex *ix = luaL_checkudata(L, 1, INDEX_MT);
  free(ix->v);
  ix->v = NULL;
  ix->n = 0;
  return 0;
}

/* ---- folders: what reading and marking a Maildir needs ---- */

/* util.list_dir(path) -> { name, ... } | nil, "path: reason" */
static int u_list_dir(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  lua_newtable(L);   /* before opendir: a memory error in Lua then leaks no DIR */
  DIR *d = opendir(path);
  if (!d) return luaL_fileresult(L, 0, path);
  lua_Integer n = 0;
  struct dirent *e;
  errno = 0;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    lua_pushstring(L, e->d_name);  /* may raise on no memory: the DIR leaks then, as any */
    lua_rawseti(L, -2, ++n);
    errno = 0;
  }
  int err = errno;
  closedir(d);
  if (err) { errno = err; return luaL_fileresult(L, 0, path); }
  return 1;
}

/* util.mkdir(path) -> true | nil, "path: reason", "exists" (the third value only for EEXIST) */
static int u_mkdir(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  if (mkdir(path, 0700) == 0) { lua_pushboolean(L, 1); return 1; }
  int e = errno;
  luaL_fileresult(L, 0, path);
  if (e == EEXIST) { lua_pop(L, 1); lua_pushliteral(L, "exists"); return 3; }
  return 3;
}

/* util.stat(path) -> "file" | "dir" | "other", size, mtime | nil, "path: reason" */
static int u_stat(lua_State *L) {
  const char *path = l_checkcstring(L, 1);
  struct stat st;
  if (stat(path, &st) != 0) return luaL_fileresult(L, 0, path);
  lua_pushstring(L, S_ISREG(st.st_mode) ? "file" : S_ISDIR(st.st_mode) ? "dir" : "other");
  lua_pushinteger(L, (lua_Integer)st.st_size);
  lua_pushinteger(L, (lua_Integer)st.st_mtime);
  return 3;
}

static int u_exit_now(lua_State *L) {
  _exit((int)luaL_optinteger(L, 1, 1));
}

int luaopen_mailshot_util(lua_State *L) {
  static const luaL_Reg funcs[] = {
    { "sha256", u_sha256 }, { "hmac_sha256", u_hmac_sha256 }, { "sha256_file", u_sha256_file }, { "lock", u_lock }, { "fsync", u_fsync },
    { "wait_signal", u_wait_signal }, { "stop_signals", u_stop_signals }, { "exit_now", u_exit_now },
    { "write_secret", u_write_secret }, { "replace_file", u_replace_file }, { "temp_file", u_temp_file }, { "new_set", u_new_set },
    { "line_index", u_line_index },
    { "list_dir", u_list_dir }, { "mkdir", u_mkdir }, { "stat", u_stat },
    { NULL, NULL }
  };
  static const luaL_Reg lockm[] = { { "unlock", u_unlock }, { "__gc", u_unlock }, { "__close", u_unlock }, { NULL, NULL } };
  l_newclass(L, LOCK_MT, lockm, NULL);
  static const luaL_Reg setm[] = { { "add", set_add }, { "count", set_count }, { "__gc", set_gc }, { NULL, NULL } };
  l_newclass(L, SET_MT, setm, NULL);
  static const luaL_Reg indexm[] = { { "set", index_set }, { "get", index_get }, { "size", index_size },
                                     { "__gc", index_gc }, { NULL, NULL } };
  l_newclass(L, INDEX_MT, indexm, NULL);
  luaL_newlib(L, funcs);
  return 1;
}
