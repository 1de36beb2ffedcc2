"""The keychain backend against a real GNOME Keyring: visibility to the OS's
tools, locking, crash-ordered writes, auto-detection, the recorded choice, and
migration both ways with a kill in the middle."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.daemon.backends.keychain import INDEX, STATE_PREFIX, KeychainBackend
from homeagent_secrets.daemon.backends.keychain_store import SecretServiceStore, Store
from homeagent_secrets.protocol.errors import (
    BackendUnavailableError,
    LockedError,
    NotSupportedError,
)
from homeagent_secrets.protocol.names import Kind
from homeagent_secrets.protocol.secret import Secret

from .conftest import PASSPHRASE, Daemon, require_tool

pytestmark = pytest.mark.anyio


def secret_tool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("secret-tool"), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def keychain_daemon(short_tmp: Path, env: dict[str, str], *args: str, name: str = "kd") -> Daemon:
    return Daemon(short_tmp / f"{name}-home", short_tmp / f"{name}.sock", short_tmp / f"{name}.log",
                  list(args), env={k: v for k, v in env.items() if k != "HOMEAGENT_HOME"})


# --- the entries the OS's tools see -------------------------------------------------------------


async def test_entries_are_plain_values_visible_to_secret_tool(keyring_env: dict[str, str]) -> None:
    b = KeychainBackend(SecretServiceStore)
    await b.open()
    await b.store("llm/openai", Secret("sk-visible-123"), "llm")
    await b.rotate("llm/openai", Secret("sk-visible-456"))
    r = secret_tool(keyring_env, "lookup", "service", "homeagent", "username", "llm/openai")
    assert r.stdout == "sk-visible-456"
    import keyring.backends.SecretService

    assert keyring.backends.SecretService.Keyring().get_password("homeagent", "llm/openai") == "sk-visible-456"
    # An entry made with the OS's tool is adopted at the next start.
    subprocess.run([require_tool("secret-tool"), "store", "--label=x", "service", "homeagent",
                    "username", "device/lock"], input="from-seahorse", text=True, env=keyring_env, check=True)
    b2 = KeychainBackend(SecretServiceStore)
    await b2.open()
    assert await b2.list("") == ["device/lock", "llm/openai"]
    got = await b2.retrieve("device/lock")
    assert got is not None and got.value == Secret("from-seahorse")
    await b.close()
    await b2.close()


async def test_reserved_accounts_never_collide_with_valid_names() -> None:
    from homeagent_secrets.protocol.names import name_problem

    for reserved in (INDEX, STATE_PREFIX + "a", "#probe"):
        assert name_problem(reserved) is not None


async def test_locked_collection_is_minus_32001_with_a_hint(keyring_env: dict[str, str]) -> None:
    b = KeychainBackend(SecretServiceStore)
    await b.open()
    await b.store("a", Secret("v"), None)
    store = SecretServiceStore()
    store.collection.lock()
    with pytest.raises(LockedError, match="unlock your login keyring"):
        await b.retrieve("a")
    await b.probe()
    assert b.locked
    store.close()
    await b.close()


async def test_passphrase_methods_are_not_supported(keyring_env: dict[str, str]) -> None:
    b = KeychainBackend(SecretServiceStore)
    for call in (b.init(Secret("x")), b.unlock(Secret("x")), b.change_passphrase(Secret("a"), Secret("b"))):
        with pytest.raises(NotSupportedError, match="OS keychain handles unlocking"):
            await call


async def test_no_keychain_is_minus_32006(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus")
    b = KeychainBackend(SecretServiceStore)
    await b.open()  # logs, does not raise: the daemon must start and say why later
    with pytest.raises(BackendUnavailableError, match="keyring daemon"):
        await b.list("")


# --- failing each step in turn --------------------------------------------------------------


class FailingStore(Store):
    """The real Secret Service store, with its N-th write failing (a crash there)."""

    def __init__(self, fail_at: int) -> None:
        self.inner = SecretServiceStore()
        self.enumerable = True
        self.writes = 0
        self.fail_at = fail_at

    def _step(self) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError("injected failure between two keychain writes")

    def get(self, account: str) -> str | None:
        return self.inner.get(account)

    def set(self, account: str, value: str) -> None:
        self._step()
        self.inner.set(account, value)

    def delete(self, account: str) -> bool:
        self._step()
        return self.inner.delete(account)

    def accounts(self) -> AbstractSet[str]:
        return self.inner.accounts()

    def close(self) -> None:
        self.inner.close()


def _wipe(store: SecretServiceStore) -> None:
    for item in store.collection.search_items({"service": "homeagent"}):
        item.delete()
    store._paths.clear()


@pytest.mark.slow
async def test_a_failure_at_any_step_loses_nothing_and_list_is_right_after_restart(
    keyring_env: dict[str, str],
) -> None:
    ops = [("store", "a", "a1"), ("store", "b", "b1"), ("rotate", "a", "a2"), ("store", "a", "a3"),
           ("delete", "b", None), ("store", "c", "c1"), ("rotate", "c", "c2")]
    cleaner = SecretServiceStore()
    checked = 0
    for fail_at in range(1, 30):
        _wipe(cleaner)
        store = FailingStore(fail_at)
        b = KeychainBackend(lambda s=store: s)  # type: ignore[misc]
        await b.open()
        model: dict[str, tuple[str, str | None]] = {}  # acknowledged: name -> (current, previous)
        in_flight = None
        for op, name, value in ops:
            try:
                if op == "delete":
                    await b.delete(name)
                    model.pop(name, None)
                else:
                    await (b.store(name, Secret(value), None) if op == "store"  # type: ignore[arg-type]
                           else b.rotate(name, Secret(value)))  # type: ignore[arg-type]
                    old = model.get(name)
                    model[name] = (value, old[0] if old else None)  # type: ignore[assignment]
            except BackendUnavailableError:
                in_flight = (op, name, value)
                break
        if in_flight is None:
            break  # every write succeeded: all steps have been failed once
        checked += 1
        restarted = KeychainBackend(SecretServiceStore)
        await restarted.open()
        names = await restarted.list("")
        for name in names:  # list is right: every listed name has its value
            assert await restarted.retrieve(name) is not None, (fail_at, name)
        op, name, value = in_flight
        for other, (cur, prev) in model.items():
            got = await restarted.retrieve(other)
            if other != name:
                assert got is not None and got.value == Secret(cur), (fail_at, other)
                continue
            # the interrupted change is either not applied or fully applied
            if op == "delete":
                assert got is None or got.value == Secret(cur), fail_at
            elif got is not None and got.value == Secret(cur):
                p = await restarted.retrieve(other, previous=True)
                assert (p.value if p else None) == (Secret(prev) if prev else None), fail_at
            else:
                assert got is not None and got.value == Secret(value), fail_at  # type: ignore[arg-type]
                p = await restarted.retrieve(other, previous=True)
                assert p is not None and p.value == Secret(cur), fail_at
        if op != "delete" and name not in model:
            got = await restarted.retrieve(name)
            assert got is None or got.value == Secret(value), fail_at  # type: ignore[arg-type]
            assert (name in names) == (got is not None)
        await restarted.close()
        await b.close()
    assert checked >= 15  # every write of the sequence was failed in turn
    cleaner.close()


# --- the daemon: auto-detection, the recorded choice, migration ------------------------------------


@pytest.mark.slow
def test_auto_picks_keychain_with_a_keyring_and_file_without(short_tmp: Path, keyring_env: dict[str, str]) -> None:
    d = keychain_daemon(short_tmp, keyring_env, "--backend", "auto").start()
    st = SecretsClient(d.socket).status()
    assert (st.backend, st.initialized, st.locked) == ("keychain", True, False)
    assert "backend keychain: the OS keychain answered a probe" in d.log_text()
    assert (d.home / "backend").read_text() == "keychain\n"
    r = d.ctl("unlock", input="x\n")
    assert r.returncode == 1 and "OS keychain handles unlocking" in r.stderr
    d.stop()
    no_bus = {k: v for k, v in keyring_env.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    f = Daemon(short_tmp / "f-home", short_tmp / "f.sock", short_tmp / "f.log", ["--backend", "auto"],
               env=no_bus)
    f.env["DBUS_SESSION_BUS_ADDRESS"] = ""
    f.start()
    assert SecretsClient(f.socket).status().backend == "file"
    assert "no usable OS keychain" in f.log_text()
    f.stop()


@pytest.mark.slow
def test_recorded_choice_survives_a_start_without_dbus(short_tmp: Path, keyring_env: dict[str, str]) -> None:
    d = keychain_daemon(short_tmp, keyring_env, "--backend", "auto").start()
    with SecretsClient(d.socket) as c:
        c.store("hue/token", "t1")
    d.stop()
    d.env["DBUS_SESSION_BUS_ADDRESS"] = "unix:path=/nonexistent/bus"  # D-Bus not up yet at boot
    d.start()
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "keychain"  # not silently an empty file store
        r = d.ctl("get", "hue/token")
        assert r.returncode == 1 and "keyring daemon" in r.stderr
    d.stop()
    rival = subprocess.run([*Daemon.command(d.home, d.socket), "--backend", "file"], capture_output=True,
                           text=True, env={**os.environ, **keyring_env}, timeout=30)
    assert rival.returncode == 2 and "secretsctl migrate --to file" in rival.stderr
    d.env["DBUS_SESSION_BUS_ADDRESS"] = keyring_env["DBUS_SESSION_BUS_ADDRESS"]
    d.start()
    assert d.ctl("get", "hue/token").stdout == "t1\n"


def _fill(c: SecretsClient) -> dict[str, tuple[str, str | None, str]]:
    want: dict[str, tuple[str, str | None, str]] = {}
    kinds: tuple[Kind, ...] = ("provider", "llm", "device")
    for i in range(6):
        name, kind = f"m/{i}", kinds[i % 3]
        c.store(name, f"v{i}-1", kind=kind)
        prev = None
        if i % 2:
            c.rotate(name, f"v{i}-2")
            prev = f"v{i}-1"
        want[name] = (f"v{i}-2" if i % 2 else f"v{i}-1", prev, kind)
    return want


def _check(c: SecretsClient, want: dict[str, tuple[str, str | None, str]]) -> None:
    assert c.list("m/") == sorted(want)
    for name, (cur, prev, kind) in want.items():
        assert c.get(name) == cur
        assert c.get(name, previous=True) == prev
        info = c.describe(name)
        assert info is not None and info.kind == kind and info.has_previous == (prev is not None)


@pytest.mark.slow
def test_migrate_keychain_to_file_killed_midway_then_rerun(short_tmp: Path, keyring_env: dict[str, str]) -> None:
    pw = short_tmp / "pw"
    pw.write_text(PASSPHRASE)
    d = keychain_daemon(short_tmp, keyring_env, "--backend", "keychain").start()
    with SecretsClient(d.socket) as c:
        want = _fill(c)
    d.stop()
    d.env["HOMEAGENT_CRASH_AT"] = "migrate-copied-one"
    d.start()
    r = d.ctl("migrate", "--to", "file", "--passphrase-file", str(pw))
    assert r.returncode == 5  # the daemon died mid-call
    assert d.proc.wait(10) == -signal.SIGKILL  # type: ignore[union-attr]
    del d.env["HOMEAGENT_CRASH_AT"]
    d.start()
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "keychain"  # not switched: the keychain is still the truth
        _check(c, want)
    r = d.ctl("migrate", "--to", "file", "--passphrase-file", str(pw))
    assert r.returncode == 0, r.stderr
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "file"
        _check(c, want)
    assert secret_tool(keyring_env, "search", "--all", "service", "homeagent").stdout.count("username = m/") == 0
    d.stop()
    assert subprocess.run(
        [*Daemon.command(d.home, d.socket), "--backend", "keychain"], capture_output=True, text=True,
        env={**os.environ, **keyring_env}, timeout=30).returncode == 2  # the record now says file
    d.args = ["--backend", "auto"]
    d.start()
    with SecretsClient(d.socket) as c:
        c.unlock(PASSPHRASE)
        _check(c, want)


@pytest.mark.slow
def test_migrate_file_to_keychain_killed_after_switch_then_rerun(short_tmp: Path, keyring_env: dict[str, str]) -> None:
    pw = short_tmp / "pw"
    pw.write_text(PASSPHRASE)
    d = keychain_daemon(short_tmp, keyring_env, "--backend", "file").start()
    with SecretsClient(d.socket) as c:
        c.init(PASSPHRASE)
        want = _fill(c)
    d.stop()
    d.env["HOMEAGENT_CRASH_AT"] = "migrate-after-switch"
    d.start()
    SecretsClient(d.socket).unlock(PASSPHRASE)
    assert d.ctl("migrate", "--to", "keychain").returncode == 5
    del d.env["HOMEAGENT_CRASH_AT"]
    d.args = ["--backend", "auto"]  # --backend file would now be refused: the record says keychain
    d.start()
    with SecretsClient(d.socket) as c:
        assert c.status().backend == "keychain"  # switched, originals not yet removed
        _check(c, want)
    assert len(list((d.home / "secrets").glob("*.rec"))) == len(want)
    r = d.ctl("migrate", "--to", "keychain", "--passphrase-file", str(pw))
    assert r.returncode == 0, r.stderr
    assert f"{len(want)} original(s) removed" in r.stderr
    assert list((d.home / "secrets").glob("*.rec")) == []
    with SecretsClient(d.socket) as c:
        _check(c, want)
    assert secret_tool(keyring_env, "lookup", "service", "homeagent", "username", "m/1").stdout == "v1-2"
