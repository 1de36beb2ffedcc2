"""``secretsctl run`` and ``secretsctl watch`` as real processes against a real secretsd,
with a real child command: its environment, restarts, signals and exit codes."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.client.run import EXIT_CHANGED

from .conftest import PASSPHRASE, Daemon

ROOT = Path(__file__).parents[1]
VALUE = "VALUE-3f9a-never-in-argv"

#: The child: says who it is and what TOK holds, reports the signals it gets.
CHILD = """
import os, signal, sys, time
mode = sys.argv[1] if len(sys.argv) > 1 else ""
def on(sig, frame):
    print("got", signal.Signals(sig).name, flush=True)
    if sig == signal.SIGTERM and mode == "exit7-on-term":
        sys.exit(7)
for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, on)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode == "exit7-on-term":
    signal.signal(signal.SIGTERM, on)
print("start", os.getpid(), os.environ.get("TOK"), flush=True)
if mode.startswith("exit="):
    sys.exit(int(mode[5:]))
if mode == "kill-self":
    os.kill(os.getpid(), signal.SIGKILL)
while True:
    time.sleep(1)
"""


class Proc:
    """A process whose stdout lines arrive on a queue (reads never block the test)."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self.children: list[int] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))

    def _pump_err(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.err.append(line)

    def line(self, timeout: float = 10) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s; stderr: {''.join(self.err)}") from None

    def started(self) -> tuple[int, str]:
        """The pid and TOK of the next child start."""
        words = self.line().split(" ", 2)
        assert words[0] == "start", words
        self.children.append(int(words[1]))
        return int(words[1]), words[2]

    def wait(self, timeout: float = 15) -> int:
        rc = self.p.wait(timeout)
        time.sleep(0.05)  # let the pumps take the last lines
        return rc

    def stop(self) -> None:
        """As a supervisor stops it: SIGTERM (passed on to the command), SIGKILL if it lingers.
        (A SIGKILLed run cannot pass anything on: its command would outlive it.)"""
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def secretsctl(d: Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "homeagent_secrets.client.cli", "--socket", str(d.socket), *args]


def run(procs: list[Proc], d: Daemon, *opts: str, mode: str = "", command: list[str] | None = None) -> Proc:
    command = command or [sys.executable, "-c", CHILD, *([mode] if mode else [])]
    p = Proc(secretsctl(d, "run", *opts, "--", *command))
    procs.append(p)
    return p


@pytest.fixture
def agent(unlocked: Daemon) -> Iterator[tuple[Daemon, SecretsClient]]:
    with SecretsClient(unlocked.socket) as c:
        c.store("app/token", VALUE)
        yield unlocked, c


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.02)


