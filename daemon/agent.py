"""The agent: one call from typed params to typed result, on the backend in use.

Everything a request needs beyond the backend lives here: the value size
limit, the passphrase guard, the gate that refuses writes while a migration
runs, idle auto-lock bookkeeping and the status report. Its handler table is
built from the protocol's method table: each method is answered by the agent
method of the same name (and, where the table says it may be answered without
awaiting, by ``<name>_nowait``). It knows no sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.lowlevel

from homeagent_secrets.protocol import __version__
from homeagent_secrets.protocol.errors import (
    InvalidParams,
    MigrationInProgressError,
    NotSupportedError,
    PermissionDeniedError,
    SecretsError,
    ValueTooLargeError,
)
from homeagent_secrets.protocol.messages import (
    LOCK,
    METHODS,
    MIGRATE,
    ChangedResult,
    ChangePassphraseParams,
    DeleteParams,
    DescribeResult,
    InitParams,
    InitResult,
    ListParams,
    LockedResult,
    MigrateParams,
    MigrateResult,
    NameParams,
    NoParams,
    PassphraseParams,
    RekeyParams,
    RekeyResult,
    RetrieveParams,
    RotateParams,
    SecretResult,
    StatusResult,
    StoreParams,
    WhoamiResult,
    WrittenResult,
)
from homeagent_secrets.protocol.secret import Secret
from homeagent_secrets.protocol.server import Call

from .audit import AuditLog
from .backends.base import PENDING, Backend, _Pending
from .faults import fault_delay
from .guard import PassphraseGuard
from .migration import Migrator
from .peer import SELF, Peer
from .policy import Policy, Rights
from .settings import DEFAULT_MAX_VALUE
from .watch import Hub

log = logging.getLogger(__name__)

Handler = Callable[[Any, Peer], Awaitable[Any]]
NowaitHandler = Callable[[Any, Peer], Any]
NOWAIT_SUFFIX: Final = "_nowait"


class WriteGate:
    """Counts writes in flight; ``migrating`` refuses new ones and waits out the rest."""

    def __init__(self) -> None:
        self._inflight = 0
        self._idle = anyio.Event()
        self._idle.set()
        self.migrating = False

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        if self.migrating:
            raise MigrationInProgressError()
        self._inflight += 1
        self._idle = anyio.Event() if self._inflight == 1 else self._idle
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Refuse new writes, wait for those in flight, then hold the store still."""
        if self.migrating:
            raise MigrationInProgressError("a migration is already in progress; wait for it to end")
        self.migrating = True
        try:
            await self._idle.wait()
            yield
        finally:
            self.migrating = False


