"""mailshot.redis, the Redis client (src/redis.c, src/l_redis.c), against a real redis-server.

Each test starts its own server (harness.start_redis: plain or TLS, with a password or an ACL user)
and runs a Lua script through `mailshot exec`; the script prints what it got in a fixed notation
(repr below) and the test compares it with what Redis must have answered.

    MAILSHOT=build/asan/mailshot /usr/bin/python3 -m unittest tests.integration.test_redis -v
"""
import os
import socket
import unittest

from tests.integration.harness import MailshotTestCase, free_port, scaled, skip_under_valgrind

# Every script starts with this: the module, the scheduler, the server's port, and show(...), which
# prints values one line at a time: strings quoted with every byte outside printable ASCII as \xNN,
# numbers with their subtype, redis.null as null, arrays as [...], an error inside one as {err=...}.
PRELUDE = r'''
local redis = require "mailshot.redis"
local core = require "mailshot.core"
local PORT = tonumber(os.getenv("REDIS_PORT"))
local function repr(v)
  if v == redis.null then return "null" end
  local t = type(v)
  if t == "string" then
    return '"' .. v:gsub('[\0-\31\127-\255"\\]', function(ch) return ("\\x%02x"):format(ch:byte()) end) .. '"'
  elseif t == "table" then
    if v.err then return "{err=" .. repr(v.err) .. "}" end
    local parts = {}
    for i = 1, #v do parts[i] = repr(v[i]) end
    return "[" .. table.concat(parts, ",") .. "]"
  elseif t == "number" then
    return math.type(v) .. ":" .. tostring(v)
  end
  return tostring(v)
end
local function show(...)
  local out = {}
  for i = 1, select("#", ...) do out[i] = repr((select(i, ...))) end
  print(table.concat(out, " "))
end
-- wait (bounded) until cond() holds
local function await(cond, what)
  for _ = 1, 3000 do
    if cond() then return end
    core.sleep(0.01)
  end
  error("gave up waiting for " .. what)
end
'''


