"""The agent: one method call from typed params to typed result.

Everything a request needs beyond the backend lives here: the value size
limit, the slow-down of failed unlocks, idle auto-lock bookkeeping and the
status report. The server hands it decoded params; it knows no sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
from homeagent_secrets.protocol import __version__
from homeagent_secrets.protocol.errors import (
    BackendUnavailableError,
    InvalidParams,
    NotSupportedError,
    SecretsError,
    ValueTooLargeError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.messages import (
    ChangedResult,
    ChangePassphraseParams,
    InitResult,
    ListParams,
    LockedResult,
    MigrateParams,
    MigrateResult,
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
from .faults import crash_point

log = logging.getLogger(__name__)

DEFAULT_MAX_VALUE: Final = 64 * 1024
UNLOCK_DELAY_FIRST: Final = 0.25
UNLOCK_DELAY_MAX: Final = 10.0


@dataclass
class Migration:
    """What ``migrate`` needs: how to make a backend, how to record the choice."""

    make_backend: Callable[[str], Backend]
    record_choice: Callable[[str], None]


class Agent:
    """Dispatches the method table onto a backend."""

    def __init__(
        self,
        backend: Backend,
        max_value_bytes: int = DEFAULT_MAX_VALUE,
        clock: Callable[[], float] = time.monotonic,
        migration: Migration | None = None,
    ) -> None:
        self.backend = backend
        self.migration = migration
        self._migrate_lock = anyio.Lock()
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
            "migrate": self.migrate,
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
        await b.probe()
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

    # --- migration between backends -------------------------------------------------

    async def _ready(self, backend: Backend, passphrase: Secret | None) -> None:
        """Open ``backend`` and make it writable (init or unlock a file store)."""
        await backend.open()
        if not backend.has_passphrase:
            return
        if passphrase is None:
            raise InvalidParams(
                "the encrypted-file store needs its passphrase for this migration: "
                "`secretsctl migrate` asks for it"
            )
        if not backend.initialized:
            await backend.init(passphrase)
        elif backend.locked:
            await backend.unlock(passphrase)

    async def migrate(self, p: MigrateParams) -> MigrateResult:
        """Copy every secret to the other backend, verify, switch, then remove the originals.

        Interrupted anywhere, it loses nothing: before the switch the source is
        untouched and still in use; after it every copy is verified, and running
        ``migrate`` again with the same target removes the leftovers.
        """
        if self.migration is None:
            raise NotSupportedError("this agent was started without migration support")
        async with self._migrate_lock:
            src = self.backend
            if p.to == src.name:
                return MigrateResult(src.name, 0, await self._remove_leftovers(p))
            dst = self.migration.make_backend(p.to)
            try:
                await self._ready(dst, p.passphrase)
                names = await self._copy_all(src, dst)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await dst.close()  # wipes its key: the source stays the one in use
                raise
            crash_point("migrate-before-switch")
            await anyio.to_thread.run_sync(self.migration.record_choice, dst.name)
            self.backend = dst
            log.info("migrated %d secret(s) from %s to %s; removing the originals",
                     len(names), src.name, dst.name)
            crash_point("migrate-after-switch")
            removed = 0
            for name in names:
                try:
                    removed += await src.delete(name)
                except SecretsError as exc:
                    log.warning("could not remove %r from the %s backend: %s (run migrate again)",
                                name, src.name, exc.message)
            await src.close()
            self.on_change()
            return MigrateResult(dst.name, len(names), removed)

    @staticmethod
    async def _copy_all(src: Backend, dst: Backend) -> Sequence[str]:
        """Copy every secret from ``src`` to ``dst`` and read each back; the names copied."""
        names = await src.list("")
        for name in names:
            record = await src.export(name)
            if record is None:
                continue
            await dst.import_(name, record)
            copy = await dst.export(name)
            if not (copy == record if dst.keeps_history else record.same_content(copy)):
                raise BackendUnavailableError(
                    f"{name!r} did not read back the same from the {dst.name} backend; "
                    "nothing was switched or removed: check that backend and retry"
                )
            crash_point("migrate-copied-one")
        return names

    async def _remove_leftovers(self, p: MigrateParams) -> int:
        """After an interrupted migration: drop copies the other backend still holds."""
        assert self.migration is not None
        other = self.migration.make_backend(p.source or ("keychain" if p.to == "file" else "file"))
        try:
            await other.open()
            if other.has_passphrase:
                if not other.initialized:
                    return 0
                await self._ready(other, p.passphrase)
            removed = 0
            for name in await other.list(""):
                theirs = await other.export(name)
                if theirs is not None and theirs.same_content(await self.backend.export(name)):
                    removed += await other.delete(name)
                else:
                    log.warning("%r is only in the %s backend (or differs); left in place",
                                name, other.name)
            return removed
        finally:
            await other.close()
