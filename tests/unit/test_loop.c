/* test_loop.c - the event loop: timers fire in deadline order, stopped timers never fire, fd
 * callbacks see readiness, and the loop ends when nothing is left to wait for. */
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "loop.h"

static int fired[64], nfired;

static void record(loop *l, void *data) { (void)l; fired[nfired++] = (int)(long)data; }

/* A deadline is the clock when the timer starts plus its delay: under valgrind on a loaded machine
 * the ten starts may take longer than the 5 ms between two delays, so the order is checked against
 * the deadlines the timers got (t[i].when), not against the delays. */
static void timers_fire_in_deadline_order_and_stopped_ones_never(void) {
  loop *l = loop_new();
  loop_timer t[10];
  int delays[10] = { 50, 10, 40, 0, 30, 20, 45, 5, 35, 15 };
  for (int i = 0; i < 10; i++) {
    loop_timer_init(&t[i], record, (void *)(long)i);
    loop_timer_start(l, &t[i], (uint64_t)delays[i]);
  }
  loop_timer_stop(l, &t[2]);   /* 40 */
  loop_timer_stop(l, &t[2]);   /* twice is harmless */
  loop_timer_stop(l, &t[9]);   /* 15 */
  CHECK(!loop_timer_armed(&t[9]));
  CHECK(loop_timer_armed(&t[0]));
  nfired = 0;
  CHECK_INT(loop_run(l), 1);   /* ran dry: nothing left */
  CHECK_INT(nfired, 8);
  for (int i = 1; i < nfired; i++) CHECK(t[fired[i - 1]].when <= t[fired[i]].when);
  for (int i = 0; i < nfired; i++) CHECK(fired[i] != 2 && fired[i] != 9);   /* the 40 and the 15 */
  loop_free(l);
}

static void rearming_a_timer_moves_its_deadline(void) {
  loop *l = loop_new();
  loop_timer a, b;
  loop_timer_init(&a, record, (void *)1L);
  loop_timer_init(&b, record, (void *)2L);
  loop_timer_start(l, &a, 5);
  loop_timer_start(l, &b, 20);
  loop_timer_start(l, &a, 40);   /* now after b */
  nfired = 0;
  loop_run(l);
  CHECK_INT(nfired, 2);
  CHECK_INT(fired[0], 2);
  CHECK_INT(fired[1], 1);
  loop_free(l);
}

static int got_events, pipe_fds[2];
static void on_pipe(loop *l, int fd, int events, void *data) {
  (void)data;
  char buf[16];
  got_events |= events;
  CHECK(read(fd, buf, sizeof buf) == 3);
  loop_unwatch(l, fd);
}

static void readable_fd_wakes_its_callback_once_then_unwatched(void) {
  loop *l = loop_new();
  CHECK_INT(pipe(pipe_fds), 0);
  CHECK_INT(loop_watch(l, pipe_fds[0], LOOP_READ, on_pipe, NULL), 0);
  CHECK_INT(loop_watched(l), 1);
  CHECK(write(pipe_fds[1], "abc", 3) == 3);
  CHECK_INT(loop_run(l), 1);
  CHECK_INT(got_events, LOOP_READ);
  CHECK_INT(loop_watched(l), 0);
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  loop_free(l);
}

static uint64_t whens[2000];
static int nwhens;
static void record_when(loop *l, void *data) { (void)l; whens[nwhens++] = ((loop_timer *)data)->when; }

static void many_timers_fire_in_order_after_random_stops(void) {
  loop *l = loop_new();
  enum { N = 2000 };
  loop_timer *t = calloc(N, sizeof *t);
  srand(7);
  for (int i = 0; i < N; i++) {
    loop_timer_init(&t[i], record_when, &t[i]);
    loop_timer_start(l, &t[i], (uint64_t)(rand() % 50));
  }
  int armed = N;
  for (int i = 0; i < N; i += 3) { loop_timer_stop(l, &t[i]); armed--; }
  nwhens = 0;
  CHECK_INT(loop_run(l), 1);
  CHECK_INT(nwhens, armed);
  int ordered = 1;
  for (int i = 1; i < nwhens; i++) ordered &= whens[i - 1] <= whens[i];
  CHECK(ordered);
  free(t);
  loop_free(l);
}

static int deferred_runs, idle_runs;
static loop_deferred d1, d2;
static void on_deferred(loop *l, void *data) {
  (void)data;
  deferred_runs++;
  if (deferred_runs == 1) loop_defer(l, &d1);   /* re-queued while running: runs again */
}
static void idle_once(loop *l, void *data) {
  (void)data;
  idle_runs++;
  if (idle_runs == 1) { loop_defer(l, &d1); loop_defer(l, &d1); loop_defer(l, &d2); loop_cancel_deferred(l, &d2); }
}

static void deferred_work_runs_once_per_queueing_and_cancel_works(void) {
  loop *l = loop_new();
  d1.fn = d2.fn = on_deferred;
  loop_set_idle(l, idle_once, NULL);
  CHECK_INT(loop_run(l), 1);
  CHECK_INT(deferred_runs, 2);    /* queued twice = once, then re-queued once by itself; d2 cancelled */
  CHECK(!d1.queued && !d2.queued);
  loop_free(l);
}

int main(void) {
  timers_fire_in_deadline_order_and_stopped_ones_never();
  rearming_a_timer_moves_its_deadline();
  readable_fd_wakes_its_callback_once_then_unwatched();
  many_timers_fire_in_order_after_random_stops();
  deferred_work_runs_once_per_queueing_and_cancel_works();
  return DONE();
}
