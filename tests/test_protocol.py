"""The sans-I/O protocol: framing, JSON-RPC 2.0 semantics, both halves in memory."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from homeagent_secrets.protocol import errors
from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.framing import MAX_BATCH, FrameSplitter
from homeagent_secrets.protocol.messages import (
    DeleteParams,
    NameParams,
    PassphraseParams,
    RetrieveParams,
    StoreParams,
)
from homeagent_secrets.protocol.rpc import ClientProtocol
from homeagent_secrets.protocol.secret import Secret
from homeagent_secrets.protocol.server import has_duplicate_keys

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
def pair() -> MemoryPair:
    return MemoryPair()


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
    assert list(pair.store.records) == ["n"]
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


@pytest.mark.parametrize(('batch', 'n'), [("[1]", 1), ("[1,2,3]", 3)])
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
    assert list(pair.store.records) == ["z1"]


# --- our own rules --------------------------------------------------------------------


@pytest.mark.parametrize(('line', 'code'), [
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
    assert (await pair.call(m.STORE, StoreParams("svc/token", Secret("t1"), "provider"))).version == 1
    assert (await pair.call(m.ROTATE, m.RotateParams("svc/token", Secret("t2")))).version == 2
    assert (await pair.call(m.RETRIEVE, RetrieveParams("svc/token"))).value == Secret("t2")
    assert (await pair.call(m.RETRIEVE, RetrieveParams("svc/token", "previous"))).value == Secret("t1")
    assert (await pair.call(m.DESCRIBE, NameParams("svc/token"))).kind == "provider"
    assert await pair.call(m.LIST, m.ListParams()) == ["svc/token"]
    assert await pair.call(m.LIST, m.ListParams(after="svc/token")) == []
    with pytest.raises(errors.WrongPassphraseError):
        await pair.call(m.UNLOCK, PassphraseParams(Secret("nope")))
    with pytest.raises(errors.WrongPassphraseError):
        await pair.call(m.CHANGE_PASSPHRASE, m.ChangePassphraseParams(Secret("nope"), Secret("new")))
    with pytest.raises(errors.AlreadyInitializedError):
        await pair.call(m.INIT, m.InitParams(Secret("another")))
    with pytest.raises(errors.NotSupportedError):
        await pair.call(m.MIGRATE, m.MigrateParams("file", Secret("pw")))
    assert (await pair.call(m.WHOAMI, m.NoParams())).rights[0].names == ["**"]
    with pytest.raises(errors.NotSupportedError):
        await pair.call(m.REKEY, m.RekeyParams(Secret("pw"), Secret("new")))
    status = await pair.call(m.STATUS, m.NoParams())
    assert status.secrets == 1 and not status.locked and status.backend == "memory"
    assert (await pair.call(m.LOCK, m.NoParams())).locked is True
    with pytest.raises(errors.LockedError):
        await pair.call(m.RETRIEVE, RetrieveParams("svc/token"))
    await pair.call(m.UNLOCK, PassphraseParams(Secret("pw")))
    assert await pair.call(m.DELETE, DeleteParams("svc/token")) is True
    assert await pair.call(m.RETRIEVE, RetrieveParams("svc/token")) is None
    assert {mt.name for mt in m.METHODS.values() if not mt.connection} <= pair.store.answered


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
    for text in (repr(s), str(s), f"{s}", repr(p), str([p]), "%s %r" % (s, s)):  # noqa: UP031 -- the old operator is what is checked
        assert "hunter2" not in text
    with pytest.raises(TypeError):
        hash(s)
    import pickle
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_every_error_class_has_a_distinct_code_and_an_actionable_default() -> None:
    documented = (-32700, -32600, -32601, -32602, -32603, *range(-32009, -32000))
    classes = [type(errors.error_for_code(code, "m")) for code in documented]
    assert errors.SecretsError not in classes  # every documented code has its own class...
    assert len(set(classes)) == len(documented)  # ...and no two share one
    for code, cls in zip(documented, classes, strict=True):
        assert cls.code == code and cls.default_message
    unknown = errors.error_for_code(-31999, "m")
    assert type(unknown) is errors.SecretsError and unknown.code == -31999
    assert "secretsctl unlock" in errors.LockedError().message
    assert "secretsctl init" in errors.NotInitializedError().message


def test_msgspec_decode_of_params_uses_redacted_secrets() -> None:
    p = msgspec.json.decode(b'{"passphrase":"pw"}', type=PassphraseParams,
                            dec_hook=__import__("homeagent_secrets.protocol.secret", fromlist=["x"]).dec_hook)
    assert isinstance(p.passphrase, Secret) and "pw" not in repr(p)


# --- duplicate keys, batch size, passphrases --------------------------------------------


@pytest.mark.parametrize("line", [
    b'{"jsonrpc":"2.0","method":"status","method":"lock","id":1}',
    b'{"jsonrpc":"2.0","method":"lock","id":1,"id":2}',
    b'{"jsonrpc":"2.0","method":"retrieve","id":1,"params":{"name":"a","name":"b"}}',
    b'{"jsonrpc":"2.0","method":"retrieve","id":1,"params":{"name":"a","na\\u006de":"b"}}',
    b'{"jsonrpc":"2.0","method":"retrieve","id":1,"params":{"name":"a", "name" :"b"}}',
    b'{"jsonrpc":"2.0","method":"status","id":1,"method" :"lock"}',
    b'{"jsonrpc":"2.0","method":"status","id":1,"method"\t:"lock"}',
    b'{"jsonrpc":"2.0","jsonrpc":"2.0","method":"status","id":1}',
    b'{"jsonrpc":"2.0","method":"nope","method":"status","id":1}',
])
async def test_a_repeated_key_is_an_invalid_request(pair: MemoryPair, line: bytes) -> None:
    got = await answer(pair, line)
    assert isinstance(got, dict) and got["error"]["code"] == -32600, got
    assert "repeats a key" in got["error"]["message"]
    assert pair.store.answered == set()  # nothing ran: not the first, not the last


@pytest.mark.parametrize("line", [
    b'{"jsonrpc":"2.0","method":"retrieve","id":1,"params":{"name":"method"}}',
    b'{"jsonrpc":"2.0","method":"retrieve","id":1,"params":{"name":"a","version":"current"}}',
    b'{ "jsonrpc" : "2.0" , "method" : "status" , "id" : 1 }',
    b'{"jsonrpc":"2.0","method":"store","id":1,"params":{"name":"a","value":"x\\":\\"y: \\"id\\":"}}',
    b'{"jsonrpc":"2.0","method":"status","params":{},"id":1}',
    b'{"jsonrpc":"2.0","method":"list","params":{"prefix":"","after":"","limit":5},"id":null}',
])
async def test_lines_without_repeated_keys_are_served(pair: MemoryPair, line: bytes) -> None:
    got = await answer(pair, line)
    assert isinstance(got, dict) and "result" in got, got


@pytest.mark.slow
def test_duplicate_key_detection_matches_a_full_parse() -> None:
    """The fast path (no backslash, every ':' ends a key) agrees with json's own parse."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(["jsonrpc", "method", "params", "id", "name", "value", "x"])
    obj = st.lists(st.tuples(keys, st.one_of(st.text(max_size=5), st.integers())), max_size=6)

    @settings(max_examples=300, deadline=None)
    @given(outer=obj, inner=obj, spaced=st.booleans())
    def check(outer: list[tuple[str, object]], inner: list[tuple[str, object]], spaced: bool) -> None:
        sep = " : " if spaced else ":"
        def enc(pairs: list[tuple[str, object]], nested: str = "") -> str:
            parts = [json.dumps(k) + sep + json.dumps(v) for k, v in pairs]
            if nested:
                parts.append('"params"' + sep + nested)
            return "{" + ",".join(parts) + "}"
        line = enc(outer, enc(inner)).encode()
        repeated = len({k for k, _ in outer} | ({"params"} if True else set())) != len(outer) + 1 \
            or len({k for k, _ in inner}) != len(inner)
        repeated = (len([k for k, _ in outer] + ["params"]) != len({k for k, _ in outer} | {"params"})
                    or len([k for k, _ in inner]) != len({k for k, _ in inner}))
        assert has_duplicate_keys(line) == repeated

    check()


