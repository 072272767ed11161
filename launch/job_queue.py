"""A priority queue of jobs in front of one Ray cluster (Ray itself runs jobs in arrival order, with no priorities).

The scheduling rule, applied on every round (`QueueRunner.run_once`):
1. Rank the queued jobs by effective priority = priority + aging_per_hour * hours waited (ties: first enqueued
   first). Aging lets an old low-priority job overtake a stream of newer high-priority ones.
2. Walk the ranking with the cluster's free resources; every job that fits starts (so a smaller, lower-ranked job
   backfills into what a bigger, higher-ranked one leaves free).
3. The highest-ranked waiting job that has waited `reserve_after_s` holds a reservation (not merely the head: a
   newer, higher-ranked job that does not fit either must not take it away): jobs ranked above it still start when
   they fit, those below it may only use what it does not need, so freed resources pile up until it fits. A big
   job therefore waits at most reserve_after_s plus the time the jobs running and those ranked above it take.
Free resources = capacity - max(what the queue's running jobs declared, what Ray reports used + the declarations
of queue jobs Ray may not report yet: PENDING, or submitted seconds ago). A one-process job must also fit what one
node has free. A submission that failed is retried after a wait that doubles with each failure, and
not at all when the cluster refused it (a bad runtime env, an HTTP 4xx): it would be refused again.

A job's declared resources are held by its entrypoint in Ray (`reserve_in_ray=True`, right for one-process jobs),
or, for jobs whose Ray tasks/actors claim them (Ray Train workers), only booked by the queue (`reserve_in_ray=False`).
State lives in one JSON file, rewritten atomically under a lock, so the CLI can enqueue while a runner runs, and a
restarted runner carries on: queued jobs stay queued, and submitted jobs are found again in Ray by their id (a job's
queue id is its Ray submission id).
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from launch.job_spec import training_job_spec
from launch.jobs import (
    ClusterError,
    JobNotFoundError,
    JobResources,
    JobsClient,
    NodeResources,
    amount,
    check_job_id,
    describe,
    infeasibility,
    new_job_id,
)

QUEUED, RUNNING, SUCCEEDED, FAILED, STOPPED = "queued", "running", "succeeded", "failed", "stopped"
FINISHED = frozenset({SUCCEEDED, FAILED, STOPPED})
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, STOPPED)
_RAY_TO_STATE = {"PENDING": RUNNING, "RUNNING": RUNNING, "SUCCEEDED": SUCCEEDED, "FAILED": FAILED,
                 "STOPPED": STOPPED}
NEVER_STARTED = "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"  # Ray's error_type for a job whose entrypoint never started
FORMAT_VERSION = 3  # 2 added retry_at / submit_error, 3 pinned_ip: an older dgm refuses such a file by its version
READABLE_VERSIONS = (1, 2, 3)  # older versions: read with the later fields at their defaults
MAX_RETRY_WAIT_S = 3600.0
REPORT_GRACE_S = 15.0
"""Seconds after a submission in which Ray may not report a one-process job's resources as used yet (5.5 s
measured on a local head): its booking is also taken off what Ray reports free (``planning_free``)."""
WORKERS_GRACE_S = 60.0
"""The same for a job whose Ray Train workers claim its resources: they start after its driver has imported
torch, DeepSpeed and Ray Train."""


@dataclass(frozen=True)
class QueuePolicy:
    """Knobs of the rule in the module docstring."""

    aging_per_hour: float = 6.0
    reserve_after_s: float = 300.0


@dataclass
class QueuedJob:
    """One job of the queue, as persisted and as `list_jobs` shows it."""

    job_id: str
    name: str
    entrypoint: str
    resources: JobResources
    priority: int = 0
    runtime_env: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    reserve_in_ray: bool = True
    state: str = QUEUED
    reason: str = "queued"
    seq: int = 0
    enqueued_at: float = 0.0
    submitted_at: float | None = None
    finished_at: float | None = None
    stop_requested: bool = False
    submit_failures: int = 0
    retry_at: float | None = None  # after a failed submission: not submitted again before this time
    submit_error: str = ""  # what the last failed submission said
    pinned_ip: str = ""  # the node its entrypoint was pinned to (`node:<ip>`), while submitted

    def node_left(self, live_ips: set[str]) -> bool:
        """Whether it was pinned to a node that is no longer in the cluster."""
        return bool(self.pinned_ip) and self.pinned_ip not in live_ips

    def effective_priority(self, now: float, policy: QueuePolicy) -> float:
        return self.priority + policy.aging_per_hour * max(0.0, now - self.enqueued_at) / 3600.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resources"] = self.resources.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QueuedJob:
        """A persisted job; a missing or unknown field is named (the file was edited, or written by another dgm)."""
        d = dict(d)
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in d and _required(cls, n))
        unknown = sorted(set(d) - names)
        if missing or unknown:
            said = [f"missing field {', '.join(missing)}"] if missing else []
            said += [f"unknown field {', '.join(unknown)}"] if unknown else []
            raise ValueError(f"job {d.get('job_id', '?')!r}: {'; '.join(said)}")
        wrong = [f"{name} is {type(d[name]).__name__} {d[name]!r}, not {kind}"
                 for name, kind in _FIELD_KINDS.items() if name in d and not _is_kind(d[name], kind)]
        if wrong:  # else a hand-edited "priority": "5" crashed the runner's planning, not the reading
            raise ValueError(f"job {d.get('job_id', '?')!r}: {'; '.join(wrong)}")
        if d.get("state", QUEUED) not in STATES:
            raise ValueError(f"job {d['job_id']!r}: state {d['state']!r} is not one of {', '.join(STATES)}")
        try:
            d["resources"] = JobResources.from_dict(d["resources"])
        except ValueError as e:
            raise ValueError(f"job {d['job_id']!r}: {e}") from None
        return cls(**d)


_FIELD_KINDS = {f.name: str(f.type) for f in fields(QueuedJob) if f.name != "resources"}


def _is_kind(value: Any, kind: str) -> bool:
    """Whether a value read from JSON fits a field annotated ``kind`` ('int', 'float | None', 'dict[str, Any]')."""
    if kind.endswith(" | None"):
        return value is None or _is_kind(value, kind.removesuffix(" | None"))
    if kind.startswith("dict"):
        return isinstance(value, dict)
    if isinstance(value, bool):
        return kind == "bool"
    return isinstance(value, {"str": str, "int": int, "float": (int, float), "bool": bool}[kind])


def _required(cls: type, name: str) -> bool:
    """Whether a dataclass field has no default."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default is MISSING and f.default_factory is MISSING


