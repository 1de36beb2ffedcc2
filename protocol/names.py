"""Validation of secret names and kinds, shared by the daemon and the clients."""

from __future__ import annotations

import functools
import re
from typing import Final

from .errors import InvalidParams

MAX_NAME_LENGTH: Final = 256
KINDS: Final = ("provider", "llm", "device", "generic")
DEFAULT_KIND: Final = "generic"

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
