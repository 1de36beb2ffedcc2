"""SecretsClient: the blocking client (plain ``socket``), thread-safe."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

from homeagent_secrets.protocol import messages as m
from homeagent_secrets.protocol.errors import AgentUnreachableError, InvalidParams, SecretsError
from homeagent_secrets.protocol.messages import (
    DescribeResult,
    Method,
    MigrateResult,
    Params,
    SecretResult,
    StatusResult,
)
from homeagent_secrets.protocol.names import BackendName, Kind
from homeagent_secrets.protocol.rpc import ClientProtocol, Reply
from homeagent_secrets.protocol.secret import Secret

from . import connect
from .connect import as_secret

P = TypeVar("P", bound=Params)
R = TypeVar("R")


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
        timeout: float = connect.DEFAULT_TIMEOUT,
        connect_timeout: float = connect.DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.socket_path = connect.socket_path(socket_path)
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
            connect.check_server(sock, self.socket_path)
        except SecretsError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise connect.connect_error(self.socket_path, exc) from None
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

    def _exchange(self, sock: socket.socket, ids: set[int], line: bytes, timeout: float
                  ) -> dict[int, Reply]:
        try:
            sock.sendall(line)
        except OSError:
            self._raise_refusal(sock)
            raise _Dropped(False) from None  # nothing reached the daemon
        deadline = time.monotonic() + timeout
        got: dict[int, Reply] = {}
        while len(got) < len(ids):
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
                if reply.id is None and reply.error is not None:
                    raise reply.error  # about the connection itself: nothing was run
                if isinstance(reply.id, int) and reply.id in ids:
                    got[reply.id] = reply
        return got

    def _raise_refusal(self, sock: socket.socket) -> None:
        """Raise the id-null error the agent sent before closing, if it did (the
        connection cap refuses and closes at once: a send after that fails)."""
        try:
            while data := sock.recv(65536, socket.MSG_DONTWAIT):
                for reply in self._proto.receive_data(data):
                    if reply.id is None and reply.error is not None:
                        raise reply.error
        except OSError:
            pass

    def _send(self, methods: list[Method[Any, Any]], params: list[Params],
              timeout: float | None) -> list[Reply]:
        timeout = self.timeout if timeout is None else timeout
        name = methods[0].name if len(methods) == 1 else "batch"
        with self._lock:
            for attempt in (0, 1):
                sock = self._sock or self._connect()
                if len(methods) == 1:
                    id_, line = self._proto.request(methods[0], params[0])
                    ids = [id_]
                else:
                    ids, line = self._proto.batch(list(zip(methods, params, strict=True)))
                for method in methods:
                    connect.check_size(line, method)
                try:
                    got = self._exchange(sock, set(ids), line, timeout)
                except _Dropped as dropped:
                    self._drop()
                    sent = bool(dropped.args[0])
                    if attempt == 0 and all(connect.may_resend(mt, sent) for mt in methods):
                        continue
                    raise connect.unreachable(
                        self.socket_path,
                        "the connection closed during the call"
                        + ("; the request may or may not have been applied" if sent else ""),
                    ) from None
                except TimeoutError:
                    self._drop()  # a late reply must not be taken for the next call's
                    raise AgentUnreachableError(
                        f"secretsd did not answer {name} within {timeout:g} s; "
                        "check `secretsctl status` and the secretsd log"
                    ) from None
                except SecretsError:
                    self._drop()
                    raise
                return [got[i] for i in ids]
        raise AssertionError("unreachable")

    def call(self, method: Method[P, R], params: P, timeout: float | None = None) -> R:
        """Send one request and return its typed result; raises SecretsError subclasses."""
        reply = self._send([method], [params], timeout)[0]
        if reply.error is not None:
            raise reply.error
        return self._proto.decode_result(method, reply.result)

    # --- the method table --------------------------------------------------------

    def status(self) -> StatusResult:
        return self.call(m.STATUS, m.NoParams())

    def init(self, passphrase: str | Secret) -> None:
        self.call(m.INIT, m.InitParams(as_secret(passphrase)))

    def unlock(self, passphrase: str | Secret) -> None:
        self.call(m.UNLOCK, m.PassphraseParams(as_secret(passphrase)))

    def lock(self) -> None:
        self.call(m.LOCK, m.NoParams())

    def change_passphrase(self, old: str | Secret, new: str | Secret) -> None:
        self.call(m.CHANGE_PASSPHRASE, m.ChangePassphraseParams(as_secret(old), as_secret(new)))

    def store(self, name: str, value: str | Secret, kind: Kind | None = None) -> int:
        return self.call(m.STORE, m.StoreParams(name, as_secret(value), kind)).version

    def retrieve(self, name: str, previous: bool = False) -> SecretResult | None:
        return self.call(m.RETRIEVE, m.RetrieveParams(name, "previous" if previous else "current"))

    def get(self, name: str, previous: bool = False) -> str | None:
        """The plain value, or None: the ``keyring.get_password`` of this agent."""
        result = self.retrieve(name, previous)
        return None if result is None else result.value.reveal()

    def delete(self, name: str, force: bool = False) -> bool:
        """Delete a secret; ``force`` also removes a damaged record of that name."""
        return self.call(m.DELETE, m.DeleteParams(name, force))

    def list(self, prefix: str = "") -> list[str]:
        """Every name starting with ``prefix``, sorted (fetched a page at a time)."""
        names: list[str] = []
        after = ""
        while True:
            try:
                page = self.call(m.LIST, m.ListParams(prefix, after, connect.LIST_PAGE))
            except InvalidParams:
                if after or names:
                    raise
                return self.call(m.LIST, m.ListParams(prefix))  # an agent without paging
            names += page
            if len(page) < connect.LIST_PAGE:
                return names
            after = page[-1]

    def rotate(self, name: str, value: str | Secret) -> int:
        return self.call(m.ROTATE, m.RotateParams(name, as_secret(value))).version

    def describe(self, name: str) -> DescribeResult | None:
        return self.call(m.DESCRIBE, m.NameParams(name))

    def migrate(self, to: BackendName, passphrase: str | Secret | None = None,
                source: BackendName | None = None) -> MigrateResult:
        """Move every secret to the ``to`` backend (see ``secretsctl migrate``)."""
        secret = None if passphrase is None else as_secret(passphrase)
        return self.call(m.MIGRATE, m.MigrateParams(to, secret, source), timeout=max(self.timeout, 600))
