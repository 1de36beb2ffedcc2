"""Where the agent keeps its state and its socket (read from the environment only).

The daemon and every client use these same rules, so whatever context they
run in (a desktop shell with ``XDG_RUNTIME_DIR``, cron or sudo without it, a
system service) they meet at one socket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

#: Where the system service's socket is (systemd/secretsd.socket).
SYSTEM_SOCKET: Final = Path("/run/homeagent/secretsd.sock")


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """``$HOMEAGENT_HOME``, else ``~/.homeagent``."""
    env = os.environ if env is None else env
    if env.get("HOMEAGENT_HOME"):
        return Path(env["HOMEAGENT_HOME"]).expanduser()
    return Path("~/.homeagent").expanduser()


def default_socket_path(
    home: Path | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """Where a daemon listens: ``$HOMEAGENT_SECRETS_SOCKET``, else
    ``$XDG_RUNTIME_DIR/homeagent/secretsd.sock``, else ``<home>/run/secretsd.sock``."""
    env = os.environ if env is None else env
    if env.get("HOMEAGENT_SECRETS_SOCKET"):
        return Path(env["HOMEAGENT_SECRETS_SOCKET"]).expanduser()
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "homeagent" / "secretsd.sock"
    return (home or default_home(env)) / "run" / "secretsd.sock"


def socket_candidates(home: Path | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where a client looks, in order: ``$HOMEAGENT_SECRETS_SOCKET`` alone when set;
    else the user's socket under ``$XDG_RUNTIME_DIR``, the one under ``<home>/run``
    (a daemon started without ``XDG_RUNTIME_DIR``), then the system service's."""
    env = os.environ if env is None else env
    if env.get("HOMEAGENT_SECRETS_SOCKET"):
        return [Path(env["HOMEAGENT_SECRETS_SOCKET"]).expanduser()]
    found: list[Path] = []
    if env.get("XDG_RUNTIME_DIR"):
        found.append(Path(env["XDG_RUNTIME_DIR"]) / "homeagent" / "secretsd.sock")
    found.append((home or default_home(env)) / "run" / "secretsd.sock")
    found.append(SYSTEM_SOCKET)
    return found


def discover_socket(home: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The first candidate that exists, else the first one (named in the error)."""
    candidates = socket_candidates(home, env)
    for path in candidates:
        try:
            os.lstat(path)
        except PermissionError:
            return path  # there, but not for us: the connect error will say so
        except OSError:
            continue
        return path
    return candidates[0]
