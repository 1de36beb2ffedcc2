"""secretsctl: the command a person (or a boot unit) types.

Secret values and passphrases never come from argv (every user can read
/proc/PID/cmdline): a no-echo prompt on a terminal, standard input otherwise,
or a file. Exit codes: 0 ok, 1 other error, 2 usage, 3 locked, 4 not found,
5 cannot reach the agent, 6 wrong passphrase.
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Final, NoReturn

import msgspec
from homeagent_secrets.protocol.errors import (
    AgentUnreachableError,
    InvalidParams,
    LockedError,
    NotFoundError,
    NotInitializedError,
    SecretsError,
    WrongPassphraseError,
)
from homeagent_secrets.protocol.names import KINDS
from homeagent_secrets.protocol.secret import Secret

from .sync import SecretsClient

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_WRONG = range(7)
_EXIT_FOR: Final[list[tuple[type[SecretsError], int]]] = [
    (LockedError, EXIT_LOCKED),
    (NotInitializedError, EXIT_LOCKED),
    (NotFoundError, EXIT_NOT_FOUND),
    (AgentUnreachableError, EXIT_UNREACHABLE),
    (WrongPassphraseError, EXIT_WRONG),
]


class UsageError(SecretsError):
    """Bad command-line use; exits 2."""


def _exit_code(exc: SecretsError) -> int:
    if isinstance(exc, (UsageError, InvalidParams)):
        return EXIT_USAGE
    for cls, code in _EXIT_FOR:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


# --- reading secrets -------------------------------------------------------------


def _strip_newline(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def _read_file(path: str, what: str) -> str:
    try:
        if path == "-":
            return _strip_newline(sys.stdin.read())
        with open(path, encoding="utf-8") as f:
            return _strip_newline(f.read())
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the {what} file {path} is not UTF-8 text") from None


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _prompt(label: str, twice: bool) -> Secret:
    first = getpass.getpass(f"{label}: ")
    if twice and getpass.getpass(f"{label} (again): ") != first:
        raise UsageError("the two entries differ; nothing was changed")
    return Secret(first)


def read_secret(label: str, file: str | None, twice: bool = False) -> Secret:
    """A value or passphrase: from ``file``, else a no-echo prompt on a tty, else one stdin line."""
    if file is not None:
        return Secret(_read_file(file, label))
    if _stdin_is_tty():
        return _prompt(label, twice)
    return Secret(_strip_newline(sys.stdin.read()))


class CredentialMissing(UsageError):
    """No such credential was passed (``--ask-password`` may stand in)."""


def read_credential(name: str) -> Secret:
    """A passphrase from ``$CREDENTIALS_DIRECTORY/NAME``, refused if group/world-readable."""
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
    try:
        return Secret(_strip_newline(data.decode("utf-8")))
    except UnicodeDecodeError:
        raise UsageError(f"credential {path} is not UTF-8 text") from None


def ask_password(prompt: str) -> Secret:
    """Ask through ``systemd-ask-password`` (the console or a password agent at boot)."""
    try:
        out = subprocess.run(
            ["systemd-ask-password", "--id=secretsd:unlock", "--timeout=0", prompt],
            stdout=subprocess.PIPE, check=True,
        ).stdout
    except FileNotFoundError:
        raise UsageError("systemd-ask-password is not installed; use --passphrase-file") from None
    except subprocess.CalledProcessError:
        raise UsageError("systemd-ask-password got no passphrase") from None
    return Secret(_strip_newline(out.decode("utf-8")))


# --- output ------------------------------------------------------------------------

_json = msgspec.json.Encoder()


def _print_json(obj: Any) -> None:
    print(_json.encode(obj).decode())


def printable(text: str) -> str:
    """``text`` with every control or format character escaped (``\\x1b``, ``\\u202e``):
    nothing the agent returns can move a terminal's cursor or reorder its output."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _print_fields(obj: Any) -> None:
    for field in obj.__struct_fields__:
        value = getattr(obj, field)
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif value is None:
            value = "-"
        elif isinstance(value, list):
            value = ", ".join(printable(str(v)) for v in value) if value else "-"
        print(f"{field}: {printable(str(value))}")


