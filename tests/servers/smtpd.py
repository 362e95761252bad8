#!/usr/bin/python3
"""Configurable SMTP test server for mailshot's integration tests (aiosmtpd 1.4).

Run with Debian's interpreter (it needs python3-aiosmtpd):

    /usr/bin/python3 tests/servers/smtpd.py --host 127.0.0.1 --port 0 --maildir DIR [options]

Prints exactly one line "READY <port>" on stdout once listening, then serves until
SIGTERM/SIGINT (exit status 0).  Everything else goes to stderr.

Every accepted message is stored as DIR/NNNNNN.eml (the bytes aiosmtpd hands over as
envelope.original_content: the DATA payload after dot-unstuffing, CRLF line ends kept,
without the final ".\\r\\n") and DIR/NNNNNN.json (envelope, peer, TLS, AUTH user).  The
.json is written after the .eml and renamed into place, so its presence means the message
is complete; both exist before the client sees the 250 after DATA.

DIR/session.log gets one line per SMTP command line received (and per AUTH continuation
line, masked):  "<conn>\\t<flags>\\t<line>"  where flags is "-" or a comma list of
  tls        the line arrived over TLS (STARTTLS or implicit)
  pipelined  more client bytes were already buffered behind this line when it was read
             (the client did not wait for the reply: pipelining)
AUTH arguments and continuation lines are replaced by "********".

--disconnect-on WHAT aborts the connection (no reply) on a command (EHLO, MAIL, RCPT, DATA, ...),
at GREETING, at DATA-END (the final dot, the whole message received) or at DATA-BODY: in the
middle of the message, once --disconnect-after-bytes N bytes of it (default 200, counted as
sent after the 354, before dot-unstuffing) have been read and before the final dot.  A message
that ends before N bytes is accepted as usual (logged as a warning), never dropped.  The drops
can be limited to the first N (--disconnect-times N) and to transactions with a recipient
containing PATTERN (--disconnect-rcpt PATTERN: DATA, DATA-BODY, DATA-END only).  Every drop is
logged on stderr as "conn <n>: disconnecting on <WHAT>...".

Hostile replies: --drip WHAT:MS sends the reply to WHAT (GREETING or a command) one byte every MS
milliseconds (a server that keeps a client waiting without ever going quiet); --ehlo-padding N puts
N long keyword lines first in the EHLO reply (a reply of several KB); --greeting-lines TEXT sends
extra "220-" lines before the greeting (lines separated by \n; Python escapes such as \r and \x1b
are decoded, to inject bytes)."""

import argparse
import asyncio
import collections
import json
import time
import logging
import os
import signal
import ssl
import sys
import warnings

import asyncio.sslproto as sslproto

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, TLSSetupException, sanitize

log = logging.getLogger("smtpd")

MASK = "********"


# --------------------------------------------------------------------------- options

