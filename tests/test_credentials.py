"""Secrets delivered to systemd services, under a real systemd 252 as PID 1.

A ``DynamicUser=yes`` unit with ``LoadCredential=...:/run/homeagent/credentials.sock``
starts and reads exactly the stored bytes; the same unit fails to start when
the agent is locked, the mapping is missing or the secret is absent; a process
that binds its own abstract address claiming to be the unit gets nothing; the
access log names the unit of each delivery.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator

import pytest

from . import container
from .conftest import require_real
from .test_realsystemd import ROOT, SRC, checkout_files

pytestmark = pytest.mark.slow

SOCKET = "/run/homeagent/secretsd.sock"
AS_AGENT = {"HOMEAGENT_SECRETS_SOCKET": SOCKET}
PASSPHRASE = "canary-passphrase-" + secrets.token_hex(6)
VALUE = "hue-token-" + secrets.token_hex(8)  # no trailing newline: delivered as stored
RULES = """
[[credential]]
unit = "hue-bridge.service"
id = "hue_token"
name = "provider/hue/token"

[[credential]]
unit = "hue-bridge.service"
id = "gone"
name = "provider/hue/absent"
"""
UNIT = """[Unit]
Description=a gateway integration that reads its token as a systemd credential

[Service]
Type=oneshot
DynamicUser=yes
LoadCredential={cred}:/run/homeagent/credentials.sock
ExecStart=/bin/sh -c 'echo "uid=$(id -u)|$(base64 -w0 < $CREDENTIALS_DIRECTORY/{cred})"'
"""
IMPOSTOR = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(b"\0" + b"0123456789abcdef/unit/hue-bridge.service/hue_token")
s.connect("/run/homeagent/credentials.sock")
s.shutdown(socket.SHUT_WR)
got = b""
while chunk := s.recv(65536):
    got += chunk
print(len(got))
"""


def write(c: container.Container, path: str, text: str) -> None:
    c.run(["python3", "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])", path, text])


@pytest.fixture(scope="module")
def machine() -> Iterator[container.Container]:
    reason = container.unavailable()
    require_real(reason is None, f"a container that can boot ({reason})")
    with container.booted(extra_packages=("procps",)) as c:
        c.copy_in(ROOT, SRC, checkout_files())
        c.run(["bash", f"{SRC}/systemd/install.sh"])
        write(c, "/etc/homeagent/rules.toml", RULES)
        c.run("chmod 0644 /etc/homeagent/rules.toml && "
              "echo 'policy_file = \"/etc/homeagent/rules.toml\"' >> /etc/homeagent/secretsd.toml && "
              "echo 'audit_log = \"/var/lib/homeagent/audit.jsonl\"' >> /etc/homeagent/secretsd.toml")
        c.run("systemctl enable --now secretsd.socket secretsd-credentials.socket secretsd.service")
        c.run(["secretsctl", "init"], user="homeagent", env=AS_AGENT, input=PASSPHRASE + "\n")
        c.run(["secretsctl", "set", "--raw", "provider/hue/token"], user="homeagent", env=AS_AGENT,
              input=VALUE, check=False)
        if c.run(["secretsctl", "get", "provider/hue/token"], user="homeagent", env=AS_AGENT,
                 check=False).stdout.strip() != VALUE:  # a secretsctl without --raw
            c.run(["secretsctl", "set", "provider/hue/token"], user="homeagent", env=AS_AGENT,
                  input=VALUE + "\n")
        yield c


def start(c: container.Container, cred: str) -> tuple[int, str]:
    """Start the demo unit asking for ``cred``; (exit code of `systemctl start`, its output)."""
    write(c, "/etc/systemd/system/hue-bridge.service", UNIT.format(cred=cred))
    c.run("systemctl daemon-reload && systemctl reset-failed hue-bridge.service", check=False)
    r = c.run("systemctl start hue-bridge.service", check=False)
    deadline = time.monotonic() + 10
    while True:  # journald writes asynchronously: wait for the unit's last word
        out = c.run("journalctl -u hue-bridge.service -o cat --no-pager -n 20", check=False).stdout
        if ("Failed to start" if r.returncode else "Finished") in out or time.monotonic() > deadline:
            return r.returncode, out
        time.sleep(0.1)


