"""Crash consistency of the file backend under SIGKILL (issue: reliability campaign).

Starts secretsd on the file backend (format 2), drives store/rotate/delete and
change_passphrase/rekey from several clients (each on its own names, so one
in-flight call per name at most), SIGKILLs the daemon at a random moment,
restarts and unlocks it, and checks the store against a model of every
acknowledged operation:

- an acknowledged write is present with its value (or a later acknowledged one);
- an acknowledged delete stays deleted; `previous` is right after rotations;
- a call cut by the kill left either its old or its new state, never a mix;
- the passphrase is the old or the new one; the store always opens;
- no temp file is left where it could be taken for a record, no rebuild
  directory of an interrupted rekey survives the restart;
- no record is reported damaged: every state a kill leaves is one the manifest
  recognizes (a damaged record here would be a false alarm, or a lost write).

Run on its own:  python -m tests.crash_harness --kills 2000
"""

from __future__ import annotations

import argparse
import functools
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.protocol.errors import SecretsError

PASSPHRASES = ("crash pass A", "crash pass B")


@dataclass
class NameState:
    current: str | None = None  # None: absent
    previous: str | None = None


@dataclass
class Model:
    names: dict[str, NameState] = field(default_factory=dict)
    passphrase: str = PASSPHRASES[0]
    # what a call cut by the kill may have done: name -> the state it would leave
    maybe: dict[str, NameState] = field(default_factory=dict)
    maybe_passphrase: str | None = None


class Failure(AssertionError):
    pass


def _start(home: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(home),
                             "--socket", str(sock), "--backend", "file", "--scrypt-n", "1024",
                             "--log-level", "WARNING"], stdout=out, stderr=out)
    out.close()
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise Failure(f"secretsd exited with {proc.returncode} at start: the store did not open")
        try:
            SecretsClient(sock, timeout=5, connect_timeout=0.5).status()
            return proc
        except SecretsError:
            if time.monotonic() > deadline:
                raise Failure("secretsd did not answer within 20 s of starting") from None
            time.sleep(0.01)


def _verify(model: Model, c: SecretsClient, home: Path) -> None:
    temps = [p.name for p in (home / "secrets").iterdir() if p.name.startswith(".tmp-")]
    if temps:
        raise Failure(f"temp files survived the restart: {temps}")
    if any(p.name.endswith(".rec.tmp") for p in (home / "secrets").iterdir()):
        raise Failure("a temp file is named like a record")
    leftovers = sorted(p.name for p in home.iterdir() if p.name.startswith("secrets."))
    if leftovers or (home / "secrets" / "complete").exists():
        raise Failure(f"an interrupted rekey was not finished or undone at start: {leftovers}")
    candidates = [model.passphrase] + ([model.maybe_passphrase] if model.maybe_passphrase else [])
    for phrase in candidates:
        try:
            c.unlock(phrase)
            model.passphrase = phrase
            break
        except SecretsError as exc:
            if exc.code != -32003:
                raise
    else:
        raise Failure("neither the acknowledged nor the in-flight passphrase opens the store")
    model.maybe_passphrase = None
    damaged = c.status().damaged
    if damaged:
        raise Failure(f"records reported damaged after a kill: {damaged}")
    listed = set(c.list())
    for name in sorted(set(model.names) | set(model.maybe)):
        acked = model.names.get(name, NameState())
        options = [acked] + ([model.maybe[name]] if name in model.maybe else [])
        cur = c.get(name)
        prev = c.get(name, previous=True) if cur is not None else None
        got = NameState(cur, prev)
        if got not in options:
            raise Failure(f"{name}: found current={cur!r} previous={prev!r}; acknowledged {acked}, "
                          f"in flight {model.maybe.get(name)}")
        if (cur is not None) != (name in listed):
            raise Failure(f"{name}: list disagrees with retrieve")
        model.names[name] = got
    model.maybe.clear()


