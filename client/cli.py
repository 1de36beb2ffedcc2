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


def _quick_get(argv: list[str]) -> int | None:
    """``secretsctl [--socket PATH] get NAME``, the form scripts run, with the standard
    library only.

    The same checked socket as every client (``reach.py``), one ``retrieve``
    written and read with ``json``, and the same output, messages and exit codes
    as the general way. None for any other form of the command, or before
    anything was sent when something is off (the general way then runs and says
    what): an answer is never asked for twice.
    """
    socket_arg: str | None = None
    rest = []
    args = iter(argv)
    for arg in args:
        if arg == "--socket":
            socket_arg = next(args, None)
            if socket_arg is None:
                return None
        elif arg.startswith("--socket="):
            socket_arg = arg.removeprefix("--socket=")
        else:
            rest.append(arg)
    if (len(rest) != 2 or rest[0] != "get" or rest[1].startswith("-") or socket_arg == ""
            or sys.stdout is None):  # the general way says that nothing can be printed
        return None
    import json

    from homeagent_secrets.protocol.errors import SecretsError, error_for_code
    from homeagent_secrets.protocol.names import name_problem

    from . import reach
    from .cli_errors import exit_code, no_secret
    from .cli_output import printable, write_value

    name = rest[1]
    if name_problem(name) is not None:
        return None
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "retrieve", "params": {"name": name}})
    try:
        path = reach.socket_path(socket_arg)
        with reach.open_socket(path, reach.DEFAULT_CONNECT_TIMEOUT) as sock:
            sock.settimeout(reach.DEFAULT_TIMEOUT)
            sock.sendall(line.encode() + b"\n")
            answer = bytearray()
            while not answer.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise reach.unreachable(path, "the connection closed during the call")
                answer += chunk
                if len(answer) > (2 << 20):
                    raise SecretsError("the agent's answer is over 2 MiB: not a value it stores")
        reply = json.loads(answer)
        error, result = reply.get("error"), reply.get("result")
        if error is not None:
            data = error.get("data") or {}
            raise error_for_code(int(error["code"]), str(error["message"]), data.get("reason"))
        if result is None:
            raise no_secret(name)
        value = result["value"]
        if not isinstance(value, str):
            raise SecretsError("the agent's answer holds no value (a different version of secretsd?)")
    except SecretsError as exc:
        err(f"secretsctl: {printable(exc.message)}")
        return exit_code(exc)
    except TimeoutError:  # open_socket has its own message for a connect that timed out
        late = reach.no_answer("retrieve", reach.DEFAULT_TIMEOUT)
        err(f"secretsctl: {late.message}")
        return exit_code(late)
    except OSError as exc:
        failed = reach.connect_error(path, exc)
        err(f"secretsctl: {printable(failed.message)}")
        return exit_code(failed)
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON-RPC as we know it
        err("secretsctl: the agent's answer was not understood (a different version of secretsd?)")
        return EXIT_ERROR
    write_value(value, False)
    return 0


def _main(argv: list[str]) -> int:
    quick = _quick_get(argv)
    if quick is not None:
        sys.stdout.flush()  # here, where a failure is still ours to report (as below)
        return quick
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
