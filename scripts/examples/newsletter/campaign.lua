-- The example campaign: a personalized newsletter through an SMTP relay.
--
--   mailshot run scripts/examples/newsletter/campaign.lua            dry run: messages to ./outbox
--   SMTP_SERVER=smtp.example.com:587 SMTP_USER=me SMTP_PASSWORD=... \
--     mailshot run scripts/examples/newsletter/campaign.lua --send   sends for real
--
-- Files are found next to this script, whatever the working directory.
local mailshot = require "mailshot"

local relay = mailshot.relay {
  server   = os.getenv "SMTP_SERVER" or "127.0.0.1:2525",
  tls      = os.getenv "SMTP_TLS" or "starttls",
  user     = os.getenv "SMTP_USER",
  password = os.getenv "SMTP_PASSWORD",
  ca_file  = os.getenv "SMTP_CA_FILE",
}

return mailshot.campaign {
  name       = "newsletter",        -- reports and journal: newsletter-report.csv, newsletter.journal
  recipients = "recipients.csv",          -- relative to this script's folder
  from       = "Acme News <news@acme.example>",
  subject    = "Hello {{first_name}}",
  text       = mailshot.template.file "body.txt",
  html       = mailshot.template.file "body.html",
  send       = function(msg) return relay:send(msg) end,
  -- Signed VERP return paths, so that `mailshot bounces` can tell which recipient each bounce is
  -- about (README: "VERP return paths"): uncomment, and export BOUNCE_SECRET (openssl rand -base64 32)
  -- or keep it in a file beside this script (secret_file = "bounce.key", mode 0600).
  -- return_path = { domain = "bounces.acme.example", secret = os.getenv "BOUNCE_SECRET" },
}
