"""The ``secretsd`` command: the agent, or one line saying how to install it.

A base install is the client only; the agent's packages come with the
``daemon`` extra. This module imports nothing of them, so their absence is a
clear message, not a traceback.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run secretsd (see ``main.py``)."""
    if sys.argv[1:] == ["--version"]:  # answered even where the daemon extra is missing
        from homeagent_secrets.protocol import __version__

        print(f"secretsd {__version__}")
        return 0
    try:
        from .main import main as run
    except ImportError as exc:
        print(f"secretsd: the agent needs the Python package {exc.name!r}, which is not "
              "installed: pip install 'homeagent-secrets[daemon]'", file=sys.stderr)
        return 2
    return run()


if __name__ == "__main__":
    sys.exit(main())
