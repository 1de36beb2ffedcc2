"""An in-memory client/server pair (h11's ConnectionPair idea): no sockets.

The client's ``ClientProtocol`` bytes go through the server's frame splitter,
parser and dispatcher, and the answer bytes come back through the client's
splitter, so both halves of the protocol are exercised against each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from homeagent_secrets.daemon.agent import Agent
from homeagent_secrets.daemon.datakey import KdfParams
from homeagent_secrets.daemon.dispatch import Dispatcher
from homeagent_secrets.daemon.filestore import FileBackend
from homeagent_secrets.protocol.framing import FrameSplitter
from homeagent_secrets.protocol.messages import Params
from homeagent_secrets.protocol.rpc import Batch, ClientProtocol, parse_message


class MemoryPair:
    def __init__(self, home: Path) -> None:
        self.backend = FileBackend(home, KdfParams(log2_n=10))
        self.dispatcher = Dispatcher(Agent(self.backend))
        self.client = ClientProtocol()
        self.server_splitter = FrameSplitter()

    async def open(self) -> MemoryPair:
        await self.backend.open()
        return self

    async def server_receive(self, data: bytes) -> bytes:
        """What the server sends back for ``data``."""
        out = bytearray()
        for line in self.server_splitter.feed(data):
            msg = parse_message(line)
            if isinstance(msg, Batch):
                await self.dispatcher.answer_batch(msg, out)
            else:
                await self.dispatcher.answer(msg, out)
        return bytes(out)

    async def call(self, method: str, params: Params) -> Any:
        id_, line = self.client.request(method, params)
        replies = self.client.receive_data(await self.server_receive(line))
        assert [r.id for r in replies] == [id_]
        if replies[0].error is not None:
            raise replies[0].error
        return self.client.decode_result(method, replies[0].result)
