"""The one error hierarchy of homeagent-secrets.

Every class carries its JSON-RPC ``code``, so turning an exception into a wire
error is an attribute read, and a client turns a wire error back into the same
class with ``error_for_code``. Messages say what to do next and never contain a
secret value or a passphrase: callers pass only names, paths and counts.
"""

from __future__ import annotations


class SecretsError(Exception):
    """Base of every error the agent, its backends and its clients raise."""

    code: int = -32603
    default_message: str = "internal error in the secrets agent; see the secretsd log"
    #: Sent as the error's ``data.reason`` so a client can tell apart the causes
    #: one code covers (-32006: damaged, migration in progress, too many connections).
    reason: str | None = None

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0])


# --- JSON-RPC 2.0 standard errors -------------------------------------------


class ParseError(SecretsError):
    code = -32700
    default_message = "parse error: the line is not valid UTF-8 JSON"


class InvalidRequest(SecretsError):
    code = -32600
    default_message = "invalid request: not a JSON-RPC 2.0 request object"


class FrameTooLarge(InvalidRequest):
    """A message exceeded the frame limit; the connection is closed after it."""

    default_message = "invalid request: message exceeds the frame size limit"


class MethodNotFound(SecretsError):
    code = -32601
    default_message = "method not found"


class InvalidParams(SecretsError):
    code = -32602
    default_message = "invalid params"


class InternalError(SecretsError):
    code = -32603


# --- application errors -------------------------------------------------------


class LockedError(SecretsError):
    code = -32001
    default_message = "the agent is locked: run `secretsctl unlock`"


class NotInitializedError(SecretsError):
    code = -32002
    default_message = "the secret store is not initialized: run `secretsctl init`"


class WrongPassphraseError(SecretsError):
    code = -32003
    default_message = "wrong passphrase: nothing was changed; try again"


class NotFoundError(SecretsError):
    code = -32004
    default_message = "no secret by that name: `secretsctl ls` lists the names"


class AlreadyInitializedError(SecretsError):
    code = -32005
    default_message = "the secret store is already initialized: use `secretsctl unlock`"


class BackendUnavailableError(SecretsError):
    code = -32006
    default_message = "the storage backend is unavailable; see the secretsd log"


class CorruptRecordError(BackendUnavailableError):
    """A record failed authentication: tampered, truncated, swapped or foreign."""

    reason = "damaged"

    default_message = "a record failed its integrity check; see the secretsd log"


class TooManyConnectionsError(BackendUnavailableError):
    reason = "too_many_connections"
    default_message = "the agent has too many open connections; close idle clients and retry"


class MigrationInProgressError(BackendUnavailableError):
    """A write arrived while ``migrate`` copies the store; nothing was changed (retry)."""

    reason = "migration_in_progress"

    default_message = (
        "a migration to another backend is in progress: nothing was changed; retry when it ends"
    )


class ValueTooLargeError(SecretsError):
    code = -32007
    default_message = "the secret value is too large"


class NotSupportedError(SecretsError):
    code = -32008
    default_message = "not supported by this storage backend"


class ConflictError(SecretsError):
    """A concurrent writer changed the secret first; nothing was overwritten."""

    code = -32009
    default_message = "the secret was changed concurrently; read it again and retry"


class PermissionDeniedError(SecretsError):
    """The access rules do not grant this call to the caller.

    For a name the caller may not read, "absent" and "denied" look the same:
    the agent decides before looking the name up.
    """

    code = -32010
    default_message = "permission denied: the access rules do not allow this; see `secretsctl whoami`"


class AgentUnreachableError(SecretsError):
    """Client side only: the daemon's socket cannot be reached (never on the wire)."""

    code = -32099
    default_message = "cannot reach secretsd: start it with `secretsd`"


class UntrustedAgentError(AgentUnreachableError):
    """Client side only: the process behind the socket is not one the client may trust."""

    default_message = "the socket is served by another user's process: refusing to talk to it"


_BY_CODE: dict[int, type[SecretsError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        LockedError,
        NotInitializedError,
        WrongPassphraseError,
        NotFoundError,
        AlreadyInitializedError,
        BackendUnavailableError,
        ValueTooLargeError,
        NotSupportedError,
        ConflictError,
        PermissionDeniedError,
    )
}


_BY_REASON: dict[tuple[int, str], type[SecretsError]] = {
    (cls.code, cls.reason): cls
    for cls in (CorruptRecordError, TooManyConnectionsError, MigrationInProgressError)
    if cls.reason is not None
}


def error_for_code(code: int, message: str, reason: str | None = None) -> SecretsError:
    """The exception a client raises for a wire error of this code (and reason)."""
    cls = _BY_REASON.get((code, reason)) if reason else None
    cls = cls or _BY_CODE.get(code, SecretsError)
    err = cls(message)
    if cls is SecretsError:
        err.code = code
    return err
