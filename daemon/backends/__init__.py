"""The storage backends: one contract (``base.py``), three implementations.

- ``files.py``: AES-256-GCM records under the home, the embedded default, with
  ``records.py`` (a record), ``manifest.py`` (the list of every record, and the
  check of a directory against it), ``committer.py`` (the manifest while
  running: group commits, the write gate), ``datakey.py`` (the wrapped data
  key), ``rekey.py`` and ``staging.py`` (a store rebuilt beside the old one and
  switched in), ``upgrade.py`` (the format-1 reader) and ``atomicfile.py``;
- ``keychain.py`` (with ``keychain_store.py``): the OS keychain through ``keyring``;
- ``openbao.py`` (with ``openbao_client.py``): an OpenBao/Vault KV v2 engine.
"""
