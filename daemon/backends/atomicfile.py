"""Crash-safe file replacement and the errors it reports.

A write is: temp file in the same directory (O_EXCL, 0600), write, fsync,
rename over the target, fsync the directory. A crash at any instant leaves
the old file or the new one. A failed fsync is a failed write: it is never
retried, because Linux may clear the error and a retry would report a false
success (the page cache no longer holds the data that failed).
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Final

from homeagent_secrets.protocol.errors import BackendUnavailableError

TEMP_PREFIX: Final = ".tmp-"

_CAUSES: Final = {
    errno.ENOSPC: "the disk is full: free some space and retry",
    errno.EDQUOT: "the disk quota is exhausted: free some space and retry",
    errno.EROFS: "the file system is read-only: remount it read-write and retry",
    errno.EACCES: "permission denied: check the owner and mode of the state directory",
    errno.EPERM: "permission denied: check the owner and mode of the state directory",
    errno.EIO: "an I/O error reached the disk: check the disk and the kernel log",
}


class NotSyncedError(BackendUnavailableError):
    """The rename happened (the new content is what readers see) but its
    directory sync failed: the caller must treat the new content as current."""


def describe_os_error(exc: OSError, what: str) -> BackendUnavailableError:
    """A -32006 error that names the cause of ``exc`` and the next step."""
    cause = _CAUSES.get(exc.errno or 0) or f"{exc.strerror or exc.__class__.__name__}"
    return BackendUnavailableError(f"could not {what}: {cause}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(directory: Path, filename: str, data: bytes, what: str) -> None:
    """Atomically make ``directory/filename`` hold ``data`` (mode 0600).

    Raises BackendUnavailableError naming the cause; on failure before the
    rename the old file is untouched and no temp file remains.
    """
    tmp = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    renamed = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / filename)
        renamed = True
        fsync_dir(directory)
    except OSError as exc:
        if not renamed:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise describe_os_error(exc, what) from None
        raise NotSyncedError(
            f"could not {what}: the new value is in place but the directory sync failed "
            f"({exc.strerror}); it may not survive a power loss: check the disk"
        ) from None


def remove(directory: Path, filename: str, what: str) -> bool:
    """Unlink and sync the directory; whether the file existed."""
    try:
        os.unlink(directory / filename)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise describe_os_error(exc, what) from None
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise NotSyncedError(
            f"could not {what}: the file is gone but the directory sync failed "
            f"({exc.strerror}); it may come back after a power loss: check the disk"
        ) from None
    return True


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files a crash left behind; how many."""
    removed = 0
    for entry in os.scandir(directory):
        if entry.name.startswith(TEMP_PREFIX):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed
