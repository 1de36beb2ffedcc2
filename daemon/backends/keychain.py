"""The OS keychain backend, through ``keyring``: its state format and its repair.

Each secret is an ordinary keychain entry (service ``homeagent``, account =
the name, password = the current value as plain text) so the OS's own tools
show it. Beside it, reserved accounts that no valid name can take (they hold
``#`` and ``:``):

- ``#state:<name>``: JSON with version, kind, times, the previous value, a
  SHA-256 of the current value, and an undo record while a change is under way;
- ``#index``: the JSON list of names (keyring cannot enumerate).

Every multi-step change is ordered so that a crash or an error between two
steps loses no value, and ``open`` (each start) repairs what such a stop left:
see ``_reconcile``. The entries themselves are reached through
``keychain_store.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from homeagent_secrets.protocol.errors import BackendUnavailableError, SecretsError
from homeagent_secrets.protocol.messages import DescribeResult, SecretResult
from homeagent_secrets.protocol.names import DEFAULT_KIND, as_kind, name_problem
from homeagent_secrets.protocol.secret import Secret

from .base import RecordExport, ThreadedBackend
from .keychain_store import Store, keychain_errors, open_store

log = logging.getLogger(__name__)

INDEX: Final = "#index"
STATE_PREFIX: Final = "#state:"
T = TypeVar("T")


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


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
        return DescribeResult(name, as_kind(self.kind), self.version, self.created, self.updated,
                              self.has_previous)


def _state_doc(s: _State, previous: str | None, undo: dict[str, Any] | None = None) -> str:
    return json.dumps({"v": s.version, "k": s.kind, "c": s.created, "u": s.updated,
                       "pv": s.previous_version, "h": s.sha, "p": previous, "undo": undo})


def _parse_state(text: str) -> tuple[_State, str | None, dict[str, Any] | None]:
    d = json.loads(text)
    st = _State(int(d["v"]), str(d["k"]), float(d["c"]), float(d["u"]), int(d["pv"]), str(d["h"]),
                d.get("p") is not None)
    return st, d.get("p"), d.get("undo")


def _parse_index(text: str | None) -> list[str] | None:
    """The names in an ``#index`` entry (its strings: another tool may have added
    other things); None when it is not a JSON list at all: the caller rebuilds it."""
    try:
        names = json.loads(text or "[]")
    except ValueError:
        return None
    if not isinstance(names, list):
        return None
    return [n for n in names if isinstance(n, str)]


def _index_names(store: Store) -> set[str]:
    return set(_parse_index(store.get(INDEX)) or ())


class KeychainBackend(ThreadedBackend):
    """Secrets as OS keychain entries; ``list`` and metadata from memory."""

    name = "keychain"
    threads = 1  # one D-Bus conversation at a time
    no_passphrase_message = (
        "the OS keychain handles unlocking: unlock your login keyring instead of the agent"
    )

    def __init__(self, store_factory: Callable[[], Store] = open_store,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._factory = store_factory
        self._clock = clock
        self._store: Store | None = None
        self._meta: dict[str, _State] | None = None  # None until loaded (keychain may be locked)
        self._skipped: set[str] = set()  # invalid names seen under our service, logged once

    # --- plumbing -------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            with keychain_errors(what):
                if self._store is None:
                    self._store = self._factory()
                return fn(self._store, *args)
        except BackendUnavailableError:
            self._drop_store()
            raise

    def _drop_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:
                pass  # a dead connection may fail to close; it is dropped either way

    async def _loaded(self) -> dict[str, _State]:
        if self._meta is None:
            self._meta = await self._run("read the index", self._reconcile)
        return self._meta

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._loaded()
            self.reachable = True
            log.info("keychain backend: %d secret(s) indexed", len(self._meta or {}))
        except SecretsError as exc:
            self.reachable = exc.code == -32001  # a locked keychain is there all the same
            log.warning("%s; requests fail until the keychain answers", exc.message)

    async def close(self) -> None:
        import anyio.to_thread

        await anyio.to_thread.run_sync(self._drop_store, limiter=self._limiter)

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
        listed = _parse_index(store.get(INDEX))
        if listed is None:
            log.warning("the keychain entry %s under service homeagent is not a list of names; "
                        "rebuilt from the entries", INDEX)
            listed = []
        names = set(listed)
        if store.enumerable:
            for account in store.accounts():
                if account.startswith(STATE_PREFIX):
                    names.add(account[len(STATE_PREFIX):])
                elif not account.startswith("#") and account:
                    names.add(account)
        meta: dict[str, _State] = {}
        for name in sorted(names):
            if name_problem(name) is not None:
                # Made by another tool under our service: a name no client could
                # ask for (and one a terminal would render); left alone.
                if name not in self._skipped:
                    self._skipped.add(name)
                    log.warning("keychain entry %s under service homeagent is not a valid "
                                "secret name; ignored (rename or remove it with your keychain's "
                                "own tools)", ascii(name)[:80])
                continue
            st = self._repair_one(store, name)
            if st is not None:
                meta[name] = st
        if sorted(meta) != listed:
            store.set(INDEX, json.dumps(sorted(meta)))
        return meta

    def _repair_one(self, store: Store, name: str) -> _State | None:
        current = store.get(name)
        state_text = store.get(STATE_PREFIX + name)
        if current is None:
            # Never completed (a store stopped before its value) or a delete
            # stopped after removing the value: either way the name is gone.
            if state_text is not None:
                store.delete(STATE_PREFIX + name)
            return None
        if state_text is None:
            now = self._clock()  # an entry made by another tool: adopt it
            st = _State(1, DEFAULT_KIND, now, now, 0, _sha(current), False)
            store.set(STATE_PREFIX + name, _state_doc(st, None))
            return st
        try:
            st, previous, undo = _parse_state(state_text)
            if undo is not None and not isinstance(undo, dict):
                raise TypeError("undo")
        except (ValueError, TypeError, KeyError, AttributeError):
            # Not a state this agent wrote (another tool, or damage): adopt the value
            # as version 1 instead of failing every request of every name.
            log.warning("the state entry of %r under service homeagent is unreadable; its "
                        "value is adopted as version 1 (the previous value is lost)", name)
            now = self._clock()
            st = _State(1, DEFAULT_KIND, now, now, 0, _sha(current), False)
            store.set(STATE_PREFIX + name, _state_doc(st, None))
            return st
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
        return st

    # --- reads ----------------------------------------------------------------------------

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        st = (await self._loaded()).get(name)
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

    async def export(self, name: str) -> RecordExport | None:
        st = (await self._loaded()).get(name)
        if st is None:
            return None
        current = await self._run("read a secret", lambda s: s.get(name))
        text = await self._run("read a secret's state", lambda s: s.get(STATE_PREFIX + name))
        if current is None or text is None:
            return None
        previous = _parse_state(text)[1]
        return RecordExport(current, previous, st.version, st.previous_version, st.kind,
                            st.created, st.updated)

    # --- writes (the base class holds the name's lock) --------------------------------------

    async def _head(self, name: str) -> int | None:
        st = (await self._loaded()).get(name)
        return None if st is None else st.version

    async def _put(self, name: str, value: Secret, kind: str | None, expect: int | None) -> int:
        meta = await self._loaded()
        st = await self._run("store a secret", self._put_sync, name, value.reveal(), kind,
                             meta.get(name))
        meta[name] = st
        return st.version

    def _put_sync(self, store: Store, name: str, value: str, kind: str | None,
                  old: _State | None) -> _State:
        now = self._clock()
        if old is None:
            # Order: index, then state, then value. A stop in between leaves a
            # name without a value, which every read treats as absent and the
            # next start removes.
            names = _index_names(store)
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
        undo = {"v": old.version, "u": old.updated, "pv": old.previous_version, "h": old.sha,
                "p": old_previous}
        # State first, carrying its own undo; then the value; then drop the undo.
        # A stop between the first two is rolled back by _reconcile.
        store.set(STATE_PREFIX + name, _state_doc(st, current, undo))
        store.set(name, value)
        store.set(STATE_PREFIX + name, _state_doc(st, current))
        return st

    async def _remove(self, name: str, force: bool) -> bool:
        meta = await self._loaded()
        if name not in meta:
            return False
        await self._run("delete a secret", self._remove_sync, name)
        meta.pop(name, None)
        return True

    @staticmethod
    def _remove_sync(store: Store, name: str) -> None:
        # Value first: from then on the name reads as absent everywhere.
        store.delete(name)
        store.delete(STATE_PREFIX + name)
        names = _index_names(store)
        names.discard(name)
        store.set(INDEX, json.dumps(sorted(names)))

    async def _import(self, name: str, rec: RecordExport) -> None:
        meta = await self._loaded()
        st = _State(rec.version, rec.kind, rec.created, rec.updated, rec.previous_version,
                    _sha(rec.current), rec.previous is not None)

        def write(store: Store) -> None:
            names = _index_names(store)
            if name not in names:
                store.set(INDEX, json.dumps(sorted(names | {name})))
            store.set(STATE_PREFIX + name, _state_doc(st, rec.previous))
            store.set(name, rec.current)

        await self._run("store a secret", write)
        meta[name] = st
