"""Who is at the other end of a connection: the kernel's word, not the peer's.

uid, gid and pid come from ``SO_PEERCRED`` (taken at connect time). Where the
kernel offers it (``SO_PEERPIDFD``, Linux 6.5+) the agent also gets a pidfd of
that process, reads its systemd unit from ``/proc/<pid>/cgroup`` and its
supplementary groups from ``/proc/<pid>/status``, and then checks that the
pidfd still names a live process: had the process exited, its pid could
already belong to another one, and nothing read through it is trusted. The
uid is the security boundary; the unit is a finer label for rules and the log.

The unit is systemd's own answer (``cg_path_get_unit``): the first unit below
the slices, so a service's sub-cgroups (Delegate=yes) are still that service.
Below ``user@UID.service`` it is the user's unit, and the user names those
itself (``systemd-run --user --unit=anything``, or a mkdir in its delegated
subtree): such a unit is marked with its manager's uid (``manager``).
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

_PEERCRED: Final = struct.Struct("3i")
#: Linux 6.5's SO_PEERPIDFD; Python's socket module may lack the name.
SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)
_UNIT: Final = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(?:service|scope|socket|mount|swap|timer)\Z")
_USER_MANAGER: Final = re.compile(r"user@([0-9]+)\.service\Z")


@dataclass(frozen=True, slots=True)
class Peer:
    """The process that opened a connection."""

    uid: int
    gid: int
    pid: int
    unit: str | None = None  # the systemd unit of the process, when known for sure
    groups: frozenset[int] = field(default_factory=frozenset)  # supplementary, when known
    #: For a unit of a user's own service manager (named by that user): the manager's uid.
    manager: int | None = None

    @property
    def key(self) -> tuple[int, int]:
        """What per-peer bookkeeping (the passphrase slow-down) is keyed on."""
        return self.uid, self.pid

    @property
    def identified(self) -> bool:
        """Whether the kernel could name this peer's uid in our user namespace."""
        return UNMAPPED_UID is None or self.uid != UNMAPPED_UID

    def in_group(self, gid: int) -> bool:
        if gid == UNMAPPED_GID:
            return False  # every unnamed group reads as this one
        return gid == self.gid or gid in self.groups

    def __str__(self) -> str:
        if self.unit and self.manager is not None:
            return f"uid {self.uid} pid {self.pid} ({self.unit} of user@{self.manager}.service)"
        return f"uid {self.uid} pid {self.pid}" + (f" ({self.unit})" if self.unit else "")


def _unmapped(kind: str) -> int | None:
    """The id every unmapped uid (``kind`` "uid") or gid reads as, when this process
    sits in a user namespace that maps fewer ids than the kernel has (systemd's
    PrivateUsers=yes): the kernel then shows all other users as that one id."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            overflow = int(f.read())
        with open(f"/proc/self/{kind}_map") as f:
            ranges = [tuple(map(int, line.split())) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    if any(inside <= overflow < inside + count for inside, _, count in ranges):
        return None  # a real id here
    return overflow


#: What the kernel shows for a peer's uid/gid this namespace cannot name (else None).
UNMAPPED_UID: Final = _unmapped("uid")
UNMAPPED_GID: Final = _unmapped("gid")

#: The daemon itself, for work it starts on its own (auto-lock, start-up).
SELF: Final = Peer(os.getuid(), os.getgid(), 0, "secretsd")


def _first_unit(parts: list[str]) -> tuple[str | None, int]:
    """The first component below the slices, if it is a unit name, and its index."""
    for i, part in enumerate(parts):
        if not part.endswith(".slice"):
            return (part if _UNIT.match(part) else None), i
    return None, len(parts)


def cgroup_unit(text: str) -> tuple[str | None, int | None]:
    """(unit, manager uid) from a ``/proc/<pid>/cgroup`` file's cgroup v2 line.

    The unit is the first one below the slices, as systemd reckons it; below
    ``user@UID.service`` it is the user's own unit, with UID as the manager.
    """
    for line in text.splitlines():
        hierarchy, _, path = line.partition("::")
        if hierarchy != "0" or not path:
            continue
        parts = [p for p in path.strip().split("/") if p]
        unit, i = _first_unit(parts)
        manager = _USER_MANAGER.match(unit) if unit else None
        if manager is not None:
            inner, _ = _first_unit(parts[i + 1:])
            if inner is not None:
                return inner, int(manager[1])
        return unit, None
    return None, None


def unit_of_cgroup(text: str) -> str | None:
    """The systemd unit in a ``/proc/<pid>/cgroup`` file's cgroup v2 line (``cgroup_unit``)."""
    return cgroup_unit(text)[0]


def _groups_of(status: str) -> frozenset[int]:
    for line in status.splitlines():
        if line.startswith("Groups:"):
            return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    return frozenset()


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(65536)


def _exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited (a pidfd polls readable then).

    Polling needs no permission over the process (a signal 0 would: the peer
    may be root while the agent is not).
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def peer_of(sock: socket.socket, details: bool = True) -> Peer:
    """The credentials of the process at the other end of a Unix socket.

    With ``details`` (the access rules or the access log need them) the unit
    and supplementary groups are read too, and kept only if a pidfd proves the
    process still lives.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    if not details or pid <= 0:
        return Peer(uid, gid, pid)
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return Peer(uid, gid, pid)  # an older kernel: no unit, no groups, uid/gid/pid only
    try:
        try:
            unit, manager = cgroup_unit(_read(f"/proc/{pid}/cgroup"))
            groups = _groups_of(_read(f"/proc/{pid}/status"))
        except OSError:
            return Peer(uid, gid, pid)
        if _exited(pidfd):
            return Peer(uid, gid, pid)  # it exited: what we read may be another process's
        return Peer(uid, gid, pid, unit, groups, manager)
    finally:
        os.close(pidfd)
