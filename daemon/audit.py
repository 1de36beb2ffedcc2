"""The access log: one structured event per call, never a value or a passphrase.

Each event is a JSON object: ``time`` (ISO-8601, UTC, milliseconds), ``uid``,
``pid``, ``unit`` (or null), ``method``, ``name`` (or null), ``outcome``
(``ok``, ``denied``, ``not_found``, ``error``) and ``code`` (the error code or
null). Events go as JSON lines to ``audit_log`` (opened 0600 with O_APPEND,
reopened on SIGHUP so logrotate can move it), and, when systemd runs the
daemon, to the journal at INFO. A denial is always logged at WARNING: one
line each, up to a burst of ``DENIAL_BURST`` per uid and then
``DENIALS_PER_SECOND``; beyond that a uid's denials are counted and told in
one summary line (the file still has each). One peer's flood (20,000 denials
a second are easy) would otherwise make journald drop every WARNING of the
agent, other peers' denials with them.

Lines for the file are gathered and written once per turn of the event loop
(one ``write`` for the events of every call answered in that turn; at most
``PENDING_BYTES`` are held). A write per event was a quarter of a busy agent's
throughput. The events of the last turn, a fraction of a millisecond, are lost
only if the process is killed outright; a stop writes them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from pathlib import Path
from typing import Final, Literal

import msgspec

from .peer import Peer

log = logging.getLogger("homeagent_secrets.audit")

Outcome = Literal["ok", "denied", "not_found", "error"]


class Event(msgspec.Struct, frozen=True):
    time: str
    uid: int
    pid: int
    unit: str | None
    method: str
    name: str | None
    outcome: Outcome
    code: int | None


_encoder: Final = msgspec.json.Encoder()


def under_systemd(env: dict[str, str] | None = None) -> bool:
    """Whether systemd runs this process (its stderr then reaches the journal)."""
    env = dict(os.environ) if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


#: Lines held for the file before they are written even within one turn.
PENDING_BYTES: Final = 1 << 16
#: The milliseconds of a timestamp, formatted once.
_MS: Final = tuple(f".{i:03d}Z" for i in range(1000))

#: Denial lines per uid: this many at once, then this many a second; the rest counted.
DENIAL_BURST: Final = 50
DENIALS_PER_SECOND: Final = 5.0


class _Bucket:
    """One uid's allowance of denial lines (a token bucket) and what it held back."""

    __slots__ = ("at", "held", "since", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = float(DENIAL_BURST)
        self.at = now
        self.held = 0
        self.since = now

    def refill(self, now: float) -> None:
        self.tokens = min(float(DENIAL_BURST), self.tokens + (now - self.at) * DENIALS_PER_SECOND)
        self.at = now


class AuditLog:
    """Where events go; ``enabled`` is False when only denials are logged."""

    def __init__(self, path: Path | None = None, journal: bool = False) -> None:
        self.path = path
        self.journal = journal
        self._fd: int | None = None
        self._cut = False  # the last write stopped mid-line
        self._lost = 0  # events not written since writing failed
        self._second = -1
        self._prefix = ""
        self._denials: dict[int, _Bucket] = {}
        self._pending = bytearray()  # lines not yet written to the file
        self._scheduled = False  # a write of them is due at the end of this turn
        if path is not None:
            self._fd = self._open(path)

    @property
    def enabled(self) -> bool:
        return self._fd is not None or self.journal

    @staticmethod
    def _open(path: Path) -> int:
        """The file, appended to; OSError unless it is a regular file (never a symlink:
        O_NOFOLLOW; never a FIFO or device: O_NONBLOCK, so opening one cannot hang)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            os.fchmod(fd, 0o600)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def reopen(self) -> None:
        """Open the file again (after logrotate moved it); keep the old one on failure."""
        if self.path is None:
            return
        try:
            fd = self._open(self.path)
        except OSError as exc:
            log.error("cannot reopen the access log %s: %s; still writing the old one",
                      self.path, exc.strerror)
            return
        self.write_pending()  # what was logged before the move goes to the old file
        old, self._fd = self._fd, fd
        self._cut = False  # a new file: no line of it was cut short
        if old is not None:
            os.close(old)

    def close(self) -> None:
        self.write_pending()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # the formatting, once a second
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._prefix + _MS[int((now - second) * 1000)]

    def _may_say_denied(self, uid: int) -> bool:
        """Whether this denial gets its own WARNING line (else it is counted)."""
        now = time.monotonic()
        bucket = self._denials.get(uid)
        if bucket is None:
            bucket = self._denials[uid] = _Bucket(now)
        bucket.refill(now)
        if bucket.held and bucket.tokens >= 1:
            self._summary(uid, bucket, now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        if not bucket.held:
            bucket.since = now
        bucket.held += 1
        return False

    def _summary(self, uid: int, bucket: _Bucket, now: float) -> None:
        log.warning("denied %d more call(s) to uid %d in %.1f s, not logged one by one%s", bucket.held, uid,
                    now - bucket.since, " (the access log file has each)" if self._fd is not None else "")
        bucket.held = 0

    def flush(self) -> None:
        """Tell the denials held back that are due (call about once a second); forget idle uids."""
        now = time.monotonic()
        for uid, bucket in list(self._denials.items()):
            bucket.refill(now)
            if bucket.held and bucket.tokens >= 1:
                self._summary(uid, bucket, now)
            elif not bucket.held and bucket.tokens >= DENIAL_BURST:
                del self._denials[uid]

    def write_pending(self) -> None:
        """Write the lines gathered (the end of a turn of the event loop, a stop, a move)."""
        self._scheduled = False
        if self._pending and self._fd is not None:
            lines = bytes(self._pending)
            self._pending.clear()
            self._write(lines)

    def _write(self, lines: bytes) -> None:
        """Append whole lines. While writes fail (disk full) the error is logged once, with
        the count of lost events when writing works again; a line cut short by the
        failure is ended first, so the next event starts a line of its own."""
        assert self._fd is not None
        data = b"\n" + lines if self._cut else lines
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            written, why = 0, exc.strerror
        else:
            why = "no space left for the whole line"
        if written == len(data):
            if self._lost:
                log.error("the access log %s is written again; %d event(s) were lost", self.path, self._lost)
            self._cut, self._lost = False, 0
            return
        self._cut = data[written - 1:written] != b"\n" if written > 0 else self._cut
        if not self._lost:
            log.error("cannot write the access log %s: %s; events are lost until it can", self.path, why)
        self._lost += lines.count(b"\n", max(written - (len(data) - len(lines)), 0))

    def record(self, peer: Peer, method: str, name: str | None, outcome: Outcome,
               code: int | None) -> None:
        """Log one call (cheap when nothing but denials is wanted)."""
        if outcome == "denied":
            if self._may_say_denied(peer.uid):
                log.warning("denied %s of %s to %s", method, name or "-", peer)
        elif not self.enabled:
            return
        line = _encoder.encode(Event(self._now(), peer.uid, peer.pid, peer.unit, method, name, outcome,
                                     code))
        if self._fd is not None:
            pending = self._pending
            pending += line
            pending += b"\n"
            if len(pending) >= PENDING_BYTES:
                self.write_pending()
            elif not self._scheduled:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no event loop (a tool, a test): write now
                    self.write_pending()
                else:
                    self._scheduled = True
                    loop.call_soon(self.write_pending)
        if self.journal and outcome != "denied":
            log.info("%s", line.decode())
