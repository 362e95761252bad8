/* smtp.h - the SMTP client session: one connection to one server, as a state machine driven by
 * the event loop (OpenSMTPD's mta_session in spirit).
 *
 * A session connects, reads the greeting, says EHLO (HELO when EHLO is refused), upgrades with
 * STARTTLS or starts with TLS, authenticates, and then carries transactions one after the other
 * on the same connection.  Every operation ends with exactly one call of its done callback; the
 * outcome is in smtp_conn_result().  Every wait is bounded by the configured timeout. */
#ifndef MAILSHOT_SMTP_H
#define MAILSHOT_SMTP_H
#include <stdio.h>
#include <openssl/ssl.h>
#include "loop.h"
#include "smtp_proto.h"

typedef enum {
  SMTP_TLS_NONE,          /* plaintext only */
  SMTP_TLS_STARTTLS,      /* RFC 3207: upgrade, and fail if the server does not offer it */
  SMTP_TLS_IMPLICIT,      /* RFC 8314: TLS from the first byte */
  SMTP_TLS_OPPORTUNISTIC  /* STARTTLS when offered, plaintext otherwise (direct delivery) */
} smtp_tls_mode;

struct dns_resolver;

/* What a session needs to know; owned by the caller (a relay) and outliving its sessions. */
typedef struct smtp_config {
  char host[256];          /* name or address literal: for TLS name checks and SNI */
  char port[8];
  char connect_addr[64];   /* when set, connect here instead of resolving host */
  /* resolves a host (or connect_addr) that is a name, on the loop (/etc/hosts, then DNS);
   * NULL when it is an IP address.  Outlives the sessions. */
  struct dns_resolver *resolver;
  char source[64];         /* local address to bind, or "" */
  smtp_tls_mode tls;
  int verify;              /* check certificate chain and name */
  SSL_CTX *ssl_ctx;        /* made from verify + ca_file by the owner */
  char *user, *password;   /* AUTH when user is set; password is wiped on free by the owner */
  int allow_plaintext_auth;
  char helo[256];          /* our name for EHLO/HELO */
  int timeout_ms;          /* every single wait: connect, handshake, each reply, from the wait's start */
  /* per-stage overrides (0: timeout_ms), after RFC 5321 §4.5.3.2's list of waits */
  int timeout_connect_ms, timeout_greeting_ms, timeout_command_ms, timeout_data_end_ms;
  int idle_timeout_ms;     /* an idle session is QUIT after this long (0: kept) */
  int max_messages;        /* QUIT a session after this many messages (0: no limit) */
  int pipeline_depth;      /* messages a PIPELINING session carries at once (0-4) */
  FILE *trace;             /* dialogue log (AUTH masked), or NULL */
} smtp_config;

/* Per-recipient outcome of RCPT TO. */
typedef struct {
  char *address;
  int code;
  char enhanced[16];
  char *text;
} smtp_rcpt;

/* What went wrong, set where it went wrong (as OpenSMTPD's mta says TEMPFAIL/PERMFAIL): never guessed
 * afterwards from the words of a message.  smtp_error_name() gives the word Lua sees (result.error). */
typedef enum {
  SMTP_ERR_NONE,           /* no failure */
  SMTP_ERR_INVALID,        /* "invalid": a bad envelope, refused before any network */
  SMTP_ERR_DNS,            /* "dns": the server's name did not resolve */
  SMTP_ERR_CONNECT,        /* "connect": no connection to any of its addresses (refused, unreachable) */
  SMTP_ERR_TIMEOUT,        /* "timeout": a wait (connect, handshake, a reply) ran out */
  SMTP_ERR_CLOSED,         /* "closed": the connection was closed or broke in the middle of the dialogue */
  SMTP_ERR_TLS,            /* "tls": the TLS handshake failed, the certificate aside */
  SMTP_ERR_CERT,           /* "cert": the server's certificate did not verify (chain or name) */
  SMTP_ERR_PROTOCOL,       /* "protocol": the server broke the protocol (a malformed or unexpected reply) */
  SMTP_ERR_TEMPFAIL,       /* "tempfail": the server answered 4xx (or a reply of no known class) */
  SMTP_ERR_PERMFAIL,       /* "permfail": the server answered 5xx */
  SMTP_ERR_AUTH,           /* "auth": the relay refused our login for good earlier (l_smtp.c: defer) */
  SMTP_ERR_LOCAL,          /* "local": we refused to go on: no STARTTLS, no AUTH in common, the password
                              in plaintext, a message over SIZE, 8-bit or UTF-8 the server cannot take */
  SMTP_ERR_INTERNAL        /* "internal": out of memory, or the event loop refused a watch */
} smtp_error;

