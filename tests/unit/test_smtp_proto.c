/* test_smtp_proto.c - the pure SMTP helpers: reply parsing, EHLO capabilities, address checks,
 * dot-stuffing and base64. Each test is named by the behaviour it proves. */
#include "check.h"
#include "smtp_proto.h"

#include <stdlib.h>
#include <time.h>

static smtp_reply R;            /* 4 KB: keep it off the test's stack frames */
static char ERR[256];

/* Parses s (a C string) in one go. */
static int
parse(const char *s, int enhanced)
{
  return smtp_reply_parse(s, strlen(s), enhanced, &R, ERR, sizeof(ERR));
}

/* ---------------------------------------------------------------- replies */

static void
test_single_line_reply_gives_code_and_text(void)
{
  const char *s = "220 mx.example.org ESMTP Postfix\r\n";
  CHECK_INT(parse(s, 0), (long long)strlen(s));
  CHECK_INT(R.code, 220);
  CHECK_STR(R.text, "mx.example.org ESMTP Postfix");
  CHECK_STR(R.enhanced, "");
  CHECK_INT(R.nlines, 1);
  CHECK_INT(R.truncated, 0);
}

static void
test_multi_line_reply_counts_lines_and_joins_text(void)
{
  const char *s = "250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
  CHECK_INT(parse(s, 0), (long long)strlen(s));
  CHECK_INT(R.code, 250);
  CHECK_INT(R.nlines, 3);
  CHECK_STR(R.text, "mx.example.org\nPIPELINING\n8BITMIME");
}

static void
test_code_without_text_is_valid(void)
{
  CHECK_INT(parse("250\r\n", 0), 5);
  CHECK_INT(R.code, 250);
  CHECK_STR(R.text, "");
  CHECK_INT(parse("250 \r\n", 0), 6);
  CHECK_STR(R.text, "");
  CHECK_INT(parse("250-\r\n250-x\r\n250\r\n", 0), 18);
  CHECK_INT(R.nlines, 3);
  CHECK_STR(R.text, "\nx\n");
}

/* Every prefix of a complete reply must say "need more", never an error, never a reply. */
static void
test_reply_split_at_every_point_needs_more_until_complete(void)
{
  const char *cases[] = {
    "250 ok\r\n",
    "250-mx.example.org\r\n250-SIZE 1000\r\n250 2.0.0 ok\r\n",
    "550-5.1.1 first\n550 5.1.1 second\n",
    "354\r\n",
  };
  for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
    size_t len = strlen(cases[c]);
    int bad = 0;
    for (size_t i = 0; i < len; i++)
      if (smtp_reply_parse(cases[c], i, 1, &R, ERR, sizeof(ERR)) != 0) {
        fprintf(stderr, "case %zu split at %zu: %s\n", c, i, ERR);
        bad++;
      }
    CHECK_INT(bad, 0);
    CHECK_INT(smtp_reply_parse(cases[c], len, 1, &R, ERR, sizeof(ERR)), (long long)len);
  }
}

static void
test_pipelined_replies_parse_one_after_another(void)
{
  /* RFC 2920 §3.1: MAIL, RCPT, RCPT, DATA answered in one segment */
  const char *s = "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <x@y>: Recipient address rejected\r\n"
                  "354 End data with <CR><LF>.<CR><LF>\r\n";
  const int want_code[] = { 250, 250, 550, 354 };
  const char *want_text[] = { "Ok", "Ok", "<x@y>: Recipient address rejected",
                              "End data with <CR><LF>.<CR><LF>" };
  size_t off = 0, len = strlen(s);
  for (int i = 0; i < 4; i++) {
    int n = smtp_reply_parse(s + off, len - off, 1, &R, ERR, sizeof(ERR));
    CHECK(n > 0);
    if (n <= 0)
      return;
    CHECK_INT(R.code, want_code[i]);
    CHECK_STR(R.text, want_text[i]);
    off += (size_t)n;
  }
  CHECK_INT(off, len);
  CHECK_INT(smtp_reply_parse(s + off, 0, 1, &R, ERR, sizeof(ERR)), 0);
}

static void
test_pipelined_buffer_with_partial_second_reply(void)
{
  const char *s = "250 ok\r\n250-a\r\n25";
  CHECK_INT(parse(s, 0), 8);
  CHECK_INT(smtp_reply_parse(s + 8, strlen(s) - 8, 0, &R, ERR, sizeof(ERR)), 0);
}

static void
test_bare_lf_line_endings_are_accepted(void)
{
  const char *s = "250-one\n250-two\r\n250 three\n";
  CHECK_INT(parse(s, 0), (long long)strlen(s));
  CHECK_STR(R.text, "one\ntwo\nthree");
  CHECK_INT(R.nlines, 3);
}

