"""atheris fuzz target: the frame splitter, the request parser and params decoder,
the reply encoder, and the client's reply decoder, fed arbitrary bytes.

Anything but the protocol's own SecretsError escaping is a crash. Run:
    python tests/fuzz/fuzz_protocol.py tests/corpus/fuzz -max_total_time=60
"""

import sys

import atheris

with atheris.instrument_imports():
    from homeagent_secrets.protocol import rpc
    from homeagent_secrets.protocol.errors import SecretsError
    from homeagent_secrets.protocol.framing import FrameSplitter


def test_one_input(data: bytes) -> None:
    splitter = FrameSplitter(max_size=4096)
    for line in splitter.feed(data) + splitter.feed(b"\n"):
        msg = rpc.parse_message(line)
        items = msg.items if isinstance(msg, rpc.Batch) else [msg]
        out = bytearray()
        for item in items:
            if isinstance(item, rpc.Rejected):
                rpc.encode_error(item.id, item.error, out)
                continue
            try:
                method, params = rpc.decode_params(item)
            except SecretsError as exc:
                if not item.is_notification:
                    rpc.encode_error(item.id, exc, out)  # type: ignore[arg-type]
                continue
            assert method.name == item.method and repr(params)
    try:
        rpc.ClientProtocol(max_frame=4096).receive_data(data + b"\n")
    except SecretsError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
