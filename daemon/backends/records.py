"""The record format (format 2): one secret (current and previous value) per file.

Two AES-256-GCM sections under one cleartext header: the metadata (name, kind,
times, version) that unlock decrypts to build the index, and the values,
decrypted only by ``retrieve``. The header carries the record's write
generation and its life's random record id; both sections bind the header and
the file id as associated data, and the values section also binds the
metadata section's tag, so sections of two records (or two lives of one name)
cannot be spliced. Both plaintexts are padded to size buckets, so a file's
size does not tell a value's length. Layout: FORMAT.md.
"""

from __future__ import annotations

import os
import struct
from typing import Final, NamedTuple

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from homeagent_secrets.protocol.errors import CorruptRecordError

MAGIC: Final = b"HASR"
FORMAT_VERSION: Final = 2
SUFFIX: Final = ".rec"
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
RECORD_ID_BYTES: Final = 16
# magic, format version, write generation, record id, metadata section length
_HEADER = struct.Struct(">4sBQ16sI")
HEADER_BYTES: Final = _HEADER.size  # 33
_META_AD: Final = b"homeagent-secrets v2 record meta\x00"
_VALUE_AD: Final = b"homeagent-secrets v2 record values\x00"
_LENGTH = struct.Struct(">I")
#: Padding buckets: powers of two from 64 bytes up to 1 MiB, then multiples of 1 MiB.
MIN_BUCKET: Final = 64
POW2_LIMIT: Final = 1 << 20


class Meta(msgspec.Struct, array_like=True, frozen=True):
    """What the index holds: everything but the values."""

    name: str
    kind: str
    created: float
    updated: float
    version: int  # 1 for a new name, +1 per store/rotate; the previous value is version - 1
    has_previous: bool  # exactly when the values section's previous value is not nil


class Values(msgspec.Struct, array_like=True, frozen=True):
    current: str
    previous: str | None


class Header(NamedTuple):
    """A record's cleartext header (authenticated by both sections)."""

    generation: int
    record_id: bytes
    meta_len: int


_HEX = frozenset("0123456789abcdef")


def is_record_name(fname: str) -> bool:
    """Whether ``fname`` is a record file's name: 64 lowercase hex digits and ``.rec``."""
    return len(fname) == 68 and fname.endswith(SUFFIX) and _HEX.issuperset(fname[:64])


def bucket(n: int) -> int:
    """The padded size of an ``n``-byte plaintext (FORMAT.md, "Padding")."""
    if n <= POW2_LIMIT:
        return max(MIN_BUCKET, 1 << (n - 1).bit_length())
    return -(-n // POW2_LIMIT) * POW2_LIMIT


def pad(body: bytes) -> bytes:
    """``u32 length || body || zeros`` up to the bucket of its size."""
    n = _LENGTH.size + len(body)
    return b"".join((_LENGTH.pack(len(body)), body, bytes(bucket(n) - n)))


def unpad(padded: bytes) -> bytes | None:
    """The body of a padded plaintext, or None when the padding is not exactly as written."""
    if len(padded) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack_from(padded)
    n = _LENGTH.size + length
    size = len(padded)
    # count() checks the zeros in C, with no copy (any() over a slice cost 0.3 us a read)
    if n > size or bucket(n) != size or padded.count(0, n) != size - n:
        return None
    return padded[_LENGTH.size : n]


_enc = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(Meta)
_values_dec = msgspec.msgpack.Decoder(Values)


def seal(aead: AESGCM, file_id: str, generation: int, record_id: bytes, meta: Meta,
         values: Values) -> bytes:
    """The bytes of a record file."""
    meta_pt = pad(_enc.encode(meta))
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, generation, record_id,
                          NONCE_BYTES + len(meta_pt) + TAG_BYTES)
    fid = file_id.encode("ascii")
    meta_nonce = os.urandom(NONCE_BYTES)
    value_nonce = os.urandom(NONCE_BYTES)
    meta_ct = aead.encrypt(meta_nonce, meta_pt, _META_AD + header + fid)
    values_ct = aead.encrypt(value_nonce, pad(_enc.encode(values)),
                             _VALUE_AD + header + fid + meta_ct[-TAG_BYTES:])
    return b"".join((header, meta_nonce, meta_ct, value_nonce, values_ct))


