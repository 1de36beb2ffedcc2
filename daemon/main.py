"""secretsd: start-up, serve, shutdown.

Start-up builds the backend and the socket; serve runs until SIGTERM/SIGINT;
shutdown stops accepting, lets requests in flight finish within a deadline,
wipes the data key and removes the socket it created.
"""

from __future__ import annotations

import logging
import signal
import sys

import anyio

from homeagent_secrets.protocol import __version__
from homeagent_secrets.protocol.errors import SecretsError

from . import config as config_mod
from .agent import Agent
from .backend import Backend
from .config import Config
from .datakey import KdfParams
from .filestore import FileBackend
from .listener import BoundSocket, bind_unix, inherited_socket
from .logsetup import setup_logging
from .server import Server, ServerLimits

log = logging.getLogger("homeagent_secrets.daemon")


def make_backend(cfg: Config) -> Backend:
    """The storage backend the settings ask for."""
    if cfg.scrypt_log2_n < 17:
        log.warning("scrypt N=2^%d is below the recommended 2^17: use only for tests", cfg.scrypt_log2_n)
    kind = "file" if cfg.backend == "auto" else cfg.backend
    if kind == "file":
        return FileBackend(cfg.home, KdfParams(log2_n=cfg.scrypt_log2_n))
    raise config_mod.ConfigError(f"the {kind} backend is not available in this build")


async def run(cfg: Config) -> None:
    """Serve until SIGTERM or SIGINT."""
    backend = make_backend(cfg)
    await backend.open()
    agent = Agent(backend, max_value_bytes=cfg.max_value_bytes)
    bound: BoundSocket | None = inherited_socket()
    if bound is None:
        bound = bind_unix(cfg.socket)
        where = str(cfg.socket)
    else:
        where = "the socket passed by systemd"
    server = Server(
        agent,
        bound.sock,
        ServerLimits(
            max_frame=cfg.max_frame,
            idle_timeout=cfg.idle_timeout,
            max_connections=cfg.max_connections,
            drain_timeout=cfg.drain_timeout,
        ),
    )
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await tg.start(server.serve)
                log.info(
                    "secretsd %s serving on %s (backend %s, %s)",
                    __version__, where, backend.name,
                    "initialized" if backend.initialized else "not initialized: run `secretsctl init`",
                )
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    server.stop_accepting()
                    break
    finally:
        with anyio.CancelScope(shield=True):
            await backend.close()
        bound.remove()
        log.info("stopped; data key wiped")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secretsd`` command."""
    try:
        cfg = config_mod.load(argv)
    except SecretsError as exc:
        print(f"secretsd: {exc.message}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        anyio.run(run, cfg)
    except SecretsError as exc:
        log.error("%s", exc.message)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
