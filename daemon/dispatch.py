"""From a parsed message to the bytes of its answer, through the agent.

Shared by the socket server and by the in-memory tests (h11's ConnectionPair
idea): no sockets here, only the agent and the protocol's encoders.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from homeagent_secrets.protocol.errors import InternalError, SecretsError
from homeagent_secrets.protocol.rpc import (
    Batch,
    Rejected,
    Request,
    decode_params,
    encode_batch,
    encode_error,
    encode_result,
)

from .agent import Agent
from .backend import WouldBlock

log = logging.getLogger(__name__)


class Dispatcher:
    """Answers requests and batches; counts requests in flight for draining."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._inflight = 0
        self._idle: anyio.Event | None = None  # made only while someone waits

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self._inflight:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def answer(self, msg: Request | Rejected, out: bytearray) -> None:
        """Run one request and append its response (if any) to ``out``."""
        if isinstance(msg, Rejected):
            encode_error(msg.id, msg.error, out)
            return
        self._inflight += 1
        try:
            method, params = decode_params(msg)
            try:
                result: Any = self.agent.call_nowait(method.name, params)
            except WouldBlock:
                result = await self.agent.call(method.name, params)
        except SecretsError as exc:
            if not msg.is_notification:
                encode_error(msg.id, exc, out)  # type: ignore[arg-type]
            return
        except Exception:
            log.exception("internal error while answering %s", msg.method[:64])
            if not msg.is_notification:
                encode_error(msg.id, InternalError(), out)  # type: ignore[arg-type]
            return
        finally:
            self._inflight -= 1
            if self._inflight == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None
        if not msg.is_notification:
            encode_result(msg.id, result, out)  # type: ignore[arg-type]

    async def answer_batch(self, batch: Batch, out: bytearray) -> None:
        parts: list[bytes] = []
        for item in batch.items:
            one = bytearray()
            await self.answer(item, one)
            if one:
                parts.append(bytes(one))
        if parts:
            encode_batch(parts, out)


