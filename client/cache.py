"""The in-process cache of ``SecretsClient(cache=True)`` and ``AsyncSecretsClient(cache=True)``.

Entries are filled by ``retrieve`` and kept current by a watch on a connection
of its own. The rules, for both clients:

- An entry is served only while the watch is open (``live``). A ``changed``
  event removes its name's entry and records the version the agent reported;
  ``overflow``, ``locked``/``unlocked``, a dropped watch and a new watch empty
  the cache (and bump ``gen``).
- A ``retrieve`` answer is kept only if no reset happened while it was in
  flight (``gen`` unchanged) and its version is the one the watch last
  reported for that name (or the watch reported nothing for it): an answer
  read before a rotate can never be cached after that rotate's event.
- Before serving an entry the caller's thread looks at the watch socket
  (``epoll`` with a zero timeout, one syscall): when bytes are waiting, or
  another thread is applying some, it applies them first. The agent puts an
  event in every watcher's socket before it answers the write, so a read
  that starts after a rotate was acknowledged (to anyone) sees the rotate.
- That holds while the watch's socket has room. A watch that falls behind
  (one read finds ``LAG_BYTES`` or more waiting: the socket may have been
  full, with more events, or an ``overflow``, still in the agent's outbox)
  stops serving and empties the cache until nothing has arrived for
  ``QUIET`` seconds (the agent sends what it holds as soon as there is room).
- Absent names are cached too (as ``None``, version 0: a ``deleted`` event
  records 0); at most ``MAX_TRACKED`` names are tracked, beyond that the
  cache empties itself.

Memory model (sync client): the entries dict and the ``live`` flag are
written only under ``lock``; the hot path reads them without it. That relies
on CPython making each single dict read or attribute read atomic and
sequentially consistent with respect to other threads' writes (the GIL, or
the per-object locks of the free-threaded build); the ordering argument above
needs nothing more, because the hot path takes the lock whenever the socket
has bytes or the lock is held (an event being applied).

Values stay ``Secret`` objects inside ``SecretResult``; nothing here logs or
prints them (``repr`` shows counts only).

Why one module of ~450 lines: the sync and the async cache share these rules
and their event handling; splitting them would split the memory model above.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.errors import SecretsError
from homeagent_secrets.protocol.messages import SecretResult
from homeagent_secrets.protocol.rpc import ClientProtocol

from . import connect


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


#: What a lookup returns when the agent must be asked.
MISS: Final = _Miss()
#: Names tracked (entries and reported versions) before the cache empties itself.
MAX_TRACKED: Final = 65536
#: Reconnect delays of a dropped watch: doubling from the first to the last.
BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 5.0
#: One drain that reads this much means the watch fell behind (see above). The
#: kernel charges each send's buffer overhead to a Unix socket: with the default
#: 208 KiB buffer, one-event sends fill it at about 280 events, some 30 KB of data.
#: 8 KiB (about 80 events) leaves a wide margin; a false alarm costs 50 ms uncached.
LAG_BYTES: Final = 8192
#: How long a watch that fell behind must stay silent to count as caught up.
QUIET: Final = 0.05

Entry = SecretResult | None


def open_watch(path: Path, patterns: Sequence[str], connect_timeout: float,
               timeout: float) -> tuple[socket.socket, ClientProtocol]:
    """A checked connection with an answered ``watch`` (blocking), and its protocol state
    (which may already hold notifications received after the answer)."""
    sock = connect.open_socket(path, connect_timeout)
    try:
        proto = ClientProtocol()
        id_, line = proto.request(m.WATCH, m.WatchParams(list(patterns)))
        sock.settimeout(timeout)
        sock.sendall(line)
        while True:
            data = sock.recv(65536)
            if not data:
                raise connect.unreachable(path, "the watch's connection closed before its answer")
            for reply in proto.receive_data(data):
                if reply.error is not None and reply.id in (id_, None):
                    raise reply.error
                if reply.id == id_:
                    return sock, proto
    except OSError as exc:
        sock.close()
        raise connect.unreachable(path, f"no answer to watch ({type(exc).__name__})") from None
    except BaseException:
        sock.close()
        raise


class CacheCore:
    """Entries, reported versions and the watch socket; no threads, no locks.

    The sync cache calls every mutating method under its lock; the async cache
    from the event loop's one thread.
    """

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.latest: dict[str, int] = {}
        self.gen = 0
        self.live = False  # a watch is open
        self.behind = False  # it fell behind (see LAG_BYTES)
        self.serving = False  # live and not behind: entries may be served
        self.last_data = 0.0
        self.sock: socket.socket | None = None
        self.proto = ClientProtocol()
        self.epoll = select.epoll()
        self.resets = 0  # how often it emptied itself (tests and the benchmark read it)
        self.overflows = 0  # how many ``overflow`` notifications it had

    def __repr__(self) -> str:
        state = "serving" if self.serving else "behind" if self.behind else "live" if self.live else "not live"
        return f"<cache {len(self.entries)} entries, {state}>"

    def reset(self) -> None:
        """Forget everything: no entry and no answer in flight may be kept."""
        self.entries.clear()
        self.latest.clear()
        self.gen += 1
        self.resets += 1

    def attach(self, sock: socket.socket, proto: ClientProtocol) -> None:
        """A new watch is open: start from empty, then apply what came with its answer."""
        sock.setblocking(False)
        self.sock, self.proto = sock, proto
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.reset()
        self.live, self.behind, self.serving = True, False, True
        self.last_data = time.monotonic()
        self._apply()

    def detach(self) -> None:
        """The watch is gone (or closing): serve nothing until another is open."""
        self.live = self.serving = False
        self.reset()
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                self.epoll.unregister(sock.fileno())
            except (OSError, ValueError):
                pass
            sock.close()

    def drain(self) -> bool:
        """Apply every event waiting in the socket; False when the watch ended
        (it is then no longer ``live``; ``detach`` closes it)."""
        sock = self.sock
        if sock is None:
            return False
        got = 0
        while True:
            try:
                data = sock.recv(262144)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                data = b""
            if not data:
                self.live = self.serving = False
                self.reset()
                return False
            got += len(data)
            try:
                self.proto.receive_data(data)
            except SecretsError:  # a malformed line: trust nothing after it
                self.live = self.serving = False
                self.reset()
                return False
            self._apply()
        if got:
            self.last_data = time.monotonic()
            if got >= LAG_BYTES:
                self.behind, self.serving = True, False
                self.reset()
        return True

    def caught_up(self) -> None:
        """Serve again once a watch that fell behind has been silent for ``QUIET``."""
        if self.live and self.behind and time.monotonic() - self.last_data >= QUIET:
            self.reset()  # nothing filled while behind is kept
            self.behind, self.serving = False, True

    def _apply(self) -> None:
        notes = self.proto.notifications
        if not notes:
            return
        self.proto.notifications = []
        for note in notes:
            if note.method == "changed":
                try:
                    c = _changed.decode(note.params)
                except msgspec.DecodeError:
                    self.reset()
                    continue
                self.entries.pop(c.name, None)
                if c.name not in self.latest and len(self.latest) >= MAX_TRACKED:
                    self.reset()
                self.latest[c.name] = 0 if c.event == "deleted" else c.version
            else:  # locked, unlocked, overflow (and anything newer): start again
                self.overflows += note.method == "overflow"
                self.reset()

    def fill(self, name: str, result: Entry, token: int) -> None:
        """Keep ``result`` (asked for when ``gen`` was ``token``) if it is still current."""
        if not self.serving or self.gen != token:
            return
        version = 0 if result is None else result.version
        known = self.latest.get(name)
        if known is not None and known != version:
            return  # the watch has reported another version since: not current
        if known is None and len(self.latest) >= MAX_TRACKED:
            self.reset()
            return
        self.latest[name] = version
        self.entries[name] = result

    def wrote(self, name: str, version: int) -> None:
        """This client changed ``name``: drop its entry even before the event arrives."""
        self.entries.pop(name, None)
        # Never lower a version the watch reported: a later change may already
        # have been applied, and an answer read before it must stay refused.
        if name not in self.latest:
            if len(self.latest) >= MAX_TRACKED:
                self.reset()
            self.latest[name] = version

    def close(self) -> None:
        self.detach()
        self.epoll.close()


_changed: Final = msgspec.json.Decoder(m.Changed)


_live_caches: weakref.WeakSet[SyncCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's watch socket and epoll instance: it must
    # neither read the one nor change the other. Drop both; a lookup in the
    # child opens a watch of its own.
    for cache in list(_live_caches):
        cache._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SyncCache:
    """The blocking client's cache: a background thread keeps the watch open and read."""

    def __init__(self, path: Path, connect_timeout: float, timeout: float) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.lock = threading.Lock()
        self.core = CacheCore()
        self._entries = self.core.entries
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = self._wake_pipe()
        #: Set by the watch thread each time a watch is (re)opened; tests wait on it.
        self.opened = threading.Event()
        _live_caches.add(self)

    def __repr__(self) -> str:
        return repr(self.core)

    @staticmethod
    def _wake_pipe() -> tuple[int, int]:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        return r, w

    # --- the hot path --------------------------------------------------------------

    def lookup(self, name: str) -> Entry | _Miss:
        """The cached answer for ``name``, or MISS (then ask the agent and ``fill``)."""
        core = self.core
        if not core.serving:
            if self._thread is None:
                self._start()
            elif core.behind:
                with self.lock:
                    if core.drain():
                        core.caught_up()
            return MISS
        if core.epoll.poll(0) or self.lock.locked():
            with self.lock:
                if core.serving:
                    core.drain()
            if not core.serving:
                return MISS
        return self._entries.get(name, MISS)

    def token(self) -> int:
        return self.core.gen

    def fill(self, name: str, result: Entry, token: int) -> None:
        with self.lock:
            self.core.fill(name, result, token)

    def wrote(self, name: str, version: int) -> None:
        with self.lock:
            self.core.wrote(name, version)

    # --- the watch thread ------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._stop.clear()
            first: tuple[socket.socket, ClientProtocol] | None = None
            try:  # once inline, so the first lookups after start-up are served
                first = open_watch(self.path, (), self.connect_timeout, self.timeout)
            except SecretsError:
                pass
            if first is not None:
                with self.lock:
                    self.core.attach(*first)
                self.opened.set()
            t = threading.Thread(target=self._run, args=(first is not None,),
                                 name="secrets-cache-watch", daemon=True)
            self._thread = t
            t.start()

    def _run(self, attached: bool) -> None:
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            if not attached:
                try:
                    sock, proto = open_watch(self.path, (), self.connect_timeout, self.timeout)
                except SecretsError:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                with self.lock:
                    self.core.attach(sock, proto)
                self.opened.set()
            attached = False
            backoff = BACKOFF_FIRST
            self._follow()
            with self.lock:
                self.core.detach()

    def _follow(self) -> None:
        """Read the open watch until it ends or the cache is closed."""
        sock = self.core.sock
        if sock is None:
            return
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            poller.poll()
            if self._stop.is_set():
                return
            with self.lock:
                if not self.core.drain():
                    return

    def close(self) -> None:
        """Stop the watch thread and empty the cache (a later lookup starts it again)."""
        with self._start_lock:
            t, self._thread = self._thread, None
            if t is None:
                return
            self._stop.set()
            os.write(self._wake_w, b"x")
        t.join(10)
        with self.lock:
            self.core.detach()
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass
        self.opened.clear()

    def _forked(self) -> None:
        # Closing this process's copies of the parent's descriptors leaves the
        # parent's watch, epoll registrations and wake pipe as they were.
        core = self.core
        core.live = core.serving = False
        if core.sock is not None:
            core.sock.close()
            core.sock = None
        core.epoll.close()
        core.epoll = select.epoll()
        core.reset()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r, self._wake_w = self._wake_pipe()
        self._thread = None
        self.lock = threading.Lock()
        self._start_lock = threading.Lock()
        self.opened = threading.Event()

    def __del__(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def wait_live(cache: SyncCache, timeout: float) -> bool:
    """Whether ``cache`` serves entries within ``timeout`` seconds (tests, benchmark)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cache.core.serving:
            return True
        cache.lookup("")  # lets a watch that fell behind catch up
        cache.opened.wait(0.01)
    return cache.core.serving


