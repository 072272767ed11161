"""A thin, typed layer over Ray's Jobs API for `dgm submit / jobs / status / logs / stop`.

Why not use `JobSubmissionClient` directly from the CLI:
- its HTTP calls have no timeout (an address that drops packets hangs forever); here every call is bounded;
- it silently prefers RAY_ADDRESS / RAY_API_SERVER_ADDRESS over the address it is given; here the given one wins;
- Ray 2.60 heads enable token authentication, and the client only sends the token when RAY_AUTH_MODE=token is set
  in the caller's environment; here the token is found the way Ray stores it (see `resolve_token`) and always sent;
- a job asking for resources no node has stays PENDING forever and cannot even be stopped; here it is refused at
  submission (`check_feasible`), against the live nodes plus any autoscaler node shapes the caller passes;
- its log stream (`tail_job_logs`) waits forever on a connection that died without a close frame; here a
  heartbeat checks the job's state after each silent stretch and opens a new stream, skipping what was printed,
  while the job runs (launch/log_follow.py);
- errors come back as `ClusterError` naming the address or job, and results as small dataclasses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from ray.dashboard.modules.dashboard_sdk import SubmissionClient
from ray.dashboard.utils import to_camel_case
from ray.job_submission import JobSubmissionClient

# Ray's SDK logs an INFO line on every closed log stream, which would land in the middle of `dgm logs --follow`.
logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # a large working_dir upload is acknowledged only once stored
HEARTBEAT_S = 30.0  # `dgm logs --follow`: silence after which the job's state is checked
RECONNECT_AFTER = 2  # ... and after how many such checks in a row that find it running the log stream is reopened
STATUS_READ_TIMEOUT_S = 10.0  # that check's answer: a live head reads its job table at once
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_MEMORY_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                 "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ClusterError(RuntimeError):
    """A cluster operation failed; the message names the address or job and says what to do. ``refused``: the
    cluster (or Ray's client, before sending) refused the request itself, so trying again cannot help."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class JobNotFoundError(ClusterError):
    """The cluster has no job with this id."""


class InfeasibleJobError(ClusterError):
    """The job asks for resources no node of the cluster can ever provide."""


def parse_memory(text: str | int) -> int:
    """'16GiB', '500M', '2g', 1024 -> bytes (binary units with 'i', decimal without)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m:
        raise ValueError(f"memory {text!r}: expected a number with an optional unit such as 512MiB, 16GB, 2g")
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2) or ""])


@dataclass(frozen=True)
class JobResources:
    """What a job reserves: CPUs and GPUs (fractions allowed), memory in bytes, custom resources."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    memory: int = 0
    custom: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        amounts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "memory": self.memory, **self.custom}
        for name, value in amounts.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"resource {name}={value!r}: must be a finite number >= 0")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus={self.num_gpus}: Ray accepts fractions only below 1 GPU")
        clash = {"CPU", "GPU", "memory"} & set(self.custom)
        if clash:
            raise ValueError(f"custom resources {sorted(clash)}: use num_cpus / num_gpus / memory instead")

    def request(self) -> dict[str, float]:
        """Ray resource names -> amounts, zero amounts left out."""
        out = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus), "memory": float(self.memory)}
        out.update({k: float(v) for k, v in self.custom.items()})
        return {k: v for k, v in out.items() if v > 0}

    def to_dict(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "memory": self.memory,
                "custom": dict(self.custom)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobResources:
        """Read back ``to_dict``; a hand-edited key or type is named (a typo such as "cpus" booked nothing)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"resources must be an object, got {type(d).__name__} {d!r}")
        known = ("num_cpus", "num_gpus", "memory", "custom")
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"resources: unknown key {', '.join(unknown)} (known: {', '.join(known)})")
        wrong = [f"{k} is {type(d[k]).__name__} {d[k]!r}, not a number" for k in known[:3]
                 if k in d and (isinstance(d[k], bool) or not isinstance(d[k], (int, float)))]
        if "memory" in d and isinstance(d["memory"], float) and not d["memory"].is_integer():
            wrong.append(f"memory is {d['memory']!r}, not a whole number of bytes")
        custom = d.get("custom", {})
        if not isinstance(custom, Mapping) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                  for v in custom.values()):
            wrong.append(f"custom is {custom!r}, not an object of resource name -> number")
        if wrong:
            raise ValueError(f"resources: {'; '.join(wrong)}")
        return cls(float(d.get("num_cpus", 0)), float(d.get("num_gpus", 0)), int(d.get("memory", 0)),
                   {str(k): float(v) for k, v in custom.items()})

    def __str__(self) -> str:
        return describe(self.request()) or "no resources"


def amount(name: str, value: float) -> str:
    """'2', '0.5', '4.0 GiB' (memory in GiB) for messages."""
    return f"{value / 2**30:.1f} GiB" if name in ("memory", "object_store_memory") else f"{value:g}"


def describe(amounts: Mapping[str, float]) -> str:
    """'2 CPU, 0.5 GPU, 4.0 GiB memory' for messages."""
    return ", ".join(f"{amount(name, value)} {name}" for name, value in amounts.items())


@dataclass(frozen=True)
class JobInfo:
    """One job as the cluster reports it (Ray's JobDetails reduced to what the CLI shows)."""

    job_id: str
    status: str
    entrypoint: str
    message: str = ""
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    error_type: str = ""  # Ray's kind of failure, e.g. JOB_SUPERVISOR_ACTOR_START_TIMEOUT (never started)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    ip: str
    is_head: bool
    total: Mapping[str, float]


@dataclass(frozen=True)
class ClusterResources:
    """Live nodes with their totals, and what is free cluster-wide (Ray refreshes usage every few seconds)."""

    nodes: list[NodeResources]
    total: dict[str, float]
    available: dict[str, float]
    node_free: list[dict[str, float]] | None = None  # per node, in the order of ``nodes``, when Ray reports it


def resolve_address(address: str | None) -> str:
    """The dashboard URL for an address given as http(s)://host:port, host:port or host (port 8265; an https://
    URL without a port keeps 443, a proxy's)."""
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_DASHBOARD).strip().rstrip("/")
    if address in ("auto", "local") or address.startswith("ray://"):
        raise ClusterError(f"address {address!r}: give the Ray dashboard's HTTP address, e.g. {DEFAULT_DASHBOARD} "
                           "(for a cloud cluster, run `ray dashboard CLUSTER.yaml` and use the forwarded port)")
    if "://" not in address:
        address = "http://" + address
    host = r"(\[[0-9A-Fa-f:.]+\]|[^/:\s\[\]]+)"  # a name, an IPv4 address or a bracketed IPv6 one
    if not re.fullmatch(rf"https?://{host}(:\d+)?(/.*)?", address):
        raise ClusterError(f"address {address!r} is not a valid http(s)://host:port URL (an IPv6 host goes in "
                           "brackets: http://[::1]:8265)")
    if re.fullmatch(rf"http://{host}", address):
        address += ":8265"
    return address


def resolve_token(token: str | None = None) -> str | None:
    """The cluster's auth token: explicit, else $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    Same lookup order as Ray itself. Sending a token to a cluster without auth is harmless, so it is always sent
    when found, unless RAY_AUTH_MODE=disabled.
    """
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            text = Path(path).read_text().strip()
            if text:
                return text
    return None


class _BoundedClient(JobSubmissionClient):
    """JobSubmissionClient talking to exactly `url`, with a timeout on every HTTP request."""

    def __init__(self, url: str, headers: dict[str, str], timeout: tuple[float, float]) -> None:
        # Skips JobSubmissionClient.__init__ on purpose: it re-reads RAY_ADDRESS and re-checks the version
        # without a timeout; JobsClient has already checked both.
        self._timeout = timeout
        SubmissionClient.__init__(self, address=url, headers=headers)
        self._ssl_context = True  # aiohttp's spelling of "verify with the default CA store" (None is deprecated)

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        return super()._do_request(method, endpoint, **kwargs)


class JobsClient:
    """A connection to one cluster's Jobs API; raises ClusterError (never hangs) when it cannot be reached."""

    def __init__(self, address: str | None, token: str | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self.address = resolve_address(address)
        token = resolve_token(token)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = (connect_timeout_s, read_timeout_s)
        version = self._get("/api/version", quick=True)
        self.ray_version = str(version.get("ray_version", "?"))
        self._client = _BoundedClient(self.address, dict(self._headers), self._timeout)
        # what JobSubmissionClient.__init__ would have recorded: tail_job_logs reads it to tell a websocket error
        # from the normal end of the stream
        self._client._server_ray_version = self.ray_version

    def _get(self, endpoint: str, quick: bool = False) -> dict[str, Any]:
        timeout = (self._timeout[0], self._timeout[0]) if quick else self._timeout
        try:
            r = requests.get(self.address + endpoint, headers=self._headers, timeout=timeout)
        except requests.RequestException as e:
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.address} ({type(e).__name__}): is the cluster up, and is "
                "this the dashboard port (default 8265, not the GCS port 6379)? For a cloud cluster run "
                "`ray dashboard CLUSTER.yaml` and use http://127.0.0.1:8265") from None
        if r.status_code in (401, 403):
            problem = "needs an auth token" if r.status_code == 401 else "rejected the auth token"
            raise ClusterError(
                f"the Ray cluster at {self.address} {problem} (Ray 2.60 clusters turn token authentication on "
                "by default). Put the head's token (`ray get-auth-token` on the head) in ~/.ray/auth_token, or set "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH", refused=True)
        if r.status_code == 404:  # no such API there: another server on that port, or a proxy's page
            raise ClusterError(f"{self.address}{endpoint} answered HTTP 404: is {self.address} a Ray dashboard "
                               "(default port 8265)?")
        if r.status_code != 200:
            raise ClusterError(f"{self.address}{endpoint} answered HTTP {r.status_code}: "
                               f"{r.text.strip()[:300] or '(no body)'}")
        try:
            return r.json()
        except ValueError:
            raise ClusterError(f"{self.address}{endpoint} did not answer JSON: is it a Ray dashboard?") from None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one SDK call, turning Ray's RuntimeError/ConnectionError into ClusterError."""
        try:
            return fn(*args, **kwargs)
        except (requests.RequestException, ConnectionError) as e:
            raise ClusterError(f"{what}: lost the Ray dashboard at {self.address} ({type(e).__name__})") from None
        except OSError as e:  # packaging the working dir: an unreadable file, a full /tmp
            where = f" ({e.filename})" if e.filename else ""
            raise ClusterError(f"{what}: cannot package the job's files{where}: {e.strerror or e}") from None
        except (RuntimeError, ValueError) as e:
            text = str(e)
            if "404" in text and "does not exist" in text:
                raise JobNotFoundError(f"{what}: no such job on the cluster at {self.address}") from None
            raise ClusterError(f"{what} on {self.address}: {text}", refused=_refused(e)) from None

    def cluster_resources(self) -> ClusterResources:
        """Live nodes (state API) and cluster-wide free resources (autoscaler load report)."""
        listing = self._get("/api/v0/nodes?limit=10000")["data"]["result"]["result"]
        nodes = [NodeResources(n["node_id"], n.get("node_ip", ""), bool(n.get("is_head_node")),
                               {k: float(v) for k, v in n.get("resources_total", {}).items()})
                 for n in listing if n.get("state") == "ALIVE"]
        total: dict[str, float] = {}
        for node in nodes:
            for k, v in node.total.items():
                total[k] = total.get(k, 0.0) + v
        status = self._get("/api/cluster_status")["data"].get("clusterStatus") or {}
        usage = (status.get("loadMetricsReport") or {}).get("usage") or {}
        available = {}
        for name, value in total.items():
            used = usage.get(to_camel_case(name), usage.get(name, [0.0, value]))[0]  # the dashboard camelCases keys
            available[name] = max(0.0, value - float(used))
        return ClusterResources(nodes=nodes, total=total, available=available, node_free=nodes_free(status, nodes))

    def check_feasible(self, resources: JobResources,
                       node_shapes: Iterable[Mapping[str, float]] = ()) -> None:
        """Raise InfeasibleJobError unless one node (live, or a shape the autoscaler can add) holds `resources`."""
        if not resources.request():
            return
        shapes = [n.total for n in self.cluster_resources().nodes] + list(node_shapes)
        problem = infeasibility(resources.request(), shapes)
        if problem:
            raise InfeasibleJobError(f"job needs {describe(resources.request())} on one node, which the cluster at "
                                     f"{self.address} can never provide: {problem}")

    def submit(self, entrypoint: str, *, resources: JobResources = JobResources(), job_id: str | None = None,
               runtime_env: Mapping[str, Any] | None = None, metadata: Mapping[str, str] | None = None,
               check_resources: bool = True, node_shapes: Iterable[Mapping[str, float]] = ()) -> str:
        """Submit `entrypoint` (a shell command); returns the job id."""
        if job_id is not None:
            check_job_id(job_id)
        if check_resources:
            self.check_feasible(resources, node_shapes)
        meta = {"dgm.resources": json.dumps(resources.to_dict()), **(metadata or {})}
        return self._call(
            f"submitting job {job_id or ''}".strip(), self._client.submit_job, entrypoint=entrypoint,
            submission_id=job_id, runtime_env=dict(runtime_env or {}), metadata=meta,
            entrypoint_num_cpus=resources.num_cpus or None, entrypoint_num_gpus=resources.num_gpus or None,
            entrypoint_memory=int(resources.memory) or None, entrypoint_resources=dict(resources.custom) or None)

    def info(self, job_id: str) -> JobInfo:
        return _to_info(self._call(f"job {job_id}", self._client.get_job_info, job_id))

    def jobs(self) -> list[JobInfo]:
        """Submitted jobs (not drivers that connected with ray.init), oldest first."""
        jobs = [_to_info(d) for d in self._call("listing jobs", self._client.list_jobs) if d.submission_id]
        return sorted(jobs, key=lambda j: (j.start_time or 0.0, j.job_id))

    def logs(self, job_id: str) -> str:
        return self._call(f"logs of job {job_id}", self._client.get_job_logs, job_id)

    def follow_logs(self, job_id: str, write: Callable[[str], Any] | None = None,
                    heartbeat_s: float = HEARTBEAT_S, reconnect_after: int = RECONNECT_AFTER) -> JobInfo:
        """Stream the job's output to `write` (default stdout) as it comes until the job ends; returns its final
        state. After `heartbeat_s` seconds without output the job's state is checked (`stream_with_heartbeat`):
        an ended job ends the follow, with what the stream missed taken from the stored log; a job still running
        gets a new stream after `reconnect_after` such checks in a row; an unreachable cluster is ClusterError."""
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s={heartbeat_s}: must be above 0")
        if reconnect_after < 1:
            raise ValueError(f"reconnect_after={reconnect_after}: must be at least 1")
        write = write or sys.stdout.write
        self.info(job_id)
        # the heartbeat's own client: a dashboard that accepts but never answers is given up after seconds, not
        # after the upload-sized READ_TIMEOUT_S
        quick = _BoundedClient(self.address, dict(self._headers),
                               (self._timeout[0], min(self._timeout[1], STATUS_READ_TIMEOUT_S)))
        from launch.log_follow import LogCursor, note_shorter_log, stream_with_heartbeat

        cursor = LogCursor()

        def status() -> JobInfo:
            return _to_info(self._call(f"job {job_id}", quick.get_job_info, job_id))

        try:
            cut_short = asyncio.run(stream_with_heartbeat(
                lambda: self._client.tail_job_logs(job_id), write, status, heartbeat_s, address=self.address,
                job_id=job_id, stored_log=lambda: self.logs(job_id), reconnect_after=reconnect_after,
                cursor=cursor))
        except ClusterError:
            raise
        except Exception as e:  # aiohttp / websocket errors: the job may still have ended normally
            cut_short = self.info(job_id)
            if not cut_short.terminal:
                raise ClusterError(f"following logs of job {job_id} on {self.address}: {e}") from None
        if cut_short is not None:
            # the stream stopped before the job's last words (it went silent, or broke): the stored log has them,
            # and both read the same file from its start, so what was printed is its first `cursor.offset`
            # characters (unless the log was cut down since)
            log = self.logs(job_id)
            if len(log) < cursor.offset:
                note_shorter_log(job_id, cursor.offset)
                cursor.offset = 0
            if log[cursor.offset:]:
                write(log[cursor.offset:])
        info = self.wait(job_id, timeout_s=10.0)  # the stream closes just before the status flips
        if not info.terminal:
            raise ClusterError(f"the log stream of job {job_id} on {self.address} ended while the job is still "
                               f"{info.status}; follow it again, or check `dgm status {job_id}`")
        return info

    def stop(self, job_id: str, wait_s: float = 15.0) -> JobInfo:
        """Ask the job to stop (SIGTERM, then SIGKILL from Ray) and wait up to `wait_s` for it to end."""
        self._call(f"stopping job {job_id}", self._client.stop_job, job_id)
        return self.wait(job_id, timeout_s=wait_s)

    def delete(self, job_id: str) -> None:
        """Forget an ended job (its record and logs), which frees its id for a new submission."""
        self._call(f"deleting job {job_id}", self._client.delete_job, job_id)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 0.3) -> JobInfo:
        """Poll until the job is terminal or `timeout_s` passes; returns the last state seen."""
        deadline = time.monotonic() + timeout_s
        info = self.info(job_id)
        while not info.terminal and time.monotonic() < deadline:
            time.sleep(poll_s)
            info = self.info(job_id)
        return info


