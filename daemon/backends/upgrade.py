"""Reading a format-1 store, to upgrade it to format 2 at its first unlock.

Format 1 (FORMAT.md, "Format 1") had no manifest: each record stood alone
under subkeys of the data key with "v1" labels. The upgrade reads every
record with the key the passphrase unwraps, and ``rekey.rebuild`` writes them
as format 2 under a new data key, beside the old store, switching atomically.
A format-1 record that cannot be read stops the upgrade (nothing is changed):
upgrading would lose it for good, since its key is removed afterwards.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec
from cryptography.exceptions import InvalidTag

from homeagent_secrets.protocol.errors import CorruptRecordError

from . import atomicfile, records
from .datakey import DataKey
from .records import Meta, Values

FORMAT_VERSION: Final = 1
_HEADER = struct.Struct(">4sBQI")  # magic, format version, record version, meta section length
_META_AD: Final = b"homeagent-secrets record meta\x00"
_VALUE_AD: Final = b"homeagent-secrets record value\x00"


class _MetaV1(msgspec.Struct, array_like=True, frozen=True):
    name: str
    kind: str
    created: float
    updated: float
    previous_version: int


_meta_dec = msgspec.msgpack.Decoder(_MetaV1)
_values_dec = msgspec.msgpack.Decoder(Values)


def open_record(key: DataKey, blob: bytes, file_id: str) -> tuple[Meta, Values]:
    """A format-1 record's metadata (as format 2 holds it) and values."""
    assert key.aead is not None
    fname = file_id + records.SUFFIX
    if len(blob) < _HEADER.size + 2 * 28 or blob[:4] != records.MAGIC:
        raise CorruptRecordError(f"format-1 record {fname} is truncated or not a homeagent record")
    _magic, fmt, version, meta_len = _HEADER.unpack_from(blob)
    if fmt != FORMAT_VERSION or meta_len < 28 or _HEADER.size + meta_len > len(blob) - 28:
        raise CorruptRecordError(f"format-1 record {fname} has format {fmt} or is truncated")
    header, fid = blob[: _HEADER.size], file_id.encode("ascii")
    end = _HEADER.size + meta_len
    try:
        meta = _meta_dec.decode(key.aead.decrypt(blob[17:29], blob[29:end], _META_AD + header + fid))
        values = _values_dec.decode(
            key.aead.decrypt(blob[end : end + 12], blob[end + 12 :], _VALUE_AD + header + fid))
    except (InvalidTag, msgspec.DecodeError):
        raise CorruptRecordError(
            f"format-1 record {fname} failed authentication or is unreadable") from None
    if key.file_id(meta.name) != file_id:
        raise CorruptRecordError(f"format-1 record {fname} does not belong to its name")
    return Meta(meta.name, meta.kind, meta.created, meta.updated, version,
                values.previous is not None), values


def read_store(directory: Path, key: DataKey, limit: int) -> Iterator[tuple[Meta, Values]]:
    """Every record of a format-1 store; CorruptRecordError (nothing changed) on the first
    one that cannot be read."""
    for fname in sorted(os.listdir(directory)):
        if not records.is_record_name(fname):
            continue
        blob = atomicfile.read_regular(directory / fname, limit, "format-1 record")
        try:
            yield open_record(key, blob, fname[:64])
        except CorruptRecordError as exc:
            raise CorruptRecordError(
                f"{exc.message}: the upgrade to format 2 needs every record readable and changed "
                "nothing; restore the file from a backup, or move it away while the agent is "
                "stopped (its secret is then lost), and unlock again") from None
