"""The slow-down of passphrase guessing, shared by every method that checks one.

``unlock``, ``change_passphrase`` and ``migrate`` (when it opens the file
store) all check a passphrase, so they share one guard:

- per peer (uid and pid): one attempt at a time (pipelining gains nothing),
  and after each failure that peer's next attempt waits longer (0.25 s,
  doubling, at most 10 s), *outside* any shared lock, so a peer that keeps
  guessing never delays another peer;
- for everyone: at most ``rate`` checks per second, served first come, first
  served, so a guesser that changes pid still gains nothing beyond that rate;
- every failure is logged with the method and the peer, never the guess.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import anyio

from homeagent_secrets.protocol.errors import WrongPassphraseError

from .peer import Peer

log = logging.getLogger(__name__)

DELAY_FIRST: Final = 0.25
DELAY_MAX: Final = 10.0
RATE: Final = 4.0  # passphrase checks per second, all peers together
MAX_PEERS: Final = 1024  # per-peer records kept (the oldest is forgotten first)


class PassphraseGuard:
    """Per-peer delays and a global rate on passphrase checks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rate: float = RATE) -> None:
        self._clock = clock
        self._interval = 1.0 / rate
        self._next_slot = 0.0
        self._slot_lock = anyio.Lock()  # anyio's Lock is fair: first come, first served
        self._peers: OrderedDict[tuple[int, int], tuple[int, float]] = OrderedDict()
        self._peer_locks: dict[tuple[int, int], anyio.Lock] = {}

    def failures(self, peer: Peer) -> int:
        return self._peers.get(peer.key, (0, 0.0))[0]

    async def _wait_turn(self, peer: Peer) -> None:
        _failures, not_before = self._peers.get(peer.key, (0, 0.0))
        wait = not_before - self._clock()
        if wait > 0:
            await anyio.sleep(wait)
        async with self._slot_lock:
            now = self._clock()
            wait = self._next_slot - now
            self._next_slot = max(now, self._next_slot) + self._interval
            if wait > 0:
                await anyio.sleep(wait)

    @asynccontextmanager
    async def attempt(self, peer: Peer, method: str) -> AsyncIterator[None]:
        """Wrap one passphrase check: wait this peer's turn; count a wrong passphrase."""
        lock = self._peer_locks.get(peer.key)
        if lock is None:
            lock = self._peer_locks[peer.key] = anyio.Lock()
        try:
            async with lock:
                await self._wait_turn(peer)
                async with self._checked(peer, method):
                    yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._peer_locks.pop(peer.key, None)

    @asynccontextmanager
    async def _checked(self, peer: Peer, method: str) -> AsyncIterator[None]:
        try:
            yield
        except WrongPassphraseError:
            failures = self._peers.get(peer.key, (0, 0.0))[0] + 1
            delay = min(DELAY_FIRST * 2 ** (failures - 1), DELAY_MAX)
            self._peers[peer.key] = (failures, self._clock() + delay)
            self._peers.move_to_end(peer.key)
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
            log.warning("%s: wrong passphrase from %s (%d in a row from it; its next attempt "
                        "waits %.2f s)", method, peer, failures, delay)
            raise
        else:
            self._peers.pop(peer.key, None)
