"""The contract every storage backend honours (keyring's BackendBasicTests idea).

Parametrized over every backend in ``tests/backends.py``: a new backend gets
this whole suite by adding one entry there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from homeagent_secrets.daemon.backends.base import Backend
from homeagent_secrets.protocol.errors import NotFoundError
from homeagent_secrets.protocol.secret import Secret

from .backends import BACKENDS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with BACKENDS[request.param](tmp_path, request) as b:
        yield b


@pytest.mark.slow
async def test_store_then_retrieve_returns_the_value(backend: Backend) -> None:
    assert await backend.store("svc/api", Secret("v1"), "provider") == 1
    got = await backend.retrieve("svc/api")
    assert got is not None and got.value == Secret("v1") and got.version == 1 and got.name == "svc/api"


async def test_retrieve_absent_is_none(backend: Backend) -> None:
    assert await backend.retrieve("nope") is None
    assert await backend.retrieve("nope", previous=True) is None
    assert await backend.describe("nope") is None


async def test_store_overwrites_and_keeps_previous(backend: Backend) -> None:
    await backend.store("k", Secret("one"), None)
    assert await backend.store("k", Secret("two"), None) == 2
    cur, prev = await backend.retrieve("k"), await backend.retrieve("k", previous=True)
    assert cur is not None and cur.value == Secret("two") and cur.version == 2
    assert prev is not None and prev.value == Secret("one") and prev.version == 1


async def test_rotate_keeps_previous_value(backend: Backend) -> None:
    await backend.store("dev/lock", Secret("old"), "device")
    assert await backend.rotate("dev/lock", Secret("new")) == 2
    assert await backend.rotate("dev/lock", Secret("newer")) == 3
    prev = await backend.retrieve("dev/lock", previous=True)
    assert prev is not None and prev.value == Secret("new") and prev.version == 2
    info = await backend.describe("dev/lock")
    assert info is not None and info.has_previous and info.version == 3 and info.kind == "device"


async def test_rotate_absent_is_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        await backend.rotate("ghost", Secret("x"))
    assert await backend.list("") == []


async def test_delete_removes_value_and_previous(backend: Backend) -> None:
    await backend.store("d", Secret("1"), None)
    await backend.rotate("d", Secret("2"))
    assert await backend.delete("d") is True
    assert await backend.delete("d") is False
    assert await backend.retrieve("d") is None and await backend.retrieve("d", previous=True) is None
    assert await backend.store("d", Secret("3"), None) == 1  # a new life starts at version 1


async def test_list_is_sorted_filtered_and_names_only(backend: Backend) -> None:
    for n in ("b/x", "a/y", "a/x", "c"):
        await backend.store(n, Secret("value-" + n), None)
    assert await backend.list("") == ["a/x", "a/y", "b/x", "c"]
    assert await backend.list("a/") == ["a/x", "a/y"]
    assert await backend.list("zz") == []


async def test_describe_reports_kind_and_times(backend: Backend) -> None:
    await backend.store("llm/openai", Secret("sk"), "llm")
    info = await backend.describe("llm/openai")
    assert info is not None
    assert (info.kind, info.version, info.has_previous) == ("llm", 1, False)
    assert info.created <= info.updated
    await backend.store("llm/openai", Secret("sk2"), None)
    again = await backend.describe("llm/openai")
    assert again is not None and again.kind == "llm" and again.created == info.created


async def test_default_kind_is_generic(backend: Backend) -> None:
    await backend.store("g", Secret("v"), None)
    info = await backend.describe("g")
    assert info is not None and info.kind == "generic"


async def test_unicode_and_large_values_round_trip(backend: Backend) -> None:
    values = ["", "ünïcødé ✓ 🔑", "x" * 65536, "line1\nline2\x00nul"]
    for i, v in enumerate(values):
        await backend.store(f"u{i}", Secret(v), None)
    for i, v in enumerate(values):
        got = await backend.retrieve(f"u{i}")
        assert got is not None and got.value == Secret(v)


@pytest.mark.slow
async def test_concurrent_writes_to_one_name_are_serialized(backend: Backend) -> None:
    await backend.store("c", Secret("0"), None)
    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(backend.rotate, "c", Secret(str(i + 1)))
    got = await backend.retrieve("c")
    assert got is not None and got.version == 11


@pytest.mark.slow
async def test_count_matches_list(backend: Backend) -> None:
    for i in range(5):
        await backend.store(f"n{i}", Secret("v"), None)
    await backend.store("n0", Secret("again"), None)  # an overwrite is not a new secret
    await backend.delete("n4")
    listed = await backend.list("")
    assert listed == ["n0", "n1", "n2", "n3"]
    assert await backend.count() == len(listed) == 4


async def test_export_import_round_trip_keeps_everything(backend: Backend) -> None:
    from homeagent_secrets.daemon.backends.base import RecordExport

    await backend.store("m/x", Secret("one"), "device")
    await backend.rotate("m/x", Secret("two"))
    rec = await backend.export("m/x")
    assert rec is not None
    assert rec == RecordExport("two", "one", 2, 1, "device", rec.created, rec.updated)
    assert "two" not in repr(rec)
    await backend.import_("m/y", rec)
    copy = await backend.export("m/y")
    if backend.keeps_history:
        assert copy == rec
    else:  # OpenBao numbers versions and stamps times itself: values and kind carry over
        assert rec.same_content(copy)
    prev = await backend.retrieve("m/y", previous=True)
    assert prev is not None and prev.value == Secret("one") and prev.version == 1
    assert await backend.export("nope") is None
