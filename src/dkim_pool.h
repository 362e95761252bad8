/* dkim_pool.h - DKIM signing on worker threads, finished jobs handed back on the event loop.
 *
 * The loop thread fills a job (its own copy of the message, the options) and submits it; a worker
 * canonicalises, hashes and signs it with a dkim_ctx of its own (dkim.h) and queues it as done;
 * the pool's one eventfd, watched on the loop while jobs are out, makes the loop call `done` for
 * each finished job, on the loop thread.  Workers touch nothing but their job, the key (read
 * only) and the pool's two queues (under its mutex): no Lua, no loop.  The loop stays
 * single-threaded for everything else.
 *
 * The pool bounds nothing itself: each job is some task's, and the caller keeps the number of jobs
 * out at once to its own limit (l_dkim.c: a few per thread; more tasks wait for a slot). */
#ifndef MAILSHOT_DKIM_POOL_H
#define MAILSHOT_DKIM_POOL_H

#include "bytebuf.h"
#include "dkim.h"
#include "loop.h"

#define DKIM_POOL_MAX_THREADS 64

typedef struct dkim_job dkim_job;
struct dkim_job {
  dkim_job *next;     /* the pool's queues while submitted; the owner's lists otherwise */
  /* in: set by the owner before dkim_pool_submit, not touched after until it comes back */
  bytebuf in;         /* the message */
  dkim_opts o;        /* its strings must outlive the pool */
  int whole;          /* 1: out is the DKIM-Signature field then the message (CRLF); 0: the field */
  /* out: set by the worker */
  int signed_;        /* 0: never reached a worker (the pool was freed first) */
  int rc;             /* dkim_sign's */
  bytebuf out;
  char err[256];
  void *data;         /* the owner's */
};

typedef struct dkim_pool dkim_pool;
typedef void dkim_pool_done_fn(dkim_job *j, void *data);

/* Starts nthreads (1..DKIM_POOL_MAX_THREADS) workers signing with k, whose finished jobs go to
 * done(job, data) on lp's thread.  NULL with a reason in err (eventfd, threads, OpenSSL, memory). */
dkim_pool *dkim_pool_new(const dkim_key *k, int nthreads, loop *lp, dkim_pool_done_fn *done, void *data,
                         char *err, size_t errlen);

/* Hands j to the workers (on the loop thread).  0, or -1 with errno when the loop cannot watch the
 * pool's eventfd (j is then still the caller's). */
int dkim_pool_submit(dkim_pool *p, dkim_job *j);

/* Jobs submitted and not yet given to done. */
size_t dkim_pool_pending(const dkim_pool *p);

/* Stops the workers (each finishes the job it has), joins them, and gives every job not handed
 * back yet to done: signed ones as usual, the others with signed_ == 0.  p may be NULL. */
void dkim_pool_free(dkim_pool *p);

/* Cores this process may run on (sched_getaffinity; at least 1): the default number of threads. */
int dkim_pool_cores(void);

#endif
