"""Change notifications against a real secretsd: what a watcher is told, in which
order relative to the writer's answer, what it is never told, and what a slow
watcher costs others."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import anyio
import pytest

from homeagent_secrets.client import AsyncSecretsClient, SecretsClient
from homeagent_secrets.client.events import WatchEvent

from .conftest import PASSPHRASE, Daemon


def raw_watch(path: Path, patterns: list[str]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "watch",
                          "params": {"patterns": patterns}}).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        buf += s.recv(4096)
    assert json.loads(buf)["result"]["watch"] >= 1
    return s


@pytest.mark.slow
def test_a_watcher_is_told_every_change_it_may_see_and_never_a_value(unlocked: Daemon) -> None:
    events: list[WatchEvent] = []
    got_all = threading.Event()

    def watch() -> None:
        with SecretsClient(unlocked.socket) as w:
            for ev in w.watch(["provider/**"], timeout=10):
                events.append(ev)
                if len(events) == 5:
                    got_all.set()
                    return

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.3)
    with SecretsClient(unlocked.socket) as c:
        c.store("provider/hue/token", "VALUE-1")
        c.store("llm/openai", "not watched")
        c.rotate("provider/hue/token", "VALUE-2")
        c.delete("provider/hue/token")
        c.lock()
        c.unlock(PASSPHRASE)
    assert got_all.wait(10)
    t.join(10)
    assert [(e.kind, e.name, e.version, e.change) for e in events] == [
        ("changed", "provider/hue/token", 1, "stored"),
        ("changed", "provider/hue/token", 2, "rotated"),
        ("changed", "provider/hue/token", 2, "deleted"),  # the version that was deleted
        ("locked", None, None, None),
        ("unlocked", None, None, None),
    ]


@pytest.mark.slow
def test_no_stale_read_after_an_acknowledged_rotate(unlocked: Daemon) -> None:
    """The event is in the watcher's socket before the writer's answer: once a
    client has the rotate's answer, a read (or the watcher's next recv) sees it."""
    w = raw_watch(unlocked.socket, ["k"])
    w.setblocking(False)
    with SecretsClient(unlocked.socket) as c:
        c.store("k", "v0")
        time.sleep(0.1)
        w.recv(65536)
        for i in range(200):
            version = c.rotate("k", f"v{i + 1}")
            data = w.recv(65536)  # already there when the answer came: no wait
            events = [json.loads(line)["params"] for line in data.splitlines()]
            assert events[-1]["version"] == version, (i, events)
            assert c.get("k") == f"v{i + 1}"
    w.close()


@pytest.mark.slow
def test_an_open_watch_is_not_idle(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory("--idle-timeout", "1")
    SecretsClient(d.socket).init(PASSPHRASE)
    w = raw_watch(d.socket, [])
    time.sleep(2.5)  # longer than the idle timeout, nothing sent
    SecretsClient(d.socket).store("after", "v")
    w.settimeout(5)
    line = w.recv(65536)
    assert json.loads(line.splitlines()[0])["params"]["name"] == "after"
    w.close()


@pytest.mark.slow
def test_a_slow_watcher_gets_one_overflow_and_never_slows_a_writer(unlocked: Daemon) -> None:
    def p99_of_stores(c: SecretsClient, n: int) -> float:
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            c.store(f"n/{i % 50}", "v")
            lat.append(time.perf_counter() - t0)
        lat.sort()
        return lat[int(len(lat) * 0.99)]

    with SecretsClient(unlocked.socket) as c:
        alone = p99_of_stores(c, 1000)
        w = raw_watch(unlocked.socket, [])
        w.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        behind = p99_of_stores(c, 6000)
    # now read everything the watcher was sent: events, then exactly one overflow
    w.settimeout(2)
    buf = b""
    try:
        while chunk := w.recv(1 << 20):
            buf += chunk
    except TimeoutError:
        pass
    methods = [json.loads(line)["method"] for line in buf.splitlines()]
    assert methods.count("overflow") == 1 and methods[-1] == "overflow"
    assert 1000 <= methods.count("changed") < 6000
    # writes went on at the disk's pace (fsync): the watcher behind costs them nothing
    assert behind <= 3 * alone + 0.010, (alone, behind)
    w.close()


def test_unwatch_and_a_watch_of_another_connection(unlocked: Daemon) -> None:
    w = raw_watch(unlocked.socket, [])
    other = raw_watch(unlocked.socket, [])
    for sock, wid, expect in ((other, 1, False), (w, 1, True), (w, 1, False)):
        sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 9, "method": "unwatch",
                                 "params": {"watch": wid}}).encode() + b"\n")
        reply = json.loads(sock.recv(4096).splitlines()[-1])
        assert reply["result"] is expect
    w.close()
    other.close()


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_async_client_watches_too(unlocked: Daemon) -> None:
    got: list[WatchEvent] = []
    async with AsyncSecretsClient(unlocked.socket) as c:
        async def watch() -> None:
            async for ev in c.watch(["a/*"]):
                got.append(ev)
                if len(got) == 2:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.sleep(0.3)
            await c.store("a/x", "1")
            await c.store("b/x", "2")
            await c.rotate("a/x", "3")
    assert [(e.name, e.change) for e in got] == [("a/x", "stored"), ("a/x", "rotated")]


@pytest.mark.slow
def test_a_bad_pattern_is_refused(unlocked: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(unlocked.socket))
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"watch","params":{"patterns":["../x"]}}\n')
    assert json.loads(s.recv(4096))["error"]["code"] == -32602
    s.close()
