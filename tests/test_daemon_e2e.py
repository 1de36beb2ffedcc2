"""A real secretsd subprocess driven by both clients, raw sockets and secretsctl."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from homeagent_secrets.client import (
    AgentUnreachableError,
    AsyncSecretsClient,
    LockedError,
    NotFoundError,
    SecretsClient,
    ValueTooLargeError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.errors import AlreadyInitializedError, InvalidParams

from .conftest import PASSPHRASE, Daemon, run_as


def raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_lines(s: socket.socket, n: int) -> list[dict]:  # type: ignore[type-arg]
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()[:n]]


def rpc(s: socket.socket, method: str, params: dict | None = None, id_: int = 1) -> dict:  # type: ignore[type-arg]
    msg = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        msg["params"] = params
    s.sendall(json.dumps(msg).encode() + b"\n")
    return read_lines(s, 1)[0]


# --- both clients, every method ----------------------------------------------------------


def test_sync_client_every_method(daemon: Daemon) -> None:
    with SecretsClient(daemon.socket) as c:
        st = c.status()
        assert (st.initialized, st.locked, st.backend, st.secrets) == (False, True, "file", None)
        c.init(PASSPHRASE)
        with pytest.raises(AlreadyInitializedError):
            c.init(PASSPHRASE)
        assert c.store("hue/bridge", "tok-1", kind="provider") == 1
        assert c.get("hue/bridge") == "tok-1"
        assert c.rotate("hue/bridge", "tok-2") == 2
        prev = c.retrieve("hue/bridge", previous=True)
        assert prev is not None and prev.value.reveal() == "tok-1" and prev.version == 1
        info = c.describe("hue/bridge")
        assert info is not None and info.kind == "provider" and info.has_previous
        assert c.list() == ["hue/bridge"] and c.list("zz") == []
        assert c.status().secrets == 1
        c.lock()
        with pytest.raises(LockedError):
            c.get("hue/bridge")
        with pytest.raises(WrongPassphraseError):
            c.unlock("not it")
        c.unlock(PASSPHRASE)
        c.change_passphrase(PASSPHRASE, "second passphrase")
        c.lock()
        c.unlock("second passphrase")
        assert c.delete("hue/bridge") is True and c.delete("hue/bridge") is False
        assert c.retrieve("hue/bridge") is None
        with pytest.raises(NotFoundError):
            c.rotate("hue/bridge", "x")
        with pytest.raises(ValueTooLargeError):
            c.store("big", "x" * (64 * 1024 + 1))


@pytest.mark.slow
@pytest.mark.anyio
async def test_async_client_multiplexes_concurrent_calls(unlocked: Daemon) -> None:
    async with AsyncSecretsClient(unlocked.socket) as c:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(c.store, f"dev/{i}", f"value-{i}", "device")
        results: dict[int, str | None] = {}

        async def get(i: int) -> None:
            results[i] = await c.get(f"dev/{i}")

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(get, i)
        assert results == {i: f"value-{i}" for i in range(50)}
        assert len(await c.list("dev/")) == 50
        assert (await c.describe("dev/7")).kind == "device"  # type: ignore[union-attr]
        assert await c.rotate("dev/7", "new") == 2
        assert await c.delete("dev/7") is True
        assert (await c.status()).secrets == 49
        await c.lock()
        with pytest.raises(LockedError):
            await c.get("dev/1")
        await c.unlock(PASSPHRASE)
        await c.change_passphrase(PASSPHRASE, PASSPHRASE + "!")


@pytest.mark.anyio
async def test_async_client_requires_context_manager(unlocked: Daemon) -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await AsyncSecretsClient(unlocked.socket).status()


# --- the socket --------------------------------------------------------------------------


def test_socket_is_0600_and_its_directory_0700(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory()
    assert stat.S_IMODE(os.lstat(d.socket).st_mode) == 0o600
    nested = short_tmp / "run" / "x.sock"
    d2 = Daemon(short_tmp / "h2", nested, short_tmp / "d2.log").start()
    try:
        assert stat.S_IMODE(nested.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(nested).st_mode) == 0o600
    finally:
        d2.stop()


def test_second_uid_is_refused_even_through_a_world_writable_socket(
    unlocked: Daemon, throwaway_user: tuple[int, int], short_tmp: Path
) -> None:
    uid, gid = throwaway_user
    short_tmp.chmod(0o711)  # let the other user reach the socket file itself

    def attempt() -> bytes:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(str(unlocked.socket))
        except PermissionError:
            return b"EACCES"
        try:
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"list"}\n')
            reply = s.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            reply = b""  # closed before (or while) we wrote: refused all the same
        return b"CLOSED" if not reply else b"ANSWERED " + reply

    assert run_as(uid, gid, attempt) == b"EACCES"  # the 0600 mode is the first wall
    os.chmod(unlocked.socket, 0o666)
    assert run_as(uid, gid, attempt) == b"CLOSED"  # the peer-credential check is the second
    assert f"refused connection from uid {uid}" in unlocked.log_text()
    with SecretsClient(unlocked.socket) as c:  # the owner is still served
        assert c.list() == []


@pytest.mark.slow
def test_live_daemon_is_not_replaced_and_stale_socket_is(unlocked: Daemon, short_tmp: Path) -> None:
    rival = subprocess.run(
        [sys.executable, "-m", "homeagent_secrets.daemon", "--home", str(short_tmp / "rival"),
         "--socket", str(unlocked.socket)], capture_output=True, text=True, timeout=30,
    )
    assert rival.returncode == 1
    assert "another secretsd is already answering" in rival.stderr
    assert SecretsClient(unlocked.socket).status().initialized
    unlocked.stop(signal.SIGKILL)  # leaves the socket file behind
    assert unlocked.socket.exists()
    unlocked.start()  # replaces the stale socket
    assert SecretsClient(unlocked.socket).status().locked


def test_graceful_shutdown_removes_socket_and_exits_0(unlocked: Daemon) -> None:
    assert unlocked.stop(signal.SIGTERM) == 0
    assert not unlocked.socket.exists()
    assert "data key wiped" in unlocked.log_text()


def test_sigint_also_shuts_down_cleanly(unlocked: Daemon) -> None:
    assert unlocked.stop(signal.SIGINT) == 0
    assert not unlocked.socket.exists()


@pytest.mark.slow
def test_shutdown_finishes_requests_in_flight(unlocked: Daemon) -> None:
    """SIGTERM while 40 received writes are under way: all 40 are answered and on disk."""
    s = raw_connect(unlocked.socket)
    lines = b"".join(
        json.dumps({"jsonrpc": "2.0", "id": i, "method": "store",
                    "params": {"name": f"f{i}", "value": "v"}}).encode() + b"\n" for i in range(40)
    )
    s.sendall(lines)
    buf = s.recv(65536)  # a first answer: the daemon has read them and works through them
    unlocked.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    while chunk := s.recv(65536):  # to the end: the connection is closed after the last answer
        buf += chunk
    assert unlocked.proc.wait(15) == 0  # type: ignore[union-attr]
    got = [json.loads(line) for line in buf.splitlines()]
    assert sorted(g["id"] for g in got if "result" in g) == list(range(40))
    unlocked.start()
    with SecretsClient(unlocked.socket) as c:
        c.unlock(PASSPHRASE)
        assert set(c.list()) >= {f"f{i}" for i in range(40)}  # every acknowledged write is on disk


# --- pipelining, batches, limits -------------------------------------------------------------


def test_pipelined_requests_are_all_answered_by_id(unlocked: Daemon) -> None:
    s = raw_connect(unlocked.socket)
    rpc(s, "store", {"name": "p", "value": "pv"})
    reqs = []
    for i in range(200):
        method = "store" if i % 10 == 0 else "retrieve"
        params = {"name": f"w{i}", "value": "x"} if method == "store" else {"name": "p"}
        reqs.append(json.dumps({"jsonrpc": "2.0", "id": 1000 + i, "method": method, "params": params}))
    s.sendall(("\n".join(reqs) + "\n").encode())
    got = read_lines(s, 200)
    assert sorted(g["id"] for g in got) == list(range(1000, 1200))
    assert all("result" in g for g in got)
    assert all(g["result"]["value"] == "pv" for g in got if (g["id"] - 1000) % 10)


def test_batch_over_the_socket(unlocked: Daemon) -> None:
    s = raw_connect(unlocked.socket)
    batch = [{"jsonrpc": "2.0", "id": i, "method": "store", "params": {"name": f"b{i}", "value": "v"}}
             for i in range(5)] + [{"jsonrpc": "2.0", "method": "status"}]
    s.sendall(json.dumps(batch).encode() + b"\n")
    got = read_lines(s, 1)[0]
    assert isinstance(got, list) and sorted(g["id"] for g in got) == list(range(5))


def test_oversize_frame_closes_only_that_connection(unlocked: Daemon) -> None:
    other = raw_connect(unlocked.socket)
    bad = raw_connect(unlocked.socket)
    big = b'{"jsonrpc":"2.0","id":1,"method":"store","params":{"name":"a","value":"' + b"x" * (2 << 20)
    try:
        bad.sendall(big + b'"}}\n')
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon may close before we finish writing 2 MiB
    got = b""
    try:
        while chunk := bad.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    assert json.loads(got.splitlines()[0])["error"]["code"] == -32600
    assert rpc(other, "status")["result"]["initialized"] is True


def test_malformed_input_is_answered_and_others_keep_working(unlocked: Daemon) -> None:
    bad = raw_connect(unlocked.socket)
    good = raw_connect(unlocked.socket)
    for line, code in [(b"\xff\xfe\n", -32700), (b"{\n", -32700), (b"[" * 100_000 + b"\n", -32600),
                       (b'{"jsonrpc":"2.0","id":1,"method":"store","params":{"name":"a/../b","value":"v"}}\n',
                        -32602), (b"nul\x00byte\n", -32700)]:
        bad.sendall(line)
        assert read_lines(bad, 1)[0]["error"]["code"] == code
        assert "result" in rpc(good, "list", {})


@pytest.mark.slow
def test_half_sent_message_is_closed_after_the_idle_timeout(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory("--idle-timeout", "0.5")
    s = raw_connect(d.socket)
    s.sendall(b'{"jsonrpc":"2.0","id":1,"meth')
    t0 = time.monotonic()
    assert s.recv(100) == b""  # closed by the daemon
    assert 0.4 < time.monotonic() - t0 < 5
    with SecretsClient(d.socket) as c:  # a client whose connection idled out reconnects by itself
        c.status()
        time.sleep(0.8)
        assert c.status().backend == "file"


def test_connection_cap_refuses_the_newest(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = daemon_factory("--max-connections", "3")
    held = [raw_connect(d.socket) for _ in range(3)]
    for h in held:
        assert "result" in rpc(h, "status")
    extra = raw_connect(d.socket)
    msg = read_lines(extra, 1)[0]
    assert msg["error"]["code"] == -32006 and "limit 3" in msg["error"]["message"]
    assert extra.recv(10) == b""
    held[0].close()
    deadline = time.monotonic() + 5
    while True:  # the slot frees as soon as the daemon sees the close
        s = raw_connect(d.socket)
        reply = rpc(s, "status")
        if "result" in reply or time.monotonic() > deadline:
            break
    assert "result" in reply


@pytest.mark.slow
def test_failed_unlocks_are_slowed_down_without_blocking_others(unlocked: Daemon) -> None:
    with SecretsClient(unlocked.socket) as c:
        c.lock()
        t0 = time.monotonic()
        for _ in range(3):
            with pytest.raises(WrongPassphraseError):
                c.unlock("wrong")
        # delays of 0.25 s then 0.5 s were earned before the 2nd and 3rd attempts
        assert time.monotonic() - t0 >= 0.7
        other = raw_connect(unlocked.socket)
        c2 = SecretsClient(unlocked.socket)
        t1 = time.monotonic()
        assert c2.status().locked
        assert time.monotonic() - t1 < 0.5
        other.close()
        c.unlock(PASSPHRASE)


def test_reconnect_after_daemon_restart(unlocked: Daemon) -> None:
    c = SecretsClient(unlocked.socket)
    c.store("r", "v")
    unlocked.restart()
    assert c.status().locked  # same client object, reconnected once by itself
    c.unlock(PASSPHRASE)
    assert c.get("r") == "v"


@pytest.mark.anyio
async def test_async_reconnect_after_daemon_restart(unlocked: Daemon) -> None:
    async with AsyncSecretsClient(unlocked.socket) as c:
        await c.store("r", "v")
        await anyio.to_thread.run_sync(unlocked.restart)
        assert (await c.status()).locked
        await c.unlock(PASSPHRASE)
        assert await c.get("r") == "v"


def test_unreachable_agent_error_names_socket_and_how_to_start(short_tmp: Path) -> None:
    with pytest.raises(AgentUnreachableError) as info:
        SecretsClient(short_tmp / "none.sock").status()
    assert "none.sock" in str(info.value) and "secretsd" in str(info.value)


def test_no_secret_reaches_the_debug_log(unlocked: Daemon) -> None:
    canary_v, canary_p = "CANARY-value-5b21", "CANARY-pass-77c0"
    with SecretsClient(unlocked.socket) as c:
        c.store("leak/check", canary_v)
        c.rotate("leak/check", canary_v + "2")
        c.get("leak/check")
        c.change_passphrase(PASSPHRASE, canary_p)
        with pytest.raises(WrongPassphraseError):
            c.change_passphrase("CANARY-wrong-1", "CANARY-wrong-2")
        with pytest.raises(InvalidParams):
            c.store("../bad", canary_v)
    unlocked.stop()
    text = unlocked.log_text()
    assert "DEBUG" in text or "INFO" in text
    for needle in (canary_v, canary_p, PASSPHRASE, "CANARY-wrong"):
        assert needle not in text
