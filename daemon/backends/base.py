"""The storage backend contract every backend implements, and the plumbing they share.

Like keyring's ``KeyringBackend``, a backend is a small class behind one base;
one shared test suite (``tests/test_backend_contract.py``) runs against every
backend. Methods are async. The rules every backend must keep are kept here,
once, above them: writes to one name are serialized, ``rotate`` needs an
existing name. A backend implements ``_head`` (the current version) and
``_put`` (write a new current value, keeping the replaced one as previous).

``ThreadedBackend`` is the plumbing of backends whose client library blocks
(keychain over D-Bus, OpenBao over HTTP): calls in worker threads under a
limiter, and the locked state seen on the last call.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread

from homeagent_secrets.protocol.errors import LockedError, NotFoundError, NotSupportedError
from homeagent_secrets.protocol.messages import DamagedRecord, DescribeResult, SecretResult
from homeagent_secrets.protocol.secret import Secret

T = TypeVar("T")


class _Pending:
    """The answer of a ``*_nowait`` method that cannot answer without awaiting."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Final = _Pending()


@dataclass(frozen=True)
class RecordExport:
    """Everything a backend holds for one name, as ``migrate`` copies it."""

    current: str
    previous: str | None
    version: int
    previous_version: int
    kind: str
    created: float
    updated: float

    def __repr__(self) -> str:
        return f"RecordExport(version={self.version}, kind={self.kind!r}, <values redacted>)"

    def same_content(self, other: RecordExport | None) -> bool:
        """Equal values and kind: what survives a copy into a backend that numbers
        versions and stamps times itself (OpenBao)."""
        return other is not None and (self.current, self.previous, self.kind) == (
            other.current, other.previous, other.kind)


class NameLocks:
    """One lock per secret name, dropped when nobody holds or waits for it.

    Serializes this agent's writes to one name; reads never take it.
    """

    def __init__(self) -> None:
        self._locks: dict[str, anyio.Lock] = {}

    @asynccontextmanager
    async def __call__(self, name: str) -> AsyncIterator[None]:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = anyio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(name, None)


