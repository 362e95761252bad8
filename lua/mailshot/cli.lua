-- mailshot.cli: the command line.  main(...) gets argv (without the program name) and returns
-- the exit status: 0 success, 1 something failed (a message, a check), 2 usage or script error,
-- 75 (EX_TEMPFAIL) a run stopped because a relay was down (campaign stop_when_down).

local mailshot = require "mailshot"
local campaign = require "mailshot.campaign"

local M = {}

local HELP = [[
Usage: mailshot COMMAND [OPTIONS]

Send personalized mail campaigns written in Lua, through an SMTP relay or directly to each
recipient's mail servers, with fallback rules of your own.

Commands:
  run SCRIPT       run a campaign script; a dry run (messages written to an outbox) unless --send
  preview SCRIPT   print one rendered message of a campaign
  preflight SCRIPT check SPF, DKIM, DMARC and the recipient list before sending
  check HOST:PORT  test an SMTP relay: connect, greet, TLS, authenticate, and report what it found
  mx DOMAIN        show a domain's mail servers in the order direct delivery tries them
  cluster status|report SCRIPT --cluster URL
                   a campaign shared by several workers through Redis: its progress across
                   the workers, or the merged report
  bounces SOURCE   read bounces and complaints from a Maildir, mbox, .eml, stdin or IMAP/POP3
                   mailbox and suppress the addresses that bounced (hard, complaint, soft N times)
  dkim keygen      make a DKIM key pair and print the DNS TXT record to publish
  exec FILE [ARG]  run a Lua file with the mailshot runtime (tasks, relays, CSV, templates)
  help [COMMAND]   show this help, or a command's

Global options:
  -h, --help       show help (also: mailshot COMMAND --help)
  -V, --version    print the version
  --lua-path DIR   (first argument only) load the Lua modules from DIR instead of the copy
                   built into the binary; the environment variable MAILSHOT_LUA_PATH does the same

Passwords are never taken from the command line: campaign scripts read them from the
environment (os.getenv) or a file; `check` reads MAILSHOT_PASSWORD or --password-file.
Exit status: 0 success, 1 a message or check failed, 2 a usage or script error,
75 a run stopped early because a relay was down (run it again with --resume).
]]

