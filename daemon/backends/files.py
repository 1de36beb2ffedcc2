"""The encrypted-file backend (format 2): AES-256-GCM records and a manifest under <home>/secrets.

Neither names nor values are readable on disk: a record's file name is a keyed
hash of the secret name and the name lives inside the record. The manifest
lists every record the store must hold (``manifest.py``); at unlock the
directory is checked against it, and a record rolled back, put back after a
delete, missing, spliced from another life, or newer than the manifest is
damaged, never served. After unlock an index of name -> metadata is built by
decrypting metadata sections only; small records also keep their ciphertext
in memory so ``retrieve`` needs no disk read (plaintext is never cached).

A write stages a pending manifest entry (old and new record), writes the
manifest, then the record, then the manifest with the entry final, and only
then answers: whatever a crash interrupts, the record found on disk is one of
the two the manifest names (FORMAT.md, "Writes"). ``rekey`` and the format-1
upgrade rebuild the store beside the old one (``rekey.py``, ``staging.py``).

A damaged record is never taken for an absent secret: it is listed in
``status``, reads and writes of its name are refused with an error naming its
file, and only ``delete --force`` removes it (and its manifest entry).

Why one module of ~700 lines: everything here reads or changes the one
in-memory index under the one data key, in the order FORMAT.md prescribes;
the parts that stand alone (record and manifest codecs, group commit, the
rebuild used by rekey and upgrade, the data key) are their own modules.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

from homeagent_secrets.protocol.errors import (
    AlreadyInitializedError,
    BackendUnavailableError,
    CorruptRecordError,
    LockedError,
    NotInitializedError,
    SecretsError,
)
from homeagent_secrets.protocol.messages import DamagedRecord, DescribeResult, SecretResult
from homeagent_secrets.protocol.names import DEFAULT_KIND, as_kind
from homeagent_secrets.protocol.secret import Secret

from ..faults import crash_point
from . import atomicfile, datakey, manifest, records, rekey, staging, upgrade
from .atomicfile import ensure_private_dir
from .base import PENDING, Backend, RecordExport, _Pending
from .committer import ManifestState, WriteGate
from .datakey import DataKey, KdfParams
from .manifest import Entry, Slot
from .records import Meta, Values

log = logging.getLogger(__name__)

WRAPPED_KEY_FILE: Final = datakey.FILE_NAME
CACHE_RECORD_LIMIT: Final = 16 * 1024  # records up to this size keep their ciphertext in memory
CACHE_BUDGET: Final = 64 * 1024 * 1024
#: No record this agent writes is larger (values are at most 4 MiB each, see
#: settings, padded to 9 MiB for two); a larger file in the directory is reported, never read.
MAX_RECORD_BYTES: Final = 16 * 1024 * 1024
#: 57 to 81 bytes per secret: room for about 800,000 secrets.
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Entry:
    file_id: str
    slot: Slot  # the record's life id and write generation, as the manifest lists it
    meta: Meta
    sealed: records.SealedValues | None  # the values' ciphertext, kept for small records

    @property
    def version(self) -> int:
        return self.meta.version

    @property
    def cached_bytes(self) -> int:
        return len(self.sealed.ciphertext) if self.sealed else 0


@dataclass
class _Loaded:
    """A store read from disk and checked against its manifest."""

    index: dict[str, _Entry]
    damaged: dict[str, tuple[str | None, str]]
    cached: int
    generation: int
    entries: dict[str, Entry]
    settled: int


def _damaged_message(file_id: str, problem: str) -> str:
    """``problem`` names the file already (the records module's messages do)."""
    if file_id not in problem:
        problem = f"record {file_id}{records.SUFFIX} {problem}"
    return (f"{problem}; its secret can be neither read nor written: restore the file from a "
            "backup, or remove it with `secretsctl rm --force NAME`")


class FileBackend(Backend):
    """AES-256-GCM records and a manifest in files, under a data key wrapped by the passphrase."""

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
        self.dir = home / staging.STORE
        self.kdf = kdf or KdfParams()
        self._clock = clock
        self._key: DataKey | None = None
        self._mf: ManifestState | None = None
        self._index: dict[str, _Entry] = {}
        #: file id -> (the name when known, what is wrong): records that cannot be used.
        self._damaged: dict[str, tuple[str | None, str]] = {}
        self._cached_bytes = 0
        self._epoch = 0  # bumped by lock: a write finishing afterwards must not repopulate
        self._state_lock = anyio.Lock()  # init, unlock, lock, passphrase changes: one at a time
        self._commit_lock = anyio.Lock()  # manifest writes: one at a time, across epochs
        self._gate = WriteGate()  # writes share it; unlock and rekey hold it alone
        self._rebuilding = False
        self._initialized = False

    # --- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_sync)
        self.reachable = True

    def _open_sync(self) -> None:
        ensure_private_dir(self.home)
        staging.recover(self.home)
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
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return fixed  # a rekey is switching directories: the next round sees the new one
        for dirent in entries:
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
            await anyio.to_thread.run_sync(self._init_sync, key, blob)
            self._initialized = True
            self._install(key, _Loaded({}, {}, 0, 1, {}, 0))

    def _init_sync(self, key: DataKey, wrapped: bytes) -> None:
        # The manifest first: until the wrapped-key file exists the store is not
        # initialized, and a manifest left alone is replaced by the next init.
        assert key.manifest_aead is not None
        atomicfile.replace(self.dir, manifest.FILE,
                           manifest.seal(key.manifest_aead, manifest.Manifest(1, {})),
                           "write the manifest")
        atomicfile.replace(self.dir, WRAPPED_KEY_FILE, wrapped, "write the wrapped-key file")

    async def check_passphrase(self, passphrase: Secret) -> None:
        blob = await anyio.to_thread.run_sync(self._read_wrapped)
        datakey._wipe(await anyio.to_thread.run_sync(datakey.unwrap, blob, passphrase))

    def _params_for(self, blob: bytes) -> KdfParams:
        """Keep the KDF cost the store was made with unless --scrypt-n raised it."""
        params = datakey.read_params(blob)
        return self.kdf if self.kdf.log2_n > params.log2_n else params

    async def unlock(self, passphrase: Secret) -> None:
        async with self._state_lock:
            blob = await anyio.to_thread.run_sync(self._read_wrapped)
            raw = await anyio.to_thread.run_sync(datakey.unwrap, blob, passphrase)
            if self._key is not None:
                datakey._wipe(raw)  # already unlocked: the passphrase was only checked
                return
            async with self._gate.exclusive():  # writes of a locked epoch finish first
                if datakey.format_of(blob) == 1:
                    key = await self._upgrade(raw, passphrase, self._params_for(blob))
                else:
                    key = DataKey(raw)
                try:
                    loaded = await anyio.to_thread.run_sync(self._load, key)
                except BaseException:
                    key.wipe()
                    raise
                self._install(key, loaded)
                await self._commit_settled(loaded)
            log.info("unlocked: %d secret(s) indexed", len(loaded.index))

    async def _upgrade(self, raw: bytearray, passphrase: Secret, params: KdfParams) -> DataKey:
        """Rewrite a format-1 store as format 2 under a new data key; the new key."""
        old = DataKey(raw, format=1)
        try:
            source = ((None, meta, values) for meta, values in
                      upgrade.read_store(self.dir, old, MAX_RECORD_BYTES))
            rebuilt = await anyio.to_thread.run_sync(
                rekey.rebuild, self.home, source, passphrase, params, 1)
        finally:
            old.wipe()
        log.warning("upgraded the store from format 1 to format 2 (%d secret(s), new data key)",
                    len(rebuilt.entries))
        return rebuilt.key

    async def _commit_settled(self, loaded: _Loaded) -> None:
        """Write back the manifest with the pendings a stop left settled (best effort)."""
        if not loaded.settled or self._mf is None:
            return
        try:
            await self._mf.commit()
            log.warning("settled %d write(s) a stop had interrupted", loaded.settled)
        except SecretsError as exc:
            log.warning("could not write the settled manifest (%s); the next write does",
                        exc.message)

    def _install(self, key: DataKey, loaded: _Loaded) -> None:
        assert key.manifest_aead is not None
        self._key, self._index, self._damaged, self._cached_bytes = (
            key, loaded.index, loaded.damaged, loaded.cached)
        self._mf = ManifestState(self.dir, key.manifest_aead, loaded.generation, loaded.entries,
                                 self._commit_lock, dirty=loaded.settled > 0)

    async def lock(self) -> None:
        # Under the state lock: an unlock in flight finishes first, so a lock
        # answered after it is the one that holds (the later answer wins).
        async with self._state_lock:
            self._wipe_key()

    def _wipe_key(self) -> None:
        key, self._key = self._key, None
        mf, self._mf = self._mf, None
        if mf is not None:
            mf.close()
        self._epoch += 1
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
            params = self._params_for(blob)
            if datakey.format_of(blob) == 1:  # only a locked store is still format 1
                async with self._gate.exclusive():
                    (await self._upgrade(raw, new, params)).wipe()
                return
            try:
                new_blob = await anyio.to_thread.run_sync(datakey.wrap, raw, new, params)
            finally:
                datakey._wipe(raw)
            await anyio.to_thread.run_sync(
                atomicfile.replace, self.dir, WRAPPED_KEY_FILE, new_blob, "write the wrapped-key file"
            )

    async def rekey(self, old: Secret, new: Secret) -> int:
        """Replace the data key: every record and the manifest re-encrypted under a new one,
        wrapped with ``new``; the old key material removed. How many secrets were rewritten."""
        async with self._state_lock:
            blob = await anyio.to_thread.run_sync(self._read_wrapped)
            raw = await anyio.to_thread.run_sync(datakey.unwrap, blob, old)
            params = self._params_for(blob)
            async with self._gate.exclusive():
                # Reads go on meanwhile; until the new index is installed, one that finds its
                # file switched away is told to retry instead of marking the record damaged.
                self._rebuilding = True
                try:
                    if datakey.format_of(blob) == 1:
                        key = await self._upgrade(raw, new, params)
                    else:
                        key = await anyio.to_thread.run_sync(self._rekey_sync, DataKey(raw), new,
                                                             params)
                    try:
                        loaded = await anyio.to_thread.run_sync(self._load, key)
                    except BaseException:
                        key.wipe()
                        raise
                    if self._key is None:
                        key.wipe()  # locked it was, locked it stays
                    else:
                        self._wipe_key()
                        self._install(key, loaded)
                finally:
                    self._rebuilding = False
            log.warning("rekeyed: %d secret(s) re-encrypted under a new data key; the old key "
                        "and files are removed", len(loaded.index))
            return len(loaded.index)

    def _rekey_sync(self, old: DataKey, new: Secret, params: KdfParams) -> DataKey:
        try:
            loaded = self._load(old)
            if loaded.damaged:
                raise CorruptRecordError(
                    f"{len(loaded.damaged)} record(s) are damaged (see `secretsctl status`): a "
                    "rekey would lose them, so nothing was changed; restore or remove them "
                    "(`secretsctl rm --force NAME`) first")

            def source() -> Iterator[tuple[bytes | None, Meta, Values]]:
                assert old.aead is not None
                for entry in loaded.index.values():
                    blob = self._read_record(entry)
                    yield entry.slot.record_id, entry.meta, records.open_values(
                        old.aead, blob, entry.file_id, entry.slot.generation, entry.slot.record_id)

            return rekey.rebuild(self.home, source(), new, params, loaded.generation + 1).key
        finally:
            old.wipe()

    @property
    def data_key_buffer(self) -> bytearray | None:
        """The live data-key buffer (for tests that check wiping)."""
        return None if self._key is None else self._key.key

    # --- index ------------------------------------------------------------------

    def _read_manifest(self, key: DataKey) -> manifest.Manifest:
        assert key.manifest_aead is not None
        path = self.dir / manifest.FILE
        try:
            blob = atomicfile.read_regular(path, MAX_MANIFEST_BYTES, "the manifest")
        except FileNotFoundError:
            raise CorruptRecordError(
                f"the manifest {path} is missing: every record is unverifiable; restore it "
                "from a backup (FORMAT.md, 'Damaged records')") from None
        return manifest.open_(key.manifest_aead, blob)

    def _load(self, key: DataKey) -> _Loaded:
        """Read the manifest and every record's header and metadata; check one against the other."""
        assert key.aead is not None
        mf = self._read_manifest(key)
        found: dict[str, Slot] = {}
        metas: dict[str, tuple[Meta, bytes | None]] = {}  # small records' bytes, to cache
        damaged: dict[str, tuple[str | None, str]] = {}
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for fname in os.listdir(dir_fd):
                if not records.is_record_name(fname):
                    continue  # the manifest, the wrapped key, anything unknown
                stem = fname[:64]
                try:
                    blob = self._read_fd_relative(dir_fd, fname)
                    header, meta = records.open_meta(key.aead, blob, stem)
                    if key.file_id(meta.name) != stem:
                        raise CorruptRecordError(f"record {fname} does not belong to its name")
                except FileNotFoundError:
                    continue  # deleted between listing and reading
                except SecretsError as exc:
                    damaged[stem] = (None, exc.message)
                    continue
                found[stem] = Slot(header.record_id, header.generation)
                metas[stem] = (meta, blob if len(blob) <= CACHE_RECORD_LIMIT else None)
        finally:
            os.close(dir_fd)
        verdict = manifest.check(mf, found, unreadable=set(damaged))
        for fid, problem in verdict.damaged.items():
            damaged[fid] = (metas[fid][0].name if fid in metas else None, problem)
        index: dict[str, _Entry] = {}
        cached = 0
        for fid, slot in verdict.ok.items():
            meta, small = metas[fid]
            sealed = None
            if small is not None and cached + len(small) <= CACHE_BUDGET:
                sealed = records.sealed_values(small, fid, slot.generation, slot.record_id)
                cached += len(sealed.ciphertext)
            index[meta.name] = _Entry(fid, slot, meta, sealed)
        for fid, (_name, problem) in damaged.items():
            log.error("%s", _damaged_message(fid, problem))
        if damaged:
            log.error("%d record(s) are damaged and their names refused (see `secretsctl "
                      "status`); the others are served", len(damaged))
        return _Loaded(index, damaged, cached, mf.generation, verdict.entries, verdict.settled)

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
                sealed = records.sealed_values(blob, entry.file_id, entry.slot.generation,
                                               entry.slot.record_id)
            if key.aead is None:  # wiped meanwhile: locked, or replaced by a rekey
                raise LockedError() if self._key is None else BackendUnavailableError(
                    "the data key was replaced during this read (rekey): retry")
            return records.open_sealed(key.aead, sealed)
        except CorruptRecordError as exc:
            if self._key is None:
                raise LockedError() from None
            if self._key is not key or self._rebuilding:
                raise BackendUnavailableError(
                    "a rekey is switching the store's files: retry in a moment") from None
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
        return SecretResult(name, Secret(values.previous), entry.version - 1)

    async def describe(self, name: str) -> DescribeResult | None:
        key = self._require_key()
        self._check_not_damaged(key, name)
        entry = self._index.get(name)
        if entry is None:
            return None
        m = entry.meta
        return DescribeResult(name, as_kind(m.kind), m.version, m.created, m.updated,
                              m.has_previous)

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
        return RecordExport(v.current, v.previous, m.version,
                            m.version - 1 if v.previous is not None else 0, m.kind,
                            m.created, m.updated)

    # --- writes (the base class holds the name's lock) ----------------------------

    async def _head(self, name: str) -> int | None:
        key = self._require_key()
        self._check_not_damaged(key, name)
        entry = self._index.get(name)
        return None if entry is None else entry.version

    async def _put(self, name: str, value: Secret, kind: str | None, expect: int | None) -> int:
        async with self._gate.shared():
            key = self._require_key()
            self._check_not_damaged(key, name)
            epoch = self._epoch
            old = self._index.get(name)
            now = self._clock()
            if old is None:
                meta = Meta(name, kind or DEFAULT_KIND, now, now, 1, False)
                return await self._write(key, epoch, name, None, meta, Values(value.reveal(), None))
            current = (await self._values(key, old)).current
            meta = Meta(name, kind or old.meta.kind, old.meta.created, now, old.version + 1, True)
            return await self._write(key, epoch, name, old, meta, Values(value.reveal(), current))

    async def _import(self, name: str, record: RecordExport) -> None:
        async with self._gate.shared():
            key = self._require_key()
            self._check_not_damaged(key, name)
            meta = Meta(name, record.kind, record.created, record.updated, record.version,
                        record.previous is not None)
            await self._write(key, self._epoch, name, self._index.get(name), meta,
                              Values(record.current, record.previous))

    def _state(self, key: DataKey, epoch: int) -> ManifestState:
        mf = self._mf
        if key.aead is None or epoch != self._epoch or mf is None:
            raise LockedError()
        return mf

    async def _write(self, key: DataKey, epoch: int, name: str, old: _Entry | None,
                     meta: Meta, values: Values) -> int:
        mf = self._state(key, epoch)
        file_id = old.file_id if old else key.file_id(name)
        after = Slot(old.slot.record_id if old else os.urandom(records.RECORD_ID_BYTES),
                     mf.generation)
        # 1. the manifest announces the write (old and new record both acceptable)
        before = mf.stage_pending(file_id, after)
        try:
            await mf.commit()
        except BaseException:
            mf.stage(file_id, before)
            raise
        crash_point("write-manifest-pending")
        # 2. the record
        assert key.aead is not None
        blob = records.seal(key.aead, file_id, after.generation, after.record_id, meta, values)
        try:
            await anyio.to_thread.run_sync(
                atomicfile.replace, self.dir, file_id + records.SUFFIX, blob, f"write secret {name!r}",
            )
        except atomicfile.NotSyncedError:
            mf.stage(file_id, Entry(after))  # in place: the new record is the one in force
            self._set(epoch, name, _Entry(file_id, after, meta, None))
            raise
        except BaseException:
            mf.stage(file_id, before)  # the old record holds; the pending entry says so too
            raise
        crash_point("write-record")
        # 3. the manifest makes it final; then the write is answered
        mf.stage(file_id, Entry(after))
        self._set(epoch, name, _Entry(file_id, after, meta,
                                      self._maybe_cache(blob, file_id, after, old)))
        await mf.commit()
        crash_point("write-manifest-final")
        return meta.version

    def _maybe_cache(
        self, blob: bytes, file_id: str, slot: Slot, old: _Entry | None
    ) -> records.SealedValues | None:
        freed = old.cached_bytes if old else 0
        if len(blob) <= CACHE_RECORD_LIMIT and self._cached_bytes - freed + len(blob) <= CACHE_BUDGET:
            return records.sealed_values(blob, file_id, slot.generation, slot.record_id)
        return None

    def _set(self, epoch: int, name: str, entry: _Entry | None) -> None:
        if epoch != self._epoch:
            return  # locked meanwhile: the file is written, the index is gone
        old = self._index.pop(name, None)
        if old is not None:
            self._cached_bytes -= old.cached_bytes
        if entry is not None:
            self._index[name] = entry
            self._cached_bytes += entry.cached_bytes

    async def _remove(self, name: str, force: bool) -> bool:
        async with self._gate.shared():
            key = self._require_key()
            epoch = self._epoch
            mf = self._state(key, epoch)
            fid = key.file_id(name)
            if fid in self._damaged:
                if not force:
                    raise CorruptRecordError(_damaged_message(fid, self._damaged[fid][1]))
                existed = await self._unlink(mf, fid, f"remove damaged record of {name!r}")
                self._damaged.pop(fid, None)
                self._set(epoch, name, None)
                log.warning("removed the damaged record %s%s of %r (forced)", fid, records.SUFFIX,
                            name)
                return existed
            entry = self._index.get(name)
            if entry is None:
                return False
            await self._unlink(mf, fid, f"delete secret {name!r}",
                               lambda: self._set(epoch, name, None))
            return True

    async def _unlink(self, mf: ManifestState, fid: str, what: str,
                      gone: Callable[[], None] = lambda: None) -> bool:
        """Delete a record: manifest (pending delete), unlink, manifest (entry dropped)."""
        listed = fid in mf.entries
        if listed:
            before = mf.stage_pending(fid, None)
            try:
                await mf.commit()
            except BaseException:
                mf.stage(fid, before)
                raise
            crash_point("delete-manifest-pending")
        try:
            existed = await anyio.to_thread.run_sync(
                atomicfile.remove, self.dir, fid + records.SUFFIX, what)
        except atomicfile.NotSyncedError:
            mf.stage(fid, None)
            gone()
            raise
        except BaseException:
            if listed:
                mf.stage(fid, before)
            raise
        crash_point("delete-unlinked")
        gone()
        if listed:
            mf.stage(fid, None)
            await mf.commit()
        return existed
