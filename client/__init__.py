"""Clients of secretsd: ``SecretsClient`` (blocking), ``AsyncSecretsClient`` (anyio).

Errors are the protocol's own classes, raised with the daemon's message.
``AsyncSecretsClient`` is imported on first use, so a program (or secretsctl)
that only needs the blocking client never loads the async stack.
"""

from typing import TYPE_CHECKING, Any

from homeagent_secrets.protocol.errors import (
    AgentUnreachableError,
    AlreadyInitializedError,
    BackendUnavailableError,
    ConflictError,
    InvalidParams,
    LockedError,
    MigrationInProgressError,
    NotFoundError,
    NotInitializedError,
    NotSupportedError,
    SecretsError,
    UntrustedAgentError,
    ValueTooLargeError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.secret import Secret

from .sync import SecretsClient

if TYPE_CHECKING:
    from .aio import AsyncSecretsClient


def __getattr__(name: str) -> Any:
    if name == "AsyncSecretsClient":
        from .aio import AsyncSecretsClient

        return AsyncSecretsClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AgentUnreachableError",
    "AlreadyInitializedError",
    "AsyncSecretsClient",
    "BackendUnavailableError",
    "ConflictError",
    "InvalidParams",
    "LockedError",
    "MigrationInProgressError",
    "NotFoundError",
    "NotInitializedError",
    "NotSupportedError",
    "Secret",
    "SecretsClient",
    "SecretsError",
    "UntrustedAgentError",
    "ValueTooLargeError",
    "WrongPassphraseError",
]
