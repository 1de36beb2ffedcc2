"""What the sync and async clients share: params building and result shaping.

Both clients are thin: each public method is one line that builds params here,
sends them with the client's own I/O, and shapes the result here.
"""

from __future__ import annotations

from typing import Any, Final

from homeagent_secrets.protocol.messages import (
    ChangePassphraseParams,
    ListParams,
    MigrateParams,
    NameParams,
    NoParams,
    Params,
    PassphraseParams,
    RetrieveParams,
    RotateParams,
    StoreParams,
)
from homeagent_secrets.protocol.secret import Secret

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
# Safe to send again when the connection dropped after the request went out:
# they change nothing. Writes are never replayed blindly.
IDEMPOTENT: Final = frozenset({"status", "retrieve", "list", "describe"})


def as_secret(value: str | Secret) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


def store(name: str, value: str | Secret, kind: str | None) -> Params:
    return StoreParams(name, as_secret(value), kind)  # type: ignore[arg-type]


def retrieve(name: str, previous: bool) -> Params:
    return RetrieveParams(name, "previous" if previous else "current")


def rotate(name: str, value: str | Secret) -> Params:
    return RotateParams(name, as_secret(value))


def name(name: str) -> Params:
    return NameParams(name)


def prefix(prefix: str) -> Params:
    return ListParams(prefix)


def passphrase(passphrase: str | Secret) -> Params:
    return PassphraseParams(as_secret(passphrase))


def change(old: str | Secret, new: str | Secret) -> Params:
    return ChangePassphraseParams(as_secret(old), as_secret(new))


def migrate(to: str, passphrase: str | Secret | None, source: str | None = None) -> Params:
    secret = None if passphrase is None else as_secret(passphrase)
    return MigrateParams(to, secret, source)  # type: ignore[arg-type]


NONE: Final = NoParams()


def version_of(result: Any) -> int:
    return int(result.version)
