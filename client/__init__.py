"""Clients of secretsd: ``SecretsClient`` (blocking), ``AsyncSecretsClient`` (anyio).

Errors are the protocol's own classes, raised with the daemon's message.
"""

from homeagent_secrets.protocol.errors import (
    AgentUnreachableError,
    AlreadyInitializedError,
    BackendUnavailableError,
    ConflictError,
    InvalidParams,
    LockedError,
    NotFoundError,
    NotInitializedError,
    NotSupportedError,
    SecretsError,
    ValueTooLargeError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.secret import Secret

from .aio import AsyncSecretsClient
from .sync import SecretsClient

__all__ = [
    "AgentUnreachableError",
    "AlreadyInitializedError",
    "AsyncSecretsClient",
    "BackendUnavailableError",
    "ConflictError",
    "InvalidParams",
    "LockedError",
    "NotFoundError",
    "NotInitializedError",
    "NotSupportedError",
    "Secret",
    "SecretsClient",
    "SecretsError",
    "ValueTooLargeError",
    "WrongPassphraseError",
]
