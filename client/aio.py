"""AsyncSecretsClient: the anyio client; concurrent calls share one connection.

Requests are multiplexed by id: a reader task (in the client's own task group,
so use ``async with``) hands each reply to the call waiting for it.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
from homeagent_secrets.protocol.errors import AgentUnreachableError, SecretsError
from homeagent_secrets.protocol.messages import (
    DescribeResult,
    MigrateResult,
    Params,
    SecretResult,
    StatusResult,
)
from homeagent_secrets.protocol.paths import default_socket_path
from homeagent_secrets.protocol.rpc import ClientProtocol, Reply
from homeagent_secrets.protocol.secret import Secret

from . import calls
from .sync import unreachable


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Reply | None = None  # None after the event: the connection dropped


class _Connection:
    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.proto = ClientProtocol()
        self.waiters: dict[int, _Waiter] = {}
        self.send_lock = anyio.Lock()
        self.open = True

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
        timeout: float = calls.DEFAULT_TIMEOUT,
        connect_timeout: float = calls.DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
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
        await self.aclose()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(et, e, tb)

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
            except FileNotFoundError:
                raise unreachable(self.socket_path, "no socket there") from None
            except ConnectionRefusedError:
                raise unreachable(self.socket_path, "nothing is listening (stale socket)") from None
            except TimeoutError:
                raise unreachable(self.socket_path, "connect timed out") from None
            except OSError as exc:
                raise unreachable(self.socket_path, exc.strerror or str(exc)) from None
            conn = self._conn = _Connection(stream)
            self._tg.start_soon(self._read, conn)
            return conn

    async def _read(self, conn: _Connection) -> None:
        try:
            while True:
                data = await conn.stream.receive(65536)
                for reply in conn.proto.receive_data(data):
                    waiter = conn.waiters.pop(reply.id, None)  # type: ignore[arg-type]
                    if waiter is not None:
                        waiter.reply = reply
                        waiter.event.set()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, SecretsError):
            pass
        finally:
            conn.fail_all()
            if self._conn is conn:
                self._conn = None

    async def call(self, method: str, params: Params, timeout: float | None = None) -> Any:
        """Send one request and return its typed result; raises SecretsError subclasses."""
        timeout = self.timeout if timeout is None else timeout
        for attempt in (0, 1):
            conn = await self._connection()
            id_, line = conn.proto.request(method, params)
            waiter = conn.waiters[id_] = _Waiter()
            try:
                async with conn.send_lock:
                    await conn.stream.send(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                conn.waiters.pop(id_, None)
                conn.fail_all()
                if attempt == 0:
                    continue  # nothing reached the daemon: safe to send again
                raise unreachable(self.socket_path, "the connection closed") from None
            try:
                with anyio.fail_after(timeout):
                    await waiter.event.wait()
            except TimeoutError:
                conn.waiters.pop(id_, None)
                raise AgentUnreachableError(
                    f"secretsd did not answer {method} within {timeout:g} s; "
                    "check `secretsctl status` and the secretsd log"
                ) from None
            reply = waiter.reply
            if reply is None:
                if attempt == 0 and method in calls.IDEMPOTENT:
                    continue
                raise unreachable(
                    self.socket_path,
                    "the connection closed during the call; the request may or may not have been applied",
                )
            if reply.error is not None:
                raise reply.error
            return conn.proto.decode_result(method, reply.result)
        raise AssertionError("unreachable")

    # --- the method table --------------------------------------------------------

    async def status(self) -> StatusResult:
        return await self.call("status", calls.NONE)  # type: ignore[no-any-return]

    async def init(self, passphrase: str | Secret) -> None:
        await self.call("init", calls.passphrase(passphrase))

    async def unlock(self, passphrase: str | Secret) -> None:
        await self.call("unlock", calls.passphrase(passphrase))

    async def lock(self) -> None:
        await self.call("lock", calls.NONE)

    async def change_passphrase(self, old: str | Secret, new: str | Secret) -> None:
        await self.call("change_passphrase", calls.change(old, new))

    async def store(self, name: str, value: str | Secret, kind: str | None = None) -> int:
        return calls.version_of(await self.call("store", calls.store(name, value, kind)))

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        return await self.call("retrieve", calls.retrieve(name, previous))  # type: ignore[no-any-return]

    async def get(self, name: str, previous: bool = False) -> str | None:
        """The plain value, or None."""
        result = await self.retrieve(name, previous)
        return None if result is None else result.value.reveal()

    async def delete(self, name: str) -> bool:
        return bool(await self.call("delete", calls.name(name)))

    async def list(self, prefix: str = "") -> list[str]:
        return await self.call("list", calls.prefix(prefix))  # type: ignore[no-any-return]

    async def rotate(self, name: str, value: str | Secret) -> int:
        return calls.version_of(await self.call("rotate", calls.rotate(name, value)))

    async def describe(self, name: str) -> DescribeResult | None:
        return await self.call("describe", calls.name(name))  # type: ignore[no-any-return]

    async def migrate(self, to: str, passphrase: str | Secret | None = None,
                      source: str | None = None) -> MigrateResult:
        """Move every secret to the ``to`` backend (see ``secretsctl migrate``)."""
        return await self.call("migrate", calls.migrate(to, passphrase, source), timeout=max(self.timeout, 600))  # type: ignore[no-any-return]
