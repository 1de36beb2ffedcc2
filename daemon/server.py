"""The anyio server: connections, framing, dispatch, limits and draining.

Bytes arrive on a connection, the sans-I/O protocol turns them into requests,
the agent answers them. Reads are answered inline in arrival order, and all
answers produced by one received chunk go out in one send; writes (and
anything that may block) run as tasks of the connection, so a slow fsync never
holds the retrieves behind it and answers may come back out of order.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, TaskStatus
from homeagent_secrets.protocol.errors import FrameTooLarge, TooManyConnectionsError
from homeagent_secrets.protocol.framing import DEFAULT_MAX_FRAME, FrameSplitter
from homeagent_secrets.protocol.messages import METHODS
from homeagent_secrets.protocol.rpc import Batch, Rejected, Request, encode_error, parse_message

from .agent import Agent
from .dispatch import Dispatcher

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")


@dataclass
class ServerLimits:
    max_frame: int = DEFAULT_MAX_FRAME
    idle_timeout: float = 30.0
    max_connections: int = 256
    max_inflight_per_connection: int = 64
    drain_timeout: float = 5.0


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def _is_write(msg: Request | Rejected) -> bool:
    if isinstance(msg, Rejected):
        return False
    m = METHODS.get(msg.method)
    return m is not None and m.writes


class Server:
    """Serves the agent on a listening Unix socket."""

    def __init__(self, agent: Agent, sock: socket.socket, limits: ServerLimits | None = None) -> None:
        self.agent = agent
        self.sock = sock
        self.limits = limits or ServerLimits()
        self.dispatcher = Dispatcher(agent)
        self.uid = os.getuid()
        self._live: set[_Connection] = set()
        self._accept_scope: anyio.CancelScope | None = None
        self.stopped = anyio.Event()

    @property
    def connections(self) -> int:
        return len(self._live)

    # --- lifecycle --------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept until ``stop_accepting``, then drain the connections within the deadline."""
        listener = await anyio.abc.SocketListener.from_socket(self.sock)
        async with anyio.create_task_group() as conns:
            conns.start_soon(self._reap_idle)
            with anyio.CancelScope() as self._accept_scope:
                task_status.started()
                async with listener:
                    while True:
                        stream = await listener.accept()
                        conns.start_soon(self._handle, stream)
            # Accepting stopped: give requests in flight a deadline, then cancel the rest.
            with anyio.move_on_after(self.limits.drain_timeout):
                await self.dispatcher.wait_idle()
            conns.cancel_scope.cancel()
        self.stopped.set()

    async def _reap_idle(self) -> None:
        """Close connections idle longer than the limit.

        One sweep a fraction of the timeout apart instead of a timer around
        every receive: the per-request path stays free of cancel scopes.
        """
        limit = self.limits.idle_timeout
        while True:
            await anyio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for conn in list(self._live):
                if conn.idle_for(now) >= limit:
                    log.info(
                        "closing a connection idle for %.1f s%s", now - conn.last_active,
                        " with half a message" if conn.splitter.pending else "",
                    )
                    conn.scope.cancel()

    def stop_accepting(self) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    # --- one connection -------------------------------------------------------

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw = stream.extra(SocketAttribute.raw_socket)
            try:
                pid, uid, _gid = peer_credentials(raw)
            except OSError:
                return
            if uid != self.uid and uid != 0:
                log.warning("refused connection from uid %d (pid %d): not the agent's user", uid, pid)
                return
            if self.connections >= self.limits.max_connections:
                log.warning(
                    "refused connection from pid %d: %d connections open (limit %d)",
                    pid, self.connections, self.limits.max_connections,
                )
                out = bytearray()
                encode_error(None, TooManyConnectionsError(
                    f"the agent has {self.connections} connections open (limit "
                    f"{self.limits.max_connections}); close idle clients and retry"), out)
                with anyio.move_on_after(1):
                    await stream.send(bytes(out))
                return
            conn = _Connection(self, stream)
            self._live.add(conn)
            try:
                await conn.run()
            finally:
                self._live.discard(conn)


class _Connection:
    def __init__(self, server: Server, stream: anyio.abc.SocketStream) -> None:
        self.server = server
        self.stream = stream  # owns the socket's lifetime; I/O goes to the socket directly
        self.sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
        self.splitter = FrameSplitter(server.limits.max_frame)
        self.send_lock = anyio.Lock()
        self.tasks = 0  # requests running as tasks; they may send concurrently
        self.limiter = anyio.CapacityLimiter(server.limits.max_inflight_per_connection)
        self.last_active = time.monotonic()
        self.scope = anyio.CancelScope()

    def idle_for(self, now: float) -> float:
        """Seconds without input, counted only when nothing is running for this peer
        or it holds half a message (a slow request is not idleness)."""
        if self.tasks and not self.splitter.pending:
            return 0.0
        return now - self.last_active

    # anyio's stream.send yields to the event loop before every send. An answer
    # almost always fits in the socket buffer, so it is written straight to the
    # non-blocking socket, waiting only if it would block: one loop iteration
    # less per request. (Receives keep anyio's yield: it lets answers from many
    # peers arrive before the next read, which saves epoll registrations.)

    async def _send_now(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[self.sock.send(view):]
                except BlockingIOError:
                    await anyio.wait_writable(self.sock)
        except OSError:
            pass  # the client went away; its writes still completed

    async def send(self, data: bytes | bytearray) -> None:
        if self.tasks == 0 and not self.send_lock.locked():
            await self._send_now(data)  # only this loop can send now: no lock needed
        else:
            async with self.send_lock:
                await self._send_now(data)

    async def _in_task(self, msg: Request | Batch) -> None:
        try:
            async with self.limiter:
                out = bytearray()
                if isinstance(msg, Batch):
                    await self.server.dispatcher.answer_batch(msg, out)
                else:
                    await self.server.dispatcher.answer(msg, out)
                if out:
                    async with self.send_lock:
                        await self._send_now(out)
        finally:
            self.tasks -= 1
            self.last_active = time.monotonic()

    async def run(self) -> None:
        limits = self.server.limits
        dispatcher = self.server.dispatcher
        async with anyio.create_task_group() as tg:
            with self.scope:  # the idle reaper cancels this scope
                while True:
                    try:
                        data = await self.stream.receive(65536)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        break
                    self.last_active = time.monotonic()
                    out = bytearray()
                    for line in self.splitter.feed(data):
                        msg = parse_message(line)
                        if isinstance(msg, Batch):
                            if any(_is_write(i) for i in msg.items):
                                self.tasks += 1
                                tg.start_soon(self._in_task, msg)
                            else:
                                await dispatcher.answer_batch(msg, out)
                        elif isinstance(msg, Request) and _is_write(msg):
                            self.tasks += 1
                            tg.start_soon(self._in_task, msg)
                        else:
                            await dispatcher.answer(msg, out)
                    if self.splitter.oversize:
                        encode_error(None, FrameTooLarge(
                            f"invalid request: a message exceeded the {limits.max_frame}-byte "
                            "frame limit; the connection is closed"), out)
                        await self.send(out)
                        break
                    if out:
                        await self.send(out)
