"""The OpenBao / HashiCorp Vault backend: KV version 2 behind the same socket API.

secretsd grows no replication of its own: a household that outgrows one
machine points every agent at one OpenBao cluster (integrated Raft storage).
Mapping: a secret is ``<mount>/data/<prefix><name>`` holding ``{"value": ...}``;
``store`` writes a new KV version, ``rotate`` writes with check-and-set against
the version it read (two agents rotating at once cannot overwrite each other:
the loser gets -32009), ``version: "previous"`` reads the version before the
current one, ``delete`` removes the metadata and every version, the kind lives
in custom metadata. Every HTTP call runs in a worker thread, each thread with
its own hvac client (its own keep-alive session).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from homeagent_secrets.protocol.errors import (
    BackendUnavailableError,
    ConflictError,
    LockedError,
    NotFoundError,
    SecretsError,
)
from homeagent_secrets.protocol.messages import DescribeResult, SecretResult
from homeagent_secrets.protocol.names import DEFAULT_KIND, KINDS
from homeagent_secrets.protocol.secret import Secret

from .backend import Backend, NameLocks, RecordExport

log = logging.getLogger(__name__)
T = TypeVar("T")
SEALED = "OpenBao is sealed: unseal it (`bao operator unseal`), then retry"


@dataclass(frozen=True)
class OpenBaoSettings:
    addresses: tuple[str, ...] = ("http://127.0.0.1:8200",)
    ca_file: str | None = None
    mount: str = "secret"
    prefix: str = "homeagent/"
    token_file: str | None = None
    token_credential: str | None = None  # a name in $CREDENTIALS_DIRECTORY
    approle_role_id: str | None = None
    approle_secret_id_file: str | None = None
    timeout: float = 5.0

    def __repr__(self) -> str:
        return f"OpenBaoSettings(addresses={self.addresses!r}, mount={self.mount!r}, prefix={self.prefix!r})"


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as exc:
        raise BackendUnavailableError(f"cannot read the OpenBao {what} file {path}: {exc.strerror}") from None
    if not text:
        raise BackendUnavailableError(f"the OpenBao {what} file {path} is empty")
    return text


def _epoch(rfc3339: str) -> float:
    """Seconds since the epoch from OpenBao's nanosecond RFC 3339 times."""
    if not rfc3339:
        return 0.0
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    stamp = datetime.fromisoformat(head + "+00:00")
    return stamp.timestamp() + (float("0." + frac) if frac else 0.0)


