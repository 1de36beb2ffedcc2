"""The OS keychain backend, through ``keyring``.

Each secret is an ordinary keychain entry (service ``homeagent``, account =
the name, password = the current value as plain text) so the OS's own tools
show it. Beside it, reserved accounts that no valid name can take (they hold
``#`` and ``:``):

- ``#state:<name>``: JSON with version, kind, times, the previous value, a
  SHA-256 of the current value, and an undo record while a change is under way;
- ``#index``: the JSON list of names (keyring cannot enumerate).

Every multi-step change is ordered so that a crash or an error between two
steps loses no value, and ``open`` (each start) repairs what such a stop left:
see ``_reconcile``. On the freedesktop Secret Service the backend keeps one
D-Bus connection and session open instead of keyring's one per call.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread
from homeagent_secrets.protocol.errors import (
    BackendUnavailableError,
    LockedError,
    NotFoundError,
    SecretsError,
)
from homeagent_secrets.protocol.messages import DescribeResult, SecretResult
from homeagent_secrets.protocol.names import DEFAULT_KIND
from homeagent_secrets.protocol.secret import Secret

from .backend import Backend, NameLocks, RecordExport

log = logging.getLogger(__name__)

SERVICE: Final = "homeagent"
INDEX: Final = "#index"
PROBE: Final = "#probe"
STATE_PREFIX: Final = "#state:"
LOCKED_MESSAGE: Final = (
    "the OS keychain is locked: unlock your login keyring (log in to the desktop "
    "session, or open Seahorse / run `secret-tool` to be prompted), then retry"
)
T = TypeVar("T")


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@contextmanager
def keychain_errors(what: str) -> Iterator[None]:
    """Map keyring/secretstorage/D-Bus failures onto -32001 and -32006."""
    try:
        yield
    except SecretsError:
        raise
    except Exception as exc:  # the keyring backends raise many unrelated types
        name = type(exc).__name__
        if "Locked" in name or "PromptDismissed" in name:
            raise LockedError(LOCKED_MESSAGE) from None
        raise BackendUnavailableError(
            f"the OS keychain failed to {what} ({name}): check that a keyring daemon "
            "(e.g. gnome-keyring) runs on the session bus"
        ) from None


class Store(abc.ABC):
    """Blocking access to the entries of service ``homeagent``."""

    #: Whether ``accounts`` can list every entry (enables repair by enumeration).
    enumerable: bool = False

    @abc.abstractmethod
    def get(self, account: str) -> str | None: ...

    @abc.abstractmethod
    def set(self, account: str, value: str) -> None: ...

    @abc.abstractmethod
    def delete(self, account: str) -> bool: ...

    def accounts(self) -> AbstractSet[str]:
        raise NotImplementedError

    def is_locked(self) -> bool:
        return False

    def close(self) -> None:
        pass


class KeyringStore(Store):
    """Any ``keyring`` backend (macOS Keychain, Windows Credential Locker, ...)."""

    def __init__(self, keyring_backend: Any) -> None:
        self.kr = keyring_backend

    def get(self, account: str) -> str | None:
        return self.kr.get_password(SERVICE, account)  # type: ignore[no-any-return]

    def set(self, account: str, value: str) -> None:
        self.kr.set_password(SERVICE, account, value)

    def delete(self, account: str) -> bool:
        import keyring.errors

        try:
            self.kr.delete_password(SERVICE, account)
            return True
        except keyring.errors.PasswordDeleteError:
            return False


class SecretServiceStore(Store):
    """The freedesktop Secret Service over one kept-open D-Bus connection.

    Writes the attributes keyring's SecretService backend writes, so keyring,
    ``secret-tool lookup service homeagent username NAME`` and Seahorse all see
    the same entries.
    """

    enumerable = True

    def __init__(self) -> None:
        import secretstorage
        from secretstorage.util import open_session

        self._ss = secretstorage
        self.conn = secretstorage.dbus_init()
        self.collection = secretstorage.get_default_collection(self.conn)
        self.session = open_session(self.conn)
        self._paths: dict[str, str] = {}

    def _attrs(self, account: str) -> dict[str, str]:
        return {"application": "Python keyring library", "service": SERVICE, "username": account}

    def _item(self, account: str) -> Any | None:
        from secretstorage.item import Item

        path = self._paths.get(account)
        if path is None:
            found = next(iter(self.collection.search_items({"service": SERVICE, "username": account})), None)
            if found is None:
                return None
            path = self._paths[account] = found.item_path
        return Item(self.conn, path, session=self.session)

    def get(self, account: str) -> str | None:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        for _attempt in (0, 1):
            item = self._item(account)
            if item is None:
                return None
            try:
                return item.get_secret().decode("utf-8")  # type: ignore[no-any-return]
            except self._ss.exceptions.ItemNotFoundException:
                self._paths.pop(account, None)  # deleted behind our back: search again
        return None

    def set(self, account: str, value: str) -> None:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        item = self.collection.create_item(
            f"Password for '{account}' on '{SERVICE}'", self._attrs(account),
            value.encode("utf-8"), replace=True,
        )
        self._paths[account] = item.item_path

    def delete(self, account: str) -> bool:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        item = self._item(account)
        self._paths.pop(account, None)
        if item is None:
            return False
        item.delete()
        return True

    def accounts(self) -> AbstractSet[str]:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        return {i.get_attributes().get("username", "") for i in self.collection.search_items({"service": SERVICE})}

    def is_locked(self) -> bool:
        return bool(self.collection.is_locked())

    def close(self) -> None:
        self.conn.close()


def open_store() -> Store:
    """The best store for ``keyring``'s chosen backend; raises if none is usable."""
    import keyring
    from keyring.backends import SecretService

    kr = keyring.get_keyring()
    problem = unusable_reason(kr)
    if problem is None:
        return SecretServiceStore() if isinstance(kr, SecretService.Keyring) else KeyringStore(kr)
    # keyring decides once per process; the session bus may have come up since
    # (a boot-time start), so ask the Secret Service directly before giving up.
    try:
        return SecretServiceStore()
    except Exception as exc:
        raise BackendUnavailableError(
            f"no usable OS keychain: {problem}, and the Secret Service does not answer "
            f"({type(exc).__name__}); check that a keyring daemon (e.g. gnome-keyring) runs "
            "on the session bus"
        ) from None


