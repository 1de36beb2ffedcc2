"""Sans-I/O JSON-RPC 2.0 protocol of homeagent-secrets: framing, messages, errors.

No sockets, no files, no event loop: the daemon and both clients share it, and
tests wire a client and a server together in memory. See PROTOCOL.md.

Every name here loads on first use, ``__version__`` too (read from the package
metadata, which costs more than the whole client): ``secretsctl get`` is run
from scripts and must start fast, and its common case needs only ``errors``,
``names`` and ``paths``, which import nothing but the standard library (msgspec
alone took a third of its start-up).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .framing import DEFAULT_MAX_FRAME, FrameSplitter
    from .messages import METHODS, Method
    from .names import BACKEND_NAMES, KINDS, check_name, name_problem
    from .rpc import ClientProtocol, Reply
    from .secret import Secret
    from .server import Batch, Call, Rejected, ServerProtocol

    __version__: str

_WHERE = {
    "DEFAULT_MAX_FRAME": ".framing", "FrameSplitter": ".framing",
    "METHODS": ".messages", "Method": ".messages",
    "BACKEND_NAMES": ".names", "KINDS": ".names", "check_name": ".names", "name_problem": ".names",
    "ClientProtocol": ".rpc", "Reply": ".rpc",
    "Secret": ".secret",
    "Batch": ".server", "Call": ".server", "Rejected": ".server", "ServerProtocol": ".server",
}


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
    elif name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
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
