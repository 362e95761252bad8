"""Do the tests that make valgrind runs cover every C line and branch that the whole suite covers?

    make valgrind-coverage          (builds build/cov/, then runs this)
    /usr/bin/python3 scripts/valgrind-coverage.py [-j N] [--unique]

Under valgrind a test costs seconds (each mailshot it starts spends about a second in valgrind's start-up
alone), and what valgrind can find depends on which C paths run, not on which Lua-level behaviour a test
checks.  So a test whose C paths others cover is marked valgrind_redundant(reason) (harness.py) and only
the ASan pass runs it.  This script checks that no C line or branch is lost that way:

  - it runs every integration test as make valgrind would (MAILSHOT_VALGRIND=1: the smaller loads of
    harness.scaled, the skip_under_valgrind skips, the Lua state on the C library's malloc) but on
    build/cov/mailshot (the plain build with gcov counters) instead of under valgrind, with
    MAILSHOT_VALGRIND_ALL=1 so that the redundant tests run too, each test writing its own counters
    (GCOV_PREFIX); and every Lua test and C unit test (make valgrind runs all of them);
  - with gcov, for each test: the lines of src/*.c it ran and the branches it took;
  - all  = what any of them covers; kept = what the ones make valgrind runs cover (the unmarked
    integration tests, the Lua and unit tests); it prints what is in all but not in kept, with the
    tests that cover it, and exits 1 if there is any.

--unique lists, for each integration test that runs under valgrind, the lines and branches no other one
covers (what a new valgrind_redundant mark would lose).  Coverage depends a little on timing (a retry that
fires or not), so a line that one run misses may be there in the next: look at what it names.  Counters
and logs: build/cov/data/, build/cov/logs/.  About 3 minutes on 2 cores.
"""

import argparse
import collections
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COV = os.path.join(ROOT, "build", "cov")
DATA = os.path.join(COV, "data")
LOGS = os.path.join(COV, "logs")


def run_module(module):
    """Child mode: run one integration module the make valgrind way, without valgrind; one JSON line per
    test on stdout."""
    os.environ.update(MAILSHOT=os.path.join(COV, "mailshot"), MAILSHOT_VALGRIND="1", MAILSHOT_VALGRIND_ALL="1")
    sys.path.insert(0, ROOT)
    from tests.integration import harness
    # what the valgrind command line sets (Makefile VALGRIND, harness._valgrind_prefix), without valgrind
    harness._valgrind_prefix = lambda log_dir: ["env", "MAILSHOT_MALLOC=libc"]

    class Result(unittest.TextTestResult):
        def startTest(self, test):
            os.environ["GCOV_PREFIX"] = os.path.join(DATA, test.id())
            self.t0 = time.monotonic()
            self.outcome = "ok"
            super().startTest(test)

        def addFailure(self, test, err):
            self.outcome = "FAIL"
            super().addFailure(test, err)

        def addError(self, test, err):
            self.outcome = "FAIL"
            super().addError(test, err)

        def addSkip(self, test, reason):
            self.outcome = "skip"
            super().addSkip(test, reason)

        def stopTest(self, test):
            super().stopTest(test)
            method = getattr(test, test._testMethodName, None)
            redundant = any(hasattr(o, "__valgrind_redundant__") for o in (method, type(test)))
            print(json.dumps({"id": test.id(), "outcome": self.outcome, "redundant": redundant,
                              "secs": round(time.monotonic() - self.t0, 2)}), flush=True)

    suite = unittest.defaultTestLoader.loadTestsFromName("tests.integration." + module)
    unittest.TextTestRunner(stream=sys.stderr, resultclass=Result, verbosity=2).run(suite)


def pool(commands, jobs):
    """Run (name, argv, env) commands jobs at once; {name: its stdout}."""
    os.makedirs(LOGS, exist_ok=True)
    pending, running, out = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, argv, env = pending.pop(0)
            with open(os.path.join(LOGS, name + ".log"), "w") as log, \
                 open(os.path.join(LOGS, name + ".out"), "w") as stdout:
                proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **env), stdout=stdout, stderr=log)
            running[proc.pid] = (name, time.monotonic())
        pid, _ = os.wait()
        if pid in running:
            name, t0 = running.pop(pid)
            with open(os.path.join(LOGS, name + ".out")) as f:
                out[name] = f.read()
            print(f"  {time.monotonic() - t0:5.1f}s {name}", flush=True)
    return out


