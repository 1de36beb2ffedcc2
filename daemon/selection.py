"""Which backend an installation uses: detected once, recorded, honoured.

The choice is written to ``<home>/backend`` once that backend has opened, and
read on every later start, so a machine whose D-Bus is not up yet at boot does
not silently switch to an empty file store (nor the reverse), and a backend
that could not even start (a missing optional package) is never recorded. An
explicit ``--backend`` that contradicts the record is refused; ``secretsctl
migrate`` moves secrets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from homeagent_secrets.protocol.names import BACKEND_NAMES

from .backends import atomicfile
from .backends.base import Backend
from .backends.datakey import KdfParams
from .backends.files import WRAPPED_KEY_FILE, FileBackend
from .settings import ConfigError, Settings

log = logging.getLogger(__name__)

RECORD_FILE: Final = "backend"


def read_record(home: Path) -> str | None:
    """The recorded backend, or None before the first start."""
    try:
        raw = atomicfile.read_regular(home / RECORD_FILE, 256, "the backend record")
    except FileNotFoundError:
        return None
    kind = raw.decode("utf-8", "replace").strip()
    if kind not in BACKEND_NAMES:
        raise ConfigError(f"{home / RECORD_FILE} names an unknown backend {kind[:20]!r}; "
                          f"write one of {', '.join(BACKEND_NAMES)} there")
    return kind


def write_record(home: Path, kind: str) -> None:
    atomicfile.ensure_private_dir(home)
    atomicfile.replace(home, RECORD_FILE, f"{kind}\n".encode(), "record the backend choice")


def choose(settings: Settings) -> tuple[str, str, bool]:
    """(backend kind, one-line reason, whether it is recorded already)."""
    home = settings.home_path
    recorded = read_record(home)
    asked = settings.backend_name
    if asked != "auto":
        if recorded is not None and recorded != asked:
            raise ConfigError(
                f"this agent's secrets are in the {recorded} backend (recorded in "
                f"{home / RECORD_FILE}); starting with --backend {asked} would hide them. "
                f"Start with --backend {recorded} (or auto), then move them with "
                f"`secretsctl migrate --to {asked}`"
            )
        return asked, "--backend " + asked, recorded is not None
    if recorded is not None:
        return recorded, f"recorded in {home / RECORD_FILE} at first start", True
    if os.path.lexists(home / "secrets" / WRAPPED_KEY_FILE):
        return "file", "an encrypted-file store already exists", False
    from .backends.keychain_store import probe_keychain

    problem = probe_keychain()
    if problem is None:
        return "keychain", "the OS keychain answered a probe write/read/delete", False
    return "file", problem, False  # it already says "no usable OS keychain" or why


def make_backend(kind: str, settings: Settings) -> Backend:
    """A backend object of ``kind`` for these settings (not yet opened)."""
    if kind == "file":
        return FileBackend(settings.home_path, KdfParams(log2_n=settings.scrypt_log2_n))
    try:
        if kind == "keychain":
            from .backends.keychain import KeychainBackend

            return KeychainBackend()
        if kind == "openbao":
            from .backends.openbao import OpenBaoBackend

            return OpenBaoBackend(settings)
    except ImportError as exc:
        extra = "openbao" if kind == "openbao" else "daemon"
        raise ConfigError(
            f"the {kind} backend needs the Python package {exc.name!r}, which is not installed: "
            f"pip install 'homeagent-secrets[{extra}]'"
        ) from None
    raise ConfigError(f"unknown backend {kind!r}")
