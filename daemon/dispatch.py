"""From a typed call to the bytes of its answer, through the agent.

No sockets here: the server's connections use it, one call or one batch at a
time. It turns every failure into its JSON-RPC error, and wipes a passphrase
once its call is answered.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

from homeagent_secrets.protocol.errors import (
    InternalError,
    NotFoundError,
    PermissionDeniedError,
    SecretsError,
)
from homeagent_secrets.protocol.messages import Params, UnwatchParams, WatchParams, WatchResult
from homeagent_secrets.protocol.secret import Secret
from homeagent_secrets.protocol.server import (
    Batch,
    BatchReply,
    Call,
    Rejected,
    answer,
    answer_error,
    reject,
)

from .agent import Agent
from .audit import Outcome
from .backends.base import PENDING, _Pending
from .peer import Peer
from .watch import Subscriber
from .wipe import wipe_str

log = logging.getLogger(__name__)

Flush = Callable[[], Awaitable[None]]
Result = tuple[Any, SecretsError | None]


def _audit(agent: Agent, call: Call, peer: Peer, result: Any, error: SecretsError | None) -> None:
    """One access-log event for a call answered (cheap when only denials are logged)."""
    outcome: Outcome
    code = None
    if error is None:
        outcome = "not_found" if result is None or result is False else "ok"
    elif isinstance(error, PermissionDeniedError):
        outcome, code = "denied", error.code
    elif isinstance(error, NotFoundError):
        outcome, code = "not_found", error.code
    else:
        outcome, code = "error", error.code
    agent.audit.record(peer, call.method.name, getattr(call.params, "name", None), outcome, code)


def wipe_params(params: Params) -> None:
    """Zero the passphrases a call carried (after it was answered)."""
    for field in params.__struct_fields__:
        value = getattr(params, field)
        if isinstance(value, Secret):
            wipe_str(value.reveal())


class Dispatcher:
    """Answers calls and batches through the agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _try_now(self, call: Call, peer: Peer) -> Result | _Pending:
        try:
            result = self.agent.call_nowait(call, peer)
        except SecretsError as exc:
            return None, exc
        except Exception:
            log.exception("internal error while answering %s", call.method.name)
            return None, InternalError()
        return PENDING if result is PENDING else (result, None)

    def answer_now(self, call: Call, peer: Peer, out: bytearray) -> bool:
        """Answer ``call`` from memory without awaiting, if the agent can; whether it did."""
        agent = self.agent
        try:  # _try_now, inline: this is most of what a busy agent runs
            result = agent.call_nowait(call, peer)
        except SecretsError as exc:
            _audit(agent, call, peer, None, exc)
            answer_error(call, exc, out)
            return True
        except Exception:
            log.exception("internal error while answering %s", call.method.name)
            _audit(agent, call, peer, None, InternalError())
            answer_error(call, InternalError(), out)
            return True
        if result is PENDING:
            return False
        if agent.audit.enabled:
            _audit(agent, call, peer, result, None)
        answer(call, result, out)
        return True

    async def outcome(self, call: Call, peer: Peer) -> Result:
        """(result, None) or (None, error) of one call, logged in the access log."""
        found = await self._outcome(call, peer)
        if found[1] is not None or self.agent.audit.enabled:
            _audit(self.agent, call, peer, *found)
        return found

    async def _outcome(self, call: Call, peer: Peer) -> Result:
        if call.method.nowait:
            now = self._try_now(call, peer)
            if not isinstance(now, _Pending):
                return now
        try:
            return await self.agent.call(call, peer), None
        except SecretsError as exc:
            return None, exc
        except Exception:
            log.exception("internal error while answering %s", call.method.name)
            return None, InternalError()
        finally:
            if call.method.carries_passphrase:
                wipe_params(call.params)

    def connection_call(self, call: Call, peer: Peer, out: bytearray, conn: Subscriber) -> None:
        """``watch`` / ``unwatch``: subscriptions of the connection ``conn``."""
        result: Any = None
        error: SecretsError | None = None
        try:
            self.agent.authorize(call, peer)
            params = call.params
            if isinstance(params, WatchParams):
                result = WatchResult(self.agent.hub.subscribe(conn, params.patterns))
            elif isinstance(params, UnwatchParams):
                result = self.agent.hub.unsubscribe(conn, params.watch)
            else:
                raise InternalError(f"{call.method.name} is not a connection's call")
        except SecretsError as exc:
            error = exc
        if error is not None or self.agent.audit.enabled:
            _audit(self.agent, call, peer, result, error)
        if error is None:
            answer(call, result, out)
        else:
            answer_error(call, error, out)

    async def answer(self, msg: Call | Rejected, peer: Peer, out: bytearray) -> None:
        """Run one message and append its answer line (if any) to ``out``."""
        if isinstance(msg, Rejected):
            if msg.answered:
                reject(msg.id, msg.error, out)
            return
        result, error = await self.outcome(msg, peer)
        if error is None:
            answer(msg, result, out)
        else:
            answer_error(msg, error, out)

    async def answer_batch(self, batch: Batch, peer: Peer, out: bytearray, flush: Flush,
                           flush_at: int) -> None:
        """Run a batch item by item into one array line; ``flush`` whenever ``out`` is
        over ``flush_at`` bytes, and let other connections run between items."""
        reply = BatchReply(out)
        for item in batch.items:
            if isinstance(item, Rejected):
                if item.answered:
                    reply.reject(item.id, item.error)
            else:
                result, error = await self.outcome(item, peer)
                if error is None:
                    reply.answer(item, result)
                else:
                    reply.answer_error(item, error)
            if len(out) >= flush_at:
                await flush()
            await anyio.lowlevel.checkpoint()
        reply.close()