static void
test_enhanced_code_is_split_from_text(void)
{
  CHECK(parse("550 5.1.1 User unknown\r\n", 1) > 0);
  CHECK_INT(R.code, 550);
  CHECK_STR(R.enhanced, "5.1.1");
  CHECK_STR(R.text, "User unknown");
  /* recognised without the advertisement too when its class matches the code (RFC 2034 §5) */
  CHECK(parse("550 5.1.1 User unknown\r\n", 0) > 0);
  CHECK_STR(R.enhanced, "5.1.1");
  CHECK_STR(R.text, "User unknown");
  /* three-digit subject and detail, nothing after it, several spaces after it */
  CHECK(parse("452 4.123.456\r\n", 1) > 0);
  CHECK_STR(R.enhanced, "4.123.456");
  CHECK_STR(R.text, "");
  CHECK(parse("250 2.0.0   spaced\r\n", 1) > 0);
  CHECK_STR(R.text, "spaced");
}

static void
test_enhanced_code_stripped_from_every_line(void)
{
  const char *s = "551-5.7.1 Forwarding to remote hosts disabled\r\n551 5.7.1 Select another host\r\n";
  CHECK(parse(s, 1) > 0);
  CHECK_STR(R.enhanced, "5.7.1");
  CHECK_STR(R.text, "Forwarding to remote hosts disabled\nSelect another host");
}

static void
test_enhanced_code_ignored_when_malformed_or_class_mismatched(void)
{
  const char *malformed[] = { "250 2.0 ok\r\n", "250 2.0.0.ok\r\n", "250 2.1234.0 ok\r\n", "250 2..0 ok\r\n",
                              "250 3.0.0 ok\r\n", "250 2.0.0x ok\r\n", "250 2.0.\r\n", "250 .2.0.0 ok\r\n" };
  for (size_t i = 0; i < sizeof(malformed) / sizeof(malformed[0]); i++) {
    const char *s = malformed[i];
    CHECK(parse(s, 1) > 0);
    CHECK_STR(R.enhanced, "");
    CHECK_INT(strncmp(R.text, s + 4, strlen(s) - 6), 0);    /* text left whole */
  }
  /* class differs from the code's first digit: ignored without the advertisement */
  CHECK(parse("250 4.0.0 ok\r\n", 0) > 0);
  CHECK_STR(R.enhanced, "");
  CHECK_STR(R.text, "4.0.0 ok");
  /* with it, kept for the logs, but the basic code still decides the class */
  CHECK(parse("550 4.2.2 Mailbox full\r\n", 1) > 0);
  CHECK_STR(R.enhanced, "4.2.2");
  CHECK_STR(R.text, "Mailbox full");
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_PERMANENT);
}

static void
test_auth_challenge_text_is_left_alone(void)
{
  /* RFC 4954 §4: a 334 carries base64, which has no '.', so nothing can look like an enhanced code */
  CHECK(parse("334 VXNlcm5hbWU6\r\n", 1) > 0);
  CHECK_INT(R.code, 334);
  CHECK_STR(R.text, "VXNlcm5hbWU6");
  CHECK_STR(R.enhanced, "");
}

static void
test_garbage_is_a_protocol_error(void)
{
  const char *bad[] = { "hello\r\n", "99 x\r\n", "2500 x\r\n", "250x\r\n", "25\r\n", "\r\n", "\n",
                        "150 preliminary\r\n", "650 x\r\n", "2a0 x\r\n", "250\tx\r\n", "250\rx\r\n",
                        " 250 x\r\n" };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    ERR[0] = '\0';
    int n = parse(bad[i], 0);
    if (n >= 0)
      fprintf(stderr, "accepted garbage #%zu\n", i);
    CHECK(n < 0);
    CHECK(ERR[0] != '\0');
  }
}

static void
test_garbage_is_reported_before_the_line_ends(void)
{
  /* no need to wait for (or buffer) the rest of a line that cannot be a reply */
  CHECK(parse("99 x", 0) < 0);
  CHECK(parse("2500", 0) < 0);
  CHECK(parse("h", 0) < 0);
  CHECK(parse("250-ok\r\n251", 0) < 0);
  /* but a plausible start is only "need more" */
  CHECK_INT(parse("2", 0), 0);
  CHECK_INT(parse("250", 0), 0);
  CHECK_INT(parse("250\r", 0), 0);
}

static void
test_mismatched_codes_in_multi_line_reply_is_an_error(void)
{
  CHECK(parse("250-first\r\n251 second\r\n", 0) < 0);
  CHECK(strstr(ERR, "different codes") != NULL);
  CHECK(parse("250-first\r\n550 second\r\n", 0) < 0);
}

static char *
make_line(const char *prefix, size_t textlen, const char *eol)
{
  size_t pl = strlen(prefix), el = strlen(eol);
  char *s = malloc(pl + textlen + el + 1);
  if (!s)
    abort();
  memcpy(s, prefix, pl);
  memset(s + pl, 'x', textlen);
  memcpy(s + pl + textlen, eol, el + 1);
  return s;
}

