"""SecretsClient(cache=True) / AsyncSecretsClient(cache=True) and get_many, against a
real secretsd: served from memory, never stale after an acknowledged write,
emptied on overflow, lock and a dropped watch, and get_many in one round trip."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from homeagent_secrets.client import AgentUnreachableError, AsyncSecretsClient, LockedError, SecretsClient
from homeagent_secrets.client.cache import MISS, wait_live
from homeagent_secrets.protocol.errors import InvalidParams

from .conftest import PASSPHRASE, Daemon

ROOT = Path(__file__).parents[1]


@pytest.fixture
def cached(unlocked: Daemon) -> Iterator[SecretsClient]:
    c = SecretsClient(unlocked.socket, cache=True, timeout=5)
    yield c
    c.close()


def live(c: SecretsClient) -> SecretsClient:
    assert c.cache is not None and wait_live(c.cache, 5)
    return c


def test_a_cached_get_needs_no_round_trip(unlocked: Daemon, cached: SecretsClient) -> None:
    with SecretsClient(unlocked.socket) as w:
        w.store("llm/openai", "sk-1")
    assert cached.get("llm/openai") == "sk-1"  # opens the watch, asks the agent
    live(cached)
    assert cached.get("llm/openai") == "sk-1"  # now cached
    os.kill(unlocked.pid, signal.SIGSTOP)  # an agent that cannot answer anything
    try:
        t0 = time.perf_counter()
        for _ in range(1000):
            assert cached.get("llm/openai") == "sk-1"
        assert time.perf_counter() - t0 < 1
    finally:
        os.kill(unlocked.pid, signal.SIGCONT)


def test_cached_values_are_secret_objects_never_shown(cached: SecretsClient, unlocked: Daemon) -> None:
    with SecretsClient(unlocked.socket) as w:
        w.store("k", "TOP-SECRET")
    cached.get("k")
    live(cached)
    hit = cached.retrieve("k")
    assert hit is not None and hit.value.reveal() == "TOP-SECRET"
    assert "TOP-SECRET" not in repr(hit) + repr(cached.cache) + repr(cached.cache.core.entries)  # type: ignore[union-attr]


@pytest.mark.slow
def test_no_stale_read_after_an_acknowledged_rotate(unlocked: Daemon, cached: SecretsClient) -> None:
    """Whoever got a rotate's answer, a cached get that starts afterwards sees it."""
    with SecretsClient(unlocked.socket) as w:
        w.store("k", "v0")
        cached.get("k")
        live(cached)
        for i in range(1, 301):
            w.rotate("k", f"v{i}")
            assert cached.get("k") == f"v{i}", i
            assert cached.get("k") == f"v{i}", i  # and the refilled entry is the new one
        w.delete("k")
        assert cached.get("k") is None
        w.store("k", "again")
        assert cached.get("k") == "again"


def test_no_stale_read_after_a_rotate_acknowledged_to_another_process(unlocked: Daemon,
                                                                       cached: SecretsClient) -> None:
    code = (
        "import sys\n"
        "from homeagent_secrets.client import SecretsClient\n"
        f"c = SecretsClient({str(unlocked.socket)!r})\n"
        "for line in sys.stdin:\n"
        "    v = c.rotate('shared', line.strip())\n"
        "    print(v, flush=True)\n"
    )
    with SecretsClient(unlocked.socket) as w:
        w.store("shared", "start")
    cached.get("shared")
    live(cached)
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdin is not None and writer.stdout is not None
        for i in range(50):
            assert cached.get("shared") is not None  # keep it cached between rotates
            writer.stdin.write(f"value-{i}\n")
            writer.stdin.flush()
            version = int(writer.stdout.readline())  # the other process has the answer
            result = cached.retrieve("shared")
            assert result is not None and (result.version, result.value.reveal()) == (version, f"value-{i}")
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.slow
def test_threads_never_read_older_than_an_acknowledged_version(unlocked: Daemon, cached: SecretsClient) -> None:
    with SecretsClient(unlocked.socket) as w:
        acked = [w.store("t", "0")]
        cached.get("t")
        live(cached)
        stop = threading.Event()
        errors: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                floor = acked[0]
                got = cached.retrieve("t")
                if got is None or got.version < floor or got.value.reveal() != str(got.version - 1):
                    errors.append(f"read {got and got.version} after {floor} was acknowledged")
                    return

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for i in range(1, 200):
                acked[0] = w.rotate("t", str(i))
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    assert errors == []


