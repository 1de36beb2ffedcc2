"""The agent's Unix socket: created 0600 from its first instant, never stolen.

Also adopts a socket passed by systemd socket activation (LISTEN_FDS).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from homeagent_secrets.protocol.errors import SecretsError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class ListenerError(SecretsError):
    """The daemon cannot listen where it was asked to; the message says why."""


@dataclass
class BoundSocket:
    sock: socket.socket
    path: Path | None  # set when this process created the socket file (and so removes it)
    inode: tuple[int, int] | None = None

    def remove(self) -> None:
        """Unlink the socket file if it is still the one this process made."""
        if self.path is None or self.inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)
        except OSError:
            pass


def _live_agent_at(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()


def bind_unix(path: Path, backlog: int = 512) -> BoundSocket:
    """Create the listening socket at ``path`` with mode 0600 (parent made 0700)."""
    if len(os.fsencode(path)) >= 108:
        raise ListenerError(f"socket path {path} is longer than the 107 bytes AF_UNIX allows")
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{path} exists and is not a socket: move it away or pick --socket")
        if _live_agent_at(path):
            raise ListenerError(
                f"another secretsd is already answering on {path}: stop it first "
                "(or give this one another --socket)"
            )
        log.info("removing stale socket %s left by a daemon that is gone", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask is what makes the file 0600 at creation: chmod after bind
    # would leave a window where another user could connect.
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot create socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    st = os.lstat(path)
    return BoundSocket(sock, path, (st.st_dev, st.st_ino))


def inherited_socket(env: dict[str, str] | None = None) -> BoundSocket | None:
    """The socket systemd passed us (LISTEN_PID/LISTEN_FDS), or None."""
    env = dict(os.environ) if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS"):
        return None
    count = int(env["LISTEN_FDS"])
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not inherited by anything we might start
    if count != 1:
        raise ListenerError(f"systemd passed {count} sockets; secretsd takes exactly one")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ListenerError(
            "the socket systemd passed is not a Unix stream socket: use ListenStream=PATH"
        )
    os.set_inheritable(sock.fileno(), False)
    return BoundSocket(sock, None)
