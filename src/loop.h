/* loop.h - the event loop: epoll for file descriptors, a binary heap for timers, one thread.
 *
 * In the spirit of Redis's ae.c: a small API over an fd-indexed table of callbacks.  Timers are
 * embedded in their owner (no allocation per timer) and kept in a min-heap, so thousands of
 * sessions with a timeout each cost O(log n) per arm/disarm. */
#ifndef MAILSHOT_LOOP_H
#define MAILSHOT_LOOP_H
#include <stdint.h>

#define LOOP_READ  1
#define LOOP_WRITE 2

typedef struct loop loop;
typedef void loop_fd_fn(loop *l, int fd, int events, void *data);
typedef void loop_timer_fn(loop *l, void *data);
typedef void loop_idle_fn(loop *l, void *data);

/* A timer lives inside whatever owns it; zero-initialise it, then loop_timer_start/stop. */
typedef struct loop_timer {
  uint64_t when;          /* absolute deadline, ms on the monotonic clock */
  int heap_index;         /* position in the heap, -1 when not armed */
  loop_timer_fn *fn;
  void *data;
} loop_timer;

loop *loop_new(void);
void loop_free(loop *l);

/* Watch fd for `events` (LOOP_READ|LOOP_WRITE); calling again changes the mask; events == 0
 * keeps the fd registered but quiet.  Returns 0, or -1 with errno. */
int  loop_watch(loop *l, int fd, int events, loop_fd_fn *fn, void *data);
void loop_unwatch(loop *l, int fd);   /* call before close(fd) */

void loop_timer_init(loop_timer *t, loop_timer_fn *fn, void *data);
void loop_timer_start(loop *l, loop_timer *t, uint64_t ms);   /* (re)arm, fires once */
void loop_timer_stop(loop *l, loop_timer *t);                 /* safe if not armed */
int  loop_timer_armed(const loop_timer *t);

/* Deferred work: run once, after the idle hook and before the next poll.  The node lives in
 * its owner (zero-initialise it); queueing it twice is harmless; cancel before freeing it.
 * The SMTP sessions use it to write once per turn of the loop whatever was queued meanwhile
 * (the previous message's body and the next message's commands in one write). */
typedef struct loop_deferred {
  struct loop_deferred *next, *prev;
  void (*fn)(loop *l, void *data);
  void *data;
  int queued;
} loop_deferred;
void loop_defer(loop *l, loop_deferred *d);
void loop_cancel_deferred(loop *l, loop_deferred *d);

/* The idle hook runs once per iteration before polling (the task scheduler resumes ready
 * coroutines there); it returns nothing but may ask for a non-blocking poll with loop_wake. */
void loop_set_idle(loop *l, loop_idle_fn *fn, void *data);
void loop_wake(loop *l);              /* the next poll must not block */

void loop_stop(loop *l);
/* Run until loop_stop, or until nothing is left to wait for (returns 1 in that case, 0 after
 * loop_stop, -1 on a poll error). */
int  loop_run(loop *l);

uint64_t loop_now(loop *l);           /* cached monotonic ms, updated every iteration */
uint64_t loop_clock_ms(void);         /* fresh monotonic ms */
int  loop_watched(const loop *l);     /* number of watched fds (for diagnostics) */

#endif
