"""A real single-node Ray cluster started with `ray start --head --block`, for Jobs API tests.

Why `--block` in its own process group and not `ray stop`: `ray stop` kills every Ray process on the machine,
including the clusters of other test runs sharing it; ending our own `ray start` process group stops only ours.
The cluster runs with token authentication (a random token passed through RAY_AUTH_TOKEN), like a default Ray 2.60
head, so tests exercise the same auth path as a real cluster.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

RAY_BIN = Path(sys.executable).with_name("ray")


@dataclass(frozen=True)
class LocalRayCluster:
    """What a test needs to talk to the cluster: the dashboard address, the auth token, the GCS address (for a
    driver joining with ray.init)."""

    address: str
    token: str
    temp_dir: Path
    num_cpus: int
    gcs: str = ""


def free_port() -> int:
    """A port free right now on 127.0.0.1 (tiny race with other processes, acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(address: str, token: str, proc: subprocess.Popen, log: Path, timeout_s: float,
                nodes: int = 1) -> None:
    """Poll until the dashboard answers and ``nodes`` nodes have registered their resources."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException, ValueError, KeyError):
            r = requests.get(f"{address}/api/v0/nodes", headers=headers, timeout=2)
            if r.ok and len([n for n in r.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]) >= nodes:
                return
        time.sleep(0.3)
    raise RuntimeError(f"Ray head at {address} not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM our `ray start --block` (it tears its children down in ~2 s), then SIGKILL what remains of its group."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    time.sleep(1.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@dataclass(frozen=True)
class WorkerNode:
    """A second raylet on this machine, joined to the head. Its own IP (127.0.0.x) gives it its own `node:<ip>`
    resource: on the head's IP both nodes would carry the same one."""

    num_cpus: int
    ip: str
    resources: dict[str, float]


@contextlib.contextmanager
def start_local_cluster(num_cpus: int = 2, timeout_s: float = 60.0, env_extra: dict[str, str] | None = None,
                        head_resources: dict[str, float] | None = None,
                        workers: tuple[WorkerNode, ...] = ()) -> Iterator[LocalRayCluster]:
    """Start a head node on 127.0.0.1 with its own ports and temp dir (``env_extra``: the head's own settings,
    such as RAY_JOB_START_TIMEOUT_SECONDS), and ``workers`` joined to it (each ~3 s more); stop them on exit."""
    temp_dir = Path(tempfile.mkdtemp(prefix="dgmray", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token = secrets.token_hex(16)
    dashboard_port, gcs_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", **(env_extra or {}))
    env["PATH"] = f"{RAY_BIN.parent}{os.pathsep}{env.get('PATH', '')}"  # jobs' `python` is this venv's, as on a node
    cmd = [
        str(RAY_BIN), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
        f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        "--object-store-memory=150000000", f"--temp-dir={temp_dir}",
        *([f"--resources={json.dumps(head_resources)}"] if head_resources else []),
    ]
    log = temp_dir / "ray_start.log"
    procs = []
    with open(log, "wb") as out:
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_ready(address, token, procs[0], log, timeout_s)
        for i, worker in enumerate(workers):
            join = [str(RAY_BIN), "start", "--block", f"--address=127.0.0.1:{gcs_port}",
                    f"--node-ip-address={worker.ip}", f"--num-cpus={worker.num_cpus}", "--num-gpus=0",
                    f"--resources={json.dumps(worker.resources)}", "--object-store-memory=100000000",
                    f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
            with open(temp_dir / f"ray_worker{i}.log", "wb") as out:
                procs.append(subprocess.Popen(join, env=env, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        if workers:
            _wait_ready(address, token, procs[-1], temp_dir / f"ray_worker{len(workers) - 1}.log", timeout_s,
                        nodes=1 + len(workers))
        yield LocalRayCluster(address=address, token=token, temp_dir=temp_dir, num_cpus=num_cpus,
                              gcs=f"127.0.0.1:{gcs_port}")
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    """One 2-CPU cluster per test module (starting one costs ~5-8 s)."""
    with start_local_cluster(num_cpus=2) as cluster:
        yield cluster
