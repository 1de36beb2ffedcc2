"""Change notifications: who watches which names, and the events they are sent.

A connection opens a watch on name globs (``watch``) and is then sent, on that
connection, one ``changed`` notification per store, rotate or delete of a
matching name it may read, and ``locked``/``unlocked`` when the agent's state
changes. Never a value. Events are queued per connection in an ``Outbox`` of
at most ``OUTBOX_LIMIT`` events: a watcher that falls that far behind gets one
``overflow`` notification (after what was queued) and must read everything it
cares about again; it never slows a writer or another client.

The agent publishes after a write is durable and yields once before it
answers, so every watcher's sender has sent the event (into its socket) before
the writer's answer goes out, unless that watcher's socket is full.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import anyio

from homeagent_secrets.protocol.errors import InvalidParams, SecretsError
from homeagent_secrets.protocol.messages import Changed, ChangeEvent
from homeagent_secrets.protocol.names import glob_regex
from homeagent_secrets.protocol.rpc import encode_notification

from .peer import Peer
from .policy import Rights

log = logging.getLogger(__name__)

#: Events one connection may have waiting; beyond that, one ``overflow``.
OUTBOX_LIMIT: Final = 4096
#: Watches one connection may hold: each is matched against every change, so
#: their number is what one peer makes every write cost (a client needs one).
MAX_WATCHES_PER_CONNECTION: Final = 16
_OVERFLOW: Final = encode_notification("overflow")
_LOCKED: Final = encode_notification("locked")
_UNLOCKED: Final = encode_notification("unlocked")


class Outbox:
    """A connection's notifications waiting to be sent."""

    __slots__ = ("lines", "overflowed", "ready")

    def __init__(self) -> None:
        self.lines: deque[bytes] = deque()
        self.overflowed = False
        self.ready = anyio.Event()

    def put(self, line: bytes) -> None:
        if self.overflowed:
            return  # the watcher must resync anyway: nothing more until it has read
        if len(self.lines) >= OUTBOX_LIMIT:
            self.overflowed = True
        else:
            self.lines.append(line)
        self.ready.set()

    def take(self) -> bytes:
        """Everything waiting, as one chunk to send (the overflow marker last)."""
        chunk = b"".join(self.lines)
        self.lines.clear()
        if self.overflowed:
            chunk += _OVERFLOW
            self.overflowed = False
        self.ready = anyio.Event()
        return chunk


class Subscriber(Protocol):
    """What the hub needs of a connection."""

    peer: Peer
    outbox: Outbox

    def start_notifier(self) -> None: ...


class Hub:
    """Every open watch, and the events published to them."""

    def __init__(self, rights_of: Callable[[Peer], Rights], trusted: Callable[[Peer], bool]) -> None:
        self._rights_of = rights_of
        self._trusted = trusted
        self._ids = itertools.count(1)
        self._watches: dict[int, tuple[Subscriber, tuple[re.Pattern[str], ...]]] = {}
        self._by_conn: dict[Subscriber, set[int]] = {}
        #: The last version this agent published per name, 0 once deleted (what the
        #: OpenBao poller leaves out: this agent's own changes).
        self.published: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return bool(self._watches)

    def watching(self, conn: Subscriber) -> bool:
        return conn in self._by_conn

    def subscribe(self, conn: Subscriber, patterns: list[str]) -> int:
        if len(self._by_conn.get(conn, ())) >= MAX_WATCHES_PER_CONNECTION:
            raise InvalidParams(f"a connection may hold at most {MAX_WATCHES_PER_CONNECTION} watches: "
                                "unwatch one, or give one watch several patterns")
        watch = next(self._ids)
        self._watches[watch] = (conn, tuple(glob_regex(p) for p in patterns))
        self._by_conn.setdefault(conn, set()).add(watch)
        conn.start_notifier()
        return watch

    def unsubscribe(self, conn: Subscriber, watch: int) -> bool:
        found = self._watches.get(watch)
        if found is None or found[0] is not conn:
            return False  # another connection's watch is not this one's to close
        del self._watches[watch]
        mine = self._by_conn[conn]
        mine.discard(watch)
        if not mine:
            del self._by_conn[conn]
        return True

    def drop(self, conn: Subscriber) -> None:
        """Forget a closed connection's watches."""
        for watch in self._by_conn.pop(conn, ()):
            self._watches.pop(watch, None)

    def changed(self, name: str, version: int, event: ChangeEvent) -> bool:
        """Queue a change for every watch that matches and may read ``name``; whether any."""
        self.published[name] = 0 if event == "deleted" else version
        if not self._watches:
            return False
        slashed = "/" + name
        sent = False
        for watch, (conn, patterns) in self._watches.items():
            # The rules first: a watcher's own patterns are matched only against
            # names it may read (they are its input; the rules are the operator's).
            peer = conn.peer
            if not (self._trusted(peer) or self._rights_of(peer).may("read", name)):
                continue
            if patterns and not any(p.match(slashed) for p in patterns):
                continue
            conn.outbox.put(encode_notification("changed", Changed(watch, name, version, event)))
            sent = True
        return sent

    def resync(self) -> None:
        """Tell every watching connection to read again what it cares about (an
        ``overflow``): after a reload of the rules, the names it is told about may
        have changed, and a cache must not keep what it may no longer be told of."""
        for conn in self._by_conn:
            conn.outbox.put(_OVERFLOW)

    def state(self, locked: bool) -> bool:
        """Tell every watching connection (once each) that the agent locked or unlocked."""
        line = _LOCKED if locked else _UNLOCKED
        for conn in self._by_conn:
            conn.outbox.put(line)
        return bool(self._by_conn)


async def poll_changes(hub: Hub, versions: Callable[[], Awaitable[dict[str, int] | None]],
                       interval: float) -> None:
    """Publish changes made by others (another host's agent on OpenBao) while anyone watches.

    Every ``interval`` seconds, while a watch is open, read every name's current
    version (``versions`` answers None when the backend in use has no such
    neighbours) and publish what differs from the last reading and was not
    this agent's own write. The first reading after watches appear is the
    baseline.
    """
    seen: dict[str, int] | None = None
    while True:
        await anyio.sleep(interval)
        if not hub.active:
            seen = None
            continue
        try:
            now = await versions()
        except SecretsError as exc:
            log.warning("watching for changes by others failed: %s", exc.message)
            continue
        if now is None:
            seen = None
            continue
        if seen is not None:
            for name, version in now.items():
                if seen.get(name) != version and hub.published.get(name) != version:
                    hub.changed(name, version, "stored" if name not in seen else "rotated")
            for name in seen.keys() - now.keys():
                if hub.published.get(name) != 0:
                    hub.changed(name, seen[name], "deleted")
        seen = now
