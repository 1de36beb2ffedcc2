"""The OpenBao / HashiCorp Vault backend: KV version 2 behind the same socket API.

secretsd grows no replication of its own: a household that outgrows one
machine points every agent at one OpenBao cluster (integrated Raft storage).
Mapping: a secret is ``<mount>/data/<prefix><name>`` holding ``{"value": ...}``;
``store`` writes a new KV version, ``rotate`` writes with check-and-set against
the version it read (two agents rotating at once cannot overwrite each other:
the loser gets -32009), ``version: "previous"`` reads the version before the
current one, ``delete`` removes the metadata and every version, the kind lives
in custom metadata. HTTP, authentication and failover are ``openbao_client.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from homeagent_secrets.protocol.errors import SecretsError
from homeagent_secrets.protocol.messages import DescribeResult, SecretResult
from homeagent_secrets.protocol.names import DEFAULT_KIND, as_kind, name_problem
from homeagent_secrets.protocol.secret import Secret

from ..settings import OpenBaoOptions
from .base import RecordExport, ThreadedBackend
from .openbao_client import OpenBaoClient

log = logging.getLogger(__name__)
T = TypeVar("T")


def _epoch(rfc3339: str) -> float:
    """Seconds since the epoch from OpenBao's nanosecond RFC 3339 times."""
    if not rfc3339:
        return 0.0
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    stamp = datetime.fromisoformat(head + "+00:00")
    return stamp.timestamp() + (float("0." + frac) if frac else 0.0)


def _alive(meta: dict[str, Any], version: int) -> bool:
    v: dict[str, Any] = (meta.get("versions") or {}).get(str(version)) or {}
    return bool(v) and not v.get("destroyed") and not v.get("deletion_time")


