"""Secrets out of everything ingest stores or prints: URL credentials and signed-URL parameters.

    redact.redact("https://ann:p@ss@host/a.jpg?X-Goog-Signature=9f3c&w=1")
    # -> 'https://***@host/a.jpg?X-Goog-Signature=***&w=1'

Applied to dead letters (`errors.jsonl`), the stored `source` field of records, log lines and
job errors. Record ids are still computed from the URL exactly as written (the redacted form of
two signed URLs of one object would collide); only what is written down is redacted.

- User info is everything between `scheme://` and the **last** `@` of the authority, so a
  password that itself holds an `@` leaks no part of it.
- Query parameters that carry secrets (signatures, credentials, tokens, keys: GCS and S3 signed
  URLs, Azure SAS `sig`, API keys, OAuth tokens) keep their name and lose their value. Names are
  matched case-insensitively on their ending, so vendor prefixes (`X-Amz-`, `X-Goog-`) and
  variants (`session_token`, `api_key`) are covered; redacting a harmless parameter costs
  nothing, since ids never use the redacted text.
"""
from __future__ import annotations

import logging
import re

MASK = "***"
# Stops at characters that end a URL inside JSON, Python reprs and prose.
_URL_END = r"/?#\s\"'<>\\"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^" + _URL_END + r"]*@")
_SECRET_NAMES = (r"sig|signature|token|secret|credentials?|password|passwd|pwd|key|apikey|"
                 r"auth|authorization|policy")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&#\s\"'<>\\]*?(?:" + _SECRET_NAMES + r"))=(?P<value>[^&#\s\"'<>\\]*)",
    re.IGNORECASE)


def redact(text: str) -> str:
  """`text` with URL credentials and secret query values replaced by `***`."""
  text = _USERINFO.sub(r"\g<scheme>" + MASK + "@", text)
  return _SECRET_PARAM.sub(lambda m: f"{m.group('name')}={MASK}" if m.group("value") else
                           m.group(0), text)


class RedactingFilter(logging.Filter):
  """Redacts a log record's final message (request lines, query strings included, are logged
  at DEBUG; other lines name sources)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    clean = redact(message)
    if clean != message:
      record.msg, record.args = clean, None
    return True


_FILTERED_LOGGERS = ("headstart", "headstart.fetch", "urllib3.connectionpool", "urllib3.response")


def install_log_filter() -> None:
  """Adds `RedactingFilter` to the loggers that can carry source URLs (idempotent)."""
  for name in _FILTERED_LOGGERS:
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
      logger.addFilter(RedactingFilter())
