"""Reaching the agent with the standard library only: where its socket is, whom to
trust at the other end, and how connect errors read.

Before a client sends anything (a passphrase, a value) it reads the server's
credentials with ``SO_PEERCRED``. It talks only to a process of its own uid,
of root, or of the uid root vouches for: the owner of the socket's directory
when that directory sits in a root-owned directory no one else can write
(``/run/homeagent`` made by systemd for the service user). A socket another
user planted in a directory they control is refused.

Apart from ``connect.py`` (what both clients share) so that ``secretsctl get``
can use it without loading msgspec (``cli.py``).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import Final

from homeagent_secrets.protocol.errors import (
    AgentUnreachableError,
    SecretsError,
    UntrustedAgentError,
)
from homeagent_secrets.protocol.paths import discover_socket

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
_PEERCRED: Final = struct.Struct("3i")


def socket_path(explicit: str | Path | None) -> Path:
    """The socket to use: the one given, else the first that exists of the usual places."""
    return Path(explicit).expanduser() if explicit else discover_socket()


def unreachable(path: Path, why: str) -> AgentUnreachableError:
    return AgentUnreachableError(
        f"cannot reach secretsd at {path}: {why}; start it with `secretsd` "
        "(or point HOMEAGENT_SECRETS_SOCKET / --socket at its socket)"
    )


def no_answer(what: str, timeout: float) -> AgentUnreachableError:
    """The error for a call the agent did not answer in time, the same everywhere."""
    return AgentUnreachableError(
        f"secretsd did not answer {what} within {timeout:g} s; "
        "check `secretsctl status` and the secretsd log"
    )


def connect_error(path: Path, exc: BaseException) -> AgentUnreachableError:
    """The one-line error for a failed connect, the same in both clients."""
    if isinstance(exc, FileNotFoundError):
        return unreachable(path, "no socket there")
    if isinstance(exc, ConnectionRefusedError):
        return unreachable(path, "nothing is listening (stale socket)")
    if isinstance(exc, PermissionError):
        return unreachable(path, "permission denied (the socket of another user, or a group "
                                 "you are not in?)")
    if isinstance(exc, TimeoutError):
        return unreachable(path, "connect timed out")
    if isinstance(exc, OSError):
        return unreachable(path, exc.strerror or str(exc))
    return unreachable(path, type(exc).__name__)


def server_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(raw)[1])


def server_pid(sock: socket.socket) -> int:
    """The pid of the process that listens at the other end (0 when unknown)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(raw)[0])


def vouched_uid(path: Path) -> int | None:
    """The uid root vouches for at ``path``: the owner of its directory, when that
    directory's parent is root's and not writable by anyone else."""
    try:
        parent = os.stat(path.parent)
        grandparent = os.stat(path.parent.parent)
    except OSError:
        return None
    if grandparent.st_uid != 0 or grandparent.st_mode & 0o022 or not stat.S_ISDIR(parent.st_mode):
        return None
    return parent.st_uid


def check_server(sock: socket.socket, path: Path) -> None:
    """Refuse to talk to a server that is not the agent this user may trust."""
    uid = server_uid(sock)
    me = os.geteuid()
    if uid in (me, 0) or uid == vouched_uid(path):
        return
    raise UntrustedAgentError(
        f"the socket {path} is served by uid {uid}, which is neither you (uid {me}) nor root "
        "nor the owner of a directory root made for it: refusing to send anything there "
        "(another user may be impersonating secretsd); check the socket path"
    )


def open_socket(path: Path, connect_timeout: float) -> socket.socket:
    """A connected, checked socket to the agent at ``path`` (blocking)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(connect_timeout)
    try:
        sock.connect(str(path))
        check_server(sock, path)
    except SecretsError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise connect_error(path, exc) from None
    return sock
