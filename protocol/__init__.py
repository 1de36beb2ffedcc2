"""Sans-I/O JSON-RPC 2.0 protocol of homeagent-secrets: framing, messages, errors.

No sockets, no files, no event loop: the daemon and both clients share it, and
tests wire a client and a server together in memory. See PROTOCOL.md.
"""

from importlib import metadata as _metadata

from .framing import DEFAULT_MAX_FRAME, FrameSplitter
from .messages import METHODS, Method
from .names import BACKEND_NAMES, KINDS, check_name, name_problem
from .rpc import ClientProtocol, Reply
from .secret import Secret
from .server import Batch, Call, Rejected, ServerProtocol

try:
    #: The one version number: the installed package's metadata (pyproject.toml).
    __version__ = _metadata.version("homeagent-secrets")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_MAX_FRAME",
    "KINDS",
    "METHODS",
    "Batch",
    "Call",
    "ClientProtocol",
    "FrameSplitter",
    "Method",
    "Rejected",
    "Reply",
    "Secret",
    "ServerProtocol",
    "check_name",
    "name_problem",
]
