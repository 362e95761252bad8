# mailshot - build, demo, tests.
#
#   make            build ./mailshot
#   make demo       install missing Debian packages, build, dry-run the example campaign
#   make check      install missing Debian packages, build, run every test
#   make bench      throughput, memory, TLS and rate-limit figures (scripts/bench.py)
#   make install    PREFIX=/usr/local (default) DESTDIR=...
#
# The Lua library in lua/ is compiled into the binary (build/lua_embed.c), so ./mailshot is one
# self-contained file.  MAILSHOT_LUA_PATH=lua (or --lua-path lua) loads the modules from the tree instead.

CC      ?= cc
PREFIX  ?= /usr/local
VERSION := 0.1.0
PKGS    := lua5.4 libcares openssl
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -Wall -Wextra -Wshadow -Wno-unused-parameter -D_GNU_SOURCE \
           -DMAILSHOT_VERSION='"$(VERSION)"' $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS  += $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -llua5.4 -lcares -lssl -lcrypto) -lcsv -lm

SRC      := $(wildcard src/*.c)
LIB_SRC  := $(filter-out src/main.c src/embed_gen.c, $(SRC))
LUA_SRC  := $(shell find lua -name '*.lua' | sort)
UNIT_SRC := $(wildcard tests/unit/test_*.c)

OBJ      := $(LIB_SRC:src/%.c=build/%.o)
ASAN_OBJ := $(LIB_SRC:src/%.c=build/asan/%.o)
SAN      := -fsanitize=address,undefined -fno-omit-frame-pointer

# Debian packages the build and the tests need (installed by `make deps` when missing).
DEB_BUILD := gcc make pkg-config liblua5.4-dev libssl-dev libc-ares-dev libcsv-dev
DEB_TEST  := python3 python3-aiosmtpd python3-dkim python3-nacl openssl postfix dnsmasq-base valgrind

.PHONY: all deps demo check test unit luatest integration bench install clean
all: mailshot

build build/asan:
	@mkdir -p $@

build/%.o: src/%.c $(wildcard src/*.h) | build
	$(CC) $(CFLAGS) -c -o $@ $<

build/asan/%.o: src/%.c $(wildcard src/*.h) | build/asan
	$(CC) $(CFLAGS) -O1 $(SAN) -c -o $@ $<

build/embed_gen: src/embed_gen.c | build
	$(CC) -O2 -o $@ $<

build/lua_embed.c: build/embed_gen $(LUA_SRC)
	build/embed_gen lua $(LUA_SRC) > $@.tmp && mv $@.tmp $@

mailshot: src/main.c build/lua_embed.c $(OBJ)
	$(CC) $(CFLAGS) -Isrc -o $@ src/main.c build/lua_embed.c $(OBJ) $(LDLIBS)

# The same program under AddressSanitizer + UBSan: the integration tests run this one.
build/asan/mailshot: src/main.c build/lua_embed.c $(ASAN_OBJ)
	$(CC) $(CFLAGS) -O1 $(SAN) -Isrc -o $@ src/main.c build/lua_embed.c $(ASAN_OBJ) $(LDLIBS)

build/asan/test_%: tests/unit/test_%.c tests/unit/check.h $(ASAN_OBJ)
	$(CC) $(CFLAGS) -O1 $(SAN) -Isrc -o $@ $< $(ASAN_OBJ) $(LDLIBS)

deps:
	@sh scripts/deps.sh $(DEB_BUILD) $(if $(filter check test bench,$(MAKECMDGOALS)),$(DEB_TEST))

# A TLS-capable sink for the benchmark (smtp-sink has no STARTTLS).
build/tls_sink: tests/servers/tls_sink.c | build
	$(CC) -O2 -std=c11 -Wall -Wextra -D_GNU_SOURCE -o $@ $< $(shell pkg-config --cflags --libs openssl)

# mailshot against Postfix's smtp-sink, beside smtp-source; see scripts/bench.py for the knobs.
bench: deps
	@$(MAKE) --no-print-directory mailshot build/tls_sink
	/usr/bin/python3 scripts/bench.py

demo: deps
	@$(MAKE) --no-print-directory mailshot
	./mailshot run scripts/examples/newsletter/campaign.lua --outbox build/demo-outbox --report build/demo-report.csv

check: deps
	@$(MAKE) --no-print-directory test

test: mailshot build/asan/mailshot unit luatest integration
	@echo "all tests passed"

unit: $(UNIT_SRC:tests/unit/test_%.c=build/asan/test_%)
	@for t in $^; do $$t || exit 1; done

luatest: build/asan/mailshot
	@for t in tests/lua/test_*.lua; do build/asan/mailshot exec $$t || exit 1; done

# Integration tests drive the ASan build; test_valgrind runs the plain one under valgrind.
integration: mailshot build/asan/mailshot
	MAILSHOT=build/asan/mailshot MAILSHOT_PLAIN=./mailshot /usr/bin/python3 -m unittest discover -s tests/integration -t . -v

install: mailshot
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 mailshot $(DESTDIR)$(PREFIX)/bin/mailshot

clean:
	rm -rf build mailshot