class Backend(abc.ABC):
    """Stores named secrets with one previous value each."""

    #: Short name reported by ``status`` (one of protocol.names.BACKEND_NAMES).
    name: str = "abstract"
    #: Whether init/unlock/lock/change_passphrase apply to this backend.
    has_passphrase: bool = False
    #: Whether ``import_`` keeps version numbers and timestamps exactly.
    keeps_history: bool = True
    no_passphrase_message = "this backend does not use the agent passphrase"

    def __init__(self) -> None:
        self._names = NameLocks()
        #: Set by ``open``: whether the backend reached its store (the choice is
        #: recorded only then).
        self.reachable = False

    async def open(self) -> None:
        """Start-up work (repair, probes); called once before serving."""
        self.reachable = True

    async def close(self) -> None:
        """Release everything; called once at shutdown."""
        await self.lock()

    # --- state ------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return True

    @property
    def locked(self) -> bool:
        return False

    @property
    def memory_locked(self) -> bool:
        """Whether key material is held in mlock'ed memory."""
        return False

    def damaged(self) -> list[DamagedRecord]:
        """Records this backend holds but cannot use (reported by ``status``)."""
        return []

    async def maintain(self) -> None:
        """Periodic upkeep while serving (the file backend re-tightens modes)."""

    async def probe(self) -> None:
        """Refresh state that only a blocking call can read (before ``status``)."""

    async def count(self) -> int | None:
        """How many secrets, or None when that cannot be known now (locked)."""
        return len(await self.list(""))

    # --- passphrase -------------------------------------------------------------

    async def init(self, passphrase: Secret) -> None:
        raise NotSupportedError(self.no_passphrase_message)

    async def unlock(self, passphrase: Secret) -> None:
        raise NotSupportedError(self.no_passphrase_message)

    async def check_passphrase(self, passphrase: Secret) -> None:
        """Raise WrongPassphraseError unless ``passphrase`` opens the store."""
        raise NotSupportedError(self.no_passphrase_message)

    async def lock(self) -> None:
        """Forget key material; a no-op for backends without a passphrase."""

    async def change_passphrase(self, old: Secret, new: Secret) -> None:
        raise NotSupportedError(self.no_passphrase_message)

    # --- writes: the rules kept once, here --------------------------------------

    async def store(self, name: str, value: Secret, kind: str | None) -> int:
        """Create or overwrite; the replaced value becomes the previous one. Returns the version."""
        async with self._names(name):
            return await self._put(name, value, kind, None)

    async def rotate(self, name: str, value: Secret) -> int:
        """Replace an existing secret keeping the old value as previous; NotFoundError if absent."""
        async with self._names(name):
            head = await self._head(name)
            if head is None:
                raise NotFoundError(f"no secret named {name!r} to rotate: store it first")
            return await self._put(name, value, None, head)

    async def delete(self, name: str, force: bool = False) -> bool:
        """Remove the secret and its previous value; whether it existed.

        ``force`` also removes a record that can no longer be read (damaged).
        """
        async with self._names(name):
            return await self._remove(name, force)

    async def import_(self, name: str, record: RecordExport) -> None:
        """Make ``name`` hold exactly ``record`` (overwriting): the other half of ``export``."""
        async with self._names(name):
            await self._import(name, record)

    @abc.abstractmethod
    async def _head(self, name: str) -> int | None:
        """The current version of ``name``, or None when absent (called under its lock)."""

    @abc.abstractmethod
    async def _put(self, name: str, value: Secret, kind: str | None, expect: int | None) -> int:
        """Write a new current value, the replaced one kept as previous; the new version.

        Called under the name's lock. ``kind`` None keeps the kind (or the
        default). ``expect``, when given, is the version this write replaces: a
        backend other agents also write (OpenBao) checks it and sets atomically.
        """

    @abc.abstractmethod
    async def _remove(self, name: str, force: bool) -> bool:
        """Delete ``name`` (called under its lock); whether it existed."""

    @abc.abstractmethod
    async def _import(self, name: str, record: RecordExport) -> None:
        """Write ``record`` as it is (called under the name's lock)."""

    # --- reads ------------------------------------------------------------------

    @abc.abstractmethod
    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        """The current (or previous) value, or None when absent."""

    def retrieve_nowait(self, name: str, previous: bool = False) -> SecretResult | _Pending | None:
        """``retrieve`` answered from memory without awaiting, or ``PENDING``.

        The hot path: a backend that keeps what it needs in memory answers here
        and saves the daemon several coroutine hops per request.
        """
        return PENDING

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Sorted names starting with ``prefix``."""

    @abc.abstractmethod
    async def describe(self, name: str) -> DescribeResult | None:
        """Metadata without the value, or None when absent."""

    async def versions(self) -> dict[str, int] | None:
        """Every name's current version, for backends other agents also write
        (OpenBao); None where this agent is the only writer."""
        return None

    @abc.abstractmethod
    async def export(self, name: str) -> RecordExport | None:
        """The whole record of ``name`` (both values and metadata), or None."""


class ThreadedBackend(Backend):
    """A backend whose client library blocks: each call runs in a worker thread.

    Subclasses give the limiter's size and ``_call(what, fn, *args)``, which
    runs in the thread and maps the library's errors onto ours; a LockedError
    from it marks the backend locked until a later call succeeds.
    """

    #: Worker threads used at once (the library's own concurrency limit).
    threads: int = 1

    def __init__(self) -> None:
        super().__init__()
        self._limiter = anyio.CapacityLimiter(self.threads)
        self._locked_seen = False

    @abc.abstractmethod
    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (in a worker thread) against the store; map its errors."""

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            result = await anyio.to_thread.run_sync(self._call, what, fn, *args,
                                                    limiter=self._limiter)
        except LockedError:
            self._locked_seen = True
            raise
        self._locked_seen = False
        return result

    @property
    def locked(self) -> bool:
        return self._locked_seen
