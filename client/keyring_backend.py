"""A ``keyring`` backend that reads and writes secretsd: ``keyring.get_password``
for programs that already speak keyring.

Registered under keyring's entry-point group ``keyring.backends``; select it with
``PYTHON_KEYRING_BACKEND=homeagent_secrets.client.keyring_backend.SecretsdKeyring``
or let keyring pick it by priority. It finds the agent exactly as
``SecretsClient()`` does (``$HOMEAGENT_SECRETS_SOCKET``, then the usual places).

This is the one module of ``client/`` that imports keyring: keyring loads it
(through the entry point), so keyring is already imported whenever it is.

Names: ``(service, username)`` is stored as ``keyring/<S>/<U>``, where each
part is written as ``-`` followed by its UTF-8 bytes, each byte outside
``A-Z a-z 0-9 -`` as ``_`` and two upper-case hex digits. The ``-`` makes an
empty part a valid segment; ``.`` and ``_`` are always escaped, so no segment
is ``.`` or ``..`` and decoding is unambiguous. ``("pypi.org", "alice")`` is
``keyring/-pypi_2Eorg/-alice``. A pair whose name would exceed 256 characters
cannot be stored (``PasswordSetError`` saying so).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Final

from keyring import credentials, errors
from keyring.backend import KeyringBackend
from keyring.compat import properties

from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.errors import LockedError, SecretsError
from homeagent_secrets.protocol.names import MAX_NAME_LENGTH
from homeagent_secrets.protocol.rpc import ClientProtocol

from . import connect
from .sync import SecretsClient

PREFIX: Final = "keyring/"
#: The priority where an unlocked agent answers: "recommended" (>= 1) and below
#: the OS keychains (5), so a desktop's own keyring keeps its place.
PRIORITY: Final = 1.5
#: How long ``priority`` waits for the agent (keyring asks every backend at start-up).
PROBE_TIMEOUT: Final = 0.5

_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_SEGMENT: Final = re.compile(r"-(?:[A-Za-z0-9-]|_[0-9A-F]{2})*\Z")


def encode_part(text: str) -> str:
    """One part (service or username) as one name segment."""
    return "-" + "".join(chr(b) if b in _SAFE else f"_{b:02X}" for b in text.encode("utf-8", "surrogatepass"))


def decode_part(segment: str) -> str | None:
    """The part a segment encodes, or None when it is not one ``encode_part`` makes."""
    if not _SEGMENT.match(segment):
        return None
    out = bytearray()
    i = 1
    while i < len(segment):
        if segment[i] == "_":
            out.append(int(segment[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(segment[i]))
            i += 1
    try:
        text = out.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
    return text if encode_part(text) == segment else None


def name_for(service: str, username: str) -> str:
    """The agent name of ``(service, username)`` (it may be longer than a name may be)."""
    return f"{PREFIX}{encode_part(service)}/{encode_part(username)}"


def parse_name(name: str) -> tuple[str, str] | None:
    """``(service, username)`` back from a name ``name_for`` made, else None."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX):].split("/")
    if len(parts) != 2:
        return None
    service, username = decode_part(parts[0]), decode_part(parts[1])
    return None if service is None or username is None else (service, username)


def _too_long(service: str, username: str, name: str) -> str:
    return (f"the service and username take {len(name)} characters as an agent name "
            f"({name[:40]}...), over the {MAX_NAME_LENGTH} a name may have: use a shorter "
            "service or username (each byte outside A-Z a-z 0-9 - takes three characters)")


def _probe() -> None:
    """Raise RuntimeError saying why no unlocked agent answers here (or inside it)."""
    path = connect.socket_path(None)
    try:
        sock = connect.open_socket(path, PROBE_TIMEOUT)
    except SecretsError as exc:
        raise RuntimeError(exc.message) from None
    try:
        if connect.server_pid(sock) == os.getpid():
            raise RuntimeError("this process is secretsd itself: the agent cannot be its own keychain")
        proto = ClientProtocol()
        id_, line = proto.request(m.STATUS, m.NoParams())
        sock.settimeout(PROBE_TIMEOUT)
        sock.sendall(line)
        while True:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError(f"secretsd at {path} closed the connection (not allowed to use it?)")
            for reply in proto.receive_data(data):
                if reply.id in (id_, None):
                    if reply.error is not None:
                        raise RuntimeError(reply.error.message)
                    status = proto.decode_result(m.STATUS, reply.result)
                    if not status.initialized:
                        raise RuntimeError(f"secretsd at {path} is not initialized")
                    if status.locked:
                        raise RuntimeError(f"secretsd at {path} is locked")
                    return
    except OSError as exc:
        raise RuntimeError(f"secretsd at {path} did not answer ({type(exc).__name__})") from None
    except SecretsError as exc:
        raise RuntimeError(exc.message) from None
    finally:
        sock.close()


class SecretsdKeyring(KeyringBackend):
    """keyring's passwords kept by the homeagent secrets agent (secretsd)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._client = SecretsClient()

    @properties.classproperty
    def priority(cls) -> float:
        """Positive where an unlocked agent answers; else RuntimeError saying why not."""
        if "homeagent_secrets.daemon.backends.keychain_store" in sys.modules:
            # secretsd's own keychain backend asks keyring for a backend: never itself.
            raise RuntimeError("secretsd's keychain backend is loaded in this process: "
                               "the agent cannot be its own keychain")
        _probe()
        return PRIORITY

    def get_password(self, service: str, username: str) -> str | None:
        name = name_for(service, username)
        if len(name) > MAX_NAME_LENGTH:
            return None  # it could never have been stored
        try:
            return self._client.get(name)
        except LockedError as exc:
            raise errors.KeyringLocked(exc.message) from None
        except SecretsError as exc:
            raise errors.KeyringError(exc.message) from None

    def set_password(self, service: str, username: str, password: str) -> None:
        name = name_for(service, username)
        if len(name) > MAX_NAME_LENGTH:
            raise errors.PasswordSetError(_too_long(service, username, name))
        try:
            self._client.store(name, password)
        except SecretsError as exc:
            raise errors.PasswordSetError(exc.message) from None

    def delete_password(self, service: str, username: str) -> None:
        name = name_for(service, username)
        if len(name) > MAX_NAME_LENGTH:
            raise errors.PasswordDeleteError("no such password (the name would be too long to exist)")
        try:
            existed = self._client.delete(name)
        except SecretsError as exc:
            raise errors.PasswordDeleteError(exc.message) from None
        if not existed:
            raise errors.PasswordDeleteError("no such password")

    def get_credential(self, service: str, username: str | None) -> credentials.Credential | None:
        """With a username, that password; without, the first username (sorted) of the service."""
        if username is not None:
            return super().get_credential(service, username)
        prefix = f"{PREFIX}{encode_part(service)}/"
        if len(prefix) >= MAX_NAME_LENGTH:
            return None
        try:
            names = self._client.list(prefix)
        except SecretsError as exc:
            raise errors.KeyringError(exc.message) from None
        for name in names:
            pair = parse_name(name)
            if pair is None or pair[0] != service:
                continue
            password = self.get_password(*pair)
            if password is not None:
                return credentials.SimpleCredential(pair[1], password)
        return None
