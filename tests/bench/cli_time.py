"""Wall time of `secretsctl get` against `python -c pass` in the same venv.

Starts a real secretsd (file backend, cheap scrypt) on a temporary home, stores
one secret, then runs the two commands alternately, each ``--runs`` times
after one warm-up run of each, and prints the medians, their spread and the
ratio as one JSON object. The target (README) is a ratio of at most 2.

    python tests/bench/cli_time.py              # 10 alternated runs of each
    python tests/bench/cli_time.py --runs 30

Not a test: timings depend on the machine. ``tests/test_secretsctl.py`` pins
what makes `get` fast (the modules it imports), not a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "bench/one"
PASSPHRASE = "bench passphrase"


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"secretsd exited with {proc.returncode} before listening")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    raise SystemExit(f"nothing listened on {path} within {timeout} s")


def timed(cmd: list[str], env: dict[str, str], expect: bytes | None) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one run of ``cmd``."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    out, err = p.stdout.read(), p.stderr.read()  # a few bytes each: no pipe fills
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    p.stderr.close()
    if p.returncode != 0 or (expect is not None and out != expect):
        raise SystemExit(f"{cmd} failed ({p.returncode}): {err.decode(errors='replace')}")
    return elapsed, usage.ru_utime + usage.ru_stime


def summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times)
    return {"median_ms": round(statistics.median(ms), 1), "min_ms": round(ms[0], 1),
            "max_ms": round(ms[-1], 1),
            "iqr_ms": round(ms[(3 * len(ms)) // 4] - ms[len(ms) // 4], 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="alternated runs of each command")
    p.add_argument("--secretsctl", default=str(Path(sys.executable).parent / "secretsctl"),
                   help="the console script to time (default: the one beside this Python)")
    a = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ha-bench-", dir="/tmp"))
    sock = tmp / "s.sock"
    env = {**os.environ, "HOMEAGENT_SECRETS_SOCKET": str(sock)}
    log = open(tmp / "secretsd.log", "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(tmp / "home"),
         "--socket", str(sock), "--backend", "file", "--scrypt-n", "1024"],
        stdout=log, stderr=log, env=env)
    try:
        wait_for_socket(sock, daemon)
        from homeagent_secrets.client import SecretsClient

        with SecretsClient(sock) as c:
            c.init(PASSPHRASE)
            c.store(NAME, "sk-bench-value")
        baseline = [sys.executable, "-c", "pass"]
        get = [a.secretsctl, "get", NAME]
        # Warm-up: the page cache, and the .pyc files pip writes at install time (an
        # editable install under PYTHONDONTWRITEBYTECODE=1 would otherwise compile
        # our modules on every run, a cost no installed secretsctl pays).
        warm = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        timed(baseline, warm, None)
        timed(get, warm, b"sk-bench-value\n")
        runs: dict[str, list[tuple[float, float]]] = {"pass": [], "get": []}
        for _ in range(a.runs):
            runs["pass"].append(timed(baseline, env, None))
            runs["get"].append(timed(get, env, b"sk-bench-value\n"))
        wall = {k: summary([w for w, _ in v]) for k, v in runs.items()}
        cpu = {k: summary([c for _, c in v]) for k, v in runs.items()}
        print(json.dumps({
            "command": f"{' '.join(get)} vs {' '.join(baseline)}",
            "runs_each": a.runs, "alternated": True,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python_c_pass": wall["pass"], "secretsctl_get": wall["get"],
            "ratio_of_medians": round(wall["get"]["median_ms"] / wall["pass"]["median_ms"], 2),
            "cpu_time": {"python_c_pass": cpu["pass"], "secretsctl_get": cpu["get"],
                         "ratio_of_medians": round(cpu["get"]["median_ms"]
                                                   / cpu["pass"]["median_ms"], 2)},
        }, indent=2))
        return 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