static void
test_long_but_legal_line_is_fine_longer_is_an_error(void)
{
  /* SMTP_LINE_MAX octets of line, CRLF not counted */
  char *ok = make_line("250 ", SMTP_LINE_MAX - 4, "\r\n");
  char *okl = make_line("250 ", SMTP_LINE_MAX - 4, "\n");
  char *bad = make_line("250 ", SMTP_LINE_MAX - 3, "\r\n");
  char *partial = make_line("250 ", SMTP_LINE_MAX, "");
  CHECK_INT(parse(ok, 0), SMTP_LINE_MAX + 2);
  CHECK_INT(R.truncated, 1);
  CHECK_INT(strlen(R.text), SMTP_REPLY_TEXT_MAX - 1);
  CHECK_INT(parse(okl, 0), SMTP_LINE_MAX + 1);
  CHECK(parse(bad, 0) < 0);
  CHECK(strstr(ERR, "4.5.3.1.5") != NULL);
  /* too long already before its LF arrives: the caller need not buffer more */
  CHECK(parse(partial, 0) < 0);
  /* exactly at the limit and waiting for "\n" after "\r": still fine */
  ok[SMTP_LINE_MAX + 1] = '\0';
  CHECK_INT(parse(ok, 0), 0);
  free(ok);
  free(okl);
  free(bad);
  free(partial);
}

static void
test_text_truncation_at_text_max_does_not_overflow(void)
{
  bytebuf b = { 0 };
  int ok = 1;
  for (int i = 0; i < 20 && ok; i++)
    ok = bytebuf_printf(&b, "250%c%0500d\r\n", i == 19 ? ' ' : '-', i) == 0;
  CHECK(ok);
  CHECK_INT(smtp_reply_parse(b.data, b.len, 0, &R, ERR, sizeof(ERR)), (long long)b.len);
  CHECK_INT(R.nlines, 20);
  CHECK_INT(R.truncated, 1);
  CHECK_INT(strlen(R.text), SMTP_REPLY_TEXT_MAX - 1);
  /* exactly filling the text: not truncated */
  bytebuf_free(&b);
  ok = bytebuf_printf(&b, "250-%0*d\r\n250 %0*d\r\n", 2047, 0, 2047, 1) == 0;
  CHECK(ok);
  CHECK(smtp_reply_parse(b.data, b.len, 0, &R, ERR, sizeof(ERR)) > 0);
  CHECK_INT(strlen(R.text), SMTP_REPLY_TEXT_MAX - 1);
  CHECK_INT(R.truncated, 0);
  bytebuf_free(&b);
}

static void
test_control_bytes_in_text_are_neutralised(void)
{
  const char s[] = "550 bad\x1b[31m\0x\ttab\r\n";
  CHECK_INT(smtp_reply_parse(s, sizeof(s) - 1, 0, &R, ERR, sizeof(ERR)), (long long)sizeof(s) - 1);
  CHECK_STR(R.text, "bad?[31m?x\ttab");
}

static void
test_too_many_lines_is_an_error(void)
{
  bytebuf b = { 0 };
  int ok = 1;
  for (int i = 0; i < SMTP_REPLY_LINES_MAX - 1 && ok; i++)
    ok = bytebuf_append(&b, "250-\r\n", 6) == 0;
  ok = ok && bytebuf_append(&b, "250 \r\n", 6) == 0;
  CHECK(ok);
  CHECK_INT(smtp_reply_parse(b.data, b.len, 0, &R, ERR, sizeof(ERR)), (long long)b.len);
  CHECK_INT(R.nlines, SMTP_REPLY_LINES_MAX);
  b.data[b.len - 3] = '-';      /* the 1000th line now continues */
  ok = bytebuf_append(&b, "250 \r\n", 6) == 0;
  CHECK(ok);
  CHECK(smtp_reply_parse(b.data, b.len, 0, &R, ERR, sizeof(ERR)) < 0);
  CHECK(strstr(ERR, "1000 lines") != NULL);
  bytebuf_free(&b);
}

static void
test_reply_over_byte_bound_is_an_error(void)
{
  bytebuf b = { 0 };
  int ok = 1;
  while (ok && b.len <= SMTP_REPLY_BYTES_MAX)
    ok = bytebuf_printf(&b, "250-%0500d\r\n", 0) == 0;
  CHECK(ok);
  CHECK(smtp_reply_parse(b.data, b.len, 0, &R, ERR, sizeof(ERR)) < 0);
  CHECK(strstr(ERR, "65536") != NULL);
  bytebuf_free(&b);
}

static void
test_error_buffer_may_be_null_or_tiny(void)
{
  char tiny[4];
  CHECK(smtp_reply_parse("xx\r\n", 4, 0, &R, NULL, 0) < 0);
  CHECK(smtp_reply_parse("xx\r\n", 4, 0, &R, tiny, sizeof(tiny)) < 0);
  CHECK_INT(strlen(tiny), 3);
}

static void
test_classification_follows_first_digit(void)
{
  smtp_reply r = { 0 };
  CHECK(parse("250 2.0.0 ok\r\n", 1) > 0);
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_OK);
  CHECK(parse("354 go ahead\r\n", 1) > 0);
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_OK);
  CHECK(parse("334 \r\n", 1) > 0);
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_OK);
  CHECK(parse("421 4.7.0 Try again later, closing connection\r\n", 1) > 0);
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_TEMPORARY);
  CHECK(parse("451 local error\r\n", 0) > 0);
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_TEMPORARY);
  CHECK(parse("550 5.1.1 User unknown\r\n", 1) > 0);
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_PERMANENT);
  CHECK(parse("554 Transaction failed\r\n", 0) > 0);
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_PERMANENT);
  CHECK(parse("450 5.7.1 inconsistent\r\n", 1) > 0);   /* basic code wins */
  CHECK_INT(smtp_reply_class(&R), SMTP_CLASS_TEMPORARY);
  CHECK_INT(smtp_reply_class(&r), SMTP_CLASS_TEMPORARY);    /* nothing parsed */
  CHECK_INT(smtp_reply_class(NULL), SMTP_CLASS_TEMPORARY);
}

