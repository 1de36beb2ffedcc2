"""Crash points and injected faults for the reliability tests.

``HOMEAGENT_CRASH_AT=<point>`` (or ``<point>:<n>``, the n-th time it is
reached) makes the daemon SIGKILL itself there, exactly as a power cut or an
OOM kill would stop it. ``HOMEAGENT_FAULT=<name>[=<arg>],...`` turns on a fault
that real conditions cause but a test cannot summon on demand (an allocation
failing inside one connection, a slow disk). Unset (always, outside tests) each
costs one comparison: the environment is read once, at import.
"""

from __future__ import annotations

import os
import signal
from typing import Final

_CRASH_AT: Final = os.environ.get("HOMEAGENT_CRASH_AT", "")
_CRASH_POINT, _, _CRASH_COUNT = _CRASH_AT.partition(":")
_hits = 0
FAULTS: Final[dict[str, str]] = {
    item.partition("=")[0]: item.partition("=")[2]
    for item in os.environ.get("HOMEAGENT_FAULT", "").split(",") if item
}

#: With the ``connection-error`` fault, a call naming this secret raises
#: MemoryError inside its connection (as a failed allocation would).
CONNECTION_ERROR_NAME: Final = "fault/connection-error"


def crash_point(point: str) -> None:
    """Die here, at once and without cleanup, if the tests asked for it."""
    global _hits
    if _CRASH_POINT and point == _CRASH_POINT:
        _hits += 1
        if _hits >= int(_CRASH_COUNT or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def fault_delay(name: str) -> float:
    """Seconds the ``name`` fault asks to wait (0.0 when it is off)."""
    return float(FAULTS[name] or 0) if name in FAULTS else 0.0
