"""A whole new store built beside the old one and switched in atomically.

Rekey and the format-1 upgrade rewrite every file. They build the new store in
``<home>/secrets.next``, flush it, write its ``complete`` marker last, then
exchange the two directories in one ``renameat2(RENAME_EXCHANGE)`` (two
renames where the file system cannot exchange), and finally remove the old
store, its wrapped-key file first. ``recover`` runs at every start before the
store is used and finishes or undoes whatever a crash interrupted:

- ``secrets.next`` without a marker: an unfinished build; removed (the old store holds).
- ``secrets.next`` with the marker while ``secrets`` has none: built, not yet
  switched; switched now (roll forward).
- after the switch ``secrets.next`` (or ``secrets.old``) is the old store; removed.
- a marker in ``secrets`` is removed last.

So a crash at any instant leaves a store that opens with the old or the new
passphrase, and each file of the old store is gone once a start has run.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path
from typing import Final

from ..faults import FAULTS, crash_point
from . import atomicfile

log = logging.getLogger(__name__)

STORE: Final = "secrets"
NEXT: Final = "secrets.next"
OLD: Final = "secrets.old"
MARKER: Final = "complete"
_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically; False where the kernel or file system cannot."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None or "no-rename-exchange" in FAULTS:  # the fault: test the two-rename switch
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def sync_filesystem(directory: Path) -> None:
    """Flush every file of ``directory``'s file system (one syncfs instead of one fsync per file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fn = getattr(_libc(), "syncfs", None)
        if fn is None or fn(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def new_staging(home: Path) -> Path:
    """An empty ``secrets.next`` (any leftover removed), mode 0700."""
    nxt = home / NEXT
    if os.path.lexists(nxt):
        remove_store(nxt)
    os.mkdir(nxt, 0o700)
    os.chmod(nxt, 0o700)
    return nxt


def write_new(directory: Path, name: str, data: bytes) -> None:
    """Create ``directory/name`` (0600) with ``data``; flushed later by ``sync_filesystem``."""
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def finish_staging(home: Path) -> None:
    """Flush the staged store and mark it complete (the last write before the switch)."""
    nxt = home / NEXT
    sync_filesystem(nxt)
    atomicfile.replace(nxt, MARKER, b"", "mark the new store complete")


def switch(home: Path) -> None:
    """Make the complete ``secrets.next`` the store; the old one ends in ``secrets.next``/``.old``."""
    store, nxt = home / STORE, home / NEXT
    if not exchange(store, nxt):
        os.rename(store, home / OLD)
        atomicfile.fsync_dir(home)
        crash_point("switch-between-renames")
        os.rename(nxt, store)
    atomicfile.fsync_dir(home)


def remove_store(directory: Path) -> None:
    """Remove a store directory: its wrapped key overwritten and unlinked first, then the rest."""
    key = directory / "wrapped-key"
    try:
        fd = os.open(key, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            size = os.fstat(fd).st_size
            os.write(fd, bytes(size))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(key)
        atomicfile.fsync_dir(directory)
        crash_point("remove-store-key-gone")
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            remove_store(Path(entry.path))
        else:
            os.unlink(entry.path)
    os.rmdir(directory)
    atomicfile.fsync_dir(directory.parent)


def finish_switch(home: Path) -> None:
    """After the switch: remove the old store, then the marker."""
    for name in (NEXT, OLD):
        if os.path.lexists(home / name):
            remove_store(home / name)
    marker = home / STORE / MARKER
    if os.path.lexists(marker):
        crash_point("switch-old-removed")
        os.unlink(marker)
        atomicfile.fsync_dir(home / STORE)


def recover(home: Path) -> str | None:
    """Finish or undo an interrupted switch (see the module doc); what was done, if anything."""
    store, nxt = home / STORE, home / NEXT
    done = None
    store_marked = os.path.lexists(store / MARKER)
    if os.path.isdir(nxt) and os.path.lexists(nxt / MARKER) and not store_marked:
        if os.path.isdir(store):
            switch(home)
        else:  # the two-rename switch stopped between its renames
            os.rename(nxt, store)
            atomicfile.fsync_dir(home)
        done = "finished switching to a rebuilt store (rekey or upgrade) that a stop interrupted"
    elif os.path.lexists(nxt) and not store_marked:
        done = "removed an unfinished rebuild of the store (rekey or upgrade) that a stop interrupted"
    elif store_marked:
        done = "removed the old store left by an interrupted rekey or upgrade"
    finish_switch(home)
    if done:
        log.warning("%s", done)
    return done
