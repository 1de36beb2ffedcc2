"""The storage backends: one contract (``base.py``), three implementations.

- ``files.py`` (with ``records.py``, ``datakey.py``, ``atomicfile.py``): AES-256-GCM
  records under the home, the embedded default;
- ``keychain.py`` (with ``keychain_store.py``): the OS keychain through ``keyring``;
- ``openbao.py`` (with ``openbao_client.py``): an OpenBao/Vault KV v2 engine.
"""
