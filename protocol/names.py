"""What the protocol accepts as a name, a kind, a backend and a passphrase.

Each closed set is defined once here (as a ``Literal`` and the tuple read from
it); the daemon, the clients and the CLI import them. Every check raises
``InvalidParams`` with a message that names the rule, never the value.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Final, Literal, cast, get_args

from .errors import InvalidParams
from .secret import Secret

MAX_NAME_LENGTH: Final = 256
Kind = Literal["provider", "llm", "device", "generic"]
KINDS: Final[tuple[str, ...]] = get_args(Kind)
DEFAULT_KIND: Final[Kind] = "generic"
BackendName = Literal["file", "keychain", "openbao"]
BACKEND_NAMES: Final[tuple[str, ...]] = get_args(BackendName)

def as_kind(text: str) -> Kind:
    """``text`` as a kind; the default for anything else (set by another tool)."""
    return cast(Kind, text) if text in KINDS else DEFAULT_KIND


#: A passphrase longer than this is refused before any work (scrypt reads all of it).
MAX_PASSPHRASE_BYTES: Final = 1024

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+\Z")


@functools.lru_cache(maxsize=4096)  # the same few names are asked for all day
def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid secret name, or None when it is."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        return f"a name has 1 to {MAX_NAME_LENGTH} characters (got {len(name)})"
    for segment in name.split("/"):
        if segment == "":
            return "a name has no empty segment and no leading or trailing '/'"
        if segment in (".", ".."):
            return "a name has no '.' or '..' segment"
        if not _SEGMENT.match(segment):
            return "a name is made of segments of A-Z a-z 0-9 . _ - joined by '/'"
    return None


def check_name(name: str) -> str:
    """Return ``name`` if valid, else raise InvalidParams saying what is wrong."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidParams(f"invalid name: {problem}")
    return name


def check_prefix(prefix: str) -> str:
    """A list prefix is any string a valid name could start with (it may be empty)."""
    if len(prefix) > MAX_NAME_LENGTH or not all(
        ch == "/" or _SEGMENT.match(ch) for ch in prefix
    ):
        raise InvalidParams(
            "invalid prefix: use at most 256 characters of A-Z a-z 0-9 . _ - /"
        )
    return prefix


def _segment_regex(seg: str) -> str:
    """One segment of a glob (no ``**``), matching one whole name segment after its '/'.

    Between stars the pieces have a fixed length, so the leftmost place of each
    middle piece is always a right one: an atomic group takes it and never tries
    another. Only the last star backtracks, over one segment. Hence no pattern
    costs more than (segment length x pattern length) steps: a glob is a peer's
    input (``watch``), and plain ``[^/]*`` pieces backtrack exponentially
    (``*a*a*a*a*ab`` against a long run of ``a`` never ends).
    """
    def piece(text: str) -> str:
        return "".join("[^/]" if ch == "?" else re.escape(ch) for ch in text)

    pieces = re.split(r"\*+", seg)
    if len(pieces) == 1:
        body = piece(seg)
    else:
        first, *middle, last = pieces
        body = piece(first) + "".join(f"(?>[^/]*?{piece(p)})" for p in middle if p) + "[^/]*" + piece(last)
    return f"(?>/{body}(?![^/]))"


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A name glob on /-segments, as a regex to match against ``"/" + name``.

    ``*`` matches within one segment (``provider/*`` matches ``provider/hue``, not
    ``provider/hue/token``), ``?`` one character of a segment, and a ``**``
    segment any number of whole segments, none included (``provider/**``
    matches ``provider`` and everything below it).

    Matching costs at most about (name length x pattern length) steps, whatever
    the pattern: the runs of segments between ``**`` have fixed lengths, so each
    middle run is placed at its leftmost fit and never moved (atomic groups), and
    so is each piece between stars inside a segment (``_segment_regex``).
    """
    blocks: list[list[str]] = [[]]
    for seg in pattern.split("/"):
        if seg == "**":
            if blocks[-1] or len(blocks) == 1:
                blocks.append([])
        else:
            blocks[-1].append(_segment_regex(seg))
    if len(blocks) == 1:
        return re.compile("".join(blocks[0]) + r"\Z")
    first, *middle, last = blocks
    out = "".join(first)
    out += "".join(f"(?>(?:/[^/]++)*?{''.join(b)})" for b in middle if b)
    out += f"(?:/[^/]++)*{''.join(last)}\\Z" if last else r"(?:/[^/]++)*+\Z"
    return re.compile(out)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a name glob, or None."""
    probe = pattern.replace("**", "x").replace("*", "x").replace("?", "x")
    problem = name_problem(probe)
    return None if problem is None else f"not a name pattern: {problem}"


def check_patterns(patterns: list[str]) -> list[str]:
    """Return ``patterns`` if each is a valid name glob, else raise InvalidParams."""
    for pattern in patterns:
        problem = pattern_problem(pattern)
        if problem is not None:
            raise InvalidParams(f"invalid pattern {pattern[:64]!r}: {problem}")
    return patterns


def text_problem(secret: Secret) -> str | None:
    """Why a value cannot be stored as text (lone surrogates), or None."""
    try:
        secret.reveal().encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    return None


def utf8_size(text: str) -> int | None:
    """Bytes of ``text`` in UTF-8 (None: it holds a lone surrogate), counted without
    encoding it: an encoded copy of a passphrase would stay in the heap unwiped."""
    if text.isascii():
        return len(text)
    size = 0
    for code in map(ord, text):
        if 0xD800 <= code <= 0xDFFF:
            return None
        size += 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4
    return size


def passphrase_problem(passphrase: Secret, new: bool) -> str | None:
    """Why ``passphrase`` is refused, or None.

    Every passphrase is non-empty valid Unicode of at most 1,024 UTF-8 bytes. A
    *new* one (``init``, the new one of ``change_passphrase``, a ``migrate``
    that creates the file store) also has no control characters: a newline or a
    tab could never be typed back at a prompt or read from a one-line file, so
    a store sealed with one could not be unlocked the way it was set up.
    """
    text = passphrase.reveal()
    if not text:
        return "must not be empty"
    size = utf8_size(text)
    if size is None:
        return "must be valid Unicode text (no lone surrogates)"
    if size > MAX_PASSPHRASE_BYTES:
        return f"is {size} bytes long; the limit is {MAX_PASSPHRASE_BYTES} bytes of UTF-8"
    if new and any(unicodedata.category(ch) == "Cc" for ch in text):
        return "must not contain control characters (newline, tab, ...): it could not be typed back"
    return None


def check_passphrase(passphrase: Secret, what: str, new: bool) -> None:
    """Raise InvalidParams when ``passphrase`` breaks the rules of ``passphrase_problem``."""
    problem = passphrase_problem(passphrase, new)
    if problem is not None:
        raise InvalidParams(f"the {what} {problem}")
