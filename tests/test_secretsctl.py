"""secretsctl as a subprocess: every command, every exit code, no secret in argv."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from .conftest import PASSPHRASE, Daemon


def test_first_use_from_nothing_to_retrieved(daemon: Daemon, short_tmp: Path) -> None:
    r = daemon.ctl("init", input=PASSPHRASE + "\n")
    assert r.returncode == 0, r.stderr
    assert daemon.ctl("set", "llm/openai", "--kind", "llm", input="sk-123\n").returncode == 0
    got = daemon.ctl("get", "llm/openai")
    assert (got.returncode, got.stdout) == (0, "sk-123\n")
    vf = short_tmp / "value.txt"
    vf.write_text("sk-456\n")
    assert daemon.ctl("rotate", "llm/openai", "--value-file", str(vf)).returncode == 0
    assert daemon.ctl("get", "llm/openai").stdout == "sk-456\n"
    assert daemon.ctl("get", "llm/openai", "--previous").stdout == "sk-123\n"
    ls = daemon.ctl("ls", "--json")
    assert json.loads(ls.stdout) == ["llm/openai"]
    assert daemon.ctl("ls", "llm/").stdout == "llm/openai\n"
    assert daemon.ctl("ls", "zz").stdout == ""
    d = json.loads(daemon.ctl("describe", "llm/openai", "--json").stdout)
    assert set(d) == {"name", "kind", "version", "created", "updated", "has_previous"}
    assert (d["kind"], d["version"], d["has_previous"]) == ("llm", 2, True)
    text = daemon.ctl("describe", "llm/openai").stdout
    assert "kind: llm" in text and "sk-" not in text
    st = json.loads(daemon.ctl("status", "--json").stdout)
    assert {k: st[k] for k in ("initialized", "locked", "backend", "secrets")} == {
        "initialized": True, "locked": False, "backend": "file", "secrets": 1}
    assert "locked: no" in daemon.ctl("status").stdout
    assert daemon.ctl("rm", "llm/openai").returncode == 0
    assert daemon.ctl("ls", "--json").stdout.strip() == "[]"


def test_exit_codes(unlocked: Daemon, short_tmp: Path) -> None:
    assert unlocked.ctl("get", "nope").returncode == 4
    assert unlocked.ctl("rm", "nope").returncode == 4
    assert unlocked.ctl("rotate", "nope", input="v").returncode == 4
    assert unlocked.ctl("describe", "nope").returncode == 4
    assert unlocked.ctl("set", "bad/../name", input="v").returncode == 2
    assert unlocked.ctl("frobnicate").returncode == 2
    assert unlocked.ctl("set").returncode == 2
    assert unlocked.ctl("lock").returncode == 0
    r = unlocked.ctl("get", "x")
    assert r.returncode == 3 and "secretsctl unlock" in r.stderr
    assert unlocked.ctl("unlock", input="wrong\n").returncode == 6
    assert unlocked.ctl("unlock", input=PASSPHRASE + "\n").returncode == 0
    assert unlocked.ctl("init", input="x\n").returncode == 1  # already initialized
    unlocked.stop()
    r = unlocked.ctl("status")
    assert r.returncode == 5 and str(unlocked.socket) in r.stderr and "secretsd" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line on stderr


def test_not_initialized_exit_code_and_hint(daemon: Daemon) -> None:
    r = daemon.ctl("get", "x")
    assert r.returncode == 3 and "secretsctl init" in r.stderr


def test_passwd_from_stdin_and_files(unlocked: Daemon, short_tmp: Path) -> None:
    r = unlocked.ctl("passwd", input=f"{PASSPHRASE}\nnew-one\n")
    assert r.returncode == 0, r.stderr
    assert unlocked.ctl("passwd", input="bad\nother\n").returncode == 6
    old, new = short_tmp / "old", short_tmp / "new"
    old.write_text("new-one\n")
    new.write_text("third\n")
    r = unlocked.ctl("passwd", "--passphrase-file", str(old), "--new-passphrase-file", str(new))
    assert r.returncode == 0, r.stderr
    unlocked.ctl("lock")
    assert unlocked.ctl("unlock", "--passphrase-file", str(new)).returncode == 0


def test_unlock_from_credential_directory(unlocked: Daemon, short_tmp: Path) -> None:
    creds = short_tmp / "creds"
    creds.mkdir()
    cred = creds / "secretsd-passphrase"
    cred.write_text(PASSPHRASE)
    cred.chmod(0o400)
    unlocked.ctl("lock")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert unlocked.ctl("unlock", "--credential", "secretsd-passphrase", env=env).returncode == 0
    unlocked.ctl("lock")
    cred.chmod(0o644)
    r = unlocked.ctl("unlock", "--credential", "secretsd-passphrase", env=env)
    assert r.returncode == 2 and "0644" in r.stderr and "readable" in r.stderr
    assert unlocked.ctl("unlock", "--credential", "x").returncode == 2  # no $CREDENTIALS_DIRECTORY


def test_value_never_comes_from_argv() -> None:
    from homeagent_secrets.client.cli import parser

    p = parser()
    for cmd in ("set", "rotate"):
        with pytest.raises(SystemExit):
            p.parse_args([cmd, "name", "value-on-the-command-line"])


def test_get_prints_value_and_one_newline_only(unlocked: Daemon) -> None:
    unlocked.ctl("set", "multi", input="line1\nline2\n")
    r = unlocked.ctl("get", "multi")
    assert r.stdout == "line1\nline2\n" and r.stderr == ""


def test_private_files_stay_private(unlocked: Daemon) -> None:
    unlocked.ctl("set", "x", input="v")
    for root, dirs, files in os.walk(unlocked.home / "secrets"):
        for f in files:
            assert stat.S_IMODE(os.stat(Path(root) / f).st_mode) == 0o600
