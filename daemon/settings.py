"""secretsd settings: one typed struct, decoded by msgspec from the TOML config,
with the command-line flags applied on top.

A wrong type, an out-of-range value or an unknown key is one line naming the
file (or flag), the key and the problem, never a traceback. Closed sets
(backends, log levels) are Literals, so the error lists what is allowed.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from homeagent_secrets.protocol.errors import SecretsError
from homeagent_secrets.protocol.framing import DEFAULT_MAX_FRAME
from homeagent_secrets.protocol.paths import default_home, default_socket_path

from .backends.datakey import DEFAULT_LOG2_N, MAX_LOG2_N, MIN_LOG2_N

BackendChoice = Literal["auto", "file", "keychain", "openbao", "vault"]  # vault: an alias of openbao
BACKEND_CHOICES: Final = ("auto", "file", "keychain", "openbao", "vault")
DEFAULT_MAX_VALUE: Final = 64 * 1024
#: Hard ceilings: a record stays under the file backend's 16 MiB limit.
MAX_VALUE_CEILING: Final = 4 << 20
MAX_FRAME_CEILING: Final = 16 << 20

Seconds = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class ConfigError(SecretsError):
    """A setting is wrong; the message names it and the allowed values."""


class OpenBaoOptions(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The OpenBao/Vault backend's settings, declared once (the backend takes this struct)."""

    openbao_address: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["http://127.0.0.1:8200"])
    openbao_ca_file: str | None = None
    openbao_mount: str = "secret"
    openbao_prefix: str = "homeagent/"
    openbao_token_file: str | None = None
    openbao_token_credential: str | None = None  # a file name in $CREDENTIALS_DIRECTORY
    openbao_approle_role_id: str | None = None
    openbao_approle_secret_id_file: str | None = None
    openbao_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    #: How often, while anyone watches, changes made by other agents are looked for.
    openbao_watch_interval: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 5.0

    def __post_init__(self) -> None:
        if not all(a.startswith(("http://", "https://")) for a in self.openbao_address):
            raise ValueError("must be a list of http:// or https:// URLs - at `$.openbao_address`")
        if self.openbao_prefix and not self.openbao_prefix.endswith("/"):
            raise ValueError("must end with '/' (e.g. \"homeagent/\") - at `$.openbao_prefix`")

    def __repr__(self) -> str:  # file names only; nothing secret lives here, but stay terse
        return f"OpenBaoOptions(address={self.openbao_address!r}, mount={self.openbao_mount!r})"