def unusable_reason(kr: Any) -> str | None:
    """Why keyring's chosen backend is not a real keychain, or None."""
    module = type(kr).__module__
    if module.startswith(("keyring.backends.fail", "keyring.backends.null", "keyrings.alt")):
        return f"keyring chose {module}.{type(kr).__name__}, which is not a real keychain"
    try:
        priority = float(kr.priority)
    except Exception as exc:
        return f"keyring's backend is not available ({exc})"
    if priority <= 0:
        return f"keyring's backend {type(kr).__name__} has priority {priority}"
    return None


def probe_keychain() -> str | None:
    """None when a write/read/delete of a reserved entry works, else why not."""
    try:
        store = open_store()
    except SecretsError as exc:
        return exc.message
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        token = f"probe-{time.time_ns()}"
        with keychain_errors("probe"):
            store.set(PROBE, token)
            ok = store.get(PROBE) == token
            store.delete(PROBE)
        return None if ok else "a probe entry did not read back"
    except SecretsError as exc:
        return exc.message
    finally:
        store.close()


@dataclass(frozen=True)
class _State:
    version: int
    kind: str
    created: float
    updated: float
    previous_version: int
    sha: str  # of the current value
    has_previous: bool

    def describe(self, name: str) -> DescribeResult:
        return DescribeResult(name, self.kind, self.version, self.created, self.updated,  # type: ignore[arg-type]
                              self.has_previous)


def _state_doc(s: _State, previous: str | None, undo: dict[str, Any] | None = None) -> str:
    return json.dumps({"v": s.version, "k": s.kind, "c": s.created, "u": s.updated,
                       "pv": s.previous_version, "h": s.sha, "p": previous, "undo": undo})


def _parse_state(text: str) -> tuple[_State, str | None, dict[str, Any] | None]:
    d = json.loads(text)
    st = _State(int(d["v"]), str(d["k"]), float(d["c"]), float(d["u"]), int(d["pv"]), str(d["h"]),
                d.get("p") is not None)
    return st, d.get("p"), d.get("undo")