async def test_a_batch_over_the_limit_is_one_invalid_request(pair: MemoryPair) -> None:
    one = {"jsonrpc": "2.0", "method": "status", "id": 1}
    assert isinstance(await answer(pair, json.dumps([one] * MAX_BATCH)), list)
    got = await answer(pair, json.dumps([one] * (MAX_BATCH + 1)))
    assert isinstance(got, dict) and got["error"]["code"] == -32600
    assert f"at most {MAX_BATCH}" in got["error"]["message"]


async def test_a_lone_surrogate_escape_is_a_parse_error_as_documented(pair: MemoryPair) -> None:
    got = await answer(pair, b'{"jsonrpc":"2.0","method":"store","id":1,"params":{"name":"a","value":"\\ud800"}}')
    assert isinstance(got, dict) and got["error"]["code"] == -32700
    doc = " ".join((Path(__file__).parents[1] / "protocol" / "PROTOCOL.md").read_text().split())
    assert "lone surrogate" in doc and "-32700" in doc.split("lone surrogate")[1][:200]


@pytest.mark.parametrize(('method', 'params', 'code', 'words'), [
    ("init", {"passphrase": ""}, -32602, "must not be empty"),
    ("init", {"passphrase": "pw\npw"}, -32602, "control characters"),
    ("init", {"passphrase": "x" * 1025}, -32602, "1024 bytes"),
    ("change_passphrase", {"old": "pw", "new": ""}, -32602, "must not be empty"),
    ("change_passphrase", {"old": "pw", "new": "a\tb"}, -32602, "control characters"),
    ("migrate", {"to": "file", "passphrase": ""}, -32602, "must not be empty"),
    ("migrate", {"to": "file", "passphrase": "two\nlines"}, -32602, "control characters"),
    ("unlock", {"passphrase": ""}, -32602, "must not be empty"),
])
async def test_passphrases_follow_one_rule_everywhere(
    pair: MemoryPair, method: str, params: dict[str, str], code: int, words: str
) -> None:
    got = await answer(pair, json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
    assert isinstance(got, dict) and got["error"]["code"] == code and words in got["error"]["message"]
    for value in params.values():
        if len(value) > 3:
            assert value not in got["error"]["message"]


async def test_an_old_passphrase_with_a_newline_can_still_unlock(pair: MemoryPair) -> None:
    """Only new passphrases refuse control characters: a store made before can be opened."""
    pair.store.passphrase = "made\tbefore"
    got = await answer(pair, json.dumps({"jsonrpc": "2.0", "id": 1, "method": "unlock",
                                         "params": {"passphrase": "made\tbefore"}}))
    assert isinstance(got, dict) and got["result"] == {"locked": False}


def test_the_quick_path_takes_only_one_whole_well_formed_read_request() -> None:
    """``ServerProtocol.quick`` (the server's one-request fast path) gives the same call as
    the general way, or None, and never for anything the general way would refuse."""
    from homeagent_secrets.protocol.server import Call, ServerProtocol

    good = b'{"jsonrpc":"2.0","id":7,"method":"retrieve","params":{"name":"a/b"}}\n'
    p = ServerProtocol()
    call = p.quick(good)
    assert isinstance(call, Call) and call.method is m.RETRIEVE and call.id == 7
    assert call.params == RetrieveParams("a/b")
    assert p.quick(good.replace(b'}}', b',"version":"previous"}}')) is not None
    refused = [
        good[:-1],  # not a whole line yet
        good + good,  # two requests in one read
        b"[" + good[:-1] + b"]\n",  # a batch
        good.replace(b'"name":"a/b"', b'"name":"a/b","name":"admin/x"'),  # a repeated key
        good.replace(b'{"name":"a/b"}', b'["a/b"]'),  # positional params
        good.replace(b'"2.0"', b'"1.0"'),
        good.replace(b"retrieve", b"store").replace(b'"a/b"', b'"a/b","value":"v"'),  # not nowait
        good.replace(b"retrieve", b"unlock").replace(b'{"name":"a/b"}', b'{"passphrase":"p"}'),
        b'{"params":{"name":"a/b"},"jsonrpc":"2.0","id":7}\n',  # no method at all
        b"\n",
    ]
    for line in refused:
        assert ServerProtocol().quick(line) is None, line
    # Something held from an earlier read: the line completes that one, not a request.
    held = ServerProtocol()
    assert held.frames(b'{"jsonrpc":"2.0",') == []
    assert held.quick(good) is None
    # Over the frame limit: the general way reports it.
    small = ServerProtocol(max_frame=len(good) - 2)
    assert small.quick(good) is None
    # The bad-message corpus and the fuzzer's corpus, and the good line made odd in
    # every way the fuzzer would: quick agrees with the general way, or declines.
    corpus = Path(__file__).parent / "corpus"
    cases = json.loads((corpus / "bad_messages.json").read_text())["cases"]
    lines = [c["send"].encode() for c in cases if isinstance(c["send"], str)]
    lines += [f.read_bytes() for f in sorted((corpus / "fuzz").iterdir())]
    lines += [good[:i] + bytes([b]) + good[i + 1:] for i in range(len(good) - 1) for b in b' "\\:{}[],\r0']
    taken = 0
    for raw in lines:
        for line in (raw.rstrip(b"\n") + b"\n", *(r + b"\n" for r in raw.split(b"\n"))):
            q = ServerProtocol().quick(line)
            if q is None:
                continue
            taken += 1
            general = ServerProtocol()
            (frame,) = general.frames(line)
            g = general.parse(frame)
            assert isinstance(g, Call), line
            assert (g.method, g.params, g.id) == (q.method, q.params, q.id), line
    assert taken > 0  # the check above ran on some lines
