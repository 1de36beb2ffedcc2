"""Timing side channels of the access rules, measured (not a test: figures to read).

    sudo .venv/bin/python -m tests.attack_timing [ROUNDS]

A throwaway user with rights on provider/hue/* only asks, on one connection,
for names outside its grant that exist and that do not (retrieve, describe,
and list prefixes over 1,000 names, one name, or none), in a random
interleaved order; each figure is the round-trip time of one request, median
and spread, and the difference of the medians with a bootstrap 95% interval.
An interval that straddles 0 means the two cannot be told apart with this
many samples.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from homeagent_secrets.client import SecretsClient

from .conftest import PASSPHRASE, Daemon, User
from .test_attack_rules import connect_as


def _bootstrap_diff(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float, float]:
    rng = random.Random(1)
    diffs = sorted(statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(n))
    return statistics.median(a) - statistics.median(b), diffs[int(n * 0.025)], diffs[int(n * 0.975)]


def _us(x: float) -> str:
    return f"{x * 1e6:7.1f}"


def measure(sock: socket.socket, cases: dict[str, dict[str, object]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in cases}
    lines = {k: json.dumps({"jsonrpc": "2.0", "id": 1, **v}).encode() + b"\n" for k, v in cases.items()}
    order = [k for k in cases for _ in range(rounds)]
    random.shuffle(order)
    for _ in range(200):  # warm up
        sock.sendall(lines[order[0]])
        sock.recv(65536)
    for k in order:
        t0 = time.perf_counter()
        sock.sendall(lines[k])
        buf = sock.recv(65536)
        while not buf.endswith(b"\n"):
            buf += sock.recv(65536)
        times[k].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict[str, list[float]], pairs: list[tuple[str, str]]) -> None:
    print(f"\n{title}")
    for k, v in times.items():
        q = statistics.quantiles(v, n=10)
        print(f"  {k:32s} median {_us(statistics.median(v))} us  p10 {_us(q[0])}  p90 {_us(q[-1])}  n={len(v)}")
    for a, b in pairs:
        d, lo, hi = _bootstrap_diff(times[a], times[b])
        print(f"  {a} - {b}: {_us(d)} us  (95% {_us(lo)} .. {_us(hi)})")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    tag = secrets.token_hex(3)
    group, name = f"hatg{tag}", f"hatm{tag}"
    subprocess.run(["groupadd", "--system", group], check=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "-G", group, name], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="ha-", dir="/tmp"))
    d: Daemon | None = None
    try:
        tmp.chmod(0o711)
        user = User(name, pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid)
        gid = grp.getgrnam(group).gr_gid
        (tmp / "rules.toml").write_text(f'[[rule]]\nuser = "{name}"\nnames = ["provider/hue/*"]\n'
                                        'allow = ["read", "list"]\n')
        d = Daemon(tmp / "home", tmp / "run" / "s.sock", tmp / "d.log",
                   ["--policy", str(tmp / "rules.toml"), "--socket-group", group, "--log-level", "ERROR"])
        d.start()
        with SecretsClient(d.socket) as o:
            o.init(PASSPHRASE)
            o.store("provider/hue/token", "v")
            o.store("admin/root-password", "v" * 200)
            for i in range(1000):
                o.store(f"admin/many/{i:04d}", "v")
        print(f"load average before: {os.getloadavg()}; {rounds} samples per case")
        with connect_as(user, d.socket, [gid]) as c:
            def call(method: str, **params: object) -> dict[str, object]:
                return {"method": method, "params": params}

            times = measure(c.sock, {
                "retrieve present": call("retrieve", name="admin/root-password"),
                "retrieve absent": call("retrieve", name="admin/root-passwore"),
                "retrieve absent (control)": call("retrieve", name="admin/root-passworf"),
                "describe present": call("describe", name="admin/root-password"),
                "describe absent": call("describe", name="admin/root-passwore"),
            }, rounds)
            report("denied reads of a name outside the grant", times,
                   [("retrieve present", "retrieve absent"), ("retrieve absent (control)", "retrieve absent"),
                    ("describe present", "describe absent")])
            times = measure(c.sock, {
                "list admin/many/ (1000 names)": call("list", prefix="admin/many/"),
                "list admin/none/ (0 names)": call("list", prefix="admin/none/"),
                "list admin/root-p (1 name)": call("list", prefix="admin/root-p"),
                "list admin/root-q (0 names)": call("list", prefix="admin/root-q"),
                "list admin/root-r (0, control)": call("list", prefix="admin/root-r"),
            }, rounds)
            report("list prefixes outside the grant (all answer [])", times,
                   [("list admin/many/ (1000 names)", "list admin/none/ (0 names)"),
                    ("list admin/root-p (1 name)", "list admin/root-q (0 names)"),
                    ("list admin/root-r (0, control)", "list admin/root-q (0 names)")])
        print(f"load average after: {os.getloadavg()}")
    finally:
        if d is not None:
            d.kill()
        subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", group], check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
