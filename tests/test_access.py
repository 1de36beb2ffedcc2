"""Access rules, whoami, -32010 and the access log, with real processes under real
throwaway uids (useradd/groupadd here, as root): peers reach the socket through
a group, and each may do only what a rule grants it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.daemon.peer import unit_of_cgroup
from homeagent_secrets.daemon.policy import PolicyError, load
from homeagent_secrets.protocol.names import glob_regex

from .conftest import PASSPHRASE, Crowd, Daemon, User, audit_settled, run_as


def calls_as(sock: Path, calls: list[tuple[str, list[object]]]) -> bytes:
    """Make the calls with the blocking client; their outcomes as JSON."""
    import msgspec

    from homeagent_secrets.client import SecretsError

    out: list[dict[str, object]] = []
    with SecretsClient(sock, timeout=10) as c:
        for method, args in calls:
            try:
                result = getattr(c, method)(*args)
                out.append({"ok": msgspec.to_builtins(result)})
            except SecretsError as exc:
                out.append({"code": exc.code, "message": exc.message})
    return json.dumps(out).encode()


def as_user(user: User, sock: Path, calls: list[tuple[str, list[object]]],
            groups: list[int] | None = None) -> list[dict[str, object]]:
    """Make client calls in a separate process under ``user``; their outcomes."""
    raw = run_as(user.uid, user.gid, lambda: calls_as(sock, calls), groups=groups)
    assert not raw.startswith(b"EXC"), raw
    return json.loads(raw)  # type: ignore[no-any-return]


def rules(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def guarded(short_tmp: Path, crowd: Crowd) -> Iterator[tuple[Daemon, Crowd, Path, Path]]:
    """An agent serving the crowd's group, with rules for the hue user and an access log."""
    short_tmp.chmod(0o711)  # the group's members must reach the socket's directory
    policy = rules(short_tmp / "rules.toml", f"""
        [[rule]]
        user = "{crowd.hue.name}"
        names = ["provider/hue/*"]
        allow = ["read", "list"]
    """)
    audit = short_tmp / "audit.jsonl"
    sock = short_tmp / "run" / "s.sock"
    d = Daemon(short_tmp / "home", sock, short_tmp / "d.log",
               ["--policy", str(policy), "--socket-group", crowd.group, "--audit-log", str(audit)])
    d.start()
    with SecretsClient(sock) as c:
        c.init(PASSPHRASE)
        c.store("provider/hue/token", "hue-token-value")
        c.store("provider/hue/bridge-id", "bridge-7")
        c.store("provider/hue/x/deeper", "not under one segment")
        c.store("llm/openai", "sk-openai")
    yield d, crowd, policy, audit
    d.stop()


def test_the_socket_is_0660_for_the_group_in_a_0750_directory(guarded: tuple[Daemon, Crowd, Path, Path]) -> None:
    d, crowd, _, _ = guarded
    st, dst = os.stat(d.socket), os.stat(d.socket.parent)
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, crowd.gid)
    assert (dst.st_mode & 0o777, dst.st_gid) == (0o750, crowd.gid)


def test_a_rule_grants_exactly_its_names_and_actions(guarded: tuple[Daemon, Crowd, Path, Path]) -> None:
    d, crowd, _, _ = guarded
    got = as_user(crowd.hue, d.socket, [
        ("get", ["provider/hue/token"]),
        ("get", ["provider/hue/missing"]),
        ("get", ["llm/openai"]),
        ("get", ["llm/absent"]),
        ("get", ["provider/hue/x/deeper"]),
        ("list", []),
        ("list", ["llm/"]),
        ("describe", ["provider/hue/token"]),
        ("store", ["provider/hue/token", "overwritten?"]),
        ("delete", ["provider/hue/token"]),
        ("lock", []),
    ], groups=[crowd.gid])
    assert got[0] == {"ok": "hue-token-value"}
    assert got[1] == {"ok": None}  # a name it may read that does not exist: absent
    assert got[2]["code"] == got[3]["code"] == got[4]["code"] == -32010
    # "absent" and "denied" look the same for a name it may not read
    assert str(got[2]["message"]).replace("openai", "X") == str(got[3]["message"]).replace("absent", "X")
    assert got[5] == {"ok": ["provider/hue/bridge-id", "provider/hue/token"]}
    assert got[6] == {"ok": []}
    assert got[7]["ok"]["kind"] == "generic"  # type: ignore[index]
    assert [g["code"] for g in got[8:]] == [-32010, -32010, -32010]
    with SecretsClient(d.socket) as c:  # nothing changed
        assert c.get("provider/hue/token") == "hue-token-value" and c.status().locked is False