def _fits(need: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items())


def _shortfall(need: Mapping[str, float], free: Mapping[str, float]) -> str:
    """'waiting for 2 CPU, 1 free; 1 GPU, 0 free' for the resources that are short."""
    short = [f"{describe({k: v})}, {amount(k, free.get(k, 0.0))} free"
             for k, v in need.items() if free.get(k, 0.0) < v - 1e-9]
    return "waiting for " + "; ".join(short)


def planning_free(total: Mapping[str, float], available: Mapping[str, float], booked: Mapping[str, float],
                  max_total: Mapping[str, float] | None = None,
                  unreported: Mapping[str, float] | None = None) -> dict[str, float]:
    """What the queue may hand out this round: the capacity less what is used, where used is the larger of what
    the queue's running jobs booked and what Ray reports used (by anyone) plus the bookings Ray may not report
    yet (``unreported``: jobs still PENDING or just submitted; Ray's report lags a submission by seconds, and in
    that gap a stale report hid another user's jobs and the queue started more than fitted, leaving Ray, not the
    priorities, to pick the order). The capacity of a fixed cluster is its live nodes; of an autoscaling one
    (``max_total`` from its cluster file) the cluster at full scale, since a submission the live nodes cannot hold
    waits PENDING, and a pending job is what makes the autoscaler add the node (planned against the live nodes
    alone, a job for a node type not up never started)."""
    unreported = unreported or {}
    capacity = {**total, **{k: max(v, total.get(k, 0.0)) for k, v in (max_total or {}).items()}}
    return {k: max(0.0, cap - max(booked.get(k, 0.0),
                                  total.get(k, 0.0) - available.get(k, total.get(k, 0.0)) + unreported.get(k, 0.0)))
            for k, cap in capacity.items()}


def _node_shortfall(need: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> str:
    """'waiting for 2 CPU on one node: at most 1 CPU free on any node' when free resources are split over nodes."""
    best = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need}
    short = [describe({k: best[k]}) for k, v in need.items() if best[k] < v - 1e-9]
    why = f"at most {', '.join(short)} free on any node" if short else "no node has all of them free at once"
    return f"waiting for {describe(need)} on one node: {why}"