local COMMAND_HELP = {
  run = [=[
Usage: mailshot run SCRIPT [--send [--resume [--resend-in-flight]] [--force]] [--outbox DIR] [--report FILE] [--concurrency N]
                           [--limit N] [--give-up-after D] [--log FILE] [--quiet] [--progress SECONDS]
                           [--cluster URL [--worker NAME] [--redis-password-file F]]

Run the campaign that SCRIPT returns (mailshot.campaign{...}).  Files the script names are
found relative to the script's folder.
The recipients CSV must be UTF-8 unless the campaign declares encoding = "latin-1",
"windows-1252" or "iso-8859-15": otherwise --send refuses to start, and a dry run warns.

  --send            send for real through the campaign's `send` function (default: dry run);
                    a journal (NAME.journal beside the report) records every outcome
  --resume          continue a stopped or crashed run from its journal: final outcomes are
                    kept, deferred ones retried, in-flight ones reported as possibly sent.
                    Refused (exit 2, nothing sent) when there is no journal to continue
  --resend-in-flight  with --resume: send again the messages that were in flight (possibly
                    sent) when the last run stopped; the campaign is not considered changed
  --force           resume although the recipients or templates changed (rows are matched
                    by line number), or start over when a journal exists (the old one is
                    kept as NAME.journal.old)
  --outbox DIR      dry run: write each message as DIR/NNNNNN-ADDRESS.eml (default: outbox)
  --report FILE     one CSV row per recipient: line,email,status,code,enhanced,stage,via,mx,response,first_response
                    (via: relay or direct; mx: the MX host whose answer is the outcome;
                    first_response: a message that fell back to another path, the first one's answer)
                    (default: NAME-report.csv in the script's folder, NAME being the script's
                    name, so that --resume finds it and its journal from any working folder;
                    a FILE given here is relative to the current folder)
  --concurrency N   messages in flight at once (default: the campaign's, else 8)
  --limit N         stop after N recipient rows
  --give-up-after D retry temporary failures within this run until D (90s, 5m, 4h) after a
                    message's first try (default: the campaign's retry.give_up_after, 4h);
                    0: no retries in this run (they stay deferred for --resume)
  --log FILE        append the SMTP dialogue of every session to FILE (AUTH data masked): lines
                    "TIME [sN] PEER > sent" / "< received" (one per reply line), other bytes as \xNN
  --quiet           no live progress line: a plain progress line every 10 s instead (also
                    what happens when stderr is not a terminal)
  --progress SECS   seconds between plain progress lines (default 10; 0: none)
  --cluster URL     with --send: share the campaign with other workers (other mailshot
                    processes, on any machines, running the same script and CSV) through
                    Redis: redis://[USER@]HOST:PORT/DB, or rediss:// for TLS (certificate
                    verified).  Redis hands each worker blocks of rows (cluster.read_ahead
                    lines each); each row is marked in flight there before it is sent, so
                    no one gets it twice.  Another worker reports a dead worker's in-flight
                    rows in-flight and sends its other rows.
                    Run the same command again to continue (no --resume; no local journal)
  --worker NAME     this worker's name in the cluster (default: HOST:PID)
  --redis-password-file F  the Redis password, from the first line of F (else the environment
                    variable MAILSHOT_REDIS_PASSWORD; never in the URL)

With --send on a terminal, a live line shows done/total, sent, failed, deferred (temporary
failures, with the last one's reason, or "REASON; N in a row" while a relay fails send after
send), skipped, the rate per second, the ETA and the open connections.

Status values: sent, failed (with the server's words), skipped (with the reason), written
(dry run), deferred (a temporary failure not delivered when the run ended: --resume retries
it), in-flight (possibly sent before an interruption), not-started (the run was stopped before
the row: --resume sends it).  The report ends in CSV line order, one row per CSV data line.  The
summary adds one line per relay (or direct delivery) that left rows failed or deferred, with its
last reason.  Exit status 0 only if no message failed or was deferred; 130/143 after
SIGINT/SIGTERM, which finish the messages in flight first (a second signal stops at once) and
print how to resume; 75 when a relay was down (the campaign's stop_when_down: by default 20
sends in a row that failed to connect, TLS or AUTH over at least 60 s, no row delivered another
way): the run stopped the same way and says how to resume.
]=],
  preview = [=[
Usage: mailshot preview SCRIPT [--row N]

Render the message of the recipient row on line N of the CSV file (the number in the report's
`line` column; line 1 is the header; default: the first recipient row) and print it as sent,
headers and all.  Nothing is sent and nothing is written.  A row that `run` skips (invalid, suppressed, role,
filtered or duplicate address) prints nothing: the reason goes to stderr, exit status 1.
]=],
  check = [=[
Usage: mailshot check HOST:PORT [--tls MODE] [--user USER] [--password-file FILE] [--ca-file FILE]
                      [--insecure] [--allow-plaintext-auth] [--helo NAME] [--timeout SECONDS]
                      [--dns IP[:PORT]] [--verbose]

Test an SMTP relay the way a campaign would use it: connect, read the greeting, EHLO, upgrade
to TLS, authenticate, QUIT.  Prints the greeting, capabilities, TLS version, cipher and
certificate subject, and whether AUTH succeeded; steps never reached say "not tried".  Exit 0
when everything tried worked (the result line says what was not tested: TLS with --tls none,
AUTH without --user); otherwise a one-line reason with the server's own words, and a hint
when the --tls mode looks wrong for the port.

  --tls MODE           starttls (default), tls (implicit TLS, port 465) or none
  --user USER          authenticate as USER; the password comes from the environment variable
                       MAILSHOT_PASSWORD or from --password-file, never from the command line
  --password-file F    read the password from the first line of F
  --ca-file FILE       trust this CA certificate in addition to the system's
  --insecure           do not verify the server's certificate (explicit opt-out)
  --allow-plaintext-auth  with --tls none: send the password without TLS (refused otherwise)
  --helo NAME          the name to give in EHLO (default: this machine's host name)
  --timeout SECONDS    for each step (default 30)
  --dns IP[:PORT]      resolve HOST with this DNS server (comma-separated for several) instead
                       of the system's; /etc/hosts is read first either way
  --verbose            print the SMTP dialogue (the password is masked)
]=],
  mx = [=[
Usage: mailshot mx DOMAIN [--dns IP[:PORT]] [--timeout SECONDS]

Look up DOMAIN's MX hosts and their addresses (IPv6 first, then IPv4) and print them in the
order direct delivery tries them (preference order; equal preferences are shuffled on each
run).  Says so plainly for a null MX (the domain accepts no mail), a domain without MX
records (mail goes to its own address), a domain that does not exist, and when the DNS server
gave no answer (timeout, SERVFAIL, REFUSED, nothing listening): then nothing is known about
the domain.  Exit 0 when the domain can receive mail, 1 otherwise, 2 for a usage error.

  --dns IP[:PORT]      ask this DNS server instead of the system's resolvers (several:
                       separate them with commas, e.g. 127.0.0.1:5353,[::1]:5353)
  --timeout SECONDS    for the whole command: every lookup (MX, then the hosts' addresses)
                       together, retries included (default 6); a lookup still unanswered then
                       is reported as a timeout
]=],
  preflight = [=[
Usage: mailshot preflight SCRIPT [--dns IP[:PORT]] [--timeout SECONDS] [--connect [--port N]]
                              [--allow-private]

Render every message of the campaign (nothing is sent), then check the From domain's SPF
record, the DKIM key published at the campaign's selector (and that it matches the private
key), the DMARC record and the alignment of From with the DKIM domain; and the recipient
list: recipients per domain, domains that cannot receive mail (NXDOMAIN, null MX, no MX and no
address), invalid, suppressed and duplicate rows.  A lookup the DNS server did not answer
(timeout, SERVFAIL, REFUSED, nothing listening) is reported as "could not ask", never as a
missing record.  Problems are listed most serious first; the exit status is 1 when one of
them is blocking, else 0.

  --dns IP[:PORT]    ask this DNS server (comma-separated for several) instead of the system's
  --timeout SECONDS  per DNS try (default 3; two tries per lookup)
  --connect          also probe each distinct MX host: connect, EHLO, STARTTLS (no MAIL, no
                     RCPT), and report the ones that fail or offer no TLS
  --port N           the MX hosts' port for --connect (default 25)
  --allow-private    accept MX addresses that are not on the internet (loopback, 10.x,
                     192.168.x, link-local, ...), as direct delivery's allow_private does:
                     without it they are never probed, and a domain whose every mail server
                     is such is reported
]=],
  dkim = [=[
Usage: mailshot dkim keygen --selector S --domain D [--algorithm rsa-sha256|ed25519-sha256]
                            [--bits N] [--out FILE]

Make a DKIM private key (RSA 2048 bits by default, or Ed25519) and write it to FILE (default
S.D.key, mode 0600; an existing file is never overwritten), then print the TXT record to
publish at S._domainkey.D.  Campaigns sign with it through
  dkim = { domain = "D", selector = "S", key_file = "FILE" }
]=],
  bounces = [=[
Usage: mailshot bounces SOURCE... [--campaign SCRIPT]... [--suppress FILE] [--report FILE] [--dry-run]
                                  [--move-to FOLDER] [--quarantine FOLDER] [--soft-limit N] [--soft-days D]
                                  [--max-bytes N] [--user USER] [--password-file F] [--ca-file F]
                                  [--insecure] [--allow-plaintext]
                                  [--cluster URL [--redis-password-file F]]

Read bounce messages (RFC 3464 DSNs, RFC 5965 ARF complaints, auto-replies, bounces in other
formats) and suppress the addresses that bounced.  SOURCE: a Maildir (cur/ and new/), an mbox
file, a single message file (.eml), - (standard input: one message or an mbox), or
imap://, imaps://, pop3://, pop3s://HOST[:PORT]/[MAILBOX] (TLS, certificate verified).
Each message is tied to a campaign by its VERP token (return_path; a token that does not verify
is reported as forged and never acted on), else by the failed address in the campaign's list.
Hard bounces and complaints are suppressed at once, soft ones on the Nth within D days, policy
blocks and auto-replies never; what cannot be read is quarantined.  Nothing is ever deleted.

  --campaign SCRIPT   a campaign script (repeat for several); its bounces_to file is where
                      suppressed addresses go, its on_bounce(b) may change a class
  --suppress FILE     append suppressed addresses to FILE instead (needed without --campaign);
                      the soft-bounce counts are kept in FILE.state beside it
  --report FILE       one CSV row per address (or message): source, where, message_id, kind,
                      address, campaign, line, class, rule, status, diagnostic, action
                      (default: bounces-report.csv)
  --dry-run           change nothing (no suppression, no counts, no marking): the report and
                      summary say what would be done
  --move-to FOLDER    move processed messages to FOLDER (Maildir: .FOLDER beside the source;
                      IMAP: a mailbox) instead of marking them seen
  --quarantine FOLDER where unreadable and unclassified messages go (default: the Maildir's
                      .Quarantine, IMAP's Quarantine; for mbox, .eml and stdin a copy goes to the
                      Maildir FILE.quarantine beside the suppression file)
  --soft-limit N      soft bounces within the period that suppress an address (default 3)
  --soft-days D       the period in days (default 7)
  --max-bytes N       bytes of one message read into memory (default 10485760); a larger
                      message is parsed from its start and quarantined when that is not enough
  --user USER         IMAP/POP3 user; the password comes from MAILSHOT_IMAP_PASSWORD or
                      --password-file, never from the command line
  --password-file F   read the IMAP/POP3 password from the first line of F
  --ca-file F         trust this CA certificate for IMAPS/POP3S in addition to the system's
  --insecure          do not verify the IMAP/POP3 server's certificate (an explicit opt-out)
  --allow-plaintext   imap:// and pop3:// to a server that offers no STARTTLS: the password
                      crosses the network in clear (refused without this flag)
  --cluster URL       the campaigns are being sent by a cluster (mailshot run --cluster):
                      the addresses suppressed also go to each campaign's shared suppression
                      list in that Redis, so the running workers skip them at once (default:
                      a campaign's own cluster.url)
  --redis-password-file F  the Redis password (else MAILSHOT_REDIS_PASSWORD)

Exit status: 0 every source read, 1 a source (or a marking, a write) failed: the others were
still processed, 2 a usage error, a campaign script or its recipients file that does not load.
]=],
  cluster = [=[
Usage: mailshot cluster status SCRIPT --cluster URL [--redis-password-file F]
       mailshot cluster report SCRIPT --cluster URL [--redis-password-file F] [--report FILE]

A campaign run by several workers (`mailshot run SCRIPT --send --cluster URL`) keeps its state
in Redis.  `status` prints its progress across the workers: final rows by status, deferred
rows and rows in flight now, and each worker with its counts, its rows in flight, the blocks of
rows it holds and whether it is alive, dead or finished.  `report` writes the merged report: one
row per CSV data line, in line order, with the run's report columns; a row with no outcome yet
is `in-flight` when a worker marked it in flight (alive: being sent; stopped: possibly sent),
`not-started` when a worker only reserved it or no worker has reached it.  Nothing is changed
in Redis.

  --cluster URL     redis://[USER@]HOST:PORT/DB or rediss://... (default: the campaign's
                    cluster.url)
  --redis-password-file F  the Redis password (else MAILSHOT_REDIS_PASSWORD)
  --report FILE     report: where to write it (default: NAME-cluster-report.csv beside the
                    script)
]=],
  exec = [=[
Usage: mailshot exec FILE [ARGS...]

Run a Lua file with the mailshot runtime: it runs as a task, so it may use relays, sleep,
spawn and the CSV reader.  The global `arg` holds ARGS (arg[0] is FILE).  An integer
returned by the file becomes the exit status.
]=],
}

local function say(...) io.stdout:write(...); io.stdout:write("\n") end
local function complain(...) io.stderr:write("mailshot: ", ...); io.stderr:write("\n") end

-- Parse "--name value", "--name=value" and flags; `spec` maps option names to "flag" or "value".
local function parse(args, spec, command)
  local opts, pos = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "-h" or a == "--help" then opts.help = true
    elseif a:sub(1, 2) == "--" then
      local name, value = a:match("^%-%-([^=]+)=(.*)$")
      name = name or a:sub(3)
      local kind = spec[name]
      if not kind then return nil, ("%s: unknown option --%s (see mailshot %s --help)"):format(command, name, command) end
      if kind == "flag" then
        if value then return nil, ("%s: --%s takes no value"):format(command, name) end
        opts[name] = true
      else
        if not value then
          i = i + 1
          value = args[i]
          if not value then return nil, ("%s: --%s needs a value"):format(command, name) end
        end
        if kind == "list" then                  -- an option given several times
          opts[name] = opts[name] or {}
          table.insert(opts[name], value)
        else
          opts[name] = value
        end
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

local function positive_int(v, name)
  local n = tonumber(v)
  if not n or n < 1 or n ~= math.floor(n) then return nil, ("--%s must be a positive integer"):format(name) end
  return n
end

-- Load a campaign script: the files it names are found beside it.  Its `require "mailshot"`
-- (and "mailshot.template") gives a view whose campaign and template.file know the folder.
local function load_campaign(path)
  local view, tpl_view = mailshot.for_folder(path:match("^(.*)/[^/]*$") or ".", path)
  local views = { mailshot = view, ["mailshot.template"] = tpl_view }
  local env = setmetatable({ require = function(name) return views[name] or require(name) end }, { __index = _G })
  local chunk, err = loadfile(path, "t", env)
  if not chunk then return nil, err end
  local ok, c = xpcall(chunk, function(e) return debug.traceback(tostring(e), 2) end)
  if not ok then return nil, c end
  if not campaign.is_campaign(c) then
    return nil, path .. ": the script must end with `return mailshot.campaign { ... }`"
  end
  c.name = c.name or path:match("([^/]+)%.lua$") or path:match("([^/]+)$")
  return c
end

local commands = {}

function commands.run(args)
  local opts, pos = parse(args, { send = "flag", outbox = "value", report = "value", concurrency = "value",
                                  limit = "value", quiet = "flag", log = "value", progress = "value",
                                  resume = "flag", force = "flag", ["give-up-after"] = "value",
                                  ["resend-in-flight"] = "flag", cluster = "value", worker = "value",
                                  ["redis-password-file"] = "value" }, "run")
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.run); return 0 end
  if #pos ~= 1 then complain("run: expected one campaign script (see mailshot run --help)"); return 2 end
  local run = { dry = not opts.send, outbox = opts.outbox or "outbox" }
  local err
  if opts.concurrency then run.concurrency, err = positive_int(opts.concurrency, "concurrency") end
  if not err and opts.limit then run.limit, err = positive_int(opts.limit, "limit") end
  local every = tonumber(opts.progress or 10)
  if not every or every < 0 then err = "--progress must be a number of seconds" end
  if opts["resend-in-flight"] and not ((opts.resume or opts.cluster) and opts.send) then
    err = "--resend-in-flight goes with --send --resume (or --send --cluster)"
  end
  if (opts.worker or opts["redis-password-file"]) and not opts.cluster then err = "--worker and --redis-password-file go with --cluster" end
  if err then complain("run: ", err); return 2 end
  if opts.log then
    local ok, lerr = require("mailshot.smtp").log(opts.log)
    if not ok then complain("run: --log: ", lerr); return 2 end
  end
  local c
  c, err = load_campaign(pos[1])
  if not c then complain(err); return 2 end
  -- the default report, and the journal beside it, live in the script's folder: the same
  -- command finds them again from any working folder (--resume must never miss a journal)
  run.report = opts.report or ((pos[1]:match("^(.*)/[^/]*$") or ".") .. "/" .. c.name .. "-report.csv")
  if opts["give-up-after"] then
    local ok, r = pcall(campaign.retry_config, { first = c.retry and c.retry.first, max = c.retry and c.retry.max,
                                                 give_up_after = opts["give-up-after"] })
    if not ok then complain("run: --give-up-after: ", tostring(r):gsub("^.-retry%.give_up_after: ", "")); return 2 end
    c.retry = r.give_up_after > 0 and r or false
  end
  -- several workers sharing the campaign through Redis (--cluster, or the campaign's cluster.url)
  local cluster_spec
  if opts.send then
    cluster_spec, err = require("mailshot.cluster").spec(c, { url = opts.cluster, worker = opts.worker,
                                                              password_file = opts["redis-password-file"] })
    if err then complain("run: ", err); return 2 end
    if cluster_spec and opts.resume then
      complain("run: --resume does not go with --cluster: a cluster's state is in Redis; run the same command "
               .. "again (without --resume) to continue")
      return 2
    end
  end
  if cluster_spec then
    run.cluster, run.script, run.signals = cluster_spec, pos[1], true
    run.cluster_marker = (run.report:match("^(.*)/[^/]*$") or ".") .. "/" .. c.name .. ".cluster"
    run.force = opts.force
    run.resend_in_flight = opts["resend-in-flight"]
    run.relay_limiters = mailshot.relay_limiters()
  elseif opts.send then
    local dir = run.report:match("^(.*)/[^/]*$") or "."
    run.journal = dir .. "/" .. c.name .. ".journal"
    run.script = pos[1]
    run.resume, run.force, run.signals = opts.resume, opts.force, true
    run.resend_in_flight = opts["resend-in-flight"]
    run.relay_limiters = mailshot.relay_limiters()
    run.notice = function(text) say("mailshot: ", text) end
  elseif opts.resume then
    complain("run: --resume goes with --send")
    return 2
  end
  if opts.send then
    local live = not opts.quiet and mailshot.core.isatty(2)
    if live or every > 0 then
      local lines = mailshot.csv.count_lines(c.recipients_path)
      local total = lines and math.max(lines - 1, 0)
      if total and run.limit then total = math.min(total, run.limit) end
      run.progress = { live = live, interval = every, total = total, connections = mailshot.connections }
    end
  end
  local counts
  counts, err = c:run(run)
  mailshot.close_relays()
  if not counts then complain(err); return 2 end
  -- the command that continues this run (--report only when it was given: the default is found)
  local again = opts.report and (" --report " .. opts.report) or ""
  if cluster_spec then
    -- the same command continues: the state is in Redis (no --resume)
    again = (" --cluster %s --worker %s%s%s"):format(cluster_spec.url, cluster_spec.worker, again,
      opts["redis-password-file"] and (" --redis-password-file " .. opts["redis-password-file"]) or "")
  end
  do
    local done = counts.sent + counts.failed + counts.written
    local extra = ""
    if counts.deferred > 0 then
      extra = extra .. (", %d deferred"):format(counts.deferred)
      if counts.last_temporary then extra = extra .. (" (last: %s)"):format(counts.last_temporary) end
    end
    if counts["in-flight"] > 0 then extra = extra .. (", %d possibly sent"):format(counts["in-flight"]) end
    if counts["not-started"] > 0 then extra = extra .. (", %d not started"):format(counts["not-started"]) end
    say(("mailshot: %s: %d recipients: %s%d failed, %d skipped%s in %.1f s (%.0f msg/s); report: %s%s"):format(
      c.name, counts.total,
      run.dry and ("%d written to %s, "):format(counts.written, run.outbox) or ("%d sent, "):format(counts.sent),
      counts.failed, counts.skipped, extra, counts.seconds, done / math.max(counts.seconds, 1e-3), run.report,
      run.dry and " (dry run: nothing was sent; add --send)"
      or counts.deferred > 0 and (" (deferred ones: mailshot run %s --send%s%s)"):format(pos[1],
        cluster_spec and "" or " --resume", again) or ""))
    -- which path left rows failed or deferred, and why (a campaign may use several relays)
    for _, line in ipairs(counts.paths or {}) do say("mailshot:   ", line) end
  end
  local cl = counts.cluster
  if cl and cl.lost then
    say(("mailshot: %s: Redis was lost (%s); worker %s stopped taking rows and finished the ones in flight. "
         .. "%d outcome%s could not reach Redis (they are in this worker's report %s); in Redis those rows stay "
         .. "marked in flight by %s: once its lease runs out, the next worker takes its blocks over, reports those "
         .. "rows in-flight (possibly sent) and sends the ones it had not started. The rows in no block are "
         .. "untouched in Redis. When Redis is back, continue with:"):format(
      c.name, cl.lost, cl.worker, cl.unsettled, cl.unsettled == 1 and "" or "s", run.report, cl.worker))
    say(("  mailshot run %s --send%s"):format(pos[1], again))
    return 75
  end
  if counts.down then
    say(("mailshot: %s; stopped. Resume with: mailshot run %s --send %s%s"):format(counts.down.text, pos[1],
      cl and "" or "--resume", again))
    return 75
  end
  if counts.stopped then
    say(("mailshot: %s stopped by SIG%s; %s has every outcome. To continue:"):format(
      c.name, counts.stopped, cl and "Redis" or ("the journal " .. run.journal)))
    say(("  mailshot run %s --send%s%s"):format(pos[1], cl and "" or " --resume", again))
    return counts.stopped == "INT" and 130 or 143
  end
  return (counts.failed == 0 and counts.deferred == 0) and 0 or 1
end

function commands.preview(args)
  local opts, pos = parse(args, { row = "value" }, "preview")
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.preview); return 0 end
  if #pos ~= 1 then complain("preview: expected one campaign script"); return 2 end
  local want, err = nil, nil
  if opts.row then want, err = positive_int(opts.row, "row") end
  if opts.row and not want then complain("preview: ", err); return 2 end
  local c
  c, err = load_campaign(pos[1])
  if not c then complain(err); return 2 end
  local rows = require "mailshot.rows"
  local reader
  reader, err = rows.open_reader(c)
  if not reader then complain(err); return 2 end
  if err then complain("warning: ", err) end
  -- --row N is the CSV line N (1 the header), the number in the report's `line` column and in
  -- every "line N" message; without it, the first recipient row
  local first = rows.dedupe()          -- run's duplicate rule: preview tells what run would do
  local function fail(status, ...) reader:close(); complain(...); return status end
  if want == 1 then return fail(2, ("preview: %s line 1 is the header; the recipients start on line 2"):format(c.recipients)) end
  while true do
    local row, line, msg = reader:read()
    if row == nil then
      return fail(2, ("preview: %s has %d lines and no recipient row%s"):format(c.recipients, reader:line(),
        want and (" on line %d"):format(want) or ""))
    end
    local last = reader:line()           -- the line the record ends on
    if want and line > want then
      return fail(2, ("preview: %s line %d holds no recipient row (a blank line)"):format(c.recipients, want))
    end
    local is_first = row and first(row[c.email_field])
    if want and want > line and want <= last then
      if row then
        return fail(2, ("preview: %s line %d is inside the record that starts on line %d (a quoted field spans "
                        .. "lines): use --row %d"):format(c.recipients, want, line, line))
      end
      return fail(1, rows.swallowed(c.recipients, want, line) .. ": " .. msg)
    end
    if not row and want == line then
      return fail(1, ("preview: %s line %d: `run` skips this row: %s"):format(c.recipients, line, msg))
    end
    if row and (want == line or not want) then
      reader:close()
      local m, merr, skipped
      if is_first then m, merr, skipped = c:message(row, line) else merr, skipped = rows.DUPLICATE, "duplicate" end
      if skipped then
        complain(("preview: %s line %d: `run` skips this row: %s"):format(c.recipients, line, merr))
        return 1
      end
      if not m then complain(merr); return 1 end
      if c.verp then io.stdout:write("Return-Path: <", m.from, ">\r\n") end    -- as a dry run's outbox shows it
      io.stdout:write(m.data)
      return 0
    end
  end
