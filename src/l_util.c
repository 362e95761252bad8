/* l_util.c - module "mailshot.util": the few system services the campaign runner's journal
 * and graceful stop need, that plain Lua cannot do.
 *
 *   util.sha256(s) -> hex                 util.sha256_file(path) -> hex | nil, err
 *   util.lock(path) -> lock | nil, err    (an exclusive flock held until lock:unlock() or exit)
 *   util.fsync(file) -> true | nil, err   (a Lua file handle: its buffer flushed, then fsync(2))
 *   util.wait_signal() -> "INT" | "TERM"  (suspends the task until SIGINT or SIGTERM; after the
 *                                          first call those signals no longer kill the process)
 *   util.exit_now(status)                 (_exit: no flushing of other handles, no atexit)
 *   util.write_secret(path, data)         (a new file, mode 0600 from the start) */
#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <unistd.h>

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

static int u_sha256_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
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
  const char *path = luaL_checkstring(L, 1);
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
static lua_State *sig_waiter;
static int sig_pending;          /* a signal that came while nobody waited */

static void on_signal(loop *l, int fd, int events, void *data) {
  struct signalfd_siginfo si;
  while (read(fd, &si, sizeof si) == (ssize_t)sizeof si) {
    int name = si.ssi_signo == SIGINT ? 'I' : 'T';
    if (sig_waiter) {
      lua_State *co = sig_waiter;
      sig_waiter = NULL;
      lua_pushstring(co, name == 'I' ? "INT" : "TERM");
      task_wake(co, 1);
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
  if (sig_waiter) return luaL_error(L, "another task already waits for signals");
  if (!lua_isyieldable(L)) return task_suspend(L);   /* raises the "inside a task" error */
  sig_waiter = L;
  return task_suspend(L);
}

/* Stop waiting for signals (the run is over): the loop must not keep the fd alive. */
static int u_stop_signals(lua_State *L) {
  if (sigfd >= 0) {
    loop_unwatch(task_loop(L), sigfd);
    close(sigfd);
    sigfd = -1;
  }
  sig_waiter = NULL;
  return 0;
}

/* util.write_secret(path, data): create path (it must not exist) with mode 0600 and write data:
 * a private key is never readable by others, not even for a moment. */
static int u_write_secret(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
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

static int u_exit_now(lua_State *L) {
  _exit((int)luaL_optinteger(L, 1, 1));
}

int luaopen_mailshot_util(lua_State *L) {
  static const luaL_Reg funcs[] = {
    { "sha256", u_sha256 }, { "sha256_file", u_sha256_file }, { "lock", u_lock }, { "fsync", u_fsync },
    { "wait_signal", u_wait_signal }, { "stop_signals", u_stop_signals }, { "exit_now", u_exit_now }, { "write_secret", u_write_secret },
    { NULL, NULL }
  };
  static const luaL_Reg lockm[] = { { "unlock", u_unlock }, { "__gc", u_unlock }, { "__close", u_unlock }, { NULL, NULL } };
  if (luaL_newmetatable(L, LOCK_MT)) {
    luaL_setfuncs(L, lockm, 0);
    lua_pushvalue(L, -1);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