def covered(prefix):
    """The (file, line) and (file, line, branch) of src/*.c that the runs under GCOV_PREFIX=prefix covered."""
    items = set()
    gcnos = glob.glob(os.path.join(COV, "*.gcno"))
    for d in {os.path.dirname(p) for p in glob.glob(os.path.join(prefix, "**", "*.gcda"), recursive=True)}:
        for g in gcnos:
            link = os.path.join(d, os.path.basename(g))
            if not os.path.exists(link):
                os.symlink(g, link)
        gcda = glob.glob(os.path.join(d, "*.gcda"))
        p = subprocess.run(["gcov", "-b", "--json-format", "--stdout", "-o", d, *gcda], cwd=ROOT,
                           capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if not line.startswith("{"):
                continue
            for f in json.loads(line)["files"]:
                if not f["file"].startswith("src/"):
                    continue
                for ln in f["lines"]:
                    if ln["count"] > 0:
                        items.add((f["file"], ln["line_number"]))
                        items.update((f["file"], ln["line_number"], i)
                                     for i, b in enumerate(ln["branches"]) if b["count"] > 0)
    return items


def show(item):
    return f"{item[0]}:{item[1]}" + (f" (branch {item[2]})" if len(item) == 3 else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", type=int, default=2)
    ap.add_argument("--unique", action="store_true")
    ap.add_argument("--run-module", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_module:
        return run_module(args.run_module)

    if not os.access(os.path.join(COV, "mailshot"), os.X_OK):
        sys.exit("build/cov/mailshot is missing: run make valgrind-coverage")
    shutil.rmtree(DATA, ignore_errors=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    py = "/usr/bin/python3"
    modules = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tests", "integration", "test_*.py")))
    commands = [(m, [py, os.path.abspath(__file__), "--run-module", m], {}) for m in modules]
    for lua in sorted(glob.glob(os.path.join(ROOT, "tests", "lua", "test_*.lua"))):
        name = "lua:" + os.path.basename(lua)
        commands.append((name, [os.path.join(COV, "mailshot"), "exec", os.path.relpath(lua, ROOT)],
                         {"MAILSHOT_VALGRIND": "1", "MAILSHOT_MALLOC": "libc", "GCOV_PREFIX": os.path.join(DATA, name)}))
    for unit in sorted(glob.glob(os.path.join(COV, "test_*"))):
        if os.access(unit, os.X_OK) and "." not in os.path.basename(unit):
            name = "unit:" + os.path.basename(unit)
            commands.append((name, [unit], {"GCOV_PREFIX": os.path.join(DATA, name)}))
    print(f"running {len(commands)} commands, {args.j} at once (logs in {os.path.relpath(LOGS, ROOT)})")
    out = pool(commands, args.j)

    tests = {}                  # test id -> record
    for name, text in out.items():
        if ":" in name:
            tests[name] = {"id": name, "outcome": "ok", "redundant": False}
        for line in text.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                tests[rec["id"]] = rec
    # (this one checks the valgrind command line itself, which these runs replace)
    failed = [t for t, r in tests.items() if r["outcome"] == "FAIL"
              and not t.endswith("test_valgrind_logs_fail_the_test_once_with_their_content")]
    ran = [t for t, r in tests.items() if r["outcome"] != "skip"]
    print(f"collecting coverage of {len(ran)} tests (gcov)", flush=True)
    cov = {t: covered(os.path.join(DATA, t)) for t in ran}
    kept_tests = [t for t in ran if not tests[t]["redundant"]]
    redundant = [t for t in ran if tests[t]["redundant"]]
    everything = set().union(*cov.values())
    kept = set().union(*(cov[t] for t in kept_tests))
    lines = lambda s: sum(1 for i in s if len(i) == 2)
    print(f"{len(kept_tests)} tests run under valgrind ({sum(1 for t in kept_tests if ':' not in t)} integration, "
          f"the rest Lua and unit tests), {len(redundant)} are marked valgrind_redundant")
    print(f"C lines covered: {lines(everything)} by all, {lines(kept)} by those under valgrind; "
          f"branches taken: {len(everything) - lines(everything)} and {len(kept) - lines(kept)}")
    if failed:
        print(f"(these tests failed here, their coverage is partial: {', '.join(failed)})")
    if args.unique:
        count = collections.Counter(i for t in kept_tests for i in cov[t])
        for t in sorted(kept_tests):
            mine = sorted(i for i in cov[t] if count[i] == 1)
            if mine and ":" not in t:
                print(f"only {t} covers {len(mine)}: " + ", ".join(map(show, mine[:12])) +
                      (" ..." if len(mine) > 12 else ""))
    missing = sorted(everything - kept)
    if not missing:
        print("OK: the tests under valgrind cover every C line and branch the whole suite does")
        return 0
    print(f"MISSING under valgrind: {len(missing)} lines/branches")
    for i in missing:
        who = sorted(t.rsplit(".", 1)[-1] for t in redundant if i in cov[t])
        print(f"  {show(i)}: {', '.join(who)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
