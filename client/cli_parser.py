"""secretsctl's command line: every command, its arguments, input rules and exit codes.

The agent options (``--socket``, ``--home``, ``--timeout``) are accepted before
or after the command. ``completion.py`` generates the shell completion from
this parser, so the two never disagree.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Final, NoReturn

from homeagent_secrets.protocol.names import BACKEND_NAMES, KINDS

from .cli_commands import COMPLETE, DEFAULT_TIMEOUT
from .cli_errors import (
    EXIT_BROKEN_PIPE,
    EXIT_DENIED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    EXIT_WRONG_PASSPHRASE,
    MEANING,
)

PROG: Final = "secretsctl"
#: Every command, in the order --help lists them (the hidden COMPLETE is not listed).
COMMANDS: Final = ("init", "unlock", "lock", "passwd", "status", "set", "get", "rm", "ls",
                   "rotate", "describe", "migrate", "whoami", "audit", "watch", "run", "completion",
                   COMPLETE)
#: Metavars of the positionals that take a secret name (completed from the agent).
NAME_METAVARS: Final = ("NAME", "PREFIX")

_VALUE_RULES: Final = (
    "The value comes from --value-file FILE (- is standard input), else a no-echo prompt\n"
    "when standard input is a terminal (one line; use a file or a pipe for several lines or\n"
    "more than 4 KiB), else all of standard input. One trailing newline (\\n or \\r\\n) is\n"
    "removed unless --raw: then the bytes are kept exactly (PEM files, trailing blanks).\n"
    "The bytes must be UTF-8 text; anything else is refused. Empty standard input is\n"
    "refused; an empty file (--value-file /dev/null) stores an empty value."
)
_NEW_PASSPHRASE_RULES: Final = (
    "The passphrase comes from --passphrase-file FILE (read whole, minus one trailing\n"
    "newline), else a no-echo prompt on a terminal (asked twice), else standard input:\n"
    "one line, or two lines that must match. It must be non-empty, at most 1,024 bytes\n"
    "of UTF-8, without control characters."
)


def _epilog(codes: tuple[int, ...], rules: str = "") -> str:
    table = "\n".join(f"  {code:<4} {MEANING[code]}" for code in sorted({EXIT_OK, *codes}))
    return (rules + "\n\n" if rules else "") + "exit status:\n" + table


# Exit codes every command that talks to the agent can end with.
_AGENT: Final = (EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DENIED, EXIT_INTERRUPTED)


def _columns() -> int:
    """The terminal's width as argparse measures it (COLUMNS, the terminal, else 80)."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized without ``shutil``: argparse makes one per
    ``add_argument``, and importing shutil (with bz2 and lzma) on every run of
    `secretsctl get` cost more than parsing its arguments."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=max(_columns() - 2, 40))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", _Formatter)
        kw.setdefault("allow_abbrev", False)  # --sock is not --socket: scripts stay exact
        super().__init__(*args, **kw)

    def error(self, message: str) -> NoReturn:
        # One line, as every other error (the usage is one --help away).
        if message.startswith("argument COMMAND: invalid choice"):
            word = message.split("'")[1] if "'" in message else "?"
            message = f"unknown command {word!r}"
        elif ("unrecognized arguments: -" in message
              or "arguments are required: NAME" in message):
            message += " (a NAME that starts with '-' goes after '--': secretsctl get -- -name)"
        self._print_message(f"{self.prog}: {message}; see `{self.prog} --help`\n", sys.stderr)
        sys.exit(EXIT_USAGE)

    def _print_message(self, message: str, file: Any = None) -> None:
        # argparse ignores a failed write; a reader that left is main's to report (141).
        if message and file is not None:
            file.write(message)