@pytest.mark.slow
def test_the_secret_is_in_the_environment_and_nowhere_else(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, _ = agent
    p = run(procs, d, "--env", "TOK=app/token")
    pid, tok = p.started()
    assert tok == VALUE
    for who in (pid, p.p.pid):
        with open(f"/proc/{who}/cmdline", "rb") as f:
            assert VALUE.encode() not in f.read()
    with open(f"/proc/{p.p.pid}/environ", "rb") as f:
        assert VALUE.encode() not in f.read()  # secretsctl's own environment is untouched
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM  # the child died of the forwarded SIGTERM
    assert VALUE not in "".join(p.err)


@pytest.mark.slow
def test_a_rotate_restarts_the_command_with_the_new_value(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = run(procs, d, "--env", "TOK=app/token")
    first, tok = p.started()
    assert tok == VALUE
    c.rotate("app/token", "NEW-VALUE")
    second, tok = p.started()
    assert tok == "NEW-VALUE" and second != first
    wait_gone(first)
    c.store("unrelated", "x")  # changes nothing for this command
    c.rotate("app/token", "THIRD")
    third, tok = p.started()
    assert tok == "THIRD" and third != second
    p.p.send_signal(signal.SIGTERM)
    p.wait()
    assert not any(v in "".join(p.err) for v in ("NEW-VALUE", "THIRD", VALUE))
    assert "app/token (version 2) changed: restarting" in "".join(p.err)


@pytest.mark.slow
def test_a_command_that_ignores_sigterm_is_killed_after_the_grace_period(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = run(procs, d, "--env", "TOK=app/token", "--grace", "0.5", mode="ignore-term")
    first, _ = p.started()
    t0 = time.monotonic()
    c.rotate("app/token", "NEW")
    _, tok = p.started()
    assert tok == "NEW" and 0.4 < time.monotonic() - t0 < 5
    wait_gone(first)
    assert "did not stop within 0.5 s: SIGKILL" in "".join(p.err)


@pytest.mark.slow
def test_signals_sent_to_run_reach_the_command(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, _ = agent
    p = run(procs, d, "--env", "TOK=app/token", mode="exit7-on-term")
    pid, _ = p.started()
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        p.p.send_signal(sig)
        assert p.line() == f"got {sig.name}"
        assert alive(pid) and p.p.poll() is None
    p.p.send_signal(signal.SIGTERM)
    assert p.line() == "got SIGTERM"
    assert p.wait() == 7  # the command's own exit code


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "code"), [("exit=0", 0), ("exit=42", 42), ("kill-self", 128 + 9)])
def test_the_commands_exit_code_is_passed_through(agent, procs, mode: str, code: int) -> None:  # type: ignore[no-untyped-def]
    d, _ = agent
    p = run(procs, d, "--env", "TOK=app/token", mode=mode)
    p.started()
    assert p.wait() == code


@pytest.mark.slow
def test_on_change_signal_signals_the_running_command(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = run(procs, d, "--env", "TOK=app/token", "--on-change", "signal:USR1")
    pid, _ = p.started()
    c.rotate("app/token", "NEW")
    assert p.line() == "got SIGUSR1"
    c.rotate("app/token", "NEWER")
    assert p.line() == "got SIGUSR1"
    assert alive(pid)
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM


@pytest.mark.slow
def test_on_change_exit_stops_the_command_and_exits_75(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = run(procs, d, "--env", "TOK=app/token", "--on-change", "exit")
    pid, _ = p.started()
    c.rotate("app/token", "NEW")
    assert p.wait() == EXIT_CHANGED == 75
    wait_gone(pid)


@pytest.mark.slow
def test_on_change_ignore_does_not_watch(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = run(procs, d, "--env", "TOK=app/token", "--on-change", "ignore")
    pid, _ = p.started()
    c.rotate("app/token", "NEW")
    time.sleep(0.5)
    assert alive(pid) and p.lines.empty()
    p.p.send_signal(signal.SIGINT)  # sent by a process: forwarded; Python dies of it
    assert p.wait() == 128 + signal.SIGINT


@pytest.mark.slow
def test_a_deleted_secret_keeps_the_command_and_a_new_one_restarts_it(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = run(procs, d, "--env", "TOK=app/token")
    pid, _ = p.started()
    c.delete("app/token")
    deadline = time.monotonic() + 10
    while "no longer exists" not in "".join(p.err):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert alive(pid)
    c.store("app/token", "REBORN")  # version 1 again: still a change
    _, tok = p.started()
    assert tok == "REBORN"


@pytest.mark.slow
def test_run_follows_the_agent_through_its_restart(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, _ = agent
    p = run(procs, d, "--env", "TOK=app/token")
    pid, _ = p.started()
    d.restart()
    assert alive(pid)
    with SecretsClient(d.socket) as c2:
        c2.unlock(PASSPHRASE)
        c2.rotate("app/token", "AFTER-RESTART")
    _, tok = p.started()
    assert tok == "AFTER-RESTART"
    assert "reopening" in "".join(p.err)


@pytest.mark.slow
def test_env_file_and_no_inherit_env(agent, procs, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    c.store("db/password", "pw with spaces")
    env_file = short_tmp / "secrets.env"
    env_file.write_text("# the gateway's secrets\nTOK = app/token\n\nDB_PASSWORD=db/password\n")
    p = run(procs, d, "--env-file", str(env_file), "--no-inherit-env", command=["env"])
    assert p.wait() == 0
    got = sorted(p.lines.get() for _ in range(p.lines.qsize()))
    assert got == ["DB_PASSWORD=pw with spaces", f"TOK={VALUE}"]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "message"), [
    (["--env", "TOK=no/such"], 4, "no secret named 'no/such'"),
    (["--env", "1TOK=app/token"], 2, "expected VAR=NAME"),
    (["--env", "TOK=../x"], 2, "invalid name"),
    (["--env", "TOK=app/token", "--env", "TOK=app/token"], 2, "given twice"),
    (["--on-change", "signal:NOPE", "--env", "TOK=app/token"], 2, "unknown signal"),
])
def test_refusals_before_anything_starts(agent, procs, args: list[str], code: int, message: str) -> None:  # type: ignore[no-untyped-def]
    d, _ = agent
    p = run(procs, d, *args)
    assert p.wait() == code
    assert message in "".join(p.err) and p.lines.empty()


@pytest.mark.slow
def test_a_missing_command_is_127_and_a_locked_agent_3(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = run(procs, d, "--env", "TOK=app/token", command=["/nonexistent/cmd"])
    assert p.wait() == 127
    c.lock()
    p = run(procs, d, "--env", "TOK=app/token")
    assert p.wait() == 3 and p.lines.empty()


# --- secretsctl watch ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("as_json", [False, True])
def test_watch_prints_one_line_per_event_never_a_value(agent, procs, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = Proc(secretsctl(d, "watch", "app/**", *(["--json"] if as_json else [])))
    procs.append(p)
    deadline = time.monotonic() + 10
    while p.lines.empty():  # the watch is open once a change shows
        assert time.monotonic() < deadline and p.p.poll() is None, "".join(p.err)
        c.rotate("app/token", "warm-up")
        time.sleep(0.05)
    while not p.lines.empty():
        p.lines.get()
    time.sleep(0.2)
    while not p.lines.empty():
        p.lines.get()
    version = c.rotate("app/token", "SECRET-1")
    c.store("other/x", "SECRET-2")  # not matched
    c.store("app/new", "SECRET-3")
    c.delete("app/new")
    c.lock()
    c.unlock(PASSPHRASE)
    lines = [p.line() for _ in range(5)]
    if as_json:
        import json

        assert [json.loads(x) for x in lines] == [
            {"event": "rotated", "name": "app/token", "version": version},
            {"event": "stored", "name": "app/new", "version": 1},
            {"event": "deleted", "name": "app/new", "version": 1},
            {"event": "locked"}, {"event": "unlocked"}]
    else:
        assert lines == [f"rotated app/token {version}", "stored app/new 1", "deleted app/new 1",
                         "locked", "unlocked"]
    assert "SECRET" not in "".join(lines)
    p.p.send_signal(signal.SIGINT)
    assert p.wait() == 0


@pytest.mark.slow
def test_watch_exits_5_when_the_agent_goes_away(agent, procs) -> None:  # type: ignore[no-untyped-def]
    d, c = agent
    p = Proc(secretsctl(d, "watch"))
    procs.append(p)
    deadline = time.monotonic() + 10
    while p.lines.empty():
        assert time.monotonic() < deadline
        c.rotate("app/token", "x")
        time.sleep(0.05)
    d.stop()
    assert p.wait() == 5
    assert "connection closed" in "".join(p.err)
