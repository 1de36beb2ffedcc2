"""One agent per home: an exclusive ``flock`` on ``<home>/lock`` for the daemon's life.

Two daemons on one home (started with different sockets, say) would each
acknowledge writes the other then overwrites. The second one to start finds
the lock taken and exits, naming the first one's pid and socket, which the
lock file holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Final

from homeagent_secrets.protocol.errors import SecretsError

from .backends.atomicfile import ensure_private_dir

LOCK_FILE: Final = "lock"


class HomeLockedError(SecretsError):
    """Another secretsd already serves this home."""


class HomeLock:
    """Held from start-up to exit; the kernel releases it if the process dies."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, socket: str) -> None:
        ensure_private_dir(self.path.parent)
        # Held read-only: a file open for writing would keep the file system from
        # being remounted read-only under the daemon (which it must survive).
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise HomeLockedError(f"{self.path} is not a regular file: move it away")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise HomeLockedError(f"cannot lock {self.path}: {exc.strerror}") from None
                raise HomeLockedError(self._held_by(fd)) from None
            self._note_owner(socket)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _note_owner(self, socket: str) -> None:
        """Write who holds the lock, for the message a second daemon prints."""
        try:
            wfd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # a read-only home: the lock holds all the same
        try:
            os.write(wfd, json.dumps({"pid": os.getpid(), "socket": socket}).encode() + b"\n")
        except OSError:
            pass
        finally:
            os.close(wfd)

    def _held_by(self, fd: int) -> str:
        try:
            doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
            pid, sock = int(doc.get("pid", 0)), str(doc.get("socket", "an unknown socket"))
        except (ValueError, OSError, TypeError):
            pid, sock = 0, "an unknown socket"
        who = f"secretsd (pid {pid})" if pid else "secretsd"
        return (f"another {who} already serves {self.path.parent} on {sock}: two agents on one "
                "home would overwrite each other's writes; stop it first (or give this one "
                "another --home)")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
