"""Clients of secretsd: ``SecretsClient`` (blocking), ``AsyncSecretsClient`` (anyio).

Errors are the protocol's own classes, raised with the daemon's message.
Every name here is imported on first use: a program (or secretsctl) that only
needs the blocking client never loads the async stack, and secretsctl decides
how the protocol stack is loaded before anything of it is (see ``cli.py``).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

    from .aio import AsyncSecretsClient
    from .sync import SecretsClient

_WHERE = {
    "AsyncSecretsClient": ".aio",
    "SecretsClient": ".sync",
    "Secret": "homeagent_secrets.protocol.secret",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(
        _WHERE.get(name, "homeagent_secrets.protocol.errors"), __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


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