class Settings(OpenBaoOptions, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Everything secretsd can be told, with its type and range."""

    home: str | None = None
    socket: str | None = None
    backend: BackendChoice = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    scrypt_n: Annotated[int, msgspec.Meta(ge=1 << MIN_LOG2_N, le=1 << MAX_LOG2_N)] = 1 << DEFAULT_LOG2_N
    max_frame: Annotated[int, msgspec.Meta(ge=4096, le=MAX_FRAME_CEILING)] = DEFAULT_MAX_FRAME
    max_value_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_VALUE_CEILING)] = DEFAULT_MAX_VALUE
    idle_timeout: PositiveSeconds = 30.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 256
    drain_timeout: Seconds = 5.0
    lock_after: Seconds = 0.0  # lock after this long without a use of the key (0: never)
    max_unlocked: Seconds = 0.0  # lock this long after unlock, used or not (0: never)
    maintenance_interval: PositiveSeconds = 60.0  # re-tighten state file modes this often
    # --- access rules, access log, credentials for systemd units ---
    policy_file: str | None = None  # the rules (policy.py); reloaded on SIGHUP
    socket_group: str | None = None  # the socket 0660 (its directory 0750) with this group
    audit_log: str | None = None  # JSON lines, one per call (audit.py); reopened on SIGHUP
    credentials_socket: str | None = None  # where systemd's LoadCredential= connects

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.scrypt_n
        if n & (n - 1):
            raise ValueError(f"must be a power of two (got {n}) - at `$.scrypt_n`")

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser() if self.home else default_home()

    @property
    def socket_path(self) -> Path:
        return Path(self.socket).expanduser() if self.socket else default_socket_path(self.home_path)

    @property
    def backend_name(self) -> str:
        """The backend asked for, with ``vault`` read as ``openbao``."""
        return "openbao" if self.backend == "vault" else self.backend

    @property
    def scrypt_log2_n(self) -> int:
        return self.scrypt_n.bit_length() - 1


_FIELDS: Final = frozenset(Settings.__struct_fields__)
_AT = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?:\.(?P<key>[A-Za-z0-9_]+))?(?P<rest>[^`]*)`)?$")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")


def _choices(key: str) -> tuple[str, ...]:
    import typing

    hint = typing.get_type_hints(Settings).get(key)
    return tuple(str(a) for a in typing.get_args(hint)) if typing.get_origin(hint) is Literal else ()


def _problem(exc: msgspec.ValidationError) -> tuple[str | None, str]:
    """(key, problem) from msgspec's message, e.g. "Expected `int`, got `str` - at `$.x`"."""
    text = str(exc)
    unknown = _UNKNOWN.search(text)
    if unknown:
        return unknown["key"], f"unknown setting; the known ones are: {', '.join(sorted(_FIELDS))}"
    m = _AT.match(text)
    if m is None or m["key"] is None:
        return None, text
    problem = m["problem"][:1].lower() + m["problem"][1:]
    if problem.startswith("invalid enum value") and _choices(m["key"]):
        problem = f"{problem}; use one of {', '.join(_choices(m['key']))}"
    return m["key"], problem.replace("`", "")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="secretsd",
        description="homeagent secrets agent: serves JSON-RPC on a 0600 Unix socket (foreground).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--home", help="state directory (default $HOMEAGENT_HOME or ~/.homeagent)")
    p.add_argument("--socket", help="socket path (default: see README)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, help="storage backend (default auto)")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--log-level", type=str.upper, help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-format", choices=("text", "json"), help="log line format (default text)")
    p.add_argument("--scrypt-n", type=int, help="scrypt cost N used by a later init (default 2^17)")
    p.add_argument("--idle-timeout", type=float, help="close connections silent this long (s)")
    p.add_argument("--max-connections", type=int, help="connection cap (default 256)")
    p.add_argument("--openbao-address", action="append", metavar="URL",
                   help="OpenBao/Vault server address (repeat for a cluster)")
    p.add_argument("--openbao-token-file", metavar="FILE", help="file holding the OpenBao token")
    p.add_argument("--policy", dest="policy_file", metavar="FILE",
                   help="access rules (TOML); reloaded on SIGHUP")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="make the socket 0660 for this group (its directory 0750)")
    p.add_argument("--audit-log", metavar="FILE", help="append one JSON line per call to FILE")
    p.add_argument("--credentials-socket", metavar="PATH",
                   help="serve systemd LoadCredential= requests on this socket")
    p.add_argument("--lock-after", type=float, metavar="SECONDS",
                   help="lock after this long without a use of the key (default off)")
    p.add_argument("--max-unlocked", type=float, metavar="SECONDS",
                   help="lock this long after unlock, in use or not (default off)")
    return p


def _version() -> str:
    from homeagent_secrets.protocol import __version__

    return __version__


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def from_mapping(values: dict[str, Any], origin: str = "config") -> Settings:
    """Settings from a mapping (a TOML document); ConfigError names ``origin:key``."""
    if isinstance(values.get("openbao_address"), str):  # one address may be given bare
        values = {**values, "openbao_address": [values["openbao_address"]]}
    try:
        return msgspec.convert(values, Settings)
    except msgspec.ValidationError as exc:
        key, problem = _problem(exc)
        raise ConfigError(f"{origin}:{key or '?'}: {problem}") from None


def load(argv: list[str] | None = None) -> Settings:
    """Settings from defaults, ``--config`` TOML and flags, checked."""
    args = parser().parse_args(argv)
    file_values: dict[str, Any] = {}
    if args.config is not None:
        file_values = _read_toml(args.config)
        from_mapping(file_values, str(args.config))  # the file alone must be valid
    flags = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    try:
        return msgspec.convert({**file_values, **flags}, Settings)
    except msgspec.ValidationError as exc:
        key, problem = _problem(exc)
        where = _flag(key) if key in flags else f"{args.config}:{key}"
        raise ConfigError(f"{where}: {problem}") from None
