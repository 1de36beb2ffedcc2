"""The anyio server: connections, limits, isolation and draining.

Bytes arrive on a connection, its ``ServerProtocol`` turns them into typed
calls, the dispatcher answers them. Reads are answered inline in arrival
order and the answers of one received chunk go out in one send; writes (and
batches holding one) run as tasks of the connection, so a slow fsync never
holds the retrieves behind it and answers may come back out of order.
The common case, a chunk that is exactly one ``retrieve`` on a connection
with nothing else going on, is answered and written with no task, lock or
await (``ServerProtocol.quick``); that path is what the benchmark's CPU per
answer measures (tests/bench/RESULTS.md).

What one peer can cost is bounded, so no peer stops the agent for others:
- at most ``max_inflight_per_connection`` write tasks per connection; at the
  bound the connection stops reading until one finishes (TCP-style
  backpressure instead of a growing queue);
- at most ``FLUSH_AT`` bytes of answers are built before they are sent, and a
  send that cannot proceed stops that connection's reading;
- pipelined requests answered inline yield to the other connections every
  ``INLINE_SLICE`` (a 64 KiB chunk may hold a thousand of them);
- a peer that does not read its answers within the idle timeout, or sends
  nothing for that long while nothing runs for it, is closed with its tasks;
- an exception in one connection closes that connection (logged once); the
  server and every other connection go on.

Why one module of ~500 lines: the listener, the reaper and the connection
share the limits and the drain; the protocol itself is ``protocol/server.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute, TaskStatus

from homeagent_secrets.protocol.errors import TooManyConnectionsError
from homeagent_secrets.protocol.framing import DEFAULT_MAX_FRAME, MAX_BATCH
from homeagent_secrets.protocol.server import (
    Batch,
    Call,
    ServerProtocol,
    reject,
)

from .dispatch import Dispatcher
from .faults import CONNECTION_ERROR_NAME, FAULTS
from .peer import Peer, peer_of
from .watch import Outbox
from .wipe import wipe_bytes

log = logging.getLogger(__name__)

#: Answers are sent once this many bytes are waiting (and at the end of each chunk).
FLUSH_AT: Final = 256 * 1024
#: The longest the reader works through one received chunk (up to ~1,000 pipelined
#: requests) before letting the other connections run.
INLINE_SLICE: Final = 0.005
#: Seconds between accepts while the process is out of file descriptors.
ACCEPT_RETRY: Final = 0.1
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _out_of_descriptors(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in _OUT_OF_DESCRIPTORS


@dataclass
class ServerLimits:
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = MAX_BATCH
    idle_timeout: float = 30.0
    max_connections: int = 256
    max_inflight_per_connection: int = 16
    drain_timeout: float = 5.0

    @property
    def per_uid_cap(self) -> int:
        """Connections one uid other than the agent's (and root) may hold: a quarter."""
        return max(1, self.max_connections // 4)


class Server:
    """Serves the dispatcher on a listening Unix socket."""

    def __init__(self, dispatcher: Dispatcher, sock: socket.socket,
                 limits: ServerLimits | None = None) -> None:
        self.dispatcher = dispatcher
        self.sock = sock
        self.limits = limits or ServerLimits()
        self.uid = os.getuid()
        self._live: set[_Connection] = set()
        self._per_uid: dict[int, int] = {}  # connections held by each uid under the rules
        self._accept_scope: anyio.CancelScope | None = None
        self.draining = False
        self._all_closed: anyio.Event | None = None  # made only while the drain waits
        self.stopped = anyio.Event()

    @property
    def connections(self) -> int:
        return len(self._live)

    # --- lifecycle --------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept until ``stop_accepting``, then drain the connections within the deadline."""
        listener = await anyio.abc.SocketListener.from_socket(self.sock)
        async with anyio.create_task_group() as conns:
            conns.start_soon(self._reap)
            with anyio.CancelScope() as self._accept_scope:
                task_status.started()
                async with listener:
                    starved = False
                    while True:
                        try:
                            stream = await listener.accept()
                        except anyio.BrokenResourceError as exc:
                            if not _out_of_descriptors(exc):
                                raise
                            # Peers hold every descriptor the process may open: the
                            # next accept fails the same way until one closes. Wait,
                            # never end serving for everyone (trio's serve_listeners).
                            if not starved:
                                log.error("cannot accept connections: %s (%d open); "
                                          "retrying until one closes (raise LimitNOFILE or "
                                          "lower max_connections)", exc.__cause__,
                                          self.connections)
                            starved = True
                            await anyio.sleep(ACCEPT_RETRY)
                            continue
                        starved = False
                        conns.start_soon(self._handle, stream)
            # Accepting stopped: every connection finishes what it has received
            # (and reads no more), within a deadline; then the rest is cancelled.
            self.draining = True
            for conn in list(self._live):
                conn.stop_reading()
            with anyio.move_on_after(self.limits.drain_timeout):
                while self._live:
                    self._all_closed = anyio.Event()
                    await self._all_closed.wait()
            conns.cancel_scope.cancel()
        self.stopped.set()

    def _closed(self, conn: _Connection) -> None:
        self._live.discard(conn)
        if not self._live and self._all_closed is not None:
            self._all_closed.set()

    async def _reap(self) -> None:
        """Close idle and stuck connections.

        One sweep a fraction of the timeout apart instead of a timer around
        every receive: the per-request path stays free of cancel scopes.
        """
        limit = self.limits.idle_timeout
        while True:
            await anyio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            for conn in list(self._live):
                if not conn.reaped and conn.idle_for(now) >= limit:
                    conn.reap(now)

    def stop_accepting(self) -> None:
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    # --- one connection -------------------------------------------------------

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        peer: Peer | None = None
        async with stream:
            try:
                policy = self.dispatcher.agent.policy
                try:
                    # The unit and groups are read only when rules or a log need them.
                    peer = peer_of(stream.extra(SocketAttribute.raw_socket),
                                   details=policy.active or self.dispatcher.agent.audit.enabled)
                except OSError:
                    return
                if not policy.active and not policy.trusted(peer):
                    log.warning("refused connection from %s: not the agent's user (no access "
                                "rules are configured)", peer)
                    return
                if self.connections >= self.limits.max_connections:
                    await self._refuse_over_cap(stream, peer)
                    return
                foreign = not policy.trusted(peer)
                if foreign and self._per_uid.get(peer.uid, 0) >= self.limits.per_uid_cap:
                    # One other user may not take every connection (a status now and
                    # then keeps each one busy) and so shut out the agent's own user.
                    await self._refuse_over_cap(stream, peer, self.limits.per_uid_cap)
                    return
                if self.draining:
                    return
                conn = _Connection(self, stream, peer)
                self._live.add(conn)
                if foreign:
                    self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
                try:
                    await conn.run()
                finally:
                    self._closed(conn)
                    if foreign:
                        left = self._per_uid[peer.uid] - 1
                        if left:
                            self._per_uid[peer.uid] = left
                        else:
                            del self._per_uid[peer.uid]
            except Exception:  # one peer's failure (even MemoryError) is that peer's alone
                log.exception("connection from %s failed and was closed; the agent goes on",
                              peer or "an unknown peer")

    async def _refuse_over_cap(self, stream: anyio.abc.SocketStream, peer: Peer,
                               per_uid: int | None = None) -> None:
        if per_uid is None:
            log.warning("refused connection from %s: %d connections open (limit %d)",
                        peer, self.connections, self.limits.max_connections)
            why = (f"the agent has {self.connections} connections open (limit "
                   f"{self.limits.max_connections}); close idle clients and retry")
        else:
            log.warning("refused connection from %s: uid %d has %d connections open (limit %d per "
                        "other user)", peer, peer.uid, per_uid, per_uid)
            why = (f"uid {peer.uid} has {per_uid} connections open, the most one user other than the "
                   "agent's may hold; close idle clients and retry")
        out = bytearray()
        reject(None, TooManyConnectionsError(why), out)
        with anyio.move_on_after(1):
            await stream.send(bytes(out))


class _Connection:
    def __init__(self, server: Server, stream: anyio.abc.SocketStream, peer: Peer) -> None:
        limits = server.limits
        self.server = server
        self.dispatcher = server.dispatcher
        self.peer = peer
        self.stream = stream  # owns the socket's lifetime; answers go to the socket directly
        self.sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
        self.proto = ServerProtocol(limits.max_frame, limits.max_batch)
        self.send_lock = anyio.Lock()
        self.slots = anyio.Semaphore(limits.max_inflight_per_connection)
        self.tasks = 0  # calls running as tasks; they may send concurrently
        self.inline = False  # the reader is running a call itself
        self.send_blocked_since: float | None = None
        self.last_active = time.monotonic()
        self.scope = anyio.CancelScope()  # the reaper's: the reader and every task
        self.read_scope = anyio.CancelScope()  # the drain's: the reader only
        self.reaped = False
        self.gone = False  # a send failed: the peer left
        self.outbox = Outbox()  # notifications of this connection's watches
        self._tg: anyio.abc.TaskGroup | None = None
        self._notifying = False

    def idle_for(self, now: float) -> float:
        """How long this peer has kept the agent waiting for nothing.

        A send that cannot proceed counts from when it started (the peer does not
        read); a call running for the peer is not idleness; otherwise the time
        since the last bytes arrived (a half-sent message included).
        """
        if self.send_blocked_since is not None:
            return now - self.send_blocked_since
        if self.inline or self.tasks or self._notifying:  # a watch is not idleness either
            return 0.0
        return now - self.last_active

    def stop_reading(self) -> None:
        """Read no more (shutdown): a reader waiting for input stops now, a busy one
        after the chunk it is working on; the calls it started still finish."""
        if not self.inline:
            self.read_scope.cancel()

    def reap(self, now: float) -> None:
        self.reaped = True
        if self.send_blocked_since is not None:
            why = f"does not read its answers ({now - self.send_blocked_since:.1f} s)"
        elif self.proto.pending:
            why = f"sent half a message and went silent ({now - self.last_active:.1f} s)"
        else:
            why = f"was idle for {now - self.last_active:.1f} s"
        log.info("closing the connection of %s: it %s", self.peer, why)
        self.scope.cancel()

    # anyio's stream.send yields to the event loop before every send. An answer
    # almost always fits in the socket buffer, so it is written straight to the
    # non-blocking socket, waiting only if it would block: one loop iteration
    # less per request. (Receives keep anyio's yield: it lets answers from many
    # peers arrive before the next read, which saves epoll registrations.)

    async def _send_now(self, data: bytes | bytearray) -> None:
        if self.gone:
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[self.sock.send(view):]
                except BlockingIOError:
                    if self.send_blocked_since is None:
                        self.send_blocked_since = time.monotonic()
                    await anyio.wait_writable(self.sock)
        except OSError:
            self.gone = True  # the peer went away; its writes still completed
        finally:
            if self.send_blocked_since is not None:
                self.send_blocked_since = None
                self.last_active = time.monotonic()  # the peer read: it is not idle
            view.release()

    async def _send_quick(self, data: bytearray) -> None:
        """``send`` for the reader alone: one system call, awaiting only a full socket."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.gone = True
            return
        if sent < len(data):
            self.inline = True  # an answer under way: a drain lets it finish
            try:
                await self.send(data[sent:])
            finally:
                self.inline = False

    async def send(self, data: bytes | bytearray) -> None:
        if self.tasks == 0 and not self._notifying and not self.send_lock.locked():
            await self._send_now(data)  # only the reader can send now: no lock needed
        else:
            async with self.send_lock:
                await self._send_now(data)

    # --- watches --------------------------------------------------------------------

    def start_notifier(self) -> None:
        """A first watch: from now on a sender task delivers this connection's events."""
        if not self._notifying and self._tg is not None:
            self._notifying = True
            self._tg.start_soon(self._notify)

    async def _notify(self) -> None:
        outbox = self.outbox
        while True:
            await outbox.ready.wait()
            # No await between waking and the first write: a writer that yields
            # once after publishing finds the event in the watcher's socket.
            if self.send_lock.locked():
                await self.send_lock.acquire()
            else:
                self.send_lock.acquire_nowait()
            try:
                await self._send_now(outbox.take())
            finally:
                self.send_lock.release()
            if self.gone:
                return

    def _connection_call(self, call: Call, out: bytearray) -> None:
        """``watch`` and ``unwatch``: the connection's own business, answered here."""
        self.dispatcher.connection_call(call, self.peer, out, self)

    async def _spawn(self, tg: anyio.abc.TaskGroup, msg: Call | Batch) -> None:
        # At the bound this waits: the reader stops, and so does the peer.
        await self.slots.acquire()
        self.tasks += 1
        tg.start_soon(self._in_task, msg)

    async def _in_task(self, msg: Call | Batch) -> None:
        try:
            out = bytearray()
            if isinstance(msg, Batch):
                async with self.send_lock:  # one array line: nothing may interleave
                    await self._batch(msg, out)
            else:
                await self.dispatcher.answer(msg, self.peer, out)
                if out:
                    async with self.send_lock:
                        await self._send_now(out)
        finally:
            self.tasks -= 1
            self.slots.release()
            self.last_active = time.monotonic()

    async def _batch(self, batch: Batch, out: bytearray) -> None:
        """Answer a batch into ``out`` and send it, in pieces; the send lock is held."""
        async def flush() -> None:
            await self._send_now(out)
            out.clear()

        await self.dispatcher.answer_batch(batch, self.peer, out, flush, FLUSH_AT)
        if out:
            await flush()

    async def run(self) -> None:
        hub = self.dispatcher.agent.hub
        try:
            with self.scope:  # the reaper cancels it: the reader and every task of this peer
                async with anyio.create_task_group() as outer:
                    self._tg = outer  # the notifier's, once a watch opens
                    async with anyio.create_task_group() as tg:
                        with self.read_scope:
                            await self._read(tg)
                        # Input is over (the peer closed its side, or shutdown): the calls
                        # it started finish and answer before the connection closes.
                    outer.cancel_scope.cancel()  # and the watches end with it
        finally:
            hub.drop(self)

    async def _read(self, tg: anyio.abc.TaskGroup) -> None:
        dispatcher = self.dispatcher
        peer = self.peer
        while not self.server.draining:
            try:
                data = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                break
            self.last_active = time.monotonic()
            if not FAULTS and self.tasks == 0 and not self._notifying:
                # One request answered from memory, nothing else read and nothing
                # else sending: answered and written here, with no await unless
                # the socket is full (most of what a busy agent does).
                call = self.proto.quick(data)
                if call is not None:
                    out = bytearray()
                    if not dispatcher.answer_now(call, peer, out):
                        # The backend must be asked (keychain, OpenBao): a call is running,
                        # so neither idleness for the reaper nor cancellable by a drain.
                        self.inline = True
                        try:
                            await dispatcher.answer(call, peer, out)
                        finally:
                            self.inline = False
                            self.last_active = time.monotonic()
                    if out:
                        await self._send_quick(out)
                    if self.gone:
                        break
                    continue
            out = bytearray()
            lines = self.proto.frames(data)
            # A message cut in two (or cut off) may be an unlock.
            sensitive = self.proto.pending > 0 or self.proto.oversize
            self.inline = True
            slice_end = time.monotonic() + INLINE_SLICE
            try:
                for line in lines:
                    msg = self.proto.parse(line)
                    if isinstance(msg, Call):
                        if FAULTS and "connection-error" in FAULTS and getattr(
                                msg.params, "name", None) == CONNECTION_ERROR_NAME:
                            raise MemoryError("injected by HOMEAGENT_FAULT")
                        method = msg.method
                        sensitive |= method.carries_passphrase
                        if method.connection:
                            self._connection_call(msg, out)
                        elif method.writes:
                            await self._spawn(tg, msg)
                        elif not (method.nowait and dispatcher.answer_now(msg, peer, out)):
                            await dispatcher.answer(msg, peer, out)
                    elif isinstance(msg, Batch):
                        if msg.carries_passphrase or msg.refuses_any:
                            sensitive = True
                            for raw in msg.raws:
                                wipe_bytes(raw)
                        if msg.writes:
                            await self._spawn(tg, msg)
                        else:
                            if out:
                                await self.send(out)
                                out.clear()
                            async with self.send_lock:
                                await self._batch(msg, out)
                    else:
                        # A refused message may hold a passphrase it failed to deliver
                        # (a bad new one beside the real old one, a repeated key).
                        sensitive = True
                        if msg.answered:
                            reject(msg.id, msg.error, out)
                    if len(out) >= FLUSH_AT:
                        await self.send(out)
                        out.clear()
                    if time.monotonic() > slice_end:  # let other peers in between requests
                        await anyio.lowlevel.checkpoint()
                        slice_end = time.monotonic() + INLINE_SLICE
                if self.proto.oversize:
                    self.proto.oversize_error(out)
                if out:
                    await self.send(out)
            finally:
                self.inline = False
                # Idleness counts from the end of the work, not from the
                # bytes that asked for it (a long batch is not idleness).
                self.last_active = time.monotonic()
                if sensitive:  # the passphrase is decoded: its raw bytes go now
                    wipe_bytes(data)
                    for line in (*lines, *self.proto.spent):
                        wipe_bytes(line)
            if self.proto.oversize:
                break
            if self.gone:
                break
