"""A real systemd as PID 1 in a container, for tests that drive units as an admin would.

    with booted(checkout=ROOT) as c:          # Debian 12 rootfs, cached; boots in ~3 s
        c.run(["systemctl", "enable", "--now", "x.socket"])
        c.run(["secretsctl", "status"], user="homeagent", env={...})
        c.reboot()
        assert "canary" not in c.journal()

The root file system is built once with mmdebstrap (``--variant=minbase`` plus
systemd and python3-venv) and cached under ``/var/cache/homeagent-tests/``
keyed by its package list; every container boots a private copy of it, so
tests may change anything. The container shares the host's network (pip needs
PyPI) and gets the host's pip settings: its CA bundle, index URLs, and the
local directories those name, bound read-only. Commands run in it through
``nsenter`` into all of PID 1's namespaces, so no login, getty or
machinectl is involved and the host need not run systemd itself.

Needs root, ``systemd-nspawn`` (apt: systemd-container) and ``mmdebstrap``;
``unavailable()`` says which is missing. Every container is powered off and
its copy deleted by ``stop()`` (``booted()`` calls it, pass or fail).
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
CACHE = Path(os.environ.get("HOMEAGENT_CONTAINER_CACHE", "/var/cache/homeagent-tests"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the host's CA bundle lands inside, for pip (only the registries are reachable).
CA_BUNDLE = "/etc/ssl/certs/homeagent-tests-host-ca.pem"


class ContainerError(RuntimeError):
    """The container did not boot, stop or answer as expected."""


def unavailable() -> str | None:
    """Why no container can boot here, or None when one can."""
    if os.geteuid() != 0:
        return "root (systemd-nspawn and mmdebstrap)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("mmdebstrap", "mmdebstrap"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"the {tool} tool (apt-get install {package})"
    return None


# --- the root file system ------------------------------------------------------------------


def rootfs(extra_packages: Sequence[str] = ()) -> Path:
    """A cached Debian rootfs with systemd and python3-venv (built on first use, ~25-45 s)."""
    packages = sorted({*PACKAGES, *extra_packages})
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(packages)}".encode()).hexdigest()[:16]
    final = CACHE / f"rootfs-{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    # One builder at a time; a second test run waits, then reuses.
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "etc/os-release").exists():
            return final
        partial = CACHE / f".building-{key}"
        shutil.rmtree(partial, ignore_errors=True)
        out = subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(partial)],
            capture_output=True, text=True)
        if out.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise ContainerError(f"mmdebstrap failed ({out.returncode}): {out.stderr[-2000:]}")
        partial.rename(final)
    return final


def host_pip_settings() -> tuple[dict[str, str], list[str]]:
    """([global] pip settings for the container, host directories they need).

    Only the registries are reachable, often through an intercepting proxy: pip
    inside needs the host's CA bundle and whatever index settings the host uses.
    """
    settings: dict[str, str] = {}
    parser = configparser.ConfigParser()
    parser.read(["/etc/pip.conf", "/etc/xdg/pip/pip.conf",
                 os.path.expanduser("~/.config/pip/pip.conf"), os.path.expanduser("~/.pip/pip.conf")])
    for key in ("index-url", "extra-index-url", "find-links", "trusted-host", "cert"):
        if parser.has_option("global", key):
            settings[key] = parser.get("global", key)
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            settings[key] = env
    settings.pop("cert", None)  # replaced by the copied bundle
    settings["cert"] = CA_BUNDLE
    binds: list[str] = []
    for key in ("index-url", "extra-index-url", "find-links"):
        for item in settings.get(key, "").split():
            path = item.removeprefix("file://") if item.startswith("file://") else item
            if path.startswith("/") and os.path.isdir(path):
                # A local "simple" index links its files by relative paths beside it.
                binds.append(str(Path(path).parent) if Path(path).name == "simple" else path)
    return settings, binds


def host_ca_bundle() -> Path:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    raise ContainerError("no CA bundle on the host to give pip inside the container")


# --- one container ---------------------------------------------------------------------------


class Container:
    """A booted copy of the rootfs; ``run`` executes commands inside it as root or a user."""

    def __init__(self, base: Path, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.name = f"ha-{secrets.token_hex(4)}"
        self.console_log = workdir / "console.log"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None
        self.boots = 0
        self.state = ""
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(self.root)], check=True)
        # A fixed machine id: one journal directory across reboots.
        (self.root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
        (self.root / "etc/hostname").write_text(self.name + "\n")
        settings, self._binds = host_pip_settings()
        shutil.copyfile(host_ca_bundle(), self.root / CA_BUNDLE.lstrip("/"))
        (self.root / "etc/pip.conf").write_text(
            "[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.pip_cache = CACHE / "pip"
        self.pip_cache.mkdir(parents=True, exist_ok=True)

    @property
    def pid1(self) -> int:
        """The host PID of the container's systemd."""
        if self._pid1 is None:
            raise ContainerError("the container is not running")
        return self._pid1

    def boot(self, timeout: float = 90) -> float:
        """Start systemd as PID 1 and wait until it reports running; returns seconds taken."""
        if self._nspawn is not None:
            raise ContainerError("already booted")
        t0 = time.monotonic()
        log = open(self.console_log, "ab")
        cmd = ["systemd-nspawn", "--quiet", "-D", str(self.root), "--boot", "--register=no",
               "--keep-unit", f"--machine={self.name}", "--console=read-only",
               # nspawn's own seccomp filter allows mlock only to containers with
               # CAP_IPC_LOCK; a real host has no such filter, and secretsd mlocks its key.
               "--system-call-filter=@memlock",
               f"--bind={self.pip_cache}:/root/.cache/pip",
               *(f"--bind-ro={b}" for b in self._binds)]
        # Its own process group: a stuck nspawn can be killed with everything it started.
        self._nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
        log.close()
        self.boots += 1
        try:
            self._pid1 = self._find_pid1(t0 + timeout)
            state = ""
            while time.monotonic() < t0 + timeout:
                # Before PID 1 has its private bus up, systemctl fails at once: retry.
                out = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                               timeout=max(1.0, t0 + timeout - time.monotonic()))
                state = out.stdout.strip()
                if state in ("running", "degraded"):
                    break
                time.sleep(0.1)
            if state not in ("running", "degraded"):
                raise ContainerError(f"boot ended in state {state!r}")
            self.state = state  # "degraded": some unit failed; `systemctl --failed` says which
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - t0

    def _find_pid1(self, deadline: float) -> int:
        assert self._nspawn is not None
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self._nspawn.returncode}: "
                                     + self.console_log.read_text(errors="replace")[-2000:])
            for child in _children(self._nspawn.pid):
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                except OSError:
                    continue
                nspid = next((line.split()[1:] for line in status.splitlines()
                              if line.startswith("NSpid:")), [])
                if len(nspid) == 2 and nspid[1] == "1":
                    return child
            time.sleep(0.02)
        raise ContainerError("the container's PID 1 did not appear")

    def command(self, cmd: Sequence[str] | str, *, user: str | None = None,
                env: Mapping[str, str] | None = None) -> list[str]:
        """The host argv that runs ``cmd`` (argv, or a string for ``sh -c``) inside.

        As root or ``user`` (no PAM, no session), with a clean environment (PATH,
        HOME, LANG) plus ``env``. The command dies with the nsenter that started
        it (parent-death signal), so killing what the host started kills it too.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        if user is None:
            inner = ["setpriv", "--pdeathsig=KILL", "--", "env", "-i", f"PATH={PATH}", "HOME=/root",
                     "LANG=C.UTF-8", *extra, *argv]
        else:
            # --reset-env sets HOME/USER/SHELL from passwd.
            gid = self.run(["id", "-g", user]).stdout.strip()
            inner = ["setpriv", "--pdeathsig=KILL", f"--reuid={user}", f"--regid={gid}", "--init-groups",
                     "--reset-env", "--", "env", f"PATH={PATH}", "LANG=C.UTF-8", *extra, *argv]
        return ["nsenter", "-t", str(self.pid1), "-a", "--", *inner]

    def run(self, cmd: Sequence[str] | str, *, user: str | None = None, check: bool = True,
            input: str | None = None, env: Mapping[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside (see ``command``) and wait; with ``check`` a failure
        raises ContainerError carrying the command's output."""
        full = self.command(cmd, user=user, env=env)
        shown = shlex.join(full[full.index("--", full.index("setpriv")) + 1:])
        try:
            out = subprocess.run(full, input=input if input is not None else "", capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"timed out after {timeout} s: {shown}") from exc
        if check and out.returncode != 0:
            raise ContainerError(f"`{shown}` exited {out.returncode}\n"
                                 f"stdout: {out.stdout[-3000:]}\nstderr: {out.stderr[-3000:]}")
        return out

    def popen(self, cmd: Sequence[str] | str, *, user: str | None = None,
              env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside without waiting; the caller kills and waits for it."""
        return subprocess.Popen(self.command(cmd, user=user, env=env), **kwargs)

    def host_pid(self, pid: int) -> int:
        """The host PID of the container's process ``pid``."""
        for child in _descendants(self.pid1):
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) >= 2 and nspid[-1] == str(pid):
                return child
        raise ContainerError(f"no process {pid} in the container")

    def copy_in(self, src: Path, dest: str, files: Sequence[str] | None = None, owner: str | None = None) -> None:
        """Copy ``src`` (or the listed files below it) to ``dest`` inside; chown to ``owner``."""
        target = self.root / dest.lstrip("/")
        if files is None:
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            for rel in files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, target / rel, follow_symlinks=False)
        if owner is not None:
            self.run(["chown", "-R", f"{owner}:{owner}", dest])

    def journal(self, *args: str) -> str:
        """The container's journal, every boot (``journalctl`` arguments may narrow it)."""
        return self.run(["journalctl", "--no-pager", "-q", *args]).stdout

    def reboot(self, timeout: float = 90) -> float:
        """``systemctl reboot`` inside, then boot again; returns seconds until running again."""
        t0 = time.monotonic()
        self.run(["systemctl", "reboot"], check=False)
        self._wait_nspawn_exit(timeout)
        self.boot(timeout)
        return time.monotonic() - t0

    def _wait_nspawn_exit(self, timeout: float) -> int:
        assert self._nspawn is not None
        try:
            rc = self._nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"the container did not shut down within {timeout} s") from None
        self._nspawn = None
        self._pid1 = None
        return rc

    def stop(self, timeout: float = 30) -> None:
        """Power off (SIGTERM, then SIGKILL, to nspawn if that hangs) and delete the copy."""
        if self._nspawn is not None:
            if self._nspawn.poll() is None and self._pid1 is not None:
                subprocess.run(["nsenter", "-t", str(self._pid1), "-a", "--", "systemctl", "poweroff"],
                               capture_output=True, timeout=10, check=False)
            try:
                self._nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                # nspawn turns SIGTERM into a clean halt of the container.
                self._nspawn.send_signal(signal.SIGTERM)
                try:
                    self._nspawn.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(self._nspawn.pid, signal.SIGKILL)
                    self._nspawn.wait()
            self._nspawn = None
            self._pid1 = None
        if self.workdir.exists():
            # --one-file-system: never follow a mount that outlived the container.
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.workdir)], check=False)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            kids += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return kids


def _descendants(pid: int) -> Iterator[int]:
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        todo += _children(p)


@contextmanager
def booted(extra_packages: Sequence[str] = ()) -> Iterator[Container]:
    """A freshly booted container, stopped and deleted afterwards, pass or fail."""
    base = rootfs(extra_packages)
    workdir = Path(tempfile.mkdtemp(prefix="ha-ct-", dir="/var/tmp"))
    try:
        c = Container(base, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        c.boot()
        yield c
    finally:
        c.stop()
