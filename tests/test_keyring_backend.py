"""The keyring backend against a real secretsd: keyring's own backend suite, the
(service, username) -> name mapping, viability by priority, and keyring's CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from keyring import errors
from keyring.testing.backend import BackendBasicTests

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.client.keyring_backend import (
    SecretsdKeyring,
    decode_part,
    encode_part,
    name_for,
    parse_name,
)
from homeagent_secrets.protocol.names import MAX_NAME_LENGTH, name_problem

from .conftest import PASSPHRASE, Daemon

BACKEND = "homeagent_secrets.client.keyring_backend.SecretsdKeyring"


class TestKeyringSuite(BackendBasicTests):
    """keyring.testing.backend.BackendBasicTests, unchanged, against a real agent."""

    # Named to sort before the suite's own autouse ``_init_properties`` (pytest
    # sets a class's autouse fixtures up in name order), so the agent is up
    # before the backend is made and still up when the suite cleans up.
    @pytest.fixture(autouse=True)
    def _agent(self, unlocked: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOMEAGENT_SECRETS_SOCKET", str(unlocked.socket))

    def init_keyring(self) -> SecretsdKeyring:
        return SecretsdKeyring()


# --- the mapping ------------------------------------------------------------------------

any_text = st.text(st.characters(codec="utf-8"), max_size=40)


@given(any_text, any_text)
def test_every_pair_maps_to_a_valid_name_and_back(service: str, username: str) -> None:
    name = name_for(service, username)
    if len(name) <= MAX_NAME_LENGTH:
        assert name_problem(name) is None
    assert parse_name(name) == (service, username)


@given(any_text, any_text, any_text, any_text)
def test_distinct_pairs_get_distinct_names(s1: str, u1: str, s2: str, u2: str) -> None:
    if (s1, u1) != (s2, u2):
        assert name_for(s1, u1) != name_for(s2, u2)


def test_the_documented_examples() -> None:
    assert name_for("pypi.org", "alice") == "keyring/-pypi_2Eorg/-alice"
    assert name_for("", "") == "keyring/-/-"
    assert name_for("..", "a b") == "keyring/-_2E_2E/-a_20b"
    assert name_for("é", "_") == "keyring/-_C3_A9/-_5F"
    # only the canonical spelling decodes: one name per pair
    assert decode_part("-_c3_a9") is None and decode_part("_41") is None and decode_part("-_41") is None
    assert parse_name("llm/openai") is None and parse_name("keyring/-a/-b/-c") is None
    assert encode_part("A-z") == "-A-z"


def test_a_pair_too_long_for_a_name_is_refused_clearly(unlocked: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMEAGENT_SECRETS_SOCKET", str(unlocked.socket))
    kr = SecretsdKeyring()
    service, user = "ж" * 30, "user"  # 60 bytes: 180 characters escaped
    kr.set_password(service, user, "fits")
    assert kr.get_password(service, user) == "fits"
    long_service = "ж" * 50
    with pytest.raises(errors.PasswordSetError, match="over the 256 a name may have"):
        kr.set_password(long_service, user, "x")
    assert kr.get_password(long_service, user) is None
    with pytest.raises(errors.PasswordDeleteError):
        kr.delete_password(long_service, user)


def test_keyring_names_live_beside_the_agents_own(unlocked: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMEAGENT_SECRETS_SOCKET", str(unlocked.socket))
    SecretsdKeyring().set_password("pypi.org", "alice", "pw")
    with SecretsClient(unlocked.socket) as c:
        assert c.list("keyring/") == ["keyring/-pypi_2Eorg/-alice"]
        assert c.get("keyring/-pypi_2Eorg/-alice") == "pw"
        c.lock()
    with pytest.raises(errors.KeyringLocked):
        SecretsdKeyring().get_password("pypi.org", "alice")


# --- keyring itself choosing the backend, in fresh processes ------------------------------


def keyring_env(tmp: Path, socket_path: Path | str, **extra: str) -> dict[str, str]:
    """An environment where keyring sees no desktop keyring and no config file."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DBUS_SESSION_BUS_ADDRESS", "PYTHON_KEYRING_BACKEND", "KEYRING_PROPERTY_SOCKET")}
    env.update(HOMEAGENT_SECRETS_SOCKET=str(socket_path), XDG_CONFIG_HOME=str(tmp / "config"),
               XDG_DATA_HOME=str(tmp / "data"), **extra)
    return env


def py(code: str, env: dict[str, str], input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          input=input, timeout=60)


@pytest.fixture
def kr_tmp(short_tmp: Path) -> Path:
    return short_tmp


