"""Format 2 (FORMAT.md): the attacks format 1 could not see, padding, KDF bounds,
rekey and the format-1 upgrade, with real files, real crypto and real secretsd
processes (kill -9 at every crash point of rekey, upgrade and writes)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.daemon.backends import datakey, manifest, records
from homeagent_secrets.daemon.backends.datakey import DataKey, KdfParams
from homeagent_secrets.daemon.backends.files import WRAPPED_KEY_FILE, FileBackend
from homeagent_secrets.protocol.errors import CorruptRecordError, SecretsError, WrongPassphraseError
from homeagent_secrets.protocol.names import Kind
from homeagent_secrets.protocol.secret import Secret

from .conftest import PASSPHRASE, Daemon, require_real

PW = Secret("pass phrase")
NEW_PASSPHRASE = "a brand new passphrase"
#: The last commit whose agent wrote format 1 (the upgrade tests run its real code).
FORMAT1_COMMIT = "98fbddc"


async def make(home: Path, init: bool = True) -> FileBackend:
    b = FileBackend(home, KdfParams(log2_n=10))
    await b.open()
    if init:
        await b.init(PW)
    return b


async def reopen(b: FileBackend) -> FileBackend:
    """The agent stopped and started again (the attacker acted in between)."""
    await b.close()
    b2 = await make(b.home, init=False)
    await b2.unlock(PW)
    return b2


def record_path(b: FileBackend, name: str) -> Path:
    assert b._key is not None
    return b.dir / (b._key.file_id(name) + records.SUFFIX)


async def assert_damaged(b: FileBackend, name: str, path: Path, *why: str) -> None:
    """Reads and writes of ``name`` refused naming the file; listed in status; others served."""
    for call in (b.retrieve(name), b.retrieve(name, previous=True), b.describe(name),
                 b.store(name, Secret("new"), None), b.rotate(name, Secret("new")), b.delete(name)):
        with pytest.raises(CorruptRecordError) as err:
            await call
        assert path.name in err.value.message and "rm --force" in err.value.message
        for word in why:
            assert word in err.value.message, err.value.message
    assert [d.file for d in b.damaged()] == [path.name]
    assert name not in await b.list("")
    got = await b.retrieve("bystander")
    assert got is not None and got.value == Secret("fine")


async def assert_resolved_by_force_delete(b: FileBackend, name: str, path: Path) -> None:
    await b.delete(name, force=True)
    assert not path.exists() and b.damaged() == []
    assert await b.retrieve(name) is None
    assert await b.store(name, Secret("again"), None) == 1
    b2 = await reopen(b)  # and the manifest agrees after a restart
    assert b2.damaged() == []
    got = await b2.retrieve(name)
    assert got is not None and got.value == Secret("again")
    await b2.close()


# --- the attacks of the issue, each now a clear error -----------------------------------------


@pytest.mark.anyio
async def test_single_file_rollback_while_stopped_is_refused(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    await b.store("bystander", Secret("fine"), None)
    await b.store("victim", Secret("v1"), None)
    path = record_path(b, "victim")
    old = path.read_bytes()
    await b.rotate("victim", Secret("v2"))
    await b.close()
    path.write_bytes(old)  # format 1 opened this as a valid v1
    b = await reopen(b)
    await assert_damaged(b, "victim", path, "older than the manifest", "rollback")
    assert [d.name for d in b.damaged()] == ["victim"]  # its metadata authenticates: named
    await assert_resolved_by_force_delete(b, "victim", path)


@pytest.mark.anyio
async def test_resurrected_record_of_a_deleted_secret_is_refused(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    await b.store("bystander", Secret("fine"), None)
    await b.store("victim", Secret("revoked token"), None)
    path = record_path(b, "victim")
    copy = path.read_bytes()
    assert await b.delete("victim") is True
    await b.close()
    path.write_bytes(copy)  # format 1 brought the secret back to life
    b = await reopen(b)
    await assert_damaged(b, "victim", path, "not listed in the manifest", "resurrection")
    await assert_resolved_by_force_delete(b, "victim", path)


@pytest.mark.anyio
async def test_a_missing_record_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    await b.store("bystander", Secret("fine"), None)
    await b.store("victim", Secret("v"), None)
    path = record_path(b, "victim")
    await b.close()
    path.unlink()  # format 1 silently forgot the secret
    b = await reopen(b)
    await assert_damaged(b, "victim", path, "missing")
    assert [d.name for d in b.damaged()] == [None]  # only the manifest's file id is left
    await assert_resolved_by_force_delete(b, "victim", path)


@pytest.mark.anyio
async def test_manifest_rolled_back_is_refused_for_every_newer_record(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    await b.store("bystander", Secret("fine"), None)
    await b.store("victim", Secret("v1"), None)
    old_manifest = (b.dir / manifest.FILE).read_bytes()
    await b.rotate("victim", Secret("v2"))
    await b.store("born-later", Secret("x"), None)
    paths = {n: record_path(b, n) for n in ("victim", "born-later")}
    await b.close()
    (b.dir / manifest.FILE).write_bytes(old_manifest)
    b = await reopen(b)
    assert sorted(d.file for d in b.damaged()) == sorted(p.name for p in paths.values())
    for name, path in paths.items():
        with pytest.raises(CorruptRecordError, match="after the manifest") as err:
            await b.retrieve(name)
        assert path.name in err.value.message and "rolled back" in err.value.message
    got = await b.retrieve("bystander")  # unchanged since the old manifest: still served
    assert got is not None and got.value == Secret("fine")
    await b.close()


@pytest.mark.anyio
async def test_a_record_of_an_earlier_life_put_back_is_refused(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    await b.store("bystander", Secret("fine"), None)
    await b.store("victim", Secret("life one"), None)
    await b.rotate("victim", Secret("life one, v2"))
    path = record_path(b, "victim")
    first_life = path.read_bytes()
    await b.delete("victim")
    await b.store("victim", Secret("life two"), None)
    await b.rotate("victim", Secret("life two, v2"))  # version 2 again, as in the first life
    second_life = path.read_bytes()
    gen1 = struct.unpack_from(">Q", first_life, 5)[0]
    gen2 = struct.unpack_from(">Q", second_life, 5)[0]
    assert gen2 > gen1 and first_life[13:29] != second_life[13:29]  # store-wide counter, new id
    await b.close()
    path.write_bytes(first_life)
    b = await reopen(b)
    await assert_damaged(b, "victim", path, "another life")
    await b.close()


@pytest.mark.anyio
async def test_metadata_of_one_life_spliced_with_values_of_another_is_refused(tmp_path: Path) -> None:
    """Format 1: the metadata of the current life plus the values of the first life
    decrypted as a valid record."""
    b = await make(tmp_path / "home")
    await b.store("bystander", Secret("fine"), None)
    await b.store("victim", Secret("old secret"), None)
    path = record_path(b, "victim")
    first = path.read_bytes()
    await b.delete("victim")
    await b.store("victim", Secret("current secret"), None)
    current = path.read_bytes()

    def split(blob: bytes) -> tuple[bytes, bytes]:
        meta_len = struct.unpack_from(">I", blob, 29)[0]
        return blob[: 33 + meta_len], blob[33 + meta_len :]

    head_now, _values_now = split(current)
    _head_then, values_then = split(first)
    spliced = head_now + values_then
    await b.close()
    path.write_bytes(spliced)
    b = await reopen(b)
    # The header and metadata are the current life's, so the name is listed...
    assert "victim" in await b.list("")
    with pytest.raises(CorruptRecordError) as err:  # ...but the values never open
        await b.retrieve("victim")
    assert path.name in err.value.message and "spliced" in err.value.message
    assert [d.file for d in b.damaged()] == [path.name]
    # Within one life too: the values are bound to their own metadata section's tag.
    await b.delete("victim", force=True)
    await b.store("victim", Secret("one"), None)
    one = path.read_bytes()
    await b.rotate("victim", Secret("two"))
    two = path.read_bytes()
    await b.close()
    path.write_bytes(split(two)[0] + split(one)[1])
    b = await reopen(b)
    with pytest.raises(CorruptRecordError, match="failed authentication of its values"):
        await b.retrieve("victim")
    await b.close()


# --- sizes, header, KDF bounds ------------------------------------------------------------------


@pytest.mark.anyio
async def test_record_sizes_do_not_tell_value_lengths_within_a_bucket(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    sizes = {}
    for value in ("a", "a" * 20, "a" * 50):  # the values' MessagePack fits one 64-byte bucket
        await b.store(f"s/{len(value)}", Secret(value), None)
        sizes[len(value)] = record_path(b, f"s/{len(value)}").stat().st_size
    assert len(set(sizes.values())) == 1, sizes
    await b.store("s/big", Secret("a" * 100), None)  # the next bucket: 128 bytes
    assert record_path(b, "s/big").stat().st_size == sizes[1] + 64
    # a name's length does not show either (metadata padded too)
    await b.store("n", Secret("x"), None)
    await b.store("a/much/longer/name/than/that", Secret("x"), None)
    assert record_path(b, "n").stat().st_size == record_path(b, "a/much/longer/name/than/that").stat().st_size
    assert records.bucket(1) == 64 and records.bucket(65) == 128 and records.bucket(1 << 20) == 1 << 20
    assert records.bucket((1 << 20) + 1) == 2 << 20  # past 1 MiB: multiples of 1 MiB
    await b.close()


@pytest.mark.anyio
async def test_clear_header_carries_no_version_count(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    await b.store("x", Secret("v"), None)
    await b.store("y", Secret("v"), None)
    for i in range(5):
        await b.rotate("y", Secret(f"v{i}"))
    hx, hy = (record_path(b, n).read_bytes()[:33] for n in ("x", "y"))
    # magic, format, generation (store-wide), record id, metadata length: nothing per name
    assert hx[:5] == hy[:5] == b"HASR\x02" and hx[29:] == hy[29:]
    await b.close()


@pytest.mark.anyio
@pytest.mark.parametrize(("log2n", "r", "p", "problem"), [
    (23, 8, 1, "outside"), (9, 8, 1, "outside"), (22, 32, 16, "MiB"), (22, 8, 2, "work"),
    (20, 8, 5, "work"), (17, 0, 1, "not valid scrypt"), (17, 1, 1, "not valid scrypt"),
])
async def test_kdf_parameters_beyond_the_bounds_are_refused_before_deriving(
        tmp_path: Path, log2n: int, r: int, p: int, problem: str) -> None:
    b = await make(tmp_path / "home")
    path = b.dir / WRAPPED_KEY_FILE
    blob = bytearray(path.read_bytes())
    blob[5:8] = bytes([log2n, r, p])
    path.write_bytes(bytes(blob))
    await b.lock()
    t0 = time.perf_counter()
    with pytest.raises(CorruptRecordError) as err:
        await b.unlock(PW)
    assert time.perf_counter() - t0 < 0.5  # refused, never computed (16 GiB at N=2^22 r=32)
    assert problem in err.value.message or "outside" in err.value.message
    assert datakey.MAX_KDF_MEMORY == 4 << 30 and datakey.MAX_KDF_WORK == 1 << 25


@pytest.mark.anyio
async def test_manifest_missing_or_tampered_refuses_unlock_naming_it(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    await b.store("a", Secret("v"), None)
    await b.close()
    mpath = b.dir / manifest.FILE
    good = mpath.read_bytes()
    for bad, why in ((None, "missing"), (good[:-1] + bytes([good[-1] ^ 1]), "failed authentication")):
        if bad is None:
            mpath.unlink()
        else:
            mpath.write_bytes(bad)
        b2 = await make(b.home, init=False)
        with pytest.raises(CorruptRecordError, match=why) as err:
            await b2.unlock(PW)
        assert "manifest" in err.value.message and b2.locked
    mpath.unlink()
    os.mkfifo(mpath)  # a FIFO in its place never hangs unlock
    b2 = await make(b.home, init=False)
    with pytest.raises(CorruptRecordError, match="not a regular file"):
        await b2.unlock(PW)
    mpath.unlink()
    mpath.write_bytes(good)
    b2 = await reopen(b)
    assert (await b2.retrieve("a")) is not None
    await b2.close()


@pytest.mark.anyio
async def test_writes_leave_no_pending_entry_and_versions_stay_per_life(tmp_path: Path) -> None:
    b = await make(tmp_path / "home")
    assert await b.store("k", Secret("1"), None) == 1
    assert await b.rotate("k", Secret("2")) == 2
    assert b._key is not None and b._key.manifest_aead is not None
    mf = manifest.open_(b._key.manifest_aead, (b.dir / manifest.FILE).read_bytes())
    assert not any(e.pending for e in mf.entries.values())
    gen = mf.generation
    await b.delete("k")
    assert await b.store("k", Secret("3"), None) == 1  # the protocol's version: per life
    mf = manifest.open_(b._key.manifest_aead, (b.dir / manifest.FILE).read_bytes())
    (entry,) = mf.entries.values()
    assert entry.before is not None and entry.before.generation > gen  # the store-wide one grows
    await b.close()


# --- rekey ------------------------------------------------------------------------------------


def fill(c: SecretsClient, n: int = 12) -> dict[str, tuple[str, str | None, str, int]]:
    """Store n secrets (some rotated); name -> (current, previous, kind, version)."""
    want: dict[str, tuple[str, str | None, str, int]] = {}
    kinds: tuple[Kind, ...] = ("provider", "llm", "device", "generic")
    for i in range(n):
        name = f"fill/{i}"
        c.store(name, f"value-{i}", kinds[i % 4])
        want[name] = (f"value-{i}", None, kinds[i % 4], 1)
        if i % 3 == 0:
            c.rotate(name, f"value-{i}-b")
            want[name] = (f"value-{i}-b", f"value-{i}", kinds[i % 4], 2)
    return want


def check_all(c: SecretsClient, want: dict[str, tuple[str, str | None, str, int]]) -> None:
    assert c.status().damaged == []
    assert c.list() == sorted(want)
    for name, (cur, prev, kind, version) in want.items():
        got = c.retrieve(name)
        assert got is not None and got.value.reveal() == cur and got.version == version, name
        assert c.get(name, previous=True) == prev, name
        info = c.describe(name)
        assert info is not None and info.kind == kind and info.has_previous == (prev is not None)


def opens_anything(old_key: bytes, secrets_dir: Path) -> list[str]:
    """The files of ``secrets_dir`` that ``old_key`` (a format-2 data key) authenticates."""
    k = DataKey(bytearray(old_key))
    assert k.aead is not None and k.manifest_aead is not None
    opened = []
    for f in secrets_dir.iterdir():
        blob = f.read_bytes()
        try:
            if f.name == manifest.FILE:
                manifest.open_(k.manifest_aead, blob)
            elif records.is_record_name(f.name):
                records.open_meta(k.aead, blob, f.name[:64])
            else:
                continue
        except CorruptRecordError:
            continue
        opened.append(f.name)
    return opened


@pytest.mark.slow
def test_rekey_replaces_the_data_key_and_the_old_one_opens_nothing(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory(name="rk")
    c = SecretsClient(d.socket)
    c.init(PASSPHRASE)
    want = fill(c)
    old_wrapped = (d.home / "secrets" / WRAPPED_KEY_FILE).read_bytes()
    old_files = {p.name for p in (d.home / "secrets").iterdir()}
    old_key = bytes(datakey.unwrap(old_wrapped, Secret(PASSPHRASE)))
    assert len(opens_anything(old_key, d.home / "secrets")) == len(want) + 1  # sanity
    old_pw, new_pw = short_tmp / "old", short_tmp / "new"
    old_pw.write_text(PASSPHRASE + "\n")
    new_pw.write_text(NEW_PASSPHRASE + "\n")
    r = d.ctl("passwd", "--rekey", "--passphrase-file", str(old_pw), "--new-passphrase-file", str(new_pw))
    assert r.returncode == 0, r.stderr
    assert f"{len(want)} secret(s) re-encrypted" in r.stderr
    check_all(c, want)  # still unlocked, on the new key
    c.store("after/rekey", "written after")
    # The old wrapped-key file and the old passphrase open nothing that exists now.
    files = {p.name for p in (d.home / "secrets").iterdir()}
    assert not (files & old_files - {WRAPPED_KEY_FILE, manifest.FILE})  # new file ids everywhere
    assert opens_anything(old_key, d.home / "secrets") == []
    assert sorted(p.name for p in d.home.iterdir() if p.name.startswith("secrets")) == ["secrets"]
    c.lock()
    with pytest.raises(WrongPassphraseError):
        c.unlock(PASSPHRASE)
    c.unlock(NEW_PASSPHRASE)
    check_all(c, want | {"after/rekey": ("written after", None, "generic", 1)})
    # rekey needs the right passphrase, and works while locked too
    with pytest.raises(WrongPassphraseError):
        c.rekey("wrong", PASSPHRASE)
    c.lock()
    assert c.rekey(NEW_PASSPHRASE, PASSPHRASE) == len(want) + 1
    assert c.status().locked
    c.unlock(PASSPHRASE)
    assert c.get("after/rekey") == "written after"
    d.stop()


REKEY_CRASH_POINTS = ["rebuild-wrote-record:5", "rebuild-before-marker", "rebuild-before-switch",
                      "switch-between-renames", "rebuild-after-switch", "remove-store-key-gone",
                      "switch-old-removed"]


def _crash_during(home: Path, sock: Path, log: Path, point: str, action) -> None:  # type: ignore[no-untyped-def]
    """Start secretsd with the crash point armed, run ``action`` until the daemon dies."""
    env = {"HOMEAGENT_CRASH_AT": point}
    if point == "switch-between-renames":  # only the two-rename switch has it
        env["HOMEAGENT_FAULT"] = "no-rename-exchange"
    d = Daemon(home, sock, log, env=env).start()
    try:
        with pytest.raises(SecretsError):
            action(SecretsClient(d.socket, timeout=30))
        assert d.proc is not None and d.proc.wait(15) == -9, f"{point} was never reached"
    finally:
        d.kill()


@pytest.mark.slow
@pytest.mark.parametrize("point", REKEY_CRASH_POINTS)
def test_kill_at_each_rekey_crash_point_keeps_a_store_that_opens(point: str, short_tmp: Path) -> None:
    home, sock, log = short_tmp / "home", short_tmp / "s.sock", short_tmp / "d.log"
    d = Daemon(home, sock, log).start()
    c = SecretsClient(sock)
    c.init(PASSPHRASE)
    want = fill(c)
    old_key = bytes(datakey.unwrap((home / "secrets" / WRAPPED_KEY_FILE).read_bytes(), Secret(PASSPHRASE)))
    d.stop()
    _crash_during(home, sock, log, point, lambda cc: (cc.unlock(PASSPHRASE), cc.rekey(PASSPHRASE, NEW_PASSPHRASE)))
    d = Daemon(home, sock, log).start()
    c = SecretsClient(sock)
    opened = None
    for phrase in (PASSPHRASE, NEW_PASSPHRASE):
        try:
            c.unlock(phrase)
            opened = phrase
            break
        except WrongPassphraseError:
            continue
    assert opened is not None, "the store opens with neither passphrase"
    # Before the switch the old store holds; from the switch on, the new one.
    switched = point not in ("rebuild-wrote-record:5", "rebuild-before-marker")
    assert opened == (NEW_PASSPHRASE if switched else PASSPHRASE), point
    check_all(c, want)
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("secrets")) == ["secrets"]
    assert not (home / "secrets" / "complete").exists()
    if switched:
        assert opens_anything(old_key, home / "secrets") == []
    c.store("after/crash", "ok")  # writable
    assert c.get("after/crash") == "ok"
    d.stop()


# --- write order under kill -9 ------------------------------------------------------------------


WRITE_CRASH_POINTS = [("write-manifest-pending", "old"), ("write-record", "new"),
                      ("write-manifest-final", "new"), ("delete-manifest-pending", "old"),
                      ("delete-unlinked", "gone")]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "outcome"), WRITE_CRASH_POINTS)
def test_kill_at_each_write_step_leaves_a_recognized_state(point: str, outcome: str,
                                                           short_tmp: Path) -> None:
    home, sock, log = short_tmp / "home", short_tmp / "s.sock", short_tmp / "d.log"
    d = Daemon(home, sock, log).start()
    c = SecretsClient(sock)
    c.init(PASSPHRASE)
    c.store("k", "old")
    c.store("other", "o")
    d.stop()
    if point.startswith("delete"):
        _crash_during(home, sock, log, point, lambda cc: (cc.unlock(PASSPHRASE), cc.delete("k")))
    else:
        _crash_during(home, sock, log, point, lambda cc: (cc.unlock(PASSPHRASE), cc.rotate("k", "new")))
    d = Daemon(home, sock, log).start()
    c = SecretsClient(sock)
    c.unlock(PASSPHRASE)
    assert c.status().damaged == []
    assert c.get("k") == {"old": "old", "new": "new", "gone": None}[outcome]
    if outcome == "new":
        assert c.get("k", previous=True) == "old"
    assert c.get("other") == "o"
    assert "settled" in d.log_text() or point == "write-manifest-final"
    # the settled manifest has no pending entry left: a rollback now would be caught
    key = DataKey(datakey.unwrap((home / "secrets" / WRAPPED_KEY_FILE).read_bytes(), Secret(PASSPHRASE)))
    assert key.manifest_aead is not None
    mf = manifest.open_(key.manifest_aead, (home / "secrets" / manifest.FILE).read_bytes())
    assert not any(e.pending for e in mf.entries.values())
    d.stop()


@pytest.mark.slow
def test_crash_harness_on_format2_200_kills_with_rekeys_loses_nothing() -> None:
    from .crash_harness import run

    stats: dict[str, int] = {}
    result = run(200, seed=20, stats=stats)
    assert result["lost"] == 0 and result["acknowledged_writes"] > 200
    assert stats["rekeys"] > 0 and stats["passphrase_changes"] > 0, stats


# --- the format-1 upgrade, with the real format-1 agent ----------------------------------------


@pytest.fixture(scope="module")
def format1_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent as of the last format-1 commit, extracted from this repository's history."""
    repo = Path(__file__).resolve().parent.parent
    root = tmp_path_factory.mktemp("format1")
    pkg = root / "homeagent_secrets"
    pkg.mkdir()
    ok = shutil.which("git") is not None
    if ok:
        archive = subprocess.run(["git", "-C", str(repo), "archive", FORMAT1_COMMIT, "protocol",
                                  "daemon", "client"], capture_output=True, check=False)
        ok = archive.returncode == 0
    require_real(ok, f"git and commit {FORMAT1_COMMIT} (the format-1 agent) in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive.stdout, check=True)
    (pkg / "__init__.py").write_text("")
    return root


def format1_daemon(code: Path, home: Path, sock: Path, log: Path) -> Daemon:
    return Daemon(home, sock, log, env={"PYTHONPATH": str(code)})


def old_client(code: Path, sock: Path, script: str) -> str:
    """Run ``script`` with the format-1 agent's own client; its stdout."""
    r = subprocess.run([sys.executable, "-c", "from homeagent_secrets.client import SecretsClient\n"
                        f"c = SecretsClient({str(sock)!r})\n" + script],
                       env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def make_format1_store(code: Path, home: Path, sock: Path, log: Path) -> dict[str, list[object]]:
    """A store written by the real format-1 agent; name -> [current, previous, kind, version,
    created, updated] as it describes them."""
    d = format1_daemon(code, home, sock, log).start()
    try:
        out = old_client(code, sock, f"""
import json
c.init({PASSPHRASE!r})
for i in range(9):
    c.store(f"old/{{i}}", f"value-{{i}}", ("provider", "llm", "device")[i % 3])
    for j in range(i % 3):
        c.rotate(f"old/{{i}}", f"value-{{i}}-r{{j}}")
c.delete("old/8")
c.store("old/8", "second life")
out = {{}}
for n in c.list():
    info = c.describe(n)
    out[n] = [c.get(n), c.get(n, previous=True), info.kind, info.version, info.created, info.updated]
print(json.dumps(out))
""")
    finally:
        d.stop()
    import json

    want: dict[str, list[object]] = json.loads(out)
    assert (home / "secrets" / WRAPPED_KEY_FILE).read_bytes()[4] == 1  # really format 1
    return want


def check_upgraded(c: SecretsClient, want: dict[str, list[object]]) -> None:
    assert c.status().damaged == []
    assert c.list() == sorted(want)
    for name, (cur, prev, kind, version, created, updated) in want.items():
        got = c.retrieve(name)
        assert got is not None and got.value.reveal() == cur and got.version == version, name
        assert c.get(name, previous=True) == prev, name
        info = c.describe(name)
        assert info is not None and (info.kind, info.version, info.created, info.updated) == (
            kind, version, created, updated), name


@pytest.mark.slow
def test_format1_store_upgrades_losslessly_and_the_old_agent_refuses_format2(
        format1_code: Path, short_tmp: Path) -> None:
    home, sock, log = short_tmp / "home", short_tmp / "s.sock", short_tmp / "d.log"
    want = make_format1_store(format1_code, home, sock, log)
    old_files = {p.name for p in (home / "secrets").iterdir()}
    d = Daemon(home, sock, log).start()
    c = SecretsClient(sock)
    c.unlock(PASSPHRASE)
    check_upgraded(c, want)
    assert "upgraded the store from format 1 to format 2" in d.log_text()
    secrets_dir = home / "secrets"
    assert (secrets_dir / WRAPPED_KEY_FILE).read_bytes()[4] == 2
    assert (secrets_dir / manifest.FILE).exists()
    assert not ({p.name for p in secrets_dir.iterdir()} & old_files - {WRAPPED_KEY_FILE})
    assert c.rotate("old/0", "after upgrade") == want["old/0"][3] + 1  # type: ignore[operator]
    d.stop()
    # The format-1 agent refuses the format-2 store with a clear message, never misreads it.
    old = format1_daemon(format1_code, home, sock, log).start()
    try:
        script = ("from homeagent_secrets.client import SecretsClient\n"
                  f"SecretsClient({str(sock)!r}).unlock({PASSPHRASE!r})")
        r = subprocess.run([sys.executable, "-c", script], check=False,
                           env={**os.environ, "PYTHONPATH": str(format1_code)}, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0
        assert "format version 2; this agent reads 1" in r.stderr, r.stderr
    finally:
        old.stop()
    d = Daemon(home, sock, log).start()  # and the refusal changed nothing
    c = SecretsClient(sock)
    c.unlock(PASSPHRASE)
    assert c.get("old/0") == "after upgrade"
    d.stop()


UPGRADE_CRASH_POINTS = ["rebuild-wrote-record:3", "rebuild-before-marker", "rebuild-before-switch",
                        "switch-between-renames", "rebuild-after-switch", "remove-store-key-gone",
                        "switch-old-removed"]


@pytest.mark.slow
@pytest.mark.parametrize("point", UPGRADE_CRASH_POINTS)
def test_kill_at_each_upgrade_crash_point_loses_nothing(point: str, format1_code: Path,
                                                        short_tmp: Path) -> None:
    home, sock, log = short_tmp / "home", short_tmp / "s.sock", short_tmp / "d.log"
    want = make_format1_store(format1_code, home, sock, log)
    _crash_during(home, sock, log, point, lambda cc: cc.unlock(PASSPHRASE))
    d = Daemon(home, sock, log).start()
    c = SecretsClient(sock)
    c.unlock(PASSPHRASE)  # the upgrade finishes here when the kill came before the switch
    check_upgraded(c, want)
    assert (home / "secrets" / WRAPPED_KEY_FILE).read_bytes()[4] == 2
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("secrets")) == ["secrets"]
    d.stop()


@pytest.mark.slow
def test_passphrase_change_or_rekey_of_a_locked_format1_store_upgrades_it(
        format1_code: Path, short_tmp: Path) -> None:
    for how in ("change_passphrase", "rekey"):
        home, sock, log = short_tmp / how, short_tmp / "s.sock", short_tmp / "d.log"
        want = make_format1_store(format1_code, home, sock, log)
        d = Daemon(home, sock, log).start()
        c = SecretsClient(sock)
        getattr(c, how)(PASSPHRASE, NEW_PASSPHRASE)
        assert c.status().locked  # it upgraded the files, and unlocked nothing
        assert (home / "secrets" / WRAPPED_KEY_FILE).read_bytes()[4] == 2
        with pytest.raises(WrongPassphraseError):
            c.unlock(PASSPHRASE)
        c.unlock(NEW_PASSPHRASE)
        check_upgraded(c, want)
        d.stop()
