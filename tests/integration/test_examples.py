"""Every campaign in scripts/examples/ runs: a dry run of each as shipped, and the fallback example
sent for real through local DNS and SMTP servers."""
import glob
import os
import re
import shutil
import unittest

from tests.integration.harness import (MailshotTestCase, REPO_ROOT, free_port, read_report, write_csv,
                                       valgrind_redundant)

EXAMPLES = sorted(glob.glob(os.path.join(REPO_ROOT, "scripts", "examples", "*", "*.lua")))


class ExampleTests(MailshotTestCase):
    @valgrind_redundant("test_csv_encoding.test_latin1_declared_sends_correct_utf8_names, "
                        "test_campaign.test_bad_rows_are_reported_with_line_numbers_and_the_run_goes_on")
    def test_every_example_dry_runs_as_shipped(self):
        self.assertGreaterEqual(len(EXAMPLES), 2)
        names = {}
        for script in EXAMPLES:
            with self.subTest(script=os.path.relpath(script, REPO_ROOT)):
                out = self.path("out-" + os.path.basename(os.path.dirname(script)))
                p = self.run_mailshot("run", script, "--outbox", out, "--report", out + ".csv",
                                      env={"SMTP_SERVER": f"127.0.0.1:{free_port()}"})
                self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
                rep = read_report(out + ".csv")
                self.assertTrue(rep)
                self.assertEqual({r["status"] for r in rep}, {"written"})
                self.assertEqual(len(os.listdir(out)), len(rep))
                # the summary line names the campaign: the name its default report and journal take
                m = re.search(r"^mailshot: (.+?): \d+ recipients:", p.stdout, re.M)
                self.assertTrue(m, p.stdout)
                names[os.path.relpath(script, REPO_ROOT)] = m.group(1)
        # distinct names (not every one "campaign", after campaign.lua): reports and journals written to
        # one folder (--report DIR/...) must not collide
        self.assertEqual(len(set(names.values())), len(names), names)
        self.assertNotIn("campaign", names.values())

    def test_fallback_example_routes_each_recipient_by_its_rules(self):
        servers, port = self.start_smtpd_many(["127.0.0.2", "127.0.0.6"],
                                              reject_rcpt=[("bad@", 550, "5.1.1 no such user")])
        relay = self.start_smtpd()
        dns = self.start_dns({
            "mx": [("good.test", "mx.good.test", 10), ("flaky.test", "mx.flaky.test", 10),
                   ("relayonly.test", "mx.good.test", 10)],
            "a": [("mx.good.test", "127.0.0.2"), ("mx.flaky.test", "127.0.0.9")],
        })
        d = self.path("fb")
        os.makedirs(d)
        shutil.copy(os.path.join(REPO_ROOT, "scripts", "examples", "fallback", "campaign.lua"), d)
        write_csv(os.path.join(d, "recipients.csv"), ["email", "first_name"],
                  [["a@good.test", "A"], ["b@relayonly.test", "B"], ["c@flaky.test", "C"], ["bad@good.test", "D"]])
        env = {"DNS_SERVER": dns.address, "DIRECT_PORT": str(port), "DIRECT_ALLOW_PRIVATE": "1",
               "SMTP_SERVER": relay.address, "SMTP_TLS": "none",
               "RELAY_ONLY_DOMAINS": "relayonly.test", "RETRY_AFTER": "0.2"}
        p = self.run_mailshot("run", os.path.join(d, "campaign.lua"), "--send", "--report", "r.csv", env=env)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)     # bad@ is refused for good
        rep = {r["email"]: r for r in read_report(self.path("r.csv"))}
        self.assertEqual((rep["a@good.test"]["status"], rep["a@good.test"]["via"], rep["a@good.test"]["mx"]),
                         ("sent", "direct", "mx.good.test"))
        self.assertEqual((rep["b@relayonly.test"]["status"], rep["b@relayonly.test"]["via"]), ("sent", "relay"))
        self.assertEqual((rep["c@flaky.test"]["status"], rep["c@flaky.test"]["via"]), ("sent", "relay"))
        self.assertRegex(rep["c@flaky.test"]["first_response"], r"^direct: ")   # the first path's answer
        self.assertEqual(rep["a@good.test"]["first_response"], "")
        self.assertEqual((rep["bad@good.test"]["status"], rep["bad@good.test"]["code"], rep["bad@good.test"]["via"]),
                         ("failed", "550", "direct"))
        self.assertEqual(sorted(m["rcpt_tos"][0] for m in relay.messages()), ["b@relayonly.test", "c@flaky.test"])
        # the flaky domain was tried twice directly before the relay (one lookup: cached)
        self.assertEqual([q for q in dns.queries() if q == ("MX", "flaky.test")], [("MX", "flaky.test")])


if __name__ == "__main__":
    unittest.main()
