"""The encrypted-file backend on real files with real crypto (FORMAT.md)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from homeagent_secrets.daemon.backends import datakey, records
from homeagent_secrets.daemon.backends.datakey import KdfParams
from homeagent_secrets.daemon.backends.files import WRAPPED_KEY_FILE, FileBackend
from homeagent_secrets.protocol.errors import (
    AlreadyInitializedError,
    CorruptRecordError,
    LockedError,
    NotInitializedError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.secret import Secret

pytestmark = pytest.mark.anyio
PW = Secret("pass phrase")


async def make(tmp_path: Path, init: bool = True) -> FileBackend:
    b = FileBackend(tmp_path / "home", KdfParams(log2_n=10))
    await b.open()
    if init:
        await b.init(PW)
    return b


def record_files(b: FileBackend) -> list[Path]:
    return sorted(b.dir.glob("*" + records.SUFFIX))


async def test_default_kdf_parameters_are_pinned() -> None:
    p = KdfParams()
    assert (1 << p.log2_n) >= 1 << 17 and p.r == 8 and p.p == 1
    assert datakey.KEY_BYTES == 32 and datakey.SALT_BYTES == 16


async def test_header_records_the_kdf_parameters_used(tmp_path: Path) -> None:
    b = await make(tmp_path)
    blob = (b.dir / WRAPPED_KEY_FILE).read_bytes()
    assert len(blob) == datakey.FILE_SIZE == 84
    assert datakey.read_params(blob) == KdfParams(10, 8, 1)


async def test_header_asking_for_too_much_memory_is_refused(tmp_path: Path) -> None:
    b = await make(tmp_path)
    path = b.dir / WRAPPED_KEY_FILE
    blob = bytearray(path.read_bytes())
    blob[5] = 23  # log2 N = 23 > 22
    path.write_bytes(bytes(blob))
    await b.lock()
    with pytest.raises(CorruptRecordError, match="outside"):
        await b.unlock(PW)


async def test_directory_and_files_are_private(tmp_path: Path) -> None:
    b = await make(tmp_path)
    await b.store("a", Secret("v"), None)
    assert stat.S_IMODE(b.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(b.home.stat().st_mode) == 0o700
    for f in b.dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


async def test_loose_modes_are_tightened_at_open_and_unlock(tmp_path: Path) -> None:
    b = await make(tmp_path)
    await b.store("a", Secret("v"), None)
    await b.close()
    b.dir.chmod(0o755)
    record_files(b)[0].chmod(0o644)
    b2 = await make(tmp_path, init=False)
    await b2.unlock(PW)
    assert stat.S_IMODE(b2.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(record_files(b2)[0].stat().st_mode) == 0o600


async def test_no_plaintext_name_or_value_anywhere_on_disk(tmp_path: Path) -> None:
    b = await make(tmp_path)
    names = ["provider/hue-bridge-token", "llm/anthropic-key"]
    values = ["VALUE-canary-7f3a9", "sk-ant-CANARY-0042"]
    for n, v in zip(names, values, strict=False):
        await b.store(n, Secret(v), "llm")
        await b.rotate(n, Secret(v + "-rotated"))
    await b.change_passphrase(PW, Secret("PASSPHRASE-canary-new"))
    needles = [s.encode() for s in names + values + ["pass phrase", "PASSPHRASE-canary-new"]]
    needles += [s.encode("utf-16-le") for s in names + values]
    scanned = 0
    for root, _dirs, files in os.walk(b.home):
        for f in files:
            data = (Path(root) / f).read_bytes()
            scanned += len(data)
            for needle in needles:
                assert needle not in data, (f, needle)
    assert scanned > 0


async def test_wrong_passphrase_is_detected_at_unlock(tmp_path: Path) -> None:
    b = await make(tmp_path)
    await b.lock()
    with pytest.raises(WrongPassphraseError):
        await b.unlock(Secret("wrong"))
    assert b.locked
    await b.unlock(PW)
    assert not b.locked


async def test_locked_and_uninitialized_states(tmp_path: Path) -> None:
    b = await make(tmp_path, init=False)
    with pytest.raises(NotInitializedError):
        await b.retrieve("a")
    with pytest.raises(NotInitializedError):
        await b.unlock(PW)
    await b.init(PW)
    with pytest.raises(AlreadyInitializedError):
        await b.init(PW)
    await b.store("a", Secret("v"), None)
    await b.lock()
    for call in (b.retrieve("a"), b.list(""), b.describe("a"), b.store("b", Secret("v"), None),
                 b.delete("a"), b.rotate("a", Secret("w"))):
        with pytest.raises(LockedError):
            await call
    assert await b.count() is None


async def test_lock_zeroes_the_data_key_buffer(tmp_path: Path) -> None:
    b = await make(tmp_path)
    buf = b.data_key_buffer
    assert buf is not None and any(buf)
    await b.lock()
    assert buf == bytearray(32)
    assert b.data_key_buffer is None


async def test_passphrase_change_keeps_every_secret_readable(tmp_path: Path) -> None:
    b = await make(tmp_path)
    for i in range(20):
        await b.store(f"s{i}", Secret(f"v{i}"), None)
    key_before = (b.dir / WRAPPED_KEY_FILE).read_bytes()
    records_before = {p.name: p.read_bytes() for p in record_files(b)}
    with pytest.raises(WrongPassphraseError):
        await b.change_passphrase(Secret("wrong"), Secret("new"))
    assert (b.dir / WRAPPED_KEY_FILE).read_bytes() == key_before
    await b.change_passphrase(PW, Secret("new"))
    # O(1): only the wrapped key changed, no record was rewritten.
    assert {p.name: p.read_bytes() for p in record_files(b)} == records_before
    await b.lock()
    with pytest.raises(WrongPassphraseError):
        await b.unlock(PW)
    await b.unlock(Secret("new"))
    for i in range(20):
        got = await b.retrieve(f"s{i}")
        assert got is not None and got.value == Secret(f"v{i}")


async def test_tampered_record_fails_with_its_file_named_and_others_work(tmp_path: Path) -> None:
    b = await make(tmp_path)
    await b.store("victim", Secret("v"), None)
    await b.store("bystander", Secret("b"), None)
    fid = b._index["victim"].file_id
    path = b.dir / (fid + records.SUFFIX)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a bit in the value section
    path.write_bytes(bytes(data))
    await b.lock()
    await b.unlock(PW)  # metadata still authenticates: the name is listed
    with pytest.raises(CorruptRecordError, match=fid):
        await b.retrieve("victim")
    got = await b.retrieve("bystander")
    assert got is not None and got.value == Secret("b")


@pytest.mark.parametrize("damage", ["truncate", "meta-bit", "value-bit", "garbage", "empty"])
async def test_a_damaged_record_is_an_error_never_an_absent_secret(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One flipped bit must not make a secret vanish and let the next store replace it."""
    b = await make(tmp_path)
    await b.store("victim", Secret("v"), None)
    await b.store("ok", Secret("fine"), None)
    fid = b._index["victim"].file_id
    path = b.dir / (fid + records.SUFFIX)
    data = path.read_bytes()
    mutated = {
        "truncate": data[:30],
        "meta-bit": data[:20] + bytes([data[20] ^ 0x80]) + data[21:],
        "value-bit": data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:],
        "garbage": os.urandom(len(data)),
        "empty": b"",
    }[damage]
    path.write_bytes(mutated)
    await b.lock()
    await b.unlock(PW)
    for attempt in (b.retrieve("victim"), b.store("victim", Secret("new"), None),
                    b.rotate("victim", Secret("new")), b.delete("victim")):
        with pytest.raises(CorruptRecordError, match=fid) as err:
            await attempt
        assert "rm --force" in err.value.message and "Secret" not in err.value.message
    if damage != "value-bit":  # metadata unreadable: the name is known only when asked for
        with pytest.raises(CorruptRecordError, match=fid):
            await b.describe("victim")
        assert await b.list("") == ["ok"]
    assert path.read_bytes() == mutated  # nothing overwrote the damaged file
    assert [d.file for d in b.damaged()] == [fid + records.SUFFIX]
    assert fid in caplog.text
    got = await b.retrieve("ok")  # the others keep working
    assert got is not None and got.value == Secret("fine")
    assert await b.store("other", Secret("o"), None) == 1
    # the operator removes it; then the name is free again
    assert await b.delete("victim", force=True) is True
    assert not path.exists() and b.damaged() == []
    assert await b.retrieve("victim") is None
    assert await b.store("victim", Secret("again"), None) == 1


