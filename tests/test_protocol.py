"""The sans-I/O protocol: framing, JSON-RPC 2.0 semantics, both halves in memory."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from homeagent_secrets.protocol import errors
from homeagent_secrets.protocol.framing import FrameSplitter
from homeagent_secrets.protocol.messages import (
    METHODS,
    NameParams,
    PassphraseParams,
    RetrieveParams,
    StoreParams,
)
from homeagent_secrets.protocol.rpc import ClientProtocol
from homeagent_secrets.protocol.secret import Secret

from .memory import MemoryPair

pytestmark = pytest.mark.anyio


# --- framing -------------------------------------------------------------------------


def test_splitter_joins_lines_across_chunks() -> None:
    s = FrameSplitter()
    assert s.feed(b'{"a":') == []
    assert s.pending == 5
    assert s.feed(b'1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert s.feed(b":3}\r\n\n  \n") == [b'{"c":3}']
    assert s.pending == 0


def test_splitter_reports_oversize_without_buffering_it() -> None:
    s = FrameSplitter(max_size=10)
    assert s.feed(b"0123456789\n") == [b"0123456789"]
    assert s.feed(b"01234567890") == []
    assert s.oversize
    assert s.pending == 0  # the oversize bytes were not kept
    assert s.feed(b"\n{}\n") == []  # out of step: nothing more is framed


def test_splitter_returns_lines_before_an_oversize_one() -> None:
    s = FrameSplitter(max_size=4)
    assert s.feed(b"ab\n" + b"x" * 50 + b"\ncd\n") == [b"ab"]
    assert s.oversize


# --- JSON-RPC 2.0 specification examples ---------------------------------------------


@pytest.fixture
async def pair(tmp_path: Path) -> MemoryPair:
    p = await MemoryPair(tmp_path / "home").open()
    await p.dispatcher.agent.backend.init(Secret("pw"))
    return p


async def answer(pair: MemoryPair, text: str | bytes) -> object:
    raw = text.encode() if isinstance(text, str) else text
    out = await pair.server_receive(raw + b"\n")
    return json.loads(out) if out else None


async def test_spec_named_params_call(pair: MemoryPair) -> None:
    await answer(pair, '{"jsonrpc":"2.0","method":"store","params":{"name":"a","value":"v"},"id":1}')
    got = await answer(pair, '{"jsonrpc":"2.0","method":"retrieve","params":{"name":"a"},"id":"x"}')
    assert got == {"jsonrpc": "2.0", "id": "x", "result": {"name": "a", "value": "v", "version": 1}}


async def test_spec_positional_params_are_invalid_params(pair: MemoryPair) -> None:
    got = await answer(pair, '{"jsonrpc":"2.0","method":"retrieve","params":["a"],"id":1}')
    assert got["error"]["code"] == -32602  # type: ignore[index]
    assert "positional" in got["error"]["message"]  # type: ignore[index]


async def test_spec_notification_runs_but_is_not_answered(pair: MemoryPair) -> None:
    assert await answer(pair, '{"jsonrpc":"2.0","method":"store","params":{"name":"n","value":"v"}}') is None
    assert await pair.backend.list("") == ["n"]
    assert await answer(pair, '{"jsonrpc":"2.0","method":"foobar"}') is None


async def test_spec_method_not_found(pair: MemoryPair) -> None:
    got = await answer(pair, '{"jsonrpc":"2.0","method":"foobar","id":"1"}')
    assert got["id"] == "1" and got["error"]["code"] == -32601  # type: ignore[index]


async def test_spec_invalid_json_is_parse_error_with_null_id(pair: MemoryPair) -> None:
    got = await answer(pair, '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert got == {"jsonrpc": "2.0", "id": None,
                   "error": {"code": -32700, "message": errors.ParseError.default_message}}


async def test_spec_invalid_request_object(pair: MemoryPair) -> None:
    got = await answer(pair, '{"jsonrpc": "2.0", "method": 1, "params": "bar"}')
    assert got["id"] is None and got["error"]["code"] == -32600  # type: ignore[index]


async def test_spec_batch_invalid_json(pair: MemoryPair) -> None:
    got = await answer(pair, '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
                             '{"jsonrpc": "2.0", "method"]')
    assert got["error"]["code"] == -32700 and got["id"] is None  # type: ignore[index]


async def test_spec_empty_batch_is_one_invalid_request(pair: MemoryPair) -> None:
    got = await answer(pair, "[]")
    assert isinstance(got, dict) and got["error"]["code"] == -32600


@pytest.mark.parametrize("batch, n", [("[1]", 1), ("[1,2,3]", 3)])
async def test_spec_invalid_batch_items_each_answered(pair: MemoryPair, batch: str, n: int) -> None:
    got = await answer(pair, batch)
    assert isinstance(got, list) and len(got) == n
    assert all(g["error"]["code"] == -32600 and g["id"] is None for g in got)


async def test_spec_mixed_batch(pair: MemoryPair) -> None:
    got = await answer(pair, json.dumps([
        {"jsonrpc": "2.0", "method": "store", "params": {"name": "m", "value": "1"}, "id": "1"},
        {"jsonrpc": "2.0", "method": "store", "params": {"name": "q", "value": "2"}},
        {"jsonrpc": "2.0", "method": "list", "params": {"prefix": ""}, "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "describe", "params": {"name": "m"}, "id": "9"},
    ]))
    assert isinstance(got, list)
    by_id = {g["id"]: g for g in got}
    assert len(got) == 5  # the notification gets no entry
    assert by_id["1"]["result"] == {"name": "m", "version": 1}
    assert by_id["2"]["result"] == ["m", "q"]
    assert by_id[None]["error"]["code"] == -32600
    assert by_id["5"]["error"]["code"] == -32601
    assert by_id["9"]["result"]["has_previous"] is False


async def test_spec_batch_of_notifications_gets_no_reply(pair: MemoryPair) -> None:
    assert await answer(pair, json.dumps([
        {"jsonrpc": "2.0", "method": "store", "params": {"name": "z1", "value": "1"}},
        {"jsonrpc": "2.0", "method": "status"},
    ])) is None
    assert await pair.backend.list("z") == ["z1"]


# --- our own rules --------------------------------------------------------------------


@pytest.mark.parametrize("line, code", [
    (b'{"jsonrpc":"1.0","method":"status","id":1}', -32600),
    (b'{"jsonrpc":"2.0","method":"status","id":1.5}', -32600),
    (b'{"jsonrpc":"2.0","method":"status","id":[1]}', -32600),
    (b'{"jsonrpc":"2.0","method":"status","id":true}', -32600),
    (b'"just a string"', -32600),
    (b"\xff\xfe{}", -32700),
    (b'{"jsonrpc":"2.0","method":"status","id":1,"params":{"x":1}}', -32602),
    (b'{"jsonrpc":"2.0","method":"store","id":1,"params":{"name":"a","value":1}}', -32602),
    (b'{"jsonrpc":"2.0","method":"store","id":1,"params":{"name":"a/../b","value":"v"}}', -32602),
    (b'{"jsonrpc":"2.0","method":"store","id":1,"params":{"name":"a","value":"v","kind":"x"}}', -32602),
    (b'{"jsonrpc":"2.0","method":"store","id":1,"params":{"name":"a","value":"v","extra":1}}', -32602),
    (b'{"jsonrpc":"2.0","method":"unlock","id":1,"params":{"passphrase":""}}', -32602),
    (b'{"jsonrpc":"2.0","method":"retrieve","id":1,"params":{"name":"a","version":"old"}}', -32602),
    (b'[' * 100_000, -32600),
    (b'{"a":' * 100_000, -32600),
])
async def test_bad_messages_get_the_right_code(pair: MemoryPair, line: bytes, code: int) -> None:
    got = await answer(pair, line)
    assert isinstance(got, dict) and got["error"]["code"] == code, got


async def test_huge_integer_id_is_echoed(pair: MemoryPair) -> None:
    got = await answer(pair, '{"jsonrpc":"2.0","method":"status","id":123456789012345678901234567890}')
    assert got["id"] == 123456789012345678901234567890  # type: ignore[index]


async def test_error_messages_never_echo_the_value(pair: MemoryPair) -> None:
    canary = "CANARY-v4lue-93f1"
    for params in ({"name": "../x", "value": canary}, {"name": "a", "value": canary, "kind": "bad"},
                   {"name": "a", "value": canary, "bogus": canary}):
        got = await answer(pair, json.dumps({"jsonrpc": "2.0", "method": "store", "params": params, "id": 1}))
        assert canary not in json.dumps(got)


async def test_client_and_server_halves_round_trip_every_method(pair: MemoryPair) -> None:
    assert (await pair.call("store", StoreParams("svc/token", Secret("t1"), "provider"))).version == 1
    assert (await pair.call("retrieve", RetrieveParams("svc/token"))).value == Secret("t1")
    assert (await pair.call("describe", NameParams("svc/token"))).kind == "provider"
    assert await pair.call("list", METHODS["list"].params()) == ["svc/token"]
    with pytest.raises(errors.WrongPassphraseError):
        await pair.call("unlock", PassphraseParams(Secret("nope")))
    status = await pair.call("status", METHODS["status"].params())
    assert status.secrets == 1 and not status.locked and status.backend == "file"
    assert await pair.call("delete", NameParams("svc/token")) is True
    assert await pair.call("retrieve", RetrieveParams("svc/token")) is None


def test_client_decodes_pipelined_and_batched_replies() -> None:
    c = ClientProtocol()
    data = (b'{"jsonrpc":"2.0","id":2,"result":true}\n[{"jsonrpc":"2.0","id":1,"result":false},'
            b'{"jsonrpc":"2.0","id":3,"error":{"code":-32001,"message":"locked"}}]\n')
    replies = c.receive_data(data[:10]) + c.receive_data(data[10:])
    assert [r.id for r in replies] == [2, 1, 3]
    assert isinstance(replies[2].error, errors.LockedError)
    assert replies[2].error.message == "locked"


def test_secret_type_is_redacted_everywhere() -> None:
    s = Secret("hunter2")
    p = StoreParams("a", s)
    for text in (repr(s), str(s), f"{s}", repr(p), str([p]), "%s %r" % (s, s)):
        assert "hunter2" not in text
    with pytest.raises(TypeError):
        hash(s)
    import pickle
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_every_error_class_has_a_distinct_code_and_an_actionable_default() -> None:
    for code in (-32700, -32600, -32601, -32602, -32603, *range(-32001, -32010)):
        err = errors.error_for_code(code, "m")
        assert err.code == code
    assert "secretsctl unlock" in errors.LockedError().message
    assert "secretsctl init" in errors.NotInitializedError().message


def test_msgspec_decode_of_params_uses_redacted_secrets() -> None:
    p = msgspec.json.decode(b'{"passphrase":"pw"}', type=PassphraseParams,
                            dec_hook=__import__("homeagent_secrets.protocol.secret", fromlist=["x"]).dec_hook)
    assert isinstance(p.passphrase, Secret) and "pw" not in repr(p)