/* ---------------------------------------------------------------- capabilities */

static void
caps_of(const char *ehlo, smtp_caps *c)
{
  smtp_caps raw;
  int n = parse(ehlo, 0);
  CHECK_INT(n, (long long)strlen(ehlo));
  smtp_caps_parse(&R, c);
  /* the session parses the raw bytes: on a reply that fits the text, both must agree */
  smtp_caps_parse_raw(ehlo, strlen(ehlo), &raw);
  CHECK(memcmp(&raw, c, sizeof raw) == 0);
}

static void
test_caps_from_postfix_ehlo(void)
{
  smtp_caps c;
  caps_of("250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
          "250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n"
          "250 CHUNKING\r\n", &c);
  CHECK(c.pipelining && c.starttls && c.eightbitmime && c.enhancedstatuscodes && c.smtputf8
        && c.size_present);
  CHECK_INT(c.size, 10240000);
  CHECK(!c.auth_plain && !c.auth_login);
  CHECK_STR(c.auth, "");
  CHECK_STR(c.names, "PIPELINING SIZE 10240000 VRFY ETRN STARTTLS ENHANCEDSTATUSCODES 8BITMIME DSN "
                     "SMTPUTF8 CHUNKING");
}

static void
test_caps_from_gmail_ehlo(void)
{
  smtp_caps c;
  caps_of("250-smtp.gmail.com at your service, [203.0.113.5]\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n"
          "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n"
          "250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n", &c);
  CHECK(c.size_present);
  CHECK_INT(c.size, 35882577);
  CHECK(c.auth_login && c.auth_plain);
  CHECK_STR(c.auth, "LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH");
  CHECK(c.eightbitmime && c.enhancedstatuscodes && c.pipelining && c.smtputf8);
  CHECK(!c.starttls);
}

static void
test_caps_from_exchange_ehlo_merges_both_auth_forms(void)
{
  smtp_caps c;
  caps_of("250-EXCH01.contoso.com Hello [10.1.2.3]\r\n250-SIZE 37748736\r\n250-PIPELINING\r\n250-DSN\r\n"
          "250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250-X-ANONYMOUSTLS\r\n250-AUTH NTLM LOGIN\r\n"
          "250-AUTH=LOGIN\r\n250-X-EXPS GSSAPI NTLM\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n"
          "250 XRDST\r\n", &c);
  CHECK_INT(c.size, 37748736);
  CHECK(c.auth_login && !c.auth_plain);
  CHECK_STR(c.auth, "NTLM LOGIN");          /* AUTH=LOGIN adds nothing new */
  CHECK(c.starttls && c.eightbitmime && c.pipelining);
  CHECK(strstr(c.names, "AUTH=LOGIN X-EXPS GSSAPI NTLM") != NULL);
}

static void
test_caps_old_auth_equals_form_alone(void)
{
  smtp_caps c;
  caps_of("250-old.example\r\n250-AUTH=LOGIN PLAIN\r\n250 HELP\r\n", &c);
  CHECK(c.auth_login && c.auth_plain);
  CHECK_STR(c.auth, "LOGIN PLAIN");
}

static void
test_caps_keywords_are_case_insensitive(void)
{
  smtp_caps c;
  caps_of("250-mx.example\r\n250-pipelining\r\n250-Size 1000\r\n250-starttls\r\n250-8bitmime\r\n"
          "250-auth plain login cram-md5\r\n250-auth=Plain\r\n250 smtputf8\r\n", &c);
  CHECK(c.pipelining && c.starttls && c.eightbitmime && c.smtputf8 && c.size_present);
  CHECK_INT(c.size, 1000);
  CHECK(c.auth_plain && c.auth_login);
  CHECK_STR(c.auth, "plain login cram-md5");
}

static void
test_caps_edge_cases(void)
{
  smtp_caps c;
  /* greeting line only: no capabilities, the domain is not a keyword */
  caps_of("250 PIPELINING.example.org\r\n", &c);
  CHECK(!c.pipelining);
  CHECK_STR(c.names, "");
  /* SIZE without a value or with junk: present, no limit given */
  caps_of("250-x\r\n250 SIZE\r\n", &c);
  CHECK(c.size_present);
  CHECK_INT(c.size, 0);
  caps_of("250-x\r\n250 SIZE 12abc\r\n", &c);
  CHECK(c.size_present);
  CHECK_INT(c.size, 0);
  /* SIZE beyond 64 bits saturates */
  caps_of("250-x\r\n250 SIZE 999999999999999999999999\r\n", &c);
  CHECK(c.size == ~0ULL);
  /* a keyword that merely starts like a known one is not it */
  caps_of("250-x\r\n250-STARTTLSX\r\n250-PIPELININGS\r\n250 SIZEX 5\r\n", &c);
  CHECK(!c.starttls && !c.pipelining && !c.size_present);
  /* enhanced codes on EHLO lines (some servers) are stripped before the keywords are read */
  caps_of("250-2.0.0 mx\r\n250-2.0.0 PIPELINING\r\n250 2.0.0 STARTTLS\r\n", &c);
  CHECK(c.pipelining && c.starttls);
  /* NULL reply: all zero */
  smtp_caps_parse(NULL, &c);
  CHECK(!c.pipelining && c.names[0] == '\0');
}

