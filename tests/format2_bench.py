"""Figures for format 2 against format 1, on real files with real crypto.

- unlock of a store of N secrets (format 1: the last format-1 agent's code,
  taken from git; format 2: this tree), median and spread of a few runs;
- write latency (rotate, one writer, fsync'd) p50/p99 over a few hundred writes,
  on a small store and on one of N secrets; and with 8 concurrent writers;
- rekey of N secrets; the format-1 -> 2 upgrade of N secrets.

    python -m tests.format2_bench --secrets 10000 --writes 300

The format-1 figures run in a subprocess on ``git archive <commit>`` of this
repository (default: the last commit before format 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FORMAT1_COMMIT = "52a6698"

# Runs with PYTHONPATH set to either tree: the same FileBackend API in both.
WORKER = r'''
import asyncio, json, random, statistics, sys, time
from pathlib import Path
from homeagent_secrets.daemon.backends.files import FileBackend
from homeagent_secrets.daemon.backends.datakey import KdfParams
from homeagent_secrets.protocol.secret import Secret

args = json.loads(sys.argv[1])
PW = Secret("bench pass phrase")

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]

async def main():
    home = Path(args["home"])
    kdf = KdfParams(log2_n=args["log2n"])
    out = {}
    b = FileBackend(home, kdf)
    await b.open()
    if args.get("populate"):
        await b.init(PW)
        t0 = time.perf_counter()
        for i in range(args["populate"]):
            await b.store(f"bench/{i:05d}", Secret(f"value-{i:05d}-" + "x" * 40), "generic")
        out["populate_s"] = time.perf_counter() - t0
        await b.close()
    times = []
    for _ in range(args["unlocks"]):
        b = FileBackend(home, kdf)
        await b.open()
        t0 = time.perf_counter()
        await b.unlock(PW)
        times.append(time.perf_counter() - t0)
        n = await b.count()
        await b.close()
    out["unlock_s"] = times
    out["count"] = n
    b = FileBackend(home, kdf)
    await b.open()
    await b.unlock(PW)
    names = await b.list("")
    rng = random.Random(1)
    lat = []
    for i in range(args["writes"]):
        t0 = time.perf_counter()
        await b.rotate(rng.choice(names), Secret(f"rotated-{i}-" + "y" * 40))
        lat.append(time.perf_counter() - t0)
    out["write_p50_ms"] = pct(lat, 0.5) * 1000
    out["write_p99_ms"] = pct(lat, 0.99) * 1000
    # 8 writers at once, each on its own names
    clat = []
    async def writer(k):
        for i in range(args["writes"] // 8):
            t0 = time.perf_counter()
            await b.rotate(names[(k * 7919 + i) % len(names)], Secret(f"c-{k}-{i}"))
            clat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    await asyncio.gather(*(writer(k) for k in range(8)))
    wall = time.perf_counter() - t0
    out["concurrent8_p50_ms"] = pct(clat, 0.5) * 1000
    out["concurrent8_p99_ms"] = pct(clat, 0.99) * 1000
    out["concurrent8_writes_per_s"] = len(clat) / wall
    if args.get("rekey") and hasattr(b, "rekey"):
        t0 = time.perf_counter()
        await b.rekey(PW, PW)
        out["rekey_s"] = time.perf_counter() - t0
    await b.close()
    print(json.dumps(out))

asyncio.run(main())
'''


def _tree(commit: str | None, root: Path) -> Path | None:
    """A PYTHONPATH entry holding the package at ``commit`` (None: this tree)."""
    if commit is None:
        return None
    repo = Path(__file__).resolve().parent.parent
    pkg = root / commit / "homeagent_secrets"
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "protocol", "daemon", "client"],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive.stdout, check=True)
    (pkg / "__init__.py").write_text("")
    return pkg.parent


def _work(tree: Path | None, **args: object) -> dict[str, object]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    r = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secrets", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--unlocks", type=int, default=3)
    ap.add_argument("--log2n", type=int, default=17, help="scrypt cost of the stores (default 2^17)")
    ap.add_argument("--format1-commit", default=FORMAT1_COMMIT)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="f2bench-", dir="/tmp"))
    try:
        old = _tree(a.format1_commit, base / "trees")
        rows: dict[str, dict[str, object]] = {}
        for label, tree in (("format 1", old), ("format 2", None)):
            for n in (a.small, a.secrets):
                rows[f"{label}, {n} secrets"] = _work(
                    tree, home=str(base / f"{label[-1]}-{n}"), log2n=a.log2n, populate=n,
                    unlocks=a.unlocks, writes=a.writes, rekey=(tree is None and n == a.secrets))
        # the upgrade: this tree unlocks a copy of the large format-1 store
        up = base / "upgrade"
        shutil.copytree(base / f"1-{a.secrets}", up)
        rows[f"upgrade 1 -> 2, {a.secrets} secrets"] = _work(
            None, home=str(up), log2n=a.log2n, unlocks=1, writes=8)
        print(f"scrypt N=2^{a.log2n}; {a.writes} writes per figure; machine: {os.cpu_count()} cores")
        for label, r in rows.items():
            print(f"\n{label}:")
            print(f"  unlock {_spread(r['unlock_s'])}  ({r['count']} secrets)")  # type: ignore[arg-type]
            if "populate_s" in r:
                print(f"  filled with {r['count']} stores in {r['populate_s']:.1f} s")
            print(f"  write p50 {r['write_p50_ms']:.2f} ms, p99 {r['write_p99_ms']:.2f} ms; "
                  f"8 concurrent writers p50 {r['concurrent8_p50_ms']:.2f} ms, p99 "
                  f"{r['concurrent8_p99_ms']:.2f} ms, {r['concurrent8_writes_per_s']:.0f} writes/s")
            if "rekey_s" in r:
                print(f"  rekey {r['rekey_s']:.2f} s")
        print("\n" + json.dumps(rows))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
