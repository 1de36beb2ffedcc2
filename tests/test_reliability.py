"""Reliability: kill -9 at random moments, a full or read-only disk, hostile
connection patterns and nothing leaking (README, "Reliability")."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.protocol.errors import SecretsError

from .conftest import PASSPHRASE, Daemon, require_real

CI_KILLS = int(os.environ.get("HOMEAGENT_CRASH_KILLS", "200"))


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing() -> None:
    from .crash_harness import run

    result = run(CI_KILLS)
    assert result == {"kills": CI_KILLS, "acknowledged_writes": result["acknowledged_writes"],
                      "secrets": result["secrets"], "lost": 0}
    assert result["acknowledged_writes"] > CI_KILLS  # the kills really landed under load


# --- a real tiny file system -----------------------------------------------------------------


@pytest.fixture
def tiny_fs(short_tmp: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (root only)."""
    mnt = short_tmp / "tiny"
    mnt.mkdir()
    ok = os.geteuid() == 0 and shutil.which("mount") is not None
    if ok:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                            capture_output=True).returncode == 0
    require_real(ok, "root and mount -t tmpfs (a real tiny file system)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Take every free byte of the file system with one file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_disk_full_and_read_only_are_clear_errors_and_lose_nothing(tiny_fs: Path, short_tmp: Path) -> None:
    d = Daemon(tiny_fs / "home", short_tmp / "fs.sock", short_tmp / "fs.log").start()
    c = SecretsClient(d.socket)
    c.init(PASSPHRASE)
    c.store("keep", "old-value")
    c.store("other", "x")
    filler = _fill(tiny_fs)
    records_before = sorted(p.name for p in (d.home / "secrets").iterdir())
    for what, call in (("store", lambda: c.store("keep", "v" * 60000)),
                       ("store new", lambda: c.store("brand/new", "v" * 60000)),
                       ("rotate", lambda: c.rotate("keep", "w" * 60000)),
                       ("change_passphrase", lambda: c.change_passphrase(PASSPHRASE, "new pass"))):
        with pytest.raises(SecretsError) as info:
            call()
        assert info.value.code == -32006, what
        assert "disk is full" in info.value.message and "free some space" in info.value.message, what
        assert c.get("keep") == "old-value", what  # the previous value stays readable
        assert sorted(p.name for p in (d.home / "secrets").iterdir()) == records_before, what  # no partial file
    filler.unlink()
    assert c.rotate("keep", "new-value") == 2  # writes work again once space is freed
    assert c.get("keep", previous=True) == "old-value"
    c.lock()
    c.unlock(PASSPHRASE)  # the wrapped key was never damaged
    # read-only
    assert subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], capture_output=True).returncode == 0
    try:
        with pytest.raises(SecretsError) as info:
            c.store("keep", "ro")
        assert info.value.code == -32006 and "read-only" in info.value.message
        assert c.get("keep") == "new-value"  # reads keep working
        assert c.list() == ["keep", "other"]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], capture_output=True)
    assert c.store("keep", "after-ro") == 3
    d.stop()


# --- hostile connection patterns ------------------------------------------------------------


