"""The agent: one method call from typed params to typed result.

Everything a request needs beyond the backend lives here: the value size
limit, the slow-down of failed unlocks, idle auto-lock bookkeeping and the
status report. The server hands it decoded params; it knows no sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio

from homeagent_secrets.protocol import __version__
from homeagent_secrets.protocol.errors import (
    NotSupportedError,
    ValueTooLargeError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.messages import (
    ChangedResult,
    ChangePassphraseParams,
    InitResult,
    ListParams,
    LockedResult,
    NameParams,
    NoParams,
    Params,
    PassphraseParams,
    RetrieveParams,
    RotateParams,
    StatusResult,
    StoreParams,
    WrittenResult,
)
from homeagent_secrets.protocol.secret import Secret

from .backend import Backend, WouldBlock

log = logging.getLogger(__name__)

DEFAULT_MAX_VALUE: Final = 64 * 1024
UNLOCK_DELAY_FIRST: Final = 0.25
UNLOCK_DELAY_MAX: Final = 10.0


class Agent:
    """Dispatches the method table onto a backend."""

    def __init__(
        self,
        backend: Backend,
        max_value_bytes: int = DEFAULT_MAX_VALUE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._started = clock()
        self._failed_unlocks = 0
        self._unlock_not_before = 0.0
        self._unlock_lock = anyio.Lock()
        self.last_used = clock()
        self.unlocked_at: float | None = None
        #: Called after any change to locked state or the number of secrets.
        self.on_change: Callable[[], None] = lambda: None
        self._handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "status": self.status,
            "init": self.init,
            "unlock": self.unlock,
            "lock": self.lock,
            "change_passphrase": self.change_passphrase,
            "store": self.store,
            "retrieve": self.retrieve,
            "delete": self.delete,
            "list": self.list,
            "rotate": self.rotate,
            "describe": self.describe,
        }

    async def call(self, method: str, params: Params) -> Any:
        """Run one method; raises a SecretsError subclass on failure."""
        self.last_used = self._clock()
        return await self._handlers[method](params)

    def call_nowait(self, method: str, params: Params) -> Any:
        """Answer a read from memory without awaiting, or raise WouldBlock."""
        if method != "retrieve":
            raise WouldBlock
        self.last_used = self._clock()
        return self.backend.retrieve_nowait(params.name, params.version == "previous")  # type: ignore[attr-defined]

    def _check_value(self, value: Secret) -> None:
        size = len(value.reveal().encode("utf-8", "surrogatepass"))
        if size > self.max_value_bytes:
            raise ValueTooLargeError(
                f"the value is {size} bytes; the limit is {self.max_value_bytes} "
                "(raise it with max_value_bytes in the secretsd config)"
            )

    async def status(self, _: NoParams) -> StatusResult:
        b = self.backend
        return StatusResult(
            initialized=b.initialized,
            locked=b.locked,
            backend=b.name,
            version=__version__,
            secrets=await b.count(),
            uptime_s=round(self._clock() - self._started, 3),
            memory_locked=b.memory_locked,
        )

    async def init(self, p: PassphraseParams) -> InitResult:
        await self.backend.init(p.passphrase)
        self.unlocked_at = self._clock()
        log.info("store initialized (%s backend)", self.backend.name)
        self.on_change()
        return InitResult()

    async def unlock(self, p: PassphraseParams) -> LockedResult:
        if not self.backend.has_passphrase:
            await self.backend.unlock(p.passphrase)  # raises NotSupportedError
        # One attempt at a time, each after the delay earned by earlier
        # failures: parallel guessing gains nothing, other clients are not held.
        async with self._unlock_lock:
            wait = self._unlock_not_before - self._clock()
            if wait > 0:
                await anyio.sleep(wait)
            try:
                await self.backend.unlock(p.passphrase)
            except WrongPassphraseError:
                self._failed_unlocks += 1
                delay = min(UNLOCK_DELAY_FIRST * 2 ** (self._failed_unlocks - 1), UNLOCK_DELAY_MAX)
                self._unlock_not_before = self._clock() + delay
                log.warning(
                    "unlock failed: wrong passphrase (%d in a row; next attempt in %.2f s)",
                    self._failed_unlocks, delay,
                )
                raise
            self._failed_unlocks = 0
            self._unlock_not_before = 0.0
        if self.unlocked_at is None:
            self.unlocked_at = self._clock()
        self.on_change()
        return LockedResult(locked=False)

    async def lock(self, _: NoParams) -> LockedResult:
        if not self.backend.has_passphrase:
            raise NotSupportedError(self.backend._no_passphrase)
        await self.backend.lock()
        self.unlocked_at = None
        log.info("locked: data key wiped")
        self.on_change()
        return LockedResult(locked=True)

    async def change_passphrase(self, p: ChangePassphraseParams) -> ChangedResult:
        await self.backend.change_passphrase(p.old, p.new)
        log.info("passphrase changed")
        return ChangedResult()

    async def store(self, p: StoreParams) -> WrittenResult:
        self._check_value(p.value)
        version = await self.backend.store(p.name, p.value, p.kind)
        self.on_change()
        return WrittenResult(p.name, version)

    async def retrieve(self, p: RetrieveParams) -> Any:
        return await self.backend.retrieve(p.name, p.version == "previous")

    async def delete(self, p: NameParams) -> bool:
        existed = await self.backend.delete(p.name)
        self.on_change()
        return existed

    async def list(self, p: ListParams) -> list[str]:
        return await self.backend.list(p.prefix)

    async def rotate(self, p: RotateParams) -> WrittenResult:
        self._check_value(p.value)
        version = await self.backend.rotate(p.name, p.value)
        return WrittenResult(p.name, version)

    async def describe(self, p: NameParams) -> Any:
        return await self.backend.describe(p.name)
