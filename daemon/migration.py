"""Moving every secret from the backend in use to another one, losing none.

Copy every record, read each back to verify it, record the new choice, switch,
and only then remove the originals. While it runs, every write is refused with
a retryable -32006 (the gate in ``agent.py``), so no write is acknowledged on
the source after its copy was taken. Interrupted anywhere it loses nothing:
before the switch the source is untouched and still in use; after it a journal
(``<home>/migration``) names the source, and ``migrate`` to the backend now in
use removes the originals that still match their copies. The source of that
cleanup is what the journal says the agent ran on, never what a client claims,
and never the backend in use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

from homeagent_secrets.protocol.errors import BackendUnavailableError, InvalidParams, SecretsError
from homeagent_secrets.protocol.messages import MigrateParams, MigrateResult
from homeagent_secrets.protocol.names import BACKEND_NAMES
from homeagent_secrets.protocol.secret import Secret

from .backends import atomicfile
from .backends.base import Backend
from .faults import crash_point

log = logging.getLogger(__name__)

JOURNAL_FILE: Final = "migration"


@dataclass(frozen=True)
class Journal:
    """A switch that happened; the originals in ``source`` may still need removing."""

    source: str
    target: str


def read_journal(home: Path) -> Journal | None:
    try:
        raw = atomicfile.read_regular(home / JOURNAL_FILE, 4096, "the migration journal")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        journal = Journal(str(doc["from"]), str(doc["to"]))
    except (ValueError, KeyError, TypeError):
        raise BackendUnavailableError(
            f"{home / JOURNAL_FILE} is damaged: if no migration was interrupted, delete it"
        ) from None
    if journal.source not in BACKEND_NAMES or journal.target not in BACKEND_NAMES:
        raise BackendUnavailableError(f"{home / JOURNAL_FILE} names an unknown backend; delete it")
    return journal


def _write_journal(home: Path, journal: Journal) -> None:
    doc = json.dumps({"from": journal.source, "to": journal.target}).encode()
    atomicfile.replace(home, JOURNAL_FILE, doc, "write the migration journal")


def _clear_journal(home: Path) -> None:
    atomicfile.remove(home, JOURNAL_FILE, "remove the migration journal")


#: How the migrator readies a file store: (backend, passphrase) -> None; the
#: agent passes one that goes through the passphrase guard.
Ready = Callable[[Backend, Secret | None], Awaitable[None]]


class Migrator:
    """What ``migrate`` needs, handed over by the agent (this module never imports it)."""

    def __init__(self, home: Path, make_backend: Callable[[str], Backend],
                 record_choice: Callable[[str], None]) -> None:
        self.home = home
        self.make_backend = make_backend
        self.record_choice = record_choice

    def pending(self, current: str) -> Journal | None:
        """The journal of a switch to ``current`` whose originals are not all removed."""
        try:
            journal = read_journal(self.home)
        except SecretsError:
            return None
        return journal if journal is not None and journal.target == current else None

    async def run(self, src: Backend, p: MigrateParams, ready: Ready,
                  switch: Callable[[Backend], None]) -> MigrateResult:
        """Migrate from ``src`` (the backend in use) as ``p`` asks.

        ``ready`` opens a backend and unlocks (or creates) a file store with the
        passphrase; ``switch`` makes the new backend the one in use.
        """
        journal = await anyio.to_thread.run_sync(read_journal, self.home)
        if p.to == src.name:
            if journal is None or journal.target != src.name or journal.source == src.name:
                raise InvalidParams(
                    f"the agent already uses the {src.name} backend: there is nothing to migrate"
                    + (f", and no interrupted migration from {p.source} is recorded"
                       if p.source and p.source != src.name else ""))
            if p.source is not None and p.source != journal.source:
                raise InvalidParams(
                    f"the interrupted migration was from the {journal.source} backend, not "
                    f"{p.source}: run it again without --from")
            removed = await self._clean(src, journal.source, p.passphrase, ready)
            return MigrateResult(src.name, 0, removed)
        if journal is not None and journal.target == src.name:
            raise InvalidParams(
                f"a migration from {journal.source} to {src.name} still has originals to remove: "
                f"run `secretsctl migrate --to {src.name}` first")
        if p.source is not None and p.source != src.name:
            raise InvalidParams(f"the agent runs on the {src.name} backend, not {p.source}")
        dst = self.make_backend(p.to)
        try:
            await ready(dst, p.passphrase)
            names = await self._copy_all(src, dst)
            crash_point("migrate-before-switch")
            await anyio.to_thread.run_sync(_write_journal, self.home, Journal(src.name, dst.name))
            await anyio.to_thread.run_sync(self.record_choice, dst.name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await dst.close()  # wipes its key: the source stays the one in use
            raise
        switch(dst)
        log.info("migrated %d secret(s) from %s to %s; removing the originals",
                 len(names), src.name, dst.name)
        crash_point("migrate-after-switch")
        removed = await self._remove_originals(src, dst, names)
        await src.close()
        return MigrateResult(dst.name, len(names), removed)

    @staticmethod
    async def _copy_all(src: Backend, dst: Backend) -> Sequence[str]:
        """Copy every secret from ``src`` to ``dst`` and read each back; the names copied."""
        names = await src.list("")
        for name in names:
            record = await src.export(name)
            if record is None:
                continue
            await dst.import_(name, record)
            copy = await dst.export(name)
            if not (copy == record if dst.keeps_history else record.same_content(copy)):
                raise BackendUnavailableError(
                    f"{name!r} did not read back the same from the {dst.name} backend; "
                    "nothing was switched or removed: check that backend and retry"
                )
            crash_point("migrate-copied-one")
        return names

    async def _remove_originals(self, src: Backend, dst: Backend, names: Sequence[str]) -> int:
        """Delete from ``src`` each name whose copy in ``dst`` holds the same; then the journal."""
        if src.name == dst.name:  # never delete from the backend in use
            raise AssertionError("source and target are the same backend")
        removed = 0
        left = 0
        for name in names:
            try:
                theirs = await src.export(name)
                if theirs is not None and theirs.same_content(await dst.export(name)):
                    removed += await src.delete(name)
                elif theirs is not None:
                    left += 1
                    log.warning("%r differs between %s and %s; the original is left in %s",
                                name, src.name, dst.name, src.name)
            except SecretsError as exc:
                left += 1
                log.warning("could not remove %r from the %s backend: %s (run migrate again)",
                            name, src.name, exc.message)
        if left == 0:
            await anyio.to_thread.run_sync(_clear_journal, self.home)
        return removed

    async def _clean(self, current: Backend, source_name: str, passphrase: Secret | None,
                     ready: Ready) -> int:
        """After an interrupted migration: remove the originals the journal's source still holds."""
        src = self.make_backend(source_name)
        try:
            await src.open()
            if src.has_passphrase and not src.initialized:
                await anyio.to_thread.run_sync(_clear_journal, self.home)
                return 0
            await ready(src, passphrase)
            return await self._remove_originals(src, current, await src.list(""))
        finally:
            await src.close()
