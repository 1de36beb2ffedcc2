"""secretsd settings: defaults, then the TOML config file, then flags."""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from homeagent_secrets.protocol.errors import SecretsError
from homeagent_secrets.protocol.framing import DEFAULT_MAX_FRAME
from homeagent_secrets.protocol.paths import default_home, default_socket_path

from .agent import DEFAULT_MAX_VALUE
from .datakey import DEFAULT_LOG2_N, MAX_LOG2_N, MIN_LOG2_N

BACKENDS = ("auto", "file", "keychain", "openbao", "vault")  # vault: an alias of openbao


class ConfigError(SecretsError):
    """A setting is wrong; the message names it and the allowed values."""


@dataclass(frozen=True)
class Config:
    home: Path
    socket: Path
    backend: str = "auto"
    log_level: str = "INFO"
    log_format: str = "text"
    scrypt_n: int = 1 << DEFAULT_LOG2_N
    max_frame: int = DEFAULT_MAX_FRAME
    max_value_bytes: int = DEFAULT_MAX_VALUE
    idle_timeout: float = 30.0
    max_connections: int = 256
    drain_timeout: float = 5.0
    lock_after: float = 0.0  # lock after this long without a request (0: never)
    max_unlocked: float = 0.0  # lock this long after unlock, used or not (0: never)
    maintenance_interval: float = 60.0  # re-tighten state file modes this often (s)
    # --- OpenBao / Vault backend ---
    openbao_address: tuple[str, ...] = ("http://127.0.0.1:8200",)
    openbao_ca_file: str | None = None
    openbao_mount: str = "secret"
    openbao_prefix: str = "homeagent/"
    openbao_token_file: str | None = None
    openbao_token_credential: str | None = None
    openbao_approle_role_id: str | None = None
    openbao_approle_secret_id_file: str | None = None
    openbao_timeout: float = 5.0

    @property
    def scrypt_log2_n(self) -> int:
        return self.scrypt_n.bit_length() - 1

    def check(self) -> None:
        n = self.scrypt_n
        if n < 1 << MIN_LOG2_N or n > 1 << MAX_LOG2_N or n & (n - 1):
            raise ConfigError(
                f"scrypt_n must be a power of two from 2^{MIN_LOG2_N} to 2^{MAX_LOG2_N} (got {n})"
            )
        if not self.openbao_address or not all(
            a.startswith(("http://", "https://")) for a in self.openbao_address
        ):
            raise ConfigError("openbao_address must be a list of http:// or https:// URLs")
        if self.openbao_prefix and not self.openbao_prefix.endswith("/"):
            raise ConfigError("openbao_prefix must end with '/' (e.g. \"homeagent/\")")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json (got {self.log_format!r})")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR (got {self.log_level!r})")
        for name in ("max_frame", "max_value_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer")
        if self.maintenance_interval <= 0:
            raise ConfigError("maintenance_interval must be a positive number of seconds")
        if self.lock_after < 0 or self.max_unlocked < 0:
            raise ConfigError("lock_after and max_unlocked are seconds, 0 meaning off")
        if self.idle_timeout <= 0 or self.drain_timeout < 0:
            raise ConfigError("idle_timeout must be positive and drain_timeout not negative")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="secretsd",
        description="homeagent secrets agent: serves JSON-RPC on a 0600 Unix socket (foreground).",
    )
    p.add_argument("--home", type=Path, help="state directory (default $HOMEAGENT_HOME or ~/.homeagent)")
    p.add_argument("--socket", type=Path, help="socket path (default: see README)")
    p.add_argument("--backend", choices=BACKENDS, help="storage backend (default auto)")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-format", choices=("text", "json"), help="log line format (default text)")
    p.add_argument("--scrypt-n", type=int, help="scrypt cost N used by a later init (default 2^17)")
    p.add_argument("--idle-timeout", type=float, help="close connections silent this long (s)")
    p.add_argument("--max-connections", type=int, help="connection cap (default 256)")
    p.add_argument("--openbao-address", action="append", metavar="URL",
                   help="OpenBao/Vault server address (repeat for a cluster)")
    p.add_argument("--openbao-token-file", metavar="FILE", help="file holding the OpenBao token")
    p.add_argument("--lock-after", type=float, metavar="SECONDS",
                   help="lock after this long without a request (default off)")
    p.add_argument("--max-unlocked", type=float, metavar="SECONDS",
                   help="lock this long after unlock, in use or not (default off)")
    return p


def load(argv: list[str] | None = None) -> Config:
    """Settings from defaults, ``--config`` TOML and flags, checked."""
    args = parser().parse_args(argv)
    file_values: dict[str, Any] = {}
    if args.config is not None:
        try:
            with open(args.config, "rb") as f:
                file_values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {args.config} is not valid TOML: {exc}") from None
        known = {f.name for f in fields(Config)}
        unknown = set(file_values) - known
        if unknown:
            raise ConfigError(
                f"unknown setting(s) in {args.config}: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
    flag_values = {
        k: v for k, v in vars(args).items() if v is not None and k != "config"
    }
    merged = {**file_values, **flag_values}
    if "openbao_address" in merged:
        addr = merged["openbao_address"]
        merged["openbao_address"] = (addr,) if isinstance(addr, str) else tuple(addr)
    if merged.get("backend") == "vault":
        merged["backend"] = "openbao"
    home = Path(merged.pop("home")).expanduser() if "home" in merged else default_home()
    sock = Path(merged.pop("socket")).expanduser() if "socket" in merged else default_socket_path(home)
    try:
        cfg = replace(Config(home=home, socket=sock), **merged)
    except TypeError as exc:
        raise ConfigError(f"bad setting: {exc}") from None
    cfg.check()
    return cfg
