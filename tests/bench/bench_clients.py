"""The client targets, measured against a real secretsd (file backend), in one run:

1. cached ``get``: calls per second of ``SecretsClient(cache=True).get`` in a tight
   loop in one process (target >= 500,000), beside the uncached call and the
   async client's cached ``get``;
2. change latency: from the moment a writer has a ``rotate``'s answer to the
   moment each of 100 watchers has the event, p99 (target <= 5 ms); watchers
   on raw sockets in one epoll process, and through ``SecretsClient.watch``;
3. 1,000 watching connections held: the daemon's VmRSS before and after
   (target: growth under 50 MB), and one event fanned out to all of them.

Each figure is the median of ``--repeats`` runs, with min and max. Prints one
JSON report (and a short summary on stderr).

    python tests/bench/bench_clients.py            # about 2 minutes
    python tests/bench/bench_clients.py --quick    # shorter runs, same shape
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: tests.* helpers

from tests.conftest import Daemon  # noqa: E402

PASS = "bench passphrase"
KEY = "bench/rotated"


def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": len(values)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@contextmanager
def daemon(*args: str) -> Iterator[Daemon]:
    tmp = Path(tempfile.mkdtemp(prefix="ha-bench-", dir="/tmp"))
    d = Daemon(tmp / "home", tmp / "s.sock", tmp / "log", ["--log-level", "WARNING", *args])
    d.start()
    try:
        from homeagent_secrets.client import SecretsClient

        with SecretsClient(d.socket) as c:
            c.init(PASS)
        yield d
    finally:
        d.kill()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


# --- 1. cached get -----------------------------------------------------------------------


def loop_rate(fn: Any, names: list[str], secs: float) -> float:
    """Calls per second of ``fn(name)`` in a tight loop over ``names`` (the clock read
    once per pass over a block of 1,000 names)."""
    block = (names * (1000 // len(names) + 1))[:1000]
    k = 0
    t0 = time.perf_counter()
    end = t0 + secs
    while True:
        for name in block:
            fn(name)
        k += 1000
        if time.perf_counter() >= end:
            break
    return k / (time.perf_counter() - t0)


def bench_cached_get(secs: float, repeats: int) -> dict[str, Any]:
    import anyio

    from homeagent_secrets.client import AsyncSecretsClient, SecretsClient
    from homeagent_secrets.client.cache import wait_live

    names = [f"bench/app/{i:03d}" for i in range(100)]
    out: dict[str, Any] = {"names": len(names), "seconds_per_run": secs}
    with daemon() as d:
        with SecretsClient(d.socket) as w:
            for n in names:
                w.store(n, "v" * 64)
        c = SecretsClient(d.socket, cache=True)
        try:
            c.get(names[0])
            assert c.cache is not None and wait_live(c.cache, 10)
            for n in names:
                c.get(n)
            assert len(c.cache.core.entries) == len(names)
            rates = [loop_rate(c.get, names, secs) for _ in range(repeats)]
            assert len(c.cache.core.entries) == len(names)  # served from memory throughout
            out["cached_get_per_s"] = spread(rates, 0)
        finally:
            c.close()
        with SecretsClient(d.socket) as u:
            out["uncached_get_per_s"] = spread([loop_rate(u.get, names, min(secs, 1.0)) for _ in range(repeats)], 0)

        async def async_rates() -> list[float]:
            async with AsyncSecretsClient(d.socket, cache=True) as a:
                for n in names:
                    await a.get(n)
                block = names * 10
                rates = []
                for _ in range(repeats):
                    k = 0
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < secs:
                        for name in block:
                            await a.get(name)
                        k += len(block)
                    rates.append(k / (time.perf_counter() - t0))
                return rates

        out["async_cached_get_per_s"] = spread(anyio.run(async_rates), 0)
    return out


# --- 2. rotate answer -> watcher event ------------------------------------------------------

RAW_WATCHER = r"""
import json, select, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"watch","params":{"patterns":["bench/rotated"]}}\n')
    buf = b""
    while b"\n" not in buf:
        buf += s.recv(4096)
    s.setblocking(False); socks.append(s)
ep = select.epoll(); fds = {}
for s in socks:
    ep.register(s.fileno(), select.EPOLLIN); fds[s.fileno()] = [s, b""]
got = {}
print("ready", flush=True)  # every watch is answered: open
last = time.monotonic() + 60
while time.monotonic() - last < 3:
    for fd, _ in ep.poll(0.5):
        now = time.monotonic_ns()
        last = time.monotonic()
        s, buf = fds[fd]
        buf += s.recv(65536)
        *lines, fds[fd][1] = buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if msg.get("method") == "changed":
                got[f'{fd}:{msg["params"]["version"]}'] = now
