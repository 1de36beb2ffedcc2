"""What each secretsctl command does, and ``execute``: parse, connect on demand, run."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Final, cast

import msgspec

from homeagent_secrets.protocol.errors import (
    AgentUnreachableError,
    CorruptRecordError,
    NotFoundError,
    SecretsError,
)
from homeagent_secrets.protocol.names import name_problem
from homeagent_secrets.protocol.paths import discover_socket
from homeagent_secrets.protocol.secret import Secret

from . import cli_input as inp
from .cli_errors import EXIT_ERROR, EXIT_LOCKED, EXIT_OK, UsageError, no_secret
from .cli_output import (
    err,
    iso_time,
    long_line,
    out,
    print_describe,
    print_json,
    print_status,
    printable,
    write_value,
)
from .sync import SecretsClient

if TYPE_CHECKING:
    import argparse

#: Seconds to wait for the agent's answer (``--timeout``).
DEFAULT_TIMEOUT: Final = 30.0
#: The hidden command the shell completion calls for secret names.
COMPLETE: Final = "__complete"


def cmd_init(c: SecretsClient, a: argparse.Namespace) -> int:
    phrase, source = inp.read_passphrase("New passphrase", a.passphrase_file, new=True)
    c.init(phrase)
    err(f"initialized and unlocked (the passphrase was read from {source})")
    return EXIT_OK


def cmd_unlock(c: SecretsClient, a: argparse.Namespace) -> int:
    phrase: Secret | None = None
    if a.credential:
        try:
            phrase = inp.read_credential(a.credential)
        except inp.CredentialMissing:
            if not a.ask_password:
                raise
    if phrase is None and a.ask_password:
        phrase = inp.ask_password("Passphrase for the homeagent secrets agent:")
    if phrase is None:
        phrase, _ = inp.read_passphrase("Passphrase", a.passphrase_file, new=False)
    c.unlock(phrase)
    return EXIT_OK


def cmd_lock(c: SecretsClient, a: argparse.Namespace) -> int:
    c.lock()
    return EXIT_OK


def cmd_passwd(c: SecretsClient, a: argparse.Namespace) -> int:
    old, new, source = inp.read_passphrase_change(a.passphrase_file, a.new_passphrase_file)
    if a.rekey:
        count = c.rekey(old, new)
        err(f"new data key: {count} secret(s) re-encrypted, the old key material removed "
            f"(passphrases read from {source})")
        return EXIT_OK
    c.change_passphrase(old, new)
    err(f"passphrase changed (read from {source})")
    return EXIT_OK


def cmd_status(c: SecretsClient, a: argparse.Namespace) -> int:
    st = c.status()
    if a.json:
        print_json({"socket": str(c.socket_path), **msgspec.to_builtins(st)})
    else:
        print_status(st, c.socket_path)
    return EXIT_OK if st.initialized and not st.locked else EXIT_LOCKED


def cmd_set(c: SecretsClient, a: argparse.Namespace) -> int:
    value = inp.read_value(a.name, a.value_file, a.raw)
    version = c.store(a.name, value, a.kind)
    err(f"stored {a.name} (version {version})")
    return EXIT_OK


def cmd_get(c: SecretsClient, a: argparse.Namespace) -> int:
    result = c.retrieve(a.name, previous=a.previous)
    if result is None:
        raise no_secret(a.name, a.previous)
    write_value(result.value.reveal(), a.raw)
    return EXIT_OK


def cmd_rm(c: SecretsClient, a: argparse.Namespace) -> int:
    if not c.delete(a.name, force=a.force):
        raise NotFoundError(f"there is no secret named {a.name!r}; nothing was deleted")
    err(f"deleted {a.name}")
    return EXIT_OK


def matching_names(c: SecretsClient, prefix: str | None) -> list[str]:
    """The names ``ls PREFIX`` shows, matching whole segments.

    ``llm`` is ``llm`` and ``llm/...`` (never ``llmx``); ``llm/`` is ``llm/...`` only.
    """
    if not prefix:
        return c.list()
    under = prefix.endswith("/")
    problem = name_problem(prefix[:-1] if under else prefix)
    if problem is not None:
        raise UsageError(f"invalid prefix: {problem} (a name, or a name followed by /)")
    names = c.list(prefix)
    if under:
        return names
    return [n for n in names if n == prefix or n.startswith(prefix + "/")]


def cmd_ls(c: SecretsClient, a: argparse.Namespace) -> int:
    names = matching_names(c, a.prefix)
    if not a.long:
        if a.json:
            print_json(names)
        else:
            for n in names:
                out(printable(n))
        return EXIT_OK
    infos = []
    for n in names:
        try:
            info = c.describe(n)
        except CorruptRecordError:
            if not a.json:
                out(long_line(n, None, damaged=True))
            continue
        if info is None:
            continue  # deleted since the list
        infos.append(info)
        if not a.json:
            out(long_line(n, info))
    if a.json:
        print_json(infos)
    return EXIT_OK


def cmd_rotate(c: SecretsClient, a: argparse.Namespace) -> int:
    value = inp.read_value(a.name, a.value_file, a.raw)
    version = c.rotate(a.name, value)
    err(f"rotated {a.name} (version {version}; the old value is kept as previous)")
    return EXIT_OK


def cmd_describe(c: SecretsClient, a: argparse.Namespace) -> int:
    info = c.describe(a.name)
    if info is None:
        raise NotFoundError(f"there is no secret named {a.name!r}")
    if a.json:
        print_json(info)
    else:
        print_describe(info)
    return EXIT_OK


def cmd_migrate(c: SecretsClient, a: argparse.Namespace) -> int:
    phrase = None
    if a.to == "file" or a.passphrase_file is not None:
        phrase, _ = inp.read_passphrase("Passphrase of the encrypted-file store",
                                        a.passphrase_file, new=True)
    result = c.migrate(a.to, phrase, source=a.source)
    err(f"now on the {result.backend} backend: {result.migrated} secret(s) copied and verified, "
        f"{result.removed} original(s) removed")
    return EXIT_OK


def _lazy(module: str, name: str) -> Callable[[SecretsClient, argparse.Namespace], int]:
    """A command of a module imported only when that command runs."""
    import importlib

    fn: Callable[[SecretsClient, argparse.Namespace], int] = getattr(
        importlib.import_module(f"{__package__}.{module}"), name)
    return fn


def cmd_whoami(c: SecretsClient, a: argparse.Namespace) -> int:
    who = c.whoami()
    if a.json:
        print_json(who)
        return EXIT_OK
    out(f"uid: {who.uid}")
    out(f"gid: {who.gid}")
    out(f"pid: {who.pid}")
    out(f"unit: {printable(who.unit) if who.unit else '-'}")
    if not who.rights:
        out("rights: none (status and whoami only)")
    for right in who.rights:
        out(f"rights: {', '.join(right.allow)} on {', '.join(printable(n) for n in right.names)}")
    return EXIT_OK


def _since(text: str) -> float:
    """Unix seconds from an ISO-8601 time or a span back from now (90s, 15m, 2h, 7d)."""
    import datetime
    import time

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].isdigit() and text[-1:] in units:
        return time.time() - int(text[:-1]) * units[text[-1]]
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: give an ISO-8601 time (2026-11-30T08:00) or a span "
                         "back from now (90s, 15m, 2h, 7d)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, as describe prints it
    return when.timestamp()


def cmd_audit(c: SecretsClient, a: argparse.Namespace) -> int:
    import datetime
    import json

    from homeagent_secrets.protocol.names import glob_regex

    path = a.file or c.status().audit_log
    if path is None:
        raise UsageError("the agent keeps no access log: set audit_log in its config "
                         "(or give --file)")
    since = _since(a.since) if a.since else None
    pattern = glob_regex(a.name) if a.name else None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    event = json.loads(line)
                    when = datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line, or not ours
                if since is not None and when.timestamp() < since:
                    continue
                name = event.get("name")
                if pattern is not None and not (name and pattern.match("/" + name)):
                    continue
                if a.json:
                    out(line.rstrip("\n"))
                else:
                    out(f"{iso_time(when.timestamp())}  uid {event.get('uid')} pid {event.get('pid')} "
                        f"{printable(event.get('unit') or '-')}  {printable(str(event.get('method')))} "
                        f"{printable(name or '-')}  {event.get('outcome')}"
                        + (f" {event['code']}" if event.get("code") is not None else ""))
    except OSError as exc:
        raise UsageError(f"cannot read the access log {path}: {exc.strerror}") from None
    return EXIT_OK


COMMANDS: Final[dict[str, Callable[[SecretsClient, argparse.Namespace], int]]] = {
    "init": cmd_init, "unlock": cmd_unlock, "lock": cmd_lock, "passwd": cmd_passwd,
    "status": cmd_status, "set": cmd_set, "get": cmd_get, "rm": cmd_rm, "ls": cmd_ls,
    "rotate": cmd_rotate, "describe": cmd_describe, "migrate": cmd_migrate,
    "whoami": cmd_whoami, "audit": cmd_audit,
    "watch": lambda c, a: _lazy("watchcli", "cmd_watch")(c, a),
    "run": lambda c, a: _lazy("run", "cmd_run")(c, a),
}
#: Commands whose result goes to standard output (refused when it is closed).
PRINTING: Final = frozenset({"status", "get", "ls", "describe", "whoami", "audit", "watch",
                             "completion", COMPLETE})


def home_problem(c: SecretsClient, home: Path) -> str | None:
    """Why the agent reached does not serve ``home`` (``--home``), or None when it does."""
    served = c.status().home
    if served is None or not Path(served).is_absolute():
        return None  # an agent that does not say, or says relative to its own directory
    try:
        if Path(served).exists() and home.exists() and home.samefile(served):
            return None
    except OSError:
        pass
    if Path(served) == home.absolute():
        return None
    return (f"the agent at {printable(str(c.socket_path))} serves the home "
            f"{printable(served)}, not {printable(str(home))}")


def socket_for(socket: str | None, home: str | None) -> Path:
    """``--socket``, else discovery as the agent does it, with ``--home`` for ``HOME/run``."""
    if socket:
        return Path(socket).expanduser()
    return discover_socket(Path(home).expanduser() if home else None)


def complete_names(prefix: str, socket: Path) -> int:
    """The hidden ``__complete names PREFIX``: names from a running, unlocked agent, or nothing."""
    try:
        with SecretsClient(socket, timeout=1.0, connect_timeout=0.5) as c:
            names = c.list(prefix)
    except (SecretsError, OSError):
        return EXIT_ERROR  # quietly: a completion never prints an error
    sys.stdout.write("".join(n + "\n" for n in names))
    return EXIT_OK


def plain_get(argv: list[str]) -> argparse.Namespace | None:
    """``get [--previous] [--raw] NAME``, the form scripts run in loops, parsed without
    argparse (importing it and building a parser was a fifth of `get`'s start-up).

    Any other command line, ``get`` with other options included, goes to argparse;
    the result is the namespace argparse would give (``tests/test_secretsctl.py``).
    """
    if len(argv) < 2 or argv[0] != "get":
        return None
    name = None
    for word in argv[1:]:
        if word in ("--previous", "--raw"):
            continue
        if word.startswith("-") or name is not None:
            return None
        name = word
    if name is None:
        return None
    return cast("argparse.Namespace", SimpleNamespace(
        socket=None, home=None, timeout=DEFAULT_TIMEOUT, command="get", name=name,
        previous="--previous" in argv, raw="--raw" in argv))


def execute(argv: list[str]) -> int:
    """Parse ``argv`` and run its command; errors are raised (``cli.main`` reports them)."""
    args = plain_get(argv)
    if args is None:
        from .cli_parser import parser

        args = parser(argv).parse_args(argv)
    if args.command in PRINTING and sys.stdout is None:
        raise UsageError("standard output is closed: nowhere to print to; nothing was done")
    if args.command == "completion":
        from .cli_parser import parser
        from .completion import script

        sys.stdout.write(script(args.shell, parser()))
        return EXIT_OK
    socket = socket_for(args.socket, args.home)
    if args.command == COMPLETE:
        return complete_names(args.prefix, socket)
    client = SecretsClient(socket, timeout=args.timeout)
    home = Path(args.home).expanduser() if args.home else None
    try:
        if home is not None and args.command != "status":
            problem = home_problem(client, home)
            if problem:
                raise AgentUnreachableError(f"{problem}: nothing was done; point --socket at "
                                            "the agent of that home")
        code = COMMANDS[args.command](client, args)
        if home is not None and args.command == "status":
            problem = home_problem(client, home)
            if problem:
                err(f"secretsctl: note: {problem}")
        return code
    finally:
        client.close()
