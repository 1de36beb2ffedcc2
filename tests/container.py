"""A real systemd as PID 1 in a container, for tests that drive units as an admin would.

    with booted(extra_packages=["procps"]) as c:   # Debian 12, cached rootfs; boots in ~1 s
        c.copy_in(checkout, "/root/src", files)
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
            check=False, capture_output=True, text=True)
        if out.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise ContainerError(f"mmdebstrap failed ({out.returncode}): {out.stderr[-2000:]}")
        partial.rename(final)
    return final


def host_pip_settings() -> tuple[dict[str, str], Path, list[str]]:
    """(the host's [global] pip settings, its CA bundle, the host directories they name).

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
    bundle = next((Path(c) for c in (settings.pop("cert", None), os.environ.get("REQUESTS_CA_BUNDLE"),
                                     "/etc/ssl/certs/ca-certificates.crt") if c and os.path.isfile(c)), None)
    if bundle is None:
        raise ContainerError("no CA bundle on the host to give pip inside the container")
    binds: list[str] = []
    for key in ("index-url", "extra-index-url", "find-links"):
        for item in settings.get(key, "").split():
            path = item.removeprefix("file://")
            if path.startswith("/") and os.path.isdir(path):
                # A local "simple" index links its files by relative paths beside it.
                binds.append(str(Path(path).parent) if Path(path).name == "simple" else path)
    return settings, bundle, binds


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
        settings, bundle, self._binds = host_pip_settings()
        shutil.copyfile(bundle, self.root / CA_BUNDLE.lstrip("/"))
        settings["cert"] = CA_BUNDLE
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
        cmd = ["systemd-nspawn", "--quiet", "-D", str(self.root), "--boot", "--register=no",
               "--keep-unit", f"--machine={self.name}", "--console=read-only",
               # nspawn's own seccomp filter allows mlock only to containers with
               # CAP_IPC_LOCK; a real host has no such filter, and secretsd mlocks its key.
               "--system-call-filter=@memlock",
               f"--bind={self.pip_cache}:/root/.cache/pip",
               *(f"--bind-ro={b}" for b in self._binds)]
        # Its own process group: a stuck nspawn can be killed with everything it started.
        with open(self.console_log, "ab") as log:
            self._nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
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
                raise ContainerError(f"boot ended in state {state!r}; console: "
                                     + self.console_log.read_text(errors="replace")[-2000:])
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
                                 text=True, timeout=timeout, check=False)
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

    def copy_in(self, src: Path, dest: str, files: Sequence[str] | None = None, owner: str | None = None) -> None:
        """Copy ``src`` (or the listed files below it) to ``dest`` inside, owned by ``owner`` (else root).

        Through tar into the container, so every path resolves inside it (the
        rootfs has absolute symlinks, which would point into the host from here).
        """
        self.run(["mkdir", "-p", dest])
        names = "\0".join(files if files is not None else ["."]).encode()
        pack = subprocess.Popen(["tar", "-C", str(src), "--null", "-T", "-", "-cf", "-"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        unpack = subprocess.Popen(self.command(["tar", "-C", dest, "--no-same-owner", "-xf", "-"]),
                                  stdin=pack.stdout, stderr=subprocess.PIPE)
        assert pack.stdin is not None and pack.stdout is not None
        pack.stdout.close()  # unpack holds it now
        pack.stdin.write(names)
        pack.stdin.close()
        _, err = unpack.communicate(timeout=120)
        if pack.wait(120) != 0 or unpack.returncode != 0:
            raise ContainerError(f"copying {src} to {dest} failed: {err.decode(errors='replace')}")
        if owner is not None:
            self.run(["chown", "-R", f"{owner}:", dest])

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
                try:
                    subprocess.run(["nsenter", "-t", str(self._pid1), "-a", "--", "systemctl", "poweroff"],
                                   capture_output=True, timeout=10, check=False)
                except subprocess.TimeoutExpired:
                    pass  # the signals below end it
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