def parse_rule(text, opt):
    """'PATTERN:CODE:TEXT' -> (pattern, 'CODE TEXT'). PATTERN may be empty (matches all)."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[1].isdigit() or len(parts[1]) != 3:
        raise argparse.ArgumentTypeError(f"{opt}: expected PATTERN:CODE[:TEXT], got {text!r}")
    pattern, code = parts[0], parts[1]
    msg = parts[2] if len(parts) > 2 and parts[2] else "Rejected by test server"
    return pattern, f"{code} {msg}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port (reported in READY line)")
    p.add_argument("--maildir", required=True)
    p.add_argument("--hostname", default="smtpd.test", help="name used in greeting and EHLO reply")
    # TLS
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--require-starttls", action="store_true",
                   help="refuse everything but EHLO/NOOP/STARTTLS/QUIT before TLS (530)")
    p.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte (RFC 8314)")
    p.add_argument("--starttls-inject", action="store_true",
                   help="hostile: send '250 injected' in the same write as the STARTTLS 220")
    p.add_argument("--starttls-inject-text", default="250 injected",
                   help="the reply line(s) injected by --starttls-inject (\\n separates lines)")
    # AUTH
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                   help="accept these credentials for AUTH PLAIN/LOGIN (repeatable)")
    p.add_argument("--auth-required", action="store_true", help="530 for MAIL/RCPT/DATA before AUTH")
    p.add_argument("--auth-exclude", action="append", default=[], metavar="MECHANISM",
                   help="do not offer this AUTH mechanism (e.g. PLAIN, to make clients use LOGIN)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--auth-require-tls", dest="auth_require_tls", action="store_true", default=None,
                   help="AUTH only after TLS (default when TLS is offered)")
    g.add_argument("--no-auth-require-tls", dest="auth_require_tls", action="store_false",
                   help="advertise and allow AUTH over plaintext")
    # behaviour
    p.add_argument("--greeting-code", type=int, default=220,
                   help="e.g. 421 or 554: answer that at the greeting and close")
    p.add_argument("--greeting-text", default="Service not available, closing transmission channel")
    p.add_argument("--reject-mail-from", action="append", default=[], metavar="PATTERN:CODE:TEXT")
    p.add_argument("--reject-rcpt-once", action="append", default=[], metavar="PATTERN:CODE:TEXT",
                   help="like --reject-rcpt, but only the first time each matching address is seen "
                        "(a greylisting server: 451 first, 250 on retry)")
    p.add_argument("--reject-rcpt", action="append", default=[], metavar="PATTERN:CODE:TEXT",
                   help="RCPT TO whose address contains PATTERN gets CODE TEXT (repeatable)")
    p.add_argument("--reject-data-from", action="append", default=[], metavar="PATTERN:CODE:TEXT",
                   help="reply CODE TEXT at end of DATA when MAIL FROM contains PATTERN")
    p.add_argument("--reject-data-content", action="append", default=[], metavar="PATTERN:CODE:TEXT",
                   help="reply CODE TEXT at end of DATA when the message bytes contain PATTERN")
    p.add_argument("--no-pipelining", action="store_true", help="do not advertise PIPELINING")
    p.add_argument("--reject-unauth-pipelining", action="store_true",
                   help="503 for MAIL/RCPT/DATA sent ahead of a reply when PIPELINING was not "
                        "advertised (like Postfix reject_unauth_pipelining)")
    p.add_argument("--no-8bitmime", action="store_true",
                   help="do not advertise 8BITMIME and answer 555 to MAIL ... BODY=8BITMIME")
    p.add_argument("--no-smtputf8", action="store_true", help="do not advertise SMTPUTF8")
    p.add_argument("--no-ehlo", action="store_true", help="answer 502 to EHLO (client must use HELO)")
    p.add_argument("--size", type=int, default=33554432, help="SIZE limit advertised/enforced; 0 = none")
    p.add_argument("--max-messages", type=int, default=0,
                   help="after N messages in one connection answer MAIL with 421 and close")
    p.add_argument("--delay", action="append", default=[], metavar="WHAT:SECONDS",
                   help="sleep before replying; WHAT is GREETING, a command (EHLO, MAIL, RCPT, "
                        "DATA, ...) or DATA-END (the final dot)")
    p.add_argument("--disconnect-on", action="append", default=[], metavar="WHAT",
                   help="close the connection without replying on WHAT (GREETING, a command, "
                        "DATA-END, or DATA-BODY: mid-message, see --disconnect-after-bytes)")
    p.add_argument("--disconnect-after-bytes", type=int, default=200, metavar="N",
                   help="DATA-BODY: drop once N bytes of the message were read (before the final "
                        "dot; a shorter message is accepted, not dropped) (default 200)")
    p.add_argument("--disconnect-times", type=int, default=0, metavar="N",
                   help="only the first N disconnects happen, then the server behaves "
                        "(0 = every time, the default)")
    p.add_argument("--disconnect-rcpt", action="append", default=[], metavar="PATTERN",
                   help="disconnect only in a transaction with a recipient containing PATTERN "
                        "(so only at DATA, DATA-BODY or DATA-END; repeatable)")
    p.add_argument("--drip", action="append", default=[], metavar="WHAT:MS",
                   help="send the reply to WHAT (GREETING or a command) one byte every MS milliseconds")
    p.add_argument("--ehlo-padding", type=int, default=0, metavar="N",
                   help="N padding keyword lines (about 70 bytes each) first in the EHLO reply")
    p.add_argument("--greeting-lines", default=None, metavar="TEXT",
                   help="extra 220- lines before the greeting (\\n separates lines; escapes decoded)")
    p.add_argument("--timeout", type=float, default=60, help="idle timeout per connection")
    p.add_argument("--verbose", "-v", action="store_true")
    a = p.parse_args(argv)

    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if (a.require_starttls or a.implicit_tls or a.starttls_inject) and not a.tls_cert:
        p.error("--require-starttls/--implicit-tls/--starttls-inject need --tls-cert/--tls-key")
    a.users = {}
    for item in a.auth:
        user, sep, pw = item.partition(":")
        if not sep:
            p.error(f"--auth expects USER:PASSWORD, got {item!r}")
        a.users[user] = pw
    if a.auth_require_tls is None:
        a.auth_require_tls = bool(a.tls_cert) and not a.implicit_tls
    try:
        a.reject_mail_from = [parse_rule(r, "--reject-mail-from") for r in a.reject_mail_from]
        a.reject_rcpt = [parse_rule(r, "--reject-rcpt") for r in a.reject_rcpt]
        a.reject_rcpt_once = [parse_rule(r, "--reject-rcpt-once") for r in a.reject_rcpt_once]
        a.reject_data_from = [parse_rule(r, "--reject-data-from") for r in a.reject_data_from]
        a.reject_data_content = [parse_rule(r, "--reject-data-content") for r in a.reject_data_content]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    delays = {}
    for d in a.delay:
        what, sep, secs = d.rpartition(":")
        try:
            delays[what.upper()] = float(secs)
        except ValueError:
            p.error(f"--delay expects WHAT:SECONDS, got {d!r}")
    a.delays = delays
    a.disconnect_on = {w.upper() for w in a.disconnect_on}
    drips = {}
    for d in a.drip:
        what, sep, ms = d.rpartition(":")
        try:
            drips[what.upper()] = float(ms) / 1000
        except ValueError:
            p.error(f"--drip expects WHAT:MS, got {d!r}")
    a.drips = drips
    if a.greeting_lines is not None:
        raw = a.greeting_lines.encode("latin-1", "backslashreplace").decode("unicode_escape")
        a.greeting_lines = [x.encode("latin-1") for x in raw.replace("\\n", "\n").split("\n")]
    if a.disconnect_after_bytes < 1:
        p.error("--disconnect-after-bytes must be at least 1")
    if a.disconnect_times < 0:
        p.error("--disconnect-times must not be negative")
    return a


# --------------------------------------------------------------------------- state

class Store:
    """Message files and the session log, shared by all connections."""

    def __init__(self, maildir):
        self.maildir = maildir
        os.makedirs(maildir, exist_ok=True)
        existing = [int(f[:6]) for f in os.listdir(maildir) if f.endswith(".json") and f[:6].isdigit()]
        self.seq = max(existing, default=0)
        self.conn_seq = 0
        self.disconnects = 0            # connections dropped by --disconnect-on so far
        self.log_fp = open(os.path.join(maildir, "session.log"), "a", buffering=1, encoding="utf-8",
                           errors="backslashreplace")

    def next_conn(self):
        self.conn_seq += 1
        return self.conn_seq

    def log_line(self, conn, flags, line):
        self.log_fp.write(f"{conn}\t{','.join(flags) or '-'}\t{line}\n")

    def save(self, raw, meta):
        self.seq += 1
        base = os.path.join(self.maildir, f"{self.seq:06d}")
        meta["seq"] = self.seq
        meta["received_at"] = time.time()   # the server's own clock, for rate-limit tests
        with open(base + ".eml", "wb") as f:
            f.write(raw)
        tmp = base + ".json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        os.rename(tmp, base + ".json")
        return self.seq


class LoggingReader(asyncio.StreamReader):
    """StreamReader that records every command line read outside of DATA and hands the
    message bytes read inside DATA to TestSMTP._data_read (for --disconnect-on DATA-BODY)."""

    owner = None  # the TestSMTP instance

    async def readuntil(self, separator=b"\n"):
        line = await super().readuntil(separator)
        owner = self.owner
        if owner is not None:
            if owner.mode == "data":
                await owner._data_read(line)
            else:
                owner._line_read(line, buffered=len(self._buffer) > 0)
        return line

    async def read(self, n=-1):
        # aiosmtpd's DATA loop uses read() only to drain an over-long line
        chunk = await super().read(n)
        owner = self.owner
        if owner is not None and owner.mode == "data":
            await owner._data_read(chunk)
        return chunk


class TestSMTP(SMTP):
    def __init__(self, handler, *, opts, store, implicit_tls, **kw):
        self.opts = opts
        self.store = store
        self.implicit_tls = implicit_tls
        self.conn_id = store.next_conn()
        self.mode = "cmd"               # cmd | data | auth
        self.data_bytes = 0             # message bytes read in the current DATA
        self.data_line_start = True     # the next DATA read starts a line (it may be the dot)
        self.last_buffered = False
        self.drip = None                # seconds per byte for the reply being written (--drip)
        self.messages_in_conn = 0
        self.pipelining_advertised = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(handler, **kw)
        if implicit_tls:
            # aiosmtpd only knows STARTTLS (_tls_protocol); the whole connection is TLS here.
            self._auth_require_tls = False
        # aiosmtpd keeps command_size_limits on the class and grows MAIL's limit at every
        # EHLO; give each connection its own fixed table.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        # Turn the StreamReader made by SMTP.__init__ into a LoggingReader (same layout).
        reader = self._stream_reader
        reader.__class__ = LoggingReader
        reader.owner = self

    def connection_made(self, transport):
        CONNECTIONS.add(self)
        super().connection_made(transport)

    def connection_lost(self, error):
        CONNECTIONS.discard(self)
        super().connection_lost(error)

    # -- helpers
    def ssl_object(self):
        t = self.transport
        return t.get_extra_info("ssl_object") if t is not None else None

    def is_tls(self):
        return self.implicit_tls or self.ssl_object() is not None

    def _line_read(self, line, buffered):
        if self.mode == "data":
            return
        self.last_buffered = buffered
        text = line.rstrip(b"\r\n")
        if self.mode == "auth":
            shown = MASK if text != b"*" else "*"
        else:
            shown = sanitize(text).decode("utf-8", "backslashreplace")
        flags = []
        if self.is_tls():
            flags.append("tls")
        if buffered:
            flags.append("pipelined")
        self.store.log_line(self.conn_id, flags, shown)

    async def _maybe_delay(self, what):
        secs = self.opts.delays.get(what)
        if secs:
            await asyncio.sleep(secs)
        self.drip = self.opts.drips.get(what)

    async def push(self, status):
        """aiosmtpd's push, or one byte at a time with --drip (for the reply being dripped)."""
        if not self.drip:
            return await super().push(status)
        data = (status.encode("utf-8") if isinstance(status, str) else status) + b"\r\n"
        log.info("conn %d: dripping %d bytes, one every %g s", self.conn_id, len(data), self.drip)
        for i in range(len(data)):
            if self.transport is None or self.transport.is_closing():
                return
            self._writer.write(data[i:i + 1])
            await self._writer.drain()
            await asyncio.sleep(self.drip)

    def _maybe_disconnect(self, what, detail=""):
        if what in self.opts.disconnect_on:
            if self.opts.disconnect_rcpt:
                rcpts = self.envelope.rcpt_tos if self.envelope is not None else []
                if not any(pat in r for pat in self.opts.disconnect_rcpt for r in rcpts):
                    return False
            if self.opts.disconnect_times and self.store.disconnects >= self.opts.disconnect_times:
                return False
            self.store.disconnects += 1
            log.info("conn %d: disconnecting on %s%s as configured", self.conn_id, what, detail)
            if self.transport is not None:
                self.transport.abort() if hasattr(self.transport, "abort") else self.transport.close()
            if self._original_transport is not None:
                self._original_transport.abort()
            return True
        return False

    async def _data_read(self, chunk):
        """Bytes of the message read after the 354: drop the connection mid-message once
        --disconnect-after-bytes of them arrived (DATA-BODY), never at or after the final dot."""
        at_line_start = self.data_line_start
        self.data_line_start = chunk.endswith(b"\r\n")
        if "DATA-BODY" not in self.opts.disconnect_on:
            return
        if at_line_start and chunk == b".\r\n":
            if self.data_bytes < self.opts.disconnect_after_bytes:
                log.warning("conn %d: DATA-BODY: the message ended after %d bytes, before "
                            "--disconnect-after-bytes %d; not dropped", self.conn_id,
                            self.data_bytes, self.opts.disconnect_after_bytes)
            return
        before = self.data_bytes
        self.data_bytes += len(chunk)
        if before < self.opts.disconnect_after_bytes <= self.data_bytes:
            if self._maybe_disconnect("DATA-BODY", f" after {self.data_bytes} bytes of the message "
                                                   f"(before the final dot)"):
                await asyncio.sleep(3600)   # connection_lost() cancels us right away

    async def _improper_pipelining(self):
        if (self.opts.reject_unauth_pipelining and not self.pipelining_advertised
                and self.last_buffered):
            await self.push("503 5.5.0 Error: improper use of SMTP command pipelining")
            return True
        return False

    # -- greeting
    async def _handle_client(self):
        await self._maybe_delay("GREETING")
        if self._maybe_disconnect("GREETING"):
            return
        if self.opts.greeting_lines:
            self._writer.write(b"".join(b"220-" + x + b"\r\n" for x in self.opts.greeting_lines))
        if self.opts.greeting_code != 220:
            await self.push(f"{self.opts.greeting_code} {self.opts.hostname} {self.opts.greeting_text}")
            log.info("conn %d: greeted with %d, closing", self.conn_id, self.opts.greeting_code)
            self.transport.close()
            return
        await super()._handle_client()

    # -- commands
    async def smtp_EHLO(self, hostname):
        if await self._pre("EHLO"):
            return
        if self.opts.no_ehlo:
            await self.push("502 5.5.2 Error: command not implemented")
            return
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        tls = self.is_tls()
        resp = [self.hostname]
        resp += [f"X-PADDING-{i:04d} " + "p" * 60 for i in range(self.opts.ehlo_padding)]
        if not self.opts.no_pipelining:
            resp.append("PIPELINING")
        if self.data_size_limit:
            resp.append(f"SIZE {self.data_size_limit}")
        if not self.opts.no_8bitmime:
            resp.append("8BITMIME")
        if self.enable_SMTPUTF8:
            resp.append("SMTPUTF8")
        if self.tls_context and not tls:
            resp.append("STARTTLS")
        if self.opts.users and (not self._auth_require_tls or tls):
            resp.append("AUTH " + " ".join(sorted(self._auth_methods.keys())))
        resp.append("HELP")
        self.pipelining_advertised = not self.opts.no_pipelining
        self.command_size_limits["MAIL"] = self.command_size_limit + 26 + 10
        for i, r in enumerate(resp):
            await self.push(("250 " if i == len(resp) - 1 else "250-") + r)

    async def smtp_HELO(self, hostname):
        if await self._pre("HELO"):
            return
        self.pipelining_advertised = False
        await super().smtp_HELO(hostname)

    async def smtp_MAIL(self, arg):
        if await self._pre("MAIL"):
            return
        if await self._improper_pipelining():
            return
        if self.opts.max_messages and self.messages_in_conn >= self.opts.max_messages:
            await self.push("421 4.7.0 Too many messages in this connection, closing")
            self._handler_coroutine.cancel()   # as aiosmtpd's QUIT does
            self.transport.close()
            return
        if self.opts.no_8bitmime and arg and "BODY=8BITMIME" in arg.upper():
            await self.push("555 5.5.4 BODY=8BITMIME not supported (not advertised)")
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        if await self._pre("RCPT"):
            return
        if await self._improper_pipelining():
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg):
        if await self._pre("DATA"):
            return
        if await self._improper_pipelining():
            return
        self.mode = "data"
        self.data_bytes = 0
        self.data_line_start = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.mode = "cmd"

    async def smtp_AUTH(self, arg):
        if await self._pre("AUTH"):
            return
        self.mode = "auth"
        try:
            await super().smtp_AUTH(arg)
        finally:
            self.mode = "cmd"

    async def smtp_RSET(self, arg):
        if await self._pre("RSET"):
            return
        await super().smtp_RSET(arg)

    async def smtp_NOOP(self, arg):
        if await self._pre("NOOP"):
            return
        await super().smtp_NOOP(arg)

    async def smtp_QUIT(self, arg):
        if await self._pre("QUIT"):
            return
        await super().smtp_QUIT(arg)

    async def _pre(self, what):
        if self._maybe_disconnect(what):
            await asyncio.sleep(3600)   # connection_lost() cancels us right away
            return True
        await self._maybe_delay(what)
        return False

    async def smtp_STARTTLS(self, arg):
        if await self._pre("STARTTLS"):
            return
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context or self.is_tls():
            await self.push("454 4.7.0 TLS not available")
            return
        if self.opts.starttls_inject:
            inj = self.opts.starttls_inject_text.replace("\\n", "\n").split("\n")
            payload = b"220 Ready to start TLS\r\n" + b"".join(x.encode() + b"\r\n" for x in inj)
            log.info("conn %d: STARTTLS with injected %r", self.conn_id, payload)
            self._writer.write(payload)  # one write: 220 + the bogus reply
            await self._writer.drain()
        else:
            await self.push("220 Ready to start TLS")
        # From here on identical to aiosmtpd 1.4.3 SMTP.smtp_STARTTLS.
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.info("conn %d: TLS handshake failed: %r", self.conn_id, error)
            raise TLSSetupException() from error
        log.info("conn %d: TLS established", self.conn_id)


