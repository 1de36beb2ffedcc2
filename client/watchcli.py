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
from typing import Any, Final

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


HELP: Final = "print one line per change of the secrets matching the patterns (never a value)"
RULES: Final = ("Each line is `<event> <name> <version>` (stored, rotated, deleted), or locked,\n"
                "unlocked, overflow (events were lost: read again what matters). Runs until\n"
                "Ctrl-C (exit 0) or until the agent goes away (exit 5).")


def watch_arguments(sp: argparse.ArgumentParser | Any) -> None:
    """``watch``'s arguments, on the parser secretsctl made for it."""
    sp.add_argument("patterns", nargs="*", metavar="PATTERN",
                    help="name globs (* one segment, ** any number); none: every name you may read")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")


def cmd_watch(client: SecretsClient, args: argparse.Namespace) -> int:
    """``secretsctl watch``: runs until interrupted (exit 0) or the agent goes away (5)."""
    try:
        for ev in client.watch(args.patterns):
            sys.stdout.write(event_line(ev, args.json) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0
