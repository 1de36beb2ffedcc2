"""``secretsctl watch [PATTERN...] [--json]``: one line per event, until interrupted.

Plain lines are ``<event> <name> <version>`` for a change (``stored``,
``rotated``, ``deleted``) and a bare ``locked``, ``unlocked`` or ``overflow``;
``--json`` prints one object per line (``{"event": ..., "name": ..., "version": ...}``).
Never a value. Ctrl-C ends it with 0; a dropped connection with 5 (events may
have been missed: start it again and re-read what matters).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from .events import WatchEvent
from .sync import SecretsClient

_json = msgspec.json.Encoder()


def event_line(ev: WatchEvent, as_json: bool) -> str:
    """The line ``secretsctl watch`` prints for ``ev``."""
    if as_json:
        obj: dict[str, Any] = {"event": ev.change if ev.kind == "changed" else ev.kind}
        if ev.kind == "changed":
            obj.update(name=ev.name, version=ev.version)
        return _json.encode(obj).decode()
    if ev.kind == "changed":
        return f"{ev.change} {ev.name} {ev.version}"
    return ev.kind


def add_watch_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``watch`` to secretsctl's subcommands."""
    text = "print one line per change of the secrets matching the patterns (never a value)"
    sp: argparse.ArgumentParser = sub.add_parser("watch", help=text, description=text)
    sp.set_defaults(fn=cmd_watch)
    sp.add_argument("patterns", nargs="*", metavar="PATTERN",
                    help="name globs (* one segment, ** any number); none: every name you may read")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")
    return sp


def cmd_watch(client: SecretsClient, args: argparse.Namespace) -> int:
    """``secretsctl watch``: runs until interrupted (exit 0) or the agent goes away (5)."""
    try:
        for ev in client.watch(args.patterns):
            sys.stdout.write(event_line(ev, args.json) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0
