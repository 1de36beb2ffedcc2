"""Sans-I/O JSON-RPC 2.0 protocol of homeagent-secrets: framing, messages, errors.

No sockets, no files, no event loop: the daemon and both clients share it, and
tests wire a client and a server together in memory. See PROTOCOL.md.

The server half and ``__version__`` (read from the package metadata, which
costs more than the whole client) load on first use: ``secretsctl get`` is
run from scripts and must start fast.
"""

from typing import TYPE_CHECKING, Any

from .framing import DEFAULT_MAX_FRAME, FrameSplitter
from .messages import METHODS, Method
from .names import BACKEND_NAMES, KINDS, check_name, name_problem
from .rpc import ClientProtocol, Reply
from .secret import Secret

if TYPE_CHECKING:
    from .server import Batch, Call, Rejected, ServerProtocol

    __version__: str

_SERVER_NAMES = ("Batch", "Call", "Rejected", "ServerProtocol")


def _version() -> str:
    from importlib import metadata

    try:
        #: The one version number: the installed package's metadata (pyproject.toml).
        return metadata.version("homeagent-secrets")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _SERVER_NAMES:
        from . import server

        value = getattr(server, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


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
    "__version__",
    "check_name",
    "name_problem",
]