class OpenBaoBackend(ThreadedBackend):
    """Secrets in an OpenBao/Vault KV v2 engine."""

    name = "openbao"
    keeps_history = False  # the server numbers versions and stamps times itself
    # hvac + requests cost ~1 ms of CPU per call under the GIL; on 2 cores 4
    # threads served 745 retrieves/s and 8-16 only 570-645/s (more switching).
    threads = 4
    no_passphrase_message = (
        "OpenBao handles sealing and unsealing: use `bao operator unseal` instead of the agent passphrase"
    )

    def __init__(self, settings: OpenBaoOptions) -> None:
        super().__init__()
        self.s = settings
        self.client = OpenBaoClient(settings)
        self._skipped: set[str] = set()  # invalid names seen under the prefix, logged once

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        return self.client.call(what, lambda c: fn(c, *args))

    def _path(self, name: str) -> str:
        return self.s.openbao_prefix + name

    @property
    def _mount(self) -> str:
        return self.s.openbao_mount

    # --- state ---------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._run("check its health", lambda c: c.auth.token.lookup_self())
            self.reachable = True
            log.info("OpenBao backend on %s, mount %s, prefix %s",
                     ", ".join(self.s.openbao_address), self._mount, self.s.openbao_prefix)
        except SecretsError as exc:
            self.reachable = exc.code == -32001  # sealed: the cluster is there
            log.warning("%s; requests fail until OpenBao answers", exc.message)

    async def close(self) -> None:
        self.client.reset()

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

    # --- KV helpers (worker threads) ------------------------------------------------------

    def _metadata(self, client: Any, name: str) -> dict[str, Any] | None:
        import hvac.exceptions as hx

        try:
            data: dict[str, Any] = client.secrets.kv.v2.read_secret_metadata(
                self._path(name), mount_point=self._mount)["data"]
            return data
        except hx.InvalidPath:
            return None

    def _version(self, client: Any, name: str, version: int | None) -> tuple[str, int] | None:
        import hvac.exceptions as hx

        try:
            resp = client.secrets.kv.v2.read_secret_version(
                self._path(name), version=version, mount_point=self._mount,
                raise_on_deleted_version=True)
        except hx.InvalidPath:
            return None
        value = (resp["data"].get("data") or {}).get("value")
        if not isinstance(value, str):
            return None
        return value, int(resp["data"]["metadata"]["version"])

    def _write(self, client: Any, name: str, value: str, cas: int | None) -> int:
        resp = client.secrets.kv.v2.create_or_update_secret(
            self._path(name), secret={"value": value}, cas=cas, mount_point=self._mount)
        return int(resp["data"]["version"])

    def _set_kind(self, client: Any, name: str, kind: str) -> None:
        client.secrets.kv.v2.update_metadata(self._path(name), custom_metadata={"kind": kind},
                                             mount_point=self._mount)

    # --- reads -------------------------------------------------------------------------

    async def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        def current(client: Any) -> SecretResult | None:
            found = self._version(client, name, None)  # one round trip: the read carries its version
            return None if found is None else SecretResult(name, Secret(found[0]), found[1])

        def before(client: Any) -> SecretResult | None:
            meta = self._metadata(client, name)
            if meta is None:
                return None
            version = int(meta["current_version"]) - 1
            if version < 1 or not _alive(meta, version):
                return None
            found = self._version(client, name, version)
            return None if found is None else SecretResult(name, Secret(found[0]), version)

        return await self._run("read a secret", before if previous else current)

    async def describe(self, name: str) -> DescribeResult | None:
        def read(client: Any) -> DescribeResult | None:
            meta = self._metadata(client, name)
            if meta is None or not int(meta.get("current_version") or 0):
                return None
            current = int(meta["current_version"])
            # set by another tool, or a store stopped before its metadata: the default
            kind = as_kind(str((meta.get("custom_metadata") or {}).get("kind")))
            return DescribeResult(name, kind, current, _epoch(meta["created_time"]),
                                  _epoch(meta["updated_time"]),
                                  current > 1 and _alive(meta, current - 1))

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
                        self.s.openbao_prefix + folder, mount_point=self._mount)["data"]["keys"]
                except hx.InvalidPath:
                    continue
                for key in keys:
                    full = folder + key
                    if key.endswith("/"):
                        if full.startswith(prefix) or prefix.startswith(full):
                            folders.append(full)
                    elif full.startswith(prefix):
                        if name_problem(full) is None:
                            names.append(full)
                        elif full not in self._skipped:
                            # Written by another client of the server: no request could
                            # name it (nor `secretsctl rm` remove it); left alone.
                            self._skipped.add(full)
                            log.warning("OpenBao key %s under %s is not a valid secret name; "
                                        "ignored (rename or remove it with `bao kv`)",
                                        ascii(full)[:80], self.s.openbao_prefix)
            return sorted(names)

        return await self._run("list secrets", walk)

    async def versions(self) -> dict[str, int] | None:
        names = await self.list("")

        def read(client: Any) -> dict[str, int]:
            found: dict[str, int] = {}
            for name in names:
                meta = self._metadata(client, name)
                current = int(meta.get("current_version") or 0) if meta else 0
                if meta and current and _alive(meta, current):
                    found[name] = current
            return found

        return await self._run("read the secrets' versions", read)

    async def export(self, name: str) -> RecordExport | None:
        info = await self.describe(name)
        current = await self.retrieve(name)
        if info is None or current is None:
            return None
        previous = await self.retrieve(name, previous=True)
        return RecordExport(current.value.reveal(), previous.value.reveal() if previous else None,
                            info.version, info.version - 1 if previous else 0, info.kind,
                            info.created, info.updated)

    # --- writes (the base class holds the name's lock) --------------------------------------

    async def _head(self, name: str) -> int | None:
        def read(client: Any) -> int | None:
            meta = self._metadata(client, name)
            current = int(meta.get("current_version") or 0) if meta else 0
            return current if meta and current and _alive(meta, current) else None

        return await self._run("read a secret's metadata", read)

    async def _put(self, name: str, value: Secret, kind: str | None, expect: int | None) -> int:
        # A rotate checks and sets against the version it read: another agent's
        # write in between makes it fail (-32009) instead of being overwritten.
        def write(client: Any) -> int:
            version = self._write(client, name, value.reveal(), expect)
            if kind is not None or version == 1:
                self._set_kind(client, name, kind or DEFAULT_KIND)
            return version

        return await self._run("write a secret", write)

    async def _remove(self, name: str, force: bool) -> bool:
        def delete(client: Any) -> bool:
            if self._metadata(client, name) is None:
                return False
            client.secrets.kv.v2.delete_metadata_and_all_versions(self._path(name),
                                                                  mount_point=self._mount)
            return True

        return await self._run("delete a secret", delete)

    async def _import(self, name: str, record: RecordExport) -> None:
        """Write the previous value, then the current one, then the kind.

        OpenBao numbers the versions and stamps the times itself, so only the
        values and the kind carry over (``keeps_history`` is False). Skips
        writes that would only repeat what is there, so a re-run adds no versions.
        """
        if record.same_content(await self.export(name)):
            return

        def write(client: Any) -> None:
            if record.previous is not None:
                self._write(client, name, record.previous, None)
            self._write(client, name, record.current, None)
            self._set_kind(client, name, record.kind)

        await self._run("copy a secret", write)
