"""What a watch yields: one event per notification the agent sends."""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from homeagent_secrets.protocol.messages import Changed
from homeagent_secrets.protocol.rpc import Notification

EventKind = Literal["changed", "locked", "unlocked", "overflow"]
_changed: Final = msgspec.json.Decoder(Changed)
_STATES: Final[dict[str, EventKind]] = {"locked": "locked", "unlocked": "unlocked", "overflow": "overflow"}


class WatchEvent(msgspec.Struct, frozen=True):
    """``changed`` (a name's ``change`` is stored, rotated or deleted, at ``version``),
    ``locked``/``unlocked`` (the agent's state), or ``overflow`` (events were lost:
    read again whatever matters). Never a value."""

    kind: EventKind
    name: str | None = None
    version: int | None = None
    change: str | None = None
    watch: int | None = None


def event_of(note: Notification) -> WatchEvent | None:
    """The event a notification carries (None for one this client does not know)."""
    if note.method == "changed":
        c = _changed.decode(note.params)
        return WatchEvent("changed", c.name, c.version, c.event, c.watch)
    kind = _STATES.get(note.method)
    return None if kind is None else WatchEvent(kind)
