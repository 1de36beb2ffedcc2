"""Sans-I/O JSON-RPC 2.0 protocol of homeagent-secrets: framing, messages, errors.

No sockets, no files, no event loop: the daemon and both clients share it, and
tests wire a client and a server together in memory. See PROTOCOL.md.
"""

from .framing import DEFAULT_MAX_FRAME, FrameSplitter
from .messages import METHODS
from .names import KINDS, check_name, name_problem
from .rpc import Batch, ClientProtocol, Rejected, Reply, Request, parse_message
from .secret import Secret

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_FRAME",
    "KINDS",
    "METHODS",
    "Batch",
    "ClientProtocol",
    "FrameSplitter",
    "Rejected",
    "Reply",
    "Request",
    "Secret",
    "check_name",
    "name_problem",
    "parse_message",
]
