"""DKIM signing through `mailshot exec`, checked by an independent verifier (dkimpy).

Keys are made at test time with the openssl command; the DNS TXT record dkimpy "looks up" is
derived from the key by openssl too, not taken from mailshot, so a wrong dns_record() fails here.
Needs the Debian packages python3-dkim and python3-nacl (Ed25519)."""

import base64
import os
import random
import shutil
import subprocess
import tempfile
import unittest

from tests.integration.harness import MailshotTestCase, scaled, valgrind_redundant

try:
    import dkim  # python3-dkim
    import nacl.signing  # noqa: F401  python3-nacl: dkimpy needs it for ed25519-sha256
except ImportError as e:  # fail loudly: a skipped verifier would hide broken signatures
    raise ImportError(f"{e}: apt-get install -y python3-dkim python3-nacl") from e

DOMAIN = "acme.example"
SELECTOR = "s1"
CANONS = ("relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed")

# The Lua API's contract: misuse raises, failures of the world return nil, err.
API_LUA = r"""
local dkim = require "mailshot.dkim"
local dir = arg[1]
local function checkerr(pat, f, ...)
  local ok, e = pcall(f, ...)
  assert(not ok, "expected an error matching " .. pat)
  assert(string.find(e, pat, 1, true), "error '" .. tostring(e) .. "' lacks '" .. pat .. "'")
end
-- keygen
local pem, txt = dkim.keygen{ algorithm = "ed25519-sha256" }
assert(pem:find("^%-%-%-%-%-BEGIN PRIVATE KEY%-%-%-%-%-\n") and txt:find("^v=DKIM1; k=ed25519; p="), txt)
local rpem, rtxt = dkim.keygen()
assert(rpem:find("^%-%-%-%-%-BEGIN PRIVATE KEY") and rtxt:find("^v=DKIM1; k=rsa; p=MIIBIjAN"))
local f = assert(io.open(dir .. "/ed.pem", "w")); f:write(pem); f:close()
local s = assert(dkim.signer{ domain = "acme.example", selector = "s1", key_file = dir .. "/ed.pem" })
assert(s:dns_record() == txt)
assert(s:algorithm() == "ed25519-sha256")
assert(tostring(s) == "dkim signer (s1._domainkey.acme.example, ed25519-sha256)")
-- errors of the world
local x, e = dkim.signer{ domain = "acme.example", selector = "s1", key_file = dir .. "/nope.pem" }
assert(x == nil and e == dir .. "/nope.pem: No such file or directory", e)
x, e = dkim.signer{ domain = "acme.example", selector = "s1", key_file = dir .. "/ed.pem", algorithm = "rsa-sha256" }
assert(x == nil and e:find("the key is for ed25519%-sha256, but algorithm is rsa%-sha256"), e)
-- misuse raises
checkerr("unknown algorithm 'rsa-sha1'", dkim.signer, { domain = "a.b", selector = "s", key_file = "k", algorithm = "rsa-sha1" })
checkerr("domain must be a string", dkim.signer, { domain = 1, selector = "s", key_file = "k" })
checkerr("selector is required", dkim.signer, { domain = "a.b", key_file = "k" })
checkerr("unknown option 'selecter'", dkim.signer, { domain = "a.b", selecter = "s", key_file = "k" })
checkerr("invalid canonicalization", dkim.signer, { domain = "a.b", selector = "s", key_file = "k", canonicalization = "relaxed/nofws" })
checkerr("expire must be a positive integer", dkim.signer, { domain = "a.b", selector = "s", key_file = "k", expire = 1.5 })
checkerr("headers must be a list of names", dkim.signer, { domain = "a.b", selector = "s", key_file = "k", headers = "from" })
checkerr("headers must be a list of names", dkim.signer, { domain = "a.b", selector = "s", key_file = "k", headers = { 1 } })
checkerr("invalid header name 'x y'", dkim.signer, { domain = "a.b", selector = "s", key_file = "k", headers = { "x y" } })
checkerr("invalid domain 'a b'", dkim.signer, { domain = "a b", selector = "s", key_file = "k" })
checkerr("bits must be an integer", dkim.keygen, { bits = 100 })
checkerr("bits is for rsa-sha256 keys only", dkim.keygen, { algorithm = "ed25519-sha256", bits = 2048 })
checkerr("string expected", s.sign, s, nil)
checkerr("number has no integer representation", s.sign, s, "From: a\r\n\r\n", 1.5)
-- signing
local msg = "From: a@acme.example\nTo: b@example.net\nSubject: hi\n\nbody\n"
local h = assert(s:header(msg, 1700000000))
assert(h:find("^DKIM%-Signature: v=1; a=ed25519%-sha256; c=relaxed/relaxed; d=acme.example;%s+s=s1; t=1700000000; h=from:from:to:subject;"), h)
assert(h:sub(-2) == "\r\n")
local signed = assert(s:sign(msg, 1700000000))
assert(signed == h .. "From: a@acme.example\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n")
local r, e2 = s:sign("To: b@example.net\r\n\r\nx")
assert(r == nil and e2:find("no From:"), e2)
-- expire
local s2 = assert(dkim.signer{ domain = "acme.example", selector = "s1", key_file = dir .. "/ed.pem", expire = 3600, headers = { "To", "subject" }, canonicalization = "simple/simple" })
local h2 = s2:header(msg, 1700000000)
assert(h2:find("c=simple/simple;") and h2:find("t=1700000000;") and h2:find("x=1700003600;") and h2:find("h=from:from:to:subject;"), h2)
-- dkim.sign: the same options reuse the signer made the first time
local opts = { domain = "acme.example", selector = "s1", key_file = dir .. "/ed.pem" }
local a1 = assert(dkim.sign(msg, opts))
assert(a1:find("^DKIM%-Signature:") and a1:find("\r\n\r\nbody\r\n$"))
os.remove(dir .. "/ed.pem")
assert(dkim.sign(msg, opts))   -- cached: the file is not read again
local n, e3 = dkim.sign(msg, { domain = "acme.example", selector = "s2", key_file = dir .. "/ed.pem" })
assert(n == nil and e3:find("No such file"), e3)
-- a closed signer raises
do local c <close> = s2 end
checkerr("attempt to use a closed dkim signer", s2.header, s2, msg)
assert(tostring(s2) == "dkim signer (closed)")
io.stdout:write("lua api ok\n")
"""

