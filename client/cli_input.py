"""How secretsctl reads a secret value or a passphrase (never from argv).

The rules (also in each command's ``--help`` and the README):

- **Values** (``set``, ``rotate``): from ``--value-file FILE`` (``-`` is standard
  input), else a no-echo prompt when standard input is a terminal, else all of
  standard input. One trailing newline (``\\n`` or ``\\r\\n``) is removed, so
  ``echo value |`` and a file saved by an editor store ``value``; ``--raw`` keeps
  the bytes exactly. Either way the bytes must be UTF-8 (a value is a Unicode
  string on the wire): anything else is refused, never altered. Empty standard
  input is refused (a forgotten pipe must not store an empty value); an empty
  file is stored as an empty value.
- **Passphrases**: ``--passphrase-file FILE`` is read whole, minus one trailing
  newline. On a terminal: a no-echo prompt, asked twice for a new one. From
  other standard input: ``unlock`` reads exactly one line; ``init`` (and
  ``migrate --to file``) one line, or two lines that must match; ``passwd`` two
  lines (current, new) or three (current, new, new again). Every passphrase is
  checked with the protocol's own rule before anything is sent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from homeagent_secrets.protocol.names import check_passphrase
from homeagent_secrets.protocol.secret import Secret

from .cli_errors import UsageError


def strip_newline(text: str) -> str:
    """``text`` without one trailing ``\\n`` or ``\\r\\n``."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def decode(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text, or a UsageError naming where it came from and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
            "values and passphrases are Unicode strings; encode binary data first "
            "(e.g. base64); nothing was sent"
        ) from None


