/* loop.c - epoll + timer heap event loop.  See loop.h. */
#include "loop.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  loop_fd_fn *fn;
  void *data;
  int events;        /* current mask, -1 = not registered */
} fd_slot;

struct loop {
  int epfd;
  fd_slot *fds;      /* indexed by fd */
  int nfds;          /* size of fds */
  int watched;
  loop_timer **heap; /* min-heap on ->when */
  int nheap, capheap;
  loop_idle_fn *idle;
  void *idle_data;
  int woken, stopped;
  uint64_t now;
  loop_deferred *deferred;   /* doubly linked, newest first */
};

uint64_t loop_clock_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

loop *loop_new(void) {
  loop *l = calloc(1, sizeof *l);
  if (!l) return NULL;
  l->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (l->epfd < 0) { free(l); return NULL; }
  l->now = loop_clock_ms();
  return l;
}

void loop_free(loop *l) {
  if (!l) return;
  close(l->epfd);
  free(l->fds);
  free(l->heap);
  free(l);
}

/* ---- file descriptors ---- */

static int grow_fds(loop *l, int fd) {
  if (fd < l->nfds) return 0;
  int n = l->nfds ? l->nfds : 64;
  while (n <= fd) n *= 2;
  fd_slot *p = realloc(l->fds, (size_t)n * sizeof *p);
  if (!p) return -1;
  for (int i = l->nfds; i < n; i++) p[i].events = -1;
  l->fds = p;
  l->nfds = n;
  return 0;
}

int loop_watch(loop *l, int fd, int events, loop_fd_fn *fn, void *data) {
  if (fd < 0) { errno = EBADF; return -1; }
  if (grow_fds(l, fd) < 0) { errno = ENOMEM; return -1; }
  fd_slot *s = &l->fds[fd];
  struct epoll_event ev = { 0 };
  ev.events = (events & LOOP_READ ? EPOLLIN : 0) | (events & LOOP_WRITE ? EPOLLOUT : 0);
  ev.data.fd = fd;
  if (s->events < 0) {
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) return -1;
    l->watched++;
  } else if (s->events != events) {
    if (epoll_ctl(l->epfd, EPOLL_CTL_MOD, fd, &ev) < 0) return -1;
  }
  s->fn = fn;
  s->data = data;
  s->events = events;
  return 0;
}

void loop_unwatch(loop *l, int fd) {
  if (fd < 0 || fd >= l->nfds || l->fds[fd].events < 0) return;
  epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);   /* cannot fail for a registered fd */
  l->fds[fd].events = -1;
  l->fds[fd].fn = NULL;
  l->watched--;
}

int loop_watched(const loop *l) { return l->watched; }

/* ---- timers: binary min-heap ---- */

static void heap_set(loop *l, int i, loop_timer *t) { l->heap[i] = t; t->heap_index = i; }

static void heap_up(loop *l, int i) {
  loop_timer *t = l->heap[i];
  while (i > 0) {
    int parent = (i - 1) / 2;
    if (l->heap[parent]->when <= t->when) break;
    heap_set(l, i, l->heap[parent]);
    i = parent;
  }
  heap_set(l, i, t);
}

static void heap_down(loop *l, int i) {
  loop_timer *t = l->heap[i];
  for (;;) {
    int c = 2 * i + 1;
    if (c >= l->nheap) break;
    if (c + 1 < l->nheap && l->heap[c + 1]->when < l->heap[c]->when) c++;
    if (t->when <= l->heap[c]->when) break;
    heap_set(l, i, l->heap[c]);
    i = c;
  }
  heap_set(l, i, t);
}

void loop_timer_init(loop_timer *t, loop_timer_fn *fn, void *data) {
  t->when = 0;
  t->heap_index = -1;
  t->fn = fn;
  t->data = data;
}

int loop_timer_armed(const loop_timer *t) { return t->heap_index >= 0; }

void loop_timer_stop(loop *l, loop_timer *t) {
  int i = t->heap_index;
  if (i < 0) return;
  t->heap_index = -1;
  loop_timer *last = l->heap[--l->nheap];
  if (i == l->nheap) return;
  heap_set(l, i, last);
  heap_up(l, i);
  heap_down(l, last->heap_index);
}

/* Arming can only fail on out-of-memory while growing the heap; we abort then, because a
 * silently lost timeout would hang a session forever. */
void loop_timer_start(loop *l, loop_timer *t, uint64_t ms) {
  loop_timer_stop(l, t);
  if (l->nheap == l->capheap) {
    int n = l->capheap ? l->capheap * 2 : 64;
    loop_timer **p = realloc(l->heap, (size_t)n * sizeof *p);
    if (!p) abort();
    l->heap = p;
    l->capheap = n;
  }
  t->when = loop_clock_ms() + ms;
  heap_set(l, l->nheap++, t);
  heap_up(l, t->heap_index);
}

static void run_timers(loop *l) {
  while (l->nheap > 0 && l->heap[0]->when <= l->now) {
    loop_timer *t = l->heap[0];
    loop_timer_stop(l, t);
    t->fn(l, t->data);
  }
}

/* ---- deferred work ---- */

void loop_defer(loop *l, loop_deferred *d) {
  if (d->queued) return;
  d->queued = 1;
  d->prev = NULL;
  d->next = l->deferred;
  if (l->deferred) l->deferred->prev = d;
  l->deferred = d;
}

void loop_cancel_deferred(loop *l, loop_deferred *d) {
  if (!d->queued) return;
  if (d->prev) d->prev->next = d->next; else l->deferred = d->next;
  if (d->next) d->next->prev = d->prev;
  d->queued = 0;
  d->next = d->prev = NULL;
}

static void run_deferred(loop *l) {
  while (l->deferred) {
    loop_deferred *d = l->deferred;
    loop_cancel_deferred(l, d);
    d->fn(l, d->data);        /* may queue more, or cancel others: both are safe here */
  }
}

/* ---- running ---- */

void loop_set_idle(loop *l, loop_idle_fn *fn, void *data) { l->idle = fn; l->idle_data = data; }
void loop_wake(loop *l) { l->woken = 1; }
void loop_stop(loop *l) { l->stopped = 1; }
uint64_t loop_now(loop *l) { return l->now; }

static int poll_timeout(loop *l) {
  if (l->woken) return 0;
  if (l->nheap == 0) return -1;
  uint64_t when = l->heap[0]->when;
  if (when <= l->now) return 0;
  uint64_t d = when - l->now;
  return d > 60000 ? 60000 : (int)d;
}

int loop_run(loop *l) {
  struct epoll_event evs[256];
  l->stopped = 0;
  while (!l->stopped) {
    l->woken = 0;
    if (l->idle) l->idle(l, l->idle_data);
    if (l->stopped) break;
    run_deferred(l);
    if (!l->woken && l->nheap == 0 && l->watched == 0) return 1;   /* nothing can ever happen */
    l->now = loop_clock_ms();
    int n = epoll_wait(l->epfd, evs, 256, poll_timeout(l));
    if (n < 0 && errno != EINTR) return -1;
    l->now = loop_clock_ms();
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd >= l->nfds || l->fds[fd].events < 0 || !l->fds[fd].fn) continue;  /* unwatched meanwhile */
      int ev = 0;
      /* errors and hang-ups wake both directions: the reader or writer will see them */
      if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) ev |= LOOP_READ;
      if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) ev |= LOOP_WRITE;
      ev &= l->fds[fd].events;
      if (ev) l->fds[fd].fn(l, fd, ev, l->fds[fd].data);
    }
    run_timers(l);
  }
  return 0;
}
