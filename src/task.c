/* task.c - coroutine scheduler over the loop.  See task.h. */
#include "task.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct { lua_State *co; int nargs; } ready_entry;

/* What a task is doing.  Each suspension has exactly one wake-up: core.wake for T_SUSPENDED,
 * the completion of the C wait (by token) for T_WAITING; a task that is ready or running takes
 * none, so a second wake or a stray completion can never resume it half-way through another
 * wait. */
enum { T_ACTIVE, T_SUSPENDED, T_WAITING, T_ENDED };

/* One per task, found from its thread's extra space (every other thread's extra space points
 * at the scheduler's `none`).  A full userdata: the value of the task's entry in TASKS_KEY, so
 * it lives exactly as long as the task is anchored. */
typedef struct task_rec {
  sched *s;
  lua_State *co;            /* the task's thread; NULL in `none` */
  int state;
  const char *what;         /* T_WAITING: the C primitive's name, for core.wake's error */
  unsigned long token;      /* T_WAITING: the current C wait */
  int holds;                /* C waits not yet done or cancelled: the task stays anchored */
} task_rec;

struct sched {
  lua_State *L;          /* main state */
  loop *loop;
  ready_entry *ready;    /* ring buffer of tasks to resume */
  size_t head, count, cap;
  int suspending;        /* set by task_suspend right before it yields */
  lua_State *main_task;
  int main_done, main_failed, main_status;
  loop_deferred lua_deferred;   /* runs the functions given to core.defer */
  task_rec none;         /* the record of every thread that is not a task */
  unsigned long tokens;  /* the last C wait's token */
};

#define TASKS_KEY "mailshot.tasks"   /* registry table: thread -> its task_rec while it lives */
#define DEFER_KEY "mailshot.deferred" /* registry list of functions for core.defer */

static task_rec *rec_of(lua_State *L) { return *(task_rec **)lua_getextraspace(L); }
sched *sched_of(lua_State *L) { return rec_of(L)->s; }
loop *task_loop(lua_State *L) { return sched_of(L)->loop; }

static void ready_push(sched *s, lua_State *co, int nargs) {
  if (s->count == s->cap) {
    size_t n = s->cap ? s->cap * 2 : 256;
    ready_entry *p = malloc(n * sizeof *p);
    if (!p) abort();   /* losing a wake-up would hang a task forever */
    for (size_t i = 0; i < s->count; i++) p[i] = s->ready[(s->head + i) % s->cap];
    free(s->ready);
    s->ready = p;
    s->head = 0;
    s->cap = n;
  }
  s->ready[(s->head + s->count++) % s->cap] = (ready_entry){ co, nargs };
  loop_wake(s->loop);
}

