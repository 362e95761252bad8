"""A campaign with DKIM signing and one-click unsubscribe: every message the server receives verifies with
dkimpy, for RSA and
Ed25519, also when many are signed at once on 2 worker threads; `mailshot dkim keygen` writes a private key (mode 0600) and the TXT record that verifies it;
a bad key stops the script before anything is sent."""
import os
import stat
import unittest

import dkim

from tests.integration.harness import MailshotTestCase, scaled, write_csv, valgrind_redundant

CAMPAIGN = """
local mailshot = require "mailshot"
local relay = mailshot.relay { server = os.getenv "SMTP_SERVER", tls = "none" }
return mailshot.campaign {
  recipients = "list.csv", from = "Acme <news@acme.example>", subject = "Grüße, {{name}}",
  text = "Hello {{name}},\\n\\nnews.\\n", html = "<p>Hello {{name}}</p>",
  dkim = { domain = "acme.example", selector = "s1", key_file = os.getenv "KEY", threads = tonumber(os.getenv "THREADS") },
  unsubscribe = { url = "https://acme.example/u/{{token}}", mailto = "unsub@acme.example",
                  secret = "a-test-secret-of-some-length" },
  send = relay,
}
"""


class CampaignDkimTests(MailshotTestCase):
    def keygen(self, algorithm):
        p = self.run_mailshot("dkim", "keygen", "--selector", "s1", "--domain", "acme.example",
                              "--algorithm", algorithm, "--out", f"{algorithm}.key")
        self.assertEqual(p.returncode, 0, p.stderr)
        key = self.path(f"{algorithm}.key")
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertIn("s1._domainkey.acme.example", p.stdout)
        txt = p.stdout.strip().splitlines()[-1]
        self.assertTrue(txt.startswith("v=DKIM1; k="), txt)
        again = self.run_mailshot("dkim", "keygen", "--selector", "s1", "--domain", "acme.example",
                                  "--algorithm", algorithm, "--out", f"{algorithm}.key")
        self.assertEqual(again.returncode, 1)            # never overwrites a key
        return key, txt.encode()

    @valgrind_redundant("test_csv_encoding.test_latin1_declared_sends_correct_utf8_names, "
                        "tests/lua/test_dkim_pool.lua")
    def test_messages_sent_by_a_dkim_campaign_verify_for_both_algorithms(self):
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [[f"u{i}@example.com", f"Zoë {i}"] for i in range(5)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        for algorithm in ("rsa-sha256", "ed25519-sha256"):
            key, record = self.keygen(algorithm)
            srv = self.start_smtpd()
            p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--force", "--report", f"{algorithm}.csv",
                                  env={"SMTP_SERVER": srv.address, "KEY": key})
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            msgs = srv.messages()
            self.assertEqual(len(msgs), 5)

            def dnsfunc(name, timeout=5):
                self.assertEqual(name, b"s1._domainkey.acme.example.")
                return record
            for m in msgs:
                self.assertTrue(dkim.verify(m["raw"], dnsfunc=dnsfunc), algorithm)
                # the one-click unsubscribe headers are there, and signed (RFC 8058 section 4)
                self.assertEqual(str(m["msg"]["List-Unsubscribe-Post"]), "List-Unsubscribe=One-Click")
                sig = m["raw"].split(b"\r\n\r\n")[0].replace(b"\r\n", b"").replace(b" ", b"").replace(b"\t", b"")
                hdrs = sig[sig.index(b"h=") + 2:].split(b";")[0].lower()
                self.assertIn(b"list-unsubscribe:list-unsubscribe-post", hdrs)
                self.assertIn(f"a={algorithm};".encode(), m["raw"].replace(b"\r\n\t", b"").replace(b" ", b""))
            tampered = msgs[0]["raw"].replace(b"news.", b"NEWS.")
            self.assertFalse(dkim.verify(tampered, dnsfunc=dnsfunc))

    @valgrind_redundant("test_csv_encoding.test_latin1_declared_sends_correct_utf8_names, "
                        "test_preflight.test_a_list_that_is_not_utf8_without_an_encoding_blocks")
    def test_two_signing_threads_every_message_verifies(self):
        # 24 messages in flight (the relay's default concurrency) share 2 signing threads; each
        # message carries its own name and must verify on its own bytes
        n = scaled(300, 12)
        d = self.path("c")
        os.makedirs(d)
        names = ["Zoë", "Дмитрий", "محمد", "王芳", "José", "Ann"]
        write_csv(os.path.join(d, "list.csv"), ["email", "name"],
                  [[f"u{i}@example.com", f"{names[i % len(names)]} {i}"] for i in range(n)])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        # under valgrind (30 times slower, threads run one at a time) Ed25519 alone: an RSA key made and
        # used there takes minutes, and the worker's code is the same for both
        for algorithm in scaled(("rsa-sha256", "ed25519-sha256"), ("ed25519-sha256",)):
            key, record = self.keygen(algorithm)
            srv = self.start_smtpd()
            p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--force", "--report", f"{algorithm}.csv",
                                  env={"SMTP_SERVER": srv.address, "KEY": key, "THREADS": "2"})
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            msgs = srv.messages()
            self.assertEqual(len(msgs), n)
            seen = set()
            for m in msgs:
                self.assertTrue(dkim.verify(m["raw"], dnsfunc=lambda name, timeout=5: record), algorithm)
                seen.add(m["msg"]["To"].addresses[0].addr_spec)
            self.assertEqual(seen, {f"u{i}@example.com" for i in range(n)})

    def test_a_script_that_ends_while_tasks_wait_on_signatures_exits_cleanly(self):
        # the workers are joined and every job freed (ASan's leak check, or valgrind's, sees the rest)
        key, _ = self.keygen(scaled("rsa-sha256", "ed25519-sha256"))   # RSA keygen under valgrind: a minute
        with open(self.path("s.lua"), "w") as f:
            f.write(f"""
local core, dkim = require("mailshot.core"), require("mailshot.dkim")
local s = assert(dkim.signer {{ domain = "acme.example", selector = "s1", key_file = {key!r}, threads = 2 }})
local signed = 0
for i = 1, 200 do
  core.spawn(function() assert(s:sign("From: a@acme.example\\r\\n\\r\\n" .. ("x"):rep(i * 100))); signed = signed + 1 end)
end
core.sleep(0)
print("leaving with jobs out: " .. tostring(signed < 200))
return 0
""")
        p = self.run_mailshot("exec", self.path("s.lua"))
        self.assertEqual((p.returncode, p.stdout, p.stderr), (0, "leaving with jobs out: true\n", ""))

    def test_signing_threads_started_before_signals_are_watched_never_take_a_sigint(self):
        # SIGINT must reach the loop's signalfd (the graceful stop), never a worker thread, where its
        # default action would kill the process: the workers block every signal
        key, _ = self.keygen("ed25519-sha256")
        with open(self.path("s.lua"), "w") as f:
            f.write(f"""
local core, dkim, util = require("mailshot.core"), require("mailshot.dkim"), require("mailshot.util")
local s = assert(dkim.signer {{ domain = "acme.example", selector = "s1", key_file = {key!r}, threads = 2 }})
assert(s:sign("From: a@acme.example\\r\\n\\r\\nhi"))    -- the threads run now
local got
local waiter = core.spawn(function() got = util.wait_signal() end)
core.sleep(0)                                                 -- the signals are blocked and watched now
local pid = io.popen("echo $PPID"):read("l")
for _ = 1, 3 do io.popen("kill -INT " .. pid):close(); core.sleep(0.05) end   -- (system() would ignore SIGINT)
util.stop_signals()
print("signal: " .. tostring(got))
return 0
""")
        p = self.run_mailshot("exec", self.path("s.lua"))
        self.assertEqual((p.returncode, p.stdout, p.stderr), (0, "signal: INT\n", ""))

    def test_a_missing_key_stops_the_script_before_sending(self):
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email", "name"], [["u@example.com", "U"]])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write(CAMPAIGN)
        srv = self.start_smtpd()
        p = self.run_mailshot("run", os.path.join(d, "c.lua"), "--send", "--report", "r.csv",
                              env={"SMTP_SERVER": srv.address, "KEY": self.path("nope.key")})
        self.assertEqual(p.returncode, 2)
        self.assertIn("dkim", p.stderr)
        self.assertIn("nope.key", p.stderr)
        self.assertEqual(srv.connections(), 0)


if __name__ == "__main__":
    unittest.main()
