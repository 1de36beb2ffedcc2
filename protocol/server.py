"""The server half of the protocol, sans I/O (h11's ``Connection``, server role).

``receive_data(bytes)`` returns fully typed calls (the method's row of the
table and its decoded params) or rejections that already carry their JSON-RPC
error; ``answer``/``reject``/``BatchReply`` encode the replies. No socket, no
event loop: the daemon's connection and the in-memory tests drive the same
object.

Decoding is one pass for a valid request: a tagged union on ``method`` decodes
the envelope and that method's params together. Only a message that fails it
takes the slow path, which tells a parse error (-32700) from an invalid request
(-32600), an unknown method (-32601) or bad params (-32602), and recovers the
``id``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, Union

import msgspec

from .errors import InvalidParams, InvalidRequest, MethodNotFound, ParseError, SecretsError
from .framing import DEFAULT_MAX_FRAME, MAX_BATCH, FrameSplitter
from .messages import METHODS, ListParams, Method, NoParams, Params
from .rpc import Id, encode_error_into, encode_result_into
from .secret import dec_hook


class Call:
    """A well-formed request: its method row, typed params and id (UNSET: a notification)."""

    __slots__ = ("id", "method", "params")

    def __init__(self, method: Method[Any, Any], params: Params, id: Id | msgspec.UnsetType) -> None:
        self.method = method
        self.params = params
        self.id = id

    @property
    def is_notification(self) -> bool:
        return self.id is msgspec.UNSET

    def __repr__(self) -> str:  # params may hold secrets: never shown
        return f"Call({self.method.name!r}, id={self.id!r})"


class Rejected:
    """A message answered with an error before any method runs.

    ``answered`` is False for a notification (JSON-RPC never answers one, not
    even with an error).
    """

    __slots__ = ("answered", "error", "id")

    def __init__(self, id: Id, error: SecretsError, answered: bool = True) -> None:
        self.id = id
        self.error = error
        self.answered = answered

    def __repr__(self) -> str:
        return f"Rejected(id={self.id!r}, code={self.error.code})"


class Batch:
    """A batch: its items, and the bytes each was decoded from (for wiping)."""

    __slots__ = ("items", "raws")

    def __init__(self, items: list[Call | Rejected], raws: list[bytes] | None = None) -> None:
        self.items = items
        self.raws = raws or []

    @property
    def writes(self) -> bool:
        return any(isinstance(i, Call) and i.method.writes for i in self.items)

    @property
    def carries_passphrase(self) -> bool:
        return any(isinstance(i, Call) and i.method.carries_passphrase for i in self.items)

    @property
    def refuses_any(self) -> bool:
        """Whether an item was refused (it may have held a passphrase it failed to deliver)."""
        return any(isinstance(i, Rejected) for i in self.items)


Incoming = Call | Rejected | Batch


class _Envelope(msgspec.Struct, frozen=True):
    jsonrpc: str
    method: str
    params: msgspec.Raw = msgspec.Raw()
    id: Id | msgspec.UnsetType = msgspec.UNSET


def _typed_request(m: Method[Any, Any]) -> type[msgspec.Struct]:
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


_TYPED: Final = {m.name: _typed_request(m) for m in METHODS.values()}
_typed_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[tuple(_TYPED.values())],  # noqa: UP007
    dec_hook=dec_hook,
)
#: The method row of a typed request, by its class (one dict lookup on the quick path).
_METHOD_OF: Final[dict[type, Method[Any, Any]]] = {t: METHODS[name] for name, t in _TYPED.items()}
# The quick path's decoder knows only the methods answered from memory: any other
# request fails on its "method" tag before a value is decoded, so a passphrase is
# never made into a string that nothing would wipe (the general way wipes its own).
# (A union even of one: its tag is required and found before any field is decoded.)
_NO_REQUEST: Final = msgspec.defstruct("_no_request", [], tag_field="method", tag="\0", frozen=True)
_QUICK: Final = (*(t for name, t in _TYPED.items()
                   if METHODS[name].nowait and not METHODS[name].carries_passphrase), _NO_REQUEST)
_quick_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[_QUICK],  # noqa: UP007
    dec_hook=dec_hook,
)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_any_decoder = msgspec.json.Decoder()
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_params_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(m.params, dec_hook=dec_hook) for name, m in METHODS.items()
}
# Per params struct: how many fields are required, and (name, default) of the
# others: what the duplicate-key check counts against.
_REQUIRED: Final[dict[type[Params], int]] = {
    m.params: len(m.params.__struct_fields__) - len(m.params.__struct_defaults__)
    for m in METHODS.values()
}
_OPTIONAL: Final[dict[type[Params], tuple[tuple[str, Any], ...]]] = {
    m.params: tuple(zip(m.params.__struct_fields__[_REQUIRED[m.params]:],
                        m.params.__struct_defaults__, strict=True))
    for m in METHODS.values()
}
_TOO_DEEP: Final = "invalid request: JSON nested too deeply"


# One JSON token at a time: a string (escapes included, possessive so a long
# value costs one match), or a structural character. Nothing else matters for keys.
_TOKEN: Final = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[{}\[\]:]')


def _scan_for_repeated_keys(line: bytes) -> bool:
    """Whether an object in ``line`` repeats a key, without decoding any value.

    Values are skipped by span (a passphrase is never copied into a new object
    here); only a string followed by ':' (a key) is decoded, to compare
    escaped spellings.
    """
    stack: list[set[str] | None] = []  # per open container: the keys seen (None: an array)
    pending: tuple[int, int] | None = None  # the span of the last string, until ':' or not
    for m in _TOKEN.finditer(line):
        first = line[m.start()]
        if first == 0x22:  # a string: a key only if ':' comes next
            pending = m.span()
            continue
        if first == 0x3A and pending is not None and stack and stack[-1] is not None:  # ':'
            raw = line[pending[0]:pending[1]]
            try:
                key = json.loads(raw)
            except ValueError:  # not JSON (only a caller's own bytes): compare as written
                key = "\0" + raw.decode("latin-1")
            if key in stack[-1]:
                return True
            stack[-1].add(key)
        elif first == 0x7B:  # '{'
            stack.append(set())
        elif first == 0x5B:  # '['
            stack.append(None)
        elif first in (0x7D, 0x5D) and stack:  # '}' or ']'
            stack.pop()
        pending = None
    return False


def has_duplicate_keys(line: bytes, typed: Any | None = None) -> bool:
    """Whether any JSON object in ``line`` repeats a key (msgspec keeps the last one).

    The fast path is exact: with no backslash, a ``":`` can only end a key, and
    when every ``:`` of the line is such a one, their number is the number of
    keys; if it equals the keys the typed request holds, none repeats.
    Anything else is checked by a full parse.
    """
    if typed is not None and b"\\" not in line:
        keys = line.count(b'":')
        if keys == line.count(b":"):
            params = typed.params
            spelled = 0
            for name, default in _OPTIONAL[type(params)]:
                if getattr(params, name) != default:
                    spelled += 1
            spelled += _REQUIRED[type(params)]
            if keys == 2 + (typed.id is not msgspec.UNSET) + (spelled + 1 if spelled else 0):
                return False
    return _scan_for_repeated_keys(line)


_DUPLICATE: Final = "invalid request: a JSON object repeats a key; each key may appear once"


def _bad_envelope(raw: bytes) -> Rejected:
    """Classify a message the envelope decoder refused."""
    try:
        obj = _any_decoder.decode(raw)
    except RecursionError:
        return Rejected(None, InvalidRequest(_TOO_DEEP))
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


def _decode_params(method: Method[Any, Any], raw: msgspec.Raw) -> Params:
    # Only a short Raw is copied to compare: a copy of params that hold a
    # passphrase would stay in the heap unwiped.
    if len(raw) == 0 or (len(raw) <= 16 and bytes(raw).strip() == b"null"):
        raw = msgspec.Raw(b"{}")
    try:
        params: Params = _params_decoders[method.name].decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Expected `object`, got `array`"):
            text = "params must be a JSON object of named params (positional params are not supported)"
        raise InvalidParams(f"invalid params for {method.name}: {text}") from None
    except (msgspec.DecodeError, RecursionError):
        raise InvalidParams(f"invalid params for {method.name}: malformed JSON") from None
    return params


def parse_one(raw: bytes) -> Call | Rejected:
    """One request object (not a batch) into a typed call or a rejection."""
    try:
        typed = _typed_decoder.decode(raw)
    except (msgspec.DecodeError, SecretsError, RecursionError):
        pass  # not a valid request of a known method: the slow path says why
    else:
        if typed.jsonrpc == "2.0":
            if has_duplicate_keys(raw, typed):
                return Rejected(None if typed.id is msgspec.UNSET else typed.id,
                                InvalidRequest(_DUPLICATE))
            return Call(METHODS[typed.__struct_config__.tag], typed.params, typed.id)
    try:
        env = _envelope_decoder.decode(raw)
    except RecursionError:
        return Rejected(None, InvalidRequest(_TOO_DEEP))
    except msgspec.DecodeError:
        return _bad_envelope(raw)
    id_: Id = None if env.id is msgspec.UNSET else env.id
    notification = env.id is msgspec.UNSET
    if env.jsonrpc != "2.0":
        return Rejected(id_, InvalidRequest('invalid request: "jsonrpc" must be "2.0"'))
    if has_duplicate_keys(raw):
        return Rejected(id_, InvalidRequest(_DUPLICATE))
    method = METHODS.get(env.method)
    if method is None:
        return Rejected(id_, MethodNotFound(
            f"method not found: {env.method[:64]!r}; see PROTOCOL.md"), not notification)
    try:
        params = _decode_params(method, env.params)
    except SecretsError as exc:
        return Rejected(id_, exc, not notification)
    return Call(method, params, env.id)


def parse_message(line: bytes, max_batch: int = MAX_BATCH) -> Incoming:
    """Parse one frame into a call, a batch, or an immediate rejection."""
    if line.lstrip()[:1] != b"[":
        return parse_one(line)
    try:
        raws = _batch_decoder.decode(line)
    except RecursionError:
        return Rejected(None, InvalidRequest(_TOO_DEEP))
    except msgspec.DecodeError:
        return Rejected(None, ParseError())
    if not raws:
        return Rejected(None, InvalidRequest("invalid request: empty batch"))
    if len(raws) > max_batch:
        return Rejected(None, InvalidRequest(
            f"invalid request: a batch holds at most {max_batch} requests (got {len(raws)}); "
            "split it"))
    items = [bytes(r) for r in raws]
    return Batch([parse_one(item) for item in items], items)


def answer(call: Call, result: Any, out: bytearray) -> None:
    """Append the success line of ``call`` to ``out`` (nothing for a notification)."""
    if call.id is not msgspec.UNSET:
        encode_result_into(call.id, result, out)
        out += b"\n"


def answer_error(call: Call, error: SecretsError, out: bytearray) -> None:
    """Append the error line of ``call`` to ``out`` (nothing for a notification)."""
    if call.id is not msgspec.UNSET:
        encode_error_into(call.id, error, out)
        out += b"\n"


def reject(id_: Id, error: SecretsError, out: bytearray) -> None:
    """Append one error line to ``out``."""
    encode_error_into(id_, error, out)
    out += b"\n"


class BatchReply:
    """Streams the answers of a batch into one JSON array line, item by item.

    Items are separated as they come, so the caller may send ``out`` between
    items (bounded memory for a batch of large answers) as long as nothing
    else is sent on the connection until ``close``.
    """

    __slots__ = ("count", "out")

    def __init__(self, out: bytearray) -> None:
        self.out = out
        self.count = 0

    def _next(self) -> None:
        self.out += b"[" if self.count == 0 else b","
        self.count += 1

    def answer(self, call: Call, result: Any) -> None:
        if call.id is not msgspec.UNSET:
            self._next()
            encode_result_into(call.id, result, self.out)

    def answer_error(self, call: Call, error: SecretsError) -> None:
        if call.id is not msgspec.UNSET:
            self._next()
            encode_error_into(call.id, error, self.out)

    def reject(self, id_: Id, error: SecretsError) -> None:
        self._next()
        encode_error_into(id_, error, self.out)

    def close(self) -> None:
        """End the array (a batch of notifications only sends nothing)."""
        if self.count:
            self.out += b"]\n"


class ServerProtocol:
    """One connection's server half: bytes in, typed calls out; answers encoded.

    After a frame over the limit ``oversize`` is true: the caller sends
    ``oversize_error`` and closes the connection (the rest of the line is never
    buffered).
    """

    __slots__ = ("_splitter", "max_batch", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_batch: int = MAX_BATCH) -> None:
        self.max_frame = max_frame
        self.max_batch = max_batch
        self._splitter = FrameSplitter(max_frame, keep_spent=True)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (0 between messages)."""
        return self._splitter.pending

    @property
    def oversize(self) -> bool:
        return self._splitter.oversize

    @property
    def spent(self) -> list[bytes]:
        """Buffers the last ``frames`` made besides its lines (``FrameSplitter.spent``):
        wipe them with the lines when sensitive."""
        return self._splitter.spent

    def receive_data(self, data: bytes) -> list[Incoming]:
        """Feed received bytes; return the messages they completed, parsed."""
        max_batch = self.max_batch
        return [parse_message(line, max_batch) for line in self._splitter.feed(data)]

    def quick(self, data: bytes) -> Call | None:
        """``data`` as a call answered from memory, when it is all there is to read.

        The common case of a client waiting for each answer: nothing is held,
        ``data`` is exactly one line, and the typed decode gives a well-formed
        request of a ``nowait`` method (``retrieve``). Then no lines are split
        and no envelope decoded. Anything else is None and goes the general way
        (``frames``, then ``parse``), which also says what is wrong with it.
        """
        splitter = self._splitter
        if (splitter.pending or splitter.oversize or len(data) > self.max_frame
                or data.find(b"\n") != len(data) - 1):
            return None
        try:
            typed = _quick_decoder.decode(data)
        except (msgspec.DecodeError, SecretsError, RecursionError):
            return None
        if type(typed) is _NO_REQUEST or typed.jsonrpc != "2.0" or has_duplicate_keys(data, typed):
            return None
        return Call(_METHOD_OF[type(typed)], typed.params, typed.id)

    def frames(self, data: bytes) -> list[bytes]:
        """Feed received bytes; return the raw lines (to parse one by one with ``parse``)."""
        return self._splitter.feed(data)

    def parse(self, line: bytes) -> Incoming:
        return parse_message(line, self.max_batch)

    def oversize_error(self, out: bytearray) -> None:
        from .errors import FrameTooLarge

        reject(None, FrameTooLarge(
            f"invalid request: a message exceeded the {self.max_frame}-byte frame limit; "
            "the connection is closed"), out)

    def wipe_partial(self) -> None:
        """Overwrite the bytes of a half-received message (they may hold a passphrase)."""
        self._splitter.wipe()