# --- commands ------------------------------------------------------------------------


def cmd_init(c: SecretsClient, a: argparse.Namespace) -> int:
    c.init(read_secret("New passphrase", a.passphrase_file, twice=True))
    print("initialized and unlocked", file=sys.stderr)
    return EXIT_OK


def cmd_unlock(c: SecretsClient, a: argparse.Namespace) -> int:
    phrase: Secret | None = None
    if a.credential:
        try:
            phrase = read_credential(a.credential)
        except CredentialMissing:
            if not a.ask_password:
                raise
    if phrase is None and a.ask_password:
        phrase = ask_password("Passphrase for the homeagent secrets agent:")
    if phrase is None:
        phrase = read_secret("Passphrase", a.passphrase_file)
    c.unlock(phrase)
    return EXIT_OK


def cmd_lock(c: SecretsClient, a: argparse.Namespace) -> int:
    c.lock()
    return EXIT_OK


def cmd_passwd(c: SecretsClient, a: argparse.Namespace) -> int:
    if a.passphrase_file is not None or a.new_passphrase_file is not None:
        if a.passphrase_file is None or a.new_passphrase_file is None:
            raise UsageError("give both --passphrase-file (old) and --new-passphrase-file")
        old, new = read_secret("old", a.passphrase_file), read_secret("new", a.new_passphrase_file)
    elif _stdin_is_tty():
        old = _prompt("Current passphrase", twice=False)
        new = _prompt("New passphrase", twice=True)
    else:
        lines = sys.stdin.read().splitlines()
        if len(lines) != 2:
            raise UsageError("on standard input give two lines: the current passphrase, then the new one")
        old, new = Secret(lines[0]), Secret(lines[1])
    if a.rekey:
        count = c.rekey(old, new)
        print(f"new data key: {count} secret(s) re-encrypted, the old key removed", file=sys.stderr)
        return EXIT_OK
    c.change_passphrase(old, new)
    print("passphrase changed", file=sys.stderr)
    return EXIT_OK


def cmd_status(c: SecretsClient, a: argparse.Namespace) -> int:
    st = c.status()
    _print_json(st) if a.json else _print_fields(st)
    return EXIT_OK


def cmd_set(c: SecretsClient, a: argparse.Namespace) -> int:
    value = read_secret(f"Value for {a.name}", a.value_file)
    version = c.store(a.name, value, a.kind)
    print(f"stored {a.name} (version {version})", file=sys.stderr)
    return EXIT_OK


def cmd_get(c: SecretsClient, a: argparse.Namespace) -> int:
    result = c.retrieve(a.name, previous=a.previous)
    if result is None:
        what = "previous value for" if a.previous else "secret named"
        raise NotFoundError(f"there is no {what} {a.name!r}; `secretsctl ls` lists the names")
    sys.stdout.write(result.value.reveal() + "\n")
    return EXIT_OK


def cmd_rm(c: SecretsClient, a: argparse.Namespace) -> int:
    if not c.delete(a.name, force=a.force):
        raise NotFoundError(f"there is no secret named {a.name!r}; nothing was deleted")
    print(f"deleted {a.name}", file=sys.stderr)
    return EXIT_OK


def cmd_ls(c: SecretsClient, a: argparse.Namespace) -> int:
    names = c.list(a.prefix or "")
    if a.json:
        _print_json(names)
    else:
        for n in names:
            print(printable(n))
    return EXIT_OK


def cmd_rotate(c: SecretsClient, a: argparse.Namespace) -> int:
    value = read_secret(f"New value for {a.name}", a.value_file)
    version = c.rotate(a.name, value)
    print(f"rotated {a.name} (version {version}; the old value is kept as previous)", file=sys.stderr)
    return EXIT_OK


