"""The agent's Unix socket: created 0600 from its first instant, never stolen,
in a directory no other user controls.

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
from typing import Final

from homeagent_secrets.protocol.errors import SecretsError

from .backends.atomicfile import make_private_dirs

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class ListenerError(SecretsError):
    """The daemon cannot listen where it was asked to; the message says why."""


@dataclass
class BoundSocket:
    sock: socket.socket
    path: Path | None  # set when this process created the socket file (and so removes it)
    inode: tuple[int, int] | None = None

    def name(self) -> str:
        """Where clients reach this socket, for log lines and the home lock."""
        try:
            where = self.sock.getsockname()
        except OSError:
            where = ""
        where = where if isinstance(where, str) else ""
        if self.path is None:  # inherited
            return f"{where} (the socket passed by systemd)" if where else "the socket passed by systemd"
        return where or str(self.path)

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


def check_socket_dir(parent: Path) -> None:
    """Refuse a socket directory another user could use to swap in an impostor socket."""
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise ListenerError(f"cannot use the socket directory {parent}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ListenerError(f"{parent} is not a directory: pick another --socket")
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise ListenerError(
            f"refusing the socket directory {parent}: it belongs to uid {st.st_uid}, not to this "
            f"agent's user (uid {me}), who could swap in an impostor socket and receive "
            "passphrases; remove it, or use a directory of your own (--socket)")
    if st.st_mode & 0o022:
        raise ListenerError(
            f"refusing the socket directory {parent}: its mode {stat.S_IMODE(st.st_mode):04o} lets "
            "other users create files there (an impostor socket); chmod go-w it, or use a "
            "directory of your own (--socket)")


def bind_unix(path: Path, backlog: int = 512, group: int | None = None) -> BoundSocket:
    """Create the listening socket at ``path``: mode 0600 in a 0700 directory, or, for
    ``group``, 0660 in a 0750 directory of that group (other users reach the agent
    through the group; the access rules decide what each may do)."""
    if len(os.fsencode(path)) >= 108:
        raise ListenerError(f"socket path {path} is longer than the 107 bytes AF_UNIX allows")
    parent = path.parent
    try:
        make_private_dirs(parent)
        if group is not None and os.stat(parent).st_uid == os.geteuid():
            os.chown(parent, -1, group)
            os.chmod(parent, 0o750)
    except OSError as exc:
        raise ListenerError(f"cannot prepare the socket directory {parent}: {exc.strerror}") from None
    check_socket_dir(parent)
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
    if group is not None:
        # Only now open it to the group: it was 0600 from its first instant.
        try:
            os.chown(path, -1, group)
            os.chmod(path, 0o660)
        except OSError as exc:
            sock.close()
            os.unlink(path)
            raise ListenerError(f"cannot give socket {path} to group {group}: {exc.strerror} "
                                "(the agent's user must be a member of that group)") from None
    sock.listen(backlog)
    st = os.lstat(path)
    return BoundSocket(sock, path, (st.st_dev, st.st_ino))


#: The FileDescriptorName= (or socket unit name) of the credentials socket.
CREDENTIALS_FD_NAMES: Final = frozenset({"credentials", "secretsd-credentials.socket"})


def inherited_sockets(env: dict[str, str] | None = None) -> dict[str, BoundSocket]:
    """The sockets systemd passed us (LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES), by role.

    ``"agent"`` is the clients' socket; ``"credentials"`` the one named
    ``credentials`` (FileDescriptorName=) or ``secretsd-credentials.socket``.
    Empty when nothing was passed.
    """
    env = dict(os.environ) if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS"):
        return {}
    count = int(env["LISTEN_FDS"])
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not inherited by anything we might start
    found: dict[str, BoundSocket] = {}
    for i in range(count):
        name = names[i] if i < len(names) else ""
        role = "credentials" if name in CREDENTIALS_FD_NAMES else "agent"
        if role in found:
            raise ListenerError(f"systemd passed {count} sockets; secretsd takes one for clients "
                                "and at most one named 'credentials'")
        sock = socket.socket(fileno=SD_LISTEN_FDS_START + i)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ListenerError(
                "a socket systemd passed is not a Unix stream socket: use ListenStream=PATH"
            )
        os.set_inheritable(sock.fileno(), False)
        found[role] = BoundSocket(sock, None)
    if "agent" not in found:
        raise ListenerError("systemd passed only the credentials socket; secretsd.socket is missing")
    return found