def read_header(blob: bytes, file_id: str) -> Header:
    """The header after checking magic, format and lengths."""
    if len(blob) < HEADER_BYTES + 2 * (NONCE_BYTES + TAG_BYTES) or blob[:4] != MAGIC:
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} is truncated or not a homeagent record"
        )
    _magic, fmt, generation, record_id, meta_len = _HEADER.unpack_from(blob)
    if fmt != FORMAT_VERSION:
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} has format version {fmt}; this agent reads {FORMAT_VERSION}"
        )
    if meta_len < NONCE_BYTES + TAG_BYTES or HEADER_BYTES + meta_len > len(blob) - NONCE_BYTES - TAG_BYTES:
        raise CorruptRecordError(f"record {file_id}{SUFFIX} is truncated")
    return Header(generation, record_id, meta_len)


def open_meta(aead: AESGCM, blob: bytes, file_id: str) -> tuple[Header, Meta]:
    """(header, metadata), authenticating only the metadata section."""
    header = read_header(blob, file_id)
    end = HEADER_BYTES + header.meta_len
    try:
        pt = aead.decrypt(blob[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES],
                          blob[HEADER_BYTES + NONCE_BYTES : end],
                          _META_AD + blob[:HEADER_BYTES] + file_id.encode("ascii"))
    except InvalidTag:
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} failed authentication of its metadata (tampered, "
            "truncated or copied from another name)"
        ) from None
    body = unpad(pt)
    try:
        if body is None:
            raise msgspec.DecodeError("bad padding")
        meta = _meta_dec.decode(body)
    except msgspec.DecodeError:
        raise CorruptRecordError(f"record {file_id}{SUFFIX} has unreadable metadata") from None
    if meta.version < 1:
        raise CorruptRecordError(f"record {file_id}{SUFFIX} has unreadable metadata")
    return header, meta


class SealedValues(msgspec.Struct, frozen=True):
    """The values section cut out of a checked record, ready to decrypt.

    What the index keeps in memory for small records: only ciphertext.
    """

    file_id: str
    nonce: bytes
    ciphertext: bytes
    ad: bytes


def sealed_values(blob: bytes, file_id: str, generation: int, record_id: bytes) -> SealedValues:
    """The values section of a record that must be the one written at ``generation``."""
    header = read_header(blob, file_id)
    if (header.generation, header.record_id) != (generation, record_id):
        raise CorruptRecordError(
            f"record {file_id}{SUFFIX} was written at generation {header.generation} but the "
            f"index expects generation {generation}: it was replaced behind the agent's back"
        )
    start = HEADER_BYTES + header.meta_len
    meta_tag = blob[start - TAG_BYTES : start]
    return SealedValues(
        file_id,
        blob[start : start + NONCE_BYTES],
        blob[start + NONCE_BYTES :],
        _VALUE_AD + blob[:HEADER_BYTES] + file_id.encode("ascii") + meta_tag,
    )


def open_sealed(aead: AESGCM, sealed: SealedValues) -> Values:
    """Decrypt and decode a values section."""
    try:
        pt = aead.decrypt(sealed.nonce, sealed.ciphertext, sealed.ad)
    except InvalidTag:
        raise CorruptRecordError(
            f"record {sealed.file_id}{SUFFIX} failed authentication of its values (tampered, "
            "truncated, spliced from another record or life, or put back from an older version)"
        ) from None
    body = unpad(pt)
    try:
        if body is None:
            raise msgspec.DecodeError("bad padding")
        return _values_dec.decode(body)
    except msgspec.DecodeError:
        raise CorruptRecordError(f"record {sealed.file_id}{SUFFIX} has unreadable values") from None


def open_values(aead: AESGCM, blob: bytes, file_id: str, generation: int,
                record_id: bytes) -> Values:
    """The values of a record that must be the one written at ``generation``."""
    return open_sealed(aead, sealed_values(blob, file_id, generation, record_id))
