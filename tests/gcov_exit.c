/* gcov_exit.c - linked into build/cov/mailshot only (Makefile, -Wl,--wrap=_exit): a stop by SIGINT or
 * SIGTERM ends mailshot with _exit() (util.exit_now), which skips the exit handler that writes gcov's
 * counters; this writes them first, so scripts/valgrind-coverage.py sees what such a run covered. */
void __gcov_dump(void);
void __real__exit(int status) __attribute__((noreturn));
void __wrap__exit(int status) __attribute__((noreturn));

void __wrap__exit(int status) {
  __gcov_dump();
  __real__exit(status);
}