def infeasibility(request: Mapping[str, float], shapes: Iterable[Mapping[str, float]]) -> str | None:
    """None if some shape holds all of `request`, else why not (per resource, against the largest shape)."""
    shapes = list(shapes)
    if any(all(shape.get(k, 0.0) >= v for k, v in request.items()) for shape in shapes):
        return None
    problems = []
    for name, amount in request.items():
        best = max((shape.get(name, 0.0) for shape in shapes), default=0.0)
        if best <= 0:
            problems.append(f"no node has any {name}")
        elif best < amount:
            problems.append(f"it asks for {describe({name: amount})} but the largest node has {describe({name: best})}")
    return "; ".join(problems) or "no single node has all of them at once"


def _to_info(d: Any) -> JobInfo:
    def seconds(ms: int | None) -> float | None:
        return ms / 1000.0 if ms else None

    kind = getattr(d, "error_type", None)  # a str today; an enum would print as JobErrorType.X
    return JobInfo(job_id=d.submission_id or d.job_id or "", status=str(getattr(d.status, "value", d.status)),
                   entrypoint=d.entrypoint or "", message=d.message or "", start_time=seconds(d.start_time),
                   end_time=seconds(d.end_time), exit_code=d.driver_exit_code, metadata=dict(d.metadata or {}),
                   error_type=str(getattr(kind, "value", kind) or ""))


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_job_id(job_id: str) -> str:
    """A job id Ray's REST paths and the queue's file names can carry: letters, digits, '.', '_', '-'."""
    if not _JOB_ID.fullmatch(job_id or ""):
        raise ValueError(f"job id {job_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
                         "digit (a '/' or space makes the job impossible to query or stop afterwards)")
    return job_id


