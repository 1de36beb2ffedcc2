"""``secretsctl run``: start a command with secrets in its environment, and act
when one of them changes.

    secretsctl run [--env VAR=NAME]... [--env-file FILE] [--on-change ACTION]
                   [--grace SECONDS] [--no-inherit-env] -- CMD ARGS...

The rules (README, "secretsctl run"):

- Values go into CMD's environment only: never on a command line, never in
  secretsctl's own output (which names variables and secrets, nothing else).
  secretsctl's own environment is not changed.
- The watch is opened before the values are read, so no change between the
  read and the start is missed. Events for a name at the version already
  given to CMD change nothing.
- ``--on-change restart`` (default): read every value again, then SIGTERM the
  command, SIGKILL it after ``--grace`` seconds (default 10), and start it
  again with the new values. ``signal:SIG`` sends SIG (for programs that
  re-read their secrets themselves). ``exit``: stop the command as for a
  restart and exit with ``EXIT_CHANGED`` (75), for a supervisor to start
  everything again. ``ignore``: no watch at all.
- When a changed secret cannot be read (deleted, locked, denied), the command
  keeps running with what it has and a warning names the secret.
- A dropped watch is reopened (backoff to 5 s); then every value is compared
  again, as after an ``overflow`` (events may have been missed).
- Signals sent to ``secretsctl run`` by a process (kill, systemd) reach CMD:
  HUP INT QUIT TERM USR1 USR2 WINCH are forwarded. One the kernel sent to the
  terminal's process group (Ctrl-C, Ctrl-\\, hang-up, resize) already reached
  CMD, which shares that group, and is not sent twice. Ctrl-Z stops both.
  A terminating signal (HUP INT QUIT TERM) that arrives during a restart means
  no new command is started.
- Exit code: CMD's own; 128+N when CMD was killed by signal N; 127 when CMD
  is not found, 126 when it cannot be executed; before CMD starts,
  secretsctl's own codes (3 locked, 4 a secret not found, 5 agent unreachable).

Why one module of ~500 lines: argument rules, the supervised child, signal
forwarding and the watch loop are one state machine around one process.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from homeagent_secrets.protocol.errors import InvalidParams, NotFoundError, SecretsError
from homeagent_secrets.protocol.messages import SecretResult
from homeagent_secrets.protocol.names import check_name
from homeagent_secrets.protocol.rpc import ClientProtocol

from .cache import BACKOFF_FIRST, BACKOFF_MAX, open_watch
from .events import WatchEvent, event_of
from .sync import SecretsClient

#: ``--on-change exit``: a watched secret changed and CMD was stopped.
EXIT_CHANGED: Final = 75
EXIT_CANNOT_EXECUTE: Final = 126
EXIT_COMMAND_NOT_FOUND: Final = 127
DEFAULT_GRACE: Final = 10.0
#: Signals passed on to CMD (unless the kernel sent them to the whole group).
FORWARDED: Final = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                    signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
_TERMINATING: Final = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM})
_SI_KERNEL: Final = 0x80
_VAR: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class RunUsageError(InvalidParams):
    """A bad ``run`` option (secretsctl exits 2)."""


@dataclass(frozen=True)
class OnChange:
    action: str  # restart | signal | exit | ignore
    signal: int = 0


def parse_on_change(text: str) -> OnChange:
    """``restart``, ``exit``, ``ignore`` or ``signal:SIG`` (``HUP``, ``SIGHUP`` or a number)."""
    if text in ("restart", "exit", "ignore"):
        return OnChange(text)
    kind, _, sig = text.partition(":")
    if kind == "signal" and sig:
        try:
            num = int(sig) if sig.isdigit() else int(signal.Signals[sig if sig.startswith("SIG") else "SIG" + sig])
            signal.Signals(num)
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(f"unknown signal {sig!r}") from None
        return OnChange("signal", num)
    raise argparse.ArgumentTypeError("use restart, signal:SIG (e.g. signal:HUP), exit or ignore")


def _pair(text: str, where: str) -> tuple[str, str]:
    var, sep, name = text.partition("=")
    var, name = var.strip(), name.strip()
    if not sep or not _VAR.match(var):
        raise RunUsageError(f"{where}: expected VAR=NAME with VAR a variable name (letters, digits, _)")
    try:
        check_name(name)
    except InvalidParams as exc:
        raise RunUsageError(f"{where}: {exc.message}") from None
    return var, name


def env_mapping(pairs: list[str], env_file: str | None) -> dict[str, str]:
    """VAR -> secret name from ``--env-file`` (lines ``VAR=NAME``, ``#`` comments) and ``--env``."""
    mapping: dict[str, str] = {}
    entries: list[tuple[str, str]] = []
    if env_file is not None:
        try:
            with open(env_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise RunUsageError(f"cannot read the env file {env_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise RunUsageError(f"the env file {env_file} is not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(_pair(line, f"{env_file} line {number}"))
    entries += [_pair(p, f"--env {p.partition('=')[0]}") for p in pairs]
    for var, name in entries:
        if var in mapping:
            raise RunUsageError(f"the variable {var} is given twice")
        mapping[var] = name
    if not mapping:
        raise RunUsageError("give at least one --env VAR=NAME or an --env-file")
    return mapping


HELP: Final = "run a command with secrets in its environment; restart it when they change"
RULES: Final = (
    "CMD is started with each --env VAR=NAME (or --env-file line) set to the secret NAME, and\n"
    "the rest of secretsctl's environment unless --no-inherit-env. Values never appear on a\n"
    "command line or in secretsctl's output. When one of the secrets changes: restart stops\n"
    "CMD (SIGTERM, then SIGKILL after --grace) and starts it with the new values; signal:SIG\n"
    f"sends SIG; exit stops CMD and exits {EXIT_CHANGED}; ignore does nothing. Signals sent to\n"
    "secretsctl run (HUP INT QUIT TERM USR1 USR2 WINCH) are passed to CMD. The exit status is\n"
    "CMD's own (128+N when a signal N ended it; 127 not found, 126 not executable).\n"
    "Prefer the client library or systemd credentials: environment variables leak into\n"
    "child processes, crash reports and /proc/PID/environ of the same user."
)


def run_arguments(sp: argparse.ArgumentParser | Any) -> None:
    """``run``'s arguments, on the parser secretsctl made for it."""
    sp.add_argument("--env", action="append", default=[], metavar="VAR=NAME",
                    help="set VAR to the secret NAME (repeatable)")
    sp.add_argument("--env-file", metavar="FILE", help="lines VAR=NAME (# comments)")
    sp.add_argument("--on-change", type=parse_on_change, default=OnChange("restart"),
                    metavar="restart|signal:SIG|exit|ignore",
                    help=f"when a secret changes (default restart; exit exits {EXIT_CHANGED})")
    sp.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                    help="after SIGTERM, wait this long before SIGKILL (default 10)")
    sp.add_argument("--no-inherit-env", action="store_true",
                    help="give CMD only the secrets' variables, not secretsctl's environment")
    sp.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                    help="the command to run, after --")


def cmd_run(client: SecretsClient, args: argparse.Namespace) -> int:
    """``secretsctl run``: returns the exit code to pass on."""
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise RunUsageError("give the command to run after --")
    if args.grace < 0:
        raise RunUsageError("--grace is a number of seconds (0 or more)")
    mapping = env_mapping(args.env, args.env_file)
    return Runner(client, mapping, command, args.on_change, args.grace, not args.no_inherit_env).run()


def _say(message: str) -> None:
    print(f"secretsctl run: {message}", file=sys.stderr, flush=True)


class _Signals:
    """Signals to ``run``, taken synchronously (with who sent them) by a helper thread
    and handed to the main loop through a pipe. The signals must be blocked in
    every thread first (``pthread_sigmask`` before any thread starts)."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self._stop = False
        self._thread = threading.Thread(target=self._take, name="run-signals", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        while not self._stop:
            info = signal.sigtimedwait(self.signals, 0.2)
            if info is not None:
                kernel = 1 if info.si_code == _SI_KERNEL else 0
                os.write(self.w, bytes((info.si_signo, kernel)))

    def read(self) -> list[tuple[int, bool]]:
        try:
            data = os.read(self.r, 4096)
        except BlockingIOError:
            return []
        return [(data[i], bool(data[i + 1])) for i in range(0, len(data) - 1, 2)]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        os.close(self.r)
        os.close(self.w)


@dataclass
class _Watch:
    """The watch of the run's names: a non-blocking socket read by the main loop."""

    client: SecretsClient
    names: list[str]
    sock: socket.socket | None = None
    proto: ClientProtocol = field(default_factory=ClientProtocol)
    retry_at: float = 0.0
    backoff: float = BACKOFF_FIRST

    def open_now(self) -> None:
        """Open it or raise why not (at start-up: nothing runs yet)."""
        self.sock, self.proto = open_watch(self.client.socket_path, self.names,
                                           self.client.connect_timeout, self.client.timeout)
        self.sock.setblocking(False)

    def open(self) -> bool:
        """Reopen it, or say why not and when it is tried again."""
        try:
            self.open_now()
        except SecretsError as exc:
            self.sock = None
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            _say(f"cannot watch the secrets ({exc.message}); trying again in {self.backoff:g} s")
            return False
        self.backoff = BACKOFF_FIRST
        return True

    def events(self) -> list[WatchEvent] | None:
        """What is waiting; None when the watch ended (it is then closed)."""
        out: list[WatchEvent] = []
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.close()
                self.retry_at = time.monotonic()
                return None
            try:
                self.proto.receive_data(data)
            except SecretsError:
                self.close()
                return None
        notes, self.proto.notifications = self.proto.notifications, []
        for note in notes:
            event = event_of(note)
            if event is not None:
                out.append(event)
        return out

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Runner:
    """One ``secretsctl run``: the child, its secrets, the watch, the signals."""

    def __init__(self, client: SecretsClient, mapping: dict[str, str], command: list[str],
                 on_change: OnChange, grace: float, inherit: bool) -> None:
        self.client = client
        self.mapping = mapping
        self.names = sorted(set(mapping.values()))
        self.command = command
        self.on_change = on_change
        self.grace = grace
        self.inherit = inherit
        self.versions: dict[str, int] = {}
        self.pid = 0
        self.pidfd = -1
        self.pending_env: dict[str, str] | None = None  # a restart's new environment
        self.kill_at: float | None = None  # SIGKILL then, if the child still runs
        self.stop_signal = 0  # a terminating signal came during a restart
        self.exit_after_stop = False
        self.recheck = False

    # --- secrets ---------------------------------------------------------------------

    def _read(self) -> dict[str, SecretResult]:
        results = self.client.retrieve_many(self.names)
        missing = [n for n, r in results.items() if r is None]
        if missing:
            raise NotFoundError(f"no secret named {', '.join(repr(n) for n in missing)}; "
                                "`secretsctl ls` lists the names")
        return {n: r for n, r in results.items() if r is not None}

    def _environment(self, results: dict[str, SecretResult]) -> dict[str, str]:
        env = dict(os.environ) if self.inherit else {}
        for var, name in self.mapping.items():
            value = results[name].value.reveal()
            if "\0" in value:
                raise RunUsageError(f"the secret {name!r} (for {var}) holds a NUL character, "
                                    "which an environment variable cannot")
            env[var] = value
        return env

    # --- the child -----------------------------------------------------------------------

    def _spawn(self, env: dict[str, str]) -> int | None:
        """Start the command; an exit code when it cannot be started."""
        try:
            # An empty signal mask for the child: ours blocks the forwarded signals.
            self.pid = os.posix_spawnp(self.command[0], self.command, env, setsigmask=())
        except FileNotFoundError:
            _say(f"command not found: {self.command[0]}")
            return EXIT_COMMAND_NOT_FOUND
        except OSError as exc:
            _say(f"cannot execute {self.command[0]}: {exc.strerror}")
            return EXIT_CANNOT_EXECUTE
        self.pidfd = os.pidfd_open(self.pid)
        return None

    def _signal_child(self, sig: int) -> None:
        if self.pid:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def _stop_child(self) -> None:
        """SIGTERM now, SIGKILL after the grace period (the main loop keeps time)."""
        self._signal_child(signal.SIGTERM)
        self.kill_at = time.monotonic() + self.grace

    def _reap(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.pid, self.pidfd, self.kill_at = 0, -1, None
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    # --- changes ---------------------------------------------------------------------------

    def _check(self, why: str) -> None:
        """Read every value again and act if any version moved."""
        if self.exit_after_stop:
            return
        if self.pending_env is not None:
            self.recheck = True  # once the new command runs: it may have missed this one
            return
        try:
            found = self.client.retrieve_many(self.names)
        except SecretsError as exc:
            _say(f"{why}, but the secrets cannot be read ({exc.message}): the command keeps what it has")
            return
        missing = [n for n, r in found.items() if r is None]
        if missing:
            for n in missing:  # whatever is stored there next is a change, even at version 1
                self.versions[n] = 0
            _say(f"{why}, but {', '.join(missing)} no longer exists: the command keeps what it has")
            return
        results = {n: r for n, r in found.items() if r is not None}
        moved = sorted(n for n, r in results.items() if r.version != self.versions.get(n))
        if not moved:
            return
        what = ", ".join(f"{n} (version {results[n].version})" for n in moved)
        action = self.on_change
        if action.action == "signal":
            _say(f"{what} changed: sending {signal.Signals(action.signal).name} to pid {self.pid}")
            self.versions = {n: r.version for n, r in results.items()}
            self._signal_child(action.signal)
        elif action.action == "exit":
            _say(f"{what} changed: stopping pid {self.pid} and exiting {EXIT_CHANGED}")
            self.exit_after_stop = True
            self._stop_child()
        elif action.action == "restart":
            try:
                env = self._environment(results)
            except SecretsError as exc:
                _say(f"{what} changed, but {exc.message}: the command keeps what it has")
                return
            _say(f"{what} changed: restarting (stopping pid {self.pid})")
            self.versions = {n: r.version for n, r in results.items()}
            self.pending_env = env
            self._stop_child()

    def _on_events(self, events: list[WatchEvent]) -> None:
        for ev in events:
            if ev.kind == "overflow":
                self._check("events were lost (overflow)")
            elif ev.kind == "changed" and ev.name in self.versions and (
                    ev.change == "deleted" or ev.version != self.versions[ev.name]):
                self._check(f"{ev.name} was {ev.change}")

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        signals = _Signals(FORWARDED)
        watch = _Watch(self.client, self.names) if self.on_change.action != "ignore" else None
        try:
            if watch is not None:
                watch.open_now()
            results = self._read()
            env = self._environment(results)
            self.versions = {n: r.version for n, r in results.items()}
            failed = self._spawn(env)
            if failed is not None:
                return failed
            return self._loop(signals, watch)
        finally:
            if self.pid:  # only on an error of our own: never leave the command behind
                self._signal_child(signal.SIGKILL)
                self._reap()
            if watch is not None:
                watch.close()
            signals.close()
            while signal.sigtimedwait(FORWARDED, 0) is not None:
                pass  # taken here, not delivered to Python's handlers when unblocked
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)

    def _loop(self, signals: _Signals, watch: _Watch | None) -> int:
        poller = select.poll()
        poller.register(signals.r, select.POLLIN)
        poller.register(self.pidfd, select.POLLIN)
        watched = -1
        while True:
            if (watch is not None and watch.sock is None and time.monotonic() >= watch.retry_at
                    and watch.open()):
                self._check("the watch was reopened")
            if watch is not None and watch.sock is not None and watched != watch.sock.fileno():
                if watched >= 0:
                    poller.unregister(watched)
                watched = watch.sock.fileno()
                poller.register(watched, select.POLLIN)
            timeout = self._timeout(watch)
            ready = {fd for fd, _ in poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))}
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                _say(f"pid {self.pid} did not stop within {self.grace:g} s: SIGKILL")
                self._signal_child(signal.SIGKILL)
                self.kill_at = None
            if signals.r in ready:
                for sig, by_kernel in signals.read():
                    if self.pending_env is not None and sig in _TERMINATING:
                        self.stop_signal = sig
                    if not by_kernel:
                        self._signal_child(sig)
            if watched >= 0 and watched in ready and watch is not None:
                events = watch.events()
                if events is None:
                    poller.unregister(watched)
                    watched = -1
                    _say("the watch's connection closed: reopening it")
                else:
                    self._on_events(events)
            if self.pidfd in ready:
                poller.unregister(self.pidfd)
                code = self._reap()
                if self.exit_after_stop:
                    return EXIT_CHANGED
                env, self.pending_env = self.pending_env, None
                if env is None:
                    return code  # it ended by itself: its code is ours
                if self.stop_signal:
                    return 128 + self.stop_signal
                failed = self._spawn(env)
                if failed is not None:
                    return failed
                _say(f"restarted as pid {self.pid}")
                poller.register(self.pidfd, select.POLLIN)
                if self.recheck:
                    self.recheck = False
                    self._check("a secret changed during the restart")

    def _timeout(self, watch: _Watch | None) -> float | None:
        deadlines = []
        if self.kill_at is not None:
            deadlines.append(self.kill_at)
        if watch is not None and watch.sock is None:
            deadlines.append(watch.retry_at)
        return None if not deadlines else min(deadlines) - time.monotonic()