def cmd_describe(c: SecretsClient, a: argparse.Namespace) -> int:
    info = c.describe(a.name)
    if info is None:
        raise NotFoundError(f"there is no secret named {a.name!r}")
    _print_json(info) if a.json else _print_fields(info)
    return EXIT_OK


def cmd_migrate(c: SecretsClient, a: argparse.Namespace) -> int:
    phrase = None
    if a.to == "file" or a.passphrase_file is not None:
        phrase = read_secret("Passphrase of the encrypted-file store", a.passphrase_file,
                             twice=a.to == "file" and _stdin_is_tty())
    result = c.migrate(a.to, phrase, source=a.source)
    print(f"now on the {result.backend} backend: {result.migrated} secret(s) copied and verified, "
          f"{result.removed} original(s) removed", file=sys.stderr)
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"secretsctl: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="secretsctl", description="Talk to the homeagent secrets agent (secretsd).")
    p.add_argument("--socket", help="agent socket (default: as secretsd discovers it)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("init", cmd_init, "create the store with a new passphrase (asked twice)")
    sp.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE (- = stdin)")
    sp = add("unlock", cmd_unlock, "unlock the agent")
    sp.add_argument("--credential", metavar="NAME", help="read $CREDENTIALS_DIRECTORY/NAME (systemd)")
    sp.add_argument("--ask-password", action="store_true",
                    help="ask through systemd-ask-password (with --credential: when it is missing)")
    sp.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE (- = stdin)")
    add("lock", cmd_lock, "lock the agent and wipe its data key")
    sp = add("passwd", cmd_passwd, "change the passphrase")
    sp.add_argument("--passphrase-file", metavar="FILE", help="the current passphrase")
    sp.add_argument("--new-passphrase-file", metavar="FILE", help="the new passphrase")
    sp.add_argument("--rekey", action="store_true",
                    help="also replace the data key: re-encrypt every secret, remove the old key")
    sp = add("status", cmd_status, "show the agent's state")
    sp.add_argument("--json", action="store_true")
    sp = add("set", cmd_set, "store a secret (value from a prompt, stdin or --value-file)")
    sp.add_argument("name")
    sp.add_argument("--kind", choices=KINDS)
    sp.add_argument("--value-file", metavar="FILE", help="read the value from FILE (- = stdin)")
    sp = add("get", cmd_get, "print a secret's value")
    sp.add_argument("name")
    sp.add_argument("--previous", action="store_true", help="the value before the last rotation")
    sp = add("rm", cmd_rm, "delete a secret")
    sp.add_argument("name")
    sp.add_argument("--force", action="store_true",
                    help="also remove a damaged record of that name (it can no longer be read)")
    sp = add("ls", cmd_ls, "list names (never values)")
    sp.add_argument("prefix", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp = add("rotate", cmd_rotate, "replace a secret's value, keeping the old one as previous")
    sp.add_argument("name")
    sp.add_argument("--value-file", metavar="FILE", help="read the value from FILE (- = stdin)")
    sp = add("migrate", cmd_migrate, "move every secret to another backend, losslessly")
    sp.add_argument("--to", required=True, choices=("file", "keychain", "openbao"))
    sp.add_argument("--from", dest="source", choices=("file", "keychain", "openbao"),
                    help="on a re-run after an interruption: the backend to clean up "
                         "(default: file when --to keychain/openbao, keychain when --to file)")
    sp.add_argument("--passphrase-file", metavar="FILE",
                    help="passphrase of the encrypted-file store (asked when --to file)")
    sp = add("describe", cmd_describe, "show a secret's metadata (never its value)")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secretsctl`` command."""
    args = parser().parse_args(argv)
    client = SecretsClient(args.socket, timeout=args.timeout)
    try:
        return int(args.fn(client, args))
    except SecretsError as exc:
        print(f"secretsctl: {printable(exc.message)}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        print("secretsctl: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
