"""Typed params and results of every method, and the method table.

The method table is the one place that knows what a method is: its params and
result types, whether it changes state, whether it may be answered without
awaiting, whether it uses the data key, whether it carries a passphrase, and
which right (``action``) the access rules check. The server routes by these
facts; the agent's handler table is built from the same rows.

Validation msgspec cannot express (name syntax, passphrase rules) runs in
``__post_init__``, so a bad name is an ordinary -32602 with a message that
names the rule, never the value.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Generic, Literal, TypeVar

import msgspec

from .names import (
    BackendName,
    Kind,
    check_name,
    check_passphrase,
    check_patterns,
    check_prefix,
    text_problem,
)
from .secret import Secret

VersionSelector = Literal["current", "previous"]
#: Notification methods the agent sends on a connection with a watch (never answered).
NOTIFICATIONS: Final = ("changed", "locked", "unlocked", "overflow")
#: The right a method needs under the access rules: ``public`` methods are served
#: to every peer the socket lets in.
Action = Literal["public", "read", "list", "write", "delete", "watch", "admin"]
MAX_LIST_LIMIT: Final = 100_000


def _check_text(secret: Secret, what: str) -> None:
    problem = text_problem(secret)
    if problem is not None:
        raise ValueError(f"the {what} {problem}")


class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every params struct: unknown fields are an error, not ignored."""


class NoParams(Params, frozen=True):
    pass


class PassphraseParams(Params, frozen=True):
    """``unlock``'s passphrase: any non-empty passphrase may be tried."""

    passphrase: Secret

    def __post_init__(self) -> None:
        check_passphrase(self.passphrase, "passphrase", new=False)


class InitParams(Params, frozen=True):
    """``init``'s passphrase: a new one, under the rules for new passphrases."""

    passphrase: Secret

    def __post_init__(self) -> None:
        check_passphrase(self.passphrase, "passphrase", new=True)


class ChangePassphraseParams(Params, frozen=True):
    old: Secret
    new: Secret

    def __post_init__(self) -> None:
        check_passphrase(self.old, "old passphrase", new=False)
        check_passphrase(self.new, "new passphrase", new=True)


class RekeyParams(Params, frozen=True):
    """``rekey``: the current passphrase, and the one to wrap the new data key with."""

    old: Secret
    new: Secret

    def __post_init__(self) -> None:
        check_passphrase(self.old, "old passphrase", new=False)
        check_passphrase(self.new, "new passphrase", new=True)


class StoreParams(Params, frozen=True):
    name: str
    value: Secret
    kind: Kind | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        _check_text(self.value, "value")


class RetrieveParams(Params, frozen=True):
    name: str
    version: VersionSelector = "current"

    def __post_init__(self) -> None:
        check_name(self.name)


class NameParams(Params, frozen=True):
    name: str

    def __post_init__(self) -> None:
        check_name(self.name)


class DeleteParams(Params, frozen=True):
    name: str
    #: Remove the record even when it is damaged (it cannot be read any more).
    force: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)


class ListParams(Params, frozen=True):
    prefix: str = ""
    #: Only names sorting after this one (paging: the last name of the previous page).
    after: str = ""
    #: At most this many names (None: all).
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_LIMIT)] | None = None

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if self.after:
            check_name(self.after)


class RotateParams(Params, frozen=True):
    name: str
    value: Secret

    def __post_init__(self) -> None:
        check_name(self.name)
        _check_text(self.value, "value")


class MigrateParams(Params, frozen=True):
    to: BackendName
    #: The encrypted-file store's passphrase, when it is the target (or the source to clean up).
    passphrase: Secret | None = None
    #: Accepted from older clients; the agent knows its source itself and refuses a mismatch.
    source: BackendName | None = None

    def __post_init__(self) -> None:
        if self.passphrase is not None:
            # It may create a store: the rules for new passphrases apply.
            check_passphrase(self.passphrase, "passphrase", new=True)


class WatchParams(Params, frozen=True):
    #: Name globs ("*" one segment, "**" any number); empty: every name the caller may read.
    patterns: Annotated[list[str], msgspec.Meta(max_length=64)] = []

    def __post_init__(self) -> None:
        check_patterns(self.patterns)


class UnwatchParams(Params, frozen=True):
    watch: int


# --- results -------------------------------------------------------------------


class Result(msgspec.Struct, frozen=True):
    pass


class DamagedRecord(Result, frozen=True):
    """A record the agent cannot use: reads and writes of its name are refused."""

    file: str
    name: str | None  # known when its metadata still authenticates
    problem: str


class StatusResult(Result, frozen=True):
    initialized: bool
    locked: bool
    backend: str
    version: str
    secrets: int | None
    uptime_s: float
    memory_locked: bool = False
    home: str | None = None
    damaged: list[DamagedRecord] = []
    #: A migration that still has originals to remove, and how to finish it.
    migration: str | None = None
    #: The access log file, when one is kept (``secretsctl audit`` reads it).
    audit_log: str | None = None


class InitResult(Result, frozen=True):
    initialized: bool = True


class LockedResult(Result, frozen=True):
    locked: bool


class ChangedResult(Result, frozen=True):
    changed: bool = True


