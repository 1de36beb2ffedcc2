"""How to make each storage backend ready for the shared contract suite.

Adding a backend to the suite is adding one entry here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from homeagent_secrets.daemon.backends.base import Backend
from homeagent_secrets.daemon.backends.datakey import KdfParams
from homeagent_secrets.daemon.backends.files import FileBackend
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


@asynccontextmanager
async def _on_gnome_keyring(tmp: Path, request: Any, store_factory: Callable[[], Any]) -> AsyncIterator[Backend]:
    from homeagent_secrets.daemon.backends.keychain import KeychainBackend

    from .keyringd import gnome_keyring

    mp = request.getfixturevalue("monkeypatch")
    with gnome_keyring(tmp) as env:
        mp.setenv("DBUS_SESSION_BUS_ADDRESS", env["DBUS_SESSION_BUS_ADDRESS"])
        b = KeychainBackend(store_factory)
        await b.open()
        try:
            yield b
        finally:
            await b.close()


def keychain_backend(tmp: Path, request: Any) -> Any:
    """The Secret Service store (kept-open connection) on a real GNOME Keyring."""
    from homeagent_secrets.daemon.backends.keychain_store import SecretServiceStore

    return _on_gnome_keyring(tmp, request, SecretServiceStore)


def keychain_keyring_api_backend(tmp: Path, request: Any) -> Any:
    """The generic keyring-API store (what macOS/Windows use) on the same real keyring."""
    from keyring.backends.SecretService import Keyring

    from homeagent_secrets.daemon.backends.keychain_store import KeyringStore

    return _on_gnome_keyring(tmp, request, lambda: KeyringStore(Keyring()))


@asynccontextmanager
async def openbao_backend(tmp: Path, request: Any) -> AsyncIterator[Backend]:
    """A real OpenBao dev server (one per session), a fresh KV prefix per test."""
    import uuid

    from homeagent_secrets.daemon.backends.openbao import OpenBaoBackend

    from .baoserver import bao_settings

    server = request.getfixturevalue("bao_dev")
    token = tmp / "bao-token"
    token.write_text(server.root_token + "\n")
    b = OpenBaoBackend(bao_settings(address=server.address, token_file=str(token),
                                       prefix=f"contract-{uuid.uuid4().hex[:8]}/"))
    await b.open()
    try:
        yield b
    finally:
        await b.close()


BACKENDS: dict[str, Callable[[Path, Any], Any]] = {
    "openbao": openbao_backend,
    "file": file_backend,
    "keychain": keychain_backend,
    "keychain-keyring-api": keychain_keyring_api_backend,
}