/* Issue 10 item 8: a 7 KB EHLO reply (padding lines first, as some appliances send) overflows the
 * 4 KB reply text; the capabilities after the cut must not be lost. */
static void
test_caps_from_ehlo_longer_than_the_reply_text(void)
{
  bytebuf b = { 0 };
  smtp_caps c;
  int ok = bytebuf_printf(&b, "250-big.example.org Hello\r\n") == 0;
  for (int i = 0; i < 100 && ok; i++)
    ok = bytebuf_printf(&b, "250-X-PADDING-%03d %060d\r\n", i, i) == 0;
  ok = ok && bytebuf_printf(&b, "250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-SIZE 1000\r\n250 8BITMIME\r\n") == 0;
  CHECK(ok);
  CHECK(b.len > 6000 && b.len < 9000);
  CHECK_INT(smtp_reply_parse(b.data, b.len, 0, &R, ERR, sizeof(ERR)), (long long)b.len);
  CHECK_INT(R.truncated, 1);                                   /* the text lost the tail... */
  CHECK_INT(R.nlines, 105);
  smtp_caps_parse_raw(b.data, b.len, &c);                      /* ...the capabilities do not */
  CHECK(c.starttls && c.auth_plain && c.auth_login && c.eightbitmime && c.size_present);
  CHECK_INT(c.size, 1000);
  CHECK_STR(c.auth, "PLAIN LOGIN");
  CHECK(strncmp(c.names, "X-PADDING-000 ", 14) == 0);
  /* a control byte in a keyword line is made safe, as in the reply text */
  {
    const char *esc = "250-x\r\n250-STARTTLS\r\n250 X-\033[2J\r\n";
    smtp_caps_parse_raw(esc, strlen(esc), &c);
  }
  CHECK(c.starttls);
  CHECK_STR(c.names, "STARTTLS X-?[2J");
  bytebuf_free(&b);
}

static void
test_caps_long_lists_keep_whole_words(void)
{
  bytebuf b = { 0 };
  smtp_caps c;
  int ok = bytebuf_printf(&b, "250-x\r\n250-AUTH") == 0;
  for (int i = 0; i < 60 && ok; i++)
    ok = bytebuf_printf(&b, " MECHANISM-%02d", i) == 0;
  ok = ok && bytebuf_printf(&b, " PLAIN\r\n") == 0;
  for (int i = 0; i < 100 && ok; i++)
    ok = bytebuf_printf(&b, "250-X-KEYWORD-%03d\r\n", i) == 0;
  ok = ok && bytebuf_printf(&b, "250 STARTTLS\r\n") == 0;
  CHECK(ok);
  CHECK(smtp_reply_parse(b.data, b.len, 0, &R, ERR, sizeof(ERR)) > 0);
  smtp_caps_parse(&R, &c);
  CHECK(c.auth_plain && c.starttls);
  CHECK(strlen(c.auth) < sizeof(c.auth));
  CHECK(strlen(c.auth) >= sizeof(c.auth) - 14);              /* filled up to the last whole word */
  CHECK(c.auth[strlen(c.auth) - 1] != ' ');
  CHECK(strstr(c.auth, "MECHANISM-00 MECHANISM-01") == c.auth);
  CHECK(strlen(c.names) < sizeof(c.names));
  bytebuf_free(&b);
}

/* ---------------------------------------------------------------- addresses */

static int
addr(const char *a, int allow_empty)
{
  return smtp_addr_ok(a, strlen(a), allow_empty, ERR, sizeof(ERR));
}

static void
test_addr_ok_accepts_good_addresses(void)
{
  const char *good[] = { "a@b.example", "first.last+tag@sub.example.co.uk", "\"a b\"@c.example",
                         "\"a\\\"b\"@c.example", "\"x@y\"@c.example", "user@[192.0.2.1]",
                         "user@[IPv6:2001:db8::1]", "o'brien@example.ie", "x_y-z=1@mx-1.example",
                         "j\xc3\xbcrgen@m\xc3\xbcller.example", "postmaster@localhost" };
  for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
    int ok = addr(good[i], 0);
    if (!ok)
      fprintf(stderr, "rejected good address %s: %s\n", good[i], ERR);
    CHECK(ok);
  }
  CHECK_INT(addr("", 1), 1);                /* MAIL FROM:<> */
}

