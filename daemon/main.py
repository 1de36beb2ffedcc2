"""secretsd: start-up, serve, shutdown.

Start-up hardens the process, reads the settings, locks the home, opens the
backend (and only then records the choice) and the socket (its own, or the one
systemd passed); serve runs until SIGTERM/SIGINT while keeping systemd
informed; shutdown stops accepting, lets calls in flight finish within a
deadline, wipes the data key and removes the socket it created.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import anyio

from homeagent_secrets.protocol import __version__
from homeagent_secrets.protocol.errors import SecretsError
from homeagent_secrets.protocol.messages import NoParams

from . import peer as peer_mod
from . import policy as policy_mod
from . import selection
from . import settings as settings_mod
from .agent import Agent
from .audit import AuditLog, under_systemd
from .backends.base import Backend
from .credentials import CredentialServer
from .dispatch import Dispatcher
from .hardening import bound_heap, harden_process
from .homelock import HomeLock
from .listener import BoundSocket, bind_unix, inherited_sockets
from .logsetup import setup_logging
from .migration import Migrator
from .peer import SELF
from .sdnotify import Notifier
from .server import Server, ServerLimits
from .settings import Settings
from .watch import poll_changes

log = logging.getLogger("homeagent_secrets.daemon")


async def status_line(agent: Agent) -> str:
    """The one line `systemctl status` shows for secretsd."""
    st = await agent.status(NoParams(), SELF)
    damaged = f", {len(st.damaged)} damaged record(s): see `secretsctl status`" if st.damaged else ""
    if not st.initialized:
        return f"not initialized ({st.backend} backend): run `secretsctl init`"
    if st.locked:
        return f"locked ({st.backend} backend): run `secretsctl unlock`"
    return f"unlocked ({st.backend} backend), {st.secrets} secret(s){damaged}"


async def keep_status_current(agent: Agent, notifier: Notifier) -> None:
    changed = anyio.Event()

    def on_change() -> None:
        changed.set()

    agent.on_change = on_change
    while True:
        notifier.notify(f"STATUS={await status_line(agent)}")
        await changed.wait()
        changed = anyio.Event()


async def watchdog(notifier: Notifier) -> None:
    assert notifier.watchdog_interval is not None
    while True:
        notifier.notify("WATCHDOG=1")
        await anyio.sleep(notifier.watchdog_interval)


async def audit_summaries(audit: AuditLog) -> None:
    """Once a second: the summary lines of denials held back (audit.py)."""
    while True:
        await anyio.sleep(1.0)
        audit.flush()


async def maintain(agent: Agent, interval: float) -> None:
    """Backend upkeep: the file store puts loosened modes back, a minute apart."""
    while True:
        await anyio.sleep(interval)
        try:
            await agent.backend.maintain()
        except OSError as exc:
            log.warning("maintenance failed: %s", exc.strerror)


async def auto_lock(agent: Agent, lock_after: float, max_unlocked: float) -> None:
    """gpg-agent's cache TTLs: lock when the key goes unused, or when unlocked too long."""
    step = min(1.0, *(t / 4 for t in (lock_after, max_unlocked) if t > 0))
    while True:
        await anyio.sleep(step)
        # The keychain backend has no agent lock (the OS keychain locks itself),
        # and a migration can switch backends while this runs.
        if not agent.backend.has_passphrase or agent.backend.locked:
            continue
        now = time.monotonic()
        idle = lock_after > 0 and now - agent.last_used >= lock_after
        aged = max_unlocked > 0 and agent.unlocked_at is not None and now - agent.unlocked_at >= max_unlocked
        if idle or aged:
            log.info("auto-lock: %s", "the key went unused too long" if idle else "unlocked too long")
            await agent.auto_lock()


