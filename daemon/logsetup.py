"""stdlib logging to stderr, as text or JSON lines, with a redaction filter.

Secrets are a redacted type (``Secret``), so they cannot reach a log line by
accident. The filter is the second wall, and it redacts by type, never by
rewriting format strings: any argument or ``extra`` field that is a ``Secret``,
bytes, or a mapping with a key named like a secret is replaced before
formatting.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from homeagent_secrets.protocol.secret import Secret

REDACTED: Final = "<redacted>"
SENSITIVE: Final = re.compile(
    r"(?i)^(value|values|passphrase|password|old|new|token|secret|secret_id|current|previous)$")
_STD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime"}


def _scrub(obj: Any) -> Any:
    if isinstance(obj, Secret | bytes | bytearray | memoryview):
        return REDACTED
    if isinstance(obj, Mapping):
        return {k: (REDACTED if isinstance(k, str) and SENSITIVE.match(k) else _scrub(v))
                for k, v in obj.items()}
    return obj


class RedactFilter(logging.Filter):
    """Replace secret-typed arguments and sensitive-named fields; leave formats alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in record.__dict__.keys() - _STD_ATTRS:
            if SENSITIVE.match(key):
                record.__dict__[key] = REDACTED
            else:
                record.__dict__[key] = _scrub(record.__dict__[key])
        if isinstance(record.args, Mapping):
            record.args = _scrub(record.args)
        elif isinstance(record.args, tuple):
            record.args = tuple(_scrub(a) for a in record.args)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in record.__dict__.keys() - _STD_ATTRS:
            doc[key] = record.__dict__[key]
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=repr)


#: syslog priorities by logging level, for the journal's ``<N>`` line prefix.
_PRIORITY: Final = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalPriority(logging.Formatter):
    """Another formatter's line, prefixed ``<N>``: journald (SyslogLevelPrefix=, on by
    default) takes N as the line's priority instead of its default, info. Without it
    a denial logged at WARNING was priority 6 in the journal (``journalctl -p warning``
    showed none, and it shared journald's rate limit with every info line)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{self.inner.format(record)}"


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is systemd's journal stream (``$JOURNAL_STREAM`` names its device:inode)."""
    stream = (env if env is not None else os.environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger: stderr, redacted, text or JSON lines (each with its
    syslog priority when stderr is the journal)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter())
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JournalPriority(formatter) if stderr_is_journal() else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
