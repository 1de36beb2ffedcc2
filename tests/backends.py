"""How to make each storage backend ready for the shared contract suite.

Adding a backend to the suite is adding one entry here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from homeagent_secrets.daemon.backend import Backend
from homeagent_secrets.daemon.datakey import KdfParams
from homeagent_secrets.daemon.filestore import FileBackend
from homeagent_secrets.protocol.secret import Secret


@asynccontextmanager
async def file_backend(tmp: Path, request: Any) -> AsyncIterator[Backend]:
    b = FileBackend(tmp / "home", KdfParams(log2_n=10))
    await b.open()
    await b.init(Secret("pw"))
    try:
        yield b
    finally:
        await b.close()


BACKENDS: dict[str, Callable[[Path, Any], Any]] = {"file": file_backend}