def stdin_is_tty() -> bool:
    """Whether standard input is an open terminal."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


def read_stdin(what: str) -> bytes:
    """All of standard input; a UsageError when it is closed or empty."""
    if sys.stdin is None:
        raise UsageError(f"standard input is closed: nothing to read the {what} from; "
                         "nothing was sent")
    try:
        data = sys.stdin.buffer.read()
    except OSError as exc:
        raise UsageError(f"cannot read standard input: {exc.strerror}") from None
    if not data:
        raise UsageError(f"standard input was empty: no {what} was read; nothing was sent")
    return data


def read_file(path: str, what: str) -> bytes:
    """The bytes of ``path`` (``-``: standard input), or a one-line UsageError."""
    if path == "-":
        return read_stdin(what)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def prompt(label: str) -> str:
    """One line typed at a no-echo prompt on the terminal; Ctrl-D is a UsageError."""
    import getpass

    try:
        return getpass.getpass(f"{label}: ")
    except EOFError:
        raise UsageError(f"no {label.lower()} entered (end of input): nothing was sent") from None
    except KeyboardInterrupt:
        if sys.stderr is not None and sys.stderr.isatty():
            sys.stderr.write("\n")  # the message goes under the prompt, not after it
        raise


# --- values ------------------------------------------------------------------------------


def read_value(name: str, file: str | None, raw: bool) -> Secret:
    """The value for ``set``/``rotate`` under the rules of this module."""
    if file is None and stdin_is_tty():
        text = prompt(f"Value for {name}")
        if not text:
            raise UsageError("nothing entered: no value was stored")
        return Secret(text)
    if file is None or file == "-":
        data, where = read_stdin("value"), "the value on standard input"
    else:
        data, where = read_file(file, "value"), f"the value file {file}"
    text = decode(data, where)
    return Secret(text if raw else strip_newline(text))


# --- passphrases -------------------------------------------------------------------------


def _stdin_lines(what: str) -> list[str]:
    """Standard input as lines without their endings (one final newline is optional)."""
    text = strip_newline(decode(read_stdin(what), f"the {what} on standard input"))
    return [line.removesuffix("\r") for line in text.split("\n")]


def _checked(phrase: str, what: str, new: bool) -> Secret:
    secret = Secret(phrase)
    check_passphrase(secret, what, new)  # the protocol's own rule and message
    return secret


def _prompted(label: str, what: str, new: bool) -> Secret:
    secret = _checked(prompt(label), what, new)
    if new and prompt(f"{label} (again)") != secret.reveal():
        raise UsageError("the two entries differ: nothing was changed")
    return secret


def read_passphrase(label: str, file: str | None, *, new: bool, what: str = "passphrase"
                    ) -> tuple[Secret, str]:
    """A passphrase and where it came from (said to the user by commands that create one).

    ``new``: it will seal a store (asked twice at a prompt; one line or two
    matching lines of standard input).
    """
    if file is not None:
        source = "standard input" if file == "-" else f"the file {file}"
        text = strip_newline(decode(read_file(file, what), f"the {what} from {source}"))
        return _checked(text, what, new), source
    if stdin_is_tty():
        return _prompted(label, what, new), "the prompt"
    lines = _stdin_lines(what)
    if len(lines) not in ((1, 2) if new else (1,)):
        raise UsageError(
            f"standard input has {len(lines)} lines; give the {what} as "
            + ("one line, or two identical lines" if new else "exactly one line")
            + " (a passphrase file is read whole: --passphrase-file FILE); nothing was sent"
        )
    if len(lines) == 2 and lines[0] != lines[1]:
        raise UsageError(f"the two lines on standard input differ: they must be the same "
                         f"{what} twice; nothing was changed")
    source = "one line of standard input" if len(lines) == 1 else \
        "two matching lines of standard input"
    return _checked(lines[0], what, new), source


def read_passphrase_change(old_file: str | None, new_file: str | None
                           ) -> tuple[Secret, Secret, str]:
    """The current and the new passphrase for ``passwd``, and where they came from."""
    if old_file is not None or new_file is not None:
        if old_file is None or new_file is None:
            raise UsageError("give both --passphrase-file (current) and --new-passphrase-file")
        if old_file == new_file == "-":
            raise UsageError("only one of the two passphrase files can be standard input")
        old, _ = read_passphrase("", old_file, new=False, what="current passphrase")
        new, _ = read_passphrase("", new_file, new=True, what="new passphrase")
        return old, new, "the files"
    if stdin_is_tty():
        old = _prompted("Current passphrase", "current passphrase", new=False)
        return old, _prompted("New passphrase", "new passphrase", new=True), "the prompt"
    lines = _stdin_lines("passphrases")
    if len(lines) not in (2, 3):
        raise UsageError(
            f"standard input has {len(lines)} lines; give two (the current passphrase, then "
            "the new one) or three (the new one twice); nothing was sent")
    if len(lines) == 3 and lines[1] != lines[2]:
        raise UsageError("the new passphrase differs between lines 2 and 3: nothing was changed")
    old = _checked(lines[0], "current passphrase", new=False)
    return old, _checked(lines[1], "new passphrase", new=True), \
        f"{len(lines)} lines of standard input"


# --- systemd -----------------------------------------------------------------------------


class CredentialMissing(UsageError):
    """No such credential was passed (``--ask-password`` may stand in)."""


def read_credential(name: str) -> Secret:
    """A passphrase from ``$CREDENTIALS_DIRECTORY/NAME``, refused if group/world-readable."""
    import stat

    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise CredentialMissing(
            "--credential needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential*=); "
            "run it from the secretsd-unlock unit or use --passphrase-file"
        )
    if "/" in name or name in ("", ".", ".."):
        raise UsageError(f"invalid credential name {name!r}")
    path = Path(directory) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CredentialMissing(
            f"no credential {name!r} in {directory}: seal one with `systemd-creds encrypt` "
            "(see README) or add --ask-password"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot open credential {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise UsageError(
                f"credential {path} has mode {mode:04o}: it must not be readable by group or "
                "others; chmod 0400 it (systemd's LoadCredential* does this itself)"
            )
        data = f.read()
    return _checked(strip_newline(decode(data, f"credential {path}")), "passphrase", new=False)


def ask_password(prompt_text: str) -> Secret:
    """Ask through ``systemd-ask-password`` (the console or a password agent at boot)."""
    import subprocess

    try:
        out = subprocess.run(
            ["systemd-ask-password", "--id=secretsd:unlock", "--timeout=0", prompt_text],
            stdout=subprocess.PIPE, check=True,
        ).stdout
    except FileNotFoundError:
        raise UsageError("systemd-ask-password is not installed; use --passphrase-file") from None
    except subprocess.CalledProcessError:
        raise UsageError("systemd-ask-password got no passphrase") from None
    return _checked(strip_newline(decode(out, "the passphrase from systemd-ask-password")),
                    "passphrase", new=False)
