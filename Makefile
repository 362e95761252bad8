# mailshot - build, demo, tests.
#
#   make            build ./mailshot
#   make demo       install missing Debian packages, build, dry-run the example campaign
#   make check      install missing Debian packages, build, run every test (make test), then every test again
#                   under valgrind (make valgrind); what .ci/run runs
#   make test       every test, quickly: C unit tests and the binary the other tests drive under ASan/UBSan,
#                   and the fuzz targets 10 s each; one pool of commands, JOBS at once (tests/run_jobs.py)
#   make valgrind   install missing Debian packages, build, run every test again under valgrind (memcheck) on the
#                   plain build: C unit tests, Lua tests, integration tests (MAILSHOT_VALGRIND=1); and make tsan
#   make tsan       the DKIM signing threads under ThreadSanitizer (build/tsan/mailshot, tests/lua/test_dkim_pool.lua)
#   make fuzz       the libFuzzer targets in tests/fuzz/, 300 s each (make test runs them 10 s each)
#   make bench      throughput, memory, TLS and rate-limit figures (scripts/bench.py), Lua-side CPU rates
#                   (scripts/bench-lua.lua: IDNA, CSV, CSV encodings, templates, MIME), the report's rewrite in CSV
#                   order (scripts/bench-report.lua), mailshot bounces' rate and memory on 50 MB messages
#                   (scripts/bench-bounces.py), mailshot.redis calls/s from 64 tasks on one connection
#                   (scripts/bench-redis.py), cluster mode against one process (scripts/bench-cluster.py)
#   make install    PREFIX=/usr/local (default) DESTDIR=...
#
# The Lua library in lua/ is compiled into the binary (build/lua_embed.c), so ./mailshot is one
# self-contained file.  MAILSHOT_LUA_PATH=lua (or --lua-path lua) loads the modules from the tree instead.

CC      ?= cc
PREFIX  ?= /usr/local
VERSION := 0.1.0
PKGS    := lua5.4 libcares openssl libcurl hiredis
# CFLAGS is the user's (optimisation, debugging: `make CFLAGS=-O0` keeps everything else); the flags
# the code needs are in MS_CFLAGS, always added.  VERSION is the one place the version is written: the C
# side hands it to Lua as mailshot.core.version (mailshot.version, `mailshot --version`).
CFLAGS    ?= -O2 -g
MS_CFLAGS := -std=c11 -pthread -Wall -Wextra -Wshadow -Wno-unused-parameter -D_GNU_SOURCE \
             -DMAILSHOT_VERSION='"$(VERSION)"' $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS  += $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -llua5.4 -lcares -lssl -lcrypto -lcurl -lhiredis) -lcsv -lm -pthread

