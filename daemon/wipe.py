"""Overwrite the bytes of a passphrase where Python left them.

A passphrase reaches the daemon as part of a received line (``bytes``), is
decoded into a ``str`` and encoded to UTF-8 ``bytes`` for scrypt. All three are
immutable, and freeing them returns their memory to the allocator unchanged:
the passphrase would stay in the heap until that memory is reused. These
helpers zero such objects in place, once nothing will read them again.

It is safe only under the guards below, which the callers meet: the object is
of the exact type, at least 2 long (CPython shares its empty and one-character
objects), and was made fresh for this request (never an interned or literal
object). FORMAT.md ("Key hygiene") lists what cannot be wiped.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

# Where an object's characters start, measured on this interpreter.
_BYTES_DATA: Final = sys.getsizeof(b"") - 1
_ASCII_DATA: Final = sys.getsizeof("") - 1
_COMPACT_DATA: Final = sys.getsizeof("\u0100\u0101") - 3 * 2


def wipe_bytes(data: bytes | bytearray | None) -> None:
    """Zero a bytes object's (or a bytearray's) contents in place."""
    if data is None or len(data) < 2:
        return
    if type(data) is bytearray:
        data[:] = bytes(len(data))
    elif type(data) is bytes:
        ctypes.memset(id(data) + _BYTES_DATA, 0, len(data))


def wipe_str(text: str | None) -> bool:
    """Zero a str's characters in place; whether it could be done.

    Compact strings only (what every decoder makes). A UTF-8 copy the
    interpreter may have cached beside a non-ASCII string is not reached
    (nothing in the daemon asks for one).
    """
    if text is None or type(text) is not str or len(text) < 2:
        return False
    if text.isascii():
        if sys.getsizeof(text) != _ASCII_DATA + len(text) + 1:
            return False
        ctypes.memset(id(text) + _ASCII_DATA, 0, len(text))
        return True
    top = max(map(ord, text))
    kind = 1 if top < 0x100 else 2 if top < 0x10000 else 4
    if sys.getsizeof(text) != _COMPACT_DATA + (len(text) + 1) * kind:
        return False  # not the layout we know (a cached UTF-8 copy, a legacy string)
    ctypes.memset(id(text) + _COMPACT_DATA, 0, len(text) * kind)
    return True