const char *smtp_error_name(smtp_error e);   /* "timeout", ...; NULL for SMTP_ERR_NONE */
int smtp_error_temporary(smtp_error e);      /* worth retrying later: network, timeout, 4xx, ... */

typedef struct smtp_result {
  int ok;                  /* the operation succeeded */
  smtp_error error;        /* when not ok: what kind of failure (temporary follows from it) */
  int temporary;           /* a failure worth retrying later (4xx, network, timeout) */
  int code;                /* the server's reply code, 0 when no reply (network, timeout) */
  char enhanced[16];
  const char *stage;       /* "connect","tls","greeting","ehlo","helo","starttls","auth","mail",
                              "rcpt","data","message","rset","quit" */
  char message[SMTP_REPLY_TEXT_MAX];
  int accepted;            /* recipients accepted */
  int defer;               /* set by the relay (l_smtp.c): not worth retrying within this run (a
                              refused login), left to --resume */
} smtp_result;

/* An empty result (what memset 0 gives), without writing its text buffer: 4 KB zeroed two or three
 * times per message was a few percent of a message's CPU. */
void smtp_result_clear(smtp_result *r);

typedef struct smtp_conn smtp_conn;
typedef struct smtp_txn smtp_txn;
typedef void smtp_done_fn(smtp_conn *c, void *ud);
/* A transaction's end: exactly once per smtp_conn_send.  The txn stays the caller's. */
typedef void smtp_txn_fn(smtp_conn *c, smtp_txn *t, void *ud);

/* One message: envelope and the DATA bytes already dot-stuffed (smtp_txn_new does that). */
struct smtp_txn {
  char *from;
  smtp_rcpt *rcpt;
  int nrcpt;
  bytebuf data;           /* CRLF, dot-stuffed, ends with ".\r\n" */
  size_t size;             /* size of the message as given (for SIZE=) */
  int eightbit, utf8;      /* body has 8-bit bytes (set by the caller: 0 from smtp_txn_new) /
                              envelope has non-ASCII */
  /* filled in by the session: */
  int phase, mail_ok, rcpt_replied, body_abort;
  smtp_txn_fn *fn;
  void *ud;
  smtp_result res;         /* the outcome, valid in the callback.  Last: smtp_txn_new zeroes the fields
                              before it and only clears this one (smtp_result_clear), not its 4 KB */
};

/* Build a transaction: addresses are checked against injection here, before any network.
 * Returns NULL for a bad envelope (SMTP_ERR_INVALID at stage "mail" or "rcpt") or out of memory, with
 * the failure in *why. */
smtp_txn *smtp_txn_new(const char *from, const char *const *to, int nto, const char *msg, size_t len,
                       smtp_result *why);
void smtp_txn_free(smtp_txn *t);

smtp_conn *smtp_conn_new(loop *lp, const smtp_config *cfg);
/* Abrupt close (no QUIT).  Safe to call from inside a done callback: freeing is deferred. */
void smtp_conn_free(smtp_conn *c);

/* Connect up to the point where MAIL may be sent (greeting, EHLO, TLS, AUTH). */
int  smtp_conn_open(smtp_conn *c, smtp_done_fn *fn, void *ud);
/* Give the session one transaction; it opens first if new.  With PIPELINING a second one may
 * be given while the first is in flight (smtp_conn_can_take): its MAIL, RCPT and DATA go out
 * in the same write as the first one's message and final dot (RFC 2920 §3.1).  Returns -1
 * when the session cannot take it. */
int  smtp_conn_send(smtp_conn *c, smtp_txn *txn, smtp_txn_fn *fn, void *ud);
int  smtp_conn_can_take(const smtp_conn *c);  /* send() would be accepted now */
/* Polite end: QUIT, wait (bounded) for the reply, close. */
int  smtp_conn_quit(smtp_conn *c, smtp_done_fn *fn, void *ud);

int  smtp_conn_ready(const smtp_conn *c);    /* open, idle (no transaction), and reusable */
int  smtp_conn_dead(const smtp_conn *c);     /* closed or failed: free it */
const smtp_result *smtp_conn_result(const smtp_conn *c);

/* What the session learnt, for `mailshot check` and the logs. */
typedef struct smtp_info {
  const char *greeting;    /* text of the 220 greeting */
  const smtp_caps *caps;
  int ehlo;                /* 1 = EHLO, 0 = fell back to HELO */
  const char *ehlo_text;   /* the EHLO reply as received */
  int tls;                 /* TLS came up (even if the session failed later) */
  int tls_verified;
  char tls_version[32], tls_cipher[96], tls_subject[512];
  int authenticated;
  const char *auth_mech;   /* the mechanism AUTH was sent with; NULL: AUTH was never sent */
  char peer[64];           /* address connected to */
  int messages;            /* transactions completed on this connection */
} smtp_info;
void smtp_conn_info(smtp_conn *c, smtp_info *info);

#endif
