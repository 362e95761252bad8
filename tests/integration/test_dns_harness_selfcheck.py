"""Self-check of the DNS test tooling in harness.py (dnsmasq zones, the silent/SERVFAIL stub server,
the dns_query client) and of several SMTP servers sharing one port on 127.0.0.x.
This tests our test tooling, not mailshot."""

import os
import smtplib
import socket

from tests.integration.harness import (
    DnsServer, MailshotTestCase, dns_query, dns_query_full, free_common_port, process_group_alive,
    start_dnsmasq,
)

ZONE = {
    "mx": [("a.test", "mx1.a.test", 10), ("a.test", "mx2.a.test", 20)],
    "a": [("mx1.a.test", "127.0.0.2"), ("mx2.a.test", "127.0.0.3"),
          ("implicit.test", "127.0.0.4"),                     # A only: implicit MX
          ("multi.test", ["127.0.0.5", "127.0.0.6"]),
          ("shortttl.test", "127.0.0.7", 60)],
    "aaaa": [("v6.test", "::1"), ("mx1.a.test", "::1")],
    "null_mx": ["null.test"],
    "txt": [("a.test", "v=spf1 -all"),
            ("comma.test", ["a, b", 'q"uote\\']),
            ("k._domainkey.a.test", "v=DKIM1; k=rsa; p=" + "A" * 400)],
    "cname": [("alias.test", "mx1.a.test")],
    "ttl": 300,
}

QUICK = 0.5   # seconds to wait for an answer that must not come