@pytest.mark.slow
def test_slowloris_and_connect_flood_do_not_starve_a_real_client(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    import socket
    import threading
    import time

    d: Daemon = daemon_factory("--idle-timeout", "3")
    c = SecretsClient(d.socket)
    c.init(PASSPHRASE)
    c.store("svc/token", "t")
    hostile = []
    for i in range(200):  # half idle, half stalled in the middle of a message
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        if i % 2:
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"retr')
        hostile.append(s)
    stop = threading.Event()
    floods = [0]

    def flood() -> None:
        while not stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(d.socket))
                floods[0] += 1
            except OSError:
                pass
            finally:
                s.close()

    t = threading.Thread(target=flood)
    t.start()
    worst = 0.0
    try:
        for _ in range(100):
            t0 = time.perf_counter()
            assert c.get("svc/token") == "t"
            worst = max(worst, time.perf_counter() - t0)
    finally:
        stop.set()
        t.join()
    print(f"\n200 hostile connections + {floods[0]} flood connects: worst legit call {worst * 1000:.1f} ms")
    assert worst < 0.1
    # the cap holds: 200 hostile + 1 client + 55 more reach the limit of 256
    extra = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(60)]
    refused = 0
    for s in extra:
        s.connect(str(d.socket))
        s.settimeout(5)
    for s in extra:
        try:
            s.settimeout(0.5)
            if b"-32006" in s.recv(4096):
                refused += 1
        except (TimeoutError, OSError):
            pass
    assert refused >= 5
    # and the idle timeout reaps them all (the half-sent and the silent ones)
    deadline = time.monotonic() + 15
    closed = 0
    for s in hostile:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if s.recv(100) == b"":
                closed += 1
        except OSError:
            pass
    assert closed == 200
    for s in hostile + extra:
        s.close()
    assert c.get("svc/token") == "t"


# --- nothing leaks ------------------------------------------------------------------------------