class RekeyResult(Result, frozen=True):
    #: How many secrets were re-encrypted under the new data key.
    rekeyed: int


class WrittenResult(Result, frozen=True):
    name: str
    version: int


class SecretResult(Result, frozen=True):
    name: str
    value: Secret
    version: int


class DescribeResult(Result, frozen=True):
    name: str
    kind: Kind
    version: int
    created: float
    updated: float
    has_previous: bool


class MigrateResult(Result, frozen=True):
    backend: str
    migrated: int
    removed: int


class WatchResult(Result, frozen=True):
    watch: int


# --- notifications (agent -> client, no id) --------------------------------------

ChangeEvent = Literal["stored", "rotated", "deleted"]


class Changed(Result, frozen=True):
    """The params of a ``changed`` notification: never a value."""

    watch: int
    name: str
    version: int
    event: ChangeEvent


class Right(Result, frozen=True):
    """What one access rule grants: actions on names (globs)."""

    names: list[str]
    allow: list[str]


class WhoamiResult(Result, frozen=True):
    """What the agent sees of the caller, and what the rules grant it."""

    uid: int
    gid: int
    pid: int
    unit: str | None
    rights: list[Right]


P = TypeVar("P", bound=Params)
R = TypeVar("R")


class Method(Generic[P, R]):
    """One row of the method table; generic over its params and result types."""

    __slots__ = ("action", "carries_passphrase", "connection", "name", "nowait", "params",
                 "result", "uses_key", "writes")

    def __init__(
        self,
        name: str,
        params: type[P],
        result: Any,  # the result type for msgspec (a type or a union)
        *,
        action: Action,
        writes: bool = False,
        nowait: bool = False,
        uses_key: bool = False,
        carries_passphrase: bool = False,
        connection: bool = False,
    ) -> None:
        self.name = name
        self.params = params
        self.result = result
        self.action: Action = action
        #: Changes state: the daemon runs it as a task of the connection, never inline.
        self.writes = writes
        #: May be answered from memory without awaiting (the daemon's fast path).
        self.nowait = nowait
        #: Uses the data key: resets the idle auto-lock timer (``status`` does not).
        self.uses_key = uses_key
        #: Carries a passphrase: the daemon wipes the request's bytes after use.
        self.carries_passphrase = carries_passphrase
        #: Concerns the connection itself (a subscription): the server answers it.
        self.connection = connection

    def __repr__(self) -> str:
        return f"Method({self.name!r})"


STATUS: Final = Method[NoParams, StatusResult]("status", NoParams, StatusResult, action="public")
WHOAMI: Final = Method[NoParams, WhoamiResult]("whoami", NoParams, WhoamiResult, action="public")
INIT: Final = Method[InitParams, InitResult](
    "init", InitParams, InitResult, action="admin", writes=True, carries_passphrase=True)
UNLOCK: Final = Method[PassphraseParams, LockedResult](
    "unlock", PassphraseParams, LockedResult, action="admin", writes=True, uses_key=True,
    carries_passphrase=True)
LOCK: Final = Method[NoParams, LockedResult]("lock", NoParams, LockedResult, action="admin", writes=True)
CHANGE_PASSPHRASE: Final = Method[ChangePassphraseParams, ChangedResult](
    "change_passphrase", ChangePassphraseParams, ChangedResult, action="admin", writes=True,
    carries_passphrase=True)
REKEY: Final = Method[RekeyParams, RekeyResult](
    "rekey", RekeyParams, RekeyResult, action="admin", writes=True, carries_passphrase=True)
STORE: Final = Method[StoreParams, WrittenResult](
    "store", StoreParams, WrittenResult, action="write", writes=True, uses_key=True)
RETRIEVE: Final = Method[RetrieveParams, SecretResult | None](
    "retrieve", RetrieveParams, SecretResult | None, action="read", nowait=True, uses_key=True)
DELETE: Final = Method[DeleteParams, bool](
    "delete", DeleteParams, bool, action="delete", writes=True, uses_key=True)
LIST: Final = Method[ListParams, list[str]]("list", ListParams, list[str], action="list")
ROTATE: Final = Method[RotateParams, WrittenResult](
    "rotate", RotateParams, WrittenResult, action="write", writes=True, uses_key=True)
DESCRIBE: Final = Method[NameParams, DescribeResult | None](
    "describe", NameParams, DescribeResult | None, action="read")
WATCH: Final = Method[WatchParams, WatchResult](
    "watch", WatchParams, WatchResult, action="watch", connection=True)
UNWATCH: Final = Method[UnwatchParams, bool](
    "unwatch", UnwatchParams, bool, action="public", connection=True)
MIGRATE: Final = Method[MigrateParams, MigrateResult](
    "migrate", MigrateParams, MigrateResult, action="admin", writes=True, uses_key=True,
    carries_passphrase=True)

METHODS: Final[dict[str, Method[Any, Any]]] = {
    m.name: m
    for m in (STATUS, WHOAMI, INIT, UNLOCK, LOCK, CHANGE_PASSPHRASE, STORE, RETRIEVE, DELETE, LIST,
              ROTATE, DESCRIBE, WATCH, UNWATCH, MIGRATE, REKEY)
}
