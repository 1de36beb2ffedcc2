"""Secrets delivered to systemd services: the agent as a ``LoadCredential=`` source.

A unit with ``LoadCredential=hue_token:/run/homeagent/credentials.sock`` makes
systemd connect to this socket from an abstract address of the form
``\\0<random>/unit/<unit name>/<credential id>`` and read the credential's bytes
until EOF. The agent maps (unit, id) to a secret name with the rules file's
``[[credential]]`` entries and writes exactly the stored value's bytes.

Who asks: on systemd 252 the connecting process is not PID 1 but the child
PID 1 forked to start the unit, running as root inside the unit's own cgroup.
So the unit name in the address is believed only from uid 0 *and* from a
process that is PID 1 or sits in that very unit's cgroup (read through a
pidfd-checked /proc, see peer.py). Anyone else could bind such an address
itself; it gets nothing.

Refusing: systemd takes an empty answer (the peer closing at once) as an empty
credential and starts the unit. What makes it fail is more than its 1 MiB
credential limit: systemd 252 reads one byte past the limit and aborts the
unit at step CREDENTIALS ("Protocol error", status 243/CREDENTIALS; measured
in tests/test_credentials.py). So a request from systemd the agent cannot
serve (no mapping, agent locked, no such secret, a value over the limit, any
failure on the way) is answered with 1 MiB + 1 zero bytes, never a secret, and the agent logs which
unit, which credential and why.
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
from .audit import Outcome
from .faults import CONNECTION_ERROR_NAME, FAULTS
from .peer import Peer, peer_of

log = logging.getLogger(__name__)

#: systemd's address: a unit name (its characters) and a credential id (what systemd's
#: credential_name_valid() takes: printable ASCII but '/' and ':'). Nothing else passes,
#: so no peer's newline ever reaches a log line.
_REQUEST: Final = re.compile(
    rb"\x00[0-9a-f]+/unit/(?P<unit>[A-Za-z0-9:_.\\@-]{1,256})/(?P<id>[\x20-\x2e\x30-\x39\x3b-\x7e]{1,255})\Z")
#: systemd's CREDENTIAL_SIZE_MAX: a source sending more makes the unit fail to start.
SYSTEMD_CREDENTIAL_MAX: Final = 1 << 20
REFUSAL: Final = bytes(SYSTEMD_CREDENTIAL_MAX + 1)


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
                # Sending nothing would start the unit with an empty credential.
                log.exception("credential request failed; refused, the unit will not start")
                value = REFUSAL
            if value is not None:
                with anyio.move_on_after(10):
                    try:
                        await stream.send(value)
                    except (anyio.BrokenResourceError, OSError):
                        pass  # systemd stops reading once a refusal is over its limit

    async def _value_for(self, raw: socket.socket) -> bytes | None:
        peer = peer_of(raw)
        address = raw.getpeername()
        request = parse_request(address)
        if request is None:
            log.warning("credentials socket: a connection from %s (address %s) that is not a systemd "
                        "LoadCredential= request; nothing was sent", peer, ascii(address))
            return None
        unit, cred_id = request
        audited = Peer(peer.uid, peer.gid, peer.pid, unit)
        if peer.uid != 0 or (peer.pid != 1 and (peer.unit != unit or peer.manager is not None)):
            log.warning("credentials socket: %s claims to be %s asking for %r, but only systemd "
                        "starting that unit is believed; nothing was sent", peer, unit, cred_id)
            self.agent.audit.record(audited, "credential", None, "denied", -32010)
            return None
        name = self.agent.policy.credential_name(unit, cred_id)
        if FAULTS and "connection-error" in FAULTS and name == CONNECTION_ERROR_NAME:
            raise MemoryError("injected by HOMEAGENT_FAULT")
        if name is None:
            return self._refuse(audited, cred_id, None, "no [[credential]] in the rules maps it to a "
                                "secret", "not_found", -32004)
        try:
            found = await self.agent.backend.retrieve(name)
        except SecretsError as exc:
            return self._refuse(audited, cred_id, name, exc.message, "error", exc.code)
        if found is None:
            return self._refuse(audited, cred_id, name, "that secret does not exist", "not_found", -32004)
        value = found.value.reveal().encode("utf-8")
        if len(value) > SYSTEMD_CREDENTIAL_MAX:
            return self._refuse(audited, cred_id, name, f"the value is {len(value)} bytes, over "
                                "systemd's 1 MiB credential limit", "error", -32007)
        log.info("delivered credential %r to %s (secret %s)", cred_id, unit, name)
        self.agent.audit.record(audited, "credential", name, "ok", None)
        return value

    def _refuse(self, peer: Peer, cred_id: str, name: str | None, why: str, outcome: Outcome,
                code: int) -> bytes:
        """Make systemd fail the unit's start (see the module's docstring), and say why."""
        log.error("credential %r for %s%s: %s; refused, the unit will not start (systemd reports "
                  "status 243/CREDENTIALS)", cred_id, peer.unit, f" (secret {name})" if name else "",
                  why)
        self.agent.audit.record(peer, "credential", name, outcome, code)
        return REFUSAL
