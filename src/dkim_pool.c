/* dkim_pool.c - worker threads that sign DKIM jobs; see dkim_pool.h.
 *
 * Two queues under one mutex: `todo` (submitted, FIFO; workers sleep on `more` while it is empty;
 * the loop hands over each turn's jobs at once, in a deferred call after the ready tasks ran) and `done` (finished, handed back in the order they finished).  A worker that makes `done`
 * non-empty writes the eventfd; the loop reads the eventfd first and then takes the whole `done`
 * list, so a job finished after that take writes again, and none is ever left unannounced (at
 * worst a wake-up finds the list empty).  The eventfd is watched only while jobs are out, so a
 * program whose tasks all wait on nothing still ends with the loop's "nothing can wake them". */
#include "dkim_pool.h"
#include "seterr.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct dkim_pool {
  pthread_mutex_t mu;
  pthread_cond_t more;          /* todo got a job, or stop was set */
  dkim_job *todo, *todo_tail;   /* (mu) */
  dkim_job *done, *done_tail;   /* (mu) */
  int stop;                     /* (mu) */
  int nthreads;                 /* started */
  pthread_t *tid;
  dkim_ctx **ctx;               /* one per thread: the thread's alone */
  int nctx;
  int efd;
  /* the loop thread's alone */
  loop *lp;
  int watching;
  dkim_job *batch, *batch_tail; /* submitted this turn of the loop, handed over at its end */
  loop_deferred flush;
  size_t pending;               /* submitted, not yet given to done */
  dkim_pool_done_fn *done_fn;
  void *data;
};

typedef struct { dkim_pool *p; dkim_ctx *ctx; } worker_arg;

/* The worker's part: canonicalisation, hashing and the signature, all into j->out. */
static void sign_job(dkim_ctx *c, dkim_job *j) {
  j->out.len = 0;
  j->rc = dkim_sign_ctx(c, &j->o, j->in.data ? j->in.data : "", j->in.len, &j->out, j->err, sizeof j->err);
  if (j->rc == 0 && j->whole && bytebuf_crlf(&j->out, j->in.data ? j->in.data : "", j->in.len, 0) < 0) {
    j->rc = -1;
    seterr(j->err, sizeof j->err, "out of memory");
  }
  j->signed_ = 1;
}

static void *worker(void *arg) {
  dkim_pool *p = ((worker_arg *)arg)->p;
  dkim_ctx *c = ((worker_arg *)arg)->ctx;
  free(arg);
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->stop && p->todo == NULL) pthread_cond_wait(&p->more, &p->mu);
    if (p->stop) break;   /* jobs still in todo go back unsigned (dkim_pool_free) */
    dkim_job *j = p->todo;
    p->todo = j->next;
    if (p->todo == NULL) p->todo_tail = NULL;
    pthread_mutex_unlock(&p->mu);

    sign_job(c, j);

    pthread_mutex_lock(&p->mu);
    int was_empty = p->done == NULL;
    j->next = NULL;
    if (p->done_tail) p->done_tail->next = j; else p->done = j;
    p->done_tail = j;
    if (was_empty) {
      uint64_t one = 1;
      /* cannot fail but for an overflowing counter (2^64 - 1 writes unread): the loop reads it */
      if (write(p->efd, &one, sizeof one) < 0) {}
    }
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* Takes the whole done list (FIFO) under the lock. */
static dkim_job *take_done(dkim_pool *p) {
  pthread_mutex_lock(&p->mu);
  dkim_job *j = p->done;
  p->done = p->done_tail = NULL;
  pthread_mutex_unlock(&p->mu);
  return j;
}

static void unwatch_if_idle(dkim_pool *p) {
  if (p->watching && p->pending == 0) {
    loop_unwatch(p->lp, p->efd);
    p->watching = 0;
  }
}

/* Hands back finished jobs, in order.  done may submit new jobs; it must not free the pool (its
 * owner frees it from Lua code, never from this callback). */
static void hand_back(dkim_pool *p, dkim_job *j) {
  while (j) {
    dkim_job *next = j->next;
    j->next = NULL;
    p->pending--;
    p->done_fn(j, p->data);
    j = next;
  }
}

static void on_done(loop *l, int fd, int events, void *data) {
  dkim_pool *p = data;
  uint64_t n;
  (void)l, (void)events;
  if (read(fd, &n, sizeof n) < 0) {}   /* EAGAIN: another wake-up took it; the list says what is done */
  hand_back(p, take_done(p));
  unwatch_if_idle(p);
}

/* The jobs of a turn of the loop go to the workers together, once the ready tasks have run: one
 * lock and one wake-up per turn rather than per message. */
static void flush(loop *l, void *data) {
  dkim_pool *p = data;
  (void)l;
  if (p->batch == NULL) return;
  pthread_mutex_lock(&p->mu);
  if (p->todo_tail) p->todo_tail->next = p->batch; else p->todo = p->batch;
  p->todo_tail = p->batch_tail;
  if (p->batch == p->batch_tail)
    pthread_cond_signal(&p->more);
  else
    pthread_cond_broadcast(&p->more);
  pthread_mutex_unlock(&p->mu);
  p->batch = p->batch_tail = NULL;
}

