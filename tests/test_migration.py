"""``migrate`` under load, on real backends: no write is acknowledged and then lost.

Writer threads store new names and rotate existing ones as fast as they can
while the agent migrates between the encrypted files and a real GNOME Keyring
or a real OpenBao server; every acknowledged write must be the current value
after the migration (and after a restart), and a write refused during it says
so (-32006, "migration in progress"). Then the same with a SIGKILL in the
middle of the copy, and after the switch, and a re-run.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from homeagent_secrets.client import (
    AgentUnreachableError,
    BackendUnavailableError,
    MigrationInProgressError,
    NotFoundError,
    SecretsClient,
)

from .baoserver import DevServer, token_file
from .conftest import PASSPHRASE, Daemon


@dataclass
class Writers:
    """Threads writing their own names; the model of what was acknowledged."""

    socket: Path
    threads: int = 3
    names: int = 12
    acked: dict[str, str] = field(default_factory=dict)
    maybe: dict[str, str] = field(default_factory=dict)  # cut by a kill: applied or not
    refused: int = 0
    writes: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self, t: int) -> None:
        n = 0
        with SecretsClient(self.socket, timeout=30) as c:
            while not self.stop.is_set():
                name = f"w{t}/n{n % self.names}"
                value = f"{name}#{n}"
                n += 1
                try:
                    if name in self.acked and n % 2:
                        c.rotate(name, value)
                    else:
                        c.store(name, value)
                except MigrationInProgressError:
                    with self._lock:
                        self.refused += 1
                    self.stop.wait(0.01)  # as a client should: retry a little later
                    continue
                except AgentUnreachableError:
                    with self._lock:
                        self.maybe[name] = value  # the daemon died under this write
                    return
                except (BackendUnavailableError, NotFoundError) as exc:
                    with self._lock:
                        self.errors.append(exc.message)
                    continue
                with self._lock:
                    self.acked[name] = value
                    self.writes += 1

    def start(self) -> Writers:
        self._workers = [threading.Thread(target=self._run, args=(t,)) for t in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for w in self._workers:
            w.join(60)
        assert not any(w.is_alive() for w in self._workers)

    def check(self, c: SecretsClient) -> int:
        """Every acknowledged write is there (a write cut by a kill: either value)."""
        for name, value in self.acked.items():
            got = c.get(name)
            assert got == value or (name in self.maybe and got == self.maybe[name]), (name, got, value)
        return len(self.acked)


def fill(c: SecretsClient, n: int = 60) -> dict[str, str]:
    want = {}
    for i in range(n):
        c.store(f"base/{i}", f"b{i}-1", kind="provider")
        if i % 3 == 0:
            c.rotate(f"base/{i}", f"b{i}-2")
        want[f"base/{i}"] = f"b{i}-2" if i % 3 == 0 else f"b{i}-1"
    return want


def check_base(c: SecretsClient, want: dict[str, str]) -> None:
    for name, value in want.items():
        assert c.get(name) == value, name
    assert c.get("base/0", previous=True) == "b0-1"


def migrate_under_load(d: Daemon, to: str, pw: Path | None, rounds: int = 2) -> Writers:
    """Run the writers while ``migrate --to`` runs; return them (stopped)."""
    writers = Writers(d.socket).start()
    try:
        import time

        time.sleep(0.3)  # the writers are under way before the migration starts
        args = ["migrate", "--to", to] + (["--passphrase-file", str(pw)] if pw else [])
        r = d.ctl(*args, timeout=300)
        assert r.returncode == 0, r.stderr
        time.sleep(0.3)  # and go on after it, against the new backend
    finally:
        writers.join()
    assert writers.errors == []
    return writers


@pytest.fixture
def pw(short_tmp: Path) -> Path:
    path = short_tmp / "pw"
    path.write_text(PASSPHRASE)
    return path


@pytest.mark.slow
def test_writes_during_migrate_to_keychain_are_kept_or_refused(
    short_tmp: Path, keyring_env: dict[str, str], pw: Path
) -> None:
    """Issue 10, case 2 on a real GNOME Keyring (and case 1: --to keychain again is refused)."""
    d = Daemon(short_tmp / "h", short_tmp / "s.sock", short_tmp / "d.log", ["--backend", "auto"]).start()
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "keychain"
        c.migrate("file", PASSPHRASE)  # start from the file store: more to copy, a longer window
        want = fill(c)
    writers = migrate_under_load(d, "keychain", None)
    assert writers.refused > 0 and writers.writes > 0  # both happened: writes before, during, after
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "keychain"
        check_base(c, want)
        writers.check(c)
        again = d.ctl("migrate", "--to", "keychain", "--from", "keychain")
        assert again.returncode == 2 and "already uses the keychain backend" in again.stderr
    d.stop()
    d.args = ["--backend", "auto"]
    d.start()
    with SecretsClient(d.socket) as c:
        check_base(c, want)
        assert writers.check(c) > 0
    # and back to the files, under load again
    writers2 = migrate_under_load(d, "file", pw)
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "file"
        check_base(c, want)
        writers2.check(c)


@pytest.mark.slow
def test_writes_during_migrate_to_openbao_are_kept_or_refused(
    short_tmp: Path, bao_dev: DevServer, pw: Path
) -> None:
    """Issue 10, case 2 on a real OpenBao server."""
    config = short_tmp / "secretsd.toml"
    config.write_text(f'openbao_address = ["{bao_dev.address}"]\n'
                      f'openbao_token_file = "{token_file(short_tmp)}"\nopenbao_prefix = "load/"\n')
    d = Daemon(short_tmp / "h", short_tmp / "s.sock", short_tmp / "d.log",
               ["--backend", "file", "--config", str(config)]).start()
    with SecretsClient(d.socket) as c:
        c.init(PASSPHRASE)
        want = fill(c)
    writers = migrate_under_load(d, "openbao", None)
    assert writers.refused > 0 and writers.writes > 0
    d.stop()
    d.args = ["--backend", "auto", "--config", str(config)]
    d.start()
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "openbao"
        check_base(c, want)
        writers.check(c)
    assert list((d.home / "secrets").glob("*.rec")) == []  # the originals are gone, the copies not


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["migrate-copied-one:20", "migrate-after-switch"])
def test_a_kill_during_migrate_under_load_loses_nothing(
    short_tmp: Path, keyring_env: dict[str, str], pw: Path, crash_at: str
) -> None:
    """SIGKILL in the middle of the copy, or right after the switch, with writers running."""
    d = Daemon(short_tmp / "h", short_tmp / "s.sock", short_tmp / "d.log", ["--backend", "file"]).start()
    with SecretsClient(d.socket) as c:
        c.init(PASSPHRASE)
        want = fill(c)
    d.stop()
    d.env["HOMEAGENT_CRASH_AT"] = crash_at
    d.start()
    SecretsClient(d.socket).unlock(PASSPHRASE)
    writers = Writers(d.socket).start()
    try:
        import time

        time.sleep(0.3)
        r = d.ctl("migrate", "--to", "keychain", timeout=300)
        assert r.returncode == 5  # the daemon died under the call
        assert d.proc is not None and d.proc.wait(10) == -signal.SIGKILL
    finally:
        writers.join()
    del d.env["HOMEAGENT_CRASH_AT"]
    d.args = ["--backend", "auto"]
    d.start()
    switched = crash_at == "migrate-after-switch"
    with SecretsClient(d.socket) as c:
        st = c.status()
        assert st.backend == ("keychain" if switched else "file")
        if not switched:
            c.unlock(PASSPHRASE)
        else:
            assert st.migration is not None and "migrate --to keychain" in st.migration
        check_base(c, want)
        writers.check(c)
    r = d.ctl("migrate", "--to", "keychain", "--passphrase-file", str(pw), timeout=300)
    assert r.returncode == 0, r.stderr
    assert list((d.home / "secrets").glob("*.rec")) == []
    with SecretsClient(d.socket) as c:
        st = c.status()
        assert st.backend == "keychain" and st.migration is None
        check_base(c, want)
        writers.check(c)