/* The task is over and no C wait holds it: drop its record and let the thread be collected. */
static void unanchor(sched *s, lua_State *co) {
  lua_State *L = s->L;
  *(task_rec **)lua_getextraspace(co) = &s->none;   /* the record goes with the table entry */
  lua_getfield(L, LUA_REGISTRYINDEX, TASKS_KEY);
  lua_pushthread(co);
  lua_xmove(co, L, 1);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

static void report_error(sched *s, lua_State *co) {
  const char *msg = lua_tostring(co, -1);
  luaL_traceback(s->L, co, msg ? msg : "(error object is not a string)", 0);
  fprintf(stderr, "mailshot: %s\n", lua_tostring(s->L, -1));
  lua_pop(s->L, 1);
}

static void resume_one(sched *s, lua_State *co, int nargs) {
  task_rec *t = rec_of(co);
  if (t->co != co || t->state == T_ENDED) return;   /* cannot happen: one wake-up per suspension */
  t->state = T_ACTIVE;
  int nres = 0;
  s->suspending = 0;
  int st = lua_resume(co, s->L, nargs, &nres);
  if (st == LUA_YIELD) {
    lua_pop(co, nres);
    /* a plain coroutine.yield() at a task's top level: let the others run, then continue */
    if (!s->suspending) ready_push(s, co, 0);
    return;
  }
  if (st != LUA_OK) {
    if (co == s->main_task) {
      /* the main task's error is the program's error: print it without a C-level traceback twice */
      report_error(s, co);
      s->main_failed = 1;
    } else {
      report_error(s, co);
    }
  }
  if (co == s->main_task) {
    s->main_done = 1;
    /* the main task returns the exit status: an integer, true (0) or false/nil (1 when it failed) */
    if (st == LUA_OK) s->main_status = nres == 0 || lua_isnil(co, -nres) ? 0
                        : lua_isinteger(co, -nres) ? (int)lua_tointeger(co, -nres)
                        : lua_toboolean(co, -nres) ? 0 : 1;
    loop_stop(s->loop);
  }
  lua_settop(co, 0);
  t->state = T_ENDED;
  if (t->holds == 0) unanchor(s, co);   /* else the last C wait to finish does it */
}

/* The idle hook: resume what is ready; tasks woken meanwhile wait for the next turn so that
 * I/O callbacks get their chance between rounds. */
static void run_ready(loop *l, void *data) {
  sched *s = data;
  size_t n = s->count;
  while (n-- > 0 && s->count > 0) {
    ready_entry e = s->ready[s->head];
    s->head = (s->head + 1) % s->cap;
    s->count--;
    resume_one(s, e.co, e.nargs);
    if (s->main_done) return;
  }
  if (s->count) loop_wake(l);
}

/* Run the functions given to core.defer, once each, outside any task (they must not wait). */
static void run_lua_deferred(loop *l, void *data) {
  sched *s = data;
  lua_State *L = s->L;
  lua_getfield(L, LUA_REGISTRYINDEX, DEFER_KEY);
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, DEFER_KEY);       /* new ones go to a fresh list */
  lua_Integer n = luaL_len(L, -1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    if (lua_pcall(L, 0, 0, 0) != LUA_OK) {
      fprintf(stderr, "mailshot: deferred function failed: %s\n", lua_tostring(L, -1));
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
}

sched *sched_new(lua_State *L, loop *lp) {
  sched *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->L = L;
  s->loop = lp;
  s->none.s = s;
  s->none.state = T_ACTIVE;
  *(task_rec **)lua_getextraspace(L) = &s->none;   /* threads made later start with a copy */
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, TASKS_KEY);
  lua_newtable(L);
  lua_setfield(L, LUA_REGISTRYINDEX, DEFER_KEY);
  s->lua_deferred.fn = run_lua_deferred;
  s->lua_deferred.data = s;
  loop_set_idle(lp, run_ready, s);
  return s;
}

void sched_free(sched *s) {
  if (!s) return;
  loop_cancel_deferred(s->loop, &s->lua_deferred);
  free(s->ready);
  free(s);
}

void task_spawn(lua_State *L, int nargs) {
  sched *s = sched_of(L);
  lua_State *co = lua_newthread(L);          /* fn args... co */
  task_rec *t = lua_newuserdatauv(L, sizeof *t, 0);
  *t = (task_rec){ .s = s, .co = co, .state = T_ACTIVE };
  lua_getfield(L, LUA_REGISTRYINDEX, TASKS_KEY);
  lua_pushvalue(L, -3);
  lua_pushvalue(L, -3);
  lua_rawset(L, -3);                         /* TASKS_KEY[co] = t */
  lua_pop(L, 2);                             /* fn args... co */
  *(task_rec **)lua_getextraspace(co) = t;
  lua_insert(L, -(nargs + 2));               /* co fn args... */
  lua_xmove(L, co, nargs + 1);               /* co */
  ready_push(s, co, nargs);
}

int task_can_wait(lua_State *L) { return lua_isyieldable(L) && rec_of(L)->co == L; }

int task_suspend(lua_State *L) {
  if (!lua_isyieldable(L))
    return luaL_error(L, "this call waits on the network or a timer and must run inside a task "
                         "(mailshot.spawn), not in the main chunk or across a C call (table.sort, gsub...)");
  /* a coroutine of the user's own would get our yield and then be resumed by the scheduler
   * behind its owner's back: refuse */
  if (rec_of(L)->co != L)
    return luaL_error(L, "this call waits on the network or a timer and must run in a task "
                         "(mailshot.spawn), not in a coroutine of your own");
  sched_of(L)->suspending = 1;
  return lua_yield(L, 0);
}

void task_wait_begin(lua_State *L, task_wait *w, const char *what) {
  task_rec *t = rec_of(L);
  if (t->co != L) { luaL_error(L, "%s must run in a task", what); return; }   /* callers check first */
  t->state = T_WAITING;
  t->what = what;
  t->token = ++t->s->tokens;
  t->holds++;
  *w = (task_wait){ .s = t->s, .co = L, .token = t->token };
}

lua_State *task_wait_target(task_wait *w) {
  if (!w->co) return NULL;
  const task_rec *t = rec_of(w->co);   /* still the task's record: w holds it */
  return t->co == w->co && t->state == T_WAITING && t->token == w->token ? w->co : NULL;
}

static void wait_release(task_wait *w) {
  lua_State *co = w->co;
  if (!co) return;
  w->co = NULL;
  task_rec *t = rec_of(co);
  if (t->co == co && --t->holds == 0 && t->state == T_ENDED) unanchor(w->s, co);
}

void task_wait_done(task_wait *w, int nresults) {
  lua_State *co = task_wait_target(w);
  if (co) {
    rec_of(co)->state = T_ACTIVE;
    ready_push(w->s, co, nresults);
  }
  wait_release(w);
}

void task_wait_cancel(task_wait *w) { wait_release(w); }

int sched_exit_status(const sched *s) { return s->main_status; }

int sched_run_main(sched *s, lua_State *main_task) {
  s->main_task = main_task;
  s->main_done = s->main_failed = 0;
  while (!s->main_done) {
    int r = loop_run(s->loop);
    if (r < 0) { perror("mailshot: epoll_wait"); return -1; }
    if (r == 1 && !s->main_done) {
      fprintf(stderr, "mailshot: internal error: every task waits and nothing can wake them\n");
      return -1;
    }
  }
  return s->main_failed ? -1 : 0;
}

/* ---------------- Lua module mailshot.core ---------------- */

/* mailshot.core.spawn(fn, ...) -> thread */
static int core_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  task_spawn(L, lua_gettop(L) - 1);
  return 1;
}

