"""secretsctl as a subprocess: every command, every exit code, no secret in argv.

Real processes throughout: a real secretsd, secretsctl run as a subprocess,
a real pseudo-terminal where a terminal matters (prompts, Ctrl-D, Ctrl-C),
real pipes closed early, really closed file descriptors, and real bash and
zsh completing a line typed on a terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import IO

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from .conftest import PASSPHRASE, TEST_SCRYPT_N, Daemon, require_real, require_tool
from .terminal import Terminal

CTL = [sys.executable, "-m", "homeagent_secrets.client.cli"]
BIN = Path(sys.executable).parent
COMMANDS_LISTED = ["init", "unlock", "lock", "passwd", "status", "set", "get", "rm", "ls",
                   "rotate", "describe", "migrate", "whoami", "audit", "watch", "run", "completion"]


def ctl_bytes(d: Daemon, *args: str, input: bytes | None = None, stdin: IO[bytes] | None = None
              ) -> subprocess.CompletedProcess[bytes]:
    """secretsctl with bytes in and out (no newline translation)."""
    return subprocess.run([*CTL, "--socket", str(d.socket), *args], input=input, stdin=stdin,
                          capture_output=True, timeout=60)


def one_line(stderr: str) -> str:
    """The single line on stderr (fails on a traceback or on several lines)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _close_fds(*fds: int):  # type: ignore[no-untyped-def]
    def close() -> None:
        for fd in fds:
            os.close(fd)
    return close


# --- first use and exit codes ---------------------------------------------------------------


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