CONNECTIONS = set()


# --------------------------------------------------------------------------- handler

class Handler:
    def __init__(self, opts, store):
        self.opts = opts
        self.store = store

    async def handle_exception(self, error):
        if isinstance(error, TLSSetupException):
            log.info("TLS setup failed (%r); closing the connection", error.__cause__)
            return "454 4.7.0 TLS handshake failed"   # never sent: aiosmtpd closes instead
        log.exception("SMTP session exception")
        return f"500 5.3.0 Error: ({error.__class__.__name__}) {error}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        for pat, reply in self.opts.reject_mail_from:
            if pat in address:
                return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        for pat, reply in self.opts.reject_rcpt:
            if pat in address:
                return reply
        seen = self.__dict__.setdefault("_rejected_once", set())
        for pat, reply in self.opts.reject_rcpt_once:
            if pat in address and address not in seen:
                seen.add(address)
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        await server._maybe_delay("DATA-END")
        if server._maybe_disconnect("DATA-END"):
            await asyncio.sleep(3600)   # connection_lost() cancels us right away
        raw = envelope.original_content
        for pat, reply in self.opts.reject_data_from:
            if pat in (envelope.mail_from or ""):
                return reply
        for pat, reply in self.opts.reject_data_content:
            if pat.encode("utf-8", "surrogateescape") in raw:
                return reply
        tls_version = cipher = None
        ssl_obj = server.ssl_object()
        if ssl_obj is not None:
            tls_version = ssl_obj.version()
            cipher = (ssl_obj.cipher() or [None])[0]
        auth_user = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            auth_user = session.auth_data.login.decode("utf-8", "replace")
        sock = server.transport.get_extra_info("sockname") if server.transport else None
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": list(envelope.rcpt_options),
            "smtputf8": bool(envelope.smtp_utf8),
            "peer": list(session.peer) if session.peer else None,
            "local": list(sock) if sock else None,
            "helo": session.host_name,
            "esmtp": bool(session.extended_smtp),
            "tls": server.is_tls(),
            "tls_version": tls_version,
            "tls_cipher": cipher,
            "auth_user": auth_user,
            "conn": server.conn_id,
            "size": len(raw),
        }
        seq = self.store.save(raw, meta)
        server.messages_in_conn += 1
        log.info("conn %d: stored message %06d from %s to %s", server.conn_id, seq,
                 envelope.mail_from, envelope.rcpt_tos)
        return f"250 2.0.0 OK queued as {seq:06d}"


