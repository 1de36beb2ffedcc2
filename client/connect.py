"""What both clients share about reaching the agent: where its socket is and whom
to trust at the other end (``reach.py``, re-exported here), what may be sent
again, and the size checks before a send.
"""

from __future__ import annotations

from typing import Any, Final

from homeagent_secrets.protocol.errors import ValueTooLargeError
from homeagent_secrets.protocol.framing import DEFAULT_MAX_FRAME, MAX_BATCH
from homeagent_secrets.protocol.messages import Method
from homeagent_secrets.protocol.secret import Secret

from .reach import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    check_server,
    connect_error,
    no_answer,
    open_socket,
    server_pid,
    server_uid,
    socket_path,
    unreachable,
    vouched_uid,
)

__all__ = [  # reach.py's names too: the clients' one place to import them from
    "BATCH_MAX", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "LIST_PAGE", "as_secret", "check_server",
    "check_size", "connect_error", "may_resend", "no_answer", "open_socket", "server_pid", "server_uid", "socket_path",
    "unreachable", "vouched_uid",
]

#: Names fetched per ``list`` round trip (each answer stays far below any frame limit).
LIST_PAGE: Final = 1000
#: Requests per batch line (the agent refuses larger batches).
BATCH_MAX: Final = MAX_BATCH


def check_size(line: bytes, method: Method[Any, Any]) -> None:
    """Refuse, before sending, a request the agent would refuse for its size."""
    if len(line) - 1 > DEFAULT_MAX_FRAME:
        raise ValueTooLargeError(
            f"the {method.name} request is {len(line) - 1} bytes, over the agent's "
            f"{DEFAULT_MAX_FRAME}-byte message limit: nothing was sent; keep values smaller"
        )


def may_resend(method: Method[Any, Any], sent: bool) -> bool:
    """Whether a call whose connection dropped may be sent again on a new one.

    Before it was sent: always. After: only methods that change nothing;
    a write may have been applied, so it is never replayed blindly.
    """
    return not sent or not method.writes


def as_secret(value: str | Secret) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)
