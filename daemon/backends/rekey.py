"""Rebuilding the whole store under a new data key: rekey and the format-1 upgrade.

A new data key is generated; every record is sealed under it (new file ids:
the name key changes too) with its life's record id and one generation for
the whole rebuilt store; then the manifest and the wrapped-key file, under the
(new) passphrase. All of it goes to ``secrets.next``, which ``staging``
switches in atomically; the old store, key first, is removed after the
switch. Plaintext values exist one record at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from homeagent_secrets.protocol.secret import Secret

from ..faults import crash_point
from . import datakey, manifest, records, staging
from .datakey import DataKey, KdfParams
from .manifest import Entry, Manifest, Slot
from .records import Meta, Values

log = logging.getLogger(__name__)

WRAPPED_KEY_FILE = "wrapped-key"


@dataclass
class Rebuilt:
    """The new store's key and manifest (its index is read back by the caller)."""

    key: DataKey
    generation: int
    entries: dict[str, Entry]


def rebuild(home: Path, source: Iterable[tuple[bytes | None, Meta, Values]], passphrase: Secret,
            kdf: KdfParams, generation: int) -> Rebuilt:
    """Write the store of ``source`` (record id or None for a new one, metadata, values)
    under a new key, and switch to it. Before the switch an error leaves the old store."""
    key = DataKey.generate()
    assert key.aead is not None and key.manifest_aead is not None
    switched = False
    try:
        nxt = staging.new_staging(home)
        entries: dict[str, Entry] = {}
        for record_id, meta, values in source:
            fid = key.file_id(meta.name)
            rid = record_id or os.urandom(records.RECORD_ID_BYTES)
            staging.write_new(nxt, fid + records.SUFFIX,
                              records.seal(key.aead, fid, generation, rid, meta, values))
            entries[fid] = Entry(Slot(rid, generation))
            crash_point("rebuild-wrote-record")
        staging.write_new(nxt, manifest.FILE,
                          manifest.seal(key.manifest_aead, Manifest(generation, entries)))
        staging.write_new(nxt, WRAPPED_KEY_FILE, datakey.wrap(key.key, passphrase, kdf))
        crash_point("rebuild-before-marker")
        staging.finish_staging(home)
        crash_point("rebuild-before-switch")
        staging.switch(home)
        switched = True
        crash_point("rebuild-after-switch")
    except BaseException:
        if not switched:
            key.wipe()
            try:
                if os.path.lexists(home / staging.NEXT):
                    staging.remove_store(home / staging.NEXT)
            except OSError:
                pass  # removed at the next start
        raise
    try:
        staging.finish_switch(home)
    except OSError as exc:
        log.error("the old store could not be removed (%s); the next start removes it", exc)
    return Rebuilt(key, generation, entries)
