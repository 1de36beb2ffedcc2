"""Who is at the other end of a connection: the kernel's word, not the peer's."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Final

_PEERCRED: Final = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    """The process that opened a connection (SO_PEERCRED at connect time)."""

    uid: int
    gid: int
    pid: int
    unit: str | None = None  # the systemd unit of the process, when known

    @property
    def key(self) -> tuple[int, int]:
        """What per-peer bookkeeping (the passphrase slow-down) is keyed on."""
        return self.uid, self.pid

    def __str__(self) -> str:
        return f"uid {self.uid} pid {self.pid}" + (f" ({self.unit})" if self.unit else "")


#: The daemon itself, for work it starts on its own (auto-lock, start-up).
SELF: Final = Peer(-1, -1, 0, "secretsd")


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(uid, gid, pid)
