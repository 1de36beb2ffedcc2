"""The store manifest: one authenticated list of every record, and how a
directory is checked against it.

Each entry names a record file (its file id) and the record that must be
there: the life's random record id and the write generation the record
carries in its header. An entry is *final*, or *pending* while a write or a
delete is under way: then it holds the record before and the record after,
and whichever of the two is found on disk is the state (a crash artifact of
an unacknowledged write). Anything else found on disk, or missing from it, is
a damaged record naming its file. The manifest's generation grows with every
manifest write, and every record's generation is at most the manifest's, so a
record newer than the manifest means the manifest was put back. Layout and
write order: FORMAT.md, "Manifest" and "Writes".
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from homeagent_secrets.protocol.errors import CorruptRecordError

from .records import RECORD_ID_BYTES, SUFFIX

FILE: Final = "manifest"
MAGIC: Final = b"HASM"
FORMAT_VERSION: Final = 2
NONCE_BYTES: Final = 12
_AD: Final = b"homeagent-secrets v2 manifest\x00"
_PREFIX = struct.Struct(">4sB")  # magic, format version
_BODY = struct.Struct(">QI")  # generation, entry count
_SLOT = struct.Struct(">16sQ")  # record id, generation (0: no record)
FINAL: Final = 0
PENDING: Final = 1
_NO_ID: Final = bytes(RECORD_ID_BYTES)


@dataclass(frozen=True, slots=True)
class Slot:
    """One record: its life's id and the generation it was written at."""

    record_id: bytes
    generation: int


@dataclass(frozen=True, slots=True)
class Entry:
    """What the manifest says of one file id: final (``before`` only) or pending."""

    before: Slot | None
    after: Slot | None = None
    pending: bool = False

    @property
    def expected(self) -> Slot | None:
        """The record this entry leads to (the new one while pending)."""
        return self.after if self.pending else self.before


@dataclass(frozen=True, slots=True)
class Manifest:
    generation: int
    entries: Mapping[str, Entry]


def _pack_slot(slot: Slot | None) -> bytes:
    return _SLOT.pack(_NO_ID, 0) if slot is None else _SLOT.pack(slot.record_id, slot.generation)


def _unpack_slot(data: bytes, offset: int) -> Slot | None:
    record_id, generation = _SLOT.unpack_from(data, offset)
    return None if generation == 0 else Slot(record_id, generation)


def encode(manifest: Manifest) -> bytes:
    """The manifest's plaintext: entries sorted by file id."""
    parts = [_BODY.pack(manifest.generation, len(manifest.entries))]
    for fid in sorted(manifest.entries):
        e = manifest.entries[fid]
        parts.append(bytes.fromhex(fid))
        parts.append(bytes([PENDING if e.pending else FINAL]))
        parts.append(_pack_slot(e.before))
        if e.pending:
            parts.append(_pack_slot(e.after))
    return b"".join(parts)


def decode(pt: bytes) -> Manifest:
    """The manifest from its plaintext; CorruptRecordError unless exactly as written."""
    bad = CorruptRecordError(f"the {FILE} file is unreadable (it authenticates but is malformed)")
    if len(pt) < _BODY.size:
        raise bad
    generation, count = _BODY.unpack_from(pt)
    offset = _BODY.size
    entries: dict[str, Entry] = {}
    last = b""
    for _ in range(count):
        if offset + 33 + _SLOT.size > len(pt):
            raise bad
        raw_fid, state = pt[offset : offset + 32], pt[offset + 32]
        offset += 33
        before = _unpack_slot(pt, offset)
        offset += _SLOT.size
        if state == PENDING:
            if offset + _SLOT.size > len(pt):
                raise bad
            after = _unpack_slot(pt, offset)
            offset += _SLOT.size
            if before is None and after is None:
                raise bad
            entry = Entry(before, after, pending=True)
        elif state == FINAL and before is not None:
            entry = Entry(before)
        else:
            raise bad
        if raw_fid <= last:  # sorted, no duplicates
            raise bad
        last = raw_fid
        entries[raw_fid.hex()] = entry
    if offset != len(pt) or generation == 0:
        raise bad
    return Manifest(generation, entries)