class _Version(argparse.Action):
    """``--version``, with the version read only when asked (it is slow to read)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> NoReturn:
        from homeagent_secrets.protocol import __version__

        print(f"{PROG} {__version__}")
        parser.exit(EXIT_OK)


def _agent_options(p: argparse.ArgumentParser, top: bool) -> None:
    # Under a command the defaults are SUPPRESS, so an option given before the
    # command is not reset by the command's parser; given after, it wins.
    default = None if top else argparse.SUPPRESS
    g = p.add_argument_group("agent options (before or after the command)")
    g.add_argument("--socket", metavar="PATH", default=default,
                   help="the agent's socket (default: $HOMEAGENT_SECRETS_SOCKET, else the first "
                        "that exists of $XDG_RUNTIME_DIR/homeagent/secretsd.sock, "
                        "HOME/run/secretsd.sock, /run/homeagent/secretsd.sock)")
    g.add_argument("--home", metavar="DIR", default=default,
                   help="the agent's state directory (default: $HOMEAGENT_HOME, else "
                        "~/.homeagent): where DIR/run/secretsd.sock is looked for, and the "
                        "home the agent reached must serve")
    g.add_argument("--timeout", metavar="SECONDS", type=float,
                   default=DEFAULT_TIMEOUT if top else argparse.SUPPRESS,
                   help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT:g})")


class _Skipped:
    """Stands in for the parser of a command that was not asked for. When argv names
    a command, only its parser is made: argparse builds a help formatter for every
    argument and looks up translations for every parser, a cost every `secretsctl
    get` would pay for a dozen commands it does not run."""

    def add_argument(self, *args: Any, **kw: Any) -> None:
        pass


_Sink = argparse.ArgumentParser | _Skipped


def command_in(argv: list[str]) -> str | None:
    """The command ``argv`` runs, as argparse will see it; None when argparse may need
    every command (none named, an unknown one, or help or --version asked first)."""
    words = iter(argv)
    for word in words:
        if word in ("--socket", "--home", "--timeout"):
            next(words, None)
        elif word in ("-h", "--help", "--version", "--"):
            return None
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line of secretsctl: complete, or (given ``argv``) with only the
    command ``argv`` runs when it names one (see ``command_in``)."""
    only = None if argv is None else command_in(argv)
    p = _Parser(prog=PROG,
                description="Talk to the homeagent secrets agent (secretsd). Values and "
                            "passphrases never come from\nthe command line: a no-echo prompt, "
                            "standard input or a file.",
                epilog="`secretsctl COMMAND --help` documents each command and its exit codes.\n\n"
                       + _epilog((EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED, EXIT_NOT_FOUND,
                                  EXIT_UNREACHABLE, EXIT_WRONG_PASSPHRASE, EXIT_DENIED,
                                  EXIT_INTERRUPTED, EXIT_BROKEN_PIPE)))
    p.add_argument("--version", action=_Version)
    _agent_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    def add(name: str, help: str, codes: tuple[int, ...], rules: str = "") -> _Sink:
        if only is not None and name != only:
            return _Skipped()
        sp = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                            epilog=_epilog(codes, rules))
        _agent_options(sp, top=False)
        return sp

    def name_arg(sp: _Sink, what: str) -> None:
        sp.add_argument("name", metavar="NAME",
                        help=f"{what} (segments of A-Z a-z 0-9 . _ - joined by /; "
                             "one starting with - goes after --)")

    sp = add("init", "create the store with a new passphrase and unlock it", _AGENT,
             _NEW_PASSPHRASE_RULES + "\nAn agent already initialized: exit 1.")
    sp.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE "
                    "(- = standard input, read whole)")

    sp = add("unlock", "unlock the agent", (*_AGENT, EXIT_LOCKED, EXIT_WRONG_PASSPHRASE),
             "The passphrase comes from --credential, --ask-password, --passphrase-file FILE\n"
             "(read whole, minus one trailing newline), a no-echo prompt on a terminal, or\n"
             "exactly one line of standard input. Not initialized: exit 3.")
    sp.add_argument("--credential", metavar="NAME",
                    help="read $CREDENTIALS_DIRECTORY/NAME (systemd's LoadCredential*=)")
    sp.add_argument("--ask-password", action="store_true",
                    help="ask through systemd-ask-password (with --credential: when it is missing)")
    sp.add_argument("--passphrase-file", metavar="FILE",
                    help="read the passphrase from FILE (- = standard input, read whole)")

    add("lock", "lock the agent and wipe its data key from memory", (*_AGENT, EXIT_LOCKED))

    sp = add("passwd", "change the passphrase", (*_AGENT, EXIT_LOCKED, EXIT_WRONG_PASSPHRASE),
             "The passphrases come from --passphrase-file and --new-passphrase-file (both), a\n"
             "no-echo prompt on a terminal (the new one twice), or standard input: two lines\n"
             "(current, new) or three (current, new, new again).")
    sp.add_argument("--passphrase-file", metavar="FILE", help="the current passphrase")
    sp.add_argument("--new-passphrase-file", metavar="FILE", help="the new passphrase")
    sp.add_argument("--rekey", action="store_true",
                    help="also replace the data key: every secret re-encrypted under a new key, "
                         "the old key material removed (a leaked old passphrase then opens "
                         "nothing that exists); the new passphrase may equal the old one")

    sp = add("status", "show the agent's state, socket and home; exit 3 when it is locked",
             (EXIT_LOCKED, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED,
              EXIT_BROKEN_PIPE),
             "Exit 0 means unlocked (ready to serve), 3 locked or not initialized: a health\n"
             "check can test the exit status alone. Damaged records are listed one per line:\n"
             "file, name (- when unknown), problem.")
    sp.add_argument("--json", action="store_true",
                    help="the agent's answer as JSON, plus the socket it came from")

    sp = add("set", "store a secret (create or overwrite; the old value is kept as previous)",
             (*_AGENT, EXIT_LOCKED), _VALUE_RULES)
    name_arg(sp, "the secret's name")
    sp.add_argument("--kind", choices=KINDS, help="what it is (default: generic, or the kind "
                    "it had)")
    sp.add_argument("--value-file", metavar="FILE", help="read the value from FILE "
                    "(- = standard input)")
    sp.add_argument("--raw", action="store_true",
                    help="keep the value's bytes exactly (no trailing newline removed)")

    sp = add("get", "print a secret's value", (*_AGENT, EXIT_LOCKED, EXIT_NOT_FOUND,
                                               EXIT_BROKEN_PIPE),
             "The value is printed as UTF-8 followed by one newline; with --raw exactly as\n"
             "stored. `set NAME < FILE` then `get NAME > FILE` gives back any file that ends in\n"
             "one newline (PEM does); `set --raw` and `get --raw` give back any UTF-8 file.")
    name_arg(sp, "the secret's name")
    sp.add_argument("--previous", action="store_true", help="the value before the last "
                    "rotation or overwrite")
    sp.add_argument("--raw", action="store_true", help="print the value exactly, without "
                    "adding a newline")

    sp = add("rm", "delete a secret and its previous value",
             (*_AGENT, EXIT_LOCKED, EXIT_NOT_FOUND))
    name_arg(sp, "the secret's name")
    sp.add_argument("--force", action="store_true",
                    help="also remove a damaged record of that name (it can no longer be read)")

    sp = add("ls", "list names (never values)", (*_AGENT, EXIT_LOCKED, EXIT_BROKEN_PIPE),
             "PREFIX matches whole segments: `ls llm` lists llm and llm/..., not llmx/...;\n"
             "`ls llm/` lists only the names under llm/.")
    sp.add_argument("prefix", metavar="PREFIX", nargs="?",
                    help="a name or a name/ to list under (default: everything)")
    sp.add_argument("-l", "--long", action="store_true",
                    help="also show each secret's kind, version and updated time")
    sp.add_argument("--json", action="store_true",
                    help="a JSON list of names (with -l: of their metadata)")

    sp = add("rotate", "replace an existing secret's value, keeping the old one as previous",
             (*_AGENT, EXIT_LOCKED, EXIT_NOT_FOUND), _VALUE_RULES)
    name_arg(sp, "the secret's name")
    sp.add_argument("--value-file", metavar="FILE", help="read the value from FILE "
                    "(- = standard input)")
    sp.add_argument("--raw", action="store_true",
                    help="keep the value's bytes exactly (no trailing newline removed)")

    sp = add("describe", "show a secret's metadata (never its value)",
             (*_AGENT, EXIT_LOCKED, EXIT_NOT_FOUND, EXIT_BROKEN_PIPE),
             "Times are ISO-8601 local time with the UTC offset; with --json, Unix seconds.")
    name_arg(sp, "the secret's name")
    sp.add_argument("--json", action="store_true", help="the agent's answer as JSON")

    sp = add("migrate", "move every secret to another backend, losslessly",
             (*_AGENT, EXIT_LOCKED, EXIT_WRONG_PASSPHRASE),
             "--to file asks for the encrypted-file store's passphrase (a new one if the\n"
             "store is created) by the rules of `init`.")
    sp.add_argument("--to", required=True, choices=BACKEND_NAMES, help="the backend to move to")
    sp.add_argument("--from", dest="source", choices=BACKEND_NAMES,
                    help="the backend being left (optional: the agent knows it, and refuses a "
                         "mismatch); `migrate --to` the backend in use finishes an interrupted "
                         "migration's cleanup")
    sp.add_argument("--passphrase-file", metavar="FILE",
                    help="passphrase of the encrypted-file store (asked when --to file)")

    sp = add("whoami", "show what the agent sees of this process and what the access rules "
             "grant it", (*_AGENT, EXIT_BROKEN_PIPE),
             "uid, gid and pid are the kernel's (SO_PEERCRED); unit is the systemd unit of the\n"
             "process (- when unknown). Without access rules the agent's own uid and root have\n"
             "every right and nobody else is served.")
    sp.add_argument("--json", action="store_true", help="the agent's answer as JSON")

    sp = add("audit", "print the access log: one line per call, never a value",
             (*_AGENT, EXIT_BROKEN_PIPE),
             "The log is the agent's audit_log file (its path is asked of the agent, or given\n"
             "with --file); it is readable by the agent's user and root only.")
    sp.add_argument("--since", metavar="WHEN",
                    help="only events since WHEN: an ISO-8601 time, or a span back from now "
                         "(90s, 15m, 2h, 7d)")
    sp.add_argument("--name", metavar="PATTERN",
                    help="only events about names matching PATTERN (* one segment, ** any)")
    sp.add_argument("--file", metavar="FILE", help="the log file (default: the agent's audit_log)")
    sp.add_argument("--json", action="store_true", help="the events as JSON lines, as stored")

    if only in (None, "watch"):  # imported only when asked for (secretsctl get stays lean)
        from . import watchcli

        sp = add("watch", watchcli.HELP, (*_AGENT, EXIT_BROKEN_PIPE), watchcli.RULES)
        watchcli.watch_arguments(sp)
    if only in (None, "run"):
        from . import run as run_cmd

        sp = add("run", run_cmd.HELP, (*_AGENT, EXIT_LOCKED, EXIT_NOT_FOUND), run_cmd.RULES)
        run_cmd.run_arguments(sp)

    sp = add("completion", "print the shell completion script for bash or zsh",
             (EXIT_USAGE, EXIT_BROKEN_PIPE),
             "bash:  secretsctl completion bash \\\n"
             "         > ~/.local/share/bash-completion/completions/secretsctl\n"
             "zsh:   secretsctl completion zsh > ~/.zfunc/_secretsctl   (with ~/.zfunc in $fpath,\n"
             "       before compinit)\n"
             "Commands and options are completed; secret names come from a running, unlocked\n"
             "agent (nothing when it is locked or unreachable).")
    sp.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")

    # Hidden (no help=, so not listed): the completion scripts call it; it prints
    # names, or nothing on any error.
    if only is None or only == COMPLETE:
        hidden = sub.add_parser(COMPLETE, add_help=False)
        _agent_options(hidden, top=False)
        hidden.add_argument("what", choices=("names",))
        hidden.add_argument("prefix", nargs="?", default="")
    return p
