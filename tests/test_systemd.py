"""systemd integration with the real tools: analyze, socket activation, notify,
credentials, and the sandbox the unit sets, applied where systemd is not PID 1."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from homeagent_secrets.client import SecretsClient

from .conftest import PASSPHRASE, TEST_SCRYPT_N, Daemon, require_real, require_tool, wait_for_socket

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
DAEMON = [sys.executable, "-m", "homeagent_secrets.daemon"]


def units_with_real_paths(dest: Path) -> Path:
    """The shipped units, with ExecStart pointing at this environment's commands
    (install.sh does the same rewrite for another --prefix)."""
    secretsd = shutil.which("secretsd") or str(Path(sys.executable).parent / "secretsd")
    require_real(os.path.exists(secretsd) and os.path.exists(Path(secretsd).with_name("secretsctl")),
                 "installed console scripts")
    dest.mkdir(parents=True, exist_ok=True)
    for unit in [*UNITS.glob("*.service"), *UNITS.glob("*.socket")]:
        text = unit.read_text().replace("/opt/homeagent-secrets/bin/", str(Path(secretsd).parent) + "/")
        (dest / unit.name).write_text(text)
    return dest


def unit_settings(name: str) -> dict[str, list[str]]:
    """KEY -> every value set in a shipped unit (comments skipped)."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


# --- the unit files -----------------------------------------------------------------------