end

local function check_password(opts)
  if opts["password-file"] then
    local f, err = io.open(opts["password-file"], "r")
    if not f then return nil, "--password-file: " .. err end
    local line = f:read("l") or ""
    f:close()
    return line
  end
  local p = os.getenv("MAILSHOT_PASSWORD")
  if not p then return nil, "--user needs a password: set MAILSHOT_PASSWORD or use --password-file" end
  return p
end

-- The steps of a check in the order they happen, per --tls mode: a failure at one means the later
-- ones were never tried (and must not be reported as passed or failed).
local CHECK_STEPS = {
  starttls = { "connect", "greeting", "ehlo", "starttls", "tls", "auth", "ready" },
  tls = { "connect", "tls", "greeting", "ehlo", "auth", "ready" },
  none = { "connect", "greeting", "ehlo", "auth", "ready" },
}

-- Was `step` reached in the check result r (mode: the --tls mode)?
local function check_reached(r, mode, step)
  if r.ok then return true end
  local steps = CHECK_STEPS[mode] or CHECK_STEPS.starttls
  local stage = r.stage == "helo" and "ehlo" or r.stage
  local at, want
  for i, s in ipairs(steps) do
    if s == stage then at = i end
    if s == step then want = i end
  end
  if not want then return false end
  return want <= (at or 1)