typedef struct { loop_timer timer; task_wait w; loop *loop; } sleeper;

static void sleeper_fire(loop *l, void *data) {
  sleeper *z = data;
  task_wait_done(&z->w, 0);
}

static int sleeper_gc(lua_State *L) {
  sleeper *z = luaL_checkudata(L, 1, "mailshot.sleeper");
  if (z->loop) loop_timer_stop(z->loop, &z->timer);
  task_wait_cancel(&z->w);
  return 0;
}

/* mailshot.core.sleep(seconds): suspends the task; 0 still lets the other tasks run */
static int core_sleep(lua_State *L) {
  lua_Number sec = luaL_checknumber(L, 1);
  luaL_argcheck(L, sec >= 0 && sec < 1e9, 1, "seconds must be between 0 and 1e9");
  if (!task_can_wait(L)) return task_suspend(L);     /* raises the "inside a task" error */
  sleeper *z = lua_newuserdatauv(L, sizeof *z, 0);   /* stays on our stack: anchored while we sleep */
  z->w.co = NULL;
  z->loop = task_loop(L);
  loop_timer_init(&z->timer, sleeper_fire, z);
  if (luaL_newmetatable(L, "mailshot.sleeper")) {
    lua_pushcfunction(L, sleeper_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  task_wait_begin(L, &z->w, "core.sleep");
  loop_timer_start(z->loop, &z->timer, (uint64_t)(sec * 1000.0 + 0.5));
  return task_suspend(L);
}

/* mailshot.core.suspend(): park the running task until someone calls core.wake(it, ...);
 * returns the values given to wake.  The building block for join, semaphores and queues in Lua. */
static int core_suspend(lua_State *L) {
  if (task_can_wait(L)) rec_of(L)->state = T_SUSPENDED;
  return task_suspend(L);   /* raises when L cannot wait */
}

/* mailshot.core.wake(thread, ...): queue a task parked in core.suspend with values.  A task
 * parked in a C primitive (relay:send, sleep, a DNS query, a signal wait) belongs to that
 * primitive: waking it would leave the primitive to resume it a second time later, in the
 * middle of whatever it does next (or after it ended): refused, as is a second wake. */
static int core_wake(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);
  lua_State *co = lua_tothread(L, 1);
  const task_rec *t = rec_of(co);
  luaL_argcheck(L, t->co == co, 1, "not a task (or a task that ended)");
  if (t->state == T_WAITING)
    return luaL_error(L, "core.wake: the task is waiting in %s; only its completion can wake it", t->what);
  luaL_argcheck(L, co != L && t->state == T_SUSPENDED && lua_status(co) == LUA_YIELD, 1,
                "task is not suspended (it runs, or was woken already)");
  int n = lua_gettop(L) - 1;
  if (!lua_checkstack(co, n + 1)) return luaL_error(L, "stack overflow waking a task");
  lua_xmove(L, co, n);
  rec_of(co)->state = T_ACTIVE;
  ready_push(sched_of(co), co, n);
  return 0;
}

/* coroutine.resume and coroutine.close, refusing a task (upvalue 1: the original function):
 * resuming a task behind the scheduler's back is a stray wake-up too. */
static int guarded_coroutine(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTHREAD);   /* here, so that the error names the function called */
  lua_State *co = lua_tothread(L, 1);
  if (rec_of(co)->co == co)
    return luaL_error(L, "a mailshot task is resumed by its scheduler only, not by coroutine.resume "
                         "or coroutine.close (core.wake wakes a task parked in core.suspend)");
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_insert(L, 1);
  lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
  return lua_gettop(L);
}

static void guard_coroutines(lua_State *L) {
  if (lua_getglobal(L, "coroutine") == LUA_TTABLE) {
    static const char *const names[] = { "resume", "close" };
    for (int i = 0; i < 2; i++) {
      if (lua_getfield(L, -1, names[i]) != LUA_TFUNCTION || lua_tocfunction(L, -1) == guarded_coroutine) {
        lua_pop(L, 1);   /* missing, or guarded already (the module opened twice) */
        continue;
      }
      lua_pushcclosure(L, guarded_coroutine, 1);
      lua_setfield(L, -2, names[i]);
    }
  }
  lua_pop(L, 1);
}

/* mailshot.core.now(): monotonic seconds (float, to the nanosecond), for rates and durations.
 * Finer than the loop's millisecond timers on purpose: rate windows compare the times of
 * answers, and a clock truncated to the millisecond would let two windows overlap by up to
 * that much. */
static int core_now(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
  return 1;
}

/* mailshot.core.defer(fn): call fn once, before the loop next waits for the network, after the
 * ready tasks ran.  fn runs outside any task and must not wait.  The journal uses it to write
 * all the in-flight marks of a turn with one write(2), before any message body can go out (a
 * body is only ever sent on a later turn, after its 354). */
static int core_defer(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  sched *s = sched_of(L);
  lua_getfield(L, LUA_REGISTRYINDEX, DEFER_KEY);
  lua_pushvalue(L, 1);
  lua_rawseti(L, -2, luaL_len(L, -2) + 1);
  lua_pop(L, 1);
  loop_defer(s->loop, &s->lua_deferred);
  return 0;
}

/* mailshot.core.isatty(fd): is standard input (0), output (1) or error (2) a terminal? */
static int core_isatty(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  luaL_argcheck(L, fd >= 0 && fd <= 2, 1, "0, 1 or 2");
  lua_pushboolean(L, isatty((int)fd));
  return 1;
}

/* mailshot.core.current(): the running thread and whether it is a task */
static int core_current(lua_State *L) {
  int ismain = lua_pushthread(L);
  lua_pushboolean(L, !ismain && lua_isyieldable(L));
  return 2;
}

/* The Makefile's VERSION is the one place the version is written (mailshot.version reads it here). */
#ifndef MAILSHOT_VERSION
#error "MAILSHOT_VERSION is set by the Makefile (VERSION)"
#endif

int luaopen_mailshot_core(lua_State *L) {
  static const luaL_Reg funcs[] = {
    { "spawn", core_spawn }, { "sleep", core_sleep }, { "suspend", core_suspend },
    { "wake", core_wake }, { "now", core_now }, { "current", core_current },
    { "isatty", core_isatty }, { "defer", core_defer }, { NULL, NULL }
  };
  guard_coroutines(L);
  luaL_newlib(L, funcs);
  lua_pushliteral(L, MAILSHOT_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
