"""Shared fixtures: a real secretsd subprocess, short socket paths, real-component gates."""

from __future__ import annotations

import grp
import os
import pwd
import secrets as _secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

REQUIRE_REAL = os.environ.get("HOMEAGENT_REQUIRE_REAL") == "1"
TEST_SCRYPT_N = 1024  # the rest of the suite runs scrypt cheaply; one test pins the defaults
# Every process the tests start inherits this mark, so the end of the run can
# find any that a test failed to stop (and fail the run for it).
RUN_MARK = "HOMEAGENT_TEST_RUN"
os.environ.setdefault(RUN_MARK, f"{os.getpid()}-{time.time_ns()}")


def require_real(available: bool, what: str) -> None:
    """Skip when a real component is missing, or fail under HOMEAGENT_REQUIRE_REAL=1."""
    if available:
        return
    if REQUIRE_REAL:
        pytest.fail(f"HOMEAGENT_REQUIRE_REAL=1 but {what} is not available")
    pytest.skip(f"{what} is not available")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require_real(path is not None, f"the {name} tool")
    assert path is not None
    return path


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: AF_UNIX paths are limited to 108 bytes."""
    d = tempfile.mkdtemp(prefix="ha-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    """Poll until something accepts on ``path`` (readiness, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"secretsd exited with {proc.returncode} before listening")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    raise TimeoutError(f"nothing listened on {path} within {timeout} s")


@dataclass
class Daemon:
    """A running secretsd subprocess on a temporary home.

    Every started daemon is registered; the autouse ``_stop_daemons`` fixture
    stops whatever is still running when its test ends, pass or fail.
    """

    live: ClassVar[dict[int, Daemon]] = {}  # by id(): subclasses may be unhashable dataclasses

    home: Path
    socket: Path
    log: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def command(home: Path, sock: Path) -> list[str]:
        return [sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(home),
                "--socket", str(sock), "--scrypt-n", str(TEST_SCRYPT_N), "--log-level", "DEBUG"]

    def start(self) -> Daemon:
        cmd = [*self.command(self.home, self.socket), *self.args]
        if "--backend" not in self.args:  # deterministic even where a desktop keyring runs
            cmd += ["--backend", "file"]
        env = {**os.environ, **self.env}
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=self._logf, env=env)
        Daemon.live[id(self)] = self
        wait_for_socket(self.socket, self.proc)
        return self

    def kill(self) -> None:
        """Stop it at once (teardown): SIGKILL, reap, close the log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if getattr(self, "_logf", None) is not None and not self._logf.closed:
            self._logf.close()
        Daemon.live.pop(id(self), None)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._logf.close()
        Daemon.live.pop(id(self), None)
        return rc

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def ctl(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run secretsctl as a subprocess against this daemon."""
        return subprocess.run(
            [sys.executable, "-m", "homeagent_secrets.client.cli", "--socket", str(self.socket), *args],
            input=input if input is not None else "", capture_output=True, text=True,
            env={**os.environ, **(env or {})}, timeout=timeout,
        )


@pytest.fixture
def daemon_factory(short_tmp: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def make(*args: str, env: dict[str, str] | None = None, name: str = "d") -> Daemon:
        home = short_tmp / f"{name}-home"
        d = Daemon(home, short_tmp / f"{name}.sock", short_tmp / f"{name}.log", list(args), env or {})
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.kill()


@pytest.fixture(autouse=True)
def _stop_daemons() -> Iterator[None]:
    """Stop every daemon a test started, however it made it, pass or fail."""
    yield
    for d in list(Daemon.live.values()):
        d.kill()


def _leftovers() -> list[str]:
    """Processes still running that carry this run's mark (started by a test)."""
    mark = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone, or not ours to read
        if cmd:
            found.append(f"pid {entry}: {cmd[:160]}")
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any process a test started is still running (and stop it)."""
    left = _leftovers()
    if not left:
        return
    for line in left:
        try:
            os.kill(int(line.split()[1].rstrip(":")), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    print("\nprocesses started by the tests were still running at the end (now killed):\n  "
          + "\n  ".join(left), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def daemon(daemon_factory) -> Daemon:  # type: ignore[no-untyped-def]
    """A fresh, not yet initialized secretsd on the file backend."""
    return daemon_factory()  # type: ignore[no-any-return]


PASSPHRASE = "correct horse battery staple"


def audit_settled(sock: Path) -> None:
    """One round trip on a new connection (as this process). The agent writes the
    access-log lines of each event-loop turn at its end, so when this answer is
    here, the lines of every call answered before it are in the file."""
    from homeagent_secrets.client import SecretsClient

    with SecretsClient(sock) as c:
        c.status()


@pytest.fixture
def unlocked(daemon: Daemon) -> Daemon:
    """A secretsd initialized with PASSPHRASE (and so unlocked)."""
    from homeagent_secrets.client import SecretsClient

    with SecretsClient(daemon.socket) as c:
        c.init(PASSPHRASE)
    return daemon


@pytest.fixture
def throwaway_user() -> Iterator[tuple[int, int]]:
    """(uid, gid) of a fresh system user, removed afterwards (needs root)."""
    require_real(os.geteuid() == 0 and shutil.which("useradd") is not None, "a second uid (root + useradd)")
    name = f"hatest{_secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        yield pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def run_as(uid: int, gid: int, fn, timeout: float = 10.0,  # type: ignore[no-untyped-def]
           groups: list[int] | None = None) -> bytes:
    """Run ``fn() -> bytes`` in a forked child with another uid; return what it produced.

    Forked, not exec'ed: the test interpreter lives under /root, which other
    users cannot enter (CI's Python does too).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the other user, no exec needed
        os.close(r)
        try:
            os.setgroups(groups or [])
            os.setgid(gid)
            os.setuid(uid)
            out = fn()
        except BaseException as exc:  # report, never return into pytest
            out = f"EXC {type(exc).__name__}: {exc}".encode()
        os.write(w, out)
        os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        chunks.append(f.read())
    os.waitpid(pid, 0)
    return b"".join(chunks)


@pytest.fixture(scope="session")
def bao_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real OpenBao dev server for the session (tests use their own prefixes)."""
    from .baoserver import ROOT_TOKEN, dev_server

    with dev_server(tmp_path_factory.mktemp("bao")) as server:
        server.root_token = ROOT_TOKEN  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def keyring_env(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A real GNOME Keyring on a private session bus, for this test only."""
    from .keyringd import gnome_keyring

    with gnome_keyring(short_tmp) as env:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", env["DBUS_SESSION_BUS_ADDRESS"])
        yield env


# --- throwaway uids -------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Crowd:
    group: str
    gid: int
    hue: User  # in the group, with a rule
    other: User  # in the group, without a rule
    outsider: User  # not in the group


@pytest.fixture
def crowd() -> Iterator[Crowd]:
    """A group and three fresh system users, removed afterwards (needs root)."""
    require_real(os.geteuid() == 0 and shutil.which("useradd") is not None,
                 "throwaway uids (root + useradd)")
    tag = _secrets.token_hex(3)
    group = f"hagw{tag}"
    names = [f"hahue{tag}", f"haoth{tag}", f"haout{tag}"]
    subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
    try:
        for i, name in enumerate(names):
            extra = ["-G", group] if i < 2 else []
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            *extra, name], check=True, capture_output=True)
        users = [User(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid) for n in names]
        yield Crowd(group, grp.getgrnam(group).gr_gid, *users)
    finally:
        for name in names:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
