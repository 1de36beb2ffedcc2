"""What secretsctl prints: values byte-exact, everything else escaped and readable.

Standard library only at import: ``cli.py`` reports errors through ``err``
before (or without) loading the protocol stack.

Nothing the agent returns can move a terminal's cursor: names, paths and
messages are printed through ``printable``. Times are ISO-8601 in local time
with the offset (``2026-01-31T09:15:02+01:00``); ``--json`` output is the
protocol's own (Unix seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from homeagent_secrets.protocol.messages import DescribeResult, StatusResult


def out(line: str) -> None:
    """One line on standard output."""
    sys.stdout.write(line + "\n")


def err(line: str) -> None:
    """One line on standard error, if there is one (never on stdout instead)."""
    if sys.stderr is None:
        return
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # nowhere to say it


def print_json(obj: Any) -> None:
    import msgspec

    out(msgspec.json.encode(obj).decode())


def write_value(value: str, raw: bool) -> None:
    """A secret value, exactly, as UTF-8 (plus one newline unless ``raw``)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(value.encode("utf-8") + (b"" if raw else b"\n"))


def printable(text: str) -> str:
    """``text`` with every control or format character escaped (``\\x1b``, ``\\u202e``):
    nothing the agent returns can move a terminal's cursor or reorder its output."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def iso_time(seconds: float) -> str:
    """Unix seconds as ISO-8601 local time with its UTC offset."""
    from datetime import datetime

    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def print_status(st: StatusResult, socket: Path) -> None:
    """``status`` as ``key: value`` lines, damaged records one per line."""
    state = ("not initialized" if not st.initialized else "locked" if st.locked else "unlocked")
    out(f"state: {state}")
    out(f"socket: {printable(str(socket))}")
    out(f"home: {printable(st.home) if st.home is not None else '-'}")
    out(f"backend: {printable(st.backend)}")
    out(f"initialized: {_yes(st.initialized)}")
    out(f"locked: {_yes(st.locked)}")
    out(f"secrets: {'-' if st.secrets is None else st.secrets}")
    out(f"version: {printable(st.version)}")
    out(f"uptime_s: {st.uptime_s:.1f}")
    out(f"memory_locked: {_yes(st.memory_locked)}")
    if not st.damaged:
        out("damaged: none")
    else:
        out(f"damaged: {len(st.damaged)} record(s) the agent cannot use (restore each file "
            "from a backup, or remove it: `secretsctl rm --force NAME`):")
        for d in st.damaged:
            out(f"  {printable(d.file)}  {printable(d.name) if d.name else '-'}  "
                f"{printable(d.problem)}")
    out(f"migration: {printable(st.migration) if st.migration else '-'}")


def print_describe(info: DescribeResult) -> None:
    """``describe`` as ``key: value`` lines with ISO-8601 times."""
    out(f"name: {printable(info.name)}")
    out(f"kind: {info.kind}")
    out(f"version: {info.version}")
    out(f"created: {iso_time(info.created)}")
    out(f"updated: {iso_time(info.updated)}")
    out(f"has_previous: {_yes(info.has_previous)}")


def long_line(name: str, info: DescribeResult | None, damaged: bool = False) -> str:
    """One ``ls -l`` line: kind, version, updated time, name (the name last, as ``ls -l``)."""
    if info is None:
        kind, version, updated = ("damaged" if damaged else "-"), "-", "-"
    else:
        kind, version, updated = info.kind, str(info.version), iso_time(info.updated)
    return f"{kind:<8} {version:>5}  {updated:<25}  {printable(name)}"
