"""The storage backend contract that every backend implements.

Like keyring's ``KeyringBackend``, a backend is a small class behind one base;
one shared test suite (``tests/test_backend_contract.py``) runs against every
backend. Methods are async: a backend runs its blocking work in worker threads.
Passphrase methods exist only for backends that hold their own key; the others
inherit the ``NotSupportedError`` answers.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from homeagent_secrets.protocol.errors import NotSupportedError
from homeagent_secrets.protocol.messages import DescribeResult, SecretResult
from homeagent_secrets.protocol.secret import Secret


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


class WouldBlock(Exception):
    """Raised by a ``*_nowait`` method that cannot answer without awaiting."""


class Backend(abc.ABC):
    """Stores named secrets with one previous value each."""

    #: Short name reported by ``status`` (``file``, ``keychain``, ``openbao``).
    name: str = "abstract"
    #: Whether init/unlock/lock/change_passphrase apply to this backend.
    has_passphrase: bool = False
    #: Whether ``import_`` keeps version numbers and timestamps exactly.
    keeps_history: bool = True
    _no_passphrase = "this backend does not use the agent passphrase"

    async def open(self) -> None:
        """Start-up work (repair, probes); called once before serving."""

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

    async def maintain(self) -> None:
        """Periodic upkeep while serving (the file backend re-tightens modes)."""

    async def probe(self) -> None:
        """Refresh state that only a blocking call can read (before ``status``)."""

    async def count(self) -> int | None:
        """How many secrets, or None when that cannot be known now (locked)."""
        return len(await self.list(""))

    # --- passphrase -------------------------------------------------------------

    async def init(self, passphrase: Secret) -> None:
        raise NotSupportedError(self._no_passphrase)

    async def unlock(self, passphrase: Secret) -> None:
        raise NotSupportedError(self._no_passphrase)

    async def lock(self) -> None:
        """Forget key material; a no-op for backends without a passphrase."""

    async def change_passphrase(self, old: Secret, new: Secret) -> None:
        raise NotSupportedError(self._no_passphrase)

    # --- secrets ----------------------------------------------------------------

    @abc.abstractmethod
    async def store(self, name: str, value: Secret, kind: str | None) -> int:
        """Create or overwrite; the replaced value becomes the previous one. Returns the version."""

    @abc.abstractmethod
    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        """The current (or previous) value, or None when absent."""

    def retrieve_nowait(self, name: str, previous: bool = False) -> SecretResult | None:
        """``retrieve`` answered from memory without a coroutine, or WouldBlock.

        The hot path: a backend that keeps what it needs in memory answers here
        and saves the daemon several coroutine hops per request.
        """
        raise WouldBlock

    @abc.abstractmethod
    async def delete(self, name: str) -> bool:
        """Remove the secret and its previous value; whether it existed."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> list[str]:
        """Sorted names starting with ``prefix``."""

    @abc.abstractmethod
    async def rotate(self, name: str, value: Secret) -> int:
        """Replace an existing secret keeping the old value as previous; NotFoundError if absent."""

    @abc.abstractmethod
    async def describe(self, name: str) -> DescribeResult | None:
        """Metadata without the value, or None when absent."""

    @abc.abstractmethod
    async def export(self, name: str) -> RecordExport | None:
        """The whole record of ``name`` (both values and metadata), or None."""

    @abc.abstractmethod
    async def import_(self, name: str, record: RecordExport) -> None:
        """Make ``name`` hold exactly ``record`` (overwriting): the other half of ``export``."""