static void
test_addr_ok_rejects_injection_and_malformed(void)
{
  const char *bad[] = { "a@b@c", "x\r\nRCPT TO:<y>@z", "<a>@b", "a b@c", "", "ab", "@b.example", "a@",
                        "a@b..c", "a@.b", "a@b.", "\"a\r\nb\"@c", "\"a>\"@b", "a\t@b", "a@b c",
                        "\"unterminated@b", "\"a\"b@c", "a@[1.2.3.4", "a@b\x7f", "a(b)@c", "a@b\nc",
                        "a\rb@c", "a@b>" };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    ERR[0] = '\0';
    int ok = addr(bad[i], 0);
    if (ok)
      fprintf(stderr, "accepted bad address #%zu\n", i);
    CHECK_INT(ok, 0);
    CHECK(ERR[0] != '\0');
  }
  CHECK_INT(smtp_addr_ok("a\0b@c", 5, 0, ERR, sizeof(ERR)), 0);     /* NUL inside */
  CHECK_STR(ERR, "NUL in address");
  CHECK_INT(addr("x\r\nRCPT TO:<y>@z", 1), 0);
  CHECK_STR(ERR, "CR or LF in address");
}

static void
test_addr_ok_length_limits(void)
{
  char a[400];
  /* local part: 64 fine, 65 not (RFC 5321 §4.5.3.1.1) */
  memset(a, 'l', 64);
  strcpy(a + 64, "@example.org");
  CHECK_INT(addr(a, 0), 1);
  memset(a, 'l', 65);
  strcpy(a + 65, "@example.org");
  CHECK_INT(addr(a, 0), 0);
  CHECK(strstr(ERR, "local part") != NULL);
  /* path: 254 octets inside the brackets fine, 255 not (§4.5.3.1.3) */
  memset(a, 'd', sizeof(a));
  a[0] = 'u';
  a[1] = '@';
  for (size_t i = 2; i < 254; i += 50)
    a[i] = '.', a[i + 1] = 'd';
  a[2] = 'd';
  a[254] = '\0';
  CHECK_INT(addr(a, 0), 1);
  a[254] = 'd';
  a[255] = '\0';
  CHECK_INT(addr(a, 0), 0);
  CHECK(strstr(ERR, "4.5.3.1.3") != NULL);
}

/* ---------------------------------------------------------------- DATA */

static void
stuff_is(const char *in, size_t inlen, const char *want, size_t wantlen, int line)
{
  bytebuf b = { 0 };
  int ok = smtp_dot_stuff(&b, in, inlen) == 0;
  check_count++;
  if (!ok || b.len != wantlen || memcmp(b.data, want, wantlen) != 0) {
    check_failures++;
    fprintf(stderr, "%s:%d: FAIL: dot-stuffing gave %zu bytes \"", __FILE__, line, b.len);
    for (size_t i = 0; i < b.len; i++)
      fprintf(stderr, b.data[i] == '\r' ? "\\r" : b.data[i] == '\n' ? "\\n" : "%c", b.data[i]);
    fprintf(stderr, "\"\n");
  }
  bytebuf_free(&b);
}
#define STUFF(in, want) stuff_is(in, sizeof(in) - 1, want, sizeof(want) - 1, __LINE__)

static void
test_dot_stuffing_cases(void)
{
  STUFF(".hello\r\n", "..hello\r\n.\r\n");                    /* RFC 5321 §4.5.2 */
  STUFF(".", "..\r\n.\r\n");                                  /* a lone dot */
  STUFF(".\r\n", "..\r\n.\r\n");
  STUFF("a\nb\n", "a\r\nb\r\n.\r\n");                         /* LF only */
  STUFF("a\rb\r", "a\r\nb\r\n.\r\n");                         /* CR only */
  STUFF("a\r\nb\nc\rd", "a\r\nb\r\nc\r\nd\r\n.\r\n");          /* mixed */
  STUFF("\r\r\n", "\r\n\r\n.\r\n");                          /* bare CR, then CRLF */
  STUFF("\n\r", "\r\n\r\n.\r\n");                            /* LF then CR: two line ends */
  STUFF("no newline", "no newline\r\n.\r\n");                 /* CRLF added before the dot */
  STUFF("", ".\r\n");                                         /* empty message */
  STUFF("\r\n", "\r\n.\r\n");
  STUFF(".\n..\n.x\nx.\n", "..\r\n...\r\n..x\r\nx.\r\n.\r\n");
  STUFF("a\r\n.\r\nMAIL FROM:<evil@x>\r\n", "a\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n");
  STUFF("a\n.\rb", "a\r\n..\r\nb\r\n.\r\n");                  /* "\n.\r" cannot end DATA either */
  STUFF("x\0y\n", "x\0y\r\n.\r\n");                           /* NUL passes through */
}

static void
test_dot_stuffing_appends_to_existing_content(void)
{
  bytebuf b = { 0 };
  CHECK_INT(bytebuf_append(&b, "HDR", 3), 0);
  CHECK_INT(smtp_dot_stuff(&b, ".x", 2), 0);
  CHECK_INT(b.len, 3 + 8);
  CHECK_STR(b.data, "HDR..x\r\n.\r\n");
  bytebuf_free(&b);
}