end

local function has_cap(r, name)
  for _, c in ipairs(r.capabilities or {}) do
    if c:upper() == name then return true end
  end
  return false
end

-- A hint for the usual mistake behind a failure: the wrong --tls mode for the port.
local function check_hint(r, mode)
  if r.ok then return nil end
  local msg = r.message or ""
  if mode == "tls" and r.error == "tls" and not r.greeting
     and (msg:find("wrong version number", 1, true) or msg:find("packet length too long", 1, true)
          or msg:find("unknown protocol", 1, true) or msg:find("record layer failure", 1, true)) then
    return "the server answered in plaintext: this looks like a STARTTLS or plain SMTP port (25, 587); " ..
           "try --tls starttls"
  end
  if mode ~= "tls" and r.stage == "greeting" and not r.greeting and (r.error == "timeout" or r.error == "protocol") then
    return "no SMTP greeting: an implicit-TLS port (usually 465) waits for the client to start TLS; " ..
           "try --tls tls"
  end
  return nil
end

function commands.check(args)
  local opts, pos = parse(args, { tls = "value", user = "value", ["password-file"] = "value", ["ca-file"] = "value",
                                  insecure = "flag", helo = "value", timeout = "value", verbose = "flag",
                                  password = "value", dns = "value", ["allow-plaintext-auth"] = "flag" }, "check")
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.check); return 0 end
  if opts.password then
    complain("check: passwords are not taken from the command line (they would show in ps and shell history); ",
             "set MAILSHOT_PASSWORD or use --password-file")
    return 2
  end
  if #pos ~= 1 then complain("check: expected HOST:PORT (see mailshot check --help)"); return 2 end
  local o = { server = pos[1], tls = opts.tls or "starttls", user = opts.user, ca_file = opts["ca-file"],
              verify = not opts.insecure, helo = opts.helo, timeout = tonumber(opts.timeout or 30),
              trace = opts.verbose or nil, dns = opts.dns, allow_plaintext_auth = opts["allow-plaintext-auth"] or nil }
  if not o.timeout then complain("check: --timeout must be a number"); return 2 end
  if o.user then
    local p, err = check_password(opts)
    if not p then complain("check: ", err); return 2 end
    o.password = p
  end
  local ok, relay = pcall(mailshot.relay, o)
  if not ok then complain("check: ", tostring(relay):gsub("^mailshot%.relay: ", "")); return 2 end
  local r = relay:check()
  relay:close()
  local mode = o.tls
  local function row(k, v) say(("%-13s %s"):format(k, v)) end
  local function reached(step) return check_reached(r, mode, step) end
  local tested, untested, warnings = { "connected" }, {}, {}
  row("server", ("%s:%s%s"):format(r.server, r.port, r.address and r.address ~= r.server and (" (" .. r.address .. ")") or ""))
  if r.greeting then
    row("greeting", "220 " .. r.greeting:gsub("\n", " / "))
    row("esmtp", r.esmtp and "yes" or "no (HELO only)")
  else
    row("greeting", reached("greeting") and "none (see result)" or "not tried")
  end
  if r.capabilities and #r.capabilities > 0 then row("capabilities", table.concat(r.capabilities, " ")) end
  if r.greeting and reached("auth") then tested[#tested + 1] = r.esmtp and "EHLO ok" or "HELO ok" end
  -- TLS: described whenever it came up, whatever failed later
  if r.tls then
    row("tls", ("%s, %s"):format(r.tls.version, r.tls.cipher))
    row("certificate", ("%s (%s)"):format(r.tls.subject, r.tls.verified and "verified" or "NOT verified: --insecure"))
    tested[#tested + 1] = ("TLS %s (%s)"):format(r.tls.version, r.tls.verified and "certificate verified"
                                                 or "certificate NOT verified")
  elseif mode == "none" then
    row("tls", "not tested (--tls none): the connection is not encrypted")
    untested[#untested + 1] = "TLS not tested (--tls none)"
    if has_cap(r, "STARTTLS") then
      warnings[#warnings + 1] = "the server offers STARTTLS, which --tls none did not use: try --tls starttls"
    end
  elseif reached("tls") or (mode == "starttls" and reached("starttls")) then
    row("tls", "failed (see result)")
  else
    row("tls", "not tried")
  end
  if r.auth then
    local mech = r.auth.mechanism and (" (" .. r.auth.mechanism .. ")") or ""
    if r.auth.tried then
      row("auth", ("%s as %s%s"):format(r.auth.ok and "succeeded" or "failed", r.auth.user, mech))
      if r.auth.ok then tested[#tested + 1] = "AUTH ok as " .. r.auth.user end
    elseif reached("auth") then
      row("auth", ("not sent as %s (see result)"):format(r.auth.user))
    else
      row("auth", "not tried")
    end
  else
    row("auth", "not tested (no --user)")
    untested[#untested + 1] = "AUTH not tested (no --user)"
    if has_cap(r, "AUTH") then
      warnings[#warnings + 1] = "the server offers AUTH; without --user it was not tested (a relay that " ..
                                "requires it refuses mail from unauthenticated clients)"
    end
  end
  for _, w in ipairs(warnings) do row("warning", w) end
  if r.ok then
    local done = table.concat(tested, ", ")
    if #untested == 0 then
      say(("result        OK: %s: the relay is ready to send"):format(done))
    else
      say(("result        OK as far as tested: %s; %s"):format(done, table.concat(untested, "; ")))
    end
    return 0
  end
  local words = r.code ~= 0 and (r.code .. (r.enhanced and (" " .. r.enhanced) or "") .. " " .. r.message) or r.message
  local hint = check_hint(r, mode)
  if hint then row("hint", hint) end
  say(("result        FAILED at %s: %s"):format(r.stage, words:gsub("\n", " / ")))
  return 1
end

function commands.mx(args)
  local opts, pos = parse(args, { dns = "value", timeout = "value" }, "mx")
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.mx); return 0 end
  if #pos ~= 1 then complain("mx: expected one domain (see mailshot mx --help)"); return 2 end
  local servers
  if opts.dns then
    servers = {}
    for s in opts.dns:gmatch("[^,%s]+") do servers[#servers + 1] = s end
  end
  local timeout = tonumber(opts.timeout or 6)
  if not timeout or timeout <= 0 or timeout > 3600 then complain("mx: --timeout must be a number of seconds in (0, 3600]"); return 2 end
  local domain = pos[1]
  -- --timeout is the total: a deadline over every lookup, and two tries of half of it each for
  -- a lost packet (c-ares doubles the second try's wait: the deadline cuts it)
  local dopts = { server = servers, timeout = math.min(timeout / 2, 60), tries = 2,
                  deadline = require("mailshot.core").now() + timeout }
  local ok, plan, err, kind = pcall(mailshot.dns.plan, domain, dopts)
  if not ok then complain("mx: ", tostring(plan)); return 2 end
  if not plan then
    local what = {
      nullmx = "null MX: this domain accepts no mail (RFC 7505)",
      nxdomain = "the domain does not exist (NXDOMAIN)",
      nodata = "no MX records and no address: mail cannot be delivered",
      timeout = ("no answer from the DNS server (timeout) in %g s: nothing is known about the domain"):format(timeout),
      servfail = "the DNS server failed (SERVFAIL): nothing is known about the domain; try again later",
      refused = "the DNS server refused the query (REFUSED): it does not answer for this domain or this client (--dns?)",
      connrefused = "connection to the DNS server refused (nothing listening?): nothing is known about the domain",
      unanswered = "no DNS server gave an answer (each refused the query, failed or was not listening): nothing "
                   .. "is known about the domain",
    }
    -- one line: the sentence for the kind, else the lookup's own message (it names the domain)
    if what[kind] then say(("%s: %s"):format(domain, what[kind])) else say(err) end
    return 1
  end
  if plan[1].implicit then
    say(("%s: no MX records; mail goes to the domain's own address (implicit MX, RFC 5321 section 5.1)"):format(domain))
  else
    say(("%s: %d MX host%s, tried in this order:"):format(domain, #plan, #plan == 1 and "" or "s"))
  end
  local deliverable = false
  for _, h in ipairs(plan) do
    local addrs = #h.addresses > 0 and table.concat(h.addresses, " ") or ("(" .. (h.error or "no address") .. ")")
    deliverable = deliverable or #h.addresses > 0
    say(("  %5d  %-30s %s"):format(h.preference, h.host, addrs))
  end
  return deliverable and 0 or 1
end

function commands.dkim(args)
  if args[1] ~= "keygen" then
    if args[1] == "--help" or args[1] == "-h" then io.stdout:write(COMMAND_HELP.dkim); return 0 end
    complain("dkim: expected 'keygen' (see mailshot dkim --help)")
    return 2
  end
  local opts, pos = parse(table.move(args, 2, #args, 1, {}), { selector = "value", domain = "value",
                          algorithm = "value", bits = "value", out = "value" }, "dkim keygen")
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.dkim); return 0 end
  if not opts.selector or not opts.domain or #pos > 0 then
    complain("dkim keygen: --selector and --domain are required (see mailshot dkim --help)")
    return 2
  end
  local domain = mailshot.idna.to_ascii(opts.domain)
  if not domain then complain("dkim keygen: invalid domain ", opts.domain); return 2 end
  local alg = opts.algorithm or "rsa-sha256"
  local ok, pem, txt = pcall(require("mailshot.dkim").keygen,
                             { algorithm = alg, bits = alg == "rsa-sha256" and tonumber(opts.bits or 2048) or nil })
  if not ok then complain("dkim keygen: ", tostring(pem)); return 2 end
  if not pem then complain("dkim keygen: ", tostring(txt)); return 1 end
  local out = opts.out or (opts.selector .. "." .. domain .. ".key")
  local wrote, werr = require("mailshot.util").write_secret(out, pem)
  if not wrote then complain("dkim keygen: ", werr, " (an existing key is never overwritten)"); return 1 end
  say(("private key: %s (keep it secret; mode 0600)"):format(out))
  say(("publish this TXT record at %s._domainkey.%s:"):format(opts.selector, domain))
  say(txt)
  return 0
end

-- The mark after a domain in preflight's list: a lookup without an answer is not a verdict.
local function dns_note(bad)
  if not bad then return "" end
  return mailshot.dns.UNANSWERED[bad.kind] and ("  (DNS lookup failed: " .. bad.kind .. ")") or "  (cannot receive mail)"
end

function commands.preflight(args)
  local opts, pos = parse(args, { dns = "value", timeout = "value", connect = "flag", port = "value",
                                  ["allow-private"] = "flag" }, "preflight")
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.preflight); return 0 end
  if #pos ~= 1 then complain("preflight: expected one campaign script"); return 2 end
  local c, err = load_campaign(pos[1])
  if not c then complain(err); return 2 end
  local res
  res, err = require("mailshot.preflight").run(c, { dns = opts.dns, timeout = tonumber(opts.timeout or 3),
                                                     connect = opts.connect, port = tonumber(opts.port),
                                                     allow_private = opts["allow-private"] })
  if not res then complain(err); return 2 end
  say(("mailshot preflight: %s: %d rows, %d distinct domains, From domain %s"):format(
    c.name, res.rows, (function() local n = 0 for _ in pairs(res.domains) do n = n + 1 end return n end)(),
    res.from_domain or "?"))
  local top = {}
  for d, n in pairs(res.domains) do top[#top + 1] = { d, n } end
  table.sort(top, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] < b[1]) end)
  for i = 1, math.min(10, #top) do say(("  %8d  %s%s"):format(top[i][2], top[i][1], dns_note(res.bad_domains[top[i][1]]))) end
  for _, p in ipairs(res.problems) do say(("%-9s %s"):format(p.rank, p.text)) end
  if res.blocking > 0 then
    say(("verdict: NOT READY: %d blocking problem%s"):format(res.blocking, res.blocking == 1 and "" or "s"))
    return 1
  end
  say("verdict: ready to send")
  return 0
end

function commands.bounces(args)
  local opts, pos = parse(args, { campaign = "list", suppress = "value", report = "value", ["dry-run"] = "flag",
                                  ["move-to"] = "value", quarantine = "value", ["soft-limit"] = "value",
                                  ["soft-days"] = "value", ["max-bytes"] = "value", user = "value",
                                  ["password-file"] = "value", ["ca-file"] = "value", password = "value",
                                  insecure = "flag", ["allow-plaintext"] = "flag", cluster = "value",
                                  ["redis-password-file"] = "value" }, "bounces")
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.bounces); return 0 end
  if opts.password then
    complain("bounces: passwords are not taken from the command line; set MAILSHOT_IMAP_PASSWORD or use --password-file")
    return 2
  end
  if #pos == 0 then complain("bounces: expected at least one SOURCE (see mailshot bounces --help)"); return 2 end
  local o = { sources = pos, suppress = opts.suppress, report = opts.report, dry_run = opts["dry-run"],
              move_to = opts["move-to"], quarantine = opts.quarantine, campaigns = {},
              mailbox = { user = opts.user, password_file = opts["password-file"], ca_file = opts["ca-file"],
                          insecure = opts.insecure or nil, allow_plaintext = opts["allow-plaintext"] or nil } }
  local err
  if opts["soft-limit"] then o.soft_limit, err = positive_int(opts["soft-limit"], "soft-limit") end
  if not err and opts["max-bytes"] then o.max_bytes, err = positive_int(opts["max-bytes"], "max-bytes") end
  if not err and opts["soft-days"] then
    o.soft_days = tonumber(opts["soft-days"])
    if not o.soft_days or o.soft_days <= 0 then err = "--soft-days must be a positive number of days" end
  end
  if err then complain("bounces: ", err); return 2 end
  for _, script in ipairs(opts.campaign or {}) do
    local c
    c, err = load_campaign(script)
    if not c then complain(err); return 2 end
    if not o.suppress and not c.bounces_path then
      complain(("bounces: %s has no bounces_to file: set one in the campaign or give --suppress FILE"):format(script))
      return 2
    end
    o.campaigns[#o.campaigns + 1] = c
  end
  if #o.campaigns == 0 and not o.suppress then
    complain("bounces: give --campaign SCRIPT (its bounces_to file) or --suppress FILE (see mailshot bounces --help)")
    return 2
  end
  if (opts.cluster or opts["redis-password-file"]) and #o.campaigns == 0 then
    complain("bounces: --cluster goes with --campaign SCRIPT (the campaign names its shared suppression list)")
    return 2
  end
  -- campaigns run by a cluster (--cluster, or their cluster.url): suppressions go to Redis too
  local conns = {}
  if not o.dry_run then
    local cluster = require("mailshot.cluster")
    for _, c in ipairs(o.campaigns) do
      local spec
      spec, err = cluster.spec(c, { url = opts.cluster, worker = "bounces", password_file = opts["redis-password-file"] })
      if err then complain("bounces: ", err); return 2 end
      if spec then
        local cl
        cl, err = cluster.connect(spec, c)
        if not cl then
          for _, other in pairs(conns) do other:close() end
          complain("bounces: ", err)
          return 1
        end
        conns[c] = cl
      end
    end
  end
  if next(conns) then
    local cs = require("mailshot.cluster_suppress")
    o.publish = function(c, email, reason)
      local cl = conns[c]
      if not cl then return true end
      return cs.publish(cl, email, reason)
    end
  end
  local res
  res, err = require("mailshot.bounces").run(o)
  for _, cl in pairs(conns) do cl:close() end
  if not res then complain("bounces: ", err); return 2 end
  say("mailshot bounces: ", res.text)
  return res.failed and 1 or 0
end

function commands.cluster(args)
  local what = args[1]
  if what == "--help" or what == "-h" or what == nil then
    io.stdout:write(COMMAND_HELP.cluster)
    return what and 0 or 2
  end
  if what ~= "status" and what ~= "report" then
    local ok, perr = parse(args, { cluster = "value", ["redis-password-file"] = "value", report = "value" }, "cluster")
    complain(ok and "cluster: expected 'status' or 'report' (see mailshot cluster --help)" or perr)
    return 2
  end
  local spec_opts = { cluster = "value", ["redis-password-file"] = "value" }
  if what == "report" then spec_opts.report = "value" end
  local opts, pos = parse(table.move(args, 2, #args, 1, {}), spec_opts, "cluster " .. what)
  if not opts then complain(pos); return 2 end
  if opts.help then io.stdout:write(COMMAND_HELP.cluster); return 0 end
  if #pos ~= 1 then complain(("cluster %s: expected one campaign script"):format(what)); return 2 end
  local c, err = load_campaign(pos[1])
  if not c then complain(err); return 2 end
  local cluster = require("mailshot.cluster")
  local spec
  spec, err = cluster.spec(c, { url = opts.cluster, worker = "status", password_file = opts["redis-password-file"] })
  if not spec then
    complain(("cluster %s: %s"):format(what, err or "give --cluster URL (or the campaign's cluster.url)"))
    return 2
  end
  local cl
  cl, err = cluster.connect(spec, c)
  if not cl then complain("cluster ", what, ": ", err); return 1 end
  if what == "status" then
    local st
    st, err = cl:state()
    cl:close()
    if not st then complain("cluster status: ", err); return 1 end
    local lines = mailshot.csv.count_lines(c.recipients_path)
    say(cluster.status_text(st, c.name, lines and math.max(lines - 1, 0)))
    return st.meta.fingerprint and 0 or 1
  end
  local path = opts.report or ((pos[1]:match("^(.*)/[^/]*$") or ".") .. "/" .. c.name .. "-cluster-report.csv")
  local counts
  counts, err = cl:write_report(c, path, require("mailshot.result").REPORT_COLUMNS)
  cl:close()
  if not counts then complain("cluster report: ", err); return 1 end
  say(("mailshot: %s: %d rows: %d sent, %d failed, %d skipped, %d deferred, %d in-flight, %d not started; report: %s"):format(
    c.name, counts.total, counts.sent, counts.failed, counts.skipped, counts.deferred, counts["in-flight"],
    counts["not-started"], path))
  return 0
end

function commands.exec(args)
  if args[1] == "--help" or args[1] == "-h" or not args[1] then
    io.stdout:write(COMMAND_HELP.exec)
    return args[1] and 0 or 2
  end
  local path = args[1]
  local chunk, err = loadfile(path)
  if not chunk then complain(err); return 2 end
  local a = { [0] = path }
  for i = 2, #args do a[i - 1] = args[i] end
  _G.arg = a
  local ok, ret = xpcall(chunk, function(e) return debug.traceback(tostring(e), 2) end, table.unpack(a))
  mailshot.close_relays()
  if not ok then complain(ret); return 1 end
  return math.type(ret) == "integer" and ret or 0
end

function M.main(...)
  local args = { ... }
  local cmd = args[1]
  if cmd == nil or cmd == "-h" or cmd == "--help" then io.stdout:write(HELP); return cmd and 0 or 2 end
  if cmd == "-V" or cmd == "--version" then say("mailshot ", mailshot.version); return 0 end
  if cmd == "help" then
    local what = args[2]
    io.stdout:write(what and COMMAND_HELP[what] or HELP)
    return 0
  end
  local f = commands[cmd]
  if not f then complain("unknown command '", cmd, "' (see mailshot --help)"); return 2 end
  return f(table.move(args, 2, #args, 1, {}))
end

return M
