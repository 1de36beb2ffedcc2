"""JSON-RPC 2.0 over lines, sans I/O: the reply encoders both halves share, and
the client half (``ClientProtocol``: numbers requests, frames them, matches and
decodes replies). The server half is ``server.ServerProtocol``.
"""

from __future__ import annotations

import itertools
from typing import Any, Final, TypeVar, cast

import msgspec

from .errors import InvalidRequest, SecretsError, error_for_code
from .framing import FrameSplitter
from .messages import METHODS, Method, Params
from .secret import dec_hook, enc_hook

Id = int | str | None
P = TypeVar("P", bound=Params)
R = TypeVar("R")

#: Replies may be larger than requests (a batch of retrieves, a long ``list``):
#: the client accepts lines up to this size.
DEFAULT_MAX_REPLY: Final = 64 << 20


class ErrorData(msgspec.Struct, frozen=True, omit_defaults=True):
    """The error's ``data``: which of the causes its code covers."""

    reason: str | None = None


class ErrorObject(msgspec.Struct, frozen=True, omit_defaults=True):
    code: int
    message: str
    data: ErrorData | None = None


class _Response(msgspec.Struct, frozen=True):
    jsonrpc: str
    id: Id
    result: Any


class _ErrorResponse(msgspec.Struct, frozen=True):
    jsonrpc: str
    id: Id
    error: ErrorObject


_encoder = msgspec.json.Encoder(enc_hook=enc_hook)


def encode_result_into(id_: Id, result: Any, out: bytearray) -> None:
    """Append one success response object (no newline) to ``out``."""
    _encoder.encode_into(_Response("2.0", id_, result), out, len(out))


class _Notification(msgspec.Struct, frozen=True, omit_defaults=True):
    jsonrpc: str
    method: str
    params: Any = None


def encode_notification(method: str, params: Any = None) -> bytes:
    """One notification line (no id: never answered)."""
    return _encoder.encode(_Notification("2.0", method, params)) + b"\n"


def encode_error_into(id_: Id, error: SecretsError, out: bytearray) -> None:
    """Append one error response object (no newline) to ``out``."""
    data = None if error.reason is None else ErrorData(error.reason)
    _encoder.encode_into(_ErrorResponse("2.0", id_, ErrorObject(error.code, error.message, data)),
                         out, len(out))


# --- client side -----------------------------------------------------------------


class _ReplyEnvelope(msgspec.Struct, frozen=True):
    jsonrpc: str
    id: Id
    result: msgspec.Raw = msgspec.Raw()
    error: ErrorObject | None = None


class _NotificationEnvelope(msgspec.Struct, frozen=True):
    jsonrpc: str
    method: str
    params: msgspec.Raw = msgspec.Raw()


class Notification(msgspec.Struct, frozen=True):
    """A line the agent sent unasked (a watch's event): ``method`` and raw ``params``."""

    method: str
    params: msgspec.Raw


class Reply(msgspec.Struct, frozen=True):
    """A response matched to its request id: ``result`` raw, or ``error``.

    An error with id null concerns the connection itself (too many connections,
    a frame over the limit, unparsable input): no request was run.
    """

    id: Id
    result: msgspec.Raw
    error: SecretsError | None


_reply_decoder = msgspec.json.Decoder(_ReplyEnvelope)
_notification_decoder = msgspec.json.Decoder(_NotificationEnvelope)
_replies_decoder = msgspec.json.Decoder(list[_ReplyEnvelope])
_result_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(m.result, dec_hook=dec_hook) for name, m in METHODS.items()
}


class ClientProtocol:
    """The client half: numbers requests, frames them, splits and decodes replies."""

    def __init__(self, max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self._ids = itertools.count(1)
        self._splitter = FrameSplitter(max_reply)
        self.notifications: list[Notification] = []

    def request(self, method: Method[P, Any], params: P) -> tuple[int, bytes]:
        """A new request id and the line to send."""
        id_ = next(self._ids)
        line = b'{"jsonrpc":"2.0","id":%d,"method":"%s","params":' % (id_, method.name.encode())
        return id_, line + _encoder.encode(params) + b"}\n"

    def batch(self, calls: list[tuple[Method[Any, Any], Params]]) -> tuple[list[int], bytes]:
        """Ids and the one line of a batch of requests."""
        ids: list[int] = []
        parts: list[bytes] = []
        for method, params in calls:
            id_, line = self.request(method, params)
            ids.append(id_)
            parts.append(line[:-1])
        return ids, b"[" + b",".join(parts) + b"]\n"

    def receive_data(self, data: bytes) -> list[Reply]:
        """Feed received bytes; return the replies completed by them.

        Notifications among them (on a connection with a watch) are kept in
        ``notifications``, in order, for the caller to take.
        """
        replies: list[Reply] = []
        for line in self._splitter.feed(data):
            try:
                envs = _replies_decoder.decode(line) if line.lstrip()[:1] == b"[" else [_reply_decoder.decode(line)]
            except msgspec.DecodeError:
                try:
                    note = _notification_decoder.decode(line)
                except msgspec.DecodeError:
                    raise InvalidRequest("the agent sent a malformed reply") from None
                self.notifications.append(Notification(note.method, note.params))
                continue
            for env in envs:
                err = None
                if env.error is not None:
                    extra = env.error.data
                    err = error_for_code(env.error.code, env.error.message,
                                         extra.reason if extra is not None else None)
                replies.append(Reply(env.id, env.result, err))
        if self._splitter.oversize:
            raise InvalidRequest("the agent sent a reply over the client's size limit")
        return replies

    @staticmethod
    def decode_result(method: Method[Any, R], raw: msgspec.Raw) -> R:
        """The typed result of ``method`` from a reply's raw result."""
        return cast(R, _result_decoders[method.name].decode(raw))
