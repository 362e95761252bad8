"""`mailshot --help` / `mailshot COMMAND --help` against README's Commands section: the same commands and,
for each, the same options (README is the reference; --help is its summary, and a test keeps them in step)."""
import os
import re
import unittest

from tests.integration.harness import MailshotTestCase, REPO_ROOT, scaled, valgrind_redundant

OPT = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def readme_commands():
    """{command: set of options} from README's `### \\`mailshot COMMAND ...\\`` headings under ## Commands."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^## Commands\n(.*?)^## ", text, re.M | re.S).group(1)
    out = {}
    for m in re.finditer(r"^### `mailshot ([a-z]+)([^`]*)`", section, re.M):
        out[m.group(1)] = set(OPT.findall(m.group(2)))
    return section, out


def help_options(text):
    """The options of a COMMAND --help: those in its Usage lines, and those its option list describes."""
    usage = text.split("\n\n", 1)[0]
    listed = re.findall(r"^ {2,}(--[a-z][a-z0-9-]*)", text, re.M)
    return set(OPT.findall(usage)), set(listed)


class HelpTests(MailshotTestCase):
    def test_every_command_is_in_both_help_and_readme(self):
        section, readme = readme_commands()
        p = self.run_mailshot("--help")
        self.assertEqual(p.returncode, 0, p.stderr)
        block = re.search(r"^Commands:\n(.*?)\n\n", p.stdout, re.M | re.S).group(1)
        listed = {m.group(1) for m in re.finditer(r"^  ([a-z]+) ", block, re.M)}
        self.assertGreaterEqual(len(listed), 7, block)
        self.assertEqual(listed, set(readme), "commands in `mailshot --help` vs README's ### headings")
        # the global options too (README: one heading for --lua-path, --help and --version in the text)
        glob = re.search(r"^Global options:\n(.*?)\n\n", p.stdout, re.M | re.S).group(1)
        opts = re.findall(r"(?<![\w-])--?[a-zA-Z][a-z0-9-]*", glob)
        self.assertTrue({"-h", "--help", "-V", "--version", "--lua-path"} <= set(opts), glob)
        for opt in opts:
            self.assertRegex(section, rf"`[^`]*(?<![\w-]){re.escape(opt)}(?![\w-])[^`]*`",
                             f"global option {opt} of --help is not in README's Commands section")

    @valgrind_redundant("tests/lua/test_bounce.lua")
    def test_each_commands_help_lists_the_readme_headings_options(self):
        _, readme = readme_commands()
        for cmd, documented in sorted(readme.items()):
            if cmd == "help":   # `mailshot help [COMMAND]`: no options; it prints the others' help
                self.assertEqual(documented, set())
                continue
            with self.subTest(command=cmd):
                p = self.run_mailshot(cmd, "--help")
                self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
                self.assertTrue(p.stdout.startswith(f"Usage: mailshot {cmd}"), p.stdout)
                self.assertEqual(p.stdout, self.run_mailshot("help", cmd).stdout)
                usage, listed = help_options(p.stdout)
                self.assertEqual(usage, documented, f"`mailshot {cmd} --help` Usage vs README's heading")
                if listed:   # a command with options describes each of them, and no other
                    self.assertEqual(listed, usage, f"`mailshot {cmd} --help`: described vs Usage")

    @valgrind_redundant("tests/lua/test_bounce.lua")
    def test_every_option_in_help_is_one_the_command_accepts(self):
        _, readme = readme_commands()
        for cmd, documented in sorted(readme.items()):
            if cmd == "help" or not documented:   # exec takes FILE and passes the rest on
                continue
            prefix = ["dkim", "keygen"] if cmd == "dkim" else [cmd]
            with self.subTest(command=cmd):
                p = self.run_mailshot(*prefix, "--no-such-option")
                self.assertIn("unknown option --no-such-option", p.stderr)
            # option parsing is Lua: valgrind adds nothing but minutes, so it tries one option per command
            for opt in sorted(documented)[:scaled(len(documented), 1)]:
                with self.subTest(command=cmd, option=opt):
                    # no SCRIPT/HOST: the command stops at a usage error, but not at "unknown option"
                    p = self.run_mailshot(*prefix, opt)
                    self.assertNotIn("unknown option", p.stderr)


if __name__ == "__main__":
    unittest.main()
