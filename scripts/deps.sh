#!/bin/sh
# deps.sh PACKAGE... - install the Debian packages that are missing (as root, or through sudo).
# Used by `make demo` and `make check` so that both work on a fresh Debian 12 machine.
set -e
missing=""
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "mailshot: installing Debian packages:$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null || $SUDO apt-get update
# postfix asks questions and would start a mail daemon: preseed "No configuration" first
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections 2>/dev/null || true
# dovecot's packages would start the system's IMAP/POP3 server (PAM logins on every interface), and
# redis-server's a system Redis; the tests run their own: no service starts during this install
# (policy-rc.d, unless one is there already)
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get install -y -q --no-install-recommends $missing
