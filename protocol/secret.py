"""A secret value or passphrase as a type, redacted wherever it could be printed."""

from __future__ import annotations

from typing import Any, NoReturn


class Secret:
    """Holds a secret string; ``repr``/``str``/``format`` never show it.

    Unwrap with ``reveal()`` only where the value must cross a boundary (the
    wire, the cipher, the keychain). Equality compares values so tests and
    models can use it, but hashing is refused so a secret never becomes a dict
    key that a debugger or log might dump.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """The plain value: call only at a boundary that needs it."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "<redacted>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return self._value == other._value
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


def dec_hook(type_: type, obj: Any) -> Any:
    """msgspec decode hook: JSON strings become ``Secret`` where a struct asks for one."""
    if type_ is Secret:
        if isinstance(obj, str):
            return Secret(obj)
        raise TypeError("Expected `str`")
    raise NotImplementedError(f"cannot decode {type_!r}")


def enc_hook(obj: Any) -> Any:
    """msgspec encode hook: a ``Secret`` goes on the wire as its plain string."""
    if isinstance(obj, Secret):
        return obj.reveal()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")
