"""The import rules of the layering, checked mechanically.

- protocol/ imports nothing of ours and nothing but the standard library and msgspec;
- client/ imports only protocol/ (and msgspec, anyio), never the daemon or its
  crypto, keychain and HTTP stacks;
- daemon/ never imports client/.
And the blocking client (so secretsctl) loads neither anyio nor any of those.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
STDLIB = sys.stdlib_module_names
ALLOWED = {
    "protocol": {"msgspec", "homeagent_secrets.protocol"},
    "client": {"msgspec", "anyio", "homeagent_secrets.protocol", "homeagent_secrets.client"},
    "daemon": {"msgspec", "anyio", "cryptography", "keyring", "secretstorage", "hvac", "requests",
               "homeagent_secrets.protocol", "homeagent_secrets.daemon"},
}


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative ones resolved)."""
    found: set[str] = set()
    parts = ["homeagent_secrets", package, *path.relative_to(ROOT / package).with_suffix("").parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return found


#: Narrow exceptions, by file: client/keyring_backend.py is keyring's plugin. keyring
#: loads it through the ``keyring.backends`` entry point, so keyring is already
#: imported whenever it is; nothing else in client/ imports it (checked below).
EXCEPTIONS = {"client/keyring_backend.py": {"keyring"}}


def allowed(name: str, package: str) -> bool:
    top = name.split(".")[0]
    if top in STDLIB or top == "__future__":
        return True
    return any(name == a or name.startswith(a + ".") for a in ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_its_layer_may(package: str) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        extra = EXCEPTIONS.get(str(path.relative_to(ROOT)), set())
        for name in imports_of(path, package):
            if not allowed(name, package) and name.split(".")[0] not in extra:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_nothing_in_client_imports_the_keyring_plugin() -> None:
    """The exception stays narrow: only keyring (through the entry point) loads it."""
    users = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "client").rglob("*.py"))
             if any(n.endswith("keyring_backend") for n in imports_of(p, "client"))]
    assert users == []


def test_the_rules_themselves_catch_a_violation(tmp_path: Path) -> None:
    """The checker fails on the imports it forbids (it is not a test that cannot fail)."""
    assert not allowed("homeagent_secrets.daemon.agent", "client")
    assert not allowed("cryptography.hazmat", "client")
    assert not allowed("homeagent_secrets.client", "daemon")
    assert not allowed("anyio", "protocol")
    assert allowed("homeagent_secrets.protocol.errors", "client") and allowed("os", "protocol")


def test_the_blocking_client_loads_no_async_crypto_or_http_stack() -> None:
    code = ("import sys, homeagent_secrets.client.cli, homeagent_secrets.client as c; c.SecretsClient; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'anyio', 'cryptography', 'keyring', 'hvac', 'requests', 'secretstorage', 'asyncio'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
