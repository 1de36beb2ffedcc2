"""JSON-RPC 2.0 over lines, sans I/O: parse requests, encode replies (server),
build requests and match replies (client).

Decoding is two steps, as msgspec's examples do it: the envelope with
``params`` kept as ``msgspec.Raw``, then that method's own params struct. The
hot path is one envelope decode; only a message that fails it is decoded again
generically, to tell a parse error (-32700) from an invalid request (-32600)
and to recover its ``id``.
"""

from __future__ import annotations

import itertools
from typing import Any, Final, Union

import msgspec

from .errors import (
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    SecretsError,
    error_for_code,
)
from .framing import DEFAULT_MAX_FRAME, FrameSplitter
from .messages import METHODS, ListParams, Method, NoParams, Params
from .secret import dec_hook, enc_hook

Id = int | str | None
_ABSENT: Final = msgspec.Raw()


class _Envelope(msgspec.Struct, frozen=True):
    jsonrpc: str
    method: str
    params: msgspec.Raw = _ABSENT
    id: Id | msgspec.UnsetType = msgspec.UNSET


class Request(msgspec.Struct, frozen=True):
    """A well-formed request; ``params`` typed already, or raw until ``decode_params``."""

    method: str
    params: msgspec.Raw | Params
    id: Id | msgspec.UnsetType = msgspec.UNSET

    @property
    def is_notification(self) -> bool:
        return self.id is msgspec.UNSET


class Rejected(msgspec.Struct, frozen=True):
    """A message answered with an error before any method runs."""

    id: Id
    error: SecretsError


class Batch(msgspec.Struct, frozen=True):
    items: list[Request | Rejected]


Incoming = Request | Rejected | Batch


class ErrorObject(msgspec.Struct, frozen=True, omit_defaults=True):
    code: int
    message: str


class _Response(msgspec.Struct, frozen=True):
    jsonrpc: str
    id: Id
    result: Any


class _ErrorResponse(msgspec.Struct, frozen=True):
    jsonrpc: str
    id: Id
    error: ErrorObject


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_any_decoder = msgspec.json.Decoder()
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder(enc_hook=enc_hook)
_params_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(m.params, dec_hook=dec_hook) for name, m in METHODS.items()
}


def _bad_envelope(raw: bytes) -> Rejected:
    """Slow path: classify a message the envelope decoder refused."""
    try:
        obj = _any_decoder.decode(raw)
    except RecursionError:
        return Rejected(None, InvalidRequest("invalid request: JSON nested too deeply"))
    except msgspec.DecodeError:
        return Rejected(None, ParseError())
    if not isinstance(obj, dict):
        return Rejected(None, InvalidRequest("invalid request: expected a JSON object"))
    raw_id = obj.get("id", msgspec.UNSET)
    id_: Id = raw_id if isinstance(raw_id, (int, str)) and not isinstance(raw_id, bool) else None
    if raw_id is not msgspec.UNSET and raw_id is not None and id_ is None:
        return Rejected(None, InvalidRequest("invalid request: id must be a string, integer or null"))
    if obj.get("jsonrpc") != "2.0":
        return Rejected(id_, InvalidRequest('invalid request: "jsonrpc" must be "2.0"'))
    if not isinstance(obj.get("method"), str):
        return Rejected(id_, InvalidRequest('invalid request: "method" must be a string'))
    return Rejected(id_, InvalidRequest("invalid request: malformed request object"))


def _typed_request(m: Method) -> type[msgspec.Struct]:
    # A request whose "method" tag selects its params type: for a valid
    # request, envelope and params are decoded in one pass.
    params_field: tuple[str, Any] | tuple[str, Any, Any]
    if m.params is NoParams or m.params is ListParams:
        params_field = ("params", m.params, msgspec.field(default_factory=m.params))
    else:
        params_field = ("params", m.params)
    return msgspec.defstruct(
        f"_{m.name}_request",
        [("jsonrpc", str), params_field, ("id", Id | msgspec.UnsetType, msgspec.UNSET)],
        tag_field="method", tag=m.name, frozen=True, forbid_unknown_fields=True,
    )


_typed_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[tuple(_typed_request(m) for m in METHODS.values())],  # noqa: UP007
    dec_hook=dec_hook,
)


def _parse_one(raw: bytes) -> Request | Rejected:
    try:
        typed = _typed_decoder.decode(raw)
    except (msgspec.DecodeError, SecretsError, RecursionError):
        pass  # not a valid request of a known method: the two-step path says why
    else:
        if typed.jsonrpc == "2.0":
            return Request(typed.__struct_config__.tag, typed.params, typed.id)
    try:
        env = _envelope_decoder.decode(raw)
    except RecursionError:
        return Rejected(None, InvalidRequest("invalid request: JSON nested too deeply"))
    except msgspec.DecodeError:
        return _bad_envelope(raw)
    if env.jsonrpc != "2.0":
        id_ = None if env.id is msgspec.UNSET else env.id
        return Rejected(id_, InvalidRequest('invalid request: "jsonrpc" must be "2.0"'))
    return Request(env.method, env.params, env.id)


