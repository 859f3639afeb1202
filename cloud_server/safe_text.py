"""Text that may reach a log line or a message: credentials redacted, length bounded, control characters escaped.

- `redact(text)`: ``scheme://user:PASSWORD@host`` -> ``scheme://user:***@host``, and ``password=...`` in a
  libpq conninfo string or a URL query -> ``password=***``. Used on every database URL the package shows
  (`QuotaStore.url`), every store error it logs or prints, and by the CLI's log formatter.
- `clip(value, limit)`: ``str(value)`` cut to `limit` characters (with how many were left out), every
  character that is not printable (newline, CR, ESC, U+2028, ...) and every backslash escaped, so one logged
  field can neither be huge nor start a forged log line.
"""

from __future__ import annotations

import logging
import re

__all__ = ["FIELD_LIMIT", "RedactingFormatter", "clip", "redact"]

FIELD_LIMIT = 200  # characters of one logged field value

# userinfo up to the LAST '@' of the authority (a password may contain '@'); the user part keeps showing
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*):[^/?#\s]*@")
_KV_PASSWORD = re.compile(r"(?P<key>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def redact(text: object) -> str:
    """`text` with the passwords of database URLs and conninfo strings replaced by ``***``."""
    s = str(text)
    s = _URL_PASSWORD.sub(r"\g<head>:***@", s)
    return _KV_PASSWORD.sub(r"\g<key>***", s)


_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)


def clip(value: object, limit: int = FIELD_LIMIT) -> str:
    """``str(value)`` bounded to `limit` characters and escaped to one printable line."""
    s = str(value)
    extra = len(s) - limit
    if extra > 0:
        return f"{_escape(s[:limit])}...(+{extra} chars)"
    return _escape(s)


class RedactingFormatter(logging.Formatter):
    """A formatter whose output (message, arguments, traceback) never shows a database password."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