class DnsSelfCheck(MailshotTestCase):
    def tearDown(self):
        self.assertNoServersLeft()
        super().tearDown()

    def dns(self, zone=ZONE, **kw):
        return self.start_dns(zone=zone, **kw)

    # ------------------------------------------------------------------ dnsmasq answers

    def test_mx_with_preferences_and_ttl(self):
        srv = self.dns()
        self.assertEqual(srv.address, f"127.0.0.1:{srv.port}")
        rcode, mx = dns_query(srv.address, "a.test", "MX")
        self.assertEqual(rcode, "NOERROR")
        # dnsmasq does not return them in preference order: sort
        self.assertEqual(sorted(mx), [(10, "mx1.a.test", 300), (20, "mx2.a.test", 300)])
        full = dns_query_full(srv.address, "a.test", "MX")
        self.assertTrue(full.aa)
        # dnsmasq adds the MX targets' addresses in the additional section
        self.assertIn(("A", "mx1.a.test", 300, "127.0.0.2"), full.additional)

    def test_a_aaaa_and_ttls(self):
        srv = self.dns()
        self.assertEqual(srv.query("mx1.a.test", "A"), ("NOERROR", [("127.0.0.2", 300)]))
        self.assertEqual(srv.query("mx2.a.test", "A"), ("NOERROR", [("127.0.0.3", 300)]))
        self.assertEqual(srv.query("v6.test", "AAAA"), ("NOERROR", [("::1", 300)]))
        self.assertEqual(srv.query("mx1.a.test", "AAAA"), ("NOERROR", [("::1", 300)]))
        rcode, ips = srv.query("multi.test", "A")
        self.assertEqual((rcode, sorted(ips)), ("NOERROR", [("127.0.0.5", 300), ("127.0.0.6", 300)]))
        self.assertEqual(srv.query("shortttl.test", "A"), ("NOERROR", [("127.0.0.7", 60)]))
        # v6.test has only an AAAA: A is NODATA
        self.assertEqual(srv.query("v6.test", "A"), ("NOERROR", []))

    def test_ttl_setting(self):
        srv = self.dns({"mx": [("t.test", "mx.t.test", 5)], "a": [("mx.t.test", "127.0.0.2")],
                        "ttl": 3600})
        self.assertEqual(srv.query("t.test", "MX"), ("NOERROR", [(5, "mx.t.test", 3600)]))
        self.assertEqual(srv.query("mx.t.test", "A"), ("NOERROR", [("127.0.0.2", 3600)]))

    def test_null_mx(self):
        srv = self.dns()
        self.assertEqual(srv.query("null.test", "MX"), ("NOERROR", [(0, ".", 300)]))

    def test_nodata_for_a_only_name(self):
        srv = self.dns()
        self.assertEqual(srv.query("implicit.test", "A"), ("NOERROR", [("127.0.0.4", 300)]))
        full = dns_query_full(srv.address, "implicit.test", "MX")
        self.assertEqual(full.rcode, "NOERROR")
        self.assertEqual(full.answers, [])
        self.assertEqual(full.authority, [])      # dnsmasq sends no SOA with NODATA
        # an MX-only name has no A
        self.assertEqual(srv.query("a.test", "A"), ("NOERROR", []))

    def test_nxdomain_for_unknown_names(self):
        srv = self.dns()
        for name in ("nope.test", "sub.a.test", "x.example"):
            for qtype in ("MX", "A", "AAAA"):
                with self.subTest(name=name, qtype=qtype):
                    self.assertEqual(srv.query(name, qtype), ("NXDOMAIN", []))

    def test_refused_outside_local_domains(self):
        srv = self.dns({"mx": [("out.other", "mx1.a.test", 5)], "a": [("mx1.a.test", "127.0.0.2")]})
        self.assertEqual(srv.query("out.other", "MX"), ("NOERROR", [(5, "mx1.a.test", 300)]))
        # no local=/other/: anything dnsmasq has no record for goes "upstream" -> none -> REFUSED
        self.assertEqual(srv.query("out.other", "A")[0], "REFUSED")
        self.assertEqual(srv.query("nope.other", "MX")[0], "REFUSED")

    def test_txt_and_cname(self):
        srv = self.dns()
        self.assertEqual(srv.query("a.test", "TXT"), ("NOERROR", [("v=spf1 -all", 300)]))
        self.assertEqual(srv.query("comma.test", "TXT"), ("NOERROR", [('a, bq"uote\\', 300)]))
        rcode, txt = srv.query("k._domainkey.a.test", "TXT")    # > 255 bytes: split, rejoined
        self.assertEqual(txt, [("v=DKIM1; k=rsa; p=" + "A" * 400, 300)])
        full = dns_query_full(srv.address, "alias.test", "A")
        self.assertEqual(full.answers, [("CNAME", "alias.test", 300, "mx1.a.test"),
                                        ("A", "mx1.a.test", 300, "127.0.0.2")])

    def test_tcp(self):
        srv = self.dns()
        rcode, mx = dns_query(srv.address, "a.test", "MX", tcp=True)
        self.assertEqual((rcode, sorted(mx)), ("NOERROR", [(10, "mx1.a.test", 300),
                                                          (20, "mx2.a.test", 300)]))

    def test_queries_are_recorded(self):
        srv = self.dns()
        self.assertEqual(srv.queries(), [])        # the readiness probe is not listed
        srv.query("a.test", "MX")
        srv.query("mx1.a.test", "A")
        srv.query("mx1.a.test", "AAAA", tcp=True)
        srv.query("nope.test", "MX")
        self.assertEqual(srv.wait_for_queries(4), [("MX", "a.test"), ("A", "mx1.a.test"),
                                                   ("AAAA", "mx1.a.test"), ("MX", "nope.test")])
        srv.reset_queries()
        self.assertEqual(srv.queries(), [])
        srv.query("null.test", "MX")
        self.assertEqual(srv.wait_for_queries(1), [("MX", "null.test")])

    def test_ipv6_listener(self):
        srv = self.dns(host="::1")
        self.assertEqual(srv.address, f"[::1]:{srv.port}")
        self.assertEqual(srv.query("v6.test", "AAAA"), ("NOERROR", [("::1", 300)]))

    def test_stop_kills_process_group(self):
        srv = self.dns()
        self.assertIsInstance(srv, DnsServer)
        self.assertTrue(srv.running())
        srv.stop()
        self.assertFalse(srv.running())
        self.assertFalse(process_group_alive(srv.pid))
        with self.assertRaises(OSError):    # refused (ICMP) or timeout
            srv.query("a.test", "MX", timeout=QUICK)

    def test_busy_port_fails_with_output(self):
        port = free_common_port(("127.0.0.1",), tcp=True, udp=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))
            with self.assertRaises(AssertionError) as cm:
                start_dnsmasq(self.path("busy"), ZONE, port=port, ready_timeout=3)
        self.assertIn("dnsmasq did not come up", str(cm.exception))
        self.assertIn("in use", str(cm.exception))

    # ------------------------------------------------------------------ silent / SERVFAIL servers

    def test_silent_server_never_answers(self):
        sil = self.start_silent_dns()
        self.assertEqual(sil.address, f"127.0.0.1:{sil.port}")
        with self.assertRaises(TimeoutError):
            dns_query(sil.address, "a.test", "MX", timeout=QUICK)
        sil.wait_for_queries(1)
        with self.assertRaises(TimeoutError):   # TCP: accepted, read, never answered
            dns_query(sil.address, "b.test", "A", timeout=QUICK, tcp=True)
        sil.wait_for_queries(2)
        self.assertEqual(sil.queries_received(), 2)
        self.assertEqual(sil.queries_received("udp"), 1)
        self.assertEqual(sil.queries(), [("MX", "a.test"), ("A", "b.test")])
        self.assertEqual(sil.tcp_connections(), 1)
        sil.stop()
        self.assertFalse(sil.running())
        sil.stop()  # idempotent

    def test_servfail_server_and_forwarding(self):
        sf = self.start_silent_dns(rcode="SERVFAIL")
        self.assertEqual(dns_query(sf.address, "x.test", "MX"), ("SERVFAIL", []))
        self.assertEqual(dns_query(sf.address, "x.test", "MX", tcp=True), ("SERVFAIL", []))
        sil = self.start_silent_dns()
        zone = dict(ZONE, forward=[("broken.test", sf.address), ("slow.test", sil.address)])
        srv = self.dns(zone)
        self.assertEqual(srv.query("x.broken.test", "MX"), ("SERVFAIL", []))
        self.assertEqual(srv.query("a.test", "MX")[0], "NOERROR")
        with self.assertRaises(TimeoutError):
            srv.query("x.slow.test", "MX", timeout=QUICK)
        sil.wait_for_queries(1)
        self.assertEqual(sil.queries()[0], ("MX", "x.slow.test"))

    # ------------------------------------------------------------------ several MX hosts, one port

    def test_smtpd_many_share_one_port(self):
        hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        servers, port = self.start_smtpd_many(hosts)
        self.assertEqual([s.host for s in servers], hosts)
        self.assertEqual({s.port for s in servers}, {port})
        for i, srv in enumerate(servers):
            with smtplib.SMTP(srv.host, port, timeout=10) as s:
                s.ehlo("client.test")
                self.assertEqual(s.sendmail("a@x.test", [f"rcpt{i}@a.test"],
                                            f"Subject: {i}\r\n\r\nbody\r\n"), {})
        for i, srv in enumerate(servers):
            (m,) = srv.wait_for_messages(1)
            self.assertEqual(m["rcpt_tos"], [f"rcpt{i}@a.test"])
            self.assertEqual(srv.message_count(), 1)
        # nothing listens on that port at another loopback address
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.5", port), timeout=5).close()
        # and each has its own maildir
        self.assertEqual(len({os.path.realpath(s.maildir) for s in servers}), 3)
