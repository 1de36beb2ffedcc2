"""The data key and the wrapped-key file that holds it under the passphrase.

Envelope encryption: a random 256-bit data key encrypts every record and the
manifest; the passphrase only wraps it (scrypt -> AES-256-GCM). Changing the
passphrase rewraps 48 bytes; ``rekey`` replaces the data key itself
(``rekey.py``). This agent writes format 2 and unwraps format 1 only to
upgrade it. Layout and parameters: FORMAT.md, "Wrapped-key file".
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from homeagent_secrets.protocol.errors import CorruptRecordError, WrongPassphraseError
from homeagent_secrets.protocol.secret import Secret

from ..hardening import mlock, munlock
from ..wipe import wipe_bytes

FILE_NAME: Final = "wrapped-key"
MAGIC: Final = b"HASK"
FORMAT_VERSION: Final = 2
#: Formats whose wrapped-key file this agent unwraps (format 1 only to upgrade it).
READABLE_FORMATS: Final = (1, 2)
DEFAULT_LOG2_N: Final = 17  # N = 2^17: 128 MiB, ~0.3-0.5 s on a small CPU
DEFAULT_R: Final = 8
DEFAULT_P: Final = 1
MIN_LOG2_N: Final = 10
MAX_LOG2_N: Final = 22  # the largest N this agent writes (--scrypt-n)
# What unlock agrees to compute, checked before deriving: the most this agent
# writes (N = 2^22 at r = 8, p = 1) with room for p up to 4 at lower N. A
# hostile header asking for more is refused instead of exhausting memory or time.
MAX_KDF_MEMORY: Final = 128 * (1 << MAX_LOG2_N) * DEFAULT_R  # bytes: 128·N·r = 4 GiB
MAX_KDF_WORK: Final = (1 << MAX_LOG2_N) * DEFAULT_R  # N·r·p
KEY_BYTES: Final = 32
SALT_BYTES: Final = 16
NONCE_BYTES: Final = 12

_HEADER = struct.Struct(">4sBBBB16s")  # magic, version, log2 N, r, p, salt
FILE_SIZE: Final = _HEADER.size + NONCE_BYTES + KEY_BYTES + 16  # 84 bytes

#: HKDF info strings of the subkeys, per format (format 2 adds the manifest key).
SUBKEY_INFO: Final = {
    1: {"record": b"homeagent-secrets v1 record encryption",
        "name": b"homeagent-secrets v1 name hashing"},
    2: {"record": b"homeagent-secrets v2 record encryption",
        "name": b"homeagent-secrets v2 name hashing",
        "manifest": b"homeagent-secrets v2 manifest encryption"},
}


@dataclass(frozen=True)
class KdfParams:
    log2_n: int = DEFAULT_LOG2_N
    r: int = DEFAULT_R
    p: int = DEFAULT_P

    @property
    def memory(self) -> int:
        """Bytes scrypt needs: 128·N·r."""
        return 128 * (1 << self.log2_n) * self.r

    @property
    def work(self) -> int:
        """scrypt's time cost in units of one BlockMix: N·r·p."""
        return (1 << self.log2_n) * self.r * self.p

    def check(self) -> None:
        """Refuse parameters outside what this agent agrees to compute."""
        if not MIN_LOG2_N <= self.log2_n <= MAX_LOG2_N:
            raise CorruptRecordError(
                f"scrypt N=2^{self.log2_n} is outside 2^{MIN_LOG2_N}..2^{MAX_LOG2_N}: "
                "the wrapped-key file is damaged or not ours"
            )
        if self.r < 1 or self.p < 1 or self.log2_n >= 16 * self.r:
            # scrypt needs N < 2^(16·r); OpenSSL refuses the rest with a MemoryError.
            raise CorruptRecordError(
                f"scrypt N=2^{self.log2_n} r={self.r} p={self.p} is not valid scrypt (N must be "
                "below 2^(16·r), r and p at least 1): the wrapped-key file is damaged or not ours"
            )
        if self.memory > MAX_KDF_MEMORY or self.work > MAX_KDF_WORK:
            raise CorruptRecordError(
                f"scrypt N=2^{self.log2_n} r={self.r} p={self.p} asks for {self.memory >> 20} MiB "
                f"and {self.work} units of work; this agent computes at most "
                f"{MAX_KDF_MEMORY >> 20} MiB and {MAX_KDF_WORK}: the wrapped-key file is damaged "
                "or not ours"
            )