class KeychainBackend(Backend):
    """Secrets as OS keychain entries; ``list`` and metadata from memory."""

    name = "keychain"
    _no_passphrase = (
        "the OS keychain handles unlocking: unlock your login keyring instead of the agent"
    )

    def __init__(self, store_factory: Callable[[], Store] = open_store,
                 clock: Callable[[], float] = time.time) -> None:
        self._factory = store_factory
        self._clock = clock
        self._store: Store | None = None
        self._meta: dict[str, _State] | None = None  # None until loaded (keychain may be locked)
        self._limiter = anyio.CapacityLimiter(1)  # one D-Bus conversation at a time
        self._name_lock = NameLocks()
        self._locked_seen = False

    # --- plumbing -------------------------------------------------------------------

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            with keychain_errors(what):
                if self._store is None:
                    self._store = self._factory()
                return fn(self._store, *args)

        try:
            result = await anyio.to_thread.run_sync(call, limiter=self._limiter)
        except LockedError:
            self._locked_seen = True
            raise
        except BackendUnavailableError:
            self._drop_store()
            raise
        self._locked_seen = False
        return result

    def _drop_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:
                pass

    async def _loaded(self) -> dict[str, _State]:
        if self._meta is None:
            self._meta = await self._run("read the index", self._reconcile)
        return self._meta

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._loaded()
            log.info("keychain backend: %d secret(s) indexed", len(self._meta or {}))
        except LockedError:
            log.warning("the OS keychain is locked; requests get -32001 until it is unlocked")
        except BackendUnavailableError as exc:
            log.warning("%s; requests get -32006 until it answers", exc.message)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._drop_store, limiter=self._limiter)

    @property
    def locked(self) -> bool:
        return self._locked_seen

    async def probe(self) -> None:
        try:
            self._locked_seen = await self._run("check its lock state", lambda s: s.is_locked())
        except SecretsError:
            pass

    async def count(self) -> int | None:
        try:
            return len(await self._loaded())
        except SecretsError:
            return None

    # --- repair ---------------------------------------------------------------------------

    def _reconcile(self, store: Store) -> dict[str, _State]:
        """Load the index and repair what an interrupted change left behind."""
        raw = store.get(INDEX)
        listed: list[str] = json.loads(raw) if raw else []
        names = set(listed)
        if store.enumerable:
            for account in store.accounts():
                if account.startswith(STATE_PREFIX):
                    names.add(account[len(STATE_PREFIX):])
                elif not account.startswith("#") and account:
                    names.add(account)
        meta: dict[str, _State] = {}
        for name in sorted(names):
            current = store.get(name)
            state_text = store.get(STATE_PREFIX + name)
            if current is None:
                # Never completed (a store stopped before its value) or a delete
                # stopped after removing the value: either way the name is gone.
                if state_text is not None:
                    store.delete(STATE_PREFIX + name)
                continue
            if state_text is None:
                now = self._clock()  # an entry made by another tool: adopt it
                st = _State(1, DEFAULT_KIND, now, now, 0, _sha(current), False)
                store.set(STATE_PREFIX + name, _state_doc(st, None))
            else:
                st, previous, undo = _parse_state(state_text)
                if st.sha != _sha(current):
                    if undo is not None and undo.get("h") == _sha(current):
                        # A change stopped before its new value was written: roll back.
                        st = replace(st, version=int(undo["v"]), updated=float(undo["u"]),
                                     previous_version=int(undo["pv"]), sha=undo["h"],
                                     has_previous=undo.get("p") is not None)
                        store.set(STATE_PREFIX + name, _state_doc(st, undo.get("p")))
                        log.warning("repaired %r: an interrupted change was rolled back", name)
                    else:  # changed with the OS's own tools: take it as a new version
                        st = replace(st, version=st.version + 1, updated=self._clock(), sha=_sha(current))
                        store.set(STATE_PREFIX + name, _state_doc(st, previous))
                        log.info("%r was changed outside the agent; now version %d", name, st.version)
                elif undo is not None:  # the change completed; only the cleanup was lost
                    store.set(STATE_PREFIX + name, _state_doc(st, previous))
            meta[name] = st
        if sorted(meta) != listed:
            store.set(INDEX, json.dumps(sorted(meta)))
        return meta

    # --- secrets --------------------------------------------------------------------------

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        meta = await self._loaded()
        st = meta.get(name)
        if st is None:
            return None
        if not previous:
            value = await self._run("read a secret", lambda s: s.get(name))
            return None if value is None else SecretResult(name, Secret(value), st.version)
        if not st.has_previous:
            return None
        text = await self._run("read a secret's state", lambda s: s.get(STATE_PREFIX + name))
        prev = None if text is None else _parse_state(text)[1]
        return None if prev is None else SecretResult(name, Secret(prev), st.previous_version)

    async def describe(self, name: str) -> DescribeResult | None:
        st = (await self._loaded()).get(name)
        return None if st is None else st.describe(name)

    async def list(self, prefix: str) -> list[str]:
        return sorted(n for n in await self._loaded() if n.startswith(prefix))

    async def store(self, name: str, value: Secret, kind: str | None) -> int:
        return await self._write(name, value, kind, must_exist=False)

    async def rotate(self, name: str, value: Secret) -> int:
        return await self._write(name, value, None, must_exist=True)

    async def _write(self, name: str, value: Secret, kind: str | None, must_exist: bool) -> int:
        meta = await self._loaded()
        async with self._name_lock(name):
            old = meta.get(name)
            if old is None and must_exist:
                raise NotFoundError(f"no secret named {name!r} to rotate: store it first")
            st = await self._run("store a secret", self._write_sync, name, value.reveal(), kind, old)
            meta[name] = st
            return st.version

    def _write_sync(self, store: Store, name: str, value: str, kind: str | None, old: _State | None) -> _State:
        now = self._clock()
        if old is None:
            # Order: index, then state, then value. A stop in between leaves a
            # name without a value, which every read treats as absent and the
            # next start removes.
            names = set(json.loads(store.get(INDEX) or "[]"))
            if name not in names:
                store.set(INDEX, json.dumps(sorted(names | {name})))
            st = _State(1, kind or DEFAULT_KIND, now, now, 0, _sha(value), False)
            store.set(STATE_PREFIX + name, _state_doc(st, None))
            store.set(name, value)
            return st
        current = store.get(name)
        text = store.get(STATE_PREFIX + name)
        old_previous = _parse_state(text)[1] if text else None
        if current is None:
            raise BackendUnavailableError(f"the keychain entry of {name!r} vanished; retry")
        st = _State(old.version + 1, kind or old.kind, old.created, now, old.version, _sha(value), True)
        undo = {"v": old.version, "u": old.updated, "pv": old.previous_version, "h": old.sha, "p": old_previous}
        # State first, carrying its own undo; then the value; then drop the undo.
        # A stop between the first two is rolled back by _reconcile.
        store.set(STATE_PREFIX + name, _state_doc(st, current, undo))
        store.set(name, value)
        store.set(STATE_PREFIX + name, _state_doc(st, current))
        return st

    async def delete(self, name: str) -> bool:
        meta = await self._loaded()
        async with self._name_lock(name):
            if name not in meta:
                return False
            await self._run("delete a secret", self._delete_sync, name)
            meta.pop(name, None)
            return True

    @staticmethod
    def _delete_sync(store: Store, name: str) -> None:
        # Value first: from then on the name reads as absent everywhere.
        store.delete(name)
        store.delete(STATE_PREFIX + name)
        names = set(json.loads(store.get(INDEX) or "[]"))
        names.discard(name)
        store.set(INDEX, json.dumps(sorted(names)))

    # --- migration --------------------------------------------------------------------------

    async def export(self, name: str) -> RecordExport | None:
        st = (await self._loaded()).get(name)
        if st is None:
            return None
        current = await self._run("read a secret", lambda s: s.get(name))
        text = await self._run("read a secret's state", lambda s: s.get(STATE_PREFIX + name))
        if current is None or text is None:
            return None
        previous = _parse_state(text)[1]
        return RecordExport(current, previous, st.version, st.previous_version, st.kind, st.created, st.updated)

    async def import_(self, name: str, rec: RecordExport) -> None:
        meta = await self._loaded()
        st = _State(rec.version, rec.kind, rec.created, rec.updated, rec.previous_version,
                    _sha(rec.current), rec.previous is not None)

        def write(store: Store) -> None:
            names = set(json.loads(store.get(INDEX) or "[]"))
            if name not in names:
                store.set(INDEX, json.dumps(sorted(names | {name})))
            store.set(STATE_PREFIX + name, _state_doc(st, rec.previous))
            store.set(name, rec.current)

        async with self._name_lock(name):
            await self._run("store a secret", write)
            meta[name] = st
