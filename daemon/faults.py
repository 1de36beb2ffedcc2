"""Crash points for the crash-consistency tests.

``HOMEAGENT_CRASH_AT=<point>`` makes the daemon SIGKILL itself when it reaches
that point, exactly as a power cut or an OOM kill would stop it there. Unset
(always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(point: str) -> None:
    """Die here, at once and without cleanup, if the tests asked for it."""
    if os.environ.get("HOMEAGENT_CRASH_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