def new_job_id(prefix: str = "dgm") -> str:
    """Readable, unique, sortable by time: dgm-20250101-120000-1a2b3c."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def submit_entrypoint(address: str, entrypoint: str, *, resources: JobResources = JobResources(),
                      job_id: str | None = None, runtime_env: Mapping[str, Any] | None = None,
                      metadata: Mapping[str, str] | None = None, token: str | None = None,
                      check_resources: bool = True, node_shapes: Iterable[Mapping[str, float]] = ()) -> str:
    """Submit any shell command as a job; returns its id."""
    return JobsClient(address, token).submit(entrypoint, resources=resources, job_id=job_id or new_job_id(),
                                           runtime_env=runtime_env, metadata=metadata,
                                           check_resources=check_resources, node_shapes=node_shapes)


def list_jobs(address: str, token: str | None = None) -> list[JobInfo]:
    return JobsClient(address, token).jobs()


def job_status(address: str, job_id: str, token: str | None = None) -> JobInfo:
    return JobsClient(address, token).info(job_id)


def job_logs(address: str, job_id: str, token: str | None = None) -> str:
    return JobsClient(address, token).logs(job_id)


def follow_job_logs(address: str, job_id: str, write: Callable[[str], Any] | None = None,
                    token: str | None = None, heartbeat_s: float = HEARTBEAT_S,
                    reconnect_after: int = RECONNECT_AFTER) -> JobInfo:
    return JobsClient(address, token).follow_logs(job_id, write, heartbeat_s, reconnect_after)


def stop_job(address: str, job_id: str, wait_s: float = 15.0, token: str | None = None) -> JobInfo:
    return JobsClient(address, token).stop(job_id, wait_s)


def _refused(e: RuntimeError | ValueError) -> bool:
    """Whether Ray's client error says the request itself was refused, so that it would be refused again: a
    ValueError is a runtime env Ray's client refused before sending (a working_dir that is gone); a RuntimeError
    carries the job server's HTTP status, a 4xx a request it refused (an invalid runtime env), bar 408/429 (try
    later) and 401/403 (the caller's token, not the request)."""
    if isinstance(e, ValueError):
        return True
    status = re.search(r"Request failed with status code (\d{3})", str(e))
    return bool(status) and 400 <= int(status[1]) < 500 and int(status[1]) not in (401, 403, 408, 429)


def nodes_free(status: Mapping[str, Any] | None, nodes: Sequence[NodeResources]) -> list[dict[str, float]] | None:
    """What each live node has free, from the dashboard's /api/cluster_status ``clusterStatus`` (its load report's
    usageByNode: [used, total] per resource, keyed by node id or by node IP, keys camelCased by the dashboard).
    None when that cannot be told for every node (no per-node report, as from autoscaler v2; nodes sharing an IP):
    the queue then plans with cluster-wide figures alone."""
    by_node = ((status or {}).get("loadMetricsReport") or {}).get("usageByNode") or {}
    out = []
    try:
        for node in nodes:
            one_ip = sum(n.ip == node.ip for n in nodes) == 1
            usage = by_node.get(node.node_id) or (by_node.get(node.ip) if one_ip else None)
            if not isinstance(usage, Mapping):
                return None
            out.append({k: max(0.0, v - float(usage.get(to_camel_case(k), usage.get(k, [0.0]))[0]))
                        for k, v in node.total.items()})
    except (TypeError, ValueError, IndexError, AttributeError):  # a report shaped otherwise: no per-node figures
        return None
    return out or None
