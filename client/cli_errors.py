"""secretsctl's exit codes and the errors of its own (bad use, missing input).

One table: the exit status of every outcome, documented in each command's
``--help`` and in the README.
"""

from __future__ import annotations

from typing import Final

from homeagent_secrets.protocol.errors import (
    AgentUnreachableError,
    InvalidParams,
    LockedError,
    NotFoundError,
    NotInitializedError,
    PermissionDeniedError,
    SecretsError,
    WrongPassphraseError,
)

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # any other error: the message says which
EXIT_USAGE: Final = 2  # bad arguments or unusable input (empty, closed, Ctrl-D); nothing was done
EXIT_LOCKED: Final = 3  # the agent is locked or not initialized (also `status` in that state)
EXIT_NOT_FOUND: Final = 4
EXIT_UNREACHABLE: Final = 5  # no agent at the socket, or one this user may not trust
EXIT_WRONG_PASSPHRASE: Final = 6
EXIT_DENIED: Final = 7  # the access rules do not grant this call (`secretsctl whoami` shows what they grant)
EXIT_INTERRUPTED: Final = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE: Final = 141  # the reader of stdout left early (128 + SIGPIPE), quietly

#: What each code means, in the order ``--help`` lists them.
MEANING: Final[dict[int, str]] = {
    EXIT_OK: "success",
    EXIT_ERROR: "other error (the message says which)",
    EXIT_USAGE: "usage error, or input missing or unusable (nothing was done)",
    EXIT_LOCKED: "the agent is locked or not initialized",
    EXIT_NOT_FOUND: "no secret by that name",
    EXIT_UNREACHABLE: "cannot reach the agent (or it is not one you may trust)",
    EXIT_WRONG_PASSPHRASE: "wrong passphrase",
    EXIT_DENIED: "permission denied by the agent's access rules (see `secretsctl whoami`)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: "the reader of standard output went away (e.g. `| head -1`)",
}

_EXIT_FOR: Final[list[tuple[type[SecretsError], int]]] = [
    (InvalidParams, EXIT_USAGE),
    (LockedError, EXIT_LOCKED),
    (NotInitializedError, EXIT_LOCKED),
    (NotFoundError, EXIT_NOT_FOUND),
    (AgentUnreachableError, EXIT_UNREACHABLE),
    (WrongPassphraseError, EXIT_WRONG_PASSPHRASE),
    (PermissionDeniedError, EXIT_DENIED),
]


class UsageError(SecretsError):
    """Bad command-line use or unusable input; exits 2 and nothing was done."""


def exit_code(exc: SecretsError) -> int:
    """The exit status for an error."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    for cls, code in _EXIT_FOR:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


def no_secret(name: str, previous: bool = False) -> NotFoundError:
    """``get`` of an absent name (both ways of ``secretsctl get`` say it alike)."""
    what = "previous value for" if previous else "secret named"
    return NotFoundError(f"there is no {what} {name!r}; `secretsctl ls` lists the names")