@pytest.mark.slow
def test_exit_codes(unlocked: Daemon, short_tmp: Path) -> None:
    assert unlocked.ctl("get", "nope").returncode == 4
    assert unlocked.ctl("rm", "nope").returncode == 4
    assert unlocked.ctl("rotate", "nope", input="v").returncode == 4
    assert unlocked.ctl("describe", "nope").returncode == 4
    assert unlocked.ctl("set", "bad/../name", input="v").returncode == 2
    r = unlocked.ctl("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in one_line(r.stderr)
    r = unlocked.ctl("set")
    assert r.returncode == 2 and "`secretsctl set --help`" in one_line(r.stderr)
    r = unlocked.ctl("set", "x", "--kind", "nope")
    assert r.returncode == 2 and "invalid choice" in one_line(r.stderr)
    assert unlocked.ctl("lock").returncode == 0
    r = unlocked.ctl("get", "x")
    assert r.returncode == 3 and "secretsctl unlock" in one_line(r.stderr)
    assert unlocked.ctl("unlock", input="wrong\n").returncode == 6
    assert unlocked.ctl("unlock", input=PASSPHRASE + "\n").returncode == 0
    assert unlocked.ctl("init", input="x\n").returncode == 1  # already initialized
    unlocked.stop()
    r = unlocked.ctl("status")
    assert r.returncode == 5 and str(unlocked.socket) in r.stderr and "secretsd" in r.stderr
    one_line(r.stderr)


def test_not_initialized_exit_code_and_hint(daemon: Daemon) -> None:
    r = daemon.ctl("get", "x")
    assert r.returncode == 3 and "secretsctl init" in r.stderr


def test_version_of_both_programs() -> None:
    from homeagent_secrets.protocol import __version__

    r = subprocess.run([*CTL, "--version"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"secretsctl {__version__}\n", "")
    r = subprocess.run([sys.executable, "-m", "homeagent_secrets.daemon", "--version"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, f"secretsd {__version__}"), r.stderr


@pytest.mark.parametrize("command", COMMANDS_LISTED)
def test_every_command_help_documents_arguments_and_exit_codes(command: str) -> None:
    from homeagent_secrets.client.cli_parser import parser

    r = subprocess.run([*CTL, command, "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "exit status:" in r.stdout and "  0    success" in r.stdout
    sub = next(a for a in parser()._actions if a.dest == "command").choices[command]  # type: ignore[index]
    for action in sub._actions:
        shown = (action.option_strings[-1] if action.option_strings
                 else action.metavar or action.dest)
        assert shown in r.stdout, (command, shown)
        assert action.help, (command, shown)  # every argument says what it is
    codes = [int(line.split()[0]) for line in r.stdout.split("exit status:")[1].splitlines()
             if line.strip()]
    assert codes == sorted(codes) and {0, 2}.issubset(codes)
    if command not in ("completion",):
        assert {1, 5, 130}.issubset(codes)


def test_the_command_list_matches_the_parser() -> None:
    """`secretsctl get` builds only the parser of `get`, found through COMMANDS."""
    from homeagent_secrets.client.cli_commands import COMPLETE
    from homeagent_secrets.client.cli_parser import COMMANDS, command_in, parser

    sub = next(a for a in parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS) and COMMANDS[-1] == COMPLETE  # type: ignore[arg-type]
    assert COMMANDS[:-1] == tuple(COMMANDS_LISTED)
    assert command_in(["--socket", "get", "ls", "x"]) == "ls"
    assert command_in(["--help", "get"]) is None and command_in(["frob"]) is None
    lean = next(a for a in parser(["get", "x"])._actions if a.dest == "command")
    assert list(lean.choices) == ["get"]  # type: ignore[arg-type]


@given(st.lists(st.sampled_from(["get", "--previous", "--raw", "x", "llm/a", "-x", "--",
                                  "--socket", "/s", "--timeout=5", "ls", "-h"]), max_size=5))
@example(["get", "x"])
@example(["get", "--raw", "--previous", "llm/a"])
def test_the_plain_get_fast_path_parses_as_argparse_does(argv: list[str]) -> None:
    from homeagent_secrets.client.cli_commands import plain_get
    from homeagent_secrets.client.cli_parser import parser

    quick = plain_get(argv)
    if quick is not None:  # it only takes what argparse takes, and reads it the same way
        assert vars(quick) == vars(parser(argv).parse_args(argv))
        assert vars(quick) == vars(parser().parse_args(argv))


@pytest.mark.slow
def test_status_exits_3_when_locked_or_not_initialized_and_names_socket_and_home(
        daemon: Daemon) -> None:
    r = daemon.ctl("status")
    assert r.returncode == 3 and "state: not initialized" in r.stdout
    daemon.ctl("init", input=PASSPHRASE + "\n")
    r = daemon.ctl("status")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert lines["state"] == "unlocked" and lines["socket"] == str(daemon.socket)
    assert lines["home"] == str(daemon.home) and lines["damaged"] == "none"
    assert lines["migration"] == "-" and lines["locked"] == "no"
    daemon.ctl("lock")
    r = daemon.ctl("status", "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 3 and st["locked"] is True
    assert st["socket"] == str(daemon.socket) and st["home"] == str(daemon.home)


@pytest.mark.slow
def test_status_lists_damaged_records_one_per_line(unlocked: Daemon) -> None:
    records = unlocked.home / "secrets"
    unlocked.ctl("set", "victim", input="original\n")
    (victim,) = records.glob("*.rec")
    unlocked.ctl("set", "bystander", input="fine\n")
    unlocked.stop()
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01  # a bit of the values section: the name still authenticates
    victim.write_bytes(bytes(data))
    unlocked.start()
    unlocked.ctl("unlock", input=PASSPHRASE + "\n")
    r = unlocked.ctl("get", "victim")  # found damaged when read
    assert r.returncode == 1 and victim.name in one_line(r.stderr)
    r = unlocked.ctl("status")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("damaged: 1 record(s)"))
    file, name, problem = lines[at + 1].split(maxsplit=2)
    assert (file, name) == (victim.name, "victim") and problem
    r = unlocked.ctl("ls", "-l")
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["generic", "damaged"]


# --- input rules: passphrases ---------------------------------------------------------------


@pytest.mark.slow
def test_init_from_stdin_takes_one_line_or_two_that_match(daemon: Daemon) -> None:
    r = daemon.ctl("init", input="pw\nother\n")
    assert r.returncode == 2 and "differ" in one_line(r.stderr)
    r = daemon.ctl("init", input="pw\npw\npw\n")
    assert r.returncode == 2 and "3 lines" in one_line(r.stderr)
    assert daemon.ctl("status").returncode == 3  # still not initialized
    r = daemon.ctl("init", input="two words\ntwo words\n")
    assert r.returncode == 0 and "two matching lines" in one_line(r.stderr)
    daemon.ctl("lock")
    assert daemon.ctl("unlock", input="two words\n").returncode == 0  # not "two words\ntwo words"


@pytest.mark.slow
def test_init_from_one_line_says_so(daemon: Daemon) -> None:
    r = daemon.ctl("init", input="only once\r\n")
    assert r.returncode == 0 and "one line of standard input" in one_line(r.stderr)
    daemon.ctl("lock")
    assert daemon.ctl("unlock", input="only once").returncode == 0


@pytest.mark.slow
def test_unlock_reads_exactly_one_line(unlocked: Daemon) -> None:
    unlocked.ctl("lock")
    r = unlocked.ctl("unlock", input=f"{PASSPHRASE}\n{PASSPHRASE}\n")
    assert r.returncode == 2 and "exactly one line" in one_line(r.stderr)
    assert unlocked.ctl("status").returncode == 3
    assert unlocked.ctl("unlock", input=PASSPHRASE + "\r\n").returncode == 0


@pytest.mark.slow
def test_a_passphrase_file_is_read_whole(unlocked: Daemon, short_tmp: Path) -> None:
    """So a passphrase with a newline in it (set before the rules) can still be given."""
    unlocked.ctl("lock")
    pw = short_tmp / "pw"
    pw.write_text(f"{PASSPHRASE}\n{PASSPHRASE}\n")
    r = unlocked.ctl("unlock", "--passphrase-file", str(pw))
    assert r.returncode == 6  # sent as the two-line passphrase it is, not refused as input
    pw.write_text(PASSPHRASE + "\n")
    assert unlocked.ctl("unlock", "--passphrase-file", str(pw)).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(("text", "rule"), [
    ("\n", "must not be empty"),
    ("tab\there\n", "must not contain control characters"),
    ("x" * 1025 + "\n", "the limit is 1024 bytes"),
])
def test_a_passphrase_breaking_the_protocol_rule_is_refused_before_sending(
        daemon: Daemon, short_tmp: Path, text: str, rule: str) -> None:
    from homeagent_secrets.client import InvalidParams, SecretsClient

    with pytest.raises(InvalidParams) as wire:  # the protocol's own message
        SecretsClient(daemon.socket).init(text.removesuffix("\n"))
    pw = short_tmp / "pw"
    pw.write_text(text)
    for r in (daemon.ctl("init", input=text), daemon.ctl("init", "--passphrase-file", str(pw))):
        assert r.returncode == 2
        assert one_line(r.stderr) == f"secretsctl: {wire.value.message}" and rule in r.stderr
    assert daemon.ctl("status").returncode == 3  # nothing was initialized


@pytest.mark.slow
def test_passwd_from_stdin_and_files(unlocked: Daemon, short_tmp: Path) -> None:
    r = unlocked.ctl("passwd", input=f"{PASSPHRASE}\nnew-one\n")
    assert r.returncode == 0, r.stderr
    assert unlocked.ctl("passwd", input="bad\nother\n").returncode == 6
    r = unlocked.ctl("passwd", input="new-one\nthird\nthirds\n")
    assert r.returncode == 2 and "differs" in one_line(r.stderr)
    r = unlocked.ctl("passwd", input="new-one\n")
    assert r.returncode == 2 and "1 lines" in one_line(r.stderr)
    assert unlocked.ctl("passwd", input="new-one\nthird\nthird\n").returncode == 0
    old, new = short_tmp / "old", short_tmp / "new"
    old.write_text("third\n")
    new.write_text("fourth\n")
    r = unlocked.ctl("passwd", "--passphrase-file", str(old), "--new-passphrase-file", str(new))
    assert r.returncode == 0, r.stderr
    unlocked.ctl("lock")
    assert unlocked.ctl("unlock", "--passphrase-file", str(new)).returncode == 0


@pytest.mark.slow
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


def test_ask_password_missing_is_one_line(unlocked: Daemon, short_tmp: Path) -> None:
    unlocked.ctl("lock")
    empty = short_tmp / "empty-path"
    empty.mkdir()
    r = unlocked.ctl("unlock", "--ask-password", env={"PATH": str(empty)})
    assert r.returncode == 2 and "systemd-ask-password is not installed" in one_line(r.stderr)


# --- input rules: values --------------------------------------------------------------------


def test_value_never_comes_from_argv() -> None:
    from homeagent_secrets.client.cli_parser import parser

    p = parser()
    for cmd in ("set", "rotate"):
        with pytest.raises(SystemExit):
            p.parse_args([cmd, "name", "value-on-the-command-line"])


def test_get_prints_value_and_one_newline_only(unlocked: Daemon) -> None:
    unlocked.ctl("set", "multi", input="line1\nline2\n")
    r = unlocked.ctl("get", "multi")
    assert r.stdout == "line1\nline2\n" and r.stderr == ""


@pytest.mark.slow
def test_set_strips_one_trailing_newline_and_raw_keeps_the_bytes(unlocked: Daemon) -> None:
    assert ctl_bytes(unlocked, "set", "v", input=b"value\n\n").returncode == 0
    assert ctl_bytes(unlocked, "get", "v", "--raw").stdout == b"value\n"  # one removed
    assert ctl_bytes(unlocked, "set", "v", input=b"value\r\n").returncode == 0
    assert ctl_bytes(unlocked, "get", "v", "--raw").stdout == b"value"
    assert ctl_bytes(unlocked, "set", "v", "--raw", input=b"value\r\n\n").returncode == 0
    assert ctl_bytes(unlocked, "get", "v", "--raw").stdout == b"value\r\n\n"
    assert ctl_bytes(unlocked, "get", "v").stdout == b"value\r\n\n\n"


@pytest.mark.slow
def test_pem_files_round_trip(unlocked: Daemon, short_tmp: Path) -> None:
    pem = ("-----BEGIN PRIVATE KEY-----\n" + "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n" * 30
           + "-----END PRIVATE KEY-----\n").encode()
    src = short_tmp / "key.pem"
    src.write_bytes(pem)
    assert ctl_bytes(unlocked, "set", "tls/key", "--value-file", str(src)).returncode == 0
    assert ctl_bytes(unlocked, "get", "tls/key").stdout == pem  # the usual pair round-trips
    with open(src, "rb") as f:  # and from a redirect, as people type it
        assert ctl_bytes(unlocked, "rotate", "tls/key", stdin=f).returncode == 0
    assert ctl_bytes(unlocked, "get", "tls/key").stdout == pem
    odd = b"no final newline\r\n  \n\n\xc3\xa9t\xc3\xa9"  # byte-exact with --raw on both sides
    src.write_bytes(odd)
    assert ctl_bytes(unlocked, "set", "tls/odd", "--raw", "--value-file", str(src)).returncode == 0
    assert ctl_bytes(unlocked, "get", "tls/odd", "--raw").stdout == odd


def test_a_value_that_is_not_utf8_is_refused_with_where(unlocked: Daemon, short_tmp: Path) -> None:
    r = ctl_bytes(unlocked, "set", "bin", "--raw", input=b"ok\xff\xfe")
    err = one_line(r.stderr.decode())
    assert r.returncode == 2 and "not UTF-8" in err and "0xff at offset 2" in err
    f = short_tmp / "bin"
    f.write_bytes(b"\x80")
    r = ctl_bytes(unlocked, "set", "bin", "--value-file", str(f))
    assert r.returncode == 2 and str(f) in r.stderr.decode()
    assert unlocked.ctl("get", "bin").returncode == 4  # nothing was stored


def test_empty_stdin_is_refused_and_an_empty_file_is_an_empty_value(unlocked: Daemon) -> None:
    r = subprocess.run([*CTL, "--socket", str(unlocked.socket), "set", "e"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "standard input was empty" in one_line(r.stderr)
    assert unlocked.ctl("get", "e").returncode == 4
    assert unlocked.ctl("set", "e", "--value-file", "/dev/null").returncode == 0
    assert unlocked.ctl("get", "e").stdout == "\n"


def test_closed_stdin_is_one_line_and_not_needed_by_get(unlocked: Daemon) -> None:
    unlocked.ctl("set", "x", input="v\n")
    base = [*CTL, "--socket", str(unlocked.socket)]
    r = subprocess.run([*base, "set", "x"], preexec_fn=_close_fds(0), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "standard input is closed" in one_line(r.stderr)
    r = subprocess.run([*base, "get", "x"], preexec_fn=_close_fds(0), capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "v\n", "")


def test_closed_stdout_and_stderr_never_misdirect_output(unlocked: Daemon) -> None:
    unlocked.ctl("set", "x", input="v\n")
    base = [*CTL, "--socket", str(unlocked.socket)]
    r = subprocess.run([*base, "get", "x"], preexec_fn=_close_fds(1), stderr=subprocess.PIPE,
                       text=True, timeout=60)
    assert r.returncode == 2 and "standard output is closed" in one_line(r.stderr)
    # stderr closed: the error must not land on stdout, where a script reads the value
    r = subprocess.run([*base, "get", "nope"], preexec_fn=_close_fds(2), stdout=subprocess.PIPE,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (4, "")


def test_a_full_disk_on_stdout_is_one_line(unlocked: Daemon) -> None:
    require_real(Path("/dev/full").exists(), "/dev/full")
    unlocked.ctl("set", "x", input="v\n")
    with open("/dev/full", "wb") as full:
        r = subprocess.run([*CTL, "--socket", str(unlocked.socket), "get", "x"], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 1 and "No space left on device" in one_line(r.stderr)


# --- a person at a terminal -------------------------------------------------------------------


@pytest.mark.slow
def test_prompts_ask_twice_without_echo(daemon: Daemon) -> None:
    with Terminal.secretsctl(daemon.socket, "init") as t:
        t.expect("New passphrase: ")
        t.type("typed secret\n")
        t.expect("New passphrase (again): ")
        t.type("typed secret\n")
        rc, err = t.wait()
    assert rc == 0 and "the prompt" in one_line(err)
    assert b"typed secret" not in t.output  # no echo
    with Terminal.secretsctl(daemon.socket, "set", "typed") as t:
        t.expect("Value for typed: ")
        t.type("sk-typed\n")
        rc, err = t.wait()
    assert rc == 0 and b"sk-typed" not in t.output
    assert daemon.ctl("get", "typed").stdout == "sk-typed\n"


@pytest.mark.slow
def test_prompt_mismatch_and_empty_entry_are_one_line(daemon: Daemon) -> None:
    with Terminal.secretsctl(daemon.socket, "init") as t:
        t.expect("New passphrase: ")
        t.type("one\n")
        t.expect("(again): ")
        t.type("two\n")
        rc, err = t.wait()
    assert rc == 2 and "differ" in one_line(err)
    with Terminal.secretsctl(daemon.socket, "init") as t:
        t.expect("New passphrase: ")
        t.type("\n")
        rc, err = t.wait()
    assert rc == 2 and one_line(err) == "secretsctl: the passphrase must not be empty"
    assert b"(again)" not in t.output  # refused at once, before the second prompt
    assert daemon.ctl("status").returncode == 3


def test_ctrl_d_at_a_prompt_is_one_line(unlocked: Daemon) -> None:
    unlocked.ctl("lock")
    with Terminal.secretsctl(unlocked.socket, "unlock") as t:
        t.expect("Passphrase: ")
        t.type("\x04")
        rc, err = t.wait()
        assert t.echo_is_on()
    assert rc == 2 and "end of input" in one_line(err)


@pytest.mark.slow
def test_ctrl_c_at_a_prompt_exits_130_with_one_line(unlocked: Daemon) -> None:
    unlocked.ctl("lock")
    with Terminal.secretsctl(unlocked.socket, "unlock") as t:  # SIGINT sent to the child
        t.expect("Passphrase: ")
        t.interrupt()
        rc, err = t.wait()
        assert t.echo_is_on()  # the terminal is given back as it was
    assert (rc, one_line(err)) == (130, "secretsctl: interrupted")
    with Terminal.secretsctl(unlocked.socket, "set", "x") as t:  # Ctrl-C typed on the terminal
        t.expect("Value for x: ")
        t.type("half a val\x03")
        rc, err = t.wait()
    assert (rc, one_line(err)) == (130, "secretsctl: interrupted")
    assert unlocked.ctl("unlock", input=PASSPHRASE + "\n").returncode == 0
    assert unlocked.ctl("get", "x").returncode == 4


def test_sigint_while_reading_a_pipe_exits_130(unlocked: Daemon) -> None:
    p = subprocess.Popen([*CTL, "--socket", str(unlocked.socket), "set", "x"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until it waits in read(0, ...) on the pipe
            syscall = Path(f"/proc/{p.pid}/syscall").read_text().split()
            if syscall[:2] == ["0", "0x0"]:
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (p.returncode, one_line(err)) == (130, "secretsctl: interrupted")


# --- pipes ------------------------------------------------------------------------------------


# The error comes at a write (unbuffered), or at the last flush.
@pytest.mark.slow
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_left_is_a_quiet_141(unlocked: Daemon, unbuffered: str) -> None:
    unlocked.ctl("set", "x", input="v\n")
    for args in (["ls"], ["get", "x"], ["status"], ["describe", "x"], ["--help"], ["get", "--help"],
                 ["completion", "bash"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written
        try:
            r = subprocess.run([*CTL, "--socket", str(unlocked.socket), *args], stdout=write_end,
                               stderr=subprocess.PIPE, text=True, timeout=60,
                               env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
        finally:
            os.close(write_end)
        assert (r.returncode, r.stderr) == (141, ""), args


@pytest.mark.slow
def test_ls_piped_to_head(unlocked: Daemon) -> None:
    bash = require_tool("bash")
    from homeagent_secrets.client import SecretsClient

    with SecretsClient(unlocked.socket) as c:
        for i in range(3000):  # more than a pipe buffer of names
            c.store(f"many/{i:05d}-{'x' * 20}", "v")
    script = (f"set -o pipefail; {' '.join(CTL)} --socket {unlocked.socket} ls | head -1; "
              'echo "status=${PIPESTATUS[0]}" >&2')
    r = subprocess.run([bash, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.stdout == "many/00000-xxxxxxxxxxxxxxxxxxxx\n"
    assert r.stderr.strip() in ("status=141", "status=0"), r.stderr  # nothing else on stderr


# --- ls, describe, names ------------------------------------------------------------------------


@pytest.mark.slow
def test_ls_prefix_matches_whole_segments(unlocked: Daemon) -> None:
    for name in ("llm", "llm/openai", "llm/x/y", "llmx/z", "other"):
        unlocked.ctl("set", name, input="v\n")
    assert unlocked.ctl("ls", "llm").stdout.split() == ["llm", "llm/openai", "llm/x/y"]
    assert unlocked.ctl("ls", "llm/").stdout.split() == ["llm/openai", "llm/x/y"]
    assert unlocked.ctl("ls", "llm/x").stdout.split() == ["llm/x/y"]
    assert unlocked.ctl("ls", "llm/o").stdout == ""
    assert json.loads(unlocked.ctl("ls", "llmx", "--json").stdout) == ["llmx/z"]
    r = unlocked.ctl("ls", "a b")
    assert r.returncode == 2 and "invalid prefix" in one_line(r.stderr)


@pytest.mark.slow
def test_ls_long_shows_kind_version_and_updated_time(unlocked: Daemon) -> None:
    unlocked.ctl("set", "llm/openai", "--kind", "llm", input="a\n")
    unlocked.ctl("rotate", "llm/openai", input="b\n")
    unlocked.ctl("set", "hue", "--kind", "device", input="c\n")
    r = unlocked.ctl("ls", "-l")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert [(k, v, n) for k, v, _, n in rows] == [("device", "1", "hue"),
                                                   ("llm", "2", "llm/openai")]
    described = json.loads(unlocked.ctl("describe", "llm/openai", "--json").stdout)
    assert abs(datetime.fromisoformat(rows[1][2]).timestamp() - described["updated"]) < 1
    long_json = json.loads(unlocked.ctl("ls", "-l", "--json", "llm").stdout)
    assert [(d["name"], d["kind"], d["version"]) for d in long_json] == [("llm/openai", "llm", 2)]


@pytest.mark.slow
def test_describe_prints_iso_8601_times(unlocked: Daemon) -> None:
    unlocked.ctl("set", "x", input="v\n")
    raw = json.loads(unlocked.ctl("describe", "x", "--json").stdout)
    fields = dict(line.split(": ", 1) for line in unlocked.ctl("describe", "x").stdout.splitlines())
    for key in ("created", "updated"):
        when = datetime.fromisoformat(fields[key])
        assert when.utcoffset() is not None and abs(when.timestamp() - raw[key]) < 1


@pytest.mark.slow
def test_names_starting_with_a_dash_work_after_double_dash(unlocked: Daemon) -> None:
    assert unlocked.ctl("set", "--", "-dash", input="v\n").returncode == 0
    assert unlocked.ctl("get", "--", "-dash").stdout == "v\n"
    assert unlocked.ctl("describe", "--", "-dash").returncode == 0
    assert unlocked.ctl("ls", "--", "-dash").stdout == "-dash\n"
    assert unlocked.ctl("rotate", "--", "-dash", input="w\n").returncode == 0
    r = unlocked.ctl("get", "-dash")
    assert r.returncode == 2 and "after '--'" in r.stderr and "Traceback" not in r.stderr
    assert unlocked.ctl("rm", "--", "-dash").returncode == 0


# --- where the agent is -------------------------------------------------------------------------


class DiscoveredDaemon(Daemon):
    """secretsd given neither --socket nor --home: both come from its environment."""

    @staticmethod
    def command(home: Path, sock: Path) -> list[str]:
        return [sys.executable, "-m", "homeagent_secrets.daemon", "--scrypt-n", str(TEST_SCRYPT_N)]


def _context(**env: str) -> dict[str, str]:
    """An environment with only the agent-related variables given (the rest unset: empty)."""
    base = {"XDG_RUNTIME_DIR": "", "HOMEAGENT_HOME": "", "HOMEAGENT_SECRETS_SOCKET": ""}
    return {**base, **env}


def _ctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def _library_socket_and_home(env: dict[str, str]) -> tuple[str, str | None]:
    code = ("from homeagent_secrets.client import SecretsClient; c = SecretsClient(); "
            "print(c.socket_path); print(c.status().home)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, check=True).stdout.split("\n")
    return out[0], out[1]


def _status_fields(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)


@pytest.mark.slow
@pytest.mark.parametrize("context", ["interactive", "cron-sudo-ssh", "nothing-set"])
def test_daemon_cli_and_library_find_one_socket(short_tmp: Path, context: str) -> None:
    home = short_tmp / "home"
    if context == "interactive":  # a desktop shell: XDG_RUNTIME_DIR set
        runtime = short_tmp / "xdg"
        runtime.mkdir(mode=0o700)
        env = _context(XDG_RUNTIME_DIR=str(runtime), HOMEAGENT_HOME=str(home))
        sock = runtime / "homeagent" / "secretsd.sock"
    elif context == "cron-sudo-ssh":  # no XDG_RUNTIME_DIR: the socket is under the home
        env = _context(HOMEAGENT_HOME=str(home))
        sock = home / "run" / "secretsd.sock"
    else:  # nothing set at all (root's cron): ~/.homeagent
        env = _context(HOME=str(short_tmp))
        home = short_tmp / ".homeagent"
        sock = home / "run" / "secretsd.sock"
    d = DiscoveredDaemon(home, sock, short_tmp / "d.log", env=env).start()
    r = _ctl("status", env=env)
    assert r.returncode == 3, r.stderr  # reached; not initialized yet
    fields = _status_fields(r)
    assert (fields["socket"], fields["home"]) == (str(sock), str(home))
    assert _library_socket_and_home(env) == (str(sock), str(home))
    d.stop()


@pytest.mark.slow
def test_home_option_before_or_after_the_command(short_tmp: Path) -> None:
    home = short_tmp / "elsewhere"
    env = _context(HOMEAGENT_HOME=str(home))
    d = DiscoveredDaemon(home, home / "run" / "secretsd.sock", short_tmp / "d.log", env=env).start()
    bare = _context()  # a shell that knows nothing of that home: --home says it
    assert _ctl("status", env=bare).returncode == 5
    for args in (["--home", str(home), "status"], ["status", "--home", str(home)],
                 ["--timeout", "5", "status", f"--home={home}"]):
        r = _ctl(*args, env=bare)
        assert r.returncode == 3 and _status_fields(r)["home"] == str(home), (args, r.stderr)
    for args in (["--socket", str(d.socket), "ls"], ["ls", "--socket", str(d.socket)]):
        r = _ctl(*args, env=bare)
        assert r.returncode == 3 and "secretsctl init" in r.stderr, (args, r.stderr)
    other = short_tmp / "other-home"
    other.mkdir()
    r = _ctl("--socket", str(d.socket), "--home", str(other), "ls", env=bare)
    assert r.returncode == 5 and f"serves the home {home}, not {other}" in one_line(r.stderr)
    d.stop()


@pytest.mark.slow
def test_the_system_socket_is_probed_when_no_user_socket_exists(short_tmp: Path) -> None:
    system = Path("/run/homeagent")
    require_real(os.geteuid() == 0 and not system.exists(),
                 "root and a free /run/homeagent (no system secretsd on this machine)")
    runtime = short_tmp / "xdg"
    runtime.mkdir(mode=0o700)
    try:
        d = Daemon(short_tmp / "system-home", system / "secretsd.sock", short_tmp / "d.log").start()
        env = _context(XDG_RUNTIME_DIR=str(runtime), HOMEAGENT_HOME=str(short_tmp / "user-home"))
        for e in (env, _context(HOME=str(short_tmp))):  # with and without XDG_RUNTIME_DIR
            r = _ctl("status", env=e)
            assert r.returncode == 3, r.stderr
            assert _status_fields(r)["socket"] == "/run/homeagent/secretsd.sock"
            assert _library_socket_and_home(e) == ("/run/homeagent/secretsd.sock",
                                                   str(short_tmp / "system-home"))
        d.stop()
    finally:
        shutil.rmtree(system, ignore_errors=True)


# --- completion ----------------------------------------------------------------------------------


def _named(d: Daemon) -> Daemon:
    for name in ("llm/openai", "llm/anthropic", "hue/bridge"):
        d.ctl("set", name, input="v\n")
    return d


def _shell_env(d: Daemon) -> dict[str, str]:
    return {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PS1": "$ ", "TERM": "dumb",
            "HOMEAGENT_SECRETS_SOCKET": str(d.socket), "HOME": str(d.home.parent)}


def _bash_complete(script: Path, env: dict[str, str], *words: str) -> list[str]:
    bash = require_tool("bash")
    program = textwrap.dedent(f"""
        source {script}
        COMP_WORDS=({' '.join(repr(w) for w in words)})
        COMP_CWORD={len(words) - 1}
        _secretsctl
        printf '%s\\n' "${{COMPREPLY[@]}}"
        """)
    r = subprocess.run([bash, "--norc", "--noprofile", "-c", program], capture_output=True,
                       text=True, timeout=60, env={**os.environ, **env})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [w for w in r.stdout.split("\n") if w]


@pytest.mark.slow
def test_bash_completion_completes_commands_options_and_names(unlocked: Daemon,
                                                              short_tmp: Path) -> None:
    bash = require_tool("bash")
    _named(unlocked)
    script = short_tmp / "secretsctl.bash"
    script.write_text(unlocked.ctl("completion", "bash").stdout)
    env = _shell_env(unlocked)
    r = subprocess.run([bash, "--norc", "-c", f"source {script}; complete -p secretsctl"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "complete -F _secretsctl secretsctl"
    assert _bash_complete(script, env, "secretsctl", "st") == ["status"]
    assert _bash_complete(script, env, "secretsctl", "--home", "/x", "g") == ["get"]
    assert _bash_complete(script, env, "secretsctl", "get", "llm/") == ["llm/anthropic",
                                                                       "llm/openai"]
    assert _bash_complete(script, env, "secretsctl", "rm", "--force", "h") == ["hue/bridge"]
    assert _bash_complete(script, env, "secretsctl", "get", "llm/openai", "") == []  # one name only
    assert _bash_complete(script, env, "secretsctl", "get", "--p") == ["--previous"]
    kinds = _bash_complete(script, env, "secretsctl", "set", "--kind", "")
    assert kinds == ["provider", "llm", "device", "generic"]
    assert _bash_complete(script, env, "secretsctl", "completion", "z") == ["zsh"]
    # names follow the --socket typed on the line
    other = {**env, "HOMEAGENT_SECRETS_SOCKET": str(short_tmp / "nothing.sock")}
    assert _bash_complete(script, other, "secretsctl", "get", "hu") == []
    assert _bash_complete(script, other, "secretsctl", "--socket", str(unlocked.socket), "get",
                          "hu") == ["hue/bridge"]
    # a locked agent gives no names, and no error on the terminal
    unlocked.ctl("lock")
    assert _bash_complete(script, env, "secretsctl", "get", "llm/") == []


@pytest.mark.slow
def test_bash_completes_a_name_typed_at_a_real_terminal(unlocked: Daemon, short_tmp: Path) -> None:
    bash = require_tool("bash")
    _named(unlocked)
    script = short_tmp / "secretsctl.bash"
    script.write_text(unlocked.ctl("completion", "bash").stdout)
    with Terminal([bash, "--norc", "--noprofile", "-i"], env=_shell_env(unlocked),
                  stderr_on_terminal=True) as t:
        t.type(f"source {script}; echo ready-$((40 + 2))\n")
        t.expect("ready-42")
        t.type("secretsctl describe llm/o\t")
        t.expect("secretsctl describe llm/openai ")
        t.type("\n")
        t.expect("kind: generic")
        t.type("exit\n")
        t.wait()


@pytest.mark.slow
def test_zsh_completion_is_valid_and_completes_at_a_real_terminal(unlocked: Daemon,
                                                                  short_tmp: Path) -> None:
    zsh = require_tool("zsh")
    _named(unlocked)
    fdir = short_tmp / "zfunc"
    fdir.mkdir()
    script = fdir / "_secretsctl"
    script.write_text(unlocked.ctl("completion", "zsh").stdout)
    r = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    env = _shell_env(unlocked)
    with Terminal([zsh, "-f", "-i"], env=env, stderr_on_terminal=True) as t:
        # installed as the README says: a function file in $fpath, then compinit
        t.type(f"fpath=({fdir} $fpath); autoload -U compinit && compinit -u -D; "
               "echo ready-$((40 + 2))\n")
        t.expect("ready-42")
        t.type("secretsctl desc\t")
        t.expect("secretsctl describe ")
        t.type("hue/\t")
        t.expect("hue/bridge ")
        t.type("\n")
        t.expect("kind: generic")
        t.type("exit\n")
        t.wait()


@pytest.mark.slow
def test_hidden_complete_prints_names_or_nothing(unlocked: Daemon, short_tmp: Path) -> None:
    _named(unlocked)
    r = unlocked.ctl("__complete", "names", "llm/")
    assert (r.returncode, r.stdout, r.stderr) == (0, "llm/anthropic\nllm/openai\n", "")
    assert unlocked.ctl("__complete", "names", "--", "-x").stdout == ""
    assert "__complete" not in unlocked.ctl("--help").stdout
    unlocked.ctl("lock")
    r = unlocked.ctl("__complete", "names", "")
    assert (r.stdout, r.stderr) == ("", "") and r.returncode != 0
    start = time.monotonic()
    r = _ctl("--socket", str(short_tmp / "none.sock"), "__complete", "names", env={})
    assert (r.stdout, r.stderr) == ("", "") and time.monotonic() - start < 10


# --- speed and what secretsctl loads ------------------------------------------------------------


_NEVER = ("anyio", "asyncio", "cryptography", "keyring", "hvac", "requests",
          "importlib.metadata", "email", "zipfile", "shutil", "getpass", "subprocess",
          "typing_extensions", "inspect", "ast", "homeagent_secrets.daemon",
          "homeagent_secrets.protocol.server", "homeagent_secrets.client.aio",
          "homeagent_secrets.client.completion")
_ARGPARSE = ("argparse", "gettext", "locale", "homeagent_secrets.client.cli_parser")


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "never"), [
    # the form scripts run: the standard library only (not even msgspec or argparse)
    (["get", "x"], (*_NEVER, *_ARGPARSE, "msgspec", "homeagent_secrets.client.sync",
                    "homeagent_secrets.protocol.messages", "homeagent_secrets.client.connect")),
    (["--socket", "SOCKET", "get", "x"], (*_NEVER, *_ARGPARSE, "msgspec")),  # the same
    (["get", "--timeout", "5", "x"], _NEVER),  # any other: argparse, still nothing else
])
def test_get_loads_no_async_crypto_metadata_or_help_machinery(
        unlocked: Daemon, argv: list[str], never: tuple[str, ...]) -> None:
    """What keeps `secretsctl get` fast (tests/bench/cli_time.py measures the time)."""
    unlocked.ctl("set", "x", input="v\n")
    argv = [str(unlocked.socket) if a == "SOCKET" else a for a in argv]
    code = textwrap.dedent(f"""
        import sys
        from homeagent_secrets.client.cli import main
        rc = main({argv!r})
        loaded = sorted(sys.modules)
        sys.stderr.write(repr((rc, loaded)))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOMEAGENT_SECRETS_SOCKET": str(unlocked.socket)})
    rc, loaded = eval(r.stderr)  # our own repr of a tuple of str
    assert (rc, r.stdout) == (0, "v\n")
    # the check sees what was imported: the checked socket, and the blocking client for the rest
    assert "homeagent_secrets.client.reach" in loaded
    assert ("homeagent_secrets.client.sync" in loaded) == ("--timeout" in argv)
    assert [m for m in loaded if m.startswith(never)] == []


def test_typing_extensions_is_importable_after_secretsctl_ran(unlocked: Daemon) -> None:
    """It is hidden only while msgspec loads: code run after main() still finds it."""
    unlocked.ctl("set", "x", input="v\n")
    code = ("import sys; from homeagent_secrets.client.cli import main; "
            "main(['--socket', sys.argv[1], 'ls']); import typing_extensions, msgspec; "
            "print(msgspec.json.decode(b'[1]', type=list[int]))")
    r = subprocess.run([sys.executable, "-c", code, str(unlocked.socket)], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "x\n[1]\n", "")


def test_the_entry_module_knows_the_exit_codes_it_cannot_import() -> None:
    from homeagent_secrets.client import cli, cli_errors

    assert (cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED, cli.EXIT_BROKEN_PIPE) == (
        cli_errors.EXIT_ERROR, cli_errors.EXIT_USAGE, cli_errors.EXIT_INTERRUPTED,
        cli_errors.EXIT_BROKEN_PIPE)


def _unimportable(where: Path, *modules: str) -> dict[str, str]:
    """An environment in which ``modules`` cannot be imported (as if not installed)."""
    where.mkdir()
    for mod in modules:
        (where / f"{mod}.py").write_text(f"raise ImportError('not installed', name={mod!r})\n")
    return {"PYTHONPATH": str(where)}


def test_secretsctl_needs_no_optional_dependency(unlocked: Daemon, short_tmp: Path) -> None:
    """With anyio and the daemon extra missing secretsctl works, and secretsd says one line."""
    env = _unimportable(short_tmp / "blocked", "anyio", "cryptography", "keyring", "secretstorage")
    unlocked.ctl("set", "x", input="v\n")
    r = unlocked.ctl("get", "x", env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "v\n", "")
    r = subprocess.run([sys.executable, "-m", "homeagent_secrets.daemon", "--home",
                        str(short_tmp / "h"), "--socket", str(short_tmp / "s.sock")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert r.returncode == 2 and "pip install 'homeagent-secrets[daemon]'" in one_line(r.stderr)


def test_a_broken_installation_is_one_line(unlocked: Daemon, short_tmp: Path) -> None:
    env = _unimportable(short_tmp / "blocked", "msgspec")
    r = unlocked.ctl("ls", env=env)  # (`get NAME` needs only the standard library)
    assert r.returncode == 1 and "'msgspec' is missing" in one_line(r.stderr)


def test_private_files_stay_private(unlocked: Daemon) -> None:
    unlocked.ctl("set", "x", input="v")
    for root, _dirs, files in os.walk(unlocked.home / "secrets"):
        for f in files:
            assert stat.S_IMODE(os.stat(Path(root) / f).st_mode) == 0o600



@pytest.mark.slow
def test_the_quick_get_answers_as_the_general_way_does(unlocked: Daemon, short_tmp: Path) -> None:
    """`[--socket S] get NAME` (the standard-library path) and `get --timeout 10 NAME`
    (argparse and the blocking client): the same output, message and exit status in
    every state."""
    unlocked.ctl("set", "x", input="v\n")

    def both(sock: Path) -> list[tuple[int, str, str]]:
        out = []
        for argv in (["--socket", str(sock), "get", "x"], ["get", "--timeout", "10", "x"],
                     ["get", "nope"], ["get", "--timeout", "10", "nope"]):
            r = subprocess.run([sys.executable, "-m", "homeagent_secrets.client.cli", *argv],
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "HOMEAGENT_SECRETS_SOCKET": str(sock)})
            out.append((r.returncode, r.stdout, r.stderr))
        return out

    def same(sock: Path) -> list[tuple[int, str, str]]:
        got = both(sock)
        assert got[0] == got[1] and got[2] == got[3], got
        return got

    assert [g[0] for g in same(unlocked.socket)] == [0, 0, 4, 4]
    unlocked.ctl("lock")
    locked = same(unlocked.socket)
    assert locked[0][0] == 3 and "locked" in locked[0][2]
    missing = same(short_tmp / "nothing-here.sock")
    assert missing[0][0] == 5 and "cannot reach secretsd" in missing[0][2]