async def test_record_copied_over_another_name_fails_authentication(tmp_path: Path) -> None:
    b = await make(tmp_path)
    await b.store("a", Secret("value-a"), None)
    await b.store("b", Secret("value-b"), None)
    fa, fb = (b.dir / (b._index[n].file_id + records.SUFFIX) for n in ("a", "b"))
    shutil.copyfile(fa, fb)
    await b.lock()
    await b.unlock(PW)
    assert await b.list("") == ["a"]  # b's file now fails: never returns a's value under b
    with pytest.raises(CorruptRecordError, match=fb.name):
        await b.retrieve("b")
    got = await b.retrieve("a")
    assert got is not None and got.value == Secret("value-a")


async def test_old_version_put_back_while_running_is_detected(tmp_path: Path) -> None:
    b = await make(tmp_path)
    await b.store("r", Secret("v1"), None)
    path = b.dir / (b._index["r"].file_id + records.SUFFIX)
    old = path.read_bytes()
    await b.rotate("r", Secret("v2"))
    path.write_bytes(old)
    entry = b._index["r"]
    object.__setattr__(entry, "sealed", None)  # force a read from disk, as for a large record
    with pytest.raises(CorruptRecordError, match=r"generation .* replaced behind"):
        await b.retrieve("r")


async def test_stale_temp_files_are_removed_at_open(tmp_path: Path) -> None:
    b = await make(tmp_path)
    (b.dir / ".tmp-deadbeef").write_bytes(b"partial")
    b2 = await make(tmp_path, init=False)
    assert not (b2.dir / ".tmp-deadbeef").exists()


