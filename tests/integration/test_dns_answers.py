"""What mailshot takes from a DNS answer: only records owned by the name it asked (or its CNAME
chain), the most preferred of many MX records, and TXT records whole however long.

dnsmasq serves the long TXT record and the many MX records; the record owned by another name is
something no Debian DNS server sends, so a tiny responder written here answers on loopback with
exactly that packet."""
import os
import socket
import struct
import threading
import time
import unittest

from tests.integration.harness import (MailshotTestCase, QTYPES, dns_encode_name, free_port, scaled,
                                       write_csv, valgrind_redundant)


class CraftedDns:
    """A UDP DNS server on 127.0.0.1 answering each query with answer(name, qtype) -> a list of
    (owner, qtype, rdata bytes); an empty list is NOERROR with no records."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _run(self):
        while not self._stop.is_set():
            try:
                q, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            # the question: name labels from offset 12, then type and class
            off, labels = 12, []
            while q[off]:
                labels.append(q[off + 1:off + 1 + q[off]].decode("ascii", "replace"))
                off += 1 + q[off]
            qend = off + 5
            name, qtype = ".".join(labels), struct.unpack("!H", q[off + 1:off + 3])[0]
            self.queries.append((name.lower(), qtype))
            records = self.answer(name.lower(), qtype)
            out = q[:2] + struct.pack("!HHHHH", 0x8180 | (struct.unpack("!H", q[2:4])[0] & 0x0100),
                                      1, len(records), 0, 0) + q[12:qend]
            for owner, rtype, rdata in records:
                out += dns_encode_name(owner) + struct.pack("!HHIH", rtype, 1, 300, len(rdata)) + rdata
            self.sock.sendto(out, peer)

    def stop(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def mx_rdata(pref, host):
    return struct.pack("!H", pref) + dns_encode_name(host)


class DnsAnswerTests(MailshotTestCase):
    def test_a_record_owned_by_another_name_is_not_taken(self):
        # victim.test's MX answer carries only an MX of evil.test (and its A query an A of
        # evil.test): neither answers the question, so victim.test has no mail server at all
        def answer(name, qtype):
            if name == "victim.test" and qtype == QTYPES["MX"]:
                return [("evil.test", QTYPES["MX"], mx_rdata(0, "mx.evil.test"))]
            if name == "victim.test" and qtype == QTYPES["A"]:
                return [("evil.test", QTYPES["A"], socket.inet_aton("127.0.0.2"))]
            if name == "mx.evil.test" and qtype == QTYPES["A"]:
                return [("mx.evil.test", QTYPES["A"], socket.inet_aton("127.0.0.2"))]
            if name == "good.test" and qtype == QTYPES["MX"]:     # a right answer still works
                return [("evil.test", QTYPES["MX"], mx_rdata(0, "mx.evil.test")),
                        ("GOOD.test", QTYPES["MX"], mx_rdata(10, "mx.evil.test"))]
            return []
        srv = CraftedDns(answer)
        self.addCleanup(srv.stop)
        p = self.run_mailshot("mx", "victim.test", "--dns", srv.address, "--timeout", "1")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertNotIn("mx.evil.test", p.stdout)
        self.assertNotIn("127.0.0.2", p.stdout)
        self.assertIn("no MX records and no address", p.stdout)
        self.assertIn(("victim.test", QTYPES["MX"]), srv.queries)       # the responder was asked
        p = self.run_mailshot("mx", "good.test", "--dns", srv.address, "--timeout", "1")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"good\.test: 1 MX host")
        self.assertRegex(p.stdout, r"\n\s+10\s+mx\.evil\.test\s+127\.0\.0\.2\n")

    def test_the_most_preferred_of_many_mx_records_is_kept(self):
        # 70 MX records, the most preferred one last in the zone (and so in dnsmasq's answer):
        # the answer goes over TCP, and the 64 records kept must include it
        zone = {"mx": [("many.test", f"mx{i}.many.test", 100 + i) for i in range(69)]
                      + [("many.test", "best.many.test", 1)],
                "a": [("best.many.test", "127.0.0.2")] + [(f"mx{i}.many.test", "127.0.0.9") for i in range(69)]}
        dns = self.start_dns(zone)
        p = self.run_mailshot("mx", "many.test", "--dns", dns.address, "--timeout", "2")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        lines = p.stdout.splitlines()
        self.assertIn("many.test: 64 MX hosts, tried in this order:", lines[0])
        self.assertRegex(lines[1], r"^\s+1\s+best\.many\.test\s+127\.0\.0\.2$")
        self.assertRegex(lines[-1], r"^\s+162\s+mx62\.many\.test\s")

    @valgrind_redundant("test_preflight.test_each_planted_fault_is_found_and_blocks, tests/lua/test_dkim_pool.lua")
    def test_preflight_matches_a_2048_bit_rsa_key_published_in_several_strings(self):
        p = self.run_mailshot("dkim", "keygen", "--selector", "s1", "--domain", "acme.test", "--out", "rsa.key")
        self.assertEqual(p.returncode, 0, p.stderr)
        record = p.stdout.strip().splitlines()[-1]
        self.assertGreater(len(record), 255)        # more than one character-string
        dns = self.start_dns({"txt": [("s1._domainkey.acme.test", record)],
                              "mx": [("good.test", "mx.good.test", 10)], "a": [("mx.good.test", "127.0.0.2")]})
        got = dns.query("s1._domainkey.acme.test", "TXT")
        self.assertGreater(len(got), 0)
        d = self.path("c")
        os.makedirs(d)
        write_csv(os.path.join(d, "list.csv"), ["email"], [["a@good.test"]])
        with open(os.path.join(d, "c.lua"), "w") as f:
            f.write('''local mailshot = require "mailshot"
return mailshot.campaign { recipients = "list.csv", from = "news@acme.test", subject = "Hi", text = "Hello",
  dkim = { domain = "acme.test", selector = "s1", key_file = os.getenv "KEY" } }
''')
        p = self.run_mailshot("preflight", os.path.join(d, "c.lua"), "--dns", dns.address, "--timeout", "1",
                              env={"KEY": self.path("rsa.key")})
        self.assertIn("DKIM: the key at s1._domainkey.acme.test matches the campaign's private key (rsa-sha256)",
                      p.stdout, p.stdout + p.stderr)
        self.assertNotIn("does not match", p.stdout)


class DnsOutcomeTests(MailshotTestCase):
    """Each way a lookup can go wrong is named as what it was, once: an answer of SERVFAIL or
    REFUSED, nothing listening, no answer at all, a bad name, NXDOMAIN, a null MX."""

    def mx(self, domain, dns, timeout="2"):
        p = self.run_mailshot("mx", domain, "--dns", dns, "--timeout", timeout)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(p.stderr, "")
        lines = p.stdout.splitlines()
        self.assertEqual(len(lines), 1, p.stdout)          # one message, said once
        return lines[0]

    def test_mx_names_servfail_refused_and_nothing_listening(self):
        # real dnsmasq: names under broken.test go to an upstream that answers SERVFAIL, which
        # dnsmasq passes on; a name outside its local domains gets REFUSED (it has no upstream)
        sf = self.start_silent_dns(rcode="SERVFAIL")
        dns = self.start_dns({"forward": [("broken.test", sf.address)], "mx": [("a.test", "mx.a.test", 10)],
                              "a": [("mx.a.test", "127.0.0.2")], "null_mx": ["null.test"]})
        self.assertEqual(dns.query("x.broken.test", "MX"), ("SERVFAIL", []))
        self.assertEqual(dns.query("x.other", "MX")[0], "REFUSED")
        line = self.mx("x.broken.test", dns.address)
        self.assertEqual(line, "x.broken.test: the DNS server failed (SERVFAIL): nothing is known about the "
                               "domain; try again later")
        line = self.mx("x.other", dns.address)
        self.assertTrue(line.startswith("x.other: the DNS server refused the query (REFUSED)"), line)
        dead = f"127.0.0.1:{free_port()}"                    # nothing listens there
        line = self.mx("a.test", dead)
        self.assertEqual(line, "a.test: connection to the DNS server refused (nothing listening?): nothing is "
                               "known about the domain")
        self.assertEqual(self.mx("null.test", dns.address), "null.test: null MX: this domain accepts no mail (RFC 7505)")
        self.assertEqual(self.mx("nope.test", dns.address), "nope.test: the domain does not exist (NXDOMAIN)")
        self.assertEqual(self.mx("bad..name", dns.address), 'invalid domain "bad..name": empty label')

    def test_several_servers_fail_over_and_then_say_none_answered(self):
        # with several servers a SERVFAIL or REFUSED answer moves on to the next one (kept);
        # when none answers, that is what is said, not "timeout"
        sf = self.start_silent_dns(rcode="SERVFAIL")
        rf = self.start_silent_dns(rcode="REFUSED")
        dns = self.start_dns({"mx": [("a.test", "mx.a.test", 10)], "a": [("mx.a.test", "127.0.0.2")]})
        line = self.mx("x.other", f"{sf.address},{dns.address}")
        self.assertEqual(line, "x.other: no DNS server gave an answer (each refused the query, failed or was not "
                               "listening): nothing is known about the domain")
        p = self.run_mailshot("mx", "a.test", "--dns", f"{rf.address},{dns.address}", "--timeout", "2")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"\n\s+10\s+mx\.a\.test\s+127\.0\.0\.2\n")
        self.assertGreater(len(rf.queries()), 0)              # the refusing server was asked first

    def test_mx_timeout_is_the_whole_commands_budget(self):
        # a server that drops every query: --timeout 3 used to be per try, with a second try of
        # twice as long (9 s); and the MX host's AAAA and A lookups each had as much again
        silent = self.start_silent_dns()
        dns = self.start_dns({"forward": [("slow.test", silent.address)], "mx": [("a.test", "mx.slow.test", 10)]})
        slack = scaled(2.0, 4.5)           # start-up (valgrind's is slow); the old code took 9 s and 18 s
        t = time.monotonic()
        line = self.mx("a.test", silent.address, timeout="3")
        took = time.monotonic() - t
        self.assertEqual(line, "a.test: no answer from the DNS server (timeout) in 3 s: nothing is known about the domain")
        self.assertLess(took, 3 + slack)
        self.assertGreater(len(silent.queries()), 0)        # it was asked, and said nothing
        t = time.monotonic()
        p = self.run_mailshot("mx", "a.test", "--dns", dns.address, "--timeout", "3")
        took = time.monotonic() - t
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("a.test: 1 MX host, tried in this order:", p.stdout)
        self.assertIn("no answer from the DNS server for mx.slow.test AAAA (timeout)", p.stdout)
        self.assertLess(took, 3 + slack)


if __name__ == "__main__":
    unittest.main()
