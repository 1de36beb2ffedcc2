"""The OpenBao / HashiCorp Vault HTTP client under the OpenBao backend.

Per worker thread one hvac client (one keep-alive session) per address; the
token from a file, a systemd credential or an AppRole login, renewed when a
third of its TTL is left; and ``call``, which runs one request against the
first address that answers and maps hvac's and requests' errors onto ours
(sealed -> -32001, unreachable -> -32006, check-and-set lost -> -32009).
The KV mapping lives in ``openbao.py``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from homeagent_secrets.protocol.errors import (
    BackendUnavailableError,
    ConflictError,
    LockedError,
    SecretsError,
)

from ..settings import OpenBaoOptions

log = logging.getLogger(__name__)
T = TypeVar("T")
SEALED: Final = "OpenBao is sealed: unseal it (`bao operator unseal`), then retry"


def _read_secret_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as exc:
        raise BackendUnavailableError(f"cannot read the OpenBao {what} file {path}: {exc.strerror}") from None
    if not text:
        raise BackendUnavailableError(f"the OpenBao {what} file {path} is empty")
    return text


@dataclass
class _Auth:
    token: str | None = None
    expires: float | None = None  # monotonic time, None when it never expires
    ttl: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenBaoClient:
    """Blocking calls to an OpenBao cluster (run them in worker threads)."""

    def __init__(self, settings: OpenBaoOptions) -> None:
        import hvac  # noqa: F401  # fail at construction when the extra is missing

        self.s = settings
        self._local = threading.local()
        self._auth = _Auth()
        self._preferred = 0  # index of the address that answered last

    def reset(self) -> None:
        """Drop every thread's sessions (they reconnect on the next call)."""
        self._local = threading.local()

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
                url=address, verify=self.s.openbao_ca_file or True, session=session,
                # types-hvac says int; hvac hands the timeout to requests, which takes float seconds.
                timeout=self.s.openbao_timeout,  # type: ignore[arg-type]
            )
        client.token = self._auth.token
        return client

    def _initial_token(self) -> str | None:
        if self.s.openbao_token_file:
            return _read_secret_file(self.s.openbao_token_file, "token")
        if self.s.openbao_token_credential:
            directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
            if not directory:
                raise BackendUnavailableError(
                    "openbao_token_credential needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"
                )
            return _read_secret_file(str(Path(directory) / self.s.openbao_token_credential), "token credential")
        return None

    def _login(self, client: Any) -> None:
        """Get a token: AppRole when configured, else the configured token."""
        auth = self._auth
        if self.s.openbao_approle_role_id and self.s.openbao_approle_secret_id_file:
            secret_id = _read_secret_file(self.s.openbao_approle_secret_id_file, "AppRole secret id")
            resp = client.auth.approle.login(role_id=self.s.openbao_approle_role_id, secret_id=secret_id)
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

    def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` against the first address that answers."""
        import hvac.exceptions as hx
        import requests.exceptions as rx

        addresses = self.s.openbao_address
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
                    if not self.s.openbao_approle_role_id:
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