def test_service_exposure_is_at_most_1_0() -> None:
    tool = require_tool("systemd-analyze")
    out = subprocess.run([tool, "security", "--offline=true", str(UNITS / "secretsd.service")],
                         capture_output=True, text=True)
    m = re.search(r"Overall exposure level for secretsd\.service: (\d+\.\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 1.0, out.stdout


def test_units_verify_clean(short_tmp: Path) -> None:
    tool = require_tool("systemd-analyze")
    system = units_with_real_paths(short_tmp / "units")
    user = short_tmp / "user-units"
    user.mkdir()
    for u in (UNITS / "user").iterdir():
        secretsd = shutil.which("secretsd") or str(Path(sys.executable).parent / "secretsd")
        (user / u.name).write_text(u.read_text().replace("%h/.local/bin/secretsd", secretsd))
    runtime = short_tmp / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    for flags, files in (([], [system / "secretsd.service", system / "secretsd.socket",
                               system / "secretsd-unlock.service"]),
                         (["--user"], [user / "secretsd.service", user / "secretsd.socket"])):
        out = subprocess.run([tool, "verify", "--man=no", *flags, *map(str, files)], capture_output=True, text=True,
                             env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
        report = out.stdout + out.stderr
        assert out.returncode == 0 and "secretsd" not in report, report


def test_socket_unit_matches_the_service() -> None:
    sock, svc = unit_settings("secretsd.socket"), unit_settings("secretsd.service")
    user = svc["User"][0]
    assert sock["SocketUser"] == [user] and sock["SocketGroup"] == svc["Group"] == [user]
    # 0660 for the dedicated group (only the service user, and the unlock unit, are in it).
    assert sock["SocketMode"] == ["0660"]
    assert sock["ListenStream"] == ["/run/homeagent/secretsd.sock"]
    assert "--socket /run/homeagent/secretsd.sock" in svc["ExecStart"][0]
    assert svc["Type"] == ["notify"]
    # The socket directory is the service user's from boot on (tmpfiles.d), not
    # made root:root by DirectoryMode= nor removed with the service.
    tmpfiles = (UNITS / "homeagent-secrets.tmpfiles").read_text()
    assert f"d /run/homeagent 0750 {user} {user} -" in tmpfiles
    assert "RuntimeDirectory" not in svc
    sysusers = (UNITS / "homeagent-secrets.sysusers").read_text()
    assert f"u {user} - " in sysusers and " /var/lib/homeagent " in sysusers


def test_the_service_pins_no_backend_and_keeps_protect_system_in_force() -> None:
    svc = unit_settings("secretsd.service")
    assert "--backend" not in svc["ExecStart"][0]  # the recorded choice rules
    assert "--home /var/lib/homeagent" in svc["ExecStart"][0] and svc["StateDirectory"] == ["homeagent"]
    # systemd 252: ExecPaths= re-mounts what it names writable, and ProtectProc=
    # and friends leave /run writable; tests/test_realsystemd.py probes both.
    assert svc["ProtectSystem"] == ["strict"] and "ExecPaths" not in svc
    assert svc["ReadOnlyPaths"] == ["/run"]
    assert set(svc["NoExecPaths"][0].split()) <= {"/var/lib/homeagent", "/tmp", "/var/tmp", "/dev/shm"}


def test_the_unlock_unit_follows_every_start_of_the_service() -> None:
    unlock, sock = unit_settings("secretsd-unlock.service"), unit_settings("secretsd.socket")
    assert unlock["PartOf"] == unlock["After"] == unlock["WantedBy"] == ["secretsd.service"]
    assert unlock["LoadCredentialEncrypted"] == ["secretsd-passphrase"]
    assert unlock["ExecStart"][0].endswith("unlock --credential secretsd-passphrase --ask-password")
    # The ask-password fallback needs root (systemd 252); the socket needs the group.
    assert unlock["User"] == ["root"] and unlock["CapabilityBoundingSet"] == [""]
    assert unlock["SupplementaryGroups"] == sock["SocketGroup"]
    assert unlock["ReadWritePaths"] == ["/run/systemd/ask-password"]


# --- socket activation --------------------------------------------------------------------


def test_socket_activation_answers_a_client_that_connected_first(short_tmp: Path) -> None:
    tool = require_tool("systemd-socket-activate")
    path = short_tmp / "act.sock"
    log = open(short_tmp / "act.log", "wb")
    proc = subprocess.Popen(
        [tool, "-l", str(path), *DAEMON, "--home", str(short_tmp / "h"), "--socket", str(short_tmp / "unused.sock"),
         "--scrypt-n", str(TEST_SCRYPT_N)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        # Connect and send before secretsd exists: systemd-socket-activate only
        # starts it on this first connection.
        while True:  # the file exists from bind(); listen() follows a moment later
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            try:
                s.connect(str(path))
                break
            except ConnectionRefusedError:
                s.close()
                assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                time.sleep(0.01)
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"status"}\n')
        reply = json.loads(s.makefile().readline())
        assert reply["result"]["backend"] == "file"
        s.close()
        with SecretsClient(path) as c:
            c.init(PASSPHRASE)
            c.store("activated", "yes")
            assert c.get("activated") == "yes"
        assert not (short_tmp / "unused.sock").exists()  # it used the passed socket
        assert "the socket passed by systemd" in (short_tmp / "act.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()


def test_inherited_socket_of_the_wrong_type_is_refused(short_tmp: Path) -> None:
    tool = require_tool("systemd-socket-activate")
    path = short_tmp / "dgram.sock"
    proc = subprocess.Popen([tool, "--datagram", "-l", str(path), *DAEMON, "--home", str(short_tmp / "h")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"x", str(path))  # wakes the daemon up
        out = proc.stdout.read().decode()  # type: ignore[union-attr]
        assert "not a Unix stream socket" in out
    finally:
        proc.kill()
        proc.wait()


# --- sd_notify ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("abstract", [False, True])
def test_notify_ready_status_watchdog_stopping(short_tmp: Path, abstract: bool) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"homeagent-test-{os.getpid()}-{time.monotonic_ns()}"
        listener.bind("\0" + name)
        env_addr = "@" + name
    else:
        listener.bind(str(short_tmp / "notify.sock"))
        env_addr = str(short_tmp / "notify.sock")
    listener.settimeout(10)
    d = Daemon(short_tmp / "nh", short_tmp / "n.sock", short_tmp / "n.log",
               env={"NOTIFY_SOCKET": env_addr, "WATCHDOG_USEC": "200000"})
    d.start()
    seen: list[str] = []

    def until(pred, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not any(pred(m) for m in seen):
            assert time.monotonic() < deadline, seen
            seen.extend(listener.recv(4096).decode().splitlines())

    until(lambda m: m == "READY=1")
    until(lambda m: m.startswith("STATUS=not initialized"))
    with SecretsClient(d.socket) as c:
        c.init(PASSPHRASE)
        until(lambda m: m.startswith("STATUS=unlocked (file backend), 0 secret"))
        c.store("a", "v")
        until(lambda m: m == "STATUS=unlocked (file backend), 1 secret(s)")
        c.lock()
        until(lambda m: m.startswith("STATUS=locked"))
    t0 = time.monotonic()
    pings = 0
    while pings < 3:
        if listener.recv(4096) == b"WATCHDOG=1":
            pings += 1
    assert time.monotonic() - t0 < 2  # every 0.1 s for WATCHDOG_USEC=0.2 s
    d.stop()
    until(lambda m: m == "STOPPING=1")
    listener.close()


def test_nothing_is_sent_without_notify_socket() -> None:
    from homeagent_secrets.daemon.sdnotify import Notifier

    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.notify("READY=1")  # no error, no socket
    assert n._sock is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None


# --- boot unlock from a sealed credential -----------------------------------------------------


@pytest.mark.slow
def test_boot_unlock_from_a_systemd_creds_sealed_credential(unlocked: Daemon, short_tmp: Path) -> None:
    tool = require_tool("systemd-creds")
    require_real(os.geteuid() == 0, "root (systemd-creds host key)")
    plain = short_tmp / "plain"
    plain.write_text(PASSPHRASE)
    sealed = short_tmp / "secretsd-passphrase.cred"
    subprocess.run([tool, "encrypt", "--with-key=host", "--name=secretsd-passphrase", str(plain), str(sealed)],
                   check=True, capture_output=True)
    plain.unlink()
    assert PASSPHRASE.encode() not in sealed.read_bytes()
    # What LoadCredentialEncrypted= does at unit start: decrypt into a private directory.
    creds = short_tmp / "credentials"
    creds.mkdir(mode=0o700)
    subprocess.run([tool, "decrypt", "--name=secretsd-passphrase", str(sealed), str(creds / "secretsd-passphrase")],
                   check=True, capture_output=True)
    os.chmod(creds / "secretsd-passphrase", 0o400)
    unlocked.ctl("lock")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    r = unlocked.ctl("unlock", "--credential", "secretsd-passphrase", "--ask-password", env=env)
    assert r.returncode == 0, r.stderr
    assert SecretsClient(unlocked.socket).status().locked is False
    os.chmod(creds / "secretsd-passphrase", 0o644)
    unlocked.ctl("lock")
    r = unlocked.ctl("unlock", "--credential", "secretsd-passphrase", env=env)
    assert r.returncode == 2 and "must not be readable by group or others" in r.stderr
    assert SecretsClient(unlocked.socket).status().locked is True
    # A credential missing from the credstore falls back to systemd-ask-password.
    (creds / "secretsd-passphrase").unlink()
    r = unlocked.ctl("unlock", "--credential", "secretsd-passphrase", env=env)
    assert r.returncode == 2 and "--ask-password" in r.stderr


# --- the sandbox and process hardening ----------------------------------------------------------


def _syscall_group(tool: str, group: str, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    out = subprocess.run([tool, "syscall-filter", group], capture_output=True, text=True, check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                names |= _syscall_group(tool, item, seen)
        else:
            names.add(item)
    return names


def unit_syscall_allow_list(tool: str) -> set[str]:
    """The syscalls secretsd.service allows, from its own SystemCallFilter= lines."""
    allowed: set[str] = set()
    for line in (UNITS / "secretsd.service").read_text().splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        spec = line.split("=", 1)[1]
        deny = spec.startswith("~")
        items: set[str] = set()
        for item in spec.lstrip("~").split():
            items |= _syscall_group(tool, item) if item.startswith("@") else {item}
        allowed = allowed - items if deny else allowed | items
    return allowed


@pytest.fixture(scope="module")
def seccomp_exec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    analyze = require_tool("systemd-analyze")
    cc = require_tool("gcc")
    out = tmp_path_factory.mktemp("seccomp")
    exe = out / "seccomp_exec"
    built = subprocess.run([cc, "-O2", "-o", str(exe), str(ROOT / "tests/sandbox/seccomp_exec.c"), "-lseccomp"],
                           capture_output=True, text=True)
    require_real(built.returncode == 0, f"libseccomp-dev to build the sandbox helper ({built.stderr[-200:]})")
    allow = out / "allow.txt"
    names = unit_syscall_allow_list(analyze)
    assert "mount" not in names and "sched_setaffinity" not in names and "read" in names
    allow.write_text("\n".join(sorted(names)) + "\n")
    return exe, allow


def test_sandbox_helper_really_filters(seccomp_exec: tuple[Path, Path]) -> None:
    exe, allow = seccomp_exec
    probe = ("import mmap, os\n"
             "try:\n mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC); print('wx-allowed')\n"
             "except PermissionError: print('wx-denied')\n"
             "try:\n os.sched_setaffinity(0, os.sched_getaffinity(0)); print('rl-allowed')\n"
             "except PermissionError: print('rl-denied')\n")  # sched_setaffinity: in ~@resources
    out = subprocess.run([str(exe), str(allow), "--", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["wx-denied", "rl-denied"], out.stdout + out.stderr
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert plain.stdout.split() == ["wx-allowed", "rl-allowed"]


@pytest.mark.slow
def test_daemon_runs_under_the_units_seccomp_and_w_x_policy(
    seccomp_exec: tuple[Path, Path], short_tmp: Path
) -> None:
    exe, allow = seccomp_exec
    sock = short_tmp / "sb.sock"
    log = open(short_tmp / "sb.log", "wb")
    # Default scrypt cost: 128 MiB of scrypt memory inside the sandbox.
    proc = subprocess.Popen([str(exe), str(allow), "--", *DAEMON, "--home", str(short_tmp / "sbh"),
                             "--socket", str(sock), "--log-level", "DEBUG"], stdout=log, stderr=log)
    try:
        wait_for_socket(sock, proc, timeout=30)
        with SecretsClient(sock, timeout=60) as c:
            c.init(PASSPHRASE)
            c.store("sandboxed", "value", kind="device")
            c.rotate("sandboxed", "value2")
            assert c.get("sandboxed") == "value2" and c.list() == ["sandboxed"]
            c.lock()
            c.unlock(PASSPHRASE)
            assert c.get("sandboxed", previous=True) == "value"
            assert c.status().memory_locked  # mlock is inside @system-service
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (short_tmp / "sb.log").read_text()
    assert "Traceback" not in text and "Operation not permitted" not in text, text


_PRELOAD = ["anyio._backends._asyncio", "anyio.to_thread", "anyio.abc", "asyncio.unix_events",
            "homeagent_secrets.daemon.main", "ctypes.util", "json", "tomllib", "concurrent.futures.thread"]


def test_daemon_is_not_ptraceable_and_hides_its_environ_from_its_own_user(
    throwaway_user: tuple[int, int], short_tmp: Path
) -> None:
    """Same uid, no privileges: PR_SET_DUMPABLE=0 must stop ptrace and /proc reads.

    The daemon runs in a forked child switched to the throwaway user (that user
    cannot exec the interpreter under /root). A uid change makes a process
    non-dumpable by itself, so the child first sets itself dumpable again, as a
    process the user started would be; only secretsd's own hardening may clear it.
    """
    import importlib

    for mod in _PRELOAD:
        importlib.import_module(mod)
    from homeagent_secrets.daemon.hardening import PR_SET_DUMPABLE, _libc
    from homeagent_secrets.daemon.main import main as secretsd_main

    uid, gid = throwaway_user
    short_tmp.chmod(0o711)
    home = short_tmp / "uhome"
    home.mkdir()
    os.chown(home, uid, gid)
    sock = home / "s.sock"
    log_fd = os.open(short_tmp / "u.log", os.O_WRONLY | os.O_CREAT, 0o600)

    def become_user(dumpable: bool) -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if dumpable:
            _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)

    daemon_pid = os.fork()
    if daemon_pid == 0:
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            become_user(dumpable=True)
            os.environ["HOMEAGENT_TEST_CANARY"] = "environ-canary-1d3"
            os._exit(secretsd_main(["--home", str(home), "--socket", str(sock),
                                    "--scrypt-n", str(TEST_SCRYPT_N)]))
        finally:
            os._exit(70)
    sleeper_pid = os.fork()
    if sleeper_pid == 0:  # control: an ordinary process of the same user
        become_user(dumpable=True)
        time.sleep(30)
        os._exit(0)
    try:
        wait_for_socket(sock, timeout=20)

        def attack(target: int) -> bytes:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                become_user(dumpable=True)
                libc = ctypes.CDLL(None, use_errno=True)
                libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
                rc = libc.ptrace(16, target, None, None)  # PTRACE_ATTACH
                res = ["ptrace-ok" if rc == 0 else f"ptrace-{os.strerror(ctypes.get_errno())}"]
                if rc == 0:
                    os.waitpid(target, 0)
                    libc.ptrace(17, target, None, None)  # PTRACE_DETACH
                try:
                    with open(f"/proc/{target}/environ", "rb") as f:
                        f.read()
                    res.append("environ-ok")
                except PermissionError:
                    res.append("environ-denied")
                os.write(w, " ".join(res).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                out = f.read()
            os.waitpid(pid, 0)
            return out

        assert attack(sleeper_pid) == b"ptrace-ok environ-ok"  # the attack works on ordinary processes
        assert attack(daemon_pid) == b"ptrace-Operation not permitted environ-denied"
        with SecretsClient(sock) as c:  # and the daemon still serves its user
            assert c.status().initialized is False
    finally:
        for pid in (daemon_pid, sleeper_pid):
            try:
                os.kill(pid, signal.SIGTERM if pid == daemon_pid else signal.SIGKILL)
                os.waitpid(pid, 0)
            except ProcessLookupError:
                pass
        os.close(log_fd)
    assert "Traceback" not in (short_tmp / "u.log").read_text()


def test_core_dumps_are_off_and_the_key_is_mlocked(unlocked: Daemon) -> None:
    limits = Path(f"/proc/{unlocked.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    # The data key's pages are pinned (RLIMIT_MEMLOCK allows a few pages, root or not).
    assert SecretsClient(unlocked.socket).status().memory_locked is True
    status = Path(f"/proc/{unlocked.pid}/status").read_text()
    locked_kb = int(next(line for line in status.splitlines() if line.startswith("VmLck:")).split()[1])
    assert locked_kb > 0
    SecretsClient(unlocked.socket).lock()
    assert SecretsClient(unlocked.socket).status().memory_locked is False



@pytest.mark.parametrize(("env", "set_by_us"), [
    ({}, True),
    ({"MALLOC_ARENA_MAX": "8"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.arena_max=1"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_test=4"}, True),
])
def test_two_malloc_arenas_unless_the_operator_chose_a_number(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], set_by_us: bool
) -> None:
    """An operator's arena count wins, in either spelling glibc reads it: the old
    MALLOC_ARENA_MAX or the GLIBC_TUNABLES entry (mallopt after start would undo it)."""
    from homeagent_secrets.daemon import hardening

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(hardening, "_libc", Libc())
    for name in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    hardening.bound_heap()
    assert calls == ([(hardening.M_ARENA_MAX, 2)] if set_by_us else [])

@pytest.mark.slow
def test_auto_lock_after_idle_and_after_max_unlocked(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory("--lock-after", "0.6", name="idle")
    with SecretsClient(d.socket) as c:
        c.init(PASSPHRASE)
        assert not c.status().locked
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if "auto-lock: idle too long" in d.log_text():
                break
        assert c.status().locked
    d2: Daemon = daemon_factory("--max-unlocked", "0.8", name="max")
    with SecretsClient(d2.socket) as c:
        c.init(PASSPHRASE)
        deadline = time.monotonic() + 10
        while not c.status().locked and time.monotonic() < deadline:
            time.sleep(0.1)  # busy all along: only the max-unlocked limit can lock it
        assert c.status().locked
        assert "auto-lock: unlocked too long" in d2.log_text()