def _reservation_node(need: Mapping[str, float], nodes: Sequence[Mapping[str, float]],
                      totals: Sequence[Mapping[str, float]] | None) -> int | None:
    """The node a one-process job's reservation holds: of those it fits when empty, the one nearest to fitting now."""
    fits_empty = [i for i in range(len(nodes)) if totals is None or _fits(need, totals[i])]
    return max(fits_empty, default=None,
               key=lambda i: min((nodes[i].get(k, 0.0) / v for k, v in need.items() if v > 0), default=1.0))


def plan(queued: list[QueuedJob], free: Mapping[str, float], now: float, policy: QueuePolicy,
         node_free: Sequence[Mapping[str, float]] | None = None,
         node_total: Sequence[Mapping[str, float]] | None = None,
         pinned: dict[str, int] | None = None) -> tuple[list[QueuedJob], dict[str, str]]:
    """The jobs to start this round, in order, and a reason for each job that waits. Pure: no I/O.

    ``node_free`` (and ``node_total``): what each live node has free (and in all), when known. A one-process job
    (reserve_in_ray) must then also fit one node, since its entrypoint holds all it declared; it is charged to the
    first node it fits, a guess that the next round replaces with where Ray put it. Others (Ray Train workers) may
    spread over nodes. A one-process job's reservation holds one node (``_reservation_node``): lower-ranked
    one-process jobs are charged elsewhere and listed in ``pinned`` (job id -> node index), to be pinned there,
    since Ray would otherwise place them where it chooses, on the reserved node too.
    """
    free = dict(free)
    nodes = [dict(n) for n in node_free] if node_free is not None else None
    nodes_before_reservation = nodes
    reserved_node: int | None = None
    holder: QueuedJob | None = None
    reserved: dict[str, float] = {}
    start: list[QueuedJob] = []
    behind: set[str] = set()
    waiting: list[QueuedJob] = []

    def one_node(job: QueuedJob, need: Mapping[str, float]) -> bool:
        return nodes is not None and job.reserve_in_ray and bool(need)

    for job in sorted(queued, key=lambda j: (-j.effective_priority(now, policy), j.seq)):
        need = job.resources.request()
        at = next((i for i, n in enumerate(nodes or []) if _fits(need, n)), None) if one_node(job, need) else None
        placeable = at is not None or not one_node(job, need)
        retrying = job.retry_at is not None and job.retry_at > now
        room = {k: max(0.0, v - reserved.get(k, 0.0)) for k, v in free.items()}
        if not retrying and placeable and _fits(need, room):
            start.append(job)
            for pool in [free] if at is None else [free, nodes[at]]:
                pool.update({k: pool.get(k, 0.0) - v for k, v in need.items()})
            if at is not None and reserved_node is not None and pinned is not None:
                pinned[job.job_id] = at
            continue
        waiting.append(job)
        if holder is None and now - job.enqueued_at >= policy.reserve_after_s:
            holder, reserved = job, need  # what it needs stays free for it, even while it waits to retry
            if one_node(job, need):
                reserved_node = _reservation_node(need, nodes, node_total)
                nodes_before_reservation = [dict(n) for n in nodes]
                if reserved_node is not None:  # what that node has of it is held there, and only that
                    held = nodes[reserved_node]
                    reserved = {k: min(v, held.get(k, 0.0)) for k, v in need.items()}
                    held.update({k: max(0.0, held.get(k, 0.0) - v) for k, v in need.items()})
        elif holder is not None and not retrying and placeable and _fits(need, free):
            behind.add(job.job_id)
    reasons = {}  # worded with what is free after this round's starts
    for job in waiting:
        need = job.resources.request()
        if job.retry_at is not None and job.retry_at > now:
            at = time.strftime("%H:%M:%S", time.localtime(job.retry_at))
            reasons[job.job_id] = (f"submission failed {job.submit_failures} time(s), retrying at {at} "
                                   f"(in {job.retry_at - now:.0f} s): {job.submit_error}")
        elif job.job_id in behind and holder is not None:
            reasons[job.job_id] = f"behind job {holder.job_id} of higher priority, which has reserved {describe(reserved)}"
        elif one_node(job, need) and _fits(need, free) and not any(_fits(need, n) for n in nodes or []):
            reasons[job.job_id] = _node_shortfall(need, (nodes_before_reservation if job is holder else nodes) or [])
        else:
            reasons[job.job_id] = _shortfall(need, free)
        if job is holder and reserved:
            reasons[job.job_id] += " (holds a reservation: nothing ranked lower may take what it needs)"
    return start, reasons


