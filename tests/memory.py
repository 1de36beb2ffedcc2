"""An in-memory client/server pair (h11's ConnectionPair idea): no sockets, no daemon.

The client's ``ClientProtocol`` bytes go through the server's ``ServerProtocol``
(the same object the daemon's connections use), a small dict-backed answer to
every method of the table, and back through the client's splitter: both halves
of the protocol are exercised against each other, without the agent, a
backend or scrypt.
"""

from __future__ import annotations

from typing import Any

from homeagent_secrets.protocol import errors
from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.messages import Method, Params
from homeagent_secrets.protocol.rpc import ClientProtocol
from homeagent_secrets.protocol.secret import Secret
from homeagent_secrets.protocol.server import (
    Batch,
    BatchReply,
    Call,
    ServerProtocol,
    answer,
    answer_error,
    reject,
)


class MemoryStore:
    """Answers every method from a dict: the protocol's reference behaviour."""

    def __init__(self, passphrase: str = "pw") -> None:
        self.passphrase = passphrase
        self.locked = False
        self.records: dict[str, tuple[str, int, str, str | None]] = {}  # value, version, kind, previous
        self.answered: set[str] = set()  # methods asked for (to check coverage)

    def run(self, call: Call) -> Any:
        p: Any = call.params
        method = call.method
        self.answered.add(method.name)
        if method is m.STATUS:
            return m.StatusResult(True, self.locked, "memory", "test", len(self.records), 0.0)
        if method is m.WHOAMI:
            return m.WhoamiResult(0, 0, 0, None, [m.Right(["**"], ["read"])])
        if method is m.INIT:
            raise errors.AlreadyInitializedError()
        if method is m.UNLOCK or method is m.CHANGE_PASSPHRASE:
            given = p.passphrase if method is m.UNLOCK else p.old
            if given != Secret(self.passphrase):
                raise errors.WrongPassphraseError()
            self.locked = False
            return m.LockedResult(False) if method is m.UNLOCK else m.ChangedResult()
        if method is m.LOCK:
            self.locked = True
            return m.LockedResult(True)
        if self.locked:
            raise errors.LockedError()
        old = self.records.get(getattr(p, "name", ""))
        if method is m.STORE or method is m.ROTATE:
            if method is m.ROTATE and old is None:
                raise errors.NotFoundError()
            version = old[1] + 1 if old else 1
            kind = getattr(p, "kind", None) or (old[2] if old else "generic")
            self.records[p.name] = (p.value.reveal(), version, kind, old[0] if old else None)
            return m.WrittenResult(p.name, version)
        if method is m.RETRIEVE:
            if old is None or (p.version == "previous" and old[3] is None):
                return None
            if p.version == "previous":
                return m.SecretResult(p.name, Secret(old[3]), old[1] - 1)  # type: ignore[arg-type]
            return m.SecretResult(p.name, Secret(old[0]), old[1])
        if method is m.DESCRIBE:
            return None if old is None else m.DescribeResult(
                p.name, old[2], old[1], 0.0, 0.0, old[3] is not None)  # type: ignore[arg-type]
        if method is m.DELETE:
            return self.records.pop(p.name, None) is not None
        if method is m.LIST:
            names = sorted(n for n in self.records if n.startswith(p.prefix) and n > p.after)
            return names if p.limit is None else names[:p.limit]
        raise errors.NotSupportedError(f"{method.name} is not answered in memory")


class MemoryPair:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.server = ServerProtocol()
        self.client = ClientProtocol()

    def _outcome(self, call: Call) -> tuple[Any, errors.SecretsError | None]:
        try:
            return self.store.run(call), None
        except errors.SecretsError as exc:
            return None, exc

    async def server_receive(self, data: bytes) -> bytes:
        """What the server sends back for ``data``."""
        out = bytearray()
        for msg in self.server.receive_data(data):
            if isinstance(msg, Batch):
                reply = BatchReply(out)
                for item in msg.items:
                    if isinstance(item, Call):
                        result, error = self._outcome(item)
                        if error is None:
                            reply.answer(item, result)
                        else:
                            reply.answer_error(item, error)
                    elif item.answered:
                        reply.reject(item.id, item.error)
                reply.close()
            elif isinstance(msg, Call):
                result, error = self._outcome(msg)
                if error is None:
                    answer(msg, result, out)
                else:
                    answer_error(msg, error, out)
            elif msg.answered:
                reject(msg.id, msg.error, out)
        if self.server.oversize:
            self.server.oversize_error(out)
        return bytes(out)

    async def call(self, method: Method[Any, Any], params: Params) -> Any:
        id_, line = self.client.request(method, params)
        replies = self.client.receive_data(await self.server_receive(line))
        assert [r.id for r in replies] == [id_]
        if replies[0].error is not None:
            raise replies[0].error
        return self.client.decode_result(method, replies[0].result)