# Signs each message file given after the first four arguments; writes NAME.signed into OUTDIR
# and prints the algorithm and the DNS record.  Exit 3: no signer (message on stderr); 4: a
# message not signed.
SIGN_LUA = r"""
local dkim = require "mailshot.dkim"
local key, canon, alg, outdir = arg[1], arg[2], arg[3], arg[4]
local signer, err = dkim.signer{ domain = "acme.example", selector = "s1", key_file = key,
                                 canonicalization = canon, algorithm = alg ~= "-" and alg or nil }
if not signer then io.stderr:write("signer: ", err, "\n"); return 3 end
io.stdout:write(signer:algorithm(), "\n", signer:dns_record(), "\n")
for i = 5, #arg do
  local f = assert(io.open(arg[i], "rb")); local m = f:read("a"); f:close()
  local signed, e = signer:sign(m)
  if not signed then io.stderr:write(arg[i], ": ", e, "\n"); return 4 end
  local o = assert(io.open(outdir .. "/" .. arg[i]:match("[^/]+$") .. ".signed", "wb"))
  o:write(signed); o:close()
end
return 0
"""

CRLF = "\r\n"


def _msg(headers, body, eol=CRLF):
    return (eol.join(headers) + eol + eol + body).encode("utf-8")


def _messages():
    """name -> raw message bytes: the shapes a campaign sends."""
    rnd = random.Random(6376)
    attachment = base64.encodebytes(bytes(rnd.randrange(256) for _ in range(6000))).decode()
    attachment = attachment.replace("\n", CRLF)
    common = ["Date: Mon, 01 Jan 2024 10:00:00 +0000", "Message-ID: <1.2@acme.example>",
              "MIME-Version: 1.0"]
    return {
        "plain": _msg(["From: News <news@acme.example>", "To: someone@example.net",
                       "Subject: Hello", *common, "Content-Type: text/plain; charset=us-ascii"],
                      "Hello there,\r\n\r\nthe news.\r\n"),
        "rfc2047": _msg(["From: =?UTF-8?B?w4lxdWlwZSBBY23DqQ==?= <news@acme.example>",
                         "To: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <jm@example.net>,",
                         " =?UTF-8?Q?Fran=C3=A7oise?= <f@example.net>",
                         "Subject: =?UTF-8?B?Q2Fmw6kgZGUgbGEgZ2FyZTog?=",
                         "\t=?UTF-8?B?bWVudSBkdSBqb3Vy?=",
                         *common, "Content-Type: text/plain; charset=utf-8",
                         "Content-Transfer-Encoding: 8bit",
                         "List-Unsubscribe: <mailto:u@acme.example?subject=unsub>, <https://acme.example/u/1>",
                         "List-Unsubscribe-Post: List-Unsubscribe=One-Click"],
                        "Bonjour Françoise,\r\n\r\nle café est prêt. ☕\r\n"),
        "long_lines": _msg(["From: news@acme.example", "To: someone@example.net",
                            "Subject: " + "long subject " * 5,
                            "References: " + " ".join(f"<{i}.x@acme.example>" for i in range(30)),
                            *common],
                           ("word \t  " * 120 + "end   \r\n") * 3 + ("x" * 990 + "\r\n") * 4
                           + "  leading and   inner   spaces\t\r\n"),
        "multipart": _msg(["From: news@acme.example", "To: someone@example.net",
                           "Subject: Report attached", *common,
                           'Content-Type: multipart/mixed; boundary="=-b1"'],
                          "--=-b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                          "See the attachment.\r\n\r\n"
                          "--=-b1\r\nContent-Type: application/octet-stream; name=\"r.bin\"\r\n"
                          "Content-Disposition: attachment; filename=\"r.bin\"\r\n"
                          "Content-Transfer-Encoding: base64\r\n\r\n" + attachment +
                          "--=-b1--\r\n"),
        "trailing_blank": _msg(["From: news@acme.example", "To: someone@example.net",
                                "Subject: blanks", *common],
                               "text\r\n \r\n\t\r\n\r\n\r\n\r\n"),
        "empty_body": _msg(["From: news@acme.example", "To: someone@example.net",
                            "Subject: nothing", *common], ""),
        "lf_endings": _msg(["From: news@acme.example", "To: someone@example.net",
                            "Subject: unix", "Cc: a@example.net,", "  b@example.net", *common],
                           "line one\n\nline three  \n\n\n", eol="\n"),
        "many_fields": _msg([f"Received: from h{i}.example by acme.example; Mon, 1 Jan 2024 00:00:{i % 60:02} +0000"
                             for i in range(80)] +
                            ["From: news@acme.example", "To: someone@example.net", "Subject: hops",
                             *common, *(f"Cc: c{i}@example.net" for i in range(5))], "x\r\n"),
        "two_cc_bottom_up": _msg(["From: news@acme.example", "Cc: first@example.net",
                                  "To: someone@example.net", "Cc: second@example.net",
                                  "Subject: two Cc", *common], "x\r\n"),
    }


