"""Hypothesis drives a real secretsd with random sequences of every method and
compares each answer with an in-memory model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from homeagent_secrets.client import SecretsClient
from homeagent_secrets.protocol.errors import (
    AlreadyInitializedError,
    LockedError,
    NotFoundError,
    SecretsError,
    ValueTooLargeError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.names import Kind

from .conftest import Daemon

names = st.sampled_from(["a", "b", "svc/token", "llm/x", "dev/lock"])
values = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)  # valid Unicode text
kinds: st.SearchStrategy[Kind | None] = st.sampled_from([None, "provider", "llm", "device", "generic"])
phrases = st.sampled_from(["pass one", "pass two", "pass three"])


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    d = Daemon(base / "home", base / "s.sock", base / "d.log").start()
    SecretsClient(d.socket).init("pass one")
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


class AgentModel(RuleBasedStateMachine):
    daemon: Daemon
    phrase = "pass one"  # the store's passphrase carries over between examples

    def __init__(self) -> None:
        super().__init__()
        self.c = SecretsClient(self.daemon.socket)
        self.prefix = f"t{uuid.uuid4().hex[:8]}/"
        self.model: dict[str, tuple[str, str | None, str]] = {}  # name -> (current, previous, kind)
        self.locked = False
        try:
            self.c.unlock(AgentModel.phrase)
        except SecretsError:
            pass

    def n(self, name: str) -> str:
        return self.prefix + name

    @rule(name=names, value=values, kind=kinds)
    def store(self, name: str, value: str, kind: Kind | None) -> None:
        if self.locked:
            with pytest.raises(LockedError):
                self.c.store(self.n(name), value, kind)
            return
        old = self.model.get(name)
        self.c.store(self.n(name), value, kind)
        self.model[name] = (value, old[0] if old else None, kind or (old[2] if old else "generic"))

    @rule(name=names, value=values)
    def rotate(self, name: str, value: str) -> None:
        if self.locked:
            with pytest.raises(LockedError):
                self.c.rotate(self.n(name), value)
            return
        old = self.model.get(name)
        if old is None:
            with pytest.raises(NotFoundError):
                self.c.rotate(self.n(name), value)
            return
        self.c.rotate(self.n(name), value)
        self.model[name] = (value, old[0], old[2])

    @rule(name=names)
    def delete(self, name: str) -> None:
        if self.locked:
            with pytest.raises(LockedError):
                self.c.delete(self.n(name))
            return
        assert self.c.delete(self.n(name)) == (name in self.model)
        self.model.pop(name, None)

    @rule(name=names, previous=st.booleans())
    def retrieve(self, name: str, previous: bool) -> None:
        if self.locked:
            with pytest.raises(LockedError):
                self.c.get(self.n(name))
            return
        want = self.model.get(name)
        got = self.c.get(self.n(name), previous=previous)
        assert got == (None if want is None else (want[1] if previous else want[0]))

    @rule(name=names)
    def describe(self, name: str) -> None:
        if self.locked:
            return
        info = self.c.describe(self.n(name))
        want = self.model.get(name)
        assert (info is None) == (want is None)
        if info is not None and want is not None:
            assert (info.kind, info.has_previous) == (want[2], want[1] is not None)

    @rule()
    def oversize(self) -> None:
        with pytest.raises((ValueTooLargeError, LockedError)):
            self.c.store(self.n("big"), "x" * (64 * 1024 + 1))

    @precondition(lambda self: not self.locked)
    @rule()
    def lock(self) -> None:
        self.c.lock()
        self.locked = True

    @rule(wrong=st.booleans())
    def unlock(self, wrong: bool) -> None:
        if wrong:
            with pytest.raises(WrongPassphraseError):
                self.c.unlock("not the passphrase")
        else:
            self.c.unlock(AgentModel.phrase)
            self.locked = False

    @rule(new=phrases)
    def change_passphrase(self, new: str) -> None:
        self.c.change_passphrase(AgentModel.phrase, new)
        AgentModel.phrase = new

    @rule(phrase=phrases)
    def init_again(self, phrase: str) -> None:
        with pytest.raises(AlreadyInitializedError):
            self.c.init(phrase)

    @invariant()
    def list_and_status_match(self) -> None:
        st_ = self.c.status()
        assert st_.locked == self.locked
        if not self.locked:
            assert self.c.list(self.prefix) == sorted(self.n(k) for k in self.model)

    def teardown(self) -> None:
        self.c.close()


@pytest.mark.slow
def test_random_sequences_match_the_model(shared_daemon: Daemon) -> None:
    AgentModel.daemon = shared_daemon
    AgentModel.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                                            suppress_health_check=list(HealthCheck))
    AgentModel.TestCase().runTest()