@pytest.mark.slow
def test_canaries_never_leak_to_proc_logs_errors_or_core_files(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    import signal
    import sys

    canary_value, canary_pass = "CANARY-V-8e1f0c", "CANARY-P-51aa7d"
    d: Daemon = daemon_factory(name="leak")
    c = SecretsClient(d.socket)
    c.init(canary_pass)
    # secretsctl reading a value from stdin: its argv and environment are clean meanwhile
    proc = subprocess.Popen([sys.executable, "-m", "homeagent_secrets.client.cli", "--socket", str(d.socket),
                             "set", "leak/test"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for _ in range(200):
        if Path(f"/proc/{proc.pid}/cmdline").read_bytes().count(b"\0") >= 5:
            break
    ctl_proc = Path(f"/proc/{proc.pid}/cmdline").read_bytes() + Path(f"/proc/{proc.pid}/environ").read_bytes()
    _out, err = proc.communicate(canary_value.encode(), timeout=30)
    assert proc.returncode == 0, err
    errors = []
    for bad in (lambda: c.store("../x", canary_value), lambda: c.rotate("nope", canary_value),
                lambda: c.unlock(canary_value), lambda: c.store("big", canary_value * 5000),
                lambda: c.change_passphrase(canary_value, canary_pass)):
        try:
            bad()
        except SecretsError as exc:
            errors.append(f"{exc!r} {exc.message}")
    c.rotate("leak/test", canary_value + "-2")
    assert c.get("leak/test") == canary_value + "-2"
    c.lock()
    daemon_proc = (Path(f"/proc/{d.pid}/cmdline").read_bytes() + Path(f"/proc/{d.pid}/environ").read_bytes())
    # a crash that would normally dump core
    d.proc.send_signal(signal.SIGABRT)  # type: ignore[union-attr]
    d.proc.wait(10)  # type: ignore[union-attr]
    state = b"".join(p.read_bytes() for p in d.home.rglob("*") if p.is_file())
    log = d.log_text().encode()
    cores = [p for p in list(Path.cwd().glob("core*")) + list(d.home.rglob("core*")) if p.is_file()]
    found = {where: blob for where, blob in (("secretsctl /proc", ctl_proc), ("daemon /proc", daemon_proc),
                                               ("state files", state), ("log", log),
                                               ("errors", " ".join(errors).encode()))
             if canary_value.encode() in blob or canary_pass.encode() in blob}
    assert len(errors) == 5 and not found and not cores, (list(found), cores)


# --- load and soak --------------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_64_connections_mixed_load(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    import json
    import random

    cc = shutil.which("cc") or shutil.which("gcc")
    require_real(cc is not None, "a C compiler for the load generator")
    assert cc is not None
    exe = short_tmp / "loadgen"
    subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).parent / "bench" / "loadgen.c")], check=True)
    d: Daemon = daemon_factory("--log-level", "WARNING", name="soak")
    c = SecretsClient(d.socket)
    c.init(PASSPHRASE)
    names = [f"soak/{i}" for i in range(200)]
    for n in names:
        c.store(n, "s" * 48)
    rng = random.Random(7)
    lines = []
    for i in range(2000):  # mostly retrieve, some store/rotate/list, as gateways do
        r, n = rng.random(), rng.choice(names)
        if r < 0.90:
            req = {"method": "retrieve", "params": {"name": n}}
        elif r < 0.94:
            req = {"method": "store", "params": {"name": n, "value": f"v{i}"}}
        elif r < 0.98:
            req = {"method": "rotate", "params": {"name": n, "value": f"r{i}"}}
        else:
            req = {"method": "list", "params": {"prefix": "soak/1"}}
        lines.append(json.dumps({"jsonrpc": "2.0", "id": i, **req}))
    reqs = short_tmp / "mixed.jsonl"
    reqs.write_text("\n".join(lines) + "\n")
    seconds = float(os.environ.get("HOMEAGENT_SOAK_SECONDS", "20"))

    def load(t: float) -> dict:  # type: ignore[type-arg]
        out = subprocess.run([str(exe), "-s", str(d.socket), "-c", "64", "-t", str(t), "-w", "0.5",
                              "-f", str(reqs)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def settled_fds() -> int:  # the daemon closes the load generator's connections after it exits
        import time

        last, since = -1, time.monotonic()
        while time.monotonic() - since < 0.3:
            now = len(os.listdir(f"/proc/{d.pid}/fd"))
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.02)
        return last

    warm = load(8)  # warm-up: caches, worker threads and the allocator settle
    rss0, fds0 = _rss_kb(d.pid), settled_fds()
    soak = load(seconds)
    rss1, fds1 = _rss_kb(d.pid), settled_fds()
    print(f"\nsoak {seconds:.0f} s, 64 conns: {soak['ops_per_s']:.0f} ops/s, p99 {soak['p99_us'] / 1000:.2f} ms, "
          f"errors {soak['errors']}; RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MB; fds {fds0} -> {fds1}")
    assert warm["errors"] == 0 and soak["errors"] == 0
    assert soak["responses"] > 1000
    assert rss1 < rss0 * 1.10
    assert abs(fds1 - fds0) <= 2
    assert sorted(c.list("soak/")) == sorted(names)


# --- fuzzing ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_frame_splitter_and_request_decoder(short_tmp: Path) -> None:
    import sys

    try:
        import atheris  # noqa: F401
    except ImportError:
        require_real(False, "atheris (pip install -e '.[test]')")
    seconds = os.environ.get("HOMEAGENT_FUZZ_SECONDS", "60")
    corpus = short_tmp / "corpus"
    shutil.copytree(Path(__file__).parent / "corpus" / "fuzz", corpus)
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "fuzz" / "fuzz_protocol.py"), str(corpus),
                        f"-max_total_time={seconds}", f"-artifact_prefix={short_tmp}/crash-", "-print_final_stats=1"],
                       capture_output=True, text=True, timeout=int(seconds) + 120)
    crashes = list(short_tmp.glob("crash-*"))
    runs = [line for line in r.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    print(f"\nfuzz: {runs[-1] if runs else '?'} in {seconds} s, {len(list(corpus.iterdir()))} corpus entries")
    assert r.returncode == 0 and not crashes, (r.stderr[-3000:], [c.read_bytes()[:500] for c in crashes])


# --- the corpus of bad messages ------------------------------------------------------------------------


def _payload(send: object) -> bytes:
    if isinstance(send, str):
        return send.encode("utf-8", "surrogatepass")
    assert isinstance(send, dict)
    if "hex" in send:
        return bytes.fromhex(send["hex"])
    text: str = send.get("prefix", "") + send["repeat"] * send["times"] + send.get("suffix", "")  # JSON: Any
    return text.encode()


def test_bad_message_corpus_gets_the_right_answers_while_others_are_served(unlocked: Daemon) -> None:
    import json
    import socket

    cases = json.loads((Path(__file__).parent / "corpus" / "bad_messages.json").read_text())["cases"]
    good = SecretsClient(unlocked.socket)
    good.store("good/one", "ok")
    for case in cases:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(unlocked.socket))
        try:
            s.sendall(_payload(case["send"]) + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close an oversize sender before it finishes writing
        expect = case["expect"]
        if expect == "no reply":
            s.sendall(b'{"jsonrpc":"2.0","id":"after","method":"status"}\n')
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except ConnectionResetError:
            pass
        reply = json.loads(buf.split(b"\n")[0]) if buf.strip() else None
        name = case["name"]
        if expect == "closed":
            assert reply is not None and reply["error"]["code"] == -32600, name
            try:
                rest = s.recv(65536)
            except ConnectionResetError:
                rest = b""
            assert rest == b"", name
        elif expect == "no reply":
            assert reply is not None and reply["id"] == "after", name
        elif expect == "result":
            assert reply is not None and "result" in reply, (name, reply)
        elif isinstance(expect, list):
            assert isinstance(reply, list) and [r["error"]["code"] for r in reply] == expect, (name, reply)
        else:
            assert isinstance(reply, dict) and reply["error"]["code"] == expect, (name, reply)
            assert "Traceback" not in reply["error"]["message"]
        s.close()
        assert good.get("good/one") == "ok", f"the good client was not served after: {name}"
    assert len(cases) >= 60


# --- access ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_modes_loosened_while_running_are_restored(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    import stat
    import time

    config = short_tmp / "maint.toml"
    config.write_text("maintenance_interval = 0.3\n")
    d: Daemon = daemon_factory("--config", str(config), name="modes")
    c = SecretsClient(d.socket)
    c.init(PASSPHRASE)
    c.store("a", "v")
    secrets_dir = d.home / "secrets"
    record = next(secrets_dir.glob("*.rec"))
    secrets_dir.chmod(0o755)
    record.chmod(0o644)
    (secrets_dir / "wrapped-key").chmod(0o664)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        modes = [stat.S_IMODE(p.stat().st_mode) for p in (secrets_dir, record, secrets_dir / "wrapped-key")]
        if modes == [0o700, 0o600, 0o600]:
            break
        time.sleep(0.05)
    assert modes == [0o700, 0o600, 0o600]
    assert "loosened to mode 755 while running" in d.log_text()


@pytest.mark.slow
def test_failed_fsync_is_a_failed_write_never_a_false_success(short_tmp: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    require_real(cc is not None, "a C compiler for the fsync fault shim")
    assert cc is not None
    shim = short_tmp / "failing_fsync.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(Path(__file__).parent / "sandbox" / "failing_fsync.c"),
                    "-ldl"], check=True)
    flag = short_tmp / "disk-is-dying"
    d = Daemon(short_tmp / "fh", short_tmp / "f.sock", short_tmp / "f.log",
               env={"LD_PRELOAD": str(shim), "HOMEAGENT_FAIL_FSYNC_IF": str(flag)}).start()
    c = SecretsClient(d.socket)
    c.init(PASSPHRASE)
    c.store("k", "good")
    files_before = sorted(p.name for p in (d.home / "secrets").iterdir())
    flag.touch()
    for call in (lambda: c.store("k", "never-acknowledged"), lambda: c.rotate("k", "never-2"),
                 lambda: c.store("new/one", "never-3"), lambda: c.change_passphrase(PASSPHRASE, "x")):
        with pytest.raises(SecretsError) as info:
            call()
        assert info.value.code == -32006 and "I/O error" in info.value.message
        assert c.get("k") == "good"
        assert sorted(p.name for p in (d.home / "secrets").iterdir()) == files_before
    assert c.list() == ["k"]
    flag.unlink()
    assert c.rotate("k", "after") == 2 and c.get("k", previous=True) == "good"
    d.restart()
    c.unlock(PASSPHRASE)  # the failed passphrase change left the old passphrase in force
    assert c.get("k") == "after"