def make_authenticator(users):
    def authenticator(server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        pw = auth_data.password.decode("utf-8", "replace")
        ok = user in users and users[user] == pw
        log.info("AUTH %s for user %r: %s", mechanism, user, "ok" if ok else "FAILED")
        return AuthResult(success=ok, handled=False, auth_data=auth_data)
    return authenticator


# --------------------------------------------------------------------------- main

async def serve(opts):
    store = Store(opts.maildir)
    handler = Handler(opts, store)
    ctx = None
    if opts.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):   # before READY: a stop right after it is clean
        loop.add_signal_handler(sig, stop.set)

    def factory():
        return TestSMTP(
            handler,
            opts=opts,
            store=store,
            implicit_tls=opts.implicit_tls,
            loop=loop,
            hostname=opts.hostname,
            ident="mailshot-test-smtpd",
            data_size_limit=opts.size or None,
            enable_SMTPUTF8=not opts.no_smtputf8,
            decode_data=False,
            tls_context=None if opts.implicit_tls else ctx,
            require_starttls=opts.require_starttls and not opts.implicit_tls,
            auth_required=opts.auth_required,
            auth_require_tls=opts.auth_require_tls,
            authenticator=make_authenticator(opts.users),
            auth_exclude_mechanism=opts.auth_exclude,
            timeout=opts.timeout,
        )

    server = await loop.create_server(
        factory, host=opts.host, port=opts.port,
        ssl=ctx if opts.implicit_tls else None,
        reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    log.info("listening on %s:%d (tls=%s implicit=%s)", opts.host, port, bool(ctx), opts.implicit_tls)
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()

    await stop.wait()
    log.info("stopping")
    server.close()
    for c in list(CONNECTIONS):
        try:
            if c._original_transport is not None:
                c._original_transport.abort()
            if c.transport is not None:
                c.transport.abort() if hasattr(c.transport, "abort") else c.transport.close()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass
    await asyncio.sleep(0)
    store.log_fp.close()


def main(argv=None):
    opts = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if opts.verbose else logging.INFO,
                        format="smtpd[%(process)d] %(levelname)s %(name)s: %(message)s")
    mlog = logging.getLogger("mail.log")
    if not opts.verbose:
        mlog.setLevel(logging.WARNING)
    # aiosmtpd 1.4 warns about its own use of the deprecated Session.login_data at every AUTH
    mlog.addFilter(lambda rec: "login_data is deprecated" not in rec.getMessage())
    try:
        asyncio.run(serve(opts))
    except KeyboardInterrupt:
        pass
    except OSError as e:   # typically: address already in use / cannot assign address
        log.error("cannot listen on %s:%d: %s", opts.host, opts.port, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
