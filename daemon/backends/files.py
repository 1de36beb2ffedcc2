"""The encrypted-file backend: one AES-256-GCM record per secret under <home>/secrets.

Neither names nor values are readable on disk: a record's file name is a keyed
hash of the secret name and the name lives inside the record. After unlock an
index of name -> metadata is built by decrypting metadata sections only; small
records also keep their ciphertext in memory so ``retrieve`` needs no disk
read and no worker thread (plaintext is never cached).

A record that cannot be used (it fails authentication, is not a regular file,
is too large, cannot be read) is never taken for an absent secret: it is
listed as damaged in ``status``, reads and writes of its name are refused with
an error naming its file, and only ``delete --force`` removes it.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

from homeagent_secrets.protocol.errors import (
    AlreadyInitializedError,
    CorruptRecordError,
    LockedError,
    NotInitializedError,
    SecretsError,
)
from homeagent_secrets.protocol.messages import DamagedRecord, DescribeResult, SecretResult
from homeagent_secrets.protocol.names import DEFAULT_KIND, as_kind
from homeagent_secrets.protocol.secret import Secret

from . import atomicfile, datakey, records
from .atomicfile import ensure_private_dir
from .base import PENDING, Backend, RecordExport, _Pending
from .datakey import DataKey, KdfParams
from .records import Meta, Values

log = logging.getLogger(__name__)

WRAPPED_KEY_FILE: Final = "wrapped-key"
CACHE_RECORD_LIMIT: Final = 16 * 1024  # records up to this size keep their ciphertext in memory
CACHE_BUDGET: Final = 64 * 1024 * 1024
#: No record this agent writes is larger (values are at most 4 MiB each, see
#: settings); a larger file in the directory is reported, never read.
MAX_RECORD_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Entry:
    file_id: str
    version: int
    meta: Meta
    sealed: records.SealedValues | None  # the values' ciphertext, kept for small records

    @property
    def cached_bytes(self) -> int:
        return len(self.sealed.ciphertext) if self.sealed else 0


def _damaged_message(file_id: str, problem: str) -> str:
    """``problem`` names the file already (the records module's messages do)."""
    if file_id not in problem:
        problem = f"record {file_id}{records.SUFFIX}: {problem}"
    return (f"{problem}; its secret can be neither read nor written: restore the file from a "
            "backup, or remove it with `secretsctl rm --force NAME`")


class FileBackend(Backend):
    """AES-256-GCM records in files, under a data key wrapped by the passphrase."""

    name = "file"
    has_passphrase = True

    def __init__(
        self,
        home: Path,
        kdf: KdfParams | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.home = home
        self.dir = home / "secrets"
        self.kdf = kdf or KdfParams()
        self._clock = clock
        self._key: DataKey | None = None
        self._index: dict[str, _Entry] = {}
        #: file id -> (the name when known, what is wrong): records that cannot be used.
        self._damaged: dict[str, tuple[str | None, str]] = {}
        self._cached_bytes = 0
        self._generation = 0  # bumped by lock: a write finishing afterwards must not repopulate
        self._state_lock = anyio.Lock()  # init, unlock, lock, passphrase changes: one at a time
        self._initialized = False

    # --- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_sync)
        self.reachable = True

    def _open_sync(self) -> None:
        ensure_private_dir(self.home)
        ensure_private_dir(self.dir)
        removed = atomicfile.remove_stale_temps(self.dir)
        if removed:
            log.warning("removed %d temp file(s) left by an interrupted write", removed)
        self._initialized = os.path.lexists(self.dir / WRAPPED_KEY_FILE)

    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def locked(self) -> bool:
        return self._key is None

    @property
    def memory_locked(self) -> bool:
        return self._key is not None and self._key.memory_locked

    async def count(self) -> int | None:
        return None if self._key is None else len(self._index)

    def damaged(self) -> list[DamagedRecord]:
        return [DamagedRecord(fid + records.SUFFIX, name, problem)
                for fid, (name, problem) in sorted(self._damaged.items())]

    async def maintain(self) -> None:
        await anyio.to_thread.run_sync(self.restore_modes)

    def restore_modes(self) -> int:
        """Re-tighten the state directory and every file in it; how many were loosened."""
        fixed = 0
        for path in (self.home, self.dir):
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except OSError:
                continue
            if mode & 0o077:
                log.warning("%s was loosened to mode %o while running; restored to 0700", path, mode)
                path.chmod(0o700)
                fixed += 1
        for dirent in os.scandir(self.dir):
            try:
                st = dirent.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                log.warning("%s was loosened to mode %o while running; restored to 0600",
                            dirent.name, stat.S_IMODE(st.st_mode))
                os.chmod(dirent.path, 0o600)
                fixed += 1
        return fixed

    # --- passphrase -------------------------------------------------------------

    def _read_wrapped(self) -> bytes:
        try:
            return atomicfile.read_regular(self.dir / WRAPPED_KEY_FILE, datakey.FILE_SIZE,
                                           "the wrapped-key file")
        except FileNotFoundError:
            raise NotInitializedError() from None

    async def init(self, passphrase: Secret) -> None:
        async with self._state_lock:
            if self._initialized or os.path.lexists(self.dir / WRAPPED_KEY_FILE):
                self._initialized = True
                raise AlreadyInitializedError()
            key = DataKey.generate()
            blob = await anyio.to_thread.run_sync(datakey.wrap, key.key, passphrase, self.kdf)
            await anyio.to_thread.run_sync(
                atomicfile.replace, self.dir, WRAPPED_KEY_FILE, blob, "write the wrapped-key file"
            )
            self._initialized = True
            self._install(key, {}, {}, 0)

    async def check_passphrase(self, passphrase: Secret) -> None:
        blob = await anyio.to_thread.run_sync(self._read_wrapped)
        datakey._wipe(await anyio.to_thread.run_sync(datakey.unwrap, blob, passphrase))

    async def unlock(self, passphrase: Secret) -> None:
        async with self._state_lock:
            blob = await anyio.to_thread.run_sync(self._read_wrapped)
            raw = await anyio.to_thread.run_sync(datakey.unwrap, blob, passphrase)
            if self._key is not None:
                datakey._wipe(raw)  # already unlocked: the passphrase was only checked
                return
            key = DataKey(raw)
            index, damaged, cached = await anyio.to_thread.run_sync(self._load_index, key)
            self._install(key, index, damaged, cached)
            log.info("unlocked: %d secret(s) indexed", len(index))

    def _install(self, key: DataKey, index: dict[str, _Entry],
                 damaged: dict[str, tuple[str | None, str]], cached: int) -> None:
        self._key, self._index, self._damaged, self._cached_bytes = key, index, damaged, cached

    async def lock(self) -> None:
        # Under the state lock: an unlock in flight finishes first, so a lock
        # answered after it is the one that holds (the later answer wins).
        async with self._state_lock:
            self._wipe_key()

    def _wipe_key(self) -> None:
        key, self._key = self._key, None
        self._generation += 1
        self._index = {}
        self._damaged = {}
        self._cached_bytes = 0
        if key is not None:
            key.wipe()

    async def close(self) -> None:
        self._wipe_key()  # at shutdown nothing may be waited for

    async def change_passphrase(self, old: Secret, new: Secret) -> None:
        async with self._state_lock:
            blob = await anyio.to_thread.run_sync(self._read_wrapped)
            raw = await anyio.to_thread.run_sync(datakey.unwrap, blob, old)
            try:
                # Keep the KDF cost the store was made with unless --scrypt-n raised it.
                params = datakey.read_params(blob)
                if self.kdf.log2_n > params.log2_n:
                    params = self.kdf
                new_blob = await anyio.to_thread.run_sync(datakey.wrap, raw, new, params)
            finally:
                datakey._wipe(raw)
            await anyio.to_thread.run_sync(
                atomicfile.replace, self.dir, WRAPPED_KEY_FILE, new_blob, "write the wrapped-key file"
            )

    @property
    def data_key_buffer(self) -> bytearray | None:
        """The live data-key buffer (for tests that check wiping)."""
        return None if self._key is None else self._key.key

    # --- index ------------------------------------------------------------------

    def _load_index(
        self, key: DataKey
    ) -> tuple[dict[str, _Entry], dict[str, tuple[str | None, str]], int]:
        assert key.aead is not None
        index: dict[str, _Entry] = {}
        damaged: dict[str, tuple[str | None, str]] = {}
        cached = 0
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for fname in os.listdir(dir_fd):
                stem = fname[:-4]
                if not records.is_record_name(fname):
                    continue
                try:
                    blob = self._read_fd_relative(dir_fd, fname)
                    version, meta = records.open_meta(key.aead, blob, stem)
                    if key.file_id(meta.name) != stem:
                        raise CorruptRecordError(f"record {fname} does not belong to its name")
                    sealed = None
                    if len(blob) <= CACHE_RECORD_LIMIT and cached + len(blob) <= CACHE_BUDGET:
                        sealed = records.sealed_values(blob, stem, version)
                        cached += len(sealed.ciphertext)
                except FileNotFoundError:
                    continue  # deleted between listing and reading
                except SecretsError as exc:
                    damaged[stem] = (None, exc.message)
                    log.error("%s", _damaged_message(stem, exc.message))
                    continue
                index[meta.name] = _Entry(stem, version, meta, sealed)
        finally:
            os.close(dir_fd)
        if damaged:
            log.error("%d record(s) are damaged and their names refused (see `secretsctl "
                      "status`); the others are served", len(damaged))
        return index, damaged, cached

    def _read_fd_relative(self, dir_fd: int, fname: str) -> bytes:
        # Tighten a loosened mode on the way (the maintenance task does it too).
        try:
            st = os.stat(fname, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                log.warning("record %s had mode %o; tightened to 0600", fname, stat.S_IMODE(st.st_mode))
                os.chmod(fname, 0o600, dir_fd=dir_fd)
        except OSError:
            pass  # read_regular reports what is wrong
        return atomicfile.read_regular(fname, MAX_RECORD_BYTES, "record", dir_fd=dir_fd)

    def _require_key(self) -> DataKey:
        key = self._key
        if key is None:
            if not self._initialized:
                raise NotInitializedError()
            raise LockedError()
        return key

    def _check_not_damaged(self, key: DataKey, name: str) -> None:
        """Refuse a name whose record is damaged (an absent name must not hide one)."""
        if self._damaged:
            fid = key.file_id(name)
            found = self._damaged.get(fid)
            if found is not None:
                raise CorruptRecordError(_damaged_message(fid, found[1]))

    def _mark_damaged(self, entry: _Entry, exc: SecretsError) -> CorruptRecordError:
        """Remember a record found damaged; the error to raise for it."""
        self._damaged[entry.file_id] = (entry.meta.name, exc.message)
        message = _damaged_message(entry.file_id, exc.message)
        log.error("%s", message)
        return CorruptRecordError(message)

    def _read_record(self, entry: _Entry) -> bytes:
        try:
            return atomicfile.read_regular(self.dir / (entry.file_id + records.SUFFIX),
                                           MAX_RECORD_BYTES, "record")
        except FileNotFoundError:
            raise CorruptRecordError(
                f"record {entry.file_id}{records.SUFFIX} vanished from {self.dir}; "
                "restore it from a backup or delete the name"
            ) from None

    async def _values(self, key: DataKey, entry: _Entry) -> Values:
        try:
            sealed = entry.sealed
            if sealed is None:
                blob = await anyio.to_thread.run_sync(self._read_record, entry)
                sealed = records.sealed_values(blob, entry.file_id, entry.version)
            if key.aead is None:
                raise LockedError()
            return records.open_sealed(key.aead, sealed)
        except CorruptRecordError as exc:
            if self._key is not key:
                raise
            raise self._mark_damaged(entry, exc) from None

    # --- reads ------------------------------------------------------------------

    def retrieve_nowait(self, name: str, previous: bool = False) -> SecretResult | _Pending | None:
        key = self._require_key()
        entry = self._index.get(name)
        if entry is None:
            self._check_not_damaged(key, name)
            return None
        if self._damaged and entry.file_id in self._damaged:
            raise CorruptRecordError(_damaged_message(entry.file_id, self._damaged[entry.file_id][1]))
        if entry.sealed is None or key.aead is None:
            return PENDING
        try:
            values = records.open_sealed(key.aead, entry.sealed)
        except CorruptRecordError as exc:
            raise self._mark_damaged(entry, exc) from None
        return self._result(entry, values, previous)

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        found = self.retrieve_nowait(name, previous)
        if not isinstance(found, _Pending):
            return found
        key = self._require_key()
        entry = self._index.get(name)
        if entry is None:
            return None
        return self._result(entry, await self._values(key, entry), previous)

    @staticmethod
    def _result(entry: _Entry, values: Values, previous: bool) -> SecretResult | None:
        name = entry.meta.name
        if not previous:
            return SecretResult(name, Secret(values.current), entry.version)
        if values.previous is None:
            return None
        return SecretResult(name, Secret(values.previous), entry.meta.previous_version)

    async def describe(self, name: str) -> DescribeResult | None:
        key = self._require_key()
        self._check_not_damaged(key, name)
        entry = self._index.get(name)
        if entry is None:
            return None
        m = entry.meta
        return DescribeResult(
            name, as_kind(m.kind), entry.version, m.created, m.updated, m.previous_version > 0)

    async def list(self, prefix: str) -> list[str]:
        self._require_key()
        return sorted(n for n in self._index if n.startswith(prefix))

    async def export(self, name: str) -> RecordExport | None:
        key = self._require_key()
        self._check_not_damaged(key, name)
        entry = self._index.get(name)
        if entry is None:
            return None
        v = await self._values(key, entry)
        m = entry.meta
        return RecordExport(v.current, v.previous, entry.version, m.previous_version, m.kind,
                            m.created, m.updated)

    # --- writes (the base class holds the name's lock) ----------------------------

    async def _head(self, name: str) -> int | None:
        key = self._require_key()
        self._check_not_damaged(key, name)
        entry = self._index.get(name)
        return None if entry is None else entry.version

    async def _put(self, name: str, value: Secret, kind: str | None, expect: int | None) -> int:
        key = self._require_key()
        self._check_not_damaged(key, name)
        generation = self._generation
        old = self._index.get(name)
        now = self._clock()
        if old is None:
            meta = Meta(name, kind or DEFAULT_KIND, now, now, 0)
            return await self._write(key, generation, name, None, 1, meta,
                                     Values(value.reveal(), None))
        current = (await self._values(key, old)).current
        meta = Meta(name, kind or old.meta.kind, old.meta.created, now, old.version)
        return await self._write(key, generation, name, old, old.version + 1, meta,
                                 Values(value.reveal(), current))

    async def _import(self, name: str, record: RecordExport) -> None:
        key = self._require_key()
        self._check_not_damaged(key, name)
        meta = Meta(name, record.kind, record.created, record.updated, record.previous_version)
        await self._write(key, self._generation, name, self._index.get(name), record.version, meta,
                          Values(record.current, record.previous))

    async def _write(self, key: DataKey, generation: int, name: str, old: _Entry | None,
                     version: int, meta: Meta, values: Values) -> int:
        if key.aead is None or generation != self._generation:
            raise LockedError()
        file_id = old.file_id if old else key.file_id(name)
        blob = records.seal(key.aead, file_id, version, meta, values)
        try:
            await anyio.to_thread.run_sync(
                atomicfile.replace, self.dir, file_id + records.SUFFIX, blob, f"write secret {name!r}",
            )
        except atomicfile.NotSyncedError:
            self._set(generation, name, _Entry(file_id, version, meta, None))
            raise
        self._set(generation, name, _Entry(
            file_id, version, meta, self._maybe_cache(blob, file_id, version, old)))
        return version

    def _maybe_cache(
        self, blob: bytes, file_id: str, version: int, old: _Entry | None
    ) -> records.SealedValues | None:
        freed = old.cached_bytes if old else 0
        if len(blob) <= CACHE_RECORD_LIMIT and self._cached_bytes - freed + len(blob) <= CACHE_BUDGET:
            return records.sealed_values(blob, file_id, version)
        return None

    def _set(self, generation: int, name: str, entry: _Entry | None) -> None:
        if generation != self._generation:
            return  # locked meanwhile: the file is written, the index is gone
        old = self._index.pop(name, None)
        if old is not None:
            self._cached_bytes -= old.cached_bytes
        if entry is not None:
            self._index[name] = entry
            self._cached_bytes += entry.cached_bytes

    async def _remove(self, name: str, force: bool) -> bool:
        key = self._require_key()
        generation = self._generation
        fid = key.file_id(name)
        if fid in self._damaged:
            if not force:
                raise CorruptRecordError(_damaged_message(fid, self._damaged[fid][1]))
            existed = await anyio.to_thread.run_sync(
                atomicfile.remove, self.dir, fid + records.SUFFIX, f"remove damaged record of {name!r}")
            self._damaged.pop(fid, None)
            self._set(generation, name, None)
            log.warning("removed the damaged record %s%s of %r (forced)", fid, records.SUFFIX, name)
            return existed
        entry = self._index.get(name)
        if entry is None:
            return False
        try:
            await anyio.to_thread.run_sync(
                atomicfile.remove, self.dir, entry.file_id + records.SUFFIX, f"delete secret {name!r}",
            )
        finally:
            if not os.path.lexists(self.dir / (entry.file_id + records.SUFFIX)):
                self._set(generation, name, None)
        return True
