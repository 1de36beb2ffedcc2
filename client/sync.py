"""SecretsClient: the blocking client (plain ``socket``), thread-safe."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from homeagent_secrets.protocol.errors import AgentUnreachableError, SecretsError
from homeagent_secrets.protocol.messages import (
    DescribeResult,
    MigrateResult,
    Params,
    SecretResult,
    StatusResult,
)
from homeagent_secrets.protocol.paths import default_socket_path
from homeagent_secrets.protocol.rpc import ClientProtocol, Reply
from homeagent_secrets.protocol.secret import Secret

from . import calls


def unreachable(path: Path, why: str) -> AgentUnreachableError:
    return AgentUnreachableError(
        f"cannot reach secretsd at {path}: {why}; start it with `secretsd` "
        "(or point HOMEAGENT_SECRETS_SOCKET / --socket at its socket)"
    )


class _Dropped(Exception):
    """The connection ended before the reply arrived."""


class SecretsClient:
    """One persistent connection to secretsd, shared by all threads.

    Calls are serialized on the connection. If the daemon restarted, the next
    call reconnects once by itself; a write whose connection drops after it was
    sent is not replayed (it may have been applied) and raises instead.
    """

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        timeout: float = calls.DEFAULT_TIMEOUT,
        connect_timeout: float = calls.DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proto = ClientProtocol()

    # --- connection -------------------------------------------------------------

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(str(self.socket_path))
        except FileNotFoundError:
            sock.close()
            raise unreachable(self.socket_path, "no socket there") from None
        except ConnectionRefusedError:
            sock.close()
            raise unreachable(self.socket_path, "nothing is listening (stale socket)") from None
        except PermissionError:
            sock.close()
            raise unreachable(self.socket_path, "permission denied (socket of another user?)") from None
        except OSError as exc:
            sock.close()
            raise unreachable(self.socket_path, exc.strerror or str(exc)) from None
        self._sock = sock
        self._proto = ClientProtocol()
        return sock

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SecretsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exchange(self, sock: socket.socket, id_: int, line: bytes, timeout: float) -> Reply:
        try:
            sock.sendall(line)
        except OSError:
            raise _Dropped(False) from None  # nothing reached the daemon
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError from None
            except OSError:
                raise _Dropped(True) from None
            if not data:
                raise _Dropped(True)
            for reply in self._proto.receive_data(data):
                if reply.id == id_:
                    return reply

    def call(self, method: str, params: Params, timeout: float | None = None) -> Any:
        """Send one request and return its typed result; raises SecretsError subclasses."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            for attempt in (0, 1):
                sock = self._sock or self._connect()
                id_, line = self._proto.request(method, params)
                try:
                    reply = self._exchange(sock, id_, line, timeout)
                except _Dropped as dropped:
                    self._drop()
                    sent = bool(dropped.args[0])
                    if attempt == 0 and (not sent or method in calls.IDEMPOTENT):
                        continue
                    raise unreachable(
                        self.socket_path,
                        "the connection closed during the call"
                        + ("; the request may or may not have been applied" if sent else ""),
                    ) from None
                except TimeoutError:
                    self._drop()  # a late reply must not be taken for the next call's
                    raise AgentUnreachableError(
                        f"secretsd did not answer {method} within {timeout:g} s; "
                        "check `secretsctl status` and the secretsd log"
                    ) from None
                except SecretsError:
                    self._drop()
                    raise
                if reply.error is not None:
                    raise reply.error
                return self._proto.decode_result(method, reply.result)
        raise AssertionError("unreachable")

    # --- the method table --------------------------------------------------------

    def status(self) -> StatusResult:
        return self.call("status", calls.NONE)  # type: ignore[no-any-return]

    def init(self, passphrase: str | Secret) -> None:
        self.call("init", calls.passphrase(passphrase))

    def unlock(self, passphrase: str | Secret) -> None:
        self.call("unlock", calls.passphrase(passphrase))

    def lock(self) -> None:
        self.call("lock", calls.NONE)

    def change_passphrase(self, old: str | Secret, new: str | Secret) -> None:
        self.call("change_passphrase", calls.change(old, new))

    def store(self, name: str, value: str | Secret, kind: str | None = None) -> int:
        return calls.version_of(self.call("store", calls.store(name, value, kind)))

    def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        return self.call("retrieve", calls.retrieve(name, previous))  # type: ignore[no-any-return]

    def get(self, name: str, previous: bool = False) -> str | None:
        """The plain value, or None: the ``keyring.get_password`` of this agent."""
        result = self.retrieve(name, previous)
        return None if result is None else result.value.reveal()

    def delete(self, name: str) -> bool:
        return bool(self.call("delete", calls.name(name)))

    def list(self, prefix: str = "") -> list[str]:
        return self.call("list", calls.prefix(prefix))  # type: ignore[no-any-return]

    def rotate(self, name: str, value: str | Secret) -> int:
        return calls.version_of(self.call("rotate", calls.rotate(name, value)))

    def describe(self, name: str) -> DescribeResult | None:
        return self.call("describe", calls.name(name))  # type: ignore[no-any-return]

    def migrate(self, to: str, passphrase: str | Secret | None = None,
                source: str | None = None) -> MigrateResult:
        """Move every secret to the ``to`` backend (see ``secretsctl migrate``)."""
        return self.call("migrate", calls.migrate(to, passphrase, source), timeout=max(self.timeout, 600))  # type: ignore[no-any-return]
