/* task.h - Lua coroutines as tasks on the event loop (the cosocket model of OpenResty).
 *
 * Every unit of work is a Lua thread.  A C primitive that must wait registers who waits (the
 * coroutine) with whatever will finish the wait (an fd watch, a timer), then returns
 * task_suspend(L).  Whoever finishes the wait pushes the results onto the suspended coroutine
 * and calls task_wake(co, nresults).  All resumes happen in one place, the loop's idle hook, so
 * a callback never re-enters Lua code half-way through its own bookkeeping. */
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

/* Yield the running task until task_wake.  Raises if L is not a task.  Use as
 * `return task_suspend(L);` from a lua_CFunction: the values given to task_wake become the
 * function's results. */
int  task_suspend(lua_State *L);

/* Queue co to resume with the top nresults values of its stack as results. */
void task_wake(lua_State *co, int nresults);

/* Run the loop until the task `main` (a thread) finishes; returns 0 if it finished, -1 if it
 * raised (message printed) or the loop ran dry while it still waited. */
int  sched_run_main(sched *s, lua_State *main_task);
int  sched_exit_status(const sched *s);   /* the main task's returned status */

/* Lua module mailshot.core: spawn, sleep, suspend, wake, now, yield. */
int luaopen_mailshot_core(lua_State *L);

#endif
