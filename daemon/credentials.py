"""Secrets delivered to systemd services: the agent as a ``LoadCredential=`` source.

A unit with ``LoadCredential=hue_token:/run/homeagent/credentials.sock`` makes
systemd connect to this socket from an abstract address of the form
``\\0<random>/unit/<unit name>/<credential id>`` and read the credential's bytes
until EOF. The agent maps (unit, id) to a secret name with the rules file's
``[[credential]]`` entries and writes exactly the stored value's bytes.

The unit name in that address is trusted only from root (uid 0): any other
process could bind such an address itself. A request the agent cannot serve
(not from root, no mapping, agent locked, no such secret) gets no value and a
journal line naming the unit, the credential and the reason.
"""

from __future__ import annotations

import logging
import re
import socket
from typing import Final

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, TaskStatus

from homeagent_secrets.protocol.errors import SecretsError

from .agent import Agent
from .peer import Peer, peer_of

log = logging.getLogger(__name__)

_REQUEST: Final = re.compile(rb"\x00[0-9a-f]+/unit/(?P<unit>[^/\x00]+)/(?P<id>[^/\x00]+)\Z")


def parse_request(address: bytes | str) -> tuple[str, str] | None:
    """(unit, credential id) from a peer's abstract address, or None."""
    raw = address.encode("utf-8", "surrogateescape") if isinstance(address, str) else address
    m = _REQUEST.match(raw)
    if m is None:
        return None
    return m["unit"].decode("utf-8", "replace"), m["id"].decode("utf-8", "replace")


class CredentialServer:
    """Answers systemd's credential requests on their own listening socket."""

    def __init__(self, agent: Agent, sock: socket.socket) -> None:
        self.agent = agent
        self.sock = sock

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.abc.SocketListener.from_socket(self.sock)
        async with anyio.create_task_group() as tg, listener:
            task_status.started()
            while True:
                stream = await listener.accept()
                tg.start_soon(self._handle, stream)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
            try:
                value = await self._value_for(raw)
            except Exception:
                log.exception("credential request failed; nothing was sent")
                return
            if value is not None:
                with anyio.move_on_after(10):
                    await stream.send(value)

    async def _value_for(self, raw: socket.socket) -> bytes | None:
        peer = peer_of(raw)
        request = parse_request(raw.getpeername())
        if request is None:
            log.warning("credentials socket: a connection from %s that is not a systemd "
                        "LoadCredential= request; nothing was sent", peer)
            return None
        unit, cred_id = request
        audited = Peer(peer.uid, peer.gid, peer.pid, unit)
        if peer.uid != 0:
            log.warning("credentials socket: %s claims to be %s asking for %r, but only root "
                        "(systemd) is believed; nothing was sent", peer, unit, cred_id)
            self.agent.audit.record(audited, "credential", None, "denied", -32010)
            return None
        name = self.agent.policy.credential_name(unit, cred_id)
        if name is None:
            log.error("credential %r for %s: no [[credential]] in the rules maps it to a secret; "
                      "nothing was sent and the unit does not get it", cred_id, unit)
            self.agent.audit.record(audited, "credential", None, "not_found", -32004)
            return None
        try:
            found = await self.agent.backend.retrieve(name)
        except SecretsError as exc:
            log.error("credential %r for %s (secret %s): %s; nothing was sent", cred_id, unit, name,
                      exc.message)
            self.agent.audit.record(audited, "credential", name, "error", exc.code)
            return None
        if found is None:
            log.error("credential %r for %s: the secret %s does not exist; nothing was sent",
                      cred_id, unit, name)
            self.agent.audit.record(audited, "credential", name, "not_found", -32004)
            return None
        log.info("delivered credential %r to %s (secret %s)", cred_id, unit, name)
        self.agent.audit.record(audited, "credential", name, "ok", None)
        return found.value.reveal().encode("utf-8")