def _client_loop(sock: Path, model: Model, names: list[str], rng: random.Random, stop: threading.Event,
                 counter: list[int], lock: threading.Lock) -> None:
    c = SecretsClient(sock, timeout=10, connect_timeout=0.5)
    while not stop.is_set():
        name = rng.choice(names)
        st = model.names.get(name, NameState())
        with lock:
            counter[0] += 1
            value = f"{name}#{counter[0]}"
        op = rng.random()
        call: Callable[[], object]  # store and rotate answer the version, delete a bool
        if st.current is None or op < 0.35:
            after = NameState(value, st.current)
            call = functools.partial(c.store, name, value)
        elif op < 0.85:
            after = NameState(value, st.current)
            call = functools.partial(c.rotate, name, value)
        else:
            after = NameState(None, None)
            call = functools.partial(c.delete, name)
        model.maybe[name] = after
        try:
            call()
        except SecretsError:
            return  # cut by the kill: 'maybe' stays for the verification
        model.names[name] = after
        del model.maybe[name]


def _passphrase_loop(sock: Path, model: Model, rng: random.Random, stop: threading.Event,
                     counts: dict[str, int]) -> None:
    c = SecretsClient(sock, timeout=10, connect_timeout=0.5)
    while not stop.wait(rng.uniform(0.01, 0.08)):
        new = PASSPHRASES[1] if model.passphrase == PASSPHRASES[0] else PASSPHRASES[0]
        model.maybe_passphrase = new
        rekey = rng.random() < 0.3
        try:
            if rekey:
                c.rekey(model.passphrase, new)
            else:
                c.change_passphrase(model.passphrase, new)
        except SecretsError:
            return
        counts["rekeys" if rekey else "passphrase_changes"] += 1
        model.passphrase, model.maybe_passphrase = new, None


def run(kills: int, seed: int | None = None, clients: int = 3, names_per_client: int = 6,
        report_every: int = 0, stats: dict[str, int] | None = None) -> dict[str, int]:
    """Kill secretsd ``kills`` times under load; raise Failure on the first inconsistency.

    ``stats``, when given, receives how many rekeys and passphrase changes were acknowledged.
    """
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="hak-", dir="/tmp"))
    home, sock, log = base / "home", base / "s.sock", base / "d.log"
    model = Model()
    counter = [0]
    lock = threading.Lock()
    acked_ops = 0
    counts = {"rekeys": 0, "passphrase_changes": 0}
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = _start(home, sock, log)
        SecretsClient(sock).init(model.passphrase)
        for k in range(kills):
            stop = threading.Event()
            before = counter[0]
            threads = [threading.Thread(target=_client_loop, args=(
                sock, model, [f"c{i}/n{j}" for j in range(names_per_client)],
                random.Random(rng.random()), stop, counter, lock)) for i in range(clients)]
            threads.append(threading.Thread(target=_passphrase_loop, args=(
                sock, model, random.Random(rng.random()), stop, counts)))
            for t in threads:
                t.start()
            # One kill in three comes later: past the passphrase guard's spacing (0.25 s after
            # the unlock), so rekeys and passphrase changes run, and are cut, too.
            time.sleep(rng.uniform(0.005, 0.25) if rng.random() < 0.67 else rng.uniform(0.25, 0.7))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            for t in threads:
                t.join(30)
            acked_ops += counter[0] - before - len(model.maybe)
            proc = _start(home, sock, log)
            with SecretsClient(sock, timeout=30) as c:
                _verify(model, c, home)
            if report_every and (k + 1) % report_every == 0:
                print(f"{k + 1} kills, {acked_ops} acknowledged writes checked, {counts['rekeys']} "
                      f"rekeys, 0 lost", flush=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        if stats is not None:
            stats.update(counts)
        return {"kills": kills, "acknowledged_writes": acked_ops, "secrets": len(model.names), "lost": 0}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()  # a failure above: the daemon goes with it
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    t0 = time.monotonic()
    try:
        stats: dict[str, int] = {}
        result = run(args.kills, args.seed, report_every=100, stats=stats)
    except Failure as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"{result | stats} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