SRC      := $(wildcard src/*.c)
LIB_SRC  := $(filter-out src/main.c src/embed_gen.c, $(SRC))
LUA_SRC  := $(shell find lua -name '*.lua' | sort)
UNIT_SRC := $(wildcard tests/unit/test_*.c)

OBJ      := $(LIB_SRC:src/%.c=build/%.o)
ASAN_OBJ := $(LIB_SRC:src/%.c=build/asan/%.o)
TSAN_OBJ := $(LIB_SRC:src/%.c=build/tsan/%.o)
SAN      := -fsanitize=address,undefined -fno-omit-frame-pointer
TSAN     := -fsanitize=thread -fno-omit-frame-pointer

# Debian packages the build and the tests need (installed by `make deps` when missing).
DEB_BUILD := gcc make pkg-config liblua5.4-dev libssl-dev libc-ares-dev libcsv-dev libmimalloc-dev libcurl4-openssl-dev \
             libhiredis-dev
DEB_TEST  := python3 python3-aiosmtpd python3-dkim python3-nacl openssl postfix dnsmasq-base valgrind
# a private Redis for mailshot.redis and the cluster tests (tests/integration/harness.py start_redis)
DEB_TEST  += redis-server
# a private IMAP/POP3 server for the bounce-mailbox tests (tests/integration/harness.py start_dovecot)
DEB_TEST  += dovecot-imapd dovecot-pop3d
# clang's libFuzzer, ASan and UBSan runtimes are in libclang-rt-14-dev, only a Recommends of clang-14
DEB_TEST  += clang libclang-rt-14-dev

.PHONY: all deps demo check test unit luatest tsan integration valgrind valgrind-all \
        valgrind-coverage bench install clean
all: mailshot

build build/asan build/tsan:
	@mkdir -p $@

build/%.o: src/%.c $(wildcard src/*.h) | build
	$(CC) $(MS_CFLAGS) $(CFLAGS) -c -o $@ $<

build/asan/%.o: src/%.c $(wildcard src/*.h) | build/asan
	$(CC) $(MS_CFLAGS) $(CFLAGS) -O1 $(SAN) -c -o $@ $<

# embed_gen compiles the modules with the Lua library mailshot links (its bytecode is that library's)
build/embed_gen: src/embed_gen.c | build
	$(CC) -O2 $(shell pkg-config --cflags lua5.4 2>/dev/null) -o $@ $< $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4)

build/lua_embed.c: build/embed_gen $(LUA_SRC)
	build/embed_gen lua $(LUA_SRC) > $@.tmp && mv $@.tmp $@

# The plain build gives the Lua state mimalloc (src/main.c says why); the sanitizer builds do not.
mailshot: src/main.c build/lua_embed.c $(OBJ)
	$(CC) $(MS_CFLAGS) $(CFLAGS) -DMAILSHOT_MIMALLOC -Isrc -o $@ src/main.c build/lua_embed.c $(OBJ) $(LDLIBS) -lmimalloc

# The same program under AddressSanitizer + UBSan: the integration tests run this one.
build/asan/mailshot: src/main.c build/lua_embed.c $(ASAN_OBJ)
	$(CC) $(MS_CFLAGS) $(CFLAGS) -O1 $(SAN) -Isrc -o $@ src/main.c build/lua_embed.c $(ASAN_OBJ) $(LDLIBS)

# The same program under ThreadSanitizer, for the one part that runs threads: DKIM signing (src/dkim_pool.c).
# `make tsan` signs a few thousand messages from many tasks at once with it; any report fails (part of
# make valgrind, so of make check: one command of its run_jobs pool).
build/tsan/%.o: src/%.c $(wildcard src/*.h) | build/tsan
	$(CC) $(MS_CFLAGS) $(CFLAGS) -O1 $(TSAN) -c -o $@ $<

build/tsan/mailshot: src/main.c build/lua_embed.c $(TSAN_OBJ)
	$(CC) $(MS_CFLAGS) $(CFLAGS) -O1 $(TSAN) -Isrc -o $@ src/main.c build/lua_embed.c $(TSAN_OBJ) $(LDLIBS)

tsan: build/tsan/mailshot
	TSAN_OPTIONS="halt_on_error=1 exitcode=66 $(TSAN_OPTIONS)" DKIM_POOL_N=2000 build/tsan/mailshot exec tests/lua/test_dkim_pool.lua

# The plain build again with gcov counters, for scripts/valgrind-coverage.py (which C lines and branches
# the tests left under valgrind cover).  mailshot leaves with _exit() after a SIGINT/SIGTERM stop, which
# skips gcov's exit handler: tests/gcov_exit.c wraps _exit to write the counters first.
COV      := --coverage -O1 -g
COV_OBJ  := $(LIB_SRC:src/%.c=build/cov/%.o)

build/cov:
	@mkdir -p $@

build/cov/%.o: src/%.c $(wildcard src/*.h) | build/cov
	$(CC) $(MS_CFLAGS) $(COV) -c -o $@ $<

build/cov/mailshot: src/main.c build/lua_embed.c tests/gcov_exit.c $(COV_OBJ)
	$(CC) $(MS_CFLAGS) $(COV) -DMAILSHOT_MIMALLOC -Isrc -Wl,--wrap=_exit -o $@ src/main.c build/lua_embed.c \
	  tests/gcov_exit.c $(COV_OBJ) $(LDLIBS) -lmimalloc

build/cov/test_%: tests/unit/test_%.c tests/unit/check.h $(COV_OBJ)
	$(CC) $(MS_CFLAGS) $(COV) -Isrc -o $@ $< $(COV_OBJ) $(LDLIBS)

valgrind-coverage: build/cov/mailshot $(UNIT_SRC:tests/unit/test_%.c=build/cov/test_%)
	/usr/bin/python3 scripts/valgrind-coverage.py -j $(JOBS) $(COVERAGE_FLAGS)

build/asan/test_%: tests/unit/test_%.c tests/unit/check.h $(ASAN_OBJ)
	$(CC) $(MS_CFLAGS) $(CFLAGS) -O1 $(SAN) -Isrc -o $@ $< $(ASAN_OBJ) $(LDLIBS)

deps:
	@sh scripts/deps.sh $(DEB_BUILD) $(if $(filter check test bench fuzz fuzz-smoke valgrind,$(MAKECMDGOALS)),$(DEB_TEST))

# A TLS-capable sink for the benchmark (smtp-sink has no STARTTLS).
build/tls_sink: tests/servers/tls_sink.c | build
	$(CC) -O2 -std=c11 -Wall -Wextra -D_GNU_SOURCE -o $@ $< $(shell pkg-config --cflags --libs openssl)

# mailshot against Postfix's smtp-sink, beside smtp-source; see scripts/bench.py for the knobs.
bench: deps
	@$(MAKE) --no-print-directory mailshot build/tls_sink
	/usr/bin/python3 scripts/bench.py
	./mailshot exec scripts/bench-lua.lua
	./mailshot exec scripts/bench-report.lua
	/usr/bin/python3 scripts/bench-bounces.py
	/usr/bin/python3 scripts/bench-redis.py
	/usr/bin/python3 scripts/bench-cluster.py

demo: deps
	@$(MAKE) --no-print-directory mailshot
	./mailshot run scripts/examples/newsletter/campaign.lua --outbox build/demo-outbox --report build/demo-report.csv

# make check builds every binary both passes run first, BUILD_JOBS compilers at once (a build is
# CPU-bound; the test pools overlap waiting tests instead), then runs the two passes.
BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
check: deps
	@$(MAKE) --no-print-directory -j$(BUILD_JOBS) mailshot build/asan/mailshot $(ASAN_UNIT) $(VG_UNIT) $(FUZZ_BIN)
	@$(MAKE) --no-print-directory test
	@$(MAKE) --no-print-directory valgrind

# make test: one tests/run_jobs.py pool, JOBS commands at once, the slowest first (see integration
# below): every integration module, Lua test and C unit test, and each fuzz target's FUZZ_SECONDS smoke
# run.  One pool rather than four steps in a row: the Lua tests, the unit tests and the fuzz runs are
# CPU-bound but short, and fill the time the integration tests spend waiting on servers and timers.
ASAN_UNIT := $(UNIT_SRC:tests/unit/test_%.c=build/asan/test_%)
test: mailshot build/asan/mailshot $(ASAN_UNIT) fuzz-build | build
	@/usr/bin/python3 tests/run_jobs.py -j $(JOBS) --logs build/jobs/test --first $(SLOWEST) \
	  $(INTEG:%='MAILSHOT=build/asan/mailshot MAILSHOT_PLAIN=./mailshot /usr/bin/python3 -m unittest -v tests.integration.%') \
	  $(VG_LUA:%='build/asan/mailshot exec %') \
	  $(ASAN_UNIT) \
	  $(FUZZ_TARGETS:%='$(MAKE) --no-print-directory fuzz-smoke-%')
	@echo "all tests passed"

unit: $(ASAN_UNIT)
	@for t in $^; do $$t || exit 1; done

luatest: build/asan/mailshot
	@for t in tests/lua/test_*.lua; do build/asan/mailshot exec $$t || exit 1; done

# One command per integration module, JOBS at once (tests/run_jobs.py), the slowest first: the tests
# mostly wait on servers and timers, and each has its own folder, servers and ports.  The ASan build
# drives them; test_valgrind runs the plain one under valgrind.
JOBS    ?= 3
INTEG   := $(sort $(basename $(notdir $(wildcard tests/integration/test_*.py))))
SLOWEST := test_dkim,test_resume,test_campaign,test_direct,test_check,test_faults,test_relay
integration: mailshot build/asan/mailshot | build
	@/usr/bin/python3 tests/run_jobs.py -j $(JOBS) --logs build/jobs/integration --first $(SLOWEST) \
	  $(INTEG:%='MAILSHOT=build/asan/mailshot MAILSHOT_PLAIN=./mailshot /usr/bin/python3 -m unittest -v tests.integration.%')

# Every test again under valgrind (memcheck, full leak check), on the plain build: the ASan runtime and
# valgrind do not mix.  Any error, or a definitely or indirectly lost block, fails.  The unit tests are
# built a second time without ASan (build/test_NAME).  The integration tests wrap each mailshot they
# start (tests/integration/harness.py, MAILSHOT_VALGRIND=1, the same flags as below) and fail on any
# non-empty valgrind log; loads are smaller there (harness.scaled), and a test whose C lines and branches
# the others cover is marked valgrind_redundant and runs in make test only (MAILSHOT_VALGRIND_ALL=1 runs
# it here too; make valgrind-coverage checks that no C line or branch is lost that way).  tests/valgrind.supp, when present,
# holds suppressions for third-party code only.  Not part of `make test` (the quick loop); `make check`
# runs both.  valgrind is CPU-bound, but the integration tests also wait: every unit binary, Lua test
# and integration module is one command of tests/run_jobs.py, JOBS at once (logs in build/jobs/valgrind).
VALGRIND_SUPP  := $(wildcard tests/valgrind.supp)
VALGRIND       := env MAILSHOT_MALLOC=libc valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect \
                  --show-leak-kinds=definite,indirect --error-exitcode=99 $(VALGRIND_SUPP:%=--suppressions=%)
VG_UNIT        := $(UNIT_SRC:tests/unit/test_%.c=build/test_%)
VG_LUA         := $(wildcard tests/lua/test_*.lua)

build/test_%: tests/unit/test_%.c tests/unit/check.h $(OBJ)
	$(CC) $(MS_CFLAGS) $(CFLAGS) -Isrc -o $@ $< $(OBJ) $(LDLIBS)

valgrind: deps
	@$(MAKE) --no-print-directory valgrind-all
	@echo "valgrind: all tests passed"

# `make tsan` is one more command of the same pool (its build and its run overlap the valgrind work).
# VG_SLOWEST: the commands that take longest under valgrind, started first (they differ from the ASan
# pass's: the valgrind_redundant tests do not run there, and the Lua tests are CPU-bound).
VG_SLOWEST := tsan,test_campaign,test_faults,test_relay,test_check,test_direct,test_dkim,test_csv.lua,test_suppress.lua,test_mime.lua,test_mimeenc.lua
valgrind-all: mailshot $(VG_UNIT) | build
	@/usr/bin/python3 tests/run_jobs.py -j $(JOBS) --logs build/jobs/valgrind --first $(VG_SLOWEST) \
	  '$(MAKE) --no-print-directory tsan' \
	  $(INTEG:%='MAILSHOT_VALGRIND=1 MAILSHOT=./mailshot /usr/bin/python3 -m unittest -v tests.integration.%') \
	  $(VG_LUA:%='MAILSHOT_VALGRIND=1 $(VALGRIND) ./mailshot exec %') \
	  $(VG_UNIT:%='$(VALGRIND) %')

# libFuzzer targets (tests/fuzz/), built with clang, ASan and UBSan; undefined behaviour aborts, so
# libFuzzer reports it.  fuzz-smoke (part of `make test`) runs each one FUZZ_SECONDS on a copy of its
# seed corpus (tests/fuzz/corpus/NAME/, with tests/fuzz/NAME.dict when there is one) and fails on any
# crash, leak, timeout or broken assertion: the input is then build/fuzz/NAME-crash-* (-leak-,
# -timeout-), the output build/fuzz/NAME.log.  `make fuzz` runs 300 s each; FUZZ_FLAGS adds options.
# The Lua targets run with -detect_leaks=0: their Lua state lives across inputs, so nearly every
# input ends with more mallocs than frees and libFuzzer would scan the heap for leaks after each.
.PHONY: fuzz fuzz-smoke
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 10
FUZZ_TARGETS := csv dns mime mimeenc smtp_proto template bounce
FUZZ_CFLAGS  := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -D_GNU_SOURCE \
                -Isrc $(shell pkg-config --cflags lua5.4 2>/dev/null)
FUZZ_LUA     := $(shell pkg-config --libs lua5.4 2>/dev/null || echo -llua5.4) -lm

build/fuzz:
	@mkdir -p $@

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(wildcard tests/fuzz/*.h src/*.h) | build/fuzz
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $(filter %.c,$^) $(FUZZ_LIBS)
build/fuzz/fuzz_csv: src/csv_reader.c src/csv_encoding.c
build/fuzz/fuzz_csv: FUZZ_LIBS = -lcsv
build/fuzz/fuzz_smtp_proto: src/smtp_proto.c src/bytebuf.c
build/fuzz/fuzz_mimeenc: src/mimeenc.c src/bytebuf.c
build/fuzz/fuzz_dns: src/dns.c src/loop.c
build/fuzz/fuzz_dns: FUZZ_LIBS = $(shell pkg-config --libs libcares 2>/dev/null || echo -lcares)
build/fuzz/fuzz_template build/fuzz/fuzz_mime build/fuzz/fuzz_bounce: build/lua_embed.c src/l_text.c src/mimeenc.c src/smtp_proto.c src/bytebuf.c
build/fuzz/fuzz_template build/fuzz/fuzz_mime build/fuzz/fuzz_bounce: FUZZ_LIBS = $(FUZZ_LUA)

FUZZ_BIN     := $(FUZZ_TARGETS:%=build/fuzz/fuzz_%)
.PHONY: fuzz-build $(FUZZ_TARGETS:%=fuzz-smoke-%)
fuzz-build: $(FUZZ_BIN)

fuzz-smoke: $(FUZZ_TARGETS:%=fuzz-smoke-%)

# one target's smoke run (make test runs each as one command of its pool)
$(FUZZ_TARGETS:%=fuzz-smoke-%): fuzz-smoke-%: build/fuzz/fuzz_%
	@t=$*; dir=$$(mktemp -d) && cp tests/fuzz/corpus/$$t/* $$dir/ || exit 1; \
	  opts=; [ -f tests/fuzz/$$t.dict ] && opts=-dict=tests/fuzz/$$t.dict; \
	  grep -q fuzz_lua.h tests/fuzz/fuzz_$$t.c && opts="$$opts -detect_leaks=0"; \
	  build/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=25 $$opts \
	    -artifact_prefix=build/fuzz/$$t- $(FUZZ_FLAGS) $$dir >build/fuzz/$$t.log 2>&1; \
	  rc=$$?; rm -rf $$dir; \
	  if [ $$rc -ne 0 ]; then tail -n 40 build/fuzz/$$t.log; echo "fuzz $$t: FAILED, see build/fuzz/$$t.log"; exit 1; fi; \
	  echo "fuzz $$t: $$(grep -a DONE build/fuzz/$$t.log | tail -n 1 | tr -s ' \t' ' ')"

fuzz:
	@$(MAKE) --no-print-directory fuzz-smoke FUZZ_SECONDS=300

install: mailshot
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 mailshot $(DESTDIR)$(PREFIX)/bin/mailshot

clean:
	rm -rf build mailshot
