"""SecretsClient: the blocking client (plain ``socket``), thread-safe."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.errors import AgentUnreachableError, InvalidParams, SecretsError
from homeagent_secrets.protocol.messages import (
    DescribeResult,
    Method,
    MigrateResult,
    Params,
    SecretResult,
    StatusResult,
    WhoamiResult,
)
from homeagent_secrets.protocol.names import BackendName, Kind
from homeagent_secrets.protocol.rpc import ClientProtocol, Reply
from homeagent_secrets.protocol.secret import Secret

from . import connect
from .cache import MISS, SyncCache
from .connect import as_secret
from .events import WatchEvent, event_of

P = TypeVar("P", bound=Params)
R = TypeVar("R")


class _Dropped(Exception):
    """The connection ended before the reply arrived."""


class SecretsClient:
    """One persistent connection to secretsd, shared by all threads.

    Calls are serialized on the connection. If the daemon restarted, the next
    call reconnects once by itself; a write whose connection drops after it was
    sent is not replayed (it may have been applied) and raises instead.

    With ``cache=True``, ``retrieve``/``get`` (current values) answer from this
    process's memory while a watch (its own connection, read by a background
    thread) says the cached version is current; see ``client/cache.py`` for
    the rules. The watch opens on the first ``retrieve``.
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        timeout: float = connect.DEFAULT_TIMEOUT,
        connect_timeout: float = connect.DEFAULT_CONNECT_TIMEOUT,
        cache: bool = False,
    ) -> None:
        self.socket_path = connect.socket_path(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proto = ClientProtocol()
        self.cache = SyncCache(self.socket_path, connect_timeout, timeout) if cache else None

    # --- connection -------------------------------------------------------------

    def _connect(self) -> socket.socket:
        sock = connect.open_socket(self.socket_path, self.connect_timeout)
        self._sock = sock
        self._proto = ClientProtocol()
        return sock

    def close(self) -> None:
        """Close the connection and the cache's watch (a later call opens new ones)."""
        if self.cache is not None:
            self.cache.close()
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SecretsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exchange(self, sock: socket.socket, ids: set[int], line: bytes, timeout: float,
                  proto: ClientProtocol | None = None) -> dict[int, Reply]:
        proto = proto or self._proto
        try:
            sock.sendall(line)
        except OSError:
            self._raise_refusal(sock)
            raise _Dropped(False) from None  # nothing reached the daemon
        deadline = time.monotonic() + timeout
        got: dict[int, Reply] = {}
        while len(got) < len(ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError from None
            except OSError:
                raise _Dropped(True) from None
            if not data:
                raise _Dropped(True)
            for reply in proto.receive_data(data):
                if reply.id is None and reply.error is not None:
                    raise reply.error  # about the connection itself: nothing was run
                if isinstance(reply.id, int) and reply.id in ids:
                    got[reply.id] = reply
        return got

    def _raise_refusal(self, sock: socket.socket) -> None:
        """Raise the id-null error the agent sent before closing, if it did (the
        connection cap refuses and closes at once: a send after that fails)."""
        try:
            while data := sock.recv(65536, socket.MSG_DONTWAIT):
                for reply in self._proto.receive_data(data):
                    if reply.id is None and reply.error is not None:
                        raise reply.error
        except OSError:
            pass

    def _send(self, methods: list[Method[Any, Any]], params: list[Params],
              timeout: float | None) -> list[Reply]:
        timeout = self.timeout if timeout is None else timeout
        name = methods[0].name if len(methods) == 1 else "batch"
        with self._lock:
            for attempt in (0, 1):
                sock = self._sock or self._connect()
                if len(methods) == 1:
                    id_, line = self._proto.request(methods[0], params[0])
                    connect.check_size(line, methods[0])
                    ids = [id_]
                else:  # batches of at most BATCH_MAX, sent together: one round trip
                    ids, lines = [], []
                    calls = list(zip(methods, params, strict=True))
                    for i in range(0, len(calls), connect.BATCH_MAX):
                        chunk_ids, chunk = self._proto.batch(calls[i:i + connect.BATCH_MAX])
                        connect.check_size(chunk, calls[i][0])
                        ids += chunk_ids
                        lines.append(chunk)
                    line = b"".join(lines)
                try:
                    got = self._exchange(sock, set(ids), line, timeout)
                except _Dropped as dropped:
                    self._drop()
                    sent = bool(dropped.args[0])
                    if attempt == 0 and all(connect.may_resend(mt, sent) for mt in methods):
                        continue
                    raise connect.unreachable(
                        self.socket_path,
                        "the connection closed during the call"
                        + ("; the request may or may not have been applied" if sent else ""),
                    ) from None
                except TimeoutError:
                    self._drop()  # a late reply must not be taken for the next call's
                    raise connect.no_answer(name, timeout) from None
                except SecretsError:
                    self._drop()
                    raise
                return [got[i] for i in ids]
        raise AssertionError("unreachable")

    def call(self, method: Method[P, R], params: P, timeout: float | None = None) -> R:
        """Send one request and return its typed result; raises SecretsError subclasses."""
        reply = self._send([method], [params], timeout)[0]
        if reply.error is not None:
            raise reply.error
        return self._proto.decode_result(method, reply.result)

    def call_many(self, method: Method[P, R], params: Sequence[P], timeout: float | None = None) -> list[R]:
        """Send every request in one round trip (batches of at most 100, written together)
        and return the typed results in order; the first error (in order) is raised."""
        if not params:
            return []
        replies = self._send([method] * len(params), list(params), timeout)
        for reply in replies:
            if reply.error is not None:
                raise reply.error
        return [self._proto.decode_result(method, r.result) for r in replies]

    def watch(self, patterns: Sequence[str] = (), *, timeout: float | None = None) -> Iterator[WatchEvent]:
        """Events for the names matching ``patterns`` (all the caller may read when empty),
        on a connection of their own, until the generator is closed.

        ``timeout`` (seconds without any event) ends it with AgentUnreachableError;
        None waits for ever. A dropped connection ends it with AgentUnreachableError:
        watch again and read again what matters (events may have been missed).
        """
        sock = connect.open_socket(self.socket_path, self.connect_timeout)
        proto = ClientProtocol()
        try:
            id_, line = proto.request(m.WATCH, m.WatchParams(list(patterns)))
            try:
                reply = self._exchange(sock, {id_}, line, self.timeout, proto)[id_]
            except (_Dropped, TimeoutError):
                raise connect.unreachable(self.socket_path, "no answer to watch") from None
            if reply.error is not None:
                raise reply.error
            sock.settimeout(timeout)
            while True:
                for note in proto.notifications:
                    event = event_of(note)
                    if event is not None:
                        yield event
                proto.notifications.clear()
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    raise AgentUnreachableError(f"no event within {timeout:g} s") from None
                except OSError:
                    data = b""
                if not data:
                    raise connect.unreachable(self.socket_path, "the watch's connection closed")
                proto.receive_data(data)
        finally:
            sock.close()

    # --- the method table --------------------------------------------------------

    def status(self) -> StatusResult:
        return self.call(m.STATUS, m.NoParams())

    def whoami(self) -> WhoamiResult:
        """What the agent sees of this process, and what the access rules grant it."""
        return self.call(m.WHOAMI, m.NoParams())

    def init(self, passphrase: str | Secret) -> None:
        self.call(m.INIT, m.InitParams(as_secret(passphrase)))

    def unlock(self, passphrase: str | Secret) -> None:
        self.call(m.UNLOCK, m.PassphraseParams(as_secret(passphrase)))

    def lock(self) -> None:
        self.call(m.LOCK, m.NoParams())

    def change_passphrase(self, old: str | Secret, new: str | Secret) -> None:
        self.call(m.CHANGE_PASSPHRASE, m.ChangePassphraseParams(as_secret(old), as_secret(new)))

    def rekey(self, old: str | Secret, new: str | Secret) -> int:
        """Replace the data key (every secret re-encrypted); how many secrets."""
        return self.call(m.REKEY, m.RekeyParams(as_secret(old), as_secret(new))).rekeyed

    def store(self, name: str, value: str | Secret, kind: Kind | None = None) -> int:
        version = self.call(m.STORE, m.StoreParams(name, as_secret(value), kind)).version
        if self.cache is not None:
            self.cache.wrote(name, version)
        return version

    def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        """The value (a ``Secret``) and version of ``name``, or None when absent."""
        cache = self.cache
        if cache is None or previous:
            return self.call(m.RETRIEVE, m.RetrieveParams(name, "previous" if previous else "current"))
        found = cache.lookup(name)
        if found is not MISS:
            return found  # type: ignore[return-value]
        token = cache.token()
        result = self.call(m.RETRIEVE, m.RetrieveParams(name))
        cache.fill(name, result, token)
        return result

    def get(self, name: str, previous: bool = False) -> str | None:
        """The plain value, or None: the ``keyring.get_password`` of this agent."""
        cache = self.cache
        if cache is not None and not previous:  # the hot path, one call shallower
            found = cache.lookup(name)
            if found is not MISS:
                return None if found is None else found.value.reveal()  # type: ignore[union-attr]
        result = self.retrieve(name, previous)
        return None if result is None else result.value.reveal()

    def retrieve_many(self, names: Iterable[str]) -> dict[str, SecretResult | None]:
        """Current values of ``names`` in one round trip (cached ones from memory):
        a dict in the order given (duplicates once), None for an absent name.
        Any error (an invalid name, a denied one, locked) is raised, the first in order."""
        wanted = list(dict.fromkeys(names))
        found: dict[str, SecretResult | None] = {}
        cache = self.cache
        ask = wanted
        if cache is not None:
            ask = []
            for name in wanted:
                hit = cache.lookup(name)
                if hit is MISS:
                    ask.append(name)
                else:
                    found[name] = hit  # type: ignore[assignment]
        token = cache.token() if cache is not None else 0
        results = self.call_many(m.RETRIEVE, [m.RetrieveParams(n) for n in ask])
        for name, result in zip(ask, results, strict=True):
            found[name] = result
            if cache is not None:
                cache.fill(name, result, token)
        return {name: found[name] for name in wanted}

    def get_many(self, names: Iterable[str]) -> dict[str, str | None]:
        """Plain values of ``names`` in one round trip: name -> value, None when absent
        (see ``retrieve_many`` for order and errors)."""
        return {name: None if r is None else r.value.reveal() for name, r in self.retrieve_many(names).items()}

    def delete(self, name: str, force: bool = False) -> bool:
        """Delete a secret; ``force`` also removes a damaged record of that name."""
        existed = self.call(m.DELETE, m.DeleteParams(name, force))
        if self.cache is not None:
            self.cache.wrote(name, 0)
        return existed

    def list(self, prefix: str = "") -> list[str]:
        """Every name starting with ``prefix``, sorted (fetched a page at a time)."""
        names: list[str] = []
        after = ""
        while True:
            try:
                page = self.call(m.LIST, m.ListParams(prefix, after, connect.LIST_PAGE))
            except InvalidParams:
                if after or names:
                    raise
                return self.call(m.LIST, m.ListParams(prefix))  # an agent without paging
            names += page
            if len(page) < connect.LIST_PAGE:
                return names
            after = page[-1]

    def rotate(self, name: str, value: str | Secret) -> int:
        version = self.call(m.ROTATE, m.RotateParams(name, as_secret(value))).version
        if self.cache is not None:
            self.cache.wrote(name, version)
        return version

    def describe(self, name: str) -> DescribeResult | None:
        return self.call(m.DESCRIBE, m.NameParams(name))

    def migrate(self, to: BackendName, passphrase: str | Secret | None = None,
                source: BackendName | None = None) -> MigrateResult:
        """Move every secret to the ``to`` backend (see ``secretsctl migrate``)."""
        secret = None if passphrase is None else as_secret(passphrase)
        return self.call(m.MIGRATE, m.MigrateParams(to, secret, source), timeout=max(self.timeout, 600))