class Agent:
    """Dispatches the method table onto the backend in use."""

    def __init__(
        self,
        backend: Backend,
        max_value_bytes: int = DEFAULT_MAX_VALUE,
        clock: Callable[[], float] = time.monotonic,
        migrator: Migrator | None = None,
        home: Path | None = None,
        guard: PassphraseGuard | None = None,
        policy: Policy | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.backend = backend
        self.policy = policy or Policy()
        self.audit = audit or AuditLog()
        self._rights: dict[Peer, Rights] = {}
        self.hub = Hub(self.rights_of, lambda peer: self.policy.trusted(peer))
        self.migrator = migrator
        self.home = home
        self.max_value_bytes = max_value_bytes
        self.guard = guard or PassphraseGuard(clock)
        self.gate = WriteGate()
        self._clock = clock
        self._started = clock()
        self.last_used = clock()
        self.unlocked_at: float | None = None
        #: Called after any change to locked state or the number of secrets.
        self.on_change: Callable[[], None] = lambda: None
        # Each method of the table by the agent method of its name (the connection's
        # own calls, watch and unwatch, are the server's).
        self.handlers: dict[str, Handler] = {
            m: getattr(self, m) for m, row in METHODS.items() if not row.connection}
        self.nowait_handlers: dict[str, NowaitHandler] = {
            m: getattr(self, m + NOWAIT_SUFFIX) for m, row in METHODS.items() if row.nowait}

    # --- access rules ----------------------------------------------------------------------

    def set_policy(self, policy: Policy) -> None:
        """Put new rules in force (a reload): every peer's rights are computed again."""
        self.policy = policy
        self._rights = {}
        self.hub.resync()

    def rights_of(self, peer: Peer) -> Rights:
        rights = self._rights.get(peer)
        if rights is None:
            if len(self._rights) > 4096:
                self._rights = {}
            rights = self._rights[peer] = self.policy.rights(peer)
        return rights

    def authorize(self, call: Call, peer: Peer) -> None:
        """Raise PermissionDeniedError unless the rules grant ``call`` to ``peer``.

        Decided before the name is looked up: for a name the caller may not
        touch, "absent" and "denied" look the same.
        """
        action = call.method.action
        if action == "public" or self.policy.trusted(peer):
            return
        name = getattr(call.params, "name", None)
        if not self.rights_of(peer).may(action, name if action != "list" else None):
            what = f"{action} {name!r}" if name is not None else action
            raise PermissionDeniedError(
                f"permission denied: {peer} may not {what} under the access rules; "
                "`secretsctl whoami` shows what they grant")

    # --- entry points (the dispatcher's) ------------------------------------------------

    async def call(self, call: Call, peer: Peer) -> Any:
        """Run one call; raises a SecretsError subclass on failure."""
        method = call.method
        self.authorize(call, peer)
        if method.uses_key:
            self.last_used = self._clock()
        if method.writes and method is not LOCK and method is not MIGRATE:
            # A lock never waits; a migration takes the gate whole (exclusive).
            async with self.gate.write():
                return await self.handlers[method.name](call.params, peer)
        return await self.handlers[method.name](call.params, peer)

    def call_nowait(self, call: Call, peer: Peer) -> Any | _Pending:
        """The answer from memory without awaiting, or ``PENDING`` (then ``call`` it)."""
        handler = self.nowait_handlers.get(call.method.name)
        if handler is None:
            return PENDING
        self.authorize(call, peer)
        if call.method.uses_key:
            self.last_used = self._clock()
        return handler(call.params, peer)

    # --- helpers -------------------------------------------------------------------------

    def _check_value(self, value: Secret) -> None:
        size = len(value.reveal().encode("utf-8", "surrogatepass"))
        if size > self.max_value_bytes:
            raise ValueTooLargeError(
                f"the value is {size} bytes; the limit is {self.max_value_bytes} "
                "(raise it with max_value_bytes in the secretsd config)"
            )

    async def _ready(self, backend: Backend, passphrase: Secret | None, peer: Peer) -> None:
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
            async with self.guard.attempt(peer, "migrate"):
                await backend.unlock(passphrase)

    # --- the methods ----------------------------------------------------------------------

    async def status(self, _: NoParams, peer: Peer) -> StatusResult:
        b = self.backend
        await b.probe()
        pending = self.migrator.pending(b.name) if self.migrator else None
        damaged = b.damaged()
        if not self.policy.trusted(peer):  # a damaged record's name is a name: only listable ones
            rights = self.rights_of(peer)
            damaged = [d for d in damaged if d.name is not None and rights.may("list", d.name)]
        return StatusResult(
            initialized=b.initialized,
            locked=b.locked,
            backend=b.name,
            version=__version__,
            secrets=await b.count(),
            uptime_s=round(self._clock() - self._started, 3),
            memory_locked=b.memory_locked,
            home=str(self.home) if self.home else None,
            damaged=damaged,
            migration=None if pending is None else (
                f"a migration from {pending.source} left originals there: run "
                f"`secretsctl migrate --to {b.name}` to remove them"),
            audit_log=str(self.audit.path) if self.audit.path else None,
        )

    async def whoami(self, _: NoParams, peer: Peer) -> WhoamiResult:
        return WhoamiResult(peer.uid, peer.gid, peer.pid, peer.unit, self.rights_of(peer).describe())

    async def init(self, p: InitParams, peer: Peer) -> InitResult:
        await self.backend.init(p.passphrase)
        self.unlocked_at = self._clock()
        log.info("store initialized (%s backend) by %s", self.backend.name, peer)
        self.on_change()
        return InitResult()

    async def unlock(self, p: PassphraseParams, peer: Peer) -> LockedResult:
        b = self.backend
        if not b.has_passphrase:
            raise NotSupportedError(b.no_passphrase_message)
        async with self.guard.attempt(peer, "unlock"):
            await b.unlock(p.passphrase)
        if self.unlocked_at is None:
            self.unlocked_at = self._clock()
            log.info("unlocked by %s", peer)
            await self._told(self.hub.state(locked=False))
        self.last_used = self._clock()
        self.on_change()
        return LockedResult(locked=False)

    async def lock(self, _: NoParams, peer: Peer) -> LockedResult:
        b = self.backend
        if not b.has_passphrase:
            raise NotSupportedError(b.no_passphrase_message)
        await b.lock()
        self.unlocked_at = None
        log.info("locked by %s: data key wiped", peer)
        self.on_change()
        await self._told(self.hub.state(locked=True))
        return LockedResult(locked=True)

    async def change_passphrase(self, p: ChangePassphraseParams, peer: Peer) -> ChangedResult:
        b = self.backend
        if not b.has_passphrase:
            raise NotSupportedError(b.no_passphrase_message)
        async with self.guard.attempt(peer, "change_passphrase"):
            await b.change_passphrase(p.old, p.new)
        log.info("passphrase changed by %s", peer)
        return ChangedResult()

    @staticmethod
    async def _told(sent: bool) -> None:
        """After publishing: let the watchers' senders run before the answer goes out."""
        if sent:
            await anyio.lowlevel.checkpoint()

    async def rekey(self, p: RekeyParams, peer: Peer) -> RekeyResult:
        """Replace the data key (file backend: ``backends/rekey.py``)."""
        b = self.backend
        rekey = getattr(b, "rekey", None)
        if not b.has_passphrase or rekey is None:
            raise NotSupportedError(b.no_passphrase_message)
        async with self.guard.attempt(peer, "rekey"):
            await b.check_passphrase(p.old)
        count: int = await rekey(p.old, p.new)
        log.info("rekeyed by %s: %d secret(s) under a new data key", peer, count)
        return RekeyResult(count)

    async def store(self, p: StoreParams, peer: Peer) -> WrittenResult:
        self._check_value(p.value)
        version = await self.backend.store(p.name, p.value, p.kind)
        self.on_change()
        await self._told(self.hub.changed(p.name, version, "stored"))
        return WrittenResult(p.name, version)

    def retrieve_nowait(self, p: RetrieveParams, peer: Peer) -> SecretResult | _Pending | None:
        return self.backend.retrieve_nowait(p.name, p.version == "previous")

    async def retrieve(self, p: RetrieveParams, peer: Peer) -> SecretResult | None:
        delay = fault_delay("slow-read")
        if delay:
            await anyio.sleep(delay)
        return await self.backend.retrieve(p.name, p.version == "previous")

    async def delete(self, p: DeleteParams, peer: Peer) -> bool:
        version = 0
        if self.hub.active:  # a deleted event carries the version that was deleted
            try:
                info = await self.backend.describe(p.name)
                version = info.version if info is not None else 0
            except SecretsError:
                version = 0  # a damaged record (force): its version is not known
        existed = await self.backend.delete(p.name, p.force)
        self.on_change()
        if existed:
            await self._told(self.hub.changed(p.name, version, "deleted"))
        return existed

    async def list(self, p: ListParams, peer: Peer) -> list[str]:
        if self.policy.trusted(peer):
            names = await self.backend.list(p.prefix)
        else:
            # Every name through the rules, and only then the prefix: the time taken must
            # not tell how many names outside the grant start with it (one such name
            # cost ~1 us, told apart from none in 4,000 tries; tests/attack_timing.py).
            rights = self.rights_of(peer)
            names = [n for n in await self.backend.list("") if rights.may("list", n) and n.startswith(p.prefix)]
        if p.after:
            names = [n for n in names if n > p.after]
        return names if p.limit is None else names[:p.limit]

    async def rotate(self, p: RotateParams, peer: Peer) -> WrittenResult:
        self._check_value(p.value)
        version = await self.backend.rotate(p.name, p.value)
        await self._told(self.hub.changed(p.name, version, "rotated"))
        return WrittenResult(p.name, version)

    async def describe(self, p: NameParams, peer: Peer) -> DescribeResult | None:
        return await self.backend.describe(p.name)

    async def migrate(self, p: MigrateParams, peer: Peer) -> MigrateResult:
        """Move every secret to another backend (``migration.py``); writes wait it out."""
        if self.migrator is None:
            raise NotSupportedError("this agent was started without migration support")

        def switch(new: Backend) -> None:
            self.backend = new

        async def ready(backend: Backend, passphrase: Secret | None) -> None:
            await self._ready(backend, passphrase, peer)

        async with self.gate.exclusive():
            result = await self.migrator.run(self.backend, p, ready, switch)
        log.info("migrate by %s: on %s, %d copied, %d removed", peer, result.backend,
                 result.migrated, result.removed)
        self.on_change()
        return result

    async def auto_lock(self) -> None:
        """Lock on the agent's own behalf (idle or unlocked too long)."""
        await self.lock(NoParams(), SELF)
