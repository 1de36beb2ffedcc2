"""Typed params and results of every method, and the method table.

Params are decoded in the second step of request decoding (the envelope keeps
them as ``msgspec.Raw``), each with its own reusable decoder. Validation that
msgspec cannot express (name syntax, kinds) runs in ``__post_init__`` so a bad
name is an ordinary -32602 with a message that names the rule, never the value.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from .names import KINDS, check_name, check_prefix
from .secret import Secret

Kind = Literal["provider", "llm", "device", "generic"]
VersionSelector = Literal["current", "previous"]

assert set(KINDS) == set(Kind.__args__)  # type: ignore[attr-defined]


def _check_text(secret: Secret, what: str) -> None:
    try:
        secret.reveal().encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the {what} must be valid Unicode text (no lone surrogates)") from None


class Params(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every params struct: unknown fields are an error, not ignored."""


class NoParams(Params, frozen=True):
    pass


class PassphraseParams(Params, frozen=True):
    passphrase: Secret

    def __post_init__(self) -> None:
        if len(self.passphrase) == 0:
            raise ValueError("the passphrase must not be empty")
        _check_text(self.passphrase, "passphrase")


class ChangePassphraseParams(Params, frozen=True):
    old: Secret
    new: Secret

    def __post_init__(self) -> None:
        if len(self.new) == 0:
            raise ValueError("the new passphrase must not be empty")
        _check_text(self.old, "old passphrase")
        _check_text(self.new, "new passphrase")


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


class ListParams(Params, frozen=True):
    prefix: str = ""

    def __post_init__(self) -> None:
        check_prefix(self.prefix)


class RotateParams(Params, frozen=True):
    name: str
    value: Secret

    def __post_init__(self) -> None:
        check_name(self.name)
        _check_text(self.value, "value")


class MigrateParams(Params, frozen=True):
    to: Literal["file", "keychain", "openbao"]
    passphrase: Secret | None = None  # for the encrypted-file store, when it is the target
    source: Literal["file", "keychain", "openbao"] | None = None  # a re-run's old backend, to clean


# --- results -------------------------------------------------------------------


class Result(msgspec.Struct, frozen=True):
    pass


class StatusResult(Result, frozen=True):
    initialized: bool
    locked: bool
    backend: str
    version: str
    secrets: int | None
    uptime_s: float
    memory_locked: bool = False


class InitResult(Result, frozen=True):
    initialized: bool = True


class LockedResult(Result, frozen=True):
    locked: bool


class ChangedResult(Result, frozen=True):
    changed: bool = True


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


class Method(msgspec.Struct, frozen=True):
    """One row of the method table."""

    name: str
    params: type[Params]
    result: Any  # a type, or a union of types, msgspec can decode
    writes: bool  # changes state: the daemon runs it off the connection's fast path


METHODS: Final[dict[str, Method]] = {
    m.name: m
    for m in (
        Method("status", NoParams, StatusResult, writes=False),
        Method("init", PassphraseParams, InitResult, writes=True),
        Method("unlock", PassphraseParams, LockedResult, writes=True),
        Method("lock", NoParams, LockedResult, writes=True),
        Method("change_passphrase", ChangePassphraseParams, ChangedResult, writes=True),
        Method("store", StoreParams, WrittenResult, writes=True),
        Method("retrieve", RetrieveParams, SecretResult | None, writes=False),
        Method("delete", NameParams, bool, writes=True),
        Method("list", ListParams, list[str], writes=False),
        Method("rotate", RotateParams, WrittenResult, writes=True),
        Method("describe", NameParams, DescribeResult | None, writes=False),
        Method("migrate", MigrateParams, MigrateResult, writes=True),
    )
}