class RedisClientTests(MailshotTestCase):

    def lua(self, body, srv=None, env=None, expect_rc=0):
        """Run PRELUDE + body with mailshot exec; return its stdout lines."""
        path = self.path(f"script-{len(os.listdir(self.tmp))}.lua")
        with open(path, "w", encoding="utf-8") as f:
            f.write(PRELUDE + body)
        full_env = dict(env or {})
        if srv is not None:
            full_env["REDIS_PORT"] = str(srv.port)
        p = self.run_mailshot("exec", path, env=full_env)
        self.assertEqual(p.returncode, expect_rc, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p.stdout.splitlines()

    # ------------------------------------------------------------------ replies

    def test_every_reply_type_comes_back_as_its_lua_value(self):
        srv = self.start_redis()
        out = self.lua(r'''
local c = assert(redis.connect{ port = PORT })
show(c:call("SET", "bin", "a\0b\r\nc"))
show(c:call("GET", "bin"))
show(c:call("INCRBY", "n", -5))
show(c:call("SET", "big", 4611686018427387904))
show(c:call("INCR", "big"))
show(c:call("SET", "f", 0.1))
show(c:call("GET", "missing"))
show(c:call("BLPOP", "nolist", "0.01"))
show(c:call("LRANGE", "nolist", 0, -1))
show(c:call("EVAL", "return {1, 'two', {3, {'four', {}}}, redis.error_reply('MYERR inner'), false}", 0))
show(c:call("EVAL", "return redis.status_reply('FINE')", 0))
show(c:call("ECHO", ""))
local err, msg, kind = c:call("NOSUCHCMD", "x")
show(err, msg:match("^ERR unknown command") ~= nil, kind)
show(c:call("LPUSH", "bin", "x"))
show(c:call("PING"))
local all = {}
for b = 0, 255 do all[#all + 1] = string.char(b) end
all = table.concat(all)
show(c:call("SET", all, all))
show(c:call("GET", all) == all, c:call("EXISTS", all))
show(c:closed(), tostring(c) == "redis connection 127.0.0.1:" .. PORT)
assert(c:call("SET", "imin", math.mininteger))
assert(c:pipeline{ { "SET", "imax", math.maxinteger }, { "SET", "zero", 0 }, { "SET", "ten", 10 } })
-- arrays nest 8 deep at most: hiredis 0.14's parser refuses more, and the connection ends
local function depth(t) local d = 0 while type(t) == "table" do d = d + 1 t = t[1] end return d end
print(depth(c:call("EVAL", "return " .. ("{"):rep(8) .. "1" .. ("}"):rep(8), 0)))
show(c:call("EVAL", "return " .. ("{"):rep(9) .. "1" .. ("}"):rep(9), 0))
show(c:closed())
''', srv)
        self.assertEqual(out, [
            '"OK"',
            '"a\\x00b\\x0d\\x0ac"',
            "integer:-5",
            '"OK"',
            "integer:4611686018427387905",
            '"OK"',
            "null",
            "null",                                     # a nil array (*-1)
            "[]",
            '[integer:1,"two",[integer:3,["four",[]]],{err="MYERR inner"},null]',
            '"FINE"',
            '""',
            "nil true \"reply\"",
            'nil "WRONGTYPE Operation against a key holding the wrong kind of value" "reply"',
            '"PONG"',                                   # an error reply leaves the connection usable
            '"OK"',
            "true integer:1",
            "false true",
            "8",
            f'nil "redis 127.0.0.1:{srv.port}: protocol error: No support for nested multi bulk replies with '
            f'depth > 7" "io"',
            "true",
        ])
        # what reached the server: the bytes as given, numbers as %d and %.17g
        self.assertEqual(srv.cli("STRLEN", "bin").strip(), "6")
        self.assertEqual(srv.cli("GET", "f").strip(), "0.10000000000000001")
        self.assertEqual(srv.cli("GET", "n").strip(), "-5")
        self.assertEqual(srv.cli("GET", "imin").strip(), "-9223372036854775808")
        self.assertEqual(srv.cli("GET", "imax").strip(), "9223372036854775807")
        self.assertEqual(srv.cli("GET", "zero").strip(), "0")
        self.assertEqual(srv.cli("GET", "ten").strip(), "10")

    @skip_under_valgrind("the reply types and the close/exit cases stand for this file there")
    def test_pipeline_answers_every_command_in_order_with_errors_in_place(self):
        srv = self.start_redis()
        out = self.lua(r'''
local c = assert(redis.connect{ port = PORT })
show(c:pipeline{ {"SET", "a", 1}, {"INCR", "a"}, {"LPUSH", "a", "x"}, {"GET", "a"}, {"GET", "none"},
                 {"EVAL", "return {1, redis.error_reply('E2')}", 0} })
show(c:pipeline{})
show(pcall(c.pipeline, c, { {"GET", "a"}, "GET" }))
show(pcall(c.pipeline, c, { {} }))
show(pcall(c.call, c, "SET", "k", true))
show(pcall(c.call, c))
show(pcall(coroutine.wrap(function() return c:call("PING") end)))
show(pcall(redis.connect, { port = PORT, hots = "x" }))
show(c:call("GET", "a"), c:stats().pending)
''', srv)
        self.assertEqual(out[0], '["OK",integer:2,{err="WRONGTYPE Operation against a key holding the wrong kind of '
                                 'value"},"2",null,[integer:1,{err="ERR E2"}]]')
        self.assertEqual(out[1], "[]")
        self.assertRegex(out[2], r'^false ".*pipeline entry 2 must be a list')
        self.assertRegex(out[3], r'^false ".*pipeline entry 1 is empty')
        self.assertRegex(out[4], r'^false ".*command argument 3 must be a string or a number \(got boolean\)')
        self.assertRegex(out[5], r'^false ".*a command name is required')
        self.assertRegex(out[6], r'^false ".*task')
        self.assertRegex(out[7], r"^false \".*unknown option 'hots'")
        self.assertEqual(out[8], '"2" integer:0')   # a refused call queued nothing

    # ------------------------------------------------------------------ many tasks, one connection

    @skip_under_valgrind("the reply types and the close/exit cases stand for this file there")
    def test_thousands_of_tasks_share_one_connection_each_getting_its_own_reply(self):
        srv = self.start_redis()
        n = scaled(2000, 200)
        out = self.lua(r'''
local c = assert(redis.connect{ port = PORT })
local N = tonumber(os.getenv("N"))
local done, bad = 0, {}
for i = 1, N do
  core.spawn(function()
    local k = "key:" .. i
    local set = c:call("SET", k, "value " .. i)
    -- different commands interleaved: a reply matched to the wrong caller would show
    local got, len, n = c:call("GET", k), c:call("STRLEN", k), c:call("INCR", "counter")
    if set ~= "OK" or got ~= "value " .. i or len ~= #("value " .. i) or math.type(n) ~= "integer" then
      bad[#bad + 1] = i .. ": " .. tostring(got)
    end
    done = done + 1
  end)
end
await(function() return done == N end, "the tasks")
local st = c:stats()
print(done, #bad, bad[1], st.requests, st.pending)
print(st.writes * 10 < st.requests, st.writes)
show(c:call("GET", "counter"))
local clients = 0
for _ in c:call("CLIENT", "LIST"):gmatch("[^\n]+") do clients = clients + 1 end
print("clients", clients)
''', srv, env={"N": n})
        self.assertEqual(out[0], f"{n}\t0\tnil\t{4 * n}\t0")
        self.assertTrue(out[1].startswith("true"), f"auto-pipelining: write calls vs {4 * n} requests: {out[1]}")
        self.assertEqual(out[2], f'"{n}"')
        self.assertEqual(out[3], "clients\t1")
        self.assertEqual(srv.cli("GET", f"key:{n}").strip(), f"value {n}")

    # ------------------------------------------------------------------ AUTH

    @skip_under_valgrind("the reply types and the close/exit cases stand for this file there")
    def test_auth_with_a_password_from_the_environment(self):
        password = "s3cret-redis-pass"
        srv = self.start_redis(password=password)
        body = r'''
local pw, user = os.getenv("MS_REDIS_PW"), os.getenv("MS_REDIS_USER")
local c = assert(redis.connect{ port = PORT })
local _, e, kind = c:call("GET", "k")
show(e:match("^NOAUTH") ~= nil, kind)
_, e, kind = c:call("AUTH", user or "default", "wrong")
show(e:match("^WRONGPASS") ~= nil, kind)
if user then show(c:call("AUTH", user, pw)) else show(c:call("AUTH", pw)) end
show(c:call("SET", "k", "v"))
show(c:call("ACL", "WHOAMI"))
'''
        out = self.lua(body, srv, env={"MS_REDIS_PW": password})
        self.assertEqual(out, ['true "reply"', 'true "reply"', '"OK"', '"OK"', '"default"'])
        # an ACL user, the default user off
        srv2 = self.start_redis(password=password, user="mailshot")
        out = self.lua(body, srv2, env={"MS_REDIS_PW": password, "MS_REDIS_USER": "mailshot"})
        self.assertEqual(out, ['true "reply"', 'true "reply"', '"OK"', '"OK"', '"mailshot"'])

    # ------------------------------------------------------------------ TLS

    @skip_under_valgrind("TLS handshakes and a 10 MB value: slow there; the plain cases cover the C paths")
    def test_tls_verified_and_refused(self):
        srv = self.start_redis(tls=True)
        out = self.lua(r'''
local CA = os.getenv("CA")
local c = assert(redis.connect{ port = PORT, tls = true, ca_file = CA })
show(c:call("SET", "k", "over tls"))
show(c:call("GET", "k"))
-- by name (/etc/hosts): the certificate names localhost too
local byname, e = redis.connect{ host = "localhost", port = PORT, tls = true, ca_file = CA }
show(byname and byname:call("GET", "k"), e)
show(redis.connect{ port = PORT, tls = true })                                -- the system CAs only
show(redis.connect{ port = PORT, tls = true, ca_file = CA, server_name = "wrong.test" })
local unverified = assert(redis.connect{ port = PORT, tls = true, verify = false })
show(unverified:call("PING"))
-- a plain client on the TLS port: no reply it could read
local plain = assert(redis.connect{ port = PORT, timeout = 2 })
local r, err, kind = plain:call("PING")
show(r, kind, plain:closed())
-- many tasks and a large value over TLS: partial writes and reads inside OpenSSL's records
local big = ("0123456789abcdef\0\r\n"):rep(600000)
local done = 0
for i = 1, 200 do
  core.spawn(function()
    assert(c:call("SET", "t" .. i, i) == "OK")
    assert(c:call("GET", "t" .. i) == tostring(i))
    done = done + 1
  end)
end
show(c:call("SET", "big", big))
show(c:call("GET", "big") == big)
await(function() return done == 200 end, "the tasks")
print("tasks", done)
''', srv, env={"CA": srv.ca_file})
        p = srv.port
        self.assertEqual(out[0:3], ['"OK"', '"over tls"', '"over tls" nil'])
        self.assertRegex(out[3], rf'^nil "redis 127\.0\.0\.1:{p}: certificate verification failed: '
                                 rf'(unable to get local issuer certificate|self.signed)')
        self.assertEqual(out[4], f'nil "redis 127.0.0.1:{p}: certificate verification failed: hostname mismatch"')
        self.assertEqual(out[5], '"PONG"')
        self.assertEqual(out[6], 'nil "io" true')
        self.assertEqual(out[7:], ['"OK"', "true", "tasks\t200"])

    @skip_under_valgrind("the reply types and the close/exit cases stand for this file there")
    def test_tls_handshake_that_never_ends_times_out(self):
        # a listener that accepts (the kernel does) but never answers the ClientHello
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        self.addCleanup(lst.close)
        out = self.lua(r'''
local t0 = core.now()
show(redis.connect{ port = PORT, tls = true, timeout = 0.3 })
print(core.now() - t0 < 10)
''', env={"REDIS_PORT": lst.getsockname()[1]})
        self.assertEqual(out, [f'nil "redis 127.0.0.1:{lst.getsockname()[1]}: timeout: not connected within 0.3 s '
                               f'(TLS handshake)"', "true"])

    # ------------------------------------------------------------------ names, refusals

    @skip_under_valgrind("the reply types and the close/exit cases stand for this file there")
    def test_a_host_name_is_resolved_on_the_loop_and_a_refused_connect_says_so(self):
        srv = self.start_redis()
        dns = self.start_dns(zone={"a": [("redis.test", "127.0.0.1")], "local": ["test"]})
        closed_port = free_port()
        out = self.lua(r'''
local DNS = os.getenv("DNS")
local c = assert(redis.connect{ host = "redis.test", port = PORT, dns = DNS })
show(c:call("PING"), tostring(c))
show(redis.connect{ host = "nothere.test", port = PORT, dns = DNS })
show(redis.connect{ port = tonumber(os.getenv("CLOSED")) })
''', srv, env={"DNS": dns.address, "CLOSED": closed_port})
        self.assertEqual(out[0], f'"PONG" "redis connection redis.test:{srv.port}"')
        self.assertRegex(out[1], rf'^nil "redis nothere\.test:{srv.port}: cannot resolve nothere\.test: ')
        self.assertEqual(out[2], f'nil "redis 127.0.0.1:{closed_port}: connection refused"')

    # ------------------------------------------------------------------ failures mid-way

    @skip_under_valgrind("the reply types and the close/exit cases stand for this file there")
    def test_a_server_killed_mid_call_fails_every_pending_and_later_call(self):
        srv = self.start_redis()
        out = self.lua(r'''
local c = assert(redis.connect{ port = PORT })
local results, n = {}, 0
for i = 1, 4 do
  core.spawn(function()
    -- BLPOP blocks this connection on the server: every call behind it waits as well
    if i < 4 then results[i] = { c:call("BLPOP", "never" .. i, 0) } else results[i] = { c:call("PING") } end
    n = n + 1
  end)
end
core.sleep(0.2)
print("pending", c:stats().pending, n)
assert(os.execute("kill -9 " .. os.getenv("REDIS_PID")))
await(function() return n == 4 end, "the pending calls")
for i = 1, 4 do show(table.unpack(results[i], 1, 3)) end
show(c:call("GET", "x"))
show(c:pipeline{ {"GET", "x"} })
show(c:closed(), c:stats().pending)
''', srv, env={"REDIS_PID": srv.pid})
        gone = f'nil "redis 127.0.0.1:{srv.port}: connection closed by the server" "io"'
        self.assertEqual(out, ["pending\t4\t0", gone, gone, gone, gone, gone, gone, "true integer:0"])

    @skip_under_valgrind("the reply types and the close/exit cases stand for this file there")
    def test_a_call_past_its_timeout_kills_the_connection(self):
        srv = self.start_redis()
        out = self.lua(r'''
local c = assert(redis.connect{ port = PORT, timeout = 5 })
local other = assert(redis.connect{ port = PORT })
local d = assert(redis.connect{ port = PORT, timeout = 0.4 })   -- connect's timeout: every call's default
c:settimeout(0.3)
show(other:call("CLIENT", "PAUSE", 1500))          -- the server answers nobody for 1.5 s
local t0 = core.now()
show(c:call("GET", "k"))
print(core.now() - t0 >= 0.25)
show(c:closed(), c:call("PING"))
show(pcall(c.settimeout, c, 0))
show(d:call("GET", "k"))
''', srv)
        late = f'nil "redis 127.0.0.1:{srv.port}: timeout: no reply within 0.3 s" "io"'
        self.assertEqual(out[0:3], ['"OK"', late, "true"])
        self.assertEqual(out[3], "true " + late)
        self.assertRegex(out[4], r'^false ".*timeout must be in')
        self.assertEqual(out[5], late.replace("0.3 s", "0.4 s"))

    def test_close_fails_pending_calls_and_an_exit_with_calls_pending_is_clean(self):
        srv = self.start_redis()
        out = self.lua(r'''
local c = assert(redis.connect{ port = PORT })
local r
core.spawn(function() r = { c:call("BLPOP", "q", 0) } end)
core.sleep(0.05)
c:close()
await(function() return r ~= nil end, "the pending call")
show(table.unpack(r, 1, 3))
show(c:closed(), c:call("PING"))
print(tostring(c))
-- a connection nobody holds is closed by the collector
do
  local d = assert(redis.connect{ port = PORT })
  assert(d:call("CLIENT", "SETNAME", "dropped") == "OK")
end
collectgarbage()
collectgarbage()
local e = assert(redis.connect{ port = PORT })
await(function() return not e:call("CLIENT", "LIST"):find("name=dropped", 1, true) end, "the dropped client to go")
print("collected")
-- leave with a task still waiting on the server: the exit frees it all (the sanitizers check)
core.spawn(function() e:call("BLPOP", "q", 0) end)
core.sleep(0.05)
return 0
''', srv)
        p = srv.port
        self.assertEqual(out, [f'nil "redis 127.0.0.1:{p}: connection closed by the client" "io"',
                               f'true nil "redis 127.0.0.1:{p}: connection closed" "io"',
                               f"redis connection 127.0.0.1:{p} (closed)", "collected"])

    @skip_under_valgrind("a 10 MB value: slow there")
    def test_a_10_mb_value_round_trip(self):
        srv = self.start_redis()
        out = self.lua(r'''
local c = assert(redis.connect{ port = PORT })
local chunk = {}
for b = 0, 255 do chunk[#chunk + 1] = string.char(b) end
local big = table.concat(chunk):rep(10 * 1024 * 1024 // 256)
show(c:call("SET", "big", big))
local got = c:call("GET", "big")
show(#got, got == big)
show(c:call("STRLEN", "big"))
''', srv)
        self.assertEqual(out, ['"OK"', "integer:10485760 true", "integer:10485760"])


class RedisHarnessTests(MailshotTestCase):
    """harness.start_redis itself, which the cluster tests build on."""

    def test_password_user_tls_kill_and_restart(self):
        password = "harness-redis-pw"
        srv = self.start_redis(password=password)
        self.assertEqual(srv.url, f"redis://127.0.0.1:{srv.port}/0")
        with open(f"/proc/{srv.pid}/cmdline", "rb") as f:
            self.assertNotIn(password.encode(), f.read())            # only in the 0600 redis.conf
        self.assertEqual(os.stat(srv.conf_path).st_mode & 0o777, 0o600)
        self.assertEqual(srv.cli("SET", "kept", "yes").strip(), "OK")
        port = srv.port
        srv.restart()
        self.assertEqual((srv.port, srv.cli("GET", "kept").strip()), (port, "yes"))
        srv.kill()
        self.assertFalse(srv.running())
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

        acl = self.start_redis(password=password, user="worker")
        self.assertEqual(acl.url, f"redis://worker@127.0.0.1:{acl.port}/0")
        self.assertEqual(acl.cli("ACL", "WHOAMI").strip(), "worker")

        tls = self.start_redis(tls=True)
        self.assertEqual(tls.url, f"rediss://127.0.0.1:{tls.port}/0")
        self.assertEqual(tls.cli("PING").strip(), "PONG")
        with socket.create_connection(("127.0.0.1", tls.port), timeout=5) as s:   # TLS only: no plain RESP
            s.sendall(b"PING\r\n")
            s.settimeout(5)
            try:
                got = s.recv(100)
            except (ConnectionResetError, socket.timeout):
                got = b""
            self.assertNotIn(b"PONG", got)


if __name__ == "__main__":
    unittest.main()
