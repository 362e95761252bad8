-- mailshot.classify: what becomes of one recipient row before a message is made.
--
-- The one rule set for a row, used by `run`, `preview`, `preflight` and campaign:message, so
-- that they can never disagree: the address's IDN domain is rewritten to its A-label form, the
-- address is checked (mime.valid_address: the SMTP client's own smtp_addr_ok narrowed to what a
-- header carries), then the suppression lists, role addresses (suppress_roles) and the
-- campaign's filter.  Duplicates are the row source's business (mailshot.rows): they depend on
-- the rows before, not on the row.

local idna = require("mailshot.idna")
local mime = require("mailshot.mime")
local suppress = require("mailshot.suppress")

local find = string.find

local M = {}

-- An IDN domain goes out in its A-label form (xn--...), which every server takes; a non-ASCII
-- local part would need SMTPUTF8 and is refused by the address check.
local function ascii_domain(email)
  local localpart, domain = idna.split_address(email)
  local ascii = domain and not find(localpart, "[\128-\255]") and idna.to_ascii(domain)
  return ascii and (localpart .. "@" .. ascii) or email
end

--- classify.row(c, row) -> email | nil, reason, kind
--- email: the address to send to (row[c.email_field] is rewritten to it, so templates see the
--- address that is sent to).  kind: "missing", "invalid", "suppressed", "role" or "filtered".
--- The campaign's filter is called here (its errors are raised, as the campaign's own code).
function M.row(c, row)
  local field = c.email_field
  local email = row[field]
  if email == nil or email == "" then return nil, ("no '%s' value"):format(field), "missing" end
  if find(email, "[\128-\255]") then
    email = ascii_domain(email)
    row[field] = email
  end
  local ok, why = mime.valid_address(email)
  if not ok then return nil, "invalid email address: " .. tostring(why), "invalid" end
  local listed = c.suppressed and c.suppressed:check(email)
  if listed then return nil, listed, "suppressed" end
  if c.suppress_roles and suppress.is_role(email) then return nil, "role address (suppress_roles)", "role" end
  if c.filter then
    local keep, reason = c.filter(row)
    if not keep then return nil, reason or "filtered out", "filtered" end
  end
  return email
end

return M