def test_an_answer_read_before_a_rotate_is_never_cached_after_its_event(unlocked: Daemon,
                                                                       cached: SecretsClient) -> None:
    cache = cached.cache
    assert cache is not None
    with SecretsClient(unlocked.socket) as w, SecretsClient(unlocked.socket) as r:
        w.store("race", "old")
        cached.get("other")
        live(cached)
        # The race, made deterministic: an answer, then a rotate, then the answer is filled.
        token = cache.token()
        old = r.retrieve("race")
        w.rotate("race", "new")
        assert cache.lookup("race") is MISS  # applies the rotate's event first
        cache.fill("race", old, token)
        assert cache.lookup("race") is MISS  # the old answer was refused
        assert cached.get("race") == "new"
        # The other order: filled first, then the event (already in the socket) removes it.
        token = cache.token()
        old = r.retrieve("race")
        cache.fill("race", old, token)
        w.rotate("race", "newer")
        assert cached.get("race") == "newer"


def test_locking_empties_the_cache(unlocked: Daemon, cached: SecretsClient) -> None:
    with SecretsClient(unlocked.socket) as w:
        w.store("k", "v")
        cached.get("k")
        live(cached)
        assert cached.get("k") == "v"
        w.lock()
        with pytest.raises(LockedError):
            cached.get("k")  # not the cached value: the agent is locked
        w.unlock(PASSPHRASE)
        assert cached.get("k") == "v"