def _openssl(*args, input=None):
    r = subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr.decode(errors='replace')}")
    return r.stdout


def _dns_record(key_path, ed25519):
    """The TXT value, made from the key by openssl (RFC 6376 §3.6.1; RFC 8463 §4.2 for Ed25519)."""
    spki = _openssl("pkey", "-in", key_path, "-pubout", "-outform", "DER")
    if ed25519:
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(spki[-32:])
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)


class _NoExtraFrom(list):
    """h= as it is: dkimpy appends one more "from" when it verifies (its own defence against an
    added From:, Debian bug #644046), which would hide whether *we* over-signed From."""

    def append(self, x):
        if x != b"from":
            super().append(x)


class StrictDKIM(dkim.DKIM):
    """dkimpy's verifier without its extra From: the verdict of a plain RFC 6376 verifier."""

    def verify_headerprep(self, idx=0):
        prep = super().verify_headerprep(idx)
        if prep:
            sig, include_headers, sigheaders = prep
            prep = (sig, _NoExtraFrom(include_headers), sigheaders)
        return prep


class TestDkim(MailshotTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.keydir = tempfile.mkdtemp(prefix="mailshot-dkim-keys-")
        cls.rsa = os.path.join(cls.keydir, "rsa.pem")
        cls.ed = os.path.join(cls.keydir, "ed.pem")
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", cls.rsa)
        _openssl("genpkey", "-algorithm", "ED25519", "-out", cls.ed)
        cls.records = {cls.rsa: _dns_record(cls.rsa, False), cls.ed: _dns_record(cls.ed, True)}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.keydir, ignore_errors=True)
        super().tearDownClass()

    # ---------------------------------------------------------------- helpers

    def script(self, name, text):
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def sign_all(self, key, canon, messages, alg="-"):
        """Signs every message with mailshot; returns ({name: signed bytes}, stdout lines)."""
        lua = self.script("sign.lua", SIGN_LUA)
        outdir = self.path(f"out-{os.path.basename(key)}-{canon.replace('/', '-')}")
        os.makedirs(outdir, exist_ok=True)
        files = []
        for name, raw in messages.items():
            p = os.path.join(outdir, name)
            with open(p, "wb") as f:
                f.write(raw)
            files.append(p)
        r = self.run_mailshot("exec", lua, key, canon, alg, outdir, *files)
        self.assertEqual(r.returncode, 0, r.stderr)
        signed = {}
        for name in messages:
            with open(os.path.join(outdir, name + ".signed"), "rb") as f:
                signed[name] = f.read()
        return signed, r.stdout.splitlines()

    def verify(self, message, key, strict=False):
        """dkimpy's verdict (strict: without its extra From, see StrictDKIM), with the record
        for key served as s1._domainkey.acme.example."""
        asked = []

        def dnsfunc(name, timeout=5):
            asked.append(name)
            return self.records[key] if name == b"s1._domainkey.acme.example." else None
        if strict:
            try:
                ok = StrictDKIM(message).verify(dnsfunc=dnsfunc)
            except dkim.DKIMException:
                ok = False
        else:
            ok = dkim.verify(message, dnsfunc=dnsfunc)
        if ok:
            self.assertEqual(asked, [b"s1._domainkey.acme.example."])
        return ok

    @staticmethod
    def signature_lines(signed):
        """The lines of the DKIM-Signature field at the top of signed."""
        lines = signed.split(b"\r\n")
        n = 1 + next(i for i, ln in enumerate(lines[1:]) if not ln.startswith((b" ", b"\t")))
        return lines[:n]

    def signature_tags(self, signed):
        lines = self.signature_lines(signed)
        self.assertTrue(lines[0].startswith(b"DKIM-Signature:"), lines[0])
        return dkim.util.parse_tag_value(b"\r\n".join(lines).split(b":", 1)[1])

    # ---------------------------------------------------------------- tests

    @valgrind_redundant("test_lua_api_misuse_raises_world_failures_return_nil_err, tests/unit/test_dkim.c")
    def test_every_message_shape_verifies_for_both_algorithms_and_all_canonicalizations(self):
        messages = _messages()
        # under valgrind (one slow mailshot per key and pair), relaxed/relaxed and simple/simple: they
        # run both header and both body canonicalizations; the mixed pairs only combine the same code
        for key, alg in ((self.rsa, "rsa-sha256"), (self.ed, "ed25519-sha256")):
            for canon in scaled(CANONS, CANONS[:2]):
                signed, out = self.sign_all(key, canon, messages)
                self.assertEqual(out[0], alg)
                self.assertEqual(out[1].encode(), self.records[key], "dns_record() differs from openssl's")
                for name, msg in signed.items():
                    with self.subTest(alg=alg, canon=canon, message=name):
                        self.assertTrue(msg.startswith(b"DKIM-Signature: v=1; a=" + alg.encode()))
                        lines = self.signature_lines(msg)
                        self.assertTrue(all(len(ln) <= 78 for ln in lines), lines)
                        tags = self.signature_tags(msg)
                        self.assertEqual(tags[b"c"], canon.encode())
                        self.assertEqual(tags[b"d"], DOMAIN.encode())
                        self.assertNotIn(b"l", tags)
                        self.assertTrue(tags[b"h"].startswith(b"from:from:"), tags[b"h"])
                        self.assertTrue(self.verify(msg, key), f"dkimpy rejects {name}")

    def test_lf_message_comes_back_with_crlf_line_endings(self):
        signed, _ = self.sign_all(self.ed, "relaxed/relaxed", {"lf": _messages()["lf_endings"]})
        body = signed["lf"]
        self.assertNotIn(b"\n", body.replace(b"\r\n", b""))
        self.assertTrue(body.endswith(b"line one\r\n\r\nline three  \r\n\r\n\r\n"))

    def test_two_cc_fields_are_both_signed(self):
        signed, _ = self.sign_all(self.rsa, "relaxed/relaxed", {"m": _messages()["two_cc_bottom_up"]})
        tags = self.signature_tags(signed["m"])
        self.assertEqual(tags[b"h"].count(b"cc"), 2)
        swapped = signed["m"].replace(b"Cc: first@", b"Cc: XXXXX@").replace(b"Cc: second@", b"Cc: first@") \
                             .replace(b"Cc: XXXXX@", b"Cc: second@")
        self.assertTrue(self.verify(signed["m"], self.rsa))
        self.assertFalse(self.verify(swapped, self.rsa), "the order of the two Cc fields is signed")

    @valgrind_redundant("test_lua_api_misuse_raises_world_failures_return_nil_err, tests/unit/test_dkim.c")
    def test_changes_after_signing_break_the_signature(self):
        base = _messages()["rfc2047"]
        for key in (self.rsa, self.ed):
            for canon in ("relaxed/relaxed", "simple/simple"):
                signed, _ = self.sign_all(key, canon, {"m": base})
                msg = signed["m"]
                head, body = msg.split(b"\r\n\r\n", 1)
                changes = {
                    "body byte": head + b"\r\n\r\n" + body.replace(b"Bonjour", b"Bonjous", 1),
                    "appended body line": msg + b"P.S. click here\r\n",
                    "subject": msg.replace(b"Subject: =?UTF-8?B?Q2Fm", b"Subject: =?UTF-8?B?Q2Fn", 1),
                    "second From at the top": msg.replace(b"\r\nFrom: ", b"\r\nFrom: evil@attacker.example\r\nFrom: ", 1),
                    "second From at the bottom": head + b"\r\nFrom: evil@attacker.example\r\n\r\n" + body,
                    "From changed": msg.replace(b"<news@acme.example>", b"<news@attacker.example>", 1),
                    "List-Unsubscribe-Post removed": msg.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b""),
                }
                with self.subTest(key=os.path.basename(key), canon=canon, change="none"):
                    self.assertTrue(self.verify(msg, key))
                    self.assertTrue(self.verify(msg, key, strict=True))
                    # an unsigned field may be added (the next hop's Received:)
                    self.assertTrue(self.verify(b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" + msg, key))
                for what, changed in changes.items():
                    with self.subTest(key=os.path.basename(key), canon=canon, change=what):
                        self.assertNotEqual(changed, msg)
                        self.assertFalse(self.verify(changed, key), f"still verifies after: {what}")
                        self.assertFalse(self.verify(changed, key, strict=True),
                                         f"a strict verifier accepts it after: {what}")

    def test_relaxed_survives_whitespace_changes_simple_does_not(self):
        base = _messages()["plain"]
        for canon, survives in (("relaxed/relaxed", True), ("simple/simple", False)):
            signed, _ = self.sign_all(self.ed, canon, {"m": base})
            refolded = signed["m"].replace(b"Subject: Hello", b"subject:   Hello  ", 1) \
                                  .replace(b"Hello there,", b"Hello   there, ", 1)
            with self.subTest(canon=canon):
                self.assertEqual(self.verify(refolded, self.ed), survives)

    def test_missing_key_file_is_a_clear_error(self):
        lua = self.script("sign.lua", SIGN_LUA)
        missing = self.path("no-such-key.pem")
        r = self.run_mailshot("exec", lua, missing, "relaxed/relaxed", "-", self.tmp)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn(f"signer: {missing}: No such file or directory", r.stderr)

    def test_a_file_that_is_not_a_key_is_a_clear_error(self):
        lua = self.script("sign.lua", SIGN_LUA)
        cert = self.path("pub.pem")
        with open(cert, "wb") as f:
            f.write(_openssl("pkey", "-in", self.rsa, "-pubout"))
        r = self.run_mailshot("exec", lua, cert, "relaxed/relaxed", "-", self.tmp)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn(f"{cert}: no PEM private key in the file", r.stderr)

    def test_algorithm_that_does_not_match_the_key_is_a_clear_error(self):
        lua = self.script("sign.lua", SIGN_LUA)
        for key, alg, have in ((self.rsa, "ed25519-sha256", "rsa-sha256"), (self.ed, "rsa-sha256", "ed25519-sha256")):
            r = self.run_mailshot("exec", lua, key, "relaxed/relaxed", alg, self.tmp)
            self.assertEqual(r.returncode, 3, r.stderr)
            self.assertIn(f"{key}: the key is for {have}, but algorithm is {alg}", r.stderr)
        r = self.run_mailshot("exec", lua, self.rsa, "relaxed/relaxed", "rsa-sha1", self.tmp)
        self.assertEqual(r.returncode, 1)
        self.assertIn("unknown algorithm 'rsa-sha1'", r.stderr)

    def test_lua_api_misuse_raises_world_failures_return_nil_err(self):
        r = self.run_mailshot("exec", self.script("api.lua", API_LUA), self.tmp)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("lua api ok", r.stdout)

    def test_keygen_then_sign_convenience_verifies(self):
        lua = self.script("keygen.lua", r"""
local dkim = require "mailshot.dkim"
for _, alg in ipairs{ "rsa-sha256", "ed25519-sha256" } do
  local bits = alg == "rsa-sha256" and tonumber(arg[2]) or nil
  local pem, txt = assert(dkim.keygen{ algorithm = alg, bits = bits })
  local path = arg[1] .. "/" .. alg .. ".pem"
  local f = assert(io.open(path, "w")); f:write(pem); f:close()
  local msg = "From: a@acme.example\r\nTo: b@example.net\r\nSubject: k\r\n\r\nbody\r\n"
  local opts = { domain = "acme.example", selector = "s1", key_file = path }
  local signed = assert(dkim.sign(msg, opts))
  assert(dkim.sign(msg, opts))          -- the cached signer
  local o = assert(io.open(path .. ".eml", "wb")); o:write(signed); o:close()
  o = assert(io.open(path .. ".txt", "wb")); o:write(txt); o:close()
end
""")
        # natively the default RSA size; under valgrind 1024 bits (the same code, a far shorter
        # prime search: a 2048-bit keygen took about a minute there)
        r = self.run_mailshot("exec", lua, self.tmp, *scaled([], ["1024"]))
        self.assertEqual(r.returncode, 0, r.stderr)
        for alg in ("rsa-sha256", "ed25519-sha256"):
            path = self.path(alg + ".pem")
            with open(path + ".txt", "rb") as f:
                txt = f.read()
            with open(path + ".eml", "rb") as f:
                eml = f.read()
            with self.subTest(alg=alg):
                self.assertEqual(txt, _dns_record(path, alg.startswith("ed")))
                self.records[path] = txt
                self.assertTrue(self.verify(eml, path))


if __name__ == "__main__":
    unittest.main()