int dkim_pool_submit(dkim_pool *p, dkim_job *j) {
  if (!p->watching) {
    if (loop_watch(p->lp, p->efd, LOOP_READ, on_done, p) < 0) return -1;
    p->watching = 1;
  }
  j->next = NULL;
  j->signed_ = 0;
  p->pending++;
  if (p->batch_tail) p->batch_tail->next = j; else p->batch = j;
  p->batch_tail = j;
  loop_defer(p->lp, &p->flush);
  return 0;
}

size_t dkim_pool_pending(const dkim_pool *p) { return p->pending; }

int dkim_pool_cores(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

/* Stops and joins the started threads; frees everything but the jobs. */
static void stop_free(dkim_pool *p) {
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->more);
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nthreads; i++) pthread_join(p->tid[i], NULL);
  for (int i = 0; i < p->nctx; i++) dkim_ctx_free(p->ctx[i]);
  loop_cancel_deferred(p->lp, &p->flush);
  if (p->watching) loop_unwatch(p->lp, p->efd);
  if (p->efd >= 0) close(p->efd);
  pthread_cond_destroy(&p->more);
  pthread_mutex_destroy(&p->mu);
  free(p->ctx);
  free(p->tid);
  free(p);
}

dkim_pool *dkim_pool_new(const dkim_key *k, int nthreads, loop *lp, dkim_pool_done_fn *done, void *data,
                         char *err, size_t errlen) {
  dkim_pool *p;
  int rc;
  if (nthreads < 1 || nthreads > DKIM_POOL_MAX_THREADS) {
    seterr(err, errlen, "threads must be 1 to %d", DKIM_POOL_MAX_THREADS);
    return NULL;
  }
  if ((p = calloc(1, sizeof *p)) == NULL) {
    seterr(err, errlen, "out of memory");
    return NULL;
  }
  p->lp = lp, p->done_fn = done, p->data = data;
  p->flush.fn = flush, p->flush.data = p;
  p->efd = -1;
  if ((rc = pthread_mutex_init(&p->mu, NULL)) != 0) {
    free(p);
    seterr(err, errlen, "pthread_mutex_init: %s", strerror(rc));
    return NULL;
  }
  if ((rc = pthread_cond_init(&p->more, NULL)) != 0) {
    pthread_mutex_destroy(&p->mu);
    free(p);
    seterr(err, errlen, "pthread_cond_init: %s", strerror(rc));
    return NULL;
  }
  if ((p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
    seterr(err, errlen, "eventfd: %s", strerror(errno));
    goto fail;
  }
  p->tid = calloc((size_t)nthreads, sizeof *p->tid);
  p->ctx = calloc((size_t)nthreads, sizeof *p->ctx);
  if (p->tid == NULL || p->ctx == NULL) {
    seterr(err, errlen, "out of memory");
    goto fail;
  }
  p->nctx = nthreads;
  /* the contexts are copied here, one after the other, before any thread runs */
  for (int i = 0; i < nthreads; i++)
    if ((p->ctx[i] = dkim_ctx_new(k, err, errlen)) == NULL) goto fail;
  /* The workers block every signal (a thread inherits its creator's mask): SIGINT and SIGTERM are
   * the loop's, through a signalfd, and a worker that took one would die of it (default action). */
  sigset_t all, old;
  sigfillset(&all);
  if ((rc = pthread_sigmask(SIG_SETMASK, &all, &old)) != 0) {
    seterr(err, errlen, "pthread_sigmask: %s", strerror(rc));
    goto fail;
  }
  for (int i = 0; i < nthreads; i++) {
    worker_arg *a = malloc(sizeof *a);
    if (a == NULL) {
      seterr(err, errlen, "out of memory");
      break;
    }
    a->p = p, a->ctx = p->ctx[i];
    if ((rc = pthread_create(&p->tid[i], NULL, worker, a)) != 0) {
      free(a);
      seterr(err, errlen, "cannot start a signing thread: %s", strerror(rc));
      break;
    }
    p->nthreads++;
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL); /* cannot fail: it took this mask above */
  if (p->nthreads == nthreads) return p;
fail:
  stop_free(p);
  return NULL;
}

void dkim_pool_free(dkim_pool *p) {
  dkim_job *left;
  if (p == NULL) return;
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->more);
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nthreads; i++) pthread_join(p->tid[i], NULL);
  p->nthreads = 0;   /* joined: stop_free must not join again */
  /* no thread runs now: the lists are ours; signed jobs first, then those never started, then
   * those not handed over yet */
  flush(p->lp, p);
  left = p->done;
  if (p->done_tail) p->done_tail->next = p->todo; else left = p->todo;
  p->done = p->done_tail = p->todo = p->todo_tail = NULL;
  hand_back(p, left);
  stop_free(p);
}