def seal(aead: AESGCM, manifest: Manifest) -> bytes:
    """The bytes of the manifest file."""
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION)
    nonce = os.urandom(NONCE_BYTES)
    return prefix + nonce + aead.encrypt(nonce, encode(manifest), _AD + prefix)


def open_(aead: AESGCM, blob: bytes) -> Manifest:
    """The manifest from its file's bytes (authenticated)."""
    if len(blob) < _PREFIX.size + NONCE_BYTES + 16 or blob[:4] != MAGIC:
        raise CorruptRecordError(f"the {FILE} file is truncated or not a homeagent manifest")
    if blob[4] != FORMAT_VERSION:
        raise CorruptRecordError(
            f"the {FILE} file has format version {blob[4]}; this agent reads {FORMAT_VERSION}")
    prefix = blob[: _PREFIX.size]
    try:
        pt = aead.decrypt(blob[_PREFIX.size : _PREFIX.size + NONCE_BYTES],
                          blob[_PREFIX.size + NONCE_BYTES :], _AD + prefix)
    except InvalidTag:
        raise CorruptRecordError(
            f"the {FILE} file failed authentication (tampered, truncated, or from another "
            "store or data key): restore it from a backup"
        ) from None
    return decode(pt)


# --- checking a directory against the manifest -------------------------------------------


@dataclass
class Verdict:
    """The outcome of checking the records found on disk against a manifest."""

    #: file id -> the record that is in force (found and expected).
    ok: dict[str, Slot]
    #: file id -> what is wrong (the file is named by the caller's message).
    damaged: dict[str, str]
    #: The entries to write back: pendings settled to what was found, settled
    #: deletes and never-written creations dropped; damaged entries kept as they are.
    entries: dict[str, Entry]
    #: How many pending entries were settled (the manifest must be rewritten).
    settled: int


def _mismatch(found: Slot, want: Slot | None, generation: int) -> str:
    if found.generation > generation:
        return (f"was written at generation {found.generation}, after the manifest "
                f"(generation {generation}): the manifest was rolled back or replaced")
    if want is None:
        return ("is not listed in the manifest: the record of a deleted secret was put back "
                "(resurrection)")
    if found.record_id != want.record_id:
        return (f"belongs to another life of its name (record id differs; written at generation "
                f"{found.generation}, the manifest lists generation {want.generation}): a record "
                "of a deleted and re-created secret was put back")
    if found.generation < want.generation:
        return (f"is older than the manifest lists (written at generation {found.generation}, "
                f"expected {want.generation}): an older copy was put back (rollback)")
    return (f"does not match the manifest (written at generation {found.generation}, expected "
            f"{want.generation})")


def check(manifest: Manifest, found: Mapping[str, Slot],
          unreadable: AbstractSet[str] = frozenset()) -> Verdict:
    """Check the records found on disk (file id -> header slot) against ``manifest``.

    ``unreadable`` records are damaged already (the caller reports them); their
    entries are kept as they are.
    """
    ok: dict[str, Slot] = {}
    damaged: dict[str, str] = {}
    entries = dict(manifest.entries)
    settled = 0
    for fid, slot in found.items():
        entry = manifest.entries.get(fid)
        if entry is None:
            damaged[fid] = _mismatch(slot, None, manifest.generation)
        elif entry.pending and slot in (entry.before, entry.after):
            ok[fid] = slot  # a write or delete cut short: the record found is the state
            entries[fid] = Entry(slot)
            settled += 1
        elif not entry.pending and slot == entry.before:
            ok[fid] = slot
        else:
            damaged[fid] = _mismatch(slot, entry.expected or entry.before, manifest.generation)
    for fid, entry in manifest.entries.items():
        if fid in found or fid in unreadable:
            continue
        if entry.pending and (entry.before is None or entry.after is None):
            del entries[fid]  # a creation that never wrote its record, or a finished delete
            settled += 1
        else:
            want = entry.expected
            assert want is not None
            damaged[fid] = (f"is missing: the manifest lists it (generation {want.generation}) "
                            "but the file is gone")
    return Verdict(ok, damaged, entries, settled)


def file_name(file_id: str) -> str:
    return file_id + SUFFIX
