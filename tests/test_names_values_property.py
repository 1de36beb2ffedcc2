"""Hypothesis: any name and any Unicode value round-trips or is rejected with -32602."""

from __future__ import annotations

import json

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homeagent_secrets.protocol.names import name_problem

from .memory import MemoryPair

_SEGMENT_CHARS = st.sampled_from("abcXYZ019._-")
valid_names = st.lists(
    st.text(_SEGMENT_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", "..")),
    min_size=1, max_size=5,
).map("/".join).filter(lambda n: len(n) <= 256)
any_names = st.one_of(valid_names, st.text(max_size=300))
any_values = st.text(max_size=300)  # all of Unicode, lone surrogates included


def _run(names_values: list[tuple[str, str]]) -> None:
    async def go() -> None:
        pair = MemoryPair()
        for i, (name, value) in enumerate(names_values):
            req = json.dumps({"jsonrpc": "2.0", "id": i, "method": "store",
                              "params": {"name": name, "value": value}})
            got = json.loads(await pair.server_receive(req.encode() + b"\n"))
            valid_text = True
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                valid_text = False
            if name_problem(name) is None and valid_text:
                assert "result" in got, got
                back = json.loads(await pair.server_receive(json.dumps(
                    {"jsonrpc": "2.0", "id": i, "method": "retrieve", "params": {"name": name}}
                ).encode() + b"\n"))
                assert back["result"]["value"] == value
            elif not valid_text:  # a lone surrogate escape: msgspec refuses the JSON itself
                assert got["error"]["code"] == -32700, got
            else:
                assert got["error"]["code"] == -32602, got
                # (short values can occur in any text by chance)
                assert len(value) < 6 or value not in got["error"]["message"]
    anyio.run(go)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(any_names, any_values), min_size=1, max_size=8))
def test_names_and_values_round_trip_or_are_rejected(names_values: list[tuple[str, str]]) -> None:
    _run(names_values)


def test_name_rules() -> None:
    good = ["a", "a/b", "A-Z_0.9/x", "x" * 256, "..a", "a.."]
    bad = ["", "/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", "é", "a b", "a\x00", "x" * 257, "a\nb"]
    assert [n for n in good if name_problem(n)] == []
    assert [n for n in bad if name_problem(n) is None] == []
