"""Where the agent keeps its state and its socket (read from the environment only)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def default_home(env: Mapping[str, str] | None = None) -> Path:
    """``$HOMEAGENT_HOME``, else ``~/.homeagent``."""
    env = os.environ if env is None else env
    if env.get("HOMEAGENT_HOME"):
        return Path(env["HOMEAGENT_HOME"]).expanduser()
    return Path("~/.homeagent").expanduser()


def default_socket_path(
    home: Path | None = None, env: Mapping[str, str] | None = None
) -> Path:
    """``$HOMEAGENT_SECRETS_SOCKET``, else ``$XDG_RUNTIME_DIR/homeagent/secretsd.sock``,
    else ``<home>/run/secretsd.sock``: the same discovery for daemon and clients."""
    env = os.environ if env is None else env
    if env.get("HOMEAGENT_SECRETS_SOCKET"):
        return Path(env["HOMEAGENT_SECRETS_SOCKET"]).expanduser()
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "homeagent" / "secretsd.sock"
    return (home or default_home(env)) / "run" / "secretsd.sock"
