-- mailshot.result: the one definition of what a send returns and of what the report and the
-- journal keep of it.
--
-- A send result (relay:send, built by push_result in src/l_smtp.c; a direct sender's, which adds
-- the fields of direct delivery) has only the fields of FIELDS; tests/integration/test_errors.py
-- checks the C side against this list.  The report's columns and the journal's fields are RECORD,
-- in this order (the report puts the row's line and email first); outcome.from_result (outcome.lua) maps
-- a result to a record: status from ok, response from message, the others by name.

local M = {}

--- The fields a send result may have (README: relay:send and direct delivery result tables).
M.FIELDS = {
  "ok", "code", "enhanced", "message", "temporary", "stage",
  "error",                     -- the kind of failure, set where it happened (src/smtp.h smtp_error)
  "defer", "via",
  "relay",                     -- a relay's result: the relay, "host:port" (direct delivery: nil)
  "accepted", "recipients",    -- a message to several recipients
  "mx", "address", "domain", "attempts", "dns",   -- direct delivery
  "fallback",                  -- mailshot.fallback: every try { via, ok, code, message }
  "first_response",            -- a message that fell back: the first path's answer ("relay: 421 ...")
}

--- What the report and the journal keep of one outcome, in order.  `error` is not among them.
--- New fields go at the end only: the journal's version 1 records are this list but its last
--- field (first_response), and such a journal still resumes (journal.lua).
M.RECORD = { "status", "code", "enhanced", "stage", "via", "mx", "response", "first_response" }

--- The report's columns: the row's line and address, then the record.
M.REPORT_COLUMNS = { "line", "email", table.unpack(M.RECORD) }

return M
