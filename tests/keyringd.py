"""A real GNOME Keyring on a private D-Bus session bus, headless.

What `dbus-run-session` + `gnome-keyring-daemon --unlock` give a desktop
session, made here so the test process knows the bus address: a session
dbus-daemon, then gnome-keyring-daemon (secrets component) unlocked with a
test password on stdin, in a temporary HOME and XDG directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import require_real

KEYRING_PASSWORD = "keyring-test-password"

# A session bus with no service directories: nothing is D-Bus-activated, so
# the only Secret Service on it is the unlocked gnome-keyring started below
# (an activated second instance would race it for the name, locked).
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={runtime}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def available() -> bool:
    return all(shutil.which(t) for t in ("dbus-daemon", "gnome-keyring-daemon"))


def _ready(address: str, timeout: float = 15.0) -> None:
    import secretstorage
    from jeepney.io.blocking import open_dbus_connection

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = open_dbus_connection(bus=address)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            if secretstorage.check_service_availability(conn):
                col = secretstorage.get_default_collection(conn)
                if not col.is_locked():
                    return
        except Exception:
            pass
        finally:
            conn.close()
        time.sleep(0.05)
    raise TimeoutError("gnome-keyring did not come up on the test bus")


@contextmanager
def gnome_keyring(base: Path) -> Iterator[dict[str, str]]:
    """Yield the environment (HOME, XDG_*, DBUS_SESSION_BUS_ADDRESS) of a fresh keyring."""
    require_real(available(), "GNOME Keyring (dbus-daemon + gnome-keyring-daemon)")
    home = base / "kr-home"
    runtime = base / "kr-run"
    for d in (home, runtime):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime),
           "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    config = base / "kr-bus.conf"
    config.write_text(_BUS_CONFIG.format(runtime=runtime))
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--nopidfile",
                            "--print-address=1"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    procs: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = [bus]
    try:
        address = bus.stdout.readline().strip()  # type: ignore[union-attr]
        assert address, "dbus-daemon printed no address"
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        gk_log = open(base / "gnome-keyring.log", "wb")
        gk = subprocess.Popen(["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
                              stdin=subprocess.PIPE, stdout=gk_log, stderr=gk_log, env=env)
        gk_log.close()
        procs.append(gk)
        gk.stdin.write(KEYRING_PASSWORD.encode())  # type: ignore[union-attr]
        gk.stdin.close()  # type: ignore[union-attr]
        try:
            _ready(address)
        except TimeoutError:
            log = (base / "gnome-keyring.log").read_text(errors="replace")[-2000:]
            raise TimeoutError(f"gnome-keyring did not come up (exit {gk.poll()}): {log}") from None
        yield env
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