async def open_backend(settings: Settings) -> Backend:
    """The backend the settings (and the recorded choice) ask for, opened.

    The choice is recorded only once the backend has reached its store, so a
    backend that cannot start is never written down as the installation's.
    """
    if settings.scrypt_log2_n < 17:
        log.warning("scrypt N=2^%d is below the recommended 2^17: use only for tests",
                    settings.scrypt_log2_n)
    kind, reason, recorded = selection.choose(settings)
    log.info("backend %s: %s", kind, reason)
    backend = selection.make_backend(kind, settings)
    await backend.open()
    if not recorded:
        if backend.reachable:
            await anyio.to_thread.run_sync(selection.write_record, settings.home_path, kind)
        else:
            log.warning("the %s backend did not answer at start; the choice is not recorded "
                        "until a start where it does", kind)
    return backend


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT."""
    home = settings.home_path
    passed = inherited_sockets()
    bound = passed.get("agent")
    where = str(settings.socket_path) if bound is None else bound.name()
    lock = HomeLock(home)
    await anyio.to_thread.run_sync(lock.acquire, where)
    try:
        await serve(settings, bound, passed.get("credentials"), where)
    finally:
        lock.release()


def group_id(name: str | None) -> int | None:
    """The gid of ``socket_group`` (a name or a number)."""
    if name is None:
        return None
    import grp

    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise settings_mod.ConfigError(f"socket_group: no group named {name!r} on this system") from None


async def reload(agent: Agent, settings: Settings) -> None:
    """SIGHUP: read the rules again (a bad file keeps the old rules) and reopen the log."""
    if settings.policy_file:
        try:
            policy = await anyio.to_thread.run_sync(policy_mod.load, Path(settings.policy_file))
        except policy_mod.PolicyError as exc:
            log.error("reload refused, the old rules stay in force: %s", exc.message)
        else:
            agent.set_policy(policy)
            log.info("reloaded the access rules from %s: %d rule(s), %d credential(s)",
                     settings.policy_file, len(policy.rules), len(policy.credentials))
    agent.audit.reopen()


async def serve(settings: Settings, bound: BoundSocket | None, creds: BoundSocket | None,
                where: str) -> None:
    notifier = Notifier()
    policy = (policy_mod.load(Path(settings.policy_file)) if settings.policy_file
              else policy_mod.Policy())
    try:
        audit = AuditLog(Path(settings.audit_log) if settings.audit_log else None, under_systemd())
    except OSError as exc:
        raise settings_mod.ConfigError(f"cannot open the access log {settings.audit_log}: "
                                       f"{exc.strerror}") from None
    if policy.active and peer_mod.UNMAPPED_UID is not None:
        log.warning("secretsd runs in a user namespace that maps no other users (PrivateUsers=yes?): "
                    "every peer of another uid reads as uid %d, so the access rules grant them nothing; "
                    "run it without PrivateUsers= for the rules to apply", peer_mod.UNMAPPED_UID)
    backend = await open_backend(settings)
    home = settings.home_path
    agent = Agent(
        backend, max_value_bytes=settings.max_value_bytes, clock=time.monotonic, home=home,
        migrator=Migrator(home, lambda kind: selection.make_backend(kind, settings),
                          lambda kind: selection.write_record(home, kind)),
        policy=policy, audit=audit,
    )
    pending = agent.migrator.pending(backend.name) if agent.migrator else None
    if pending is not None:
        log.warning("a migration from %s to %s left originals in %s: run `secretsctl migrate "
                    "--to %s` to remove them", pending.source, pending.target, pending.source,
                    pending.target)
    if bound is None:
        bound = bind_unix(settings.socket_path, group=group_id(settings.socket_group))
    if creds is None and settings.credentials_socket:
        # systemd (root) connects; nobody else is believed, and the file stays 0600.
        creds = bind_unix(Path(settings.credentials_socket))
    server = Server(
        Dispatcher(agent),
        bound.sock,
        ServerLimits(
            max_frame=settings.max_frame,
            idle_timeout=settings.idle_timeout,
            max_connections=settings.max_connections,
            drain_timeout=settings.drain_timeout,
        ),
    )
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                await tg.start(server.serve)
                if creds is not None:
                    await tg.start(CredentialServer(agent, creds.sock).serve)
                notifier.notify("READY=1", f"STATUS={await status_line(agent)}")
                tg.start_soon(keep_status_current, agent, notifier)
                tg.start_soon(maintain, agent, settings.maintenance_interval)
                tg.start_soon(audit_summaries, audit)
                tg.start_soon(poll_changes, agent.hub, lambda: agent.backend.versions(),
                              settings.openbao_watch_interval)
                if notifier.watchdog_interval:
                    tg.start_soon(watchdog, notifier)
                if settings.lock_after > 0 or settings.max_unlocked > 0:
                    if not backend.has_passphrase:
                        log.warning("--lock-after/--max-unlocked do not apply to the %s backend: "
                                    "it has no agent passphrase to lock", backend.name)
                    tg.start_soon(auto_lock, agent, settings.lock_after, settings.max_unlocked)
                log.info(
                    "secretsd %s serving %s on %s (backend %s, %s)",
                    __version__, home, where, backend.name,
                    "initialized" if backend.initialized else "not initialized: run `secretsctl init`",
                )
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        notifier.notify("RELOADING=1")
                        await reload(agent, settings)
                        notifier.notify("READY=1", f"STATUS={await status_line(agent)}")
                        continue
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    notifier.notify("STOPPING=1", "STATUS=stopping: finishing requests in flight")
                    server.stop_accepting()
                    break
            # Serving is over once the drain ends; the helpers go with it.
            await server.stopped.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await agent.backend.close()  # the one in use: a migration may have switched it
        bound.remove()
        if creds is not None:
            creds.remove()
        audit.close()
        notifier.close()
        log.info("stopped; data key wiped")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secretsd`` command."""
    harden_process()
    bound_heap()
    try:
        settings = settings_mod.load(argv)
    except SecretsError as exc:
        print(f"secretsd: {exc.message}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        anyio.run(run, settings)
    except (settings_mod.ConfigError, policy_mod.PolicyError) as exc:
        log.error("%s", exc.message)
        return 2
    except SecretsError as exc:
        log.error("%s", exc.message)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