print(json.dumps(got), flush=True)
"""

LIB_WATCHER = r"""
import json, sys, threading, time
from homeagent_secrets.client import AgentUnreachableError, SecretsClient
path, n = sys.argv[1], int(sys.argv[2])
got = {}
seen = threading.Semaphore(0)
def watch(i):
    first = True
    try:
        with SecretsClient(path) as c:
            for ev in c.watch(["bench/rotated"], timeout=3):  # ends 3 s after the last event
                got[f"{i}:{ev.version}"] = time.monotonic_ns()
                if first:
                    first = False
                    seen.release()
    except AgentUnreachableError:
        pass
threads = [threading.Thread(target=watch, args=(i,)) for i in range(n)]
for t in threads: t.start()
with SecretsClient(path) as w:  # warm-up: until every watcher has had an event
    for _ in range(n):
        while not seen.acquire(timeout=0.05):
            w.rotate("bench/rotated", "warm-up")
print("ready", flush=True)
for t in threads: t.join(60)
print(json.dumps(got), flush=True)
"""

ASYNC_WATCHER = r"""
import json, sys, time
import anyio
from homeagent_secrets.client import AsyncSecretsClient, SecretsClient
path, n = sys.argv[1], int(sys.argv[2])
got = {}
async def main():
    first_seen = 0
    everyone = anyio.Event()
    async def watch(i, c):
        nonlocal first_seen
        first = True
        with anyio.move_on_after(60) as scope:
            async for ev in c.watch(["bench/rotated"]):
                got[f"{i}:{ev.version}"] = time.monotonic_ns()
                if first:
                    first = False
                    first_seen += 1
                    if first_seen == n:
                        everyone.set()
    async with AsyncSecretsClient(path) as c, anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(watch, i, c)
        with SecretsClient(path) as w:  # warm-up: until every watcher has had an event
            while not everyone.is_set():
                w.rotate("bench/rotated", "warm-up")
                with anyio.move_on_after(0.05):
                    await everyone.wait()
        print("ready", flush=True)
        quiet = time.monotonic()
        count = len(got)
        while time.monotonic() - quiet < 3:  # ends 3 s after the last event
            await anyio.sleep(0.2)
            if len(got) != count:
                count, quiet = len(got), time.monotonic()
        tg.cancel_scope.cancel()
