"""Blocking access to the OS keychain entries of service ``homeagent``.

The plumbing under the keychain backend (``keychain.py`` holds its state
format and repair): a ``Store`` is a get/set/delete of one account's password.
On the freedesktop Secret Service the store keeps one D-Bus connection and one
session open instead of ``keyring``'s one per call; elsewhere (macOS, Windows,
KWallet) it goes through ``keyring``'s chosen backend.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any, Final

from homeagent_secrets.protocol.errors import (
    BackendUnavailableError,
    LockedError,
    SecretsError,
)

SERVICE: Final = "homeagent"
PROBE: Final = "#probe"  # a reserved account (no valid name holds '#') for probe writes
LOCKED_MESSAGE: Final = (
    "the OS keychain is locked: unlock your login keyring (log in to the desktop "
    "session, or open Seahorse / run `secret-tool` to be prompted), then retry"
)


@contextmanager
def keychain_errors(what: str) -> Iterator[None]:
    """Map keyring/secretstorage/D-Bus failures onto -32001 and -32006."""
    try:
        yield
    except SecretsError:
        raise
    except Exception as exc:  # the keyring backends raise many unrelated types
        name = type(exc).__name__
        if "Locked" in name or "PromptDismissed" in name:
            raise LockedError(LOCKED_MESSAGE) from None
        raise BackendUnavailableError(
            f"the OS keychain failed to {what} ({name}): check that a keyring daemon "
            "(e.g. gnome-keyring) runs on the session bus"
        ) from None


class Store(abc.ABC):
    """Blocking access to the entries of service ``homeagent``."""

    #: Whether ``accounts`` can list every entry (enables repair by enumeration).
    enumerable: bool = False

    @abc.abstractmethod
    def get(self, account: str) -> str | None: ...

    @abc.abstractmethod
    def set(self, account: str, value: str) -> None: ...

    @abc.abstractmethod
    def delete(self, account: str) -> bool: ...

    def accounts(self) -> AbstractSet[str]:
        raise NotImplementedError

    def is_locked(self) -> bool:
        return False

    def close(self) -> None:
        pass


class KeyringStore(Store):
    """Any ``keyring`` backend (macOS Keychain, Windows Credential Locker, ...)."""

    def __init__(self, keyring_backend: Any) -> None:
        self.kr = keyring_backend

    def get(self, account: str) -> str | None:
        return self.kr.get_password(SERVICE, account)  # type: ignore[no-any-return]

    def set(self, account: str, value: str) -> None:
        self.kr.set_password(SERVICE, account, value)

    def delete(self, account: str) -> bool:
        import keyring.errors

        try:
            self.kr.delete_password(SERVICE, account)
            return True
        except keyring.errors.PasswordDeleteError:
            return False


class SecretServiceStore(Store):
    """The freedesktop Secret Service over one kept-open D-Bus connection.

    Writes the attributes keyring's SecretService backend writes, so keyring,
    ``secret-tool lookup service homeagent username NAME`` and Seahorse all see
    the same entries.
    """

    enumerable = True

    def __init__(self) -> None:
        import secretstorage
        from secretstorage.util import open_session

        self._ss = secretstorage
        self.conn = secretstorage.dbus_init()
        self.collection = secretstorage.get_default_collection(self.conn)
        self.session = open_session(self.conn)
        self._paths: dict[str, str] = {}

    def _attrs(self, account: str) -> dict[str, str]:
        return {"application": "Python keyring library", "service": SERVICE, "username": account}

    def _item(self, account: str) -> Any | None:
        from secretstorage.item import Item

        path = self._paths.get(account)
        if path is None:
            found = next(iter(self.collection.search_items({"service": SERVICE, "username": account})), None)
            if found is None:
                return None
            path = self._paths[account] = found.item_path
        return Item(self.conn, path, session=self.session)

    def get(self, account: str) -> str | None:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        for _attempt in (0, 1):
            item = self._item(account)
            if item is None:
                return None
            try:
                return item.get_secret().decode("utf-8")  # type: ignore[no-any-return]
            except self._ss.exceptions.ItemNotFoundException:
                self._paths.pop(account, None)  # deleted behind our back: search again
        return None

    def set(self, account: str, value: str) -> None:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        item = self.collection.create_item(
            f"Password for '{account}' on '{SERVICE}'", self._attrs(account),
            value.encode("utf-8"), replace=True,
        )
        self._paths[account] = item.item_path

    def delete(self, account: str) -> bool:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        item = self._item(account)
        self._paths.pop(account, None)
        if item is None:
            return False
        item.delete()
        return True

    def accounts(self) -> AbstractSet[str]:
        if self.collection.is_locked():
            raise LockedError(LOCKED_MESSAGE)
        return {i.get_attributes().get("username", "") for i in self.collection.search_items({"service": SERVICE})}

    def is_locked(self) -> bool:
        return bool(self.collection.is_locked())

    def close(self) -> None:
        self.conn.close()


def open_store() -> Store:
    """The best store for ``keyring``'s chosen backend; raises if none is usable."""
    import keyring
    from keyring.backends import SecretService

    kr = keyring.get_keyring()
    problem = unusable_reason(kr)
    if problem is None:
        return SecretServiceStore() if isinstance(kr, SecretService.Keyring) else KeyringStore(kr)
    # keyring decides once per process; the session bus may have come up since
    # (a boot-time start), so ask the Secret Service directly before giving up.
    try:
        return SecretServiceStore()
    except Exception as exc:
        raise BackendUnavailableError(
            f"no usable OS keychain: {problem}, and the Secret Service does not answer "
            f"({type(exc).__name__}); check that a keyring daemon (e.g. gnome-keyring) runs "
            "on the session bus"
        ) from None


def unusable_reason(kr: Any) -> str | None:
    """Why keyring's chosen backend is not a real keychain, or None."""
    module = type(kr).__module__
    if module.startswith(("keyring.backends.fail", "keyring.backends.null", "keyrings.alt")):
        return f"keyring chose {module}.{type(kr).__name__}, which is not a real keychain"
    try:
        priority = float(kr.priority)
    except Exception as exc:
        return f"keyring's backend is not available ({exc})"
    if priority <= 0:
        return f"keyring's backend {type(kr).__name__} has priority {priority}"
    return None


def probe_keychain() -> str | None:
    """None when a write/read/delete of a reserved entry works, else why not."""
    try:
        store = open_store()
    except SecretsError as exc:
        return exc.message
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        token = f"probe-{time.time_ns()}"
        with keychain_errors("probe"):
            store.set(PROBE, token)
            ok = store.get(PROBE) == token
            store.delete(PROBE)
        return None if ok else "a probe entry did not read back"
    except SecretsError as exc:
        return exc.message
    finally:
        store.close()