def test_keyring_picks_the_agent_by_priority_and_reads_through_it(unlocked: Daemon, kr_tmp: Path) -> None:
    with SecretsClient(unlocked.socket) as c:
        c.store(name_for("my service", "bob"), "hunter2")
    out = py("import keyring; print(type(keyring.get_keyring()).__name__); "
             "print(keyring.get_password('my service', 'bob'))", keyring_env(kr_tmp, unlocked.socket))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SecretsdKeyring", "hunter2"]


def test_by_name_through_python_keyring_backend(unlocked: Daemon, kr_tmp: Path) -> None:
    env = keyring_env(kr_tmp, unlocked.socket, PYTHON_KEYRING_BACKEND=BACKEND)
    out = py("import keyring; keyring.set_password('svc', 'u', 'pw'); print(keyring.get_password('svc', 'u'))", env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pw"


@pytest.mark.slow
@pytest.mark.parametrize("state", ["locked", "uninitialized", "absent"])
def test_not_viable_unless_an_unlocked_agent_answers(daemon: Daemon, kr_tmp: Path, state: str) -> None:
    sock: Path | str = daemon.socket
    if state == "locked":
        with SecretsClient(daemon.socket) as c:
            c.init(PASSPHRASE)
            c.lock()
    elif state == "absent":
        sock = kr_tmp / "nothing-here.sock"
    code = ("import time, keyring.backend as b\n"
            f"from {BACKEND.rsplit('.', 1)[0]} import SecretsdKeyring as K\n"
            "t = time.monotonic()\n"
            "try:\n    K.priority\nexcept RuntimeError as e:\n    print('RuntimeError:', e)\n"
            "print(round(time.monotonic() - t, 2), K.viable, any(type(k) is K for k in b.get_all_keyring()))\n")
    out = py(code, keyring_env(kr_tmp, sock))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    reason = {"locked": "is locked", "uninitialized": "is not initialized", "absent": "no socket there"}[state]
    assert lines[0].startswith("RuntimeError:") and reason in lines[0], lines
    seconds, viable, chosen = lines[1].split()
    assert float(seconds) < 1 and viable == "False" and chosen == "False"
    by_name = py("import keyring; keyring.get_keyring()",
                 keyring_env(kr_tmp, sock, PYTHON_KEYRING_BACKEND=BACKEND))
    assert by_name.returncode != 0 and reason in by_name.stderr  # keyring's own refusal


def test_never_viable_inside_the_agents_keychain_backend(unlocked: Daemon, kr_tmp: Path) -> None:
    code = ("import homeagent_secrets.daemon.backends.keychain_store\n"
            "from homeagent_secrets.client.keyring_backend import SecretsdKeyring as K\n"
            "print(K.viable)")
    out = py(code, keyring_env(kr_tmp, unlocked.socket))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_keyrings_cli_sets_gets_and_deletes_through_the_agent(unlocked: Daemon, kr_tmp: Path) -> None:
    env = keyring_env(kr_tmp, unlocked.socket, PYTHON_KEYRING_BACKEND=BACKEND)

    def cli(*args: str, input: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "keyring", *args], env=env, capture_output=True,
                              text=True, input=input, timeout=60)

    assert cli("set", "https://pypi.org", "alice", input="s3cret pw\n").returncode == 0
    got = cli("get", "https://pypi.org", "alice")
    assert (got.returncode, got.stdout) == (0, "s3cret pw\n")
    with SecretsClient(unlocked.socket) as c:
        assert c.get("keyring/-https_3A_2F_2Fpypi_2Eorg/-alice") == "s3cret pw"
    creds = cli("--mode", "creds", "get", "https://pypi.org")  # no username: the first of the service
    assert creds.returncode == 0 and creds.stdout.splitlines() == ["alice", "s3cret pw"], creds
    assert cli("del", "https://pypi.org", "alice").returncode == 0
    assert cli("get", "https://pypi.org", "alice").returncode == 1
    listed = subprocess.run([sys.executable, "-m", "keyring", "--list-backends"],
                            env=keyring_env(kr_tmp, unlocked.socket), capture_output=True, text=True, timeout=60)
    assert "SecretsdKeyring (priority: 1.5)" in listed.stdout


@pytest.mark.slow
def test_priority_is_cheap_when_the_agent_hangs(unlocked: Daemon, kr_tmp: Path) -> None:
    import signal

    os.kill(unlocked.pid, signal.SIGSTOP)  # accepts (the kernel does), never answers
    try:
        t0 = time.monotonic()
        out = py("from homeagent_secrets.client.keyring_backend import SecretsdKeyring as K; print(K.viable)",
                 keyring_env(kr_tmp, unlocked.socket))
        assert out.stdout.strip() == "False"
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(unlocked.pid, signal.SIGCONT)