async def test_large_records_are_read_from_disk(tmp_path: Path) -> None:
    b = await make(tmp_path)
    await b.store("big", Secret("x" * 40000), None)
    assert b._index["big"].sealed is None
    got = await b.retrieve("big")
    assert got is not None and len(got.value) == 40000


async def test_independent_decryptor_from_format_md(tmp_path: Path) -> None:
    """Open a format-2 store with nothing but FORMAT.md and the primitives: wrapped key,
    subkeys, manifest, record header checked against it, both sections, padding."""
    import hashlib
    import hmac
    import struct

    import msgspec
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    b = await make(tmp_path)
    await b.store("provider/x", Secret("the value"), "provider")
    await b.rotate("provider/x", Secret("the new value"))
    await b.store("other/y", Secret("y" * 300), None)
    await b.close()
    d = b.dir

    # Wrapped-key file: [0, 24) magic through salt is the AD.
    wk = (d / "wrapped-key").read_bytes()
    assert len(wk) == 84
    magic, ver, log2n, r, p, salt = struct.unpack(">4sBBBB16s", wk[:24])
    assert (magic, ver) == (b"HASK", 2)
    assert 10 <= log2n <= 22 and r >= 1 and p >= 1
    assert 128 * (1 << log2n) * r <= 4 << 30 and (1 << log2n) * r * p <= 1 << 25
    kek = Scrypt(salt=salt, length=32, n=1 << log2n, r=r, p=p).derive("pass phrase".encode("utf-8"))  # noqa: UP012 (P is the UTF-8 bytes)
    dk = AESGCM(kek).decrypt(wk[24:36], wk[36:84], wk[:24])

    def sub(info: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, None, info).derive(dk)

    rk = sub(b"homeagent-secrets v2 record encryption")
    nk = sub(b"homeagent-secrets v2 name hashing")
    mk = sub(b"homeagent-secrets v2 manifest encryption")

    # Manifest: [0, 5) magic and version are the AD; entries of 57 (final) or 81 bytes.
    mf = (d / "manifest").read_bytes()
    assert mf[:5] == b"HASM\x02"
    pt = AESGCM(mk).decrypt(mf[5:17], mf[17:], b"homeagent-secrets v2 manifest\x00" + mf[:5])
    generation, count = struct.unpack(">QI", pt[:12])
    entries, off = {}, 12
    for _ in range(count):
        fid_raw, state = pt[off:off + 32], pt[off + 32]
        rid, gen = struct.unpack(">16sQ", pt[off + 33:off + 57])
        assert state == 0  # nothing pending once writes are answered
        entries[fid_raw.hex()] = (rid, gen)
        off += 57
    assert off == len(pt) and count == 2 and list(entries) == sorted(entries)

    def bucket(x: int) -> int:
        if x <= 1 << 20:
            return max(64, 1 << (x - 1).bit_length())
        return -(-x // (1 << 20)) * (1 << 20)

    def unpad(buf: bytes) -> bytes:
        (m,) = struct.unpack(">I", buf[:4])
        assert len(buf) == bucket(4 + m) and not any(buf[4 + m:])
        return buf[4:4 + m]

    def read(name: str) -> tuple[list[Any], list[Any]]:  # msgpack decodes to Any
        fid = hmac.new(nk, name.encode("utf-8"), hashlib.sha256).hexdigest()
        rec = (d / f"{fid}.rec").read_bytes()
        magic, fmt, gen, rid, L = struct.unpack(">4sBQ16sI", rec[:33])
        assert (magic, fmt) == (b"HASR", 2)
        assert entries[fid] == (rid, gen) and gen <= generation  # what the manifest lists
        h, f = rec[:33], fid.encode("ascii")
        meta = AESGCM(rk).decrypt(rec[33:45], rec[45:33 + L], b"homeagent-secrets v2 record meta\x00" + h + f)
        tag = rec[17 + L:33 + L]
        vals = AESGCM(rk).decrypt(rec[33 + L:45 + L], rec[45 + L:],
                                  b"homeagent-secrets v2 record values\x00" + h + f + tag)
        m, v = msgspec.msgpack.decode(unpad(meta)), msgspec.msgpack.decode(unpad(vals))
        assert len(m) == 6 and len(v) == 2
        assert hmac.new(nk, m[0].encode(), hashlib.sha256).hexdigest() == fid
        return m, v

    (name, kind, created, updated, version, has_previous), values = read("provider/x")
    assert (name, kind, version, has_previous) == ("provider/x", "provider", 2, True)
    assert isinstance(created, float) and updated >= created
    assert values == ["the new value", "the value"]
    meta_y, values_y = read("other/y")
    assert meta_y[4:] == [1, False] and values_y == ["y" * 300, None]