/* Independent byte-at-a-time model of the same transformation. */
static void
stuff_reference(bytebuf *out, const char *m, size_t n)
{
  int bol = 1;
  for (size_t i = 0; i < n; i++) {
    if (bol && m[i] == '.' && bytebuf_append(out, ".", 1) < 0)
      abort();
    bol = 0;
    if (m[i] == '\r' || m[i] == '\n') {
      if (m[i] == '\r' && i + 1 < n && m[i + 1] == '\n')
        i++;
      if (bytebuf_append(out, "\r\n", 2) < 0)
        abort();
      bol = 1;
    } else if (bytebuf_append(out, m + i, 1) < 0)
      abort();
  }
  if (!bol && bytebuf_append(out, "\r\n", 2) < 0)
    abort();
  if (bytebuf_append(out, ".\r\n", 3) < 0)
    abort();
}

/* 1 if the only "\r\n.\r\n" is the final one, and the data is all CRLF lines. */
static int
ends_data_only_at_end(const char *d, size_t n)
{
  for (size_t i = 0; i + 5 <= n; i++)
    if (memcmp(d + i, "\r\n.\r\n", 5) == 0 && i + 5 != n)
      return 0;
  for (size_t i = 0; i < n; i++)
    if ((d[i] == '\r') != (i + 1 < n && d[i + 1] == '\n') || (d[i] == '\n' && (i == 0 || d[i - 1] != '\r')))
      return 0;
  return n >= 3 && memcmp(d + n - 3, ".\r\n", 3) == 0;
}

static void
test_dot_stuffing_large_input_is_correct_and_fast(void)
{
  const size_t n = 1 << 20;
  const char alphabet[] = "..\r\n\n\rabcdefghij klmnopqrstuvwxyz";
  char *m = malloc(n);
  bytebuf got = { 0 }, want = { 0 };
  unsigned seed = 12345;
  struct timespec t0, t1;
  const int rounds = 20;
  double secs;

  if (!m)
    abort();
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1103515245u + 12345u;
    m[i] = alphabet[(seed >> 16) % (sizeof(alphabet) - 1)];
  }
  CHECK_INT(smtp_dot_stuff(&got, m, n), 0);
  stuff_reference(&want, m, n);
  CHECK_INT(got.len, want.len);
  CHECK(got.len == want.len && memcmp(got.data, want.data, got.len) == 0);
  CHECK(ends_data_only_at_end(got.data, got.len));

  /* realistic text (72-column LF lines) for the speed figure */
  for (size_t i = 0; i < n; i++)
    m[i] = i % 73 == 72 ? '\n' : i % 73 == 0 && i % 7 == 0 ? '.' : 'a' + (char)(i % 26);
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < rounds; i++) {
    got.len = 0;
    CHECK_INT(smtp_dot_stuff(&got, m, n), 0);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf("dot-stuffing: %d x 1 MiB of LF text in %.3f s = %.0f MB/s\n", rounds, secs,
         rounds * (double)n / 1e6 / (secs > 0 ? secs : 1e-9));
  want.len = 0;
  stuff_reference(&want, m, n);
  CHECK(got.len == want.len && memcmp(got.data, want.data, got.len) == 0);
  CHECK(ends_data_only_at_end(got.data, got.len));

  bytebuf_free(&got);
  bytebuf_free(&want);
  free(m);
}

static void
test_data_has_8bit(void)
{
  char big[100];
  memset(big, 'a', sizeof(big));
  CHECK_INT(smtp_data_has_8bit("", 0), 0);
  CHECK_INT(smtp_data_has_8bit(big, sizeof(big)), 0);
  for (size_t i = 0; i < sizeof(big); i++) {      /* every position, aligned or not */
    big[i] = (char)0x80;
    if (!smtp_data_has_8bit(big, sizeof(big)) || smtp_data_has_8bit(big, i))
      CHECK(0);
    big[i] = 'a';
  }
  CHECK_INT(smtp_data_has_8bit("caf\xc3\xa9", 5), 1);
  CHECK_INT(smtp_data_has_8bit("\x7f", 1), 0);
}

/* ---------------------------------------------------------------- buffers and base64 */

static void
test_buf_printf_grows(void)
{
  bytebuf b = { 0 };
  CHECK_INT(bytebuf_printf(&b, "%s", ""), 0);
  CHECK(b.data != NULL);
  CHECK_STR(b.data, "");
  CHECK_INT(bytebuf_printf(&b, "MAIL FROM:<%s> SIZE=%d\r\n", "a@b.example", 1234), 0);
  CHECK_STR(b.data, "MAIL FROM:<a@b.example> SIZE=1234\r\n");
  CHECK_INT(bytebuf_printf(&b, "%0300d", 7), 0);
  CHECK_INT(b.len, 35 + 300);
  CHECK_INT(b.data[b.len], 0);
  bytebuf_free(&b);
  CHECK(b.data == NULL && b.len == 0 && b.cap == 0);
  bytebuf_free(&b);            /* twice is harmless */
}

