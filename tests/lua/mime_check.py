#!/usr/bin/python3
"""Parse a message file with Python's email package and describe it.

Usage: /usr/bin/python3 tests/lua/mime_check.py FILE

Prints one "key hexvalue" line per fact (the value is the hex of its UTF-8
bytes, so any text survives the trip; Lua decodes it with one gsub):

  raw.size raw.max_line raw.bare_lf raw.bare_cr raw.ends_crlf raw.nul
  hnames                      header names in order, joined by ","
  hcount.<lname>              how many headers have that name
  h.<lname>                   first such header, decoded (policy.default)
  h.<lname>.<i>               the i-th one
  addr.<lname>.<i>.name       for address headers: display name and address
  addr.<lname>.<i>.address
  defects                     number of defects (message, parts, headers)
  defect.<i>                  "<where>: <defect class>: <text>"
  parts                       number of parts from walk()
  part.<i>.type .disposition .filename .charset .cte .boundary .multipart
  part.<i>.payload            decoded bytes (leaf parts)
  part.<i>.text               get_content() for text/* leaf parts
  error                       the exception, when parsing failed
"""

import email
import email.policy
import sys


def put(key, value):
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    elif not isinstance(value, bytes):
        value = str(value).encode("utf-8")
    print(key, value.hex())


def raw_facts(data):
    lines = data.split(b"\r\n")
    put("raw.size", len(data))
    put("raw.max_line", max(len(l) for l in lines))
    put("raw.bare_lf", data.replace(b"\r\n", b"").count(b"\n"))
    put("raw.bare_cr", data.replace(b"\r\n", b"").count(b"\r"))
    put("raw.ends_crlf", int(data.endswith(b"\r\n")))
    put("raw.nul", data.count(b"\0"))


def main():
    path = sys.argv[1]
    with open(path, "rb") as f:
        data = f.read()
    raw_facts(data)
    try:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        defects = []
        names, counts = [], {}
        for name, value in msg.items():
            lname = name.lower()
            names.append(name)
            counts[lname] = counts.get(lname, 0) + 1
            i = counts[lname]
            if i == 1:
                put("h." + lname, str(value))
            put("h.%s.%d" % (lname, i), str(value))
            for d in getattr(value, "defects", ()):
                defects.append("header %s: %s: %s" % (name, type(d).__name__, d))
            if hasattr(value, "addresses"):
                for j, a in enumerate(value.addresses, 1):
                    put("addr.%s.%d.name" % (lname, j), a.display_name)
                    put("addr.%s.%d.address" % (lname, j), a.addr_spec)
        put("hnames", ",".join(names))
        for lname, n in counts.items():
            put("hcount." + lname, n)
        n = 0
        for part in msg.walk():
            n += 1
            p = "part.%d." % n
            for d in part.defects:
                defects.append("part %d: %s: %s" % (n, type(d).__name__, d))
            put(p + "type", part.get_content_type())
            put(p + "multipart", int(part.is_multipart()))
            put(p + "cte", part.get("Content-Transfer-Encoding", ""))
            if part.is_multipart():
                put(p + "boundary", part.get_boundary() or "")
                continue
            put(p + "disposition", part.get_content_disposition() or "")
            put(p + "filename", part.get_filename() or "")
            put(p + "charset", part.get_content_charset() or "")
            put(p + "payload", part.get_payload(decode=True) or b"")
            if part.get_content_maintype() == "text":
                put(p + "text", part.get_content())
        put("parts", n)
        put("defects", len(defects))
        for i, d in enumerate(defects, 1):
            put("defect.%d" % i, d)
    except Exception as e:  # report, don't crash: the Lua test asserts on it
        put("error", "%s: %s" % (type(e).__name__, e))


if __name__ == "__main__":
    main()
