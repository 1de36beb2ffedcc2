"""A real pseudo-terminal for tests of what a person types at secretsctl's prompts.

The child runs in its own session with the pty as its controlling terminal
(so ``/dev/tty`` opens, ``getpass`` turns echo off, and a typed Ctrl-C is a
SIGINT from the line discipline), its stdin and stdout on the pty and its
stderr on a pipe of its own, so a test can count the lines it wrote there.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path


def _take_terminal() -> None:
    # In the child, after setsid(): make the pty (already fd 0) the controlling terminal.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command running on a pty; ``close()`` (or the context manager) always stops it."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 stderr_on_terminal: bool = False) -> None:
        self.master, self.slave = os.openpty()
        self.output = b""
        self.proc = subprocess.Popen(
            argv, stdin=self.slave, stdout=self.slave,
            stderr=self.slave if stderr_on_terminal else subprocess.PIPE,
            start_new_session=True, preexec_fn=_take_terminal,
            env={**os.environ, **(env or {})},
        )

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.master, 4096)
        except OSError:
            return b""
        self.output += data
        return data

    def expect(self, text: str, timeout: float = 30.0) -> None:
        """Read the terminal until ``text`` appears (a prompt), else fail."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            gone = self.proc.poll() is not None and not self._read(0.1)
            if time.monotonic() > deadline or gone:
                raise AssertionError(f"{text!r} never appeared; the terminal showed "
                                     f"{self.output!r}")
            self._read(0.1)

    def type(self, data: str) -> None:
        """Type ``data`` as a person would (``\\n`` Enter, ``\\x04`` Ctrl-D, ``\\x03`` Ctrl-C)."""
        os.write(self.master, data.encode())

    def interrupt(self) -> None:
        """Send SIGINT to the child, as kill -INT would."""
        self.proc.send_signal(signal.SIGINT)

    def echo_is_on(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ECHO)

    def wait(self, timeout: float = 60.0) -> tuple[int, str]:
        """The exit status and what the child wrote on stderr."""
        _, err = self.proc.communicate(timeout=timeout)
        while self._read(0.05):
            pass
        return self.proc.returncode, (err or b"").decode(errors="replace")

    @classmethod
    def secretsctl(cls, socket: Path, *args: str, env: dict[str, str] | None = None) -> Terminal:
        """secretsctl on a pty, talking to the agent at ``socket``."""
        return cls([sys.executable, "-m", "homeagent_secrets.client.cli", "--socket", str(socket),
                    *args], env)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