def parse_message(line: bytes) -> Incoming:
    """Parse one frame into a request, a batch, or an immediate rejection."""
    head = line.lstrip()[:1]
    if head != b"[":
        return _parse_one(line)
    try:
        raws = _batch_decoder.decode(line)
    except RecursionError:
        return Rejected(None, InvalidRequest("invalid request: JSON nested too deeply"))
    except msgspec.DecodeError:
        return Rejected(None, ParseError())
    if not raws:
        return Rejected(None, InvalidRequest("invalid request: empty batch"))
    return Batch([_parse_one(bytes(r)) for r in raws])


def decode_params(request: Request) -> tuple[Method, Params]:
    """The method row and typed params of a request; raises -32601 or -32602."""
    method = METHODS.get(request.method)
    if method is None:
        raise MethodNotFound(f"method not found: {request.method[:64]!r}; see PROTOCOL.md")
    raw = request.params
    if isinstance(raw, Params):
        return method, raw
    if len(raw) == 0 or bytes(raw).strip() == b"null":
        raw = msgspec.Raw(b"{}")
    try:
        params = _params_decoders[method.name].decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Expected `object`, got `array`"):
            text = "params must be a JSON object of named params (positional params are not supported)"
        raise InvalidParams(f"invalid params for {method.name}: {text}") from None
    except (msgspec.DecodeError, RecursionError):
        raise InvalidParams(f"invalid params for {method.name}: malformed JSON") from None
    return method, params


def encode_result(id_: Id, result: Any, out: bytearray) -> None:
    """Append one success response line to ``out``."""
    _encoder.encode_into(_Response("2.0", id_, result), out, len(out))
    out += b"\n"


def encode_error(id_: Id, error: SecretsError, out: bytearray) -> None:
    """Append one error response line to ``out``."""
    _encoder.encode_into(
        _ErrorResponse("2.0", id_, ErrorObject(error.code, error.message)), out, len(out)
    )
    out += b"\n"


def encode_batch(parts: list[bytes], out: bytearray) -> None:
    """Append a batch response: ``parts`` are single responses with their newlines."""
    out += b"["
    out += b",".join(p.rstrip(b"\n") for p in parts)
    out += b"]\n"


# --- client side -----------------------------------------------------------------


class _ReplyEnvelope(msgspec.Struct, frozen=True):
    jsonrpc: str
    id: Id
    result: msgspec.Raw = _ABSENT
    error: ErrorObject | None = None


class Reply(msgspec.Struct, frozen=True):
    """A response matched to its request id: ``result`` raw, or ``error``."""

    id: Id
    result: msgspec.Raw
    error: SecretsError | None


_reply_decoder = msgspec.json.Decoder(_ReplyEnvelope)
_replies_decoder = msgspec.json.Decoder(list[_ReplyEnvelope])
_result_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(m.result, dec_hook=dec_hook) for name, m in METHODS.items()
}


class ClientProtocol:
    """The client half: numbers requests, frames them, splits and decodes replies."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._ids = itertools.count(1)
        self._splitter = FrameSplitter(max_frame)

    def request(self, method: str, params: Params) -> tuple[int, bytes]:
        """A new request id and the line to send."""
        if method not in METHODS:
            raise MethodNotFound(f"method not found: {method!r}")
        id_ = next(self._ids)
        line = b'{"jsonrpc":"2.0","id":%d,"method":"%s","params":' % (id_, method.encode())
        return id_, line + _encoder.encode(params) + b"}\n"

    def receive_data(self, data: bytes) -> list[Reply]:
        """Feed received bytes; return the replies completed by them."""
        replies: list[Reply] = []
        for line in self._splitter.feed(data):
            try:
                if line.lstrip()[:1] == b"[":
                    envs = _replies_decoder.decode(line)
                else:
                    envs = [_reply_decoder.decode(line)]
            except msgspec.DecodeError:
                raise InvalidRequest("the agent sent a malformed reply") from None
            for env in envs:
                err = error_for_code(env.error.code, env.error.message) if env.error else None
                replies.append(Reply(env.id, env.result, err))
        if self._splitter.oversize:
            raise InvalidRequest("the agent sent a reply over the frame limit")
        return replies

    @staticmethod
    def decode_result(method: str, raw: msgspec.Raw) -> Any:
        """The typed result of ``method`` from a reply's raw result."""
        return _result_decoders[method].decode(raw)
