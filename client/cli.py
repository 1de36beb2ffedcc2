"""secretsctl: the command a person (or a boot unit, or a script) types.

Secret values and passphrases never come from argv (every user can read
/proc/PID/cmdline): a no-echo prompt on a terminal, standard input otherwise,
or a file (``cli_input.py`` holds the rules). Every failure is one line on
standard error and an exit status from ``cli_errors.py``: never a traceback,
also for Ctrl-C (130), a reader that left (141, silently), a closed standard
input or output (2), a broken installation (1).

``secretsctl get`` runs in scripts and must start in at most twice the time of
``python -c pass`` (README; ``tests/bench/cli_time.py``). So this module
imports only the standard library, loads the protocol stack inside ``main``,
and the console script ends without the interpreter's teardown.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from .cli_output import err

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141  # cli_errors.py


def _load_msgspec() -> None:
    """Import msgspec without typing_extensions, when secretsctl is first to import it.

    msgspec takes two backports from typing_extensions when it is installed
    (anyio installs it); Python 3.11 has both in ``typing``. Importing it (and
    with it inspect, ast, dis and tokenize) was a third of the start-up of
    `secretsctl get`. Hidden only while msgspec loads: later imports find it.
    """
    if "msgspec" in sys.modules or "typing_extensions" in sys.modules:
        return
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]  # ImportError inside
    try:
        import msgspec  # noqa: F401
    finally:
        del sys.modules["typing_extensions"]


def _quiet_stdout() -> None:
    """Point fd 1 at /dev/null, so the last flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _main(argv: list[str]) -> int:
    _load_msgspec()
    from homeagent_secrets.protocol.errors import SecretsError

    from .cli_commands import execute
    from .cli_errors import exit_code
    from .cli_output import printable

    try:
        code = execute(argv)
    except SystemExit as exc:  # argparse: --help, --version, a usage error
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else 0
    except SecretsError as exc:
        err(f"secretsctl: {printable(exc.message)}")
        code = exit_code(exc)
    if sys.stdout is not None:
        sys.stdout.flush()  # here, where a failure is still ours to report
    return code


def main(argv: list[str] | None = None) -> int:
    """Run secretsctl with ``argv`` (default: the command line); return the exit status."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        err("secretsctl: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()  # the reader left: what it did not read is nobody's
        return EXIT_BROKEN_PIPE
    except ImportError as exc:  # a broken installation, not a bug of ours
        err(f"secretsctl: the Python package {exc.name or exc!r} is missing: reinstall "
            "homeagent-secrets (pip install --force-reinstall homeagent-secrets)")
        return EXIT_ERROR
    except OSError as exc:  # every read says its own error: this is a write to stdout
        _quiet_stdout()
        err(f"secretsctl: cannot write to standard output: {exc.strerror or exc}")
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line (its type, never a value), and exit 1
        err(f"secretsctl: internal error ({type(exc).__name__}); please report it")
        return EXIT_ERROR


def run() -> NoReturn:
    """The ``secretsctl`` console script: ``main()``, then exit at once.

    Everything is flushed and no atexit work is ours, so the interpreter's
    teardown (freeing every object one by one) is skipped, as mypy does with
    its fast exit: it cost a quarter of `secretsctl get`'s run time.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
