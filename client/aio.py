"""AsyncSecretsClient: the anyio client; concurrent calls share one connection.

Requests are multiplexed by id: a reader task (in the client's own task group,
so use ``async with``) hands each reply to the call waiting for it.

Why one module of ~500 lines: the connection, the multiplexer, the watch and
every typed method share the client's task group and its one lock; the shared
parts with the blocking client live in ``connect.py`` and ``cache.py``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc

from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.errors import InvalidParams, SecretsError
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
from .cache import BACKOFF_FIRST, BACKOFF_MAX, MISS, CacheCore, Entry, open_watch
from .connect import as_secret
from .events import WatchEvent, event_of

P = TypeVar("P", bound=Params)
R = TypeVar("R")


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Reply | None = None  # None after the event: the connection dropped


class _Connection:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.proto = ClientProtocol()
        self.waiters: dict[int, _Waiter] = {}
        self.send_lock = anyio.Lock()
        self.open = True
        self.error: SecretsError | None = None  # an id-null error that closed it
        self.ended = anyio.Event()  # the reader is done: ``error`` is final

    def fail_all(self) -> None:
        self.open = False
        for w in self.waiters.values():
            w.event.set()
        self.waiters.clear()


class _AsyncCache:
    """The async client's cache (rules in ``client/cache.py``): a task in the
    client's task group keeps the watch open and read. Everything runs on the
    event loop's thread, so no lock is needed."""

    def __init__(self, path: Path, connect_timeout: float, timeout: float) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.core = CacheCore()
        self._entries = self.core.entries
        self.started = False
        self.scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return repr(self.core)

    def lookup(self, name: str) -> Entry | object:
        core = self.core
        if not core.serving:
            if core.behind and core.drain():
                core.caught_up()
            return MISS
        if core.epoll.poll(0):  # an event is waiting: apply it before answering
            core.drain()
            if not core.serving:
                return MISS
        return self._entries.get(name, MISS)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the watch (the first attempt before ``started``), follow it, reopen it."""
        backoff = BACKOFF_FIRST
        first = True
        with anyio.CancelScope() as self.scope:
            try:
                while True:
                    try:
                        sock, proto = await anyio.to_thread.run_sync(
                            open_watch, self.path, (), self.connect_timeout, self.timeout)
                    except SecretsError:
                        if first:
                            first = False
                            task_status.started()
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        continue
                    self.core.attach(sock, proto)
                    backoff = BACKOFF_FIRST
                    if first:
                        first = False
                        task_status.started()
                    try:
                        while self.core.live:
                            await anyio.wait_readable(sock)
                            if not self.core.drain():
                                break
                    finally:
                        self.core.detach()
            finally:
                self.core.detach()

    def close(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        self.started = False
        self.core.detach()


class AsyncSecretsClient:
    """``async with AsyncSecretsClient() as c: await c.retrieve("name")``.

    With ``cache=True``, ``retrieve``/``get`` of current values answer from
    memory while a watch says the cached version is current (the rules of
    ``SecretsClient(cache=True)``, see ``client/cache.py``); the watch is a
    task of the client's task group, opened by the first ``retrieve``.
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
        self._conn: _Connection | None = None
        self._connect_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self.cache = _AsyncCache(self.socket_path, connect_timeout, timeout) if cache else None

    async def __aenter__(self) -> AsyncSecretsClient:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None
        try:
            await self.aclose()
        finally:
            self._tg.cancel_scope.cancel()
            # The task group holds only this client's reader; the caller's own
            # exception is not handed to it, so it propagates as itself (a
            # LockedError stays a LockedError, not an ExceptionGroup around one).
            await self._tg.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        if self.cache is not None:
            self.cache.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail_all()
            await conn.stream.aclose()

    async def _connection(self) -> _Connection:
        if self._tg is None:
            raise RuntimeError("use `async with AsyncSecretsClient() as client:`")
        async with self._connect_lock:
            if self._conn is not None and self._conn.open:
                return self._conn
            try:
                with anyio.fail_after(self.connect_timeout):
                    stream = await anyio.connect_unix(self.socket_path)
            except (OSError, TimeoutError) as exc:
                raise connect.connect_error(self.socket_path, exc) from None
            try:
                raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                connect.check_server(raw, self.socket_path)
            except BaseException:
                await stream.aclose()
                raise
            conn = self._conn = _Connection(stream)
            self._tg.start_soon(self._read, conn)
            return conn

    async def _read(self, conn: _Connection) -> None:
        try:
            while True:
                data = await conn.stream.receive(65536)
                for reply in conn.proto.receive_data(data):
                    if reply.id is None and reply.error is not None:
                        conn.error = reply.error  # about the connection: every call gets it
                        return
                    waiter = conn.waiters.pop(reply.id, None) if isinstance(reply.id, int) else None
                    if waiter is not None:
                        waiter.reply = reply
                        waiter.event.set()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except SecretsError as exc:
            conn.error = exc
        finally:
            conn.fail_all()
            conn.ended.set()
            if self._conn is conn:
                self._conn = None

    async def call(self, method: Method[P, R], params: P, timeout: float | None = None) -> R:
        """Send one request and return its typed result; raises SecretsError subclasses."""
        timeout = self.timeout if timeout is None else timeout
        for attempt in (0, 1):
            conn = await self._connection()
            id_, line = conn.proto.request(method, params)
            connect.check_size(line, method)
            waiter = conn.waiters[id_] = _Waiter()
            try:
                async with conn.send_lock:
                    await conn.stream.send(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                conn.waiters.pop(id_, None)
                conn.fail_all()
                # The agent may have refused the connection (id-null error) and closed
                # it before this send: the reader still has that line to read.
                with anyio.move_on_after(self.connect_timeout):
                    await conn.ended.wait()
                if conn.error is not None:
                    raise conn.error from None
                if attempt == 0 and connect.may_resend(method, sent=False):
                    continue  # nothing reached the daemon: safe to send again
                raise connect.unreachable(self.socket_path, "the connection closed") from None
            try:
                with anyio.fail_after(timeout):
                    await waiter.event.wait()
            except TimeoutError:
                conn.waiters.pop(id_, None)
                raise connect.no_answer(method.name, timeout) from None
            reply = waiter.reply
            if reply is None:
                with anyio.move_on_after(self.connect_timeout):
                    await conn.ended.wait()  # another call's failed send may have woken this one
                if conn.error is not None:
                    raise conn.error
                if attempt == 0 and connect.may_resend(method, sent=True):
                    continue
                raise connect.unreachable(
                    self.socket_path,
                    "the connection closed during the call; the request may or may not have been applied",
                )
            if reply.error is not None:
                raise reply.error
            return conn.proto.decode_result(method, reply.result)
        raise AssertionError("unreachable")

    async def call_many(self, method: Method[P, R], params: Sequence[P], timeout: float | None = None) -> list[R]:
        """Send every request in one round trip (batches of at most 100, written together)
        and return the typed results in order; the first error (in order) is raised."""
        if not params:
            return []
        timeout = self.timeout if timeout is None else timeout
        for attempt in (0, 1):
            conn = await self._connection()
            ids: list[int] = []
            lines: list[bytes] = []
            for i in range(0, len(params), connect.BATCH_MAX):
                chunk_ids, line = conn.proto.batch([(method, p) for p in params[i:i + connect.BATCH_MAX]])
                connect.check_size(line, method)
                ids += chunk_ids
                lines.append(line)
            waiters = [conn.waiters.setdefault(i, _Waiter()) for i in ids]
            try:
                async with conn.send_lock:
                    await conn.stream.send(b"".join(lines))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                for i in ids:
                    conn.waiters.pop(i, None)
                conn.fail_all()
                if attempt == 0:
                    continue  # nothing reached the daemon
                raise connect.unreachable(self.socket_path, "the connection closed") from None
            try:
                with anyio.fail_after(timeout):
                    for w in waiters:
                        await w.event.wait()
            except TimeoutError:
                for i in ids:
                    conn.waiters.pop(i, None)
                raise connect.no_answer(f"a batch of {method.name}", timeout) from None
            if any(w.reply is None for w in waiters):
                if conn.error is not None:
                    raise conn.error
                if attempt == 0 and connect.may_resend(method, sent=True):
                    continue
                raise connect.unreachable(
                    self.socket_path,
                    "the connection closed during the call; the requests may or may not have been applied",
                )
            replies = [w.reply for w in waiters]
            for reply in replies:
                assert reply is not None
                if reply.error is not None:
                    raise reply.error
            return [conn.proto.decode_result(method, r.result) for r in replies if r is not None]
        raise AssertionError("unreachable")

    async def watch(self, patterns: Sequence[str] = ()) -> AsyncIterator[WatchEvent]:
        """Events for the names matching ``patterns`` (all the caller may read when
        empty), on a connection of their own, until the iteration stops.

        A dropped connection ends it with AgentUnreachableError: watch again and
        read again what matters (events may have been missed).
        """
        try:
            with anyio.fail_after(self.connect_timeout):
                stream = await anyio.connect_unix(self.socket_path)
        except (OSError, TimeoutError) as exc:
            raise connect.connect_error(self.socket_path, exc) from None
        async with stream:
            connect.check_server(stream.extra(anyio.abc.SocketAttribute.raw_socket), self.socket_path)
            proto = ClientProtocol()
            id_, line = proto.request(m.WATCH, m.WatchParams(list(patterns)))
            await stream.send(line)
            answered = False
            while True:
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    raise connect.unreachable(self.socket_path, "the watch's connection closed") from None
                for reply in proto.receive_data(data):
                    if reply.error is not None and reply.id in (id_, None):
                        raise reply.error
                    answered = answered or reply.id == id_
                if not answered:
                    continue
                notes, proto.notifications = proto.notifications, []
                for note in notes:
                    event = event_of(note)
                    if event is not None:
                        yield event

    # --- the method table --------------------------------------------------------

    async def status(self) -> StatusResult:
        return await self.call(m.STATUS, m.NoParams())

    async def whoami(self) -> WhoamiResult:
        """What the agent sees of this process, and what the access rules grant it."""
        return await self.call(m.WHOAMI, m.NoParams())

    async def init(self, passphrase: str | Secret) -> None:
        await self.call(m.INIT, m.InitParams(as_secret(passphrase)))

    async def unlock(self, passphrase: str | Secret) -> None:
        await self.call(m.UNLOCK, m.PassphraseParams(as_secret(passphrase)))

    async def lock(self) -> None:
        await self.call(m.LOCK, m.NoParams())

    async def change_passphrase(self, old: str | Secret, new: str | Secret) -> None:
        await self.call(m.CHANGE_PASSPHRASE, m.ChangePassphraseParams(as_secret(old), as_secret(new)))

    async def rekey(self, old: str | Secret, new: str | Secret) -> int:
        """Replace the data key (every secret re-encrypted); how many secrets."""
        return (await self.call(m.REKEY, m.RekeyParams(as_secret(old), as_secret(new)))).rekeyed

    async def store(self, name: str, value: str | Secret, kind: Kind | None = None) -> int:
        version = (await self.call(m.STORE, m.StoreParams(name, as_secret(value), kind))).version
        if self.cache is not None:
            self.cache.core.wrote(name, version)
        return version

    async def _start_cache(self, cache: _AsyncCache) -> None:
        if not cache.started:
            if self._tg is None:
                raise RuntimeError("use `async with AsyncSecretsClient() as client:`")
            cache.started = True
            await self._tg.start(cache.run)

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        """The value (a ``Secret``) and version of ``name``, or None when absent."""
        cache = self.cache
        if cache is None or previous:
            return await self.call(m.RETRIEVE,
                                   m.RetrieveParams(name, "previous" if previous else "current"))
        found = cache.lookup(name)
        if found is not MISS:
            return found  # type: ignore[return-value]
        await self._start_cache(cache)
        token = cache.core.gen
        result = await self.call(m.RETRIEVE, m.RetrieveParams(name))
        cache.core.fill(name, result, token)
        return result

    async def get(self, name: str, previous: bool = False) -> str | None:
        """The plain value, or None."""
        result = await self.retrieve(name, previous)
        return None if result is None else result.value.reveal()

    async def retrieve_many(self, names: Iterable[str]) -> dict[str, SecretResult | None]:
        """Current values of ``names`` in one round trip (cached ones from memory): a dict
        in the order given, None for an absent name; the first error (in order) is raised."""
        wanted = list(dict.fromkeys(names))
        found: dict[str, Any] = {}
        cache = self.cache
        ask = wanted
        if cache is not None:
            await self._start_cache(cache)
            ask = []
            for name in wanted:
                hit = cache.lookup(name)
                if hit is MISS:
                    ask.append(name)
                else:
                    found[name] = hit
        token = cache.core.gen if cache is not None else 0
        results = await self.call_many(m.RETRIEVE, [m.RetrieveParams(n) for n in ask])
        for name, result in zip(ask, results, strict=True):
            found[name] = result
            if cache is not None:
                cache.core.fill(name, result, token)
        return {name: found[name] for name in wanted}

    async def get_many(self, names: Iterable[str]) -> dict[str, str | None]:
        """Plain values of ``names`` in one round trip: name -> value, None when absent."""
        return {name: None if r is None else r.value.reveal()
                for name, r in (await self.retrieve_many(names)).items()}

    async def delete(self, name: str, force: bool = False) -> bool:
        existed = await self.call(m.DELETE, m.DeleteParams(name, force))
        if self.cache is not None:
            self.cache.core.wrote(name, 0)
        return existed

    async def list(self, prefix: str = "") -> list[str]:
        names: list[str] = []
        after = ""
        while True:
            try:
                page = await self.call(m.LIST, m.ListParams(prefix, after, connect.LIST_PAGE))
            except InvalidParams:
                if after or names:
                    raise
                return await self.call(m.LIST, m.ListParams(prefix))  # an agent without paging
            names += page
            if len(page) < connect.LIST_PAGE:
                return names
            after = page[-1]

    async def rotate(self, name: str, value: str | Secret) -> int:
        version = (await self.call(m.ROTATE, m.RotateParams(name, as_secret(value)))).version
        if self.cache is not None:
            self.cache.core.wrote(name, version)
        return version

    async def describe(self, name: str) -> DescribeResult | None:
        return await self.call(m.DESCRIBE, m.NameParams(name))

    async def migrate(self, to: BackendName, passphrase: str | Secret | None = None,
                      source: BackendName | None = None) -> MigrateResult:
        """Move every secret to the ``to`` backend (see ``secretsctl migrate``)."""
        secret = None if passphrase is None else as_secret(passphrase)
        return await self.call(m.MIGRATE, m.MigrateParams(to, secret, source),
                               timeout=max(self.timeout, 600))