def test_a_peer_without_a_rule_gets_status_and_whoami_only(guarded: tuple[Daemon, Crowd, Path, Path]) -> None:
    d, crowd, _, _ = guarded
    got = as_user(crowd.other, d.socket, [
        ("status", []), ("whoami", []), ("get", ["provider/hue/token"]), ("list", []),
        ("describe", ["llm/openai"]), ("store", ["x", "y"]), ("unlock", ["nope"]),
    ], groups=[crowd.gid])
    assert got[0]["ok"]["initialized"] is True  # type: ignore[index]
    who = got[1]["ok"]
    assert who["uid"] == crowd.other.uid and who["rights"] == [] and who["pid"] > 0  # type: ignore[index]
    assert [g["code"] for g in got[2:]] == [-32010] * 5


def test_whoami_shows_the_rules_that_apply(guarded: tuple[Daemon, Crowd, Path, Path]) -> None:
    d, crowd, _, _ = guarded
    (got,) = as_user(crowd.hue, d.socket, [("whoami", [])], groups=[crowd.gid])
    assert got["ok"] == {"uid": crowd.hue.uid, "gid": crowd.hue.gid, "pid": got["ok"]["pid"],  # type: ignore[index]
                         "unit": None, "rights": [{"names": ["provider/hue/*"], "allow": ["list", "read"]}]}
    with SecretsClient(d.socket) as c:  # the agent's own uid (root here) has everything
        assert c.whoami().rights[0].names == ["**"]


def test_a_user_outside_the_group_cannot_even_connect(guarded: tuple[Daemon, Crowd, Path, Path]) -> None:
    d, crowd, _, _ = guarded
    (got,) = as_user(crowd.outsider, d.socket, [("status", [])])
    assert got["code"] == -32099 and "permission denied" in str(got["message"])


def test_every_call_is_in_the_access_log_and_denials_in_the_journal(
    guarded: tuple[Daemon, Crowd, Path, Path]
) -> None:
    d, crowd, _, audit = guarded
    as_user(crowd.hue, d.socket, [("get", ["provider/hue/token"]), ("get", ["llm/openai"]),
                                  ("get", ["provider/hue/missing"])], groups=[crowd.gid])
    audit_settled(d.socket)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [e for e in events if e["uid"] == crowd.hue.uid]
    assert [(e["method"], e["name"], e["outcome"], e["code"]) for e in mine] == [
        ("retrieve", "provider/hue/token", "ok", None),
        ("retrieve", "llm/openai", "denied", -32010),
        ("retrieve", "provider/hue/missing", "not_found", None),
    ]
    for e in mine:
        assert set(e) == {"time", "uid", "pid", "unit", "method", "name", "outcome", "code"}
        assert e["time"].endswith("Z") and e["pid"] > 0
    assert os.stat(audit).st_mode & 0o777 == 0o600
    text = audit.read_text() + d.log_text()
    for value in ("hue-token-value", "sk-openai", PASSPHRASE):
        assert value not in text
    assert "WARNING homeagent_secrets.audit: denied retrieve of llm/openai" in d.log_text()


@pytest.mark.slow
def test_sighup_reloads_rules_and_keeps_the_old_ones_when_the_new_are_bad(
    guarded: tuple[Daemon, Crowd, Path, Path]
) -> None:
    d, crowd, policy, audit = guarded
    assert as_user(crowd.other, d.socket, [("get", ["llm/openai"])], groups=[crowd.gid])[0]["code"] == -32010
    rules(policy, f"""
        [[rule]]
        user = "{crowd.other.name}"
        names = ["llm/**"]
        allow = ["read"]
    """)
    audit.rename(audit.with_suffix(".1"))  # logrotate moves it; SIGHUP reopens
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded the access rules" not in d.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert as_user(crowd.other, d.socket, [("get", ["llm/openai"])], groups=[crowd.gid]) == [{"ok": "sk-openai"}]
    audit_settled(d.socket)
    assert audit.exists() and "llm/openai" in audit.read_text()  # the new file after the move
    rules(policy, '[[rule]]\nuser = "x"\nnames = ["a"]\nallow = ["read", "fly"]\n')
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in d.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload refused, the old rules stay in force" in d.log_text()
    assert as_user(crowd.other, d.socket, [("get", ["llm/openai"])], groups=[crowd.gid]) == [{"ok": "sk-openai"}]


