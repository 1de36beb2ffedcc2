"""The manifest as the running agent keeps it, and the gate its writes pass.

Writers stage entries in memory and call ``commit``: the next manifest write
takes every change staged so far, and a writer whose change another writer's
manifest already carried returns at once (group commit: concurrent writes
share one manifest write and its fsyncs). Manifest writes are one at a time
under a lock that outlives lock/unlock, so a writer of a locked epoch can
never overwrite the manifest of the next one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from homeagent_secrets.protocol.errors import LockedError

from . import atomicfile, manifest
from .manifest import Entry, Manifest, Slot


class ManifestState:
    """The in-memory manifest of one unlocked epoch."""

    def __init__(self, directory: Path, aead: AESGCM, generation: int,
                 entries: dict[str, Entry], lock: anyio.Lock, dirty: bool = False) -> None:
        self.directory = directory
        self._aead: AESGCM | None = aead
        self.entries = entries
        self.durable_generation = generation
        self._next_generation = generation + 1
        self._changes = 1 if dirty else 0  # dirty: ``entries`` differ from the file
        self._durable_changes = 0
        self._lock = lock

    def close(self) -> None:
        """Refuse every later commit (the data key is being wiped)."""
        self._aead = None

    @property
    def generation(self) -> int:
        """The generation a record written now carries (that of the next manifest write)."""
        return self._next_generation

    def stage(self, file_id: str, entry: Entry | None) -> None:
        """Set (or drop, with None) the entry of ``file_id`` in memory."""
        if entry is None:
            self.entries.pop(file_id, None)
        else:
            self.entries[file_id] = entry
        self._changes += 1

    def stage_pending(self, file_id: str, after: Slot | None) -> Entry | None:
        """Stage a write (``after``: the new record) or a delete (None); the entry it replaces."""
        old = self.entries.get(file_id)
        before = old.expected if old is not None else None
        self.stage(file_id, Entry(before, after, pending=True))
        return old

    async def commit(self) -> None:
        """Return once a manifest holding every change staged before this call is durable."""
        want = self._changes
        async with self._lock:
            if self._durable_changes >= want:
                return
            aead = self._aead
            if aead is None:
                raise LockedError()
            generation = self._next_generation
            self._next_generation += 1
            snapshot = Manifest(generation, dict(self.entries))
            changes = self._changes
            blob = await anyio.to_thread.run_sync(manifest.seal, aead, snapshot)
            try:
                await anyio.to_thread.run_sync(
                    atomicfile.replace, self.directory, manifest.FILE, blob, "write the manifest")
            except atomicfile.NotSyncedError:
                self._durable(generation, changes)  # in place, if not surely on the disk
                raise
            self._durable(generation, changes)

    def _durable(self, generation: int, changes: int) -> None:
        self.durable_generation = generation
        self._durable_changes = changes


class WriteGate:
    """Writes share it; unlock and rekey take it exclusively (new writes wait, those
    in flight finish first)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._exclusive: anyio.Event | None = None

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive is not None:
            await self._exclusive.wait()
        self._count += 1
        if self._count == 1:
            self._idle = anyio.Event()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        while self._exclusive is not None:
            await self._exclusive.wait()
        done = self._exclusive = anyio.Event()
        try:
            await self._idle.wait()
            yield
        finally:
            self._exclusive = None
            done.set()
