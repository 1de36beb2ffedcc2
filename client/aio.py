"""AsyncSecretsClient: the anyio client; concurrent calls share one connection.

Requests are multiplexed by id: a reader task (in the client's own task group,
so use ``async with``) hands each reply to the call waiting for it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import anyio.abc
from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.errors import AgentUnreachableError, InvalidParams, SecretsError
from homeagent_secrets.protocol.messages import (
    DescribeResult,
    Method,
    MigrateResult,
    Params,
    SecretResult,
    StatusResult,
)
from homeagent_secrets.protocol.names import BackendName, Kind
from homeagent_secrets.protocol.rpc import ClientProtocol, Reply
from homeagent_secrets.protocol.secret import Secret

from . import connect
from .connect import as_secret

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


class AsyncSecretsClient:
    """``async with AsyncSecretsClient() as c: await c.retrieve("name")``."""

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        timeout: float = connect.DEFAULT_TIMEOUT,
        connect_timeout: float = connect.DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.socket_path = connect.socket_path(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._connect_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None

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
                raise AgentUnreachableError(
                    f"secretsd did not answer {method.name} within {timeout:g} s; "
                    "check `secretsctl status` and the secretsd log"
                ) from None
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

    # --- the method table --------------------------------------------------------

    async def status(self) -> StatusResult:
        return await self.call(m.STATUS, m.NoParams())

    async def init(self, passphrase: str | Secret) -> None:
        await self.call(m.INIT, m.InitParams(as_secret(passphrase)))

    async def unlock(self, passphrase: str | Secret) -> None:
        await self.call(m.UNLOCK, m.PassphraseParams(as_secret(passphrase)))

    async def lock(self) -> None:
        await self.call(m.LOCK, m.NoParams())

    async def change_passphrase(self, old: str | Secret, new: str | Secret) -> None:
        await self.call(m.CHANGE_PASSPHRASE, m.ChangePassphraseParams(as_secret(old), as_secret(new)))

    async def store(self, name: str, value: str | Secret, kind: Kind | None = None) -> int:
        return (await self.call(m.STORE, m.StoreParams(name, as_secret(value), kind))).version

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        return await self.call(m.RETRIEVE,
                               m.RetrieveParams(name, "previous" if previous else "current"))

    async def get(self, name: str, previous: bool = False) -> str | None:
        """The plain value, or None."""
        result = await self.retrieve(name, previous)
        return None if result is None else result.value.reveal()

    async def delete(self, name: str, force: bool = False) -> bool:
        return await self.call(m.DELETE, m.DeleteParams(name, force))

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
        return (await self.call(m.ROTATE, m.RotateParams(name, as_secret(value)))).version

    async def describe(self, name: str) -> DescribeResult | None:
        return await self.call(m.DESCRIBE, m.NameParams(name))

    async def migrate(self, to: BackendName, passphrase: str | Secret | None = None,
                      source: BackendName | None = None) -> MigrateResult:
        """Move every secret to the ``to`` backend (see ``secretsctl migrate``)."""
        secret = None if passphrase is None else as_secret(passphrase)
        return await self.call(m.MIGRATE, m.MigrateParams(to, secret, source),
                               timeout=max(self.timeout, 600))