@pytest.mark.slow
@pytest.mark.parametrize(("text", "words"), [
    ('[[rule]]\nuser = "root"\nnames = ["a"]\nallow = ["read", "fly"]\n', "allow[1]"),
    ('[[rule]]\nuser = "root"\nnames = ["a"]\nallow = ["read"]\ncolour = "red"\n', "unknown field"),
    ('[[rule]]\nnames = ["a"]\nallow = ["read"]\n', "say whom it is for"),
    ('[[rule]]\nuser = "no-such-user-xyz"\nnames = ["a"]\nallow = ["read"]\n', "no user named"),
    ('[[rule]]\nuid = 5\nnames = []\nallow = ["read"]\n', "need names"),
    ('[[rule]]\nuid = 5\nnames = ["../x"]\nallow = ["read"]\n', "not a name pattern"),
    ('[[credential]]\nunit = "a.service"\nid = "x"\nname = "bad name"\n', "not a secret name"),
    ('[[rules]]\nuid = 5\n', "unknown field"),
])
def test_a_bad_rules_file_refuses_the_start_in_one_line(short_tmp: Path, text: str, words: str) -> None:
    path = rules(short_tmp / "bad.toml", text)
    with pytest.raises(PolicyError) as err:
        load(path)
    assert words in err.value.message and str(path) in err.value.message
    r = subprocess.run([*Daemon.command(short_tmp / "h", short_tmp / "s.sock"), "--policy", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("pattern", "yes", "no"), [
    ("provider/hue/*", ["provider/hue/token"], ["provider/hue", "provider/hue/a/b", "provider/huex/t"]),
    ("provider/**", ["provider", "provider/a", "provider/a/b/c"], ["providers/a", "llm/provider"]),
    ("**/token", ["token", "a/token", "a/b/token"], ["a/token2", "tokens"]),
    ("a/**/z", ["a/z", "a/b/z", "a/b/c/z"], ["a/b", "b/a/z"]),
    ("llm/open*", ["llm/openai", "llm/open"], ["llm/open/x", "llm/anthropic"]),
    ("dev/?", ["dev/1"], ["dev/12", "dev/"]),
    ("**", ["a", "a/b"], []),
])
def test_name_globs_work_on_segments(pattern: str, yes: list[str], no: list[str]) -> None:
    regex = glob_regex(pattern)
    assert [n for n in yes if not regex.match("/" + n)] == []
    assert [n for n in no if regex.match("/" + n)] == []


def test_the_unit_is_read_from_the_cgroup_line() -> None:
    assert unit_of_cgroup("0::/system.slice/hue-bridge.service\n") == "hue-bridge.service"
    assert unit_of_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/llm.service\n") == "llm.service"
    assert unit_of_cgroup("0::/system.slice/foo.service/payload\n") == "foo.service"
    assert unit_of_cgroup("0::/\n") is None and unit_of_cgroup("") is None
    assert unit_of_cgroup("12:cpu:/system.slice/x.service\n") is None  # cgroup v1 lines are not read


def test_without_rules_other_uids_are_refused_at_connect(short_tmp: Path, crowd: Crowd) -> None:
    """Exactly the behaviour from before rules existed, even through the group's socket."""
    short_tmp.chmod(0o711)
    d = Daemon(short_tmp / "home", short_tmp / "run" / "s.sock", short_tmp / "d.log",
               ["--socket-group", crowd.group]).start()
    got = as_user(crowd.hue, d.socket, [("status", [])], groups=[crowd.gid])
    assert got[0]["code"] == -32099  # the connection was closed at once
    assert f"refused connection from uid {crowd.hue.uid}" in d.log_text()
    d.stop()


@pytest.mark.slow
def test_secretsctl_whoami_and_audit(guarded: tuple[Daemon, Crowd, Path, Path]) -> None:
    d, crowd, _, _audit = guarded
    as_user(crowd.hue, d.socket, [("get", ["provider/hue/token"]), ("get", ["llm/openai"])],
            groups=[crowd.gid])
    who = d.ctl("whoami")
    assert who.returncode == 0 and "uid: 0" in who.stdout and "on **" in who.stdout
    r = d.ctl("audit", "--name", "llm/*")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all("llm/openai" in line for line in lines)
    assert any(f"uid {crowd.hue.uid}" in line and "denied -32010" in line for line in lines)
    assert "provider/hue/token" in d.ctl("audit", "--since", "1h").stdout
    assert d.ctl("audit", "--since", "2099-01-01T00:00").stdout == ""
    assert json.loads(d.ctl("audit", "--json", "--name", "provider/**").stdout.splitlines()[0])["uid"] >= 0
    assert d.ctl("audit", "--since", "yesterday").returncode == 2
    for value in ("hue-token-value", "sk-openai"):
        assert value not in d.ctl("audit").stdout


@pytest.mark.slow
def test_secretsctl_exits_7_when_the_rules_deny(guarded: tuple[Daemon, Crowd, Path, Path]) -> None:
    d, crowd, _, _ = guarded

    # The interpreter may live under /root (pyenv), unreadable to the user: start it as
    # root, import what secretsctl loads, then become the user and run it.
    drop = ("import os, sys, argparse, gettext, getpass, json, textwrap, datetime, locale, encodings.idna; "
            "from homeagent_secrets.client import cli, cli_parser, cli_commands, cli_input, cli_output, "
            "connect, sync; os.setgroups([int(sys.argv[3])]); os.setgid(int(sys.argv[2])); "
            "os.setuid(int(sys.argv[1])); sys.exit(cli.main(sys.argv[4:]))")

    def ctl_as(user: User, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", drop, str(user.uid), str(user.gid), str(crowd.gid),
                               "--socket", str(d.socket), *args], capture_output=True, text=True, timeout=60,
                              cwd="/", env={**os.environ, "HOME": "/nonexistent"})

    ok = ctl_as(crowd.hue, "get", "provider/hue/token")
    assert ok.returncode == 0 and ok.stdout == "hue-token-value\n", ok.stderr
    for args in (("get", "llm/openai"), ("get", "device/lock/pin"), ("set", "provider/hue/x",
                                                                              "--value-file", "/dev/null")):
        denied = ctl_as(crowd.hue, *args)
        assert denied.returncode == 7, (args, denied.returncode, denied.stderr)
        assert "permission denied" in denied.stderr and "whoami" in denied.stderr
        assert "Traceback" not in denied.stderr