@dataclass
class _Auth:
    token: str | None = None
    expires: float | None = None  # monotonic time, None when it never expires
    ttl: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenBaoBackend(Backend):
    """Secrets in an OpenBao/Vault KV v2 engine."""

    name = "openbao"
    keeps_history = False  # the server numbers versions and stamps times itself
    _no_passphrase = (
        "OpenBao handles sealing and unsealing: use `bao operator unseal` instead of the agent passphrase"
    )

    def __init__(self, settings: OpenBaoSettings) -> None:
        self.s = settings
        self._local = threading.local()
        self._auth = _Auth()
        # hvac + requests cost ~1 ms of CPU per call under the GIL; on 2 cores 4
        # threads served 745 retrieves/s and 8-16 only 570-645/s (more switching).
        self._limiter = anyio.CapacityLimiter(4)
        self._locked_seen = False
        self._preferred = 0  # index of the address that answered last
        self._name_lock = NameLocks()  # this agent's writes; other agents meet check-and-set

    # --- HTTP plumbing (worker threads) ---------------------------------------------

    def _client(self, address: str) -> Any:
        import hvac

        clients: dict[str, Any] = getattr(self._local, "clients", None) or {}
        self._local.clients = clients
        client = clients.get(address)
        if client is None:
            import requests

            session = requests.Session()
            # No proxy or CA settings from the environment: the agent talks to the
            # addresses in its config, verified with its own CA file. (It also spares
            # requests a scan of os.environ on every call, a third of its CPU here.)
            session.trust_env = False
            client = clients[address] = hvac.Client(
                url=address, verify=self.s.ca_file or True, timeout=self.s.timeout, session=session
            )
        client.token = self._auth.token
        return client

    def _initial_token(self) -> str | None:
        if self.s.token_file:
            return _read_secret_file(self.s.token_file, "token")
        if self.s.token_credential:
            directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
            if not directory:
                raise BackendUnavailableError(
                    "openbao_token_credential needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"
                )
            return _read_secret_file(str(Path(directory) / self.s.token_credential), "token credential")
        return None

    def _login(self, client: Any) -> None:
        """Get a token: AppRole when configured, else the configured token."""
        auth = self._auth
        if self.s.approle_role_id and self.s.approle_secret_id_file:
            secret_id = _read_secret_file(self.s.approle_secret_id_file, "AppRole secret id")
            resp = client.auth.approle.login(role_id=self.s.approle_role_id, secret_id=secret_id)
            auth.token = resp["auth"]["client_token"]
            ttl = float(resp["auth"].get("lease_duration") or 0)
        else:
            auth.token = self._initial_token()
            if auth.token is None:
                raise BackendUnavailableError(
                    "no OpenBao credentials: set openbao_token_file, openbao_token_credential or "
                    "openbao_approle_role_id + openbao_approle_secret_id_file in the config"
                )
            client.token = auth.token
            ttl = float(client.auth.token.lookup_self()["data"].get("ttl") or 0)
        auth.ttl = ttl
        auth.expires = time.monotonic() + ttl if ttl > 0 else None
        client.token = auth.token

    def _fresh_token(self, client: Any) -> None:
        """Renew before a third of the TTL is left; log in again when renewal fails."""
        auth = self._auth
        with auth.lock:
            if auth.token is None:
                self._login(client)
                return
            if auth.expires is None or auth.expires - time.monotonic() > auth.ttl / 3:
                return
            try:
                resp = client.auth.token.renew_self()
                auth.ttl = float(resp["auth"].get("lease_duration") or auth.ttl)
                auth.expires = time.monotonic() + auth.ttl
                log.info("OpenBao token renewed for %.0f s", auth.ttl)
            except Exception as exc:
                log.warning("OpenBao token renewal failed (%s); logging in again", type(exc).__name__)
                self._login(client)

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` against the first address that answers."""
        import hvac.exceptions as hx
        import requests.exceptions as rx

        addresses = self.s.addresses
        order = [addresses[(self._preferred + i) % len(addresses)] for i in range(len(addresses))]
        problems: list[str] = []
        sealed = 0
        for address in order:
            client = self._client(address)
            try:
                self._fresh_token(client)
                client.token = self._auth.token
                try:
                    result = fn(client)
                except hx.Forbidden:
                    if not self.s.approle_role_id:
                        raise
                    with self._auth.lock:
                        self._login(client)  # the token was revoked or expired: once more
                    result = fn(client)
                self._preferred = addresses.index(address)
                return result
            except SecretsError:
                raise
            except hx.VaultDown:
                sealed += 1
                problems.append(f"{address}: sealed")
            except (rx.ConnectionError, rx.Timeout) as exc:
                problems.append(f"{address}: unreachable ({type(exc).__name__})")
            except (hx.InternalServerError, hx.BadGateway) as exc:
                problems.append(f"{address}: {type(exc).__name__} (no active node yet?)")
            except hx.Forbidden:
                raise BackendUnavailableError(
                    f"OpenBao refused to {what}: permission denied; check the token's or "
                    "AppRole's policy for the KV mount and prefix"
                ) from None
            except hx.InvalidRequest as exc:
                if "check-and-set" in str(exc):
                    raise ConflictError(
                        "the secret was changed by another agent since it was read: nothing was "
                        "overwritten; read it again and retry the rotate"
                    ) from None
                raise BackendUnavailableError(f"OpenBao rejected the request to {what}: {exc}") from None
        if sealed == len(order):
            raise LockedError(SEALED)
        raise BackendUnavailableError(
            f"OpenBao is unavailable, could not {what}: {'; '.join(problems)}; "
            "check the server addresses in the config and the cluster's health"
        )

    async def _run(self, what: str, fn: Callable[[Any], T]) -> T:
        try:
            result = await anyio.to_thread.run_sync(self._call, what, fn, limiter=self._limiter)
        except LockedError:
            self._locked_seen = True
            raise
        self._locked_seen = False
        return result

    def _path(self, name: str) -> str:
        return self.s.prefix + name

    # --- state ---------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._run("check its health", lambda c: c.auth.token.lookup_self())
            log.info("OpenBao backend on %s, mount %s, prefix %s",
                     ", ".join(self.s.addresses), self.s.mount, self.s.prefix)
        except SecretsError as exc:
            log.warning("%s; requests fail until OpenBao answers", exc.message)

    async def close(self) -> None:
        self._local = threading.local()

    @property
    def locked(self) -> bool:
        return self._locked_seen

    async def probe(self) -> None:
        def sealed(client: Any) -> bool:
            # The health endpoint answers 503 when sealed without raising: read its body.
            resp = client.sys.read_health_status(method="GET")
            data = resp if isinstance(resp, dict) else resp.json()
            return bool(data.get("sealed"))

        try:
            self._locked_seen = await self._run("check its seal state", sealed)
        except SecretsError:
            pass

    async def count(self) -> int | None:
        try:
            return len(await self.list(""))
        except SecretsError:
            return None

    # --- secrets ---------------------------------------------------------------------------

    def _metadata(self, client: Any, name: str) -> dict[str, Any] | None:
        import hvac.exceptions as hx

        try:
            data: dict[str, Any] = client.secrets.kv.v2.read_secret_metadata(
                self._path(name), mount_point=self.s.mount)["data"]
            return data
        except hx.InvalidPath:
            return None

    def _version(self, client: Any, name: str, version: int | None) -> str | None:
        import hvac.exceptions as hx

        try:
            resp = client.secrets.kv.v2.read_secret_version(
                self._path(name), version=version, mount_point=self.s.mount, raise_on_deleted_version=True)
        except hx.InvalidPath:
            return None
        value = (resp["data"].get("data") or {}).get("value")
        return value if isinstance(value, str) else None

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        def read(client: Any) -> SecretResult | None:
            meta = self._metadata(client, name)
            if meta is None:
                return None
            version = int(meta["current_version"]) - (1 if previous else 0)
            if version < 1 or not self._alive(meta, version):
                return None
            value = self._version(client, name, version)
            return None if value is None else SecretResult(name, Secret(value), version)

        if not previous:  # one round trip: the data read carries its version
            def current(client: Any) -> SecretResult | None:
                import hvac.exceptions as hx

                try:
                    resp = client.secrets.kv.v2.read_secret_version(
                        self._path(name), mount_point=self.s.mount, raise_on_deleted_version=True)
                except hx.InvalidPath:
                    return None
                value = (resp["data"].get("data") or {}).get("value")
                if not isinstance(value, str):
                    return None
                return SecretResult(name, Secret(value), int(resp["data"]["metadata"]["version"]))

            return await self._run("read a secret", current)
        return await self._run("read a secret", read)

    @staticmethod
    def _alive(meta: dict[str, Any], version: int) -> bool:
        v: dict[str, Any] = (meta.get("versions") or {}).get(str(version)) or {}
        return bool(v) and not v.get("destroyed") and not v.get("deletion_time")

    async def describe(self, name: str) -> DescribeResult | None:
        def read(client: Any) -> DescribeResult | None:
            meta = self._metadata(client, name)
            if meta is None or not int(meta.get("current_version") or 0):
                return None
            current = int(meta["current_version"])
            kind = (meta.get("custom_metadata") or {}).get("kind")
            if kind not in KINDS:  # set by another tool, or a store stopped before its metadata
                kind = DEFAULT_KIND
            return DescribeResult(name, kind, current, _epoch(meta["created_time"]),  # type: ignore[arg-type]
                                  _epoch(meta["updated_time"]),
                                  current > 1 and self._alive(meta, current - 1))

        return await self._run("read a secret's metadata", read)

    async def list(self, prefix: str) -> list[str]:
        import hvac.exceptions as hx

        def walk(client: Any) -> list[str]:
            names: list[str] = []
            folders = [""]
            while folders:
                folder = folders.pop()
                try:
                    keys = client.secrets.kv.v2.list_secrets(
                        self.s.prefix + folder, mount_point=self.s.mount)["data"]["keys"]
                except hx.InvalidPath:
                    continue
                for key in keys:
                    full = folder + key
                    if key.endswith("/"):
                        if full.startswith(prefix) or prefix.startswith(full):
                            folders.append(full)
                    elif full.startswith(prefix):
                        names.append(full)
            return sorted(names)

        return await self._run("list secrets", walk)

    def _write(self, client: Any, name: str, value: str, cas: int | None) -> int:
        resp = client.secrets.kv.v2.create_or_update_secret(
            self._path(name), secret={"value": value}, cas=cas, mount_point=self.s.mount)
        return int(resp["data"]["version"])

    def _set_kind(self, client: Any, name: str, kind: str) -> None:
        client.secrets.kv.v2.update_metadata(self._path(name), custom_metadata={"kind": kind},
                                             mount_point=self.s.mount)

    async def store(self, name: str, value: Secret, kind: str | None) -> int:
        def write(client: Any) -> int:
            version = self._write(client, name, value.reveal(), None)
            if kind is not None or version == 1:
                self._set_kind(client, name, kind or DEFAULT_KIND)
            return version

        async with self._name_lock(name):
            return await self._run("store a secret", write)

    async def current_version(self, name: str) -> int | None:
        """The current KV version of ``name`` (what ``rotate`` checks and sets against)."""
        def read(client: Any) -> int | None:
            meta = self._metadata(client, name)
            current = int(meta.get("current_version") or 0) if meta else 0
            return current if current and self._alive(meta, current) else None  # type: ignore[arg-type]

        return await self._run("read a secret's metadata", read)

    async def write_if_version(self, name: str, value: Secret, version: int) -> int:
        """Write a new version only if ``version`` is still current; ConflictError otherwise."""
        return await self._run("rotate a secret", lambda c: self._write(c, name, value.reveal(), version))

    async def rotate(self, name: str, value: Secret) -> int:
        async with self._name_lock(name):
            version = await self.current_version(name)
            if version is None:
                raise NotFoundError(f"no secret named {name!r} to rotate: store it first")
            return await self.write_if_version(name, value, version)

    async def delete(self, name: str) -> bool:
        def delete(client: Any) -> bool:
            if self._metadata(client, name) is None:
                return False
            client.secrets.kv.v2.delete_metadata_and_all_versions(self._path(name), mount_point=self.s.mount)
            return True

        async with self._name_lock(name):
            return await self._run("delete a secret", delete)

    async def export(self, name: str) -> RecordExport | None:
        info = await self.describe(name)
        current = await self.retrieve(name)
        if info is None or current is None:
            return None
        previous = await self.retrieve(name, previous=True)
        return RecordExport(current.value.reveal(), previous.value.reveal() if previous else None,
                            info.version, info.version - 1 if previous else 0, info.kind,
                            info.created, info.updated)

    async def import_(self, name: str, record: RecordExport) -> None:
        """Write the previous value, then the current one, then the kind.

        OpenBao numbers the versions and stamps the times itself, so only the
        values and the kind carry over (``keeps_history`` is False). Skips
        writes that would only repeat what is there, so a re-run adds no versions.
        """
        async with self._name_lock(name):
            existing = await self.export(name)
            if record.same_content(existing):
                return

            def write(client: Any) -> None:
                if record.previous is not None:
                    self._write(client, name, record.previous, None)
                self._write(client, name, record.current, None)
                self._set_kind(client, name, record.kind)

            await self._run("copy a secret", write)
