"""The source tree's own consistency: what the comments cite is in the repository."""
import os
import re
import subprocess
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TreeTests(unittest.TestCase):
    def test_every_file_a_comment_cites_is_in_the_repository(self):
        ls = subprocess.run(["git", "ls-files", "src", "lua", "tests", "scripts", "Makefile", "README.md"],
                            cwd=ROOT, capture_output=True, text=True)
        if ls.returncode != 0:
            self.skipTest("not a git checkout: " + ls.stderr.strip())
        files = ls.stdout.split()
        files = [f for f in files if "/corpus/" not in f and os.path.isfile(os.path.join(ROOT, f))]
        self.assertGreater(len(files), 50)
        missing = []
        for f in files:
            with open(os.path.join(ROOT, f), encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    m = re.search(r"(--|//|/\*|^\s*\*|^\s*#|\s#)(.*)", line)   # the comment part of the line
                    if not m:
                        continue
                    # a cited document (a name ending in .md), or a file outside the tree (in the shared folder)
                    for cited in re.findall(r"(?<![\w/.])((?:\.\./)+shared\S*|[\w/-]*\w\.md)\b", m.group(2)):
                        if cited.startswith("..") or not any(
                                os.path.exists(os.path.join(base, cited)) for base in (ROOT, os.path.dirname(os.path.join(ROOT, f)))):
                            missing.append(f"{f}:{n}: {cited}")
        self.assertEqual(missing, [])

    def test_make_cflags_changes_optimisation_only(self):
        # `make CFLAGS=-O0` must keep the flags the code needs (C11, _GNU_SOURCE, the version, include paths)
        p = subprocess.run(["make", "-n", "-B", "CFLAGS=-O0 -g3", "mailshot"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        compiles = [line for line in p.stdout.splitlines() if " -c " in line and "src/" in line and "embed_gen" not in line]
        self.assertGreater(len(compiles), 10)
        for line in compiles:
            for flag in ("-std=c11", "-D_GNU_SOURCE", "-DMAILSHOT_VERSION=", "-Wall", "-O0 -g3"):
                self.assertIn(flag, line)


if __name__ == "__main__":
    unittest.main()
