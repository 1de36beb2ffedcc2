"""atheris fuzz target: the server half (frame splitter, request parser, params
decoder, duplicate-key scan), the reply encoders, and the client's reply
decoder, fed arbitrary bytes.

Anything but the protocol's own SecretsError escaping is a crash. Run:
    python tests/fuzz/fuzz_protocol.py tests/corpus/fuzz -max_total_time=60
"""

import sys

import atheris
from atheris.import_hook import instrument_imports  # what atheris re-exports; its stubs type it only here

with instrument_imports():
    from homeagent_secrets.protocol.errors import SecretsError
    from homeagent_secrets.protocol.messages import METHODS
    from homeagent_secrets.protocol.rpc import ClientProtocol
    from homeagent_secrets.protocol.server import (
        Batch,
        BatchReply,
        Call,
        ServerProtocol,
        answer_error,
        has_duplicate_keys,
        reject,
    )


def test_one_input(data: bytes) -> None:
    proto = ServerProtocol(max_frame=4096)
    out = bytearray()
    for msg in proto.receive_data(data) + proto.receive_data(b"\n"):
        if isinstance(msg, Batch):
            reply = BatchReply(out)
            for item in msg.items:
                if isinstance(item, Call):
                    reply.answer_error(item, SecretsError("fuzz"))
                elif item.answered:
                    reply.reject(item.id, item.error)
            reply.close()
        elif isinstance(msg, Call):
            assert METHODS[msg.method.name] is msg.method and repr(msg.params)
            answer_error(msg, SecretsError("fuzz"), out)
        elif msg.answered:
            reject(msg.id, msg.error, out)
    if proto.oversize:
        proto.oversize_error(out)
    has_duplicate_keys(data)  # any bytes: a verdict, never an exception
    try:
        ClientProtocol(max_reply=4096).receive_data(data + b"\n")
    except SecretsError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
