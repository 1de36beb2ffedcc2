"""The encrypted-file backend: one AES-256-GCM record per secret under <home>/secrets.

Neither names nor values are readable on disk: a record's file name is a keyed
hash of the secret name and the name lives inside the record. After unlock an
index of name -> metadata is built by decrypting metadata sections only; small
records also keep their ciphertext in memory so ``retrieve`` needs no disk
read and no worker thread (plaintext is never cached).
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
    NotFoundError,
    NotInitializedError,
)
from homeagent_secrets.protocol.messages import DescribeResult, SecretResult
from homeagent_secrets.protocol.names import DEFAULT_KIND
from homeagent_secrets.protocol.secret import Secret

from . import atomicfile, datakey, records
from .backend import Backend, NameLocks, RecordExport, WouldBlock
from .datakey import DataKey, KdfParams
from .records import Meta, Values

log = logging.getLogger(__name__)

WRAPPED_KEY_FILE: Final = "wrapped-key"
CACHE_RECORD_LIMIT: Final = 16 * 1024  # records up to this size keep their ciphertext in memory
CACHE_BUDGET: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Entry:
    file_id: str
    version: int
    meta: Meta
    sealed: records.SealedValues | None  # the values' ciphertext, kept for small records

    @property
    def cached_bytes(self) -> int:
        return len(self.sealed.ciphertext) if self.sealed else 0


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or tighten it (with a warning) when found looser."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("directory %s had mode %o; tightened to 0700", path, mode)
        path.chmod(0o700)


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
        self.home = home
        self.dir = home / "secrets"
        self.kdf = kdf or KdfParams()
        self._clock = clock
        self._key: DataKey | None = None
        self._index: dict[str, _Entry] = {}
        self._cached_bytes = 0
        self._generation = 0  # bumped by lock: a write finishing afterwards must not repopulate
        self._name_lock = NameLocks()
        self._state_lock = anyio.Lock()
        self._initialized = False

    # --- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_sync)

    def _open_sync(self) -> None:
        ensure_private_dir(self.home)
        ensure_private_dir(self.dir)
        removed = atomicfile.remove_stale_temps(self.dir)
        if removed:
            log.warning("removed %d temp file(s) left by an interrupted write", removed)
        self._initialized = (self.dir / WRAPPED_KEY_FILE).exists()

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
            return (self.dir / WRAPPED_KEY_FILE).read_bytes()
        except FileNotFoundError:
            raise NotInitializedError() from None
        except OSError as exc:
            raise atomicfile.describe_os_error(exc, "read the wrapped-key file") from None

    async def init(self, passphrase: Secret) -> None:
        async with self._state_lock:
            if self._initialized or (self.dir / WRAPPED_KEY_FILE).exists():
                self._initialized = True
                raise AlreadyInitializedError()
            key = DataKey.generate()
            blob = await anyio.to_thread.run_sync(datakey.wrap, key.key, passphrase, self.kdf)
            await anyio.to_thread.run_sync(
                atomicfile.replace, self.dir, WRAPPED_KEY_FILE, blob, "write the wrapped-key file"
            )
            self._initialized = True
            self._install(key, {}, 0)

    async def unlock(self, passphrase: Secret) -> None:
        async with self._state_lock:
            blob = await anyio.to_thread.run_sync(self._read_wrapped)
            raw = await anyio.to_thread.run_sync(datakey.unwrap, blob, passphrase)
            if self._key is not None:
                datakey._wipe(raw)  # already unlocked: the passphrase was only checked
                return
            key = DataKey(raw)
            index, cached = await anyio.to_thread.run_sync(self._load_index, key)
            self._install(key, index, cached)
            log.info("unlocked: %d secret(s) indexed", len(index))

    def _install(self, key: DataKey, index: dict[str, _Entry], cached: int) -> None:
        self._key, self._index, self._cached_bytes = key, index, cached

    async def lock(self) -> None:
        key, self._key = self._key, None
        self._generation += 1
        self._index = {}
        self._cached_bytes = 0
        if key is not None:
            key.wipe()

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

    def _load_index(self, key: DataKey) -> tuple[dict[str, _Entry], int]:
        assert key.aead is not None
        index: dict[str, _Entry] = {}
        cached = 0
        corrupt = 0
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for fname in os.listdir(dir_fd):
                stem = fname[:-4]
                if len(fname) != 68 or not fname.endswith(records.SUFFIX):
                    continue
                try:
                    fd = os.open(fname, flags, dir_fd=dir_fd)
                    try:
                        st = os.fstat(fd)
                        if st.st_mode & 0o077:
                            log.warning("record %s had mode %o; tightened to 0600", fname,
                                        stat.S_IMODE(st.st_mode))
                            os.fchmod(fd, 0o600)
                        blob = os.read(fd, st.st_size + 1)
                    finally:
                        os.close(fd)
                    version, meta = records.open_meta(key.aead, blob, stem)
                    if key.file_id(meta.name) != stem:
                        raise CorruptRecordError(f"record {fname} does not belong to its name")
                    sealed = None
                    if len(blob) <= CACHE_RECORD_LIMIT and cached + len(blob) <= CACHE_BUDGET:
                        sealed = records.sealed_values(blob, stem, version)
                        cached += len(sealed.ciphertext)
                except CorruptRecordError as exc:
                    corrupt += 1
                    log.error("%s", exc)
                    continue
                except OSError as exc:
                    corrupt += 1
                    log.error("cannot read record %s: %s", fname, exc.strerror)
                    continue
                index[meta.name] = _Entry(stem, version, meta, sealed)
        finally:
            os.close(dir_fd)
        if corrupt:
            log.error("%d record(s) could not be read; the others are served", corrupt)
        return index, cached

    def _require_key(self) -> DataKey:
        key = self._key
        if key is None:
            if not self._initialized:
                raise NotInitializedError()
            raise LockedError()
        return key

    def _read_record(self, entry: _Entry) -> bytes:
        try:
            with open(self.dir / (entry.file_id + records.SUFFIX), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise CorruptRecordError(
                f"record {entry.file_id}{records.SUFFIX} vanished from {self.dir}; "
                "restore it from a backup or delete the name"
            ) from None
        except OSError as exc:
            raise atomicfile.describe_os_error(exc, "read a record") from None

    async def _values(self, key: DataKey, entry: _Entry) -> Values:
        sealed = entry.sealed
        if sealed is None:
            blob = await anyio.to_thread.run_sync(self._read_record, entry)
            sealed = records.sealed_values(blob, entry.file_id, entry.version)
        if key.aead is None:
            raise LockedError()
        return records.open_sealed(key.aead, sealed)

    # --- secrets ----------------------------------------------------------------

    def retrieve_nowait(self, name: str, previous: bool = False) -> SecretResult | None:
        key = self._require_key()
        entry = self._index.get(name)
        if entry is None:
            return None
        if entry.sealed is None or key.aead is None:
            raise WouldBlock
        return self._result(entry, records.open_sealed(key.aead, entry.sealed), previous)

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        try:
            return self.retrieve_nowait(name, previous)
        except WouldBlock:
            pass
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
        self._require_key()
        entry = self._index.get(name)
        if entry is None:
            return None
        m = entry.meta
        return DescribeResult(
            name, m.kind, entry.version, m.created, m.updated, m.previous_version > 0  # type: ignore[arg-type]
        )

    async def list(self, prefix: str) -> list[str]:
        self._require_key()
        return sorted(n for n in self._index if n.startswith(prefix))

    async def store(self, name: str, value: Secret, kind: str | None) -> int:
        return await self._write(name, value, kind, must_exist=False)

    async def rotate(self, name: str, value: Secret) -> int:
        return await self._write(name, value, None, must_exist=True)

    async def _write(self, name: str, value: Secret, kind: str | None, must_exist: bool) -> int:
        key = self._require_key()
        generation = self._generation
        async with self._name_lock(name):
            old = self._index.get(name)
            if old is None and must_exist:
                raise NotFoundError(f"no secret named {name!r} to rotate: store it first")
            now = self._clock()
            if old is None:
                version = 1
                meta = Meta(name, kind or DEFAULT_KIND, now, now, 0)
                values = Values(value.reveal(), None)
            else:
                version = old.version + 1
                current = (await self._values(key, old)).current
                meta = Meta(name, kind or old.meta.kind, old.meta.created, now, old.version)
                values = Values(value.reveal(), current)
            if key.aead is None or generation != self._generation:
                raise LockedError()
            file_id = old.file_id if old else key.file_id(name)
            blob = records.seal(key.aead, file_id, version, meta, values)
            try:
                await anyio.to_thread.run_sync(
                    atomicfile.replace, self.dir, file_id + records.SUFFIX, blob,
                    f"write secret {name!r}",
                )
            except atomicfile.NotSyncedError:
                self._put(generation, name, _Entry(file_id, version, meta, None))
                raise
            self._put(generation, name, _Entry(
                file_id, version, meta, self._maybe_cache(blob, file_id, version, old)
            ))
            return version

    def _maybe_cache(
        self, blob: bytes, file_id: str, version: int, old: _Entry | None
    ) -> records.SealedValues | None:
        freed = old.cached_bytes if old else 0
        if len(blob) <= CACHE_RECORD_LIMIT and self._cached_bytes - freed + len(blob) <= CACHE_BUDGET:
            return records.sealed_values(blob, file_id, version)
        return None

    def _put(self, generation: int, name: str, entry: _Entry | None) -> None:
        if generation != self._generation:
            return  # locked meanwhile: the file is written, the index is gone
        old = self._index.pop(name, None)
        if old is not None:
            self._cached_bytes -= old.cached_bytes
        if entry is not None:
            self._index[name] = entry
            self._cached_bytes += entry.cached_bytes

    async def export(self, name: str) -> RecordExport | None:
        key = self._require_key()
        entry = self._index.get(name)
        if entry is None:
            return None
        v = await self._values(key, entry)
        m = entry.meta
        return RecordExport(v.current, v.previous, entry.version, m.previous_version, m.kind, m.created, m.updated)

    async def import_(self, name: str, record: RecordExport) -> None:
        key = self._require_key()
        generation = self._generation
        meta = Meta(name, record.kind, record.created, record.updated, record.previous_version)
        values = Values(record.current, record.previous)
        async with self._name_lock(name):
            if key.aead is None or generation != self._generation:
                raise LockedError()
            old = self._index.get(name)
            file_id = old.file_id if old else key.file_id(name)
            blob = records.seal(key.aead, file_id, record.version, meta, values)
            await anyio.to_thread.run_sync(
                atomicfile.replace, self.dir, file_id + records.SUFFIX, blob, f"write secret {name!r}"
            )
            self._put(generation, name, _Entry(
                file_id, record.version, meta, self._maybe_cache(blob, file_id, record.version, old)))

    async def delete(self, name: str) -> bool:
        self._require_key()
        generation = self._generation
        async with self._name_lock(name):
            entry = self._index.get(name)
            if entry is None:
                return False
            try:
                await anyio.to_thread.run_sync(
                    atomicfile.remove, self.dir, entry.file_id + records.SUFFIX,
                    f"delete secret {name!r}",
                )
            finally:
                if not (self.dir / (entry.file_id + records.SUFFIX)).exists():
                    self._put(generation, name, None)
            return True