def _derive_kek(passphrase: Secret, salt: bytes, params: KdfParams) -> bytearray:
    kdf = Scrypt(salt=salt, length=KEY_BYTES, n=1 << params.log2_n, r=params.r, p=params.p)
    secret = passphrase.reveal().encode("utf-8")  # UTF-8 as typed, no normalization (FORMAT.md)
    try:
        return bytearray(kdf.derive(secret))
    finally:
        wipe_bytes(secret)


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def wrap(data_key: bytearray, passphrase: Secret, params: KdfParams) -> bytes:
    """The wrapped-key file's bytes for ``data_key`` under ``passphrase``."""
    params.check()
    salt = os.urandom(SALT_BYTES)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, params.log2_n, params.r, params.p, salt)
    kek = _derive_kek(passphrase, salt, params)
    try:
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + AESGCM(kek).encrypt(nonce, bytes(data_key), header)
    finally:
        _wipe(kek)


def format_of(blob: bytes) -> int:
    """The format version of a wrapped-key file (1 or 2), refusing any other before any work."""
    if len(blob) != FILE_SIZE or blob[:4] != MAGIC:
        raise CorruptRecordError(
            f"the wrapped-key file is {len(blob)} bytes or lacks its magic: damaged or not ours"
        )
    version = blob[4]
    if version not in READABLE_FORMATS:
        raise CorruptRecordError(
            f"the wrapped-key file has format version {version}; this agent reads "
            f"{' and '.join(map(str, READABLE_FORMATS))}: it was written by a newer secretsd"
        )
    return version


def read_params(blob: bytes) -> KdfParams:
    """The KDF parameters in a wrapped-key file, checked before any work is done."""
    format_of(blob)
    _magic, _version, log2_n, r, p, _salt = _HEADER.unpack_from(blob)
    params = KdfParams(log2_n, r, p)
    params.check()
    return params


def unwrap(blob: bytes, passphrase: Secret) -> bytearray:
    """The data key from a wrapped-key file; WrongPassphraseError if it does not open."""
    params = read_params(blob)
    header = blob[: _HEADER.size]
    salt = header[-SALT_BYTES:]
    nonce = blob[_HEADER.size : _HEADER.size + NONCE_BYTES]
    kek = _derive_kek(passphrase, salt, params)
    try:
        return bytearray(AESGCM(kek).decrypt(nonce, blob[_HEADER.size + NONCE_BYTES :], header))
    except InvalidTag:
        raise WrongPassphraseError() from None
    finally:
        _wipe(kek)


class DataKey:
    """The unwrapped data key and the subkeys derived from it (per format).

    Held in bytearrays that ``wipe`` zeroes. The AES-GCM contexts and the HMAC
    state keep their own copies inside OpenSSL/Rust that Python cannot reach;
    they are dropped with this object (FORMAT.md, "Key hygiene").
    """

    __slots__ = ("aead", "format", "key", "manifest_aead", "manifest_key", "memory_locked",
                 "name_key", "record_key")

    def __init__(self, key: bytearray, format: int = FORMAT_VERSION) -> None:
        if len(key) != KEY_BYTES:
            raise CorruptRecordError("the data key has the wrong length: the store is damaged")
        info = SUBKEY_INFO[format]
        self.format = format
        self.key = key
        self.record_key = bytearray(self._subkey(info["record"]))
        self.name_key = bytearray(self._subkey(info["name"]))
        self.manifest_key = bytearray(self._subkey(info["manifest"])) if "manifest" in info else None
        self.aead: AESGCM | None = AESGCM(self.record_key)
        self.manifest_aead: AESGCM | None = (
            AESGCM(self.manifest_key) if self.manifest_key is not None else None)
        self.memory_locked = all(mlock(b) for b in self._buffers())

    def _buffers(self) -> list[bytearray]:
        bufs = [self.key, self.record_key, self.name_key]
        return bufs + ([self.manifest_key] if self.manifest_key is not None else [])

    @classmethod
    def generate(cls) -> DataKey:
        return cls(bytearray(os.urandom(KEY_BYTES)))

    def _subkey(self, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
            bytes(self.key)
        )

    def file_id(self, name: str) -> str:
        """The record file's stem for ``name``: HMAC-SHA256 under the name key, hex."""
        return hmac.new(self.name_key, name.encode("utf-8"), "sha256").hexdigest()

    def wipe(self) -> None:
        """Overwrite every key buffer with zeros and drop the cipher context."""
        for buf in self._buffers():
            _wipe(buf)
            if self.memory_locked:
                munlock(buf)
        self.aead = None
        self.manifest_aead = None
        self.memory_locked = False

    def __repr__(self) -> str:
        return "DataKey(<redacted>)"
