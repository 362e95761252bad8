"""A fast SMTP receiver for tests that must count what arrived: every recipient of every message
it accepted is appended to LOG, one address per line, written before its 250 reply is sent.

    /usr/bin/python3 tests/servers/rcpt_sink.py PORT LOG

Listens on 127.0.0.1:PORT (0: any free port), prints "ready PORT" on stdout once listening.  ESMTP
with PIPELINING, 8BITMIME and ENHANCEDSTATUSCODES; no TLS, no AUTH.  aiosmtpd (tests/servers/smtpd.py)
does far more and runs at about 1,000 messages a second; this one only receives, several times
faster, for the tests that send tens of thousands of messages and must tell that no recipient got
two.  smtp-sink's -d dump names its files with a 32-bit random number, which collides within that
many messages."""
import asyncio
import os
import sys


REPLIES = {
    b"EHLO": b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n",
    b"HELO": b"250 sink.test\r\n", b"MAIL": b"250 2.1.0 Ok\r\n", b"RCPT": b"250 2.1.5 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n", b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n", b"QUIT": b"221 2.0.0 Bye\r\n",
}


async def session(reader, writer, log):
    """Reads what the client sent in chunks and answers every complete command in it at once
    (a pipelined MAIL, RCPT, DATA group gets one write): several times faster than a readline
    per command."""
    writer.write(b"220 sink.test ESMTP rcpt_sink\r\n")
    rcpts, buf, in_data, out = [], b"", False, []
    try:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            buf += chunk
            quit_ = False
            while buf:
                if in_data:
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        if buf.startswith(b".\r\n"):
                            end = -2
                        else:
                            break
                    buf = buf[end + 5:]
                    if rcpts:
                        log.write("".join(r + "\n" for r in rcpts))
                    rcpts, in_data = [], False
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                    continue
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl + 1], buf[nl + 1:]
                verb = line[:4].upper()
                if verb == b"RCPT":
                    rcpts.append(line.split(b":", 1)[1].strip().split(b" ")[0].strip(b"<>").decode("utf-8", "replace"))
                elif verb in (b"MAIL", b"RSET"):
                    rcpts = []
                elif verb == b"DATA":
                    in_data = True
                out.append(REPLIES.get(verb, b"502 5.5.2 Error: command not recognized\r\n"))
                if verb == b"QUIT":
                    quit_ = True
                    break
            if out:
                log.flush()                 # the recipients reach the file before their 250
                writer.write(b"".join(out))
                out = []
                await writer.drain()
            if quit_:
                break
    except ConnectionError:
        pass
    finally:
        try:
            writer.close()
        except ConnectionError:
            pass


async def main(port, path):
    log = open(path, "a", encoding="utf-8")
    server = await asyncio.start_server(lambda r, w: session(r, w, log), "127.0.0.1", port, limit=1 << 20)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
    except KeyboardInterrupt:
        os._exit(0)