@pytest.mark.slow
def test_an_overflowing_watch_empties_the_cache(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Events dropped after an overflow cannot leave a stale entry."""
    from homeagent_secrets.daemon.watch import OUTBOX_LIMIT
    from homeagent_secrets.protocol import messages as m

    # The flood below takes 20-30 s of fsyncs here, and the watch does not read all
    # that time: with the default 30 s the agent closed it as stuck before it sent
    # the overflow (seen in CI), which is right, but not what this test is about.
    d = daemon_factory("--idle-timeout", "600")
    with SecretsClient(d.socket) as c:
        c.init(PASSPHRASE)
    cached = SecretsClient(d.socket, cache=True, timeout=5)
    cache = cached.cache
    assert cache is not None
    with cached, SecretsClient(d.socket, timeout=60) as w:
        w.store("victim", "old")
        assert cached.get("victim") == "old"
        live(cached)
        assert cached.get("victim") == "old"
        resets = cache.core.resets
        assert cache.core.sock is not None
        # More events than the agent's outbox and the socket's buffer hold (an event
        # line is over 90 bytes; half again as many), whatever this kernel's buffer is.
        buffered = int(Path("/proc/sys/net/core/wmem_default").read_text()) // 90
        flood = -(-(OUTBOX_LIMIT + buffered * 3 // 2) // 100) * 100
        with cache.lock:  # the watch thread cannot read: its socket and outbox fill up
            for i in range(0, flood, 100):
                w.call_many(m.STORE, [m.StoreParams(f"flood/{(i + j) % 300}", _s("x")) for j in range(100)])
            w.rotate("victim", "new")  # its event is dropped: the outbox overflowed
        assert cached.get("victim") == "new"  # behind: asked the agent, never the old entry
        assert cache.core.resets > resets
        live(cached)  # caught up: the queued events and the agent's overflow line arrived
        assert cache.core.overflows == 1
        assert cached.get("victim") == "new"
        assert cached.get("victim") == "new"  # and cached again


def _s(v: str):  # type: ignore[no-untyped-def]
    from homeagent_secrets.protocol.secret import Secret

    return Secret(v)


@pytest.mark.slow
def test_a_dropped_watch_sends_calls_to_the_agent_until_it_is_back(unlocked: Daemon,
                                                                   cached: SecretsClient) -> None:
    with SecretsClient(unlocked.socket) as w:
        w.store("k", "v1")
    cached.get("k")
    live(cached)
    assert cached.get("k") == "v1"
    unlocked.stop()
    with pytest.raises(AgentUnreachableError):
        cached.get("k")  # never the cached value while the watch is gone
    unlocked.start()
    with SecretsClient(unlocked.socket) as w:
        w.unlock(PASSPHRASE)
        w.rotate("k", "v2")  # made while the cache's watch may still be reconnecting
        assert cached.get("k") == "v2"
        live(cached)  # the watch came back by itself
        assert cached.get("k") == "v2"
        os.kill(unlocked.pid, signal.SIGSTOP)
        try:
            assert cached.get("k") == "v2"  # served from memory again
        finally:
            os.kill(unlocked.pid, signal.SIGCONT)
        w.rotate("k", "v3")
        assert cached.get("k") == "v3"


def test_a_forked_child_opens_its_own_watch(unlocked: Daemon, cached: SecretsClient) -> None:
    with SecretsClient(unlocked.socket) as w:
        w.store("k", "v1")
        cached.get("k")
        live(cached)
        pid = os.fork()
        if pid == 0:  # the child: the parent's watch is not its to read
            try:
                ok = cached.get("k") == "v1" and wait_live(cached.cache, 5)  # type: ignore[arg-type]
                w2 = SecretsClient(unlocked.socket)
                w2.rotate("k", "from-child")
                ok = ok and cached.get("k") == "from-child"
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert cached.get("k") == "from-child"
        w.rotate("k", "v3")
        assert cached.get("k") == "v3"


# --- get_many ---------------------------------------------------------------------------


class Relay:
    """A byte relay between a client and the agent that holds the agent's answers
    until the client has been quiet for ``quiet`` seconds, recording the lines the
    client sent before any answer: a client that waits for an answer before
    sending its next request shows one line there, not all of them."""

    def __init__(self, listen: Path, target: Path, quiet: float = 0.3) -> None:
        self.lines_before_answer: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(listen))
        self.server.listen()
        self.target, self.quiet = target, quiet
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.server.accept()
        agent = socket.socket(socket.AF_UNIX)
        agent.connect(str(self.target))
        client.settimeout(self.quiet)
        received = b""
        while True:
            try:
                data = client.recv(1 << 20)
            except TimeoutError:
                break
            if not data:
                return
            received += data
        self.lines_before_answer = received.splitlines()
        agent.sendall(received)
        client.settimeout(10)
        agent.settimeout(10)
        expected = len(self.lines_before_answer)
        answers = b""
        while answers.count(b"\n") < expected:
            answers += agent.recv(1 << 20)
        client.sendall(answers)
        client.close()
        agent.close()

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


@pytest.mark.slow
def test_get_many_is_one_round_trip_in_order_with_none_for_absent(unlocked: Daemon, short_tmp: Path) -> None:
    names = [f"app/{i:03d}" for i in range(250)]
    with SecretsClient(unlocked.socket) as w:
        for i in range(0, 250, 2):
            w.store(names[i], f"value {i}")
    relay = Relay(short_tmp / "relay.sock", unlocked.socket)
    try:
        with SecretsClient(short_tmp / "relay.sock", timeout=10) as c:
            got = c.get_many([*names, names[0]])  # a duplicate is asked once
    finally:
        relay.close()
    assert list(got) == names
    assert all(got[n] == (f"value {i}" if i % 2 == 0 else None) for i, n in enumerate(names))
    batches = [json.loads(line) for line in relay.lines_before_answer]
    assert [len(b) for b in batches] == [100, 100, 50]  # all sent before any answer came
    assert all(r["method"] == "retrieve" for b in batches for r in b)


def test_get_many_raises_the_first_error_and_uses_the_cache(unlocked: Daemon, cached: SecretsClient) -> None:
    with SecretsClient(unlocked.socket) as w:
        w.store("a", "1")
        w.store("b", "2")
    with pytest.raises(InvalidParams):
        cached.get_many(["a", "not a name!"])
    assert cached.get_many([]) == {}
    assert cached.get_many(["a", "b", "zzz"]) == {"a": "1", "b": "2", "zzz": None}
    live(cached)
    assert cached.get_many(["a", "b", "zzz"]) == {"a": "1", "b": "2", "zzz": None}
    os.kill(unlocked.pid, signal.SIGSTOP)
    try:  # every one cached now (absent ones too): no round trip at all
        assert cached.get_many(["zzz", "b", "a"]) == {"zzz": None, "b": "2", "a": "1"}
    finally:
        os.kill(unlocked.pid, signal.SIGCONT)
    with SecretsClient(unlocked.socket) as w:
        w.lock()
    with pytest.raises(LockedError):
        cached.get_many(["a", "c"])


# --- the async client -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_async_cache_follows_rotates_locks_and_reconnects(unlocked: Daemon) -> None:
    with SecretsClient(unlocked.socket) as w:
        w.store("k", "v0")
        async with AsyncSecretsClient(unlocked.socket, cache=True, timeout=5) as c:
            assert await c.get("k") == "v0"  # opens the watch (awaited: live now)
            assert c.cache is not None and c.cache.core.serving
            assert await c.get("k") == "v0"
            assert "k" in c.cache.core.entries
            for i in range(1, 101):
                w.rotate("k", f"v{i}")
                assert await c.get("k") == f"v{i}"
            assert await c.get_many(["k", "nope"]) == {"k": "v100", "nope": None}
            unlocked.stop()
            with pytest.raises(AgentUnreachableError):
                await c.get("k")
            unlocked.start()
            w.unlock(PASSPHRASE)
            w.rotate("k", "after-restart")
            assert await c.get("k") == "after-restart"
            with anyio.fail_after(5):
                while not c.cache.core.serving:
                    await anyio.sleep(0.02)
            assert await c.get("k") == "after-restart"
            assert "k" in c.cache.core.entries
            w.lock()
            with pytest.raises(LockedError):
                await c.get("k")