class JobQueue:
    """The persisted queue: a JSON file plus a lock file next to it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ClusterError(f"queue file {self.path} is a folder; give a file such as {self.path / 'queue.json'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClusterError(f"queue file {self.path}: cannot create its folder {self.path.parent} "
                               f"({e.strerror or e}{': ' + str(e.filename) if e.filename else ''})") from None

    @contextlib.contextmanager
    def locked(self, write: bool = True) -> Iterator[list[QueuedJob]]:
        """Read the jobs under an exclusive lock; what the block leaves in the list is written back atomically.

        Held only around file reads and writes (never across cluster calls), so `enqueue`, `stop` and listing
        answer at once even while a runner uploads a project for minutes.
        """
        with self._flock(".lock"):
            jobs = self._read()
            yield jobs
            if write:
                self._write(jobs)

    @contextlib.contextmanager
    def runner_turn(self) -> Iterator[None]:
        """One runner round at a time (a second runner waits), without blocking the CLI's `locked` calls."""
        with self._flock(".runner.lock"):
            yield

    @contextlib.contextmanager
    def _flock(self, suffix: str) -> Iterator[None]:
        path = self.path.with_name(self.path.name + suffix)
        fresh = not path.exists()
        try:
            lock = open(path, "a")
        except OSError as e:
            raise ClusterError(f"queue file {self.path}: cannot open its lock file {path} "
                               f"({e.strerror or e}); the queue needs a folder it may write to") from None
        with lock:
            if fresh and self.path.exists():  # a shared queue's lock files are as shared as the queue
                with contextlib.suppress(OSError):
                    os.fchmod(lock.fileno(), self.path.stat().st_mode & 0o777)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[QueuedJob]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            if data.get("version") not in READABLE_VERSIONS:
                raise ValueError(f"format version {data.get('version')!r}, this dgm reads "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}")
            return [QueuedJob.from_dict(j) for j in data["jobs"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ClusterError(f"queue file {self.path} is unreadable ({e}); it was left untouched") from None

    def _write(self, jobs: list[QueuedJob]) -> None:
        payload = json.dumps({"version": FORMAT_VERSION, "jobs": [j.to_dict() for j in jobs]}, indent=1)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        except OSError as e:
            raise ClusterError(f"queue file {self.path}: cannot write in {self.path.parent} ({e.strerror or e}); "
                               "the file was left as it was") from None
        try:
            # mkstemp makes the file owner-only: keep the queue's own mode (a shared queue stays shared)
            umask = os.umask(0)
            os.umask(umask)
            mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o666 & ~umask
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):  # a full disk, a quota: the old file is whole (the rename never ran)
                raise ClusterError(f"queue file {self.path}: cannot write it ({e.strerror or e}); the file was left "
                                   "as it was") from None
            raise

    def enqueue(self, entrypoint: str, resources: JobResources, priority: int = 0, *, name: str = "",
                job_id: str | None = None, runtime_env: Mapping[str, Any] | None = None,
                metadata: Mapping[str, str] | None = None, reserve_in_ray: bool = True) -> QueuedJob:
        """Add a job; it starts when a `QueueRunner` round finds it ranked and fitting."""
        job_id = check_job_id(job_id or new_job_id("dgmq"))
        with self.locked() as jobs:
            if any(j.job_id == job_id for j in jobs):
                raise ClusterError(f"queue {self.path} already has a job {job_id}")
            job = QueuedJob(job_id=job_id, name=name or job_id, entrypoint=entrypoint, resources=resources,
                            priority=int(priority), runtime_env=dict(runtime_env or {}),
                            metadata=dict(metadata or {}), reserve_in_ray=reserve_in_ray,
                            seq=max((j.seq for j in jobs), default=0) + 1, enqueued_at=time.time())
            jobs.append(job)
        return job

    def list_jobs(self) -> list[QueuedJob]:
        """All jobs in enqueue order, with their state and the reason for it."""
        with self.locked(write=False) as jobs:
            return sorted(jobs, key=lambda j: j.seq)

    def stop(self, job_id: str) -> QueuedJob:
        """Stop a job: a queued one at once, a running one on the runner's next round."""
        with self.locked() as jobs:
            for job in jobs:
                if job.job_id == job_id:
                    if job.state == QUEUED:
                        job.state, job.reason, job.finished_at = STOPPED, "stopped before it started", time.time()
                    elif job.state == RUNNING:
                        job.stop_requested, job.reason = True, "stop requested"
                    return job
        raise JobNotFoundError(f"queue {self.path} has no job {job_id}")


class QueueRunner:
    """Runs rounds: track submitted jobs in Ray, then start what the policy allows."""

    def __init__(self, queue: JobQueue | str | Path, address: str, *, token: str | None = None,
                 policy: QueuePolicy = QueuePolicy(), log: Callable[[str], Any] = print,
                 node_shapes: list[dict[str, float]] | None = None, max_total: dict[str, float] | None = None,
                 max_submit_failures: int = 5, retry_after_s: float = 15.0) -> None:
        """``node_shapes`` / ``max_total``: what an autoscaling cluster can add (launch.clusters.node_shapes and
        max_total of its file); without them a job is judged by the nodes this runner has seen. A failed submission
        is retried after ``retry_after_s``, doubled after each further failure, until ``max_submit_failures``."""
        self.queue = queue if isinstance(queue, JobQueue) else JobQueue(queue)
        self.address, self.token, self.policy, self.log = address, token, policy, log
        self.node_shapes, self.max_total = list(node_shapes or []), dict(max_total or {})
        self.max_submit_failures, self.retry_after_s = max_submit_failures, retry_after_s
        self._seen_shapes: list[dict[str, float]] = []
        self._seen_total: dict[str, float] = {}
        self._seen_file = self.queue.path.with_name(self.queue.path.name + ".nodes")
        self.reached = False
        self._load_seen()

    def run_once(self) -> list[QueuedJob]:
        """One round; returns all jobs after it. Raises ClusterError when the cluster cannot be reached.

        The round works on a copy of the queue read under the file lock, talks to the cluster without it, and
        merges its results back under it (`_merge`): jobs enqueued or stopped meanwhile are kept.
        """
        client = JobsClient(self.address, token=self.token)
        with self.queue.runner_turn():
            cluster = client.cluster_resources()  # before the file: its problems are not taken for the address's
            self.reached = True
            live_ips = {n.ip for n in cluster.nodes}
            with self.queue.locked(write=False) as jobs:
                work = copy.deepcopy(jobs)
            before = {j.job_id: j.state for j in work}
            now = time.time()
            pending = {job.job_id for job in work if job.state == RUNNING
                       and self._track(client, job, now, live_ips) == "PENDING"}
            booked: dict[str, float] = {}
            unreported: dict[str, float] = {}
            for job in work:  # a job pinned to a node that left holds nothing while it waits for Ray to end it
                if job.state == RUNNING and not job.node_left(live_ips):
                    grace = REPORT_GRACE_S if job.reserve_in_ray else WORKERS_GRACE_S
                    fresh = job.job_id in pending or now - (job.submitted_at or 0.0) < grace
                    for k, v in job.resources.request().items():
                        booked[k] = booked.get(k, 0.0) + v
                        if fresh:
                            unreported[k] = unreported.get(k, 0.0) + v
            free = planning_free(cluster.total, cluster.available, booked, self.max_total, unreported)
            as_reported = planning_free(cluster.total, cluster.available, booked, self.max_total)
            held_back = {k: as_reported[k] - v for k, v in free.items() if as_reported[k] - v > 1e-9}
            self._remember(cluster.total, cluster.nodes)
            queued = [j for j in work if j.state == QUEUED and self._feasible(j, now)]
            # an autoscaling cluster adds the node a pending job needs: no per-node limit there
            per_node = None if self.max_total else cluster.node_free
            pinned: dict[str, int] = {}
            start, reasons = plan(queued, free, now, self.policy, per_node,
                                  [n.total for n in cluster.nodes] if per_node else None, pinned)
            ips = [n.ip for n in cluster.nodes]
            for job in [j for j in start if j.job_id in pinned and ips.count(ips[pinned[j.job_id]]) > 1]:
                start.remove(job)  # a `node:<ip>` pin shared by several nodes is no pin: Ray may pick the held one
                reasons[job.job_id] = (f"waiting: a higher-ranked job holds a reservation on one node, and this "
                                       f"job cannot be kept off it (several nodes have the IP {ips[pinned[job.job_id]]}"
                                       ", and `node:<ip>` is Ray's only way to place a job's entrypoint)")
            for job in queued:
                job.reason = reasons.get(job.job_id, job.reason)
                if held_back and job.job_id in reasons and job.reason.startswith("waiting for ") \
                        and "on one node" not in job.reason:  # the shortfall of free resources, cluster-wide
                    job.reason += (f" (Ray reports {describe(held_back)} more free, held for jobs this queue "
                                   "just started or Ray holds pending: Ray counts a job's usage seconds after it "
                                   "starts)")
            try:
                for job in start:
                    self._submit(client, job, cluster.nodes[pinned[job.job_id]].ip if job.job_id in pinned else "")
            finally:  # what this round did is kept even when a submission raised something unforeseen
                with self.queue.locked() as jobs:
                    _merge(jobs, {j.job_id: j for j in work}, before)
                    result = sorted(jobs, key=lambda j: j.seq)
            return result

    def run_forever(self, poll_s: float = 5.0, until_idle: bool = False, give_up_after_s: float = 600.0) -> None:
        """Rounds every `poll_s`; an unreachable cluster is reported and retried. `until_idle`: return when empty.

        A cluster this runner has never had an answer from in ``give_up_after_s`` seconds (0: no limit) is a wrong
        address more often than a slow start: that raises ClusterError. One that answered before is waited for
        without limit (a restarted head), since the queue's state is in its file.
        """
        started = time.monotonic()
        while True:
            try:
                jobs = self.run_once()
                if until_idle and all(j.state in FINISHED for j in jobs):
                    return
            except ClusterError as e:
                if e.refused:  # a token the cluster rejects is rejected again: say so now, not after minutes
                    raise
                waited = time.monotonic() - started
                if not self.reached and give_up_after_s and waited >= give_up_after_s:
                    raise ClusterError(f"cluster {self.address or '(default address)'} not reached in {waited:.0f} s "
                                       f"(--give-up-after {give_up_after_s:g}; last: {e}); check --address, or give "
                                       "--give-up-after 0 to wait for it without limit") from None
                self.log(f"queue round failed, retrying in {poll_s:g} s: {e}")
            deadline = started + give_up_after_s if give_up_after_s and not self.reached else float("inf")
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    def _remember(self, total: Mapping[str, float], nodes: list[NodeResources]) -> None:
        """Node shapes and cluster totals seen so far: a spot node gone for a while still counts as possible.
        Kept beside the queue file (``<queue>.nodes``), so a restarted runner or a cron of `--once` rounds
        remembers them too."""
        before = (len(self._seen_shapes), dict(self._seen_total))
        for node in nodes:
            if dict(node.total) not in self._seen_shapes:
                self._seen_shapes.append(dict(node.total))
        for k, v in total.items():
            self._seen_total[k] = max(self._seen_total.get(k, 0.0), v)
        if (len(self._seen_shapes), self._seen_total) != before:
            payload = json.dumps({"shapes": self._seen_shapes, "total": self._seen_total}).encode()
            tmp = self._seen_file.with_name(self._seen_file.name + ".tmp")
            with contextlib.suppress(OSError):  # a memory aid: a failed write costs only the memory
                tmp.write_bytes(payload)
                os.replace(tmp, self._seen_file)

    def _load_seen(self) -> None:
        try:
            data = json.loads(self._seen_file.read_text())
            self._seen_shapes = [{str(k): float(v) for k, v in shape.items()} for shape in data["shapes"]]
            self._seen_total = {str(k): float(v) for k, v in data["total"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._seen_shapes, self._seen_total = [], {}

    def _feasible(self, job: QueuedJob, now: float) -> bool:
        """Fail jobs that can never run here, instead of letting them wait forever: judged against every node
        this runner has seen and every node type the cluster file says can be added, not the nodes up now."""
        need = job.resources.request()
        if not need:
            return True
        if job.reserve_in_ray:  # an entrypoint sits on one node
            shapes = self._seen_shapes + self.node_shapes
        else:
            shapes = [self._seen_total] + ([self.max_total] if self.max_total else [])
        problem = infeasibility(need, shapes)
        if problem:
            job.state, job.finished_at = FAILED, now
            job.reason = f"can never run on the cluster at {self.address}: needs {describe(need)}; {problem}"
            if not self.node_shapes and not self.max_total:
                job.reason += " (judged by the nodes seen; an autoscaling cluster: run the queue with --cluster-file)"
            self.log(f"{job.job_id}: {job.reason}")
        return problem is None

    def _track(self, client: JobsClient, job: QueuedJob, now: float, live_ips: set[str]) -> str:
        """Update a submitted job from Ray; returns Ray's status of it ("" when unknown this round)."""
        try:
            info = client.info(job.job_id)
            if job.stop_requested and not info.terminal:
                info = client.stop(job.job_id, wait_s=0.0)
            elif (info.status == "FAILED" and info.error_type == NEVER_STARTED and job.node_left(live_ips)
                  and not job.stop_requested):
                self._requeue(client, job)
                return ""
        except JobNotFoundError:
            if job.node_left(live_ips) and not job.stop_requested:
                self._requeue(None, job)  # a runner that deleted the record died before saving the queue
                return ""
            job.state, job.finished_at = FAILED, now
            job.reason = f"no longer known to the cluster at {self.address} (was the cluster restarted?)"
            return ""
        except ClusterError as e:  # one job's trouble must not stop the round for the others
            job.reason = f"state unknown this round: {e}"
            self.log(f"{job.job_id}: {job.reason}")
            return ""
        job.state = _RAY_TO_STATE.get(info.status, RUNNING)
        if job.stop_requested and info.error_type == NEVER_STARTED:  # the stop Ray could not deliver, done
            job.state, job.finished_at, job.reason = STOPPED, now, "stopped before it started"
        elif job.state in FINISHED:
            job.finished_at = now
            job.reason = info.message or info.status.lower()
        elif info.status == "PENDING" and job.node_left(live_ips):
            job.reason = (f"starting (Ray: PENDING), but the node {job.pinned_ip} it was pinned to left the cluster: "
                          "queued again when Ray's start timeout (RAY_JOB_START_TIMEOUT_SECONDS on the head, "
                          "default 900 s) ends it")
        else:
            job.reason = "starting (Ray: PENDING)" if info.status == "PENDING" else "running"
        return info.status

    def _requeue(self, client: JobsClient | None, job: QueuedJob) -> None:
        """A job pinned to a node that left the cluster before the job started waits in Ray until Ray's start
        timeout fails it (Ray cannot stop a job whose supervisor was never placed): then its id is freed and it
        is queued again for the next plan (``client`` None: the record is already gone). A ClusterError leaves
        it as it was, for the next round. Ray frees the id of a deleted job for a new submission; the id stays
        the queue's name for the job across both."""
        gone = job.pinned_ip
        if client is not None:
            client.delete(job.job_id)
        job.state, job.submitted_at, job.pinned_ip = QUEUED, None, ""
        job.reason = f"queued again: the node {gone} it was pinned to left the cluster before it started"
        self.log(f"{job.job_id}: {job.reason}")

    def _submit(self, client: JobsClient, job: QueuedJob, pin_ip: str = "") -> None:
        """``pin_ip``: run the entrypoint on that node (Ray's own ``node:<ip>`` resource), away from a node
        reserved for a higher-ranked job."""
        res = job.resources if job.reserve_in_ray else JobResources()
        if pin_ip:
            res = replace(res, custom={**res.custom, f"node:{pin_ip}": 0.001})
        meta = {**job.metadata, "dgm.queue": str(self.queue.path.resolve()), "dgm.priority": str(job.priority)}
        try:
            client.submit(job.entrypoint, resources=res, job_id=job.job_id, runtime_env=job.runtime_env,
                          metadata=meta, check_resources=False)
        except (ValueError, TypeError) as e:  # an id from before ids were checked, a runtime env of wrong types
            job.state, job.finished_at, job.reason = FAILED, time.time(), str(e)
            self.log(f"{job.job_id}: {job.reason}")
            return
        except ClusterError as e:
            holder = self._holder(client, job) if "already exists" in str(e) else "absent"
            if holder == "absent":
                now = time.time()
                job.submit_failures, job.submit_error = job.submit_failures + 1, str(e)
                if e.refused:
                    job.state, job.finished_at = FAILED, now
                    job.reason = f"submission refused, not retrying: {e}"
                elif job.submit_failures >= self.max_submit_failures:
                    job.state, job.finished_at = FAILED, now
                    job.reason = f"submission failed {job.submit_failures} times, giving up: {e}"
                else:
                    wait = min(MAX_RETRY_WAIT_S, self.retry_after_s * 2 ** (job.submit_failures - 1))
                    job.retry_at = now + wait
                    job.reason = (f"submission failed ({job.submit_failures} of {self.max_submit_failures} tries), "
                                  f"will retry in {wait:g} s: {e}")
                self.log(f"{job.job_id}: {job.reason}")
                return
            if holder == "unknown":
                job.reason = "a job with this id exists on the cluster; checking whether it is this one next round"
                return
            if holder == "other":
                job.state, job.finished_at = FAILED, time.time()
                job.reason = (f"the cluster at {self.address} already has another job with id {job.job_id} "
                              "(not submitted by this queue); queue this one under a new id")
                self.log(f"{job.job_id}: {job.reason}")
                return
        job.state, job.reason, job.submitted_at, job.retry_at = RUNNING, "submitted", time.time(), None
        job.pinned_ip = pin_ip
        self.log(f"{job.job_id}: started ({job.resources}, priority {job.priority})")

    def _holder(self, client: JobsClient, job: QueuedJob) -> str:
        """Who has the id an "already exists" refusal was about: "ours" (this entry, submitted by a runner that died
        before saving: adopt it), "other" (another job that happens to share the id), "absent" (no job: the words
        came from elsewhere, such as a runtime env's package step, and count as a failed submission) or "unknown"
        (cannot be told now)."""
        try:
            info = client.info(job.job_id)
        except JobNotFoundError:
            return "absent"
        except ClusterError:
            return "unknown"
        queue = info.metadata.get("dgm.queue", "")
        same_queue = bool(queue) and Path(queue).resolve() == self.queue.path.resolve()
        return "ours" if same_queue and info.entrypoint == job.entrypoint else "other"


_RUNNER_FIELDS = ("state", "reason", "submitted_at", "finished_at", "submit_failures", "retry_at", "submit_error",
                  "pinned_ip")


def _merge(current: list[QueuedJob], worked: Mapping[str, QueuedJob], before: Mapping[str, str]) -> None:
    """Fold a round's results (``worked``, from a copy read when it began in states ``before``) into the queue as
    it is now. Jobs enqueued meanwhile are left alone; a stop requested meanwhile wins: a job the round left
    queued stays stopped, one the round just started is stopped on the next round."""
    for job in current:
        done = worked.get(job.job_id)
        if done is None:
            continue
        stopped_meanwhile = job.state == STOPPED and before.get(job.job_id) == QUEUED
        stop = job.stop_requested or stopped_meanwhile
        for name in _RUNNER_FIELDS:
            setattr(job, name, getattr(done, name))
        # a job the round queued again (its node left before it started) is stopped too, whatever it was before
        if stop and (job.state == QUEUED or (job.state == FAILED and before.get(job.job_id) == QUEUED)):
            job.state, job.reason, job.finished_at = STOPPED, "stopped before it started", time.time()
        elif stop and job.state == RUNNING:
            job.stop_requested, job.reason = True, "stop requested"


def enqueue(queue_file: str | Path, entrypoint: str, resources: JobResources, priority: int = 0,
            **kwargs: Any) -> QueuedJob:
    """CLI entry: add a job to the queue file (no cluster needed)."""
    return JobQueue(queue_file).enqueue(entrypoint, resources, priority, **kwargs)


def enqueue_training(queue_file: str | Path, config_path: str, overrides: list[str], project_dir: str,
                     resources: JobResources, priority: int = 0, *, job_id: str | None = None,
                     reserve_in_ray: bool = False) -> QueuedJob:
    """CLI entry: queue `dgm train CONFIG` as `dgm submit` would send it.

    reserve_in_ray defaults to False: the run's Ray Train workers claim the declared resources themselves, and a
    driver holding them too would leave the workers nothing.
    """
    from trainer.ray_env import S3_PLACE_ENV, forwarded_env

    job_id = job_id or new_job_id("dgmq")
    place, _ = forwarded_env(shared=True, keys=S3_PLACE_ENV)  # never secrets: the queue file is plain JSON on disk
    spec = training_job_spec(config_path, overrides, project_dir, job_id, place, snapshot=True)
    return JobQueue(queue_file).enqueue(spec.entrypoint, resources, priority, name=Path(config_path).stem,
                                        job_id=job_id, runtime_env=spec.runtime_env, metadata=spec.metadata,
                                        reserve_in_ray=reserve_in_ray)


def list_jobs(queue_file: str | Path) -> list[QueuedJob]:
    if not Path(queue_file).is_file() and not Path(queue_file).is_dir():
        raise ClusterError(f"queue file {queue_file} does not exist (`dgm queue add` creates it)")
    return JobQueue(queue_file).list_jobs()


def run_once(queue_file: str | Path, address: str, **kwargs: Any) -> list[QueuedJob]:
    return QueueRunner(queue_file, address, **kwargs).run_once()


def run_forever(queue_file: str | Path, address: str, poll_s: float = 5.0, give_up_after_s: float = 600.0,
                **kwargs: Any) -> None:
    QueueRunner(queue_file, address, **kwargs).run_forever(poll_s, give_up_after_s=give_up_after_s)
