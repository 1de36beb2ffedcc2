"""Which backend an installation uses: detected once, recorded, honoured.

The choice is written to ``<home>/backend`` on first start and read on every
later one, so a machine whose D-Bus is not up yet at boot does not silently
switch to an empty file store (nor the reverse). An explicit ``--backend``
that contradicts the record is refused; ``secretsctl migrate`` moves secrets.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from homeagent_secrets.protocol.errors import SecretsError

from . import atomicfile
from .backend import Backend
from .config import Config, ConfigError
from .datakey import KdfParams
from .filestore import WRAPPED_KEY_FILE, FileBackend, ensure_private_dir

log = logging.getLogger(__name__)

RECORD_FILE: Final = "backend"
KINDS: Final = ("file", "keychain", "openbao")


def read_record(home: Path) -> str | None:
    """The recorded backend, or None before the first start."""
    try:
        kind = (home / RECORD_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if kind not in KINDS:
        raise ConfigError(f"{home / RECORD_FILE} names an unknown backend {kind!r}; "
                          f"write one of {', '.join(KINDS)} there")
    return kind


def write_record(home: Path, kind: str) -> None:
    ensure_private_dir(home)
    atomicfile.replace(home, RECORD_FILE, f"{kind}\n".encode(), "record the backend choice")


def choose(cfg: Config) -> tuple[str, str]:
    """(backend kind, one-line reason), recording a first choice."""
    recorded = read_record(cfg.home)
    if cfg.backend != "auto":
        if recorded is not None and recorded != cfg.backend:
            raise ConfigError(
                f"this agent's secrets are in the {recorded} backend (recorded in "
                f"{cfg.home / RECORD_FILE}); starting with --backend {cfg.backend} would hide them. "
                f"Start with --backend {recorded} (or auto), then move them with "
                f"`secretsctl migrate --to {cfg.backend}`"
            )
        kind, reason = cfg.backend, "--backend " + cfg.backend
    elif recorded is not None:
        kind, reason = recorded, f"recorded in {cfg.home / RECORD_FILE} at first start"
    elif (cfg.home / "secrets" / WRAPPED_KEY_FILE).exists():
        kind, reason = "file", "an encrypted-file store already exists"
    else:
        from .keychain import probe_keychain

        problem = probe_keychain()
        if problem is None:
            kind, reason = "keychain", "the OS keychain answered a probe write/read/delete"
        else:
            kind, reason = "file", problem  # it already says "no usable OS keychain" or why
    if recorded is None:
        write_record(cfg.home, kind)
    return kind, reason


def make_backend(kind: str, cfg: Config) -> Backend:
    """A backend object of ``kind`` for these settings (not yet opened)."""
    if kind == "file":
        return FileBackend(cfg.home, KdfParams(log2_n=cfg.scrypt_log2_n))
    if kind == "keychain":
        from .keychain import KeychainBackend

        return KeychainBackend()
    if kind == "openbao":
        from .openbao import OpenBaoBackend, OpenBaoSettings

        return OpenBaoBackend(OpenBaoSettings(
            addresses=cfg.openbao_address, ca_file=cfg.openbao_ca_file, mount=cfg.openbao_mount,
            prefix=cfg.openbao_prefix, token_file=cfg.openbao_token_file,
            token_credential=cfg.openbao_token_credential, approle_role_id=cfg.openbao_approle_role_id,
            approle_secret_id_file=cfg.openbao_approle_secret_id_file, timeout=cfg.openbao_timeout,
        ))
    raise SecretsError(f"unknown backend {kind!r}")
