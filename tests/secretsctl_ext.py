"""secretsctl with ``run`` and ``watch`` added, for the tests: ``python -m tests.secretsctl_ext``.

It runs ``cli.main`` itself, with ``cli.parser`` extended by ``add_run_parser``
and ``add_watch_parser`` exactly as cli.py wires them (and leaves them alone
once cli.py has them).
"""

from __future__ import annotations

import argparse
import sys

from homeagent_secrets.client import cli
from homeagent_secrets.client.run import add_run_parser
from homeagent_secrets.client.watchcli import add_watch_parser

_parser = cli.parser


def parser() -> argparse.ArgumentParser:
    p = _parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    if "run" not in sub.choices:
        add_run_parser(sub)
    if "watch" not in sub.choices:
        add_watch_parser(sub)
    return p


cli.parser = parser

if __name__ == "__main__":
    sys.exit(cli.main())