static void
test_base64_rfc4648_vectors(void)
{
  /* RFC 4648 §10 */
  const char *plain[] = { "", "f", "fo", "foo", "foob", "fooba", "foobar" };
  const char *enc[] = { "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy" };
  for (int i = 0; i < 7; i++) {
    bytebuf e = { 0 }, d = { 0 };
    CHECK_INT(bytebuf_base64_encode(&e, plain[i], strlen(plain[i])), 0);
    CHECK_STR(e.data, enc[i]);
    CHECK_INT(bytebuf_base64_decode(enc[i], strlen(enc[i]), &d), 0);
    CHECK_STR(d.data, plain[i]);
    CHECK_INT(d.len, strlen(plain[i]));
    bytebuf_free(&e);
    bytebuf_free(&d);
  }
}

static void
test_base64_auth_examples(void)
{
  bytebuf e = { 0 }, d = { 0 };
  /* AUTH PLAIN: authzid NUL authcid NUL passwd (RFC 4616 §2) */
  CHECK_INT(bytebuf_base64_encode(&e, "\0user\0pass", 10), 0);
  CHECK_STR(e.data, "AHVzZXIAcGFzcw==");
  /* AUTH LOGIN prompts */
  CHECK_INT(bytebuf_base64_decode("VXNlcm5hbWU6", 12, &d), 0);
  CHECK_STR(d.data, "Username:");
  d.len = 0;
  CHECK_INT(bytebuf_base64_decode("UGFzc3dvcmQ6", 12, &d), 0);
  CHECK_STR(d.data, "Password:");
  /* unpadded is accepted */
  d.len = 0;
  CHECK_INT(bytebuf_base64_decode("Zm9vYg", 6, &d), 0);
  CHECK_STR(d.data, "foob");
  bytebuf_free(&e);
  bytebuf_free(&d);
}

static void
test_base64_rejects_invalid_and_leaves_output_alone(void)
{
  const char *bad[] = { "Zm9v!", "Zg=", "Z", "Zg==Zg==", "Zm 9v", "=Zg=", "Zm9v\r\n", "Z===", "====",
                        "Zm9vY", "Zg=a", "Z=g=" };
  bytebuf d = { 0 };
  CHECK_INT(bytebuf_append(&d, "keep", 4), 0);
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    int rc = bytebuf_base64_decode(bad[i], strlen(bad[i]), &d);
    if (rc != -1)
      fprintf(stderr, "accepted bad base64 #%zu\n", i);
    CHECK_INT(rc, -1);
  }
  CHECK_INT(d.len, 4);
  CHECK_STR(d.data, "keep");
  bytebuf_free(&d);
}

static void
test_base64_round_trips_every_byte_and_length(void)
{
  unsigned char in[300];
  int bad = 0;
  for (size_t i = 0; i < sizeof(in); i++)
    in[i] = (unsigned char)(i * 7 + 3);
  for (size_t n = 0; n <= sizeof(in); n++) {
    bytebuf e = { 0 }, d = { 0 };
    if (bytebuf_base64_encode(&e, in, n) < 0 || e.len != (n + 2) / 3 * 4
        || bytebuf_base64_decode(e.data, e.len, &d) < 0 || d.len != n || (n && memcmp(d.data, in, n) != 0))
      bad++;
    bytebuf_free(&e);
    bytebuf_free(&d);
  }
  CHECK_INT(bad, 0);
}

int
main(void)
{
  test_single_line_reply_gives_code_and_text();
  test_multi_line_reply_counts_lines_and_joins_text();
  test_code_without_text_is_valid();
  test_reply_split_at_every_point_needs_more_until_complete();
  test_pipelined_replies_parse_one_after_another();
  test_pipelined_buffer_with_partial_second_reply();
  test_bare_lf_line_endings_are_accepted();
  test_enhanced_code_is_split_from_text();
  test_enhanced_code_stripped_from_every_line();
  test_enhanced_code_ignored_when_malformed_or_class_mismatched();
  test_auth_challenge_text_is_left_alone();
  test_garbage_is_a_protocol_error();
  test_garbage_is_reported_before_the_line_ends();
  test_mismatched_codes_in_multi_line_reply_is_an_error();
  test_long_but_legal_line_is_fine_longer_is_an_error();
  test_text_truncation_at_text_max_does_not_overflow();
  test_control_bytes_in_text_are_neutralised();
  test_too_many_lines_is_an_error();
  test_reply_over_byte_bound_is_an_error();
  test_error_buffer_may_be_null_or_tiny();
  test_classification_follows_first_digit();
  test_caps_from_postfix_ehlo();
  test_caps_from_gmail_ehlo();
  test_caps_from_exchange_ehlo_merges_both_auth_forms();
  test_caps_old_auth_equals_form_alone();
  test_caps_keywords_are_case_insensitive();
  test_caps_edge_cases();
  test_caps_long_lists_keep_whole_words();
  test_caps_from_ehlo_longer_than_the_reply_text();
  test_addr_ok_accepts_good_addresses();
  test_addr_ok_rejects_injection_and_malformed();
  test_addr_ok_length_limits();
  test_dot_stuffing_cases();
  test_dot_stuffing_appends_to_existing_content();
  test_dot_stuffing_large_input_is_correct_and_fast();
  test_data_has_8bit();
  test_buf_printf_grows();
  test_base64_rfc4648_vectors();
  test_base64_auth_examples();
  test_base64_rejects_invalid_and_leaves_output_alone();
  test_base64_round_trips_every_byte_and_length();
  return DONE();
}
