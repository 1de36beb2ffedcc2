"""The record format: one secret (current and previous value) per file.

Two AES-256-GCM sections under one cleartext header: the metadata (name,
kind, timestamps) that unlock decrypts to build the index, and the values,
decrypted only by ``retrieve``. Both bind the header and the file id as
associated data, so a record copied over another name, or an old version put
back while the agent runs, fails authentication. Layout: FORMAT.md.
"""

from __future__ import annotations

import os
import struct
from typing import Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from homeagent_secrets.protocol.errors import CorruptRecordError

MAGIC: Final = b"HASR"
FORMAT_VERSION: Final = 1
SUFFIX: Final = ".rec"
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_HEADER = struct.Struct(">4sBQI")  # magic, format version, record version, meta length
HEADER_BYTES: Final = _HEADER.size  # 17
_META_AD: Final = b"homeagent-secrets record meta\x00"
_VALUE_AD: Final = b"homeagent-secrets record value\x00"


class Meta(msgspec.Struct, array_like=True, frozen=True):
    """What the index holds: everything but the values."""

    name: str
    kind: str
    created: float
    updated: float
    previous_version: int  # 0 when there is no previous value


class Values(msgspec.Struct, array_like=True, frozen=True):
    current: str
    previous: str | None


_HEX = frozenset("0123456789abcdef")


def is_record_name(fname: str) -> bool:
    """Whether ``fname`` is a record file's name: 64 lowercase hex digits and ``.rec``."""
    return len(fname) == 68 and fname.endswith(SUFFIX) and _HEX.issuperset(fname[:64])


_meta_enc = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(Meta)
_values_dec = msgspec.msgpack.Decoder(Values)


def seal(aead: AESGCM, file_id: str, version: int, meta: Meta, values: Values) -> bytes:
    """The bytes of a record file."""
    meta_pt = _meta_enc.encode(meta)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, version, NONCE_BYTES + len(meta_pt) + TAG_BYTES)
    fid = file_id.encode("ascii")
    meta_nonce = os.urandom(NONCE_BYTES)
    value_nonce = os.urandom(NONCE_BYTES)
    return b"".join(
        (
            header,
            meta_nonce,
            aead.encrypt(meta_nonce, meta_pt, _META_AD + header + fid),
            value_nonce,
            aead.encrypt(value_nonce, _meta_enc.encode(values), _VALUE_AD + header + fid),
        )
    )


def read_header(blob: bytes, file_id: str) -> tuple[int, int]:
    """(record version, meta section length) after checking magic and format."""
    if len(blob) < HEADER_BYTES + 2 * (NONCE_BYTES + TAG_BYTES) or blob[:4] != MAGIC:
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} is truncated or not a homeagent record"
        )
    _magic, fmt, version, meta_len = _HEADER.unpack_from(blob)
    if fmt != FORMAT_VERSION:
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} has format version {fmt}; this agent reads {FORMAT_VERSION}"
        )
    if meta_len < NONCE_BYTES + TAG_BYTES or HEADER_BYTES + meta_len > len(blob) - NONCE_BYTES - TAG_BYTES:
        raise CorruptRecordError(f"record {file_id}{SUFFIX} is truncated")
    return version, meta_len


def open_meta(aead: AESGCM, blob: bytes, file_id: str) -> tuple[int, Meta]:
    """(record version, metadata), authenticating only the metadata section."""
    version, meta_len = read_header(blob, file_id)
    header = blob[:HEADER_BYTES]
    end = HEADER_BYTES + meta_len
    try:
        pt = aead.decrypt(blob[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES],
                          blob[HEADER_BYTES + NONCE_BYTES : end],
                          _META_AD + header + file_id.encode("ascii"))
    except InvalidTag:
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} failed authentication of its metadata (tampered, "
            "truncated or copied from another name)"
        ) from None
    try:
        return version, _meta_dec.decode(pt)
    except msgspec.DecodeError:
        raise CorruptRecordError(f"record {file_id}{SUFFIX} has unreadable metadata") from None


class SealedValues(msgspec.Struct, frozen=True):
    """The values section cut out of a checked record, ready to decrypt.

    What the index keeps in memory for small records: only ciphertext.
    """

    file_id: str
    nonce: bytes
    ciphertext: bytes
    ad: bytes


def sealed_values(blob: bytes, file_id: str, expect_version: int) -> SealedValues:
    """The values section of a record whose version must be ``expect_version``."""
    version, meta_len = read_header(blob, file_id)
    if version != expect_version:
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} is at version {version} but the index expects "
            f"{expect_version}: it was replaced behind the agent's back"
        )
    start = HEADER_BYTES + meta_len
    return SealedValues(
        file_id,
        blob[start : start + NONCE_BYTES],
        blob[start + NONCE_BYTES :],
        _VALUE_AD + blob[:HEADER_BYTES] + file_id.encode("ascii"),
    )


def open_sealed(aead: AESGCM, sealed: SealedValues) -> Values:
    """Decrypt and decode a values section."""
    try:
        pt = aead.decrypt(sealed.nonce, sealed.ciphertext, sealed.ad)
    except InvalidTag:
        raise CorruptRecordError(
            f"record {sealed.file_id}{SUFFIX} failed authentication of its values (tampered, "
            "truncated, copied from another name or put back from an older version)"
        ) from None
    try:
        return _values_dec.decode(pt)
    except msgspec.DecodeError:
        raise CorruptRecordError(f"record {sealed.file_id}{SUFFIX} has unreadable values") from None


def open_values(aead: AESGCM, blob: bytes, file_id: str, expect_version: int) -> Values:
    """The values of a record whose version must be ``expect_version``."""
    return open_sealed(aead, sealed_values(blob, file_id, expect_version))