def _whoami_on(s: socket.socket) -> dict[str, object]:
    s.settimeout(10)
    s.sendall(b'{"jsonrpc":"2.0","method":"whoami","id":1}\n')
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, "the agent closed the connection"
        buf += chunk
    return json.loads(buf)["result"]  # type: ignore[no-any-return]


def test_a_peer_that_exited_lends_nothing_to_the_process_that_takes_its_pid(short_tmp: Path, crowd: Crowd) -> None:
    """Rights from a group come from /proc/<pid>/status, read at accept. A peer that
    connected and exited, its pid then taken by another process of the same uid that
    *is* in the group, must not get the group's rights: the pidfd says the peer died."""
    short_tmp.chmod(0o711)
    policy = rules(short_tmp / "rules.toml", f"""
        [[rule]]
        group = "{crowd.group}"
        names = ["provider/**"]
        allow = ["read"]
    """)
    sock = short_tmp / "run" / "s.sock"
    d = Daemon(short_tmp / "home", sock, short_tmp / "d.log",
               ["--policy", str(policy), "--socket-group", crowd.group]).start()
    user = crowd.other
    # The control: a live member of the group gets the group's rule.
    (live,) = as_user(user, sock, [("whoami", [])], groups=[crowd.gid])
    assert live["ok"]["rights"] == [{"names": ["provider/**"], "allow": ["read"]}]  # type: ignore[index]

    def become() -> None:
        os.setgroups([crowd.gid])
        os.setgid(user.gid)
        os.setuid(user.uid)

    for _attempt in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.kill(d.pid, signal.SIGSTOP)  # the connection waits in the backlog, not yet accepted
        holder = -1
        release_r, release_w = os.pipe()
        try:
            a = os.fork()
            if a == 0:
                try:
                    become()
                    s.connect(str(sock))
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            assert os.waitpid(a, 0)[1] == 0
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(a - 1))  # the next fork gets the dead peer's pid
            ready_r, ready_w = os.pipe()
            holder = os.fork()
            if holder == 0:
                try:
                    become()
                    os.close(release_w)
                    os.write(ready_w, b"!")
                    os.read(release_r, 1)
                finally:
                    os._exit(0)
            os.close(ready_w)
            assert os.read(ready_r, 1) == b"!"  # in the group before the agent looks
            os.close(ready_r)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        try:
            if holder != a:
                s.close()
                continue  # another process took the pid first: try again
            with open(f"/proc/{a}/status") as f:
                assert str(crowd.gid) in next(line for line in f if line.startswith("Groups:"))
            who = _whoami_on(s)
            assert who["pid"] == a and who["uid"] == user.uid
            assert who["rights"] == [], who  # the holder's groups were not lent to the dead peer
            s.close()
            return
        finally:
            os.close(release_w)
            os.close(release_r)
            if holder > 0:
                os.waitpid(holder, 0)
    pytest.fail("no process could be placed on the freed pid in 5 attempts (a busy machine?)")
