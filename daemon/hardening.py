"""Process hardening at start-up, whatever started the daemon.

As ssh-agent does: not dumpable (no core dumps, no same-uid ptrace,
/proc/PID/mem and environ closed to the user), RLIMIT_CORE 0, and the data key
in mlock'ed pages where RLIMIT_MEMLOCK allows. Never mlockall: scrypt needs
128 MiB at the default cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def harden_process() -> None:
    """No core dumps and no same-uid ptrace or /proc peeking."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        pass  # a sandbox that forbids setrlimit sets LimitCORE=0 itself
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(err))


#: glibc's mallopt parameter for the number of malloc arenas.
M_ARENA_MAX = -8


def bound_heap() -> None:
    """Two malloc arenas, not eight per core (glibc; call before any thread starts).

    Writes run in worker threads, and each thread that allocated got an arena of
    its own that kept its freed memory: after 10,000 stores the daemon held 107 MB
    (locked or not) where 64 MB were in use. An operator's own count wins, in
    either spelling glibc reads at start (MALLOC_ARENA_MAX, or glibc.malloc.arena_max
    in GLIBC_TUNABLES): a mallopt now would silently undo it.
    """
    mallopt = getattr(_libc, "mallopt", None)
    if (mallopt is not None and "MALLOC_ARENA_MAX" not in os.environ
            and "glibc.malloc.arena_max=" not in os.environ.get("GLIBC_TUNABLES", "")):
        mallopt(M_ARENA_MAX, 2)


def _address(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def mlock(buf: bytearray) -> bool:
    """Pin ``buf``'s pages in RAM (never swapped); whether it worked."""
    if not buf:
        return False
    if _libc.mlock(_address(buf), len(buf)) != 0:
        log.info("mlock of key memory refused (%s): raise LimitMEMLOCK to allow it",
                 os.strerror(ctypes.get_errno()))
        return False
    return True


def munlock(buf: bytearray) -> None:
    if buf:
        _libc.munlock(_address(buf), len(buf))