anyio.run(main)
print(json.dumps(got), flush=True)
"""


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def one_latency_run(d: Daemon, code: str, watchers: int, processes: int, rotates: int,
                    gap: float) -> dict[str, float]:
    """``watchers`` watchers in ``processes`` processes; ``rotates`` rotates ``gap`` apart."""
    from homeagent_secrets.client import SecretsClient

    procs = [subprocess.Popen([sys.executable, "-c", code, str(d.socket), str(watchers // processes)],
                              stdout=subprocess.PIPE, text=True, cwd=HERE.parents[1])
             for _ in range(processes)]
    got: dict[str, int] = {}
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        answered: dict[int, int] = {}
        with SecretsClient(d.socket) as w:
            for i in range(rotates):
                version = w.rotate(KEY, f"value {i}")
                answered[version] = time.monotonic_ns()
                time.sleep(gap)
        for n, p in enumerate(procs):
            assert p.stdout is not None
            got.update({f"{n}/{k}": t for k, t in json.loads(p.stdout.readline()).items()})
    finally:
        for p in procs:
            p.kill()
            p.wait()
    lat = sorted((t - answered[int(k.split(":")[1])]) / 1e6 for k, t in got.items()
                 if int(k.split(":")[1]) in answered)  # not the warm-up's
    return {"samples": len(lat), "expected": watchers * rotates, "p50_ms": percentile(lat, 0.5),
            "p99_ms": percentile(lat, 0.99), "max_ms": lat[-1],
            "before_answer_share": round(sum(x < 0 for x in lat) / len(lat), 3)}


#: The layouts the 5 ms target is about: the agent's own fan-out to 100 watching
#: connections, and 100 library watchers as gateway processes hold them (a few per
#: process). The one-interpreter layouts are reported for what a single Python
#: process adds when it alone runs 100 watchers (threads queue for the GIL).
TARGET_LAYOUTS = ("raw_sockets_1_process", "library_watch_10_processes_x_10_threads")


def bench_latency(watchers: int, rotates: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"watchers": watchers, "rotates_per_run": rotates, "gap_s": 0.01}
    with daemon() as d:
        from homeagent_secrets.client import SecretsClient

        with SecretsClient(d.socket) as w:
            w.store(KEY, "start")
        layouts = (("raw_sockets_1_process", RAW_WATCHER, 1),
                   ("library_watch_10_processes_x_10_threads", LIB_WATCHER, 10),
                   ("async_library_watch_1_process_x_100_tasks", ASYNC_WATCHER, 1),
                   ("library_watch_1_process_x_100_threads", LIB_WATCHER, 1))
        for label, code, processes in layouts:
            runs = [one_latency_run(d, code, watchers, processes, rotates, 0.01) for _ in range(repeats)]
            out[label] = {
                "p99_ms": spread([r["p99_ms"] for r in runs], 3),
                "p50_ms": spread([r["p50_ms"] for r in runs], 3),
                "max_ms": spread([r["max_ms"] for r in runs], 3),
                "delivered": f"{sum(r['samples'] for r in runs)}/{sum(r['expected'] for r in runs)}",
                "before_answer_share": spread([r["before_answer_share"] for r in runs], 3),
            }
    return out


# --- 3. 1,000 watching connections -----------------------------------------------------------


def open_watchers(path: Path, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"watch","params":{"patterns":["bench/**"]}}\n')
        socks.append(s)
    for s in socks:  # every answer
        s.settimeout(30)
        buf = b""
        while b"\n" not in buf:
            buf += s.recv(4096)
        assert b'"result"' in buf, buf
    return socks


def bench_connections(n: int, hold: float, repeats: int) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * n + 256)), hard))
    growth, before_l, after_l, fanout = [], [], [], []
    for _ in range(repeats):
        with daemon("--max-connections", str(n + 100)) as d:
            from homeagent_secrets.client import SecretsClient

            with SecretsClient(d.socket) as c:
                c.store("bench/x", "v")
                open_watchers(d.socket, 20)  # warm the code paths, then let them go
                time.sleep(0.5)
                before = rss_mb(d.pid)
                socks = open_watchers(d.socket, n)
                time.sleep(hold)  # held: a watching connection is never idle
                after = rss_mb(d.pid)
                t0 = time.monotonic()
                c.rotate("bench/x", "w")
                ep = select.epoll()
                for s in socks:
                    s.setblocking(False)
                    ep.register(s.fileno(), select.EPOLLIN)
                pending = {s.fileno(): s for s in socks}
                while pending and time.monotonic() - t0 < 30:
                    for fd, _ in ep.poll(1):
                        if fd in pending and b"changed" in pending[fd].recv(65536):
                            del pending[fd]
                fanout.append((time.monotonic() - t0) * 1000)
                assert not pending, f"{len(pending)} watchers got no event"
                for s in socks:
                    s.close()
            before_l.append(before)
            after_l.append(after)
            growth.append(after - before)
    return {"connections": n, "held_s": hold, "rss_before_mb": spread(before_l),
            "rss_after_mb": spread(after_l), "rss_growth_mb": spread(growth),
            "one_event_to_all_ms": spread(fanout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, same shape")
    ap.add_argument("--repeats", type=int, default=None)
    a = ap.parse_args()
    repeats = a.repeats or (3 if a.quick else 5)
    report: dict[str, Any] = {  # the JSON report: mixed values
        "command": "python tests/bench/bench_clients.py" + (" --quick" if a.quick else ""),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "cached_get": bench_cached_get(1.0 if a.quick else 2.0, repeats),
        "rotate_to_watcher_event": bench_latency(100, 50 if a.quick else 200, min(repeats, 3)),
        "watching_connections": bench_connections(1000, 2.0 if a.quick else 5.0, min(repeats, 3)),
    }
    targets = {
        "cached_get_per_s >= 500000": report["cached_get"]["cached_get_per_s"]["median"] >= 500_000,
        **{f"p99 rotate->event <= 5 ms ({k})": report["rotate_to_watcher_event"][k]["p99_ms"]["median"] <= 5
           for k in TARGET_LAYOUTS},
        "1000 watchers rss growth < 50 MB": report["watching_connections"]["rss_growth_mb"]["max"] < 50,
    }
    report["targets_met"] = targets
    print(json.dumps(report, indent=2))
    for k, v in targets.items():
        print(f"{'PASS' if v else 'MISS'}  {k}", file=sys.stderr)


if __name__ == "__main__":
    main()