def agent_log(c: container.Container) -> str:
    time.sleep(0.2)  # journald writes asynchronously
    return c.run("journalctl -u secretsd.service -o cat --no-pager", check=False).stdout


def test_a_dynamic_user_unit_reads_exactly_the_stored_bytes(machine: container.Container) -> None:
    rc, out = start(machine, "hue_token")
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith("uid="))
    uid, b64 = line.removeprefix("uid=").split("|", 1)
    import base64

    assert base64.b64decode(b64) == VALUE.encode()  # exactly: no newline added
    assert int(uid) >= 61184  # a DynamicUser= uid
    assert "delivered credential 'hue_token' to hue-bridge.service" in agent_log(machine)


@pytest.mark.parametrize(("cred", "why"), [
    ("unmapped", "no [[credential]] in the rules maps it"),
    ("gone", "that secret does not exist"),
])
def test_a_credential_the_agent_cannot_serve_keeps_the_unit_from_starting(
    machine: container.Container, cred: str, why: str
) -> None:
    rc, out = start(machine, cred)
    assert rc != 0
    assert "243/CREDENTIALS" in out, out
    log = agent_log(machine)
    assert f"credential '{cred}' for hue-bridge.service" in log and why in log
    assert "the unit will not start" in log


def test_a_locked_agent_keeps_the_unit_from_starting(machine: container.Container) -> None:
    machine.run(["secretsctl", "lock"], user="homeagent", env=AS_AGENT)
    try:
        rc, out = start(machine, "hue_token")
        assert rc != 0 and "243/CREDENTIALS" in out, out
        assert "the agent is locked" in agent_log(machine)
    finally:
        machine.run(["secretsctl", "unlock"], user="homeagent", env=AS_AGENT, input=PASSPHRASE + "\n")
    rc, out = start(machine, "hue_token")
    assert rc == 0, out


@pytest.mark.parametrize("who", ["nobody", "root"])
def test_an_impostor_claiming_to_be_the_unit_gets_nothing(machine: container.Container, who: str) -> None:
    """A process that binds systemd's kind of abstract address itself: as another user,
    and even as root outside the unit's cgroup."""
    write(machine, "/tmp/impostor.py", IMPOSTOR)
    machine.run("chmod 0644 /tmp/impostor.py && chmod 0755 /run/homeagent")  # let it try to connect
    try:
        r = machine.run(["python3", "/tmp/impostor.py"], user=None if who == "root" else who, check=False)
    finally:
        machine.run("chmod 0750 /run/homeagent")
    if who == "nobody":  # the socket itself (0600) keeps it out, or the agent does
        assert r.returncode != 0 or r.stdout.strip() == "0", (r.stdout, r.stderr)
    else:
        assert r.returncode == 0 and r.stdout.strip() == "0", (r.stdout, r.stderr)
        assert "only systemd starting that unit is believed" in agent_log(machine)
    assert VALUE not in r.stdout


def test_the_access_log_shows_each_delivery_with_its_unit(machine: container.Container) -> None:
    start(machine, "hue_token")
    time.sleep(0.2)
    events = [json.loads(line) for line in
              machine.run("cat /var/lib/homeagent/audit.jsonl").stdout.splitlines()]
    mine = [e for e in events if e["method"] == "credential"]
    assert any(e["unit"] == "hue-bridge.service" and e["outcome"] == "ok" and e["uid"] == 0
               and e["name"] == "provider/hue/token" for e in mine)
    assert any(e["outcome"] == "denied" for e in mine)  # the root impostor
    assert any(e["outcome"] == "not_found" and e["name"] is None for e in mine)  # unmapped
    text = machine.run("cat /var/lib/homeagent/audit.jsonl").stdout + agent_log(machine)
    assert VALUE not in text and PASSPHRASE not in text
