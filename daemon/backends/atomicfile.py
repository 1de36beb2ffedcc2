"""Crash-safe file replacement, careful reads and private directories, and the
errors they report.

A write is: temp file in the same directory (O_EXCL, 0600), write, fsync,
rename over the target, fsync the directory. A crash at any instant leaves
the old file or the new one. A failed fsync is a failed write: it is never
retried, because Linux may clear the error and a retry would report a false
success (the page cache no longer holds the data that failed).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from homeagent_secrets.protocol.errors import BackendUnavailableError, CorruptRecordError

log = logging.getLogger(__name__)

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


def read_regular(path: Path | str, limit: int, what: str, dir_fd: int | None = None) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes.

    Opened with O_NOFOLLOW|O_NONBLOCK, so a symlink, a FIFO or a device put in
    its place never hangs or misleads the daemon: anything but a regular file,
    or a larger one, is a CorruptRecordError naming the file.
    FileNotFoundError passes through; other OS errors name their cause.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptRecordError(f"{what} {path} is a symbolic link; move it away") from None
        raise describe_os_error(exc, f"read {what} {path}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptRecordError(f"{what} {path} is not a regular file; move it away")
        if st.st_size > limit:
            raise CorruptRecordError(
                f"{what} {path} is {st.st_size} bytes, over the {limit}-byte limit; move it away")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise CorruptRecordError(f"{what} {path} grew over the {limit}-byte limit; move it away")
        return b"".join(chunks)
    except OSError as exc:
        raise describe_os_error(exc, f"read {what} {path}") from None
    finally:
        os.close(fd)


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents 0700 whatever the umask."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)  # mkdir's mode passes through the umask (0777 would make it 0000)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or tighten it (with a warning) when found looser."""
    make_private_dirs(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("directory %s had mode %o; tightened to 0700", path, mode)
        path.chmod(0o700)
