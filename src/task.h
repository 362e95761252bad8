/* task.h - Lua coroutines as tasks on the event loop (the cosocket model of OpenResty).
 *
 * Every unit of work is a Lua thread.  A C primitive that must wait begins a task_wait, gives it
 * to whatever will finish the wait (an fd watch, a timer), then returns task_suspend(L).  Whoever
 * finishes the wait pushes the results onto task_wait_target's thread and calls task_wait_done.
 * All resumes happen in one place, the loop's idle hook, so a callback never re-enters Lua code
 * half-way through its own bookkeeping.  Each suspension has exactly one wake-up: core.wake
 * for core.suspend, the primitive's completion for a wait in C. */
#ifndef MAILSHOT_TASK_H
#define MAILSHOT_TASK_H
#include <lua.h>
#include "loop.h"

typedef struct sched sched;

/* Create the scheduler for the main state L over loop lp; it is found again from any thread
 * through the state's extra space. */
sched *sched_new(lua_State *L, loop *lp);
void   sched_free(sched *s);
sched *sched_of(lua_State *L);
loop  *task_loop(lua_State *L);

/* Start fn (at stack index idx, followed by nargs arguments which are popped) as a new task;
 * pushes the new thread.  Errors raised by a task are printed with a traceback. */
void task_spawn(lua_State *L, int nargs);

/* Does L run as a task that may wait now?  When not, task_suspend(L) raises the error to give. */
int  task_can_wait(lua_State *L);

/* Yield the running task.  Raises if L is not a task.  Use as `return task_suspend(L);` from a
 * lua_CFunction, after core.suspend marked the task wakeable or task_wait_begin gave its wake-up
 * to a C primitive: the values given to the wake become the function's results. */
int  task_suspend(lua_State *L);

/* A wait in C owns its wake-up.  The primitive keeps a task_wait with whatever will finish the
 * wait (an fd watch, a timer, a query); while the task waits there core.wake refuses it, and
 * only that completion resumes it.  The task's thread stays anchored until the wait is done or
 * cancelled, so a completion never touches a collected thread; a completion that comes when
 * the task no longer waits on it (it ended, or was cancelled) is dropped. */
typedef struct task_wait {
  sched *s;
  lua_State *co;           /* NULL: not waiting (never begun, done or cancelled) */
  unsigned long token;     /* which wait of the task this is */
} task_wait;

/* Begin a wait named `what` (a static string such as "relay:send", for error messages) for the
 * running task L, which must be able to wait (task_can_wait); then arrange the completion and
 * `return task_suspend(L);`.  The completion may even come before the task yields. */
void task_wait_begin(lua_State *L, task_wait *w, const char *what);

/* For the completion: the thread to push the results on, or NULL when the task no longer waits
 * on w (push nothing then; check the stack with lua_checkstack before pushing). */
lua_State *task_wait_target(task_wait *w);

/* Finish the wait: when it is still the task's, resume it with the top nresults values of
 * task_wait_target's stack; then release the anchor.  Safe on a wait not begun or finished. */
void task_wait_done(task_wait *w, int nresults);

/* Give up a wait without waking the task (its owner is being destroyed); releases the anchor. */
void task_wait_cancel(task_wait *w);

/* Run the loop until the task `main` (a thread) finishes; returns 0 if it finished, -1 if it
 * raised (message printed) or the loop ran dry while it still waited. */
int  sched_run_main(sched *s, lua_State *main_task);
int  sched_exit_status(const sched *s);   /* the main task's returned status */

/* Lua module mailshot.core: spawn, sleep, suspend, wake, now, yield.  It also makes
 * coroutine.resume and coroutine.close refuse a task: only the scheduler resumes tasks. */
int luaopen_mailshot_core(lua_State *L);

#endif
