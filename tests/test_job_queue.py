"""launch/job_queue.py: the scheduling rule on plain data, persistence, then a real 2-CPU Ray cluster."""
from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from launch.job_queue import (
    FAILED,
    FINISHED,
    QUEUED,
    REPORT_GRACE_S,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    WORKERS_GRACE_S,
    JobQueue,
    QueuedJob,
    QueuePolicy,
    QueueRunner,
    enqueue_training,
    plan,
    planning_free,
)
from launch.jobs import (
    ClusterError,
    ClusterResources,
    JobInfo,
    JobNotFoundError,
    JobResources,
    JobsClient,
    NodeResources,
    nodes_free,
)
from tests.fixtures_ray_cluster import LocalRayCluster, start_local_cluster

NOW = 1_000_000.0
POLICY = QueuePolicy(aging_per_hour=6.0, reserve_after_s=300.0)


def job(job_id: str, priority: int, seq: int, waited_s: float = 0.0, **res: float) -> QueuedJob:
    return QueuedJob(job_id=job_id, name=job_id, entrypoint="true", resources=JobResources(**res),
                     priority=priority, seq=seq, enqueued_at=NOW - waited_s)


# ---------------------------------------------------------------- the rule, on plain data


def test_priority_order_then_backfill() -> None:
    big, hi, lo = job("big", 5, 1, num_cpus=2), job("hi", 10, 2, num_cpus=1), job("lo", 1, 3, num_cpus=1)
    start, reasons = plan([big, hi, lo], {"CPU": 2.0}, NOW, POLICY)
    assert [j.job_id for j in start] == ["hi", "lo"]  # lo backfills what big cannot use yet
    assert reasons == {"big": "waiting for 2 CPU, 0 free"}


def test_an_autoscaling_cluster_is_planned_at_full_scale() -> None:
    """A fresh autoscaling cluster (a CPU-less head, workers from 0): planned against the live nodes, no job ever
    fit, so none was submitted, and without a pending job the autoscaler never added a node."""
    head_only = {"CPU": 0.0, "memory": 8e9}
    live = planning_free(head_only, head_only, {})
    train, prep = job("train", 5, 1, num_cpus=32, num_gpus=8), job("prep", 1, 2, num_cpus=1)
    assert plan([train, prep], live, NOW, POLICY)[0] == []
    full = planning_free(head_only, head_only, {}, max_total={"CPU": 96.0, "GPU": 8.0})
    assert full == {"CPU": 96.0, "GPU": 8.0, "memory": 8e9}
    assert [j.job_id for j in plan([train, prep], full, NOW, POLICY)[0]] == ["train", "prep"]
    booked = planning_free(head_only, head_only, {"CPU": 90.0, "GPU": 8.0}, max_total={"CPU": 96.0, "GPU": 8.0})
    assert [j.job_id for j in plan([train, prep], booked, NOW, POLICY)[0]] == ["prep"]  # running jobs count
    assert planning_free({"CPU": 8.0}, {"CPU": 3.0}, {"CPU": 2.0}) == {"CPU": 3.0}  # fixed: live free, less bookings


def test_reservation_stops_backfill_once_the_head_waited_long_enough() -> None:
    big = job("big", 5, 1, waited_s=400, num_cpus=2)
    hi, lo = job("hi", 10, 2, num_cpus=1), job("lo", 1, 3, num_cpus=1)
    start, reasons = plan([big, hi, lo], {"CPU": 2.0}, NOW, POLICY)
    assert [j.job_id for j in start] == ["hi"]
    assert reasons["big"].startswith("waiting for 2 CPU, 1 free (holds a reservation")
    assert reasons["lo"] == "behind job big of higher priority, which has reserved 2 CPU"
    # the reservation only withholds what the head needs: a job using other resources still starts
    gpu = job("gpu", 0, 4, num_gpus=0.5)
    start, _ = plan([big, hi, lo, gpu], {"CPU": 2.0, "GPU": 1.0}, NOW, POLICY)
    assert [j.job_id for j in start] == ["hi", "gpu"]
    # when enough is free the head starts, ahead of everything ranked below it
    start, _ = plan([big, lo], {"CPU": 2.0}, NOW, POLICY)
    assert [j.job_id for j in start] == ["big"]


def test_the_reservation_stays_with_the_job_that_waited_when_a_newer_one_outranks_it() -> None:
    """A newer, higher-ranked job that does not fit either used to become the head, and being too new to reserve,
    left nobody holding a reservation: small jobs backfilled again and the big one that had waited starved."""
    big = job("big", 5, 1, waited_s=400, num_cpus=2)
    newer = job("newer", 10, 2, num_cpus=3)
    small = job("small", 1, 3, num_cpus=1)
    start, reasons = plan([big, newer, small], {"CPU": 1.0}, NOW, POLICY)
    assert start == []
    assert reasons["small"] == "behind job big of higher priority, which has reserved 2 CPU"
    assert reasons["big"].startswith("waiting for 2 CPU, 1 free (holds a reservation")
    assert reasons["newer"] == "waiting for 3 CPU, 1 free"  # it holds nothing: it has not waited long enough
    # a job ranked above the holder still starts when it fits
    hi = job("hi", 9, 4, num_cpus=1)
    start, reasons = plan([big, newer, small, hi], {"CPU": 1.0}, NOW, POLICY)
    assert [j.job_id for j in start] == ["hi"] and reasons["small"].startswith("waiting for 1 CPU, 0 free")
    # once the newer one has waited long enough too, it outranks big for the reservation, and the reasons say so
    newer.enqueued_at = NOW - 400
    _, reasons = plan([big, newer, small], {"CPU": 1.0}, NOW, POLICY)
    assert reasons["small"] == "behind job newer of higher priority, which has reserved 3 CPU"
    assert reasons["big"] == "waiting for 2 CPU, 1 free" and "holds a reservation" in reasons["newer"]


def test_a_one_process_job_must_fit_one_node() -> None:
    """A reserve_in_ray job's entrypoint holds all it declared, on one node: 2 CPU free over two nodes do not hold
    it, while a job whose Ray Train workers claim its resources may spread over them."""
    two_halves = [{"CPU": 1.0}, {"CPU": 1.0}]
    solo, train = job("solo", 5, 1, num_cpus=2), job("train", 1, 2, num_cpus=2)
    train.reserve_in_ray = False
    start, reasons = plan([solo, train], {"CPU": 2.0}, NOW, POLICY, two_halves)
    assert [j.job_id for j in start] == ["train"]
    assert reasons["solo"] == "waiting for 2 CPU, 0 free"
    start, reasons = plan([solo], {"CPU": 2.0}, NOW, POLICY, two_halves)
    assert start == [] and reasons["solo"] == "waiting for 2 CPU on one node: at most 1 CPU free on any node"
    start, _ = plan([solo], {"CPU": 2.0}, NOW, POLICY)  # no per-node figures: planned cluster-wide, as before
    assert start == [solo]
    # what a job started this round takes from its node counts for the next one
    x, y = job("x", 0, 10, num_cpus=2), job("y", 0, 11, num_cpus=2)
    start, reasons = plan([x, y], {"CPU": 4.0}, NOW, POLICY, [{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}])
    assert start == [x] and reasons["y"] == "waiting for 2 CPU on one node: at most 1 CPU free on any node"
    gpu = job("gpu", 0, 20, num_cpus=1, num_gpus=1)
    _, reasons = plan([gpu], {"CPU": 1.0, "GPU": 1.0}, NOW, POLICY, [{"CPU": 1.0}, {"CPU": 0.0, "GPU": 1.0}])
    assert reasons["gpu"] == "waiting for 1 CPU, 1 GPU on one node: no node has all of them free at once"


def test_a_one_process_jobs_reservation_holds_a_node_it_fits_and_pins_smaller_jobs_elsewhere() -> None:
    """Node A (4 CPU, 1 used) is the only node big (4 CPU, one process) can ever run on; B (2 CPU) is idle. Reserved
    cluster-wide only, a stream of 1-CPU jobs kept landing on A (Ray places an entrypoint where it likes): big never
    started. Now A is held: small jobs are charged to B and pinned there, and wait when B is full."""
    totals, free = [{"CPU": 4.0}, {"CPU": 2.0}], [{"CPU": 3.0}, {"CPU": 2.0}]
    big, small = job("big", 5, 1, waited_s=600, num_cpus=4), job("small", 1, 2, num_cpus=1)
    pinned: dict[str, int] = {}
    start, reasons = plan([big, small], {"CPU": 5.0}, NOW, POLICY, free, totals, pinned)
    assert start == [small] and pinned == {"small": 1}
    assert reasons["big"] == ("waiting for 4 CPU on one node: at most 3 CPU free on any node (holds a reservation: "
                              "nothing ranked lower may take what it needs)")
    pinned.clear()
    start, reasons = plan([big, small], {"CPU": 3.0}, NOW, POLICY, [{"CPU": 3.0}, {"CPU": 0.0}], totals, pinned)
    assert start == [] and pinned == {}  # only A has room, and A is held for big
    assert reasons["small"] == "waiting for 1 CPU on one node: at most 0 CPU free on any node"
    start, _ = plan([big, small], {"CPU": 5.0}, NOW, POLICY, free, totals)  # no reservation yet: nothing pinned
    assert start == [small]
    # the held node is B (3 of 4 free, nearer than A's 2): only B's 3 CPU are held, so a 2-CPU job fits on A
    two = job("two", 1, 2, num_cpus=2)
    pinned.clear()
    start, _ = plan([big, two], {"CPU": 5.0}, NOW, POLICY, [{"CPU": 2.0}, {"CPU": 3.0}], [{"CPU": 4.0}] * 2, pinned)
    assert start == [two] and pinned == {"two": 0}
    young = job("big", 5, 1, num_cpus=4)
    pinned.clear()
    start, _ = plan([young, small], {"CPU": 5.0}, NOW, POLICY, free, totals, pinned)
    assert start == [small] and pinned == {}  # before big has waited reserve_after_s, Ray places small freely


def test_per_node_free_is_read_from_the_load_report() -> None:
    """The dashboard's cluster status, as Ray 2.60 serves it: usageByNode, [used, total] per camelCased resource,
    keyed by node id (a local or read-only cluster) or by node IP (a cluster the autoscaler launched)."""
    a = NodeResources("aa11", "10.0.0.1", True, {"CPU": 4.0, "object_store_memory": 1e9, "my_res": 2.0})
    b = NodeResources("bb22", "10.0.0.2", False, {"CPU": 4.0, "GPU": 1.0})
    by_id = {"loadMetricsReport": {"usageByNode": {
        "aa11": {"CPU": [3.0, 4.0], "objectStoreMemory": [0.5e9, 1e9], "myRes": [2.0, 2.0]},
        "bb22": {"CPU": [1.0, 4.0], "GPU": [0.0, 1.0]}}}}
    expected = [{"CPU": 1.0, "object_store_memory": 0.5e9, "my_res": 0.0}, {"CPU": 3.0, "GPU": 1.0}]
    assert nodes_free(by_id, [a, b]) == expected
    by_ip = {"loadMetricsReport": {"usageByNode": {"10.0.0.1": by_id["loadMetricsReport"]["usageByNode"]["aa11"],
                                                   "10.0.0.2": by_id["loadMetricsReport"]["usageByNode"]["bb22"]}}}
    assert nodes_free(by_ip, [a, b]) == expected
    twin = NodeResources("cc33", "10.0.0.2", False, {"CPU": 4.0})  # two nodes on one IP: which is which?
    assert nodes_free(by_ip, [a, b, twin]) is None
    assert nodes_free(None, [a]) is None and nodes_free({"loadMetricsReport": {}}, [a]) is None  # autoscaler v2


def _raise(e: BaseException) -> None:
    raise e


class FakeCluster:
    """Stands in for JobsClient in a runner's round: nodes of 2 CPU each (or ``cpus``) with some used, submissions
    that are recorded or fail the way JobsClient turns Ray's client errors into ClusterError (its own `_call`)."""

    def __init__(self, used: dict[str, float], cpus: dict[str, float] | None = None) -> None:
        self.cpus = cpus or {n: 2.0 for n in used}
        self.nodes = [NodeResources(n, f"10.0.0.{i}", i == 0, {"CPU": self.cpus[n]}) for i, n in enumerate(used)]
        self.used, self.submitted, self.error = used, [], None
        self.resources: dict[str, JobResources] = {}

    def __call__(self, address: str, token: str | None = None) -> FakeCluster:
        return self

    def cluster_resources(self) -> ClusterResources:
        total = sum(self.cpus.values())
        usage = {"loadMetricsReport": {"usageByNode": {n: {"CPU": [u, self.cpus[n]]} for n, u in self.used.items()}}}
        return ClusterResources(self.nodes, {"CPU": total}, {"CPU": total - sum(self.used.values())},
                                nodes_free(usage, self.nodes))

    def submit(self, entrypoint: str, *, job_id: str, **kwargs: Any) -> str:
        self.resources[job_id] = kwargs["resources"]
        if self.error is not None:
            JobsClient._call(SimpleNamespace(address="http://head:8265"), f"submitting job {job_id}", _raise,
                             self.error)
        self.submitted.append(job_id)
        return job_id

    def info(self, job_id: str) -> JobInfo:
        return JobInfo(job_id, "RUNNING", "true")


def test_a_job_pinned_to_a_node_that_left_books_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It waits for Ray's start timeout without running anywhere: the CPUs it declared are free for others."""
    fake = FakeCluster({"n1": 0.0})
    monkeypatch.setattr("launch.job_queue.JobsClient", fake)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=2), priority=5, job_id="stuck")
    q.enqueue("true", JobResources(num_cpus=2), priority=1, job_id="next")
    with q.locked() as jobs:
        jobs[0].state, jobs[0].pinned_ip = RUNNING, "10.9.9.9"
    QueueRunner(q, "http://head:8265", log=lambda _: None).run_once()
    assert fake.submitted == ["next"]


def test_a_round_plans_one_process_jobs_per_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCluster({"n1": 1.0, "n2": 1.0})
    monkeypatch.setattr("launch.job_queue.JobsClient", fake)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=2), priority=5, job_id="solo")
    q.enqueue("true", JobResources(num_cpus=2), priority=1, job_id="train", reserve_in_ray=False)
    runner = QueueRunner(q, "http://head:8265", log=lambda _: None)
    jobs = {j.job_id: j for j in runner.run_once()}
    assert fake.submitted == ["train"] and jobs["solo"].state == QUEUED  # planned cluster-wide, solo took it
    jobs = {j.job_id: j for j in runner.run_once()}  # others use 2 CPU, train's 2 are not reported yet: 0 free
    assert fake.submitted == ["train"]
    assert jobs["solo"].reason.startswith("waiting for 2 CPU, 0 free (Ray reports 2 CPU more free, held for jobs")
    fake.used = {"n1": 0.0, "n2": 2.0}  # the others ended, Ray reports train's 2 CPU (on n2)
    jobs = {j.job_id: j for j in runner.run_once()}  # but train is new: its booking may not be in the report yet
    assert fake.submitted == ["train"] and jobs["solo"].reason.startswith("waiting for 2 CPU, 0 free (Ray reports")
    with q.locked() as queued:  # WORKERS_GRACE_S later: the report is trusted, the 2 CPU still free are on n1
        next(j for j in queued if j.job_id == "train").submitted_at -= WORKERS_GRACE_S
    runner.run_once()
    assert fake.submitted == ["train", "solo"]
    fake.used = {"n1": 1.0, "n2": 1.0}  # per node: 2 CPU free in all, but on no one node
    q.enqueue("true", JobResources(num_cpus=2), priority=5, job_id="solo2")
    with q.locked() as queued:
        for job in queued:
            job.state = SUCCEEDED if job.job_id != "solo2" else job.state
    jobs = {j.job_id: j for j in runner.run_once()}
    assert jobs["solo2"].reason == "waiting for 2 CPU on one node: at most 1 CPU free on any node"


def test_a_round_pins_smaller_jobs_away_from_the_node_reserved_for_a_bigger_one(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCluster({"a": 1.0, "b": 0.0}, cpus={"a": 4.0, "b": 2.0})
    monkeypatch.setattr("launch.job_queue.JobsClient", fake)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=4), priority=5, job_id="big")
    q.enqueue("true", JobResources(num_cpus=1), priority=1, job_id="small")
    runner = QueueRunner(q, "http://head:8265", log=lambda _: None, policy=QueuePolicy(reserve_after_s=0.0))
    runner.run_once()
    assert fake.submitted == ["small"] and fake.resources["small"].custom == {"node:10.0.0.1": 0.001}
    assert fake.resources["small"].num_cpus == 1
    fake.used = {"a": 0.0, "b": 1.0}  # the job that held node a's CPU ended; small runs on b
    runner.run_once()
    assert fake.submitted == ["small", "big"] and fake.resources["big"].custom == {}


def test_pins_are_not_trusted_when_nodes_share_an_ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two raylets on one host (every one-machine test cluster) carry the same `node:<ip>` resource: the pin that
    should keep a small job off the node reserved for a big one let Ray put it there (3 of 3 on a real cluster)."""
    fake = FakeCluster({"a": 1.0, "b": 0.0}, cpus={"a": 4.0, "b": 2.0})
    fake.nodes[1] = NodeResources("b", fake.nodes[0].ip, False, {"CPU": 2.0})
    monkeypatch.setattr("launch.job_queue.JobsClient", fake)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=4), priority=5, job_id="big")
    q.enqueue("true", JobResources(num_cpus=1), priority=1, job_id="small")
    runner = QueueRunner(q, "http://head:8265", log=lambda _: None, policy=QueuePolicy(reserve_after_s=0.0))
    jobs = {j.job_id: j for j in runner.run_once()}
    assert fake.submitted == [] and jobs["small"].state == QUEUED
    assert "cannot be kept off it (several nodes have the IP 10.0.0.0" in jobs["small"].reason
    fake.used = {"a": 0.0, "b": 0.0}
    runner.run_once()
    assert fake.submitted == ["big", "small"] and fake.resources["small"].custom == {}  # no reservation, no pin


def test_a_stale_usage_report_does_not_start_more_than_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reports a submission's usage seconds later (5.5 s on a local head): in that gap the report, not the
    bookings, hid another user's job, and the queue started B where there was no room; B then waited in Ray's
    order, ahead of an urgent job queued after it."""
    fake = FakeCluster({"n1": 1.0})  # 2 CPU, 1 used outside the queue
    monkeypatch.setattr("launch.job_queue.JobsClient", fake)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=1), priority=5, job_id="A")
    q.enqueue("true", JobResources(num_cpus=1), priority=4, job_id="B")
    runner = QueueRunner(q, "http://head:8265", log=lambda _: None)
    runner.run_once()
    jobs = {j.job_id: j for j in runner.run_once()}  # Ray still reports 1 CPU used: A's is not in it yet
    assert fake.submitted == ["A"] and jobs["B"].reason.startswith("waiting for 1 CPU, 0 free (Ray reports 1 CPU ")
    fake.used = {"n1": 2.0}  # reported now: used and not yet trusted to be reported add up past the 2 CPU
    assert {j.job_id: j.reason for j in runner.run_once() if j.state == QUEUED} == {"B": "waiting for 1 CPU, 0 free"}
    fake.used = {"n1": 1.0}  # the outside job ended; REPORT_GRACE_S after A's submission the report is trusted
    with q.locked() as queued:
        next(j for j in queued if j.job_id == "A").submitted_at -= REPORT_GRACE_S
    runner.run_once()
    assert fake.submitted == ["A", "B"]


def test_an_autoscaling_cluster_at_full_scale_counts_what_others_use() -> None:
    """With --cluster-file the queue planned against full-scale capacity less its own bookings: on a cluster at
    max_workers whose CPUs other users' jobs held, it submitted jobs that could only wait PENDING."""
    full = {"CPU": 8.0}
    assert planning_free(full, {"CPU": 0.0}, {}, max_total=full) == {"CPU": 0.0}
    assert planning_free({"CPU": 4.0}, {"CPU": 1.0}, {}, max_total=full) == {"CPU": 5.0}  # 3 used, 4 to add
    assert planning_free({"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 2.0}, max_total=full) == {"CPU": 6.0}  # booked
    assert planning_free({"CPU": 4.0}, {"CPU": 3.0}, {"CPU": 2.0}, max_total=full,
                         unreported={"CPU": 2.0}) == {"CPU": 5.0}  # 1 used by others, 2 not reported yet


def test_already_exists_in_an_error_about_something_else_counts_as_a_failed_submission(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The words could come from a runtime env's package step: taken for "this id is on the cluster", the job was
    "checked next round" for good, never counted as failing."""
    from launch.jobs import JobNotFoundError

    class NoSuchJob(FakeCluster):
        def info(self, job_id: str) -> JobInfo:
            raise JobNotFoundError(f"no job {job_id}")

    fake = NoSuchJob({"n1": 0.0})
    monkeypatch.setattr("launch.job_queue.JobsClient", fake)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=1), job_id="a")
    runner = QueueRunner(q, "http://head:8265", log=lambda _: None, retry_after_s=0.0, max_submit_failures=2)
    fake.error = RuntimeError("Request failed with status code 500: /tmp/pkg.zip already exists")
    (a,) = runner.run_once()
    assert a.state == QUEUED and a.submit_failures == 1 and "(1 of 2 tries)" in a.reason, a.reason
    (a,) = runner.run_once()
    assert a.state == FAILED and "failed 2 times, giving up" in a.reason


def test_failed_submissions_back_off_and_refused_ones_fail_at_once(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ClusterError used to count the same and retry on the very next round. A lost connection, a 5xx, a
    429 retry after a wait that doubles; a submission the cluster refused fails at once: it would be refused again."""
    fake = FakeCluster({"n1": 0.0})
    monkeypatch.setattr("launch.job_queue.JobsClient", fake)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=1), job_id="a")
    runner = QueueRunner(q, "http://head:8265", log=lambda _: None, retry_after_s=60.0, max_submit_failures=4)
    fake.error = requests.ConnectionError("refused")
    (a,) = runner.run_once()
    assert a.state == QUEUED and a.retry_at == pytest.approx(time.time() + 60, abs=5)
    assert "(1 of 4 tries), will retry in 60 s: submitting job a: lost the Ray dashboard" in a.reason
    fake.error = None  # the cluster is back, but the job waits for its retry time
    (a,) = runner.run_once()
    assert fake.submitted == [] and a.state == QUEUED
    assert re.fullmatch(r"submission failed 1 time\(s\), retrying at \d\d:\d\d:\d\d \(in (59|60) s\): "
                        r"submitting job a: lost .*", a.reason), a.reason
    for error, wait in ((RuntimeError("Request failed with status code 503: agent busy."), 120),
                        (RuntimeError("Request failed with status code 429: slow down."), 240)):
        with q.locked() as (entry,):
            entry.retry_at = time.time() - 1
        fake.error = error
        (a,) = runner.run_once()
        assert a.state == QUEUED and f"will retry in {wait} s" in a.reason, a.reason
    with q.locked() as (entry,):
        entry.retry_at = time.time() - 1
    fake.error = None
    (a,) = runner.run_once()
    assert fake.submitted == ["a"] and a.state == RUNNING and a.retry_at is None and a.submit_failures == 3

    refusals = {"bad-env": RuntimeError("Request failed with status code 400: Traceback ... ValueError: pip."),
                "local": ValueError("working_dir must be an existing directory or a zip package"),
                "no-jobs-api": RuntimeError("Request failed with status code 404: Not Found.")}
    for job_id, error in refusals.items():
        q.enqueue("true", JobResources(), job_id=job_id)
        fake.error = error
        jobs = {j.job_id: j for j in runner.run_once()}
        assert jobs[job_id].state == FAILED and jobs[job_id].submit_failures == 1, jobs[job_id].reason
        assert jobs[job_id].reason.startswith(f"submission refused, not retrying: submitting job {job_id} on ")
    q.enqueue("true", JobResources(), job_id="eio")  # packaging the files failed: may pass once the disk is fixed
    fake.error = OSError(5, "Input/output error", "/proj/data")
    (eio,) = [j for j in runner.run_once() if j.job_id == "eio"]
    assert eio.state == QUEUED and "cannot package the job's files (/proj/data)" in eio.reason


def test_aging_lets_an_old_low_priority_job_overtake() -> None:
    old = job("old", 0, 1, waited_s=2 * 3600, num_cpus=2)  # 0 + 6/h * 2 h = 12
    new = job("new", 10, 2, num_cpus=2)
    start, reasons = plan([new, old], {"CPU": 2.0}, NOW, POLICY)
    assert [j.job_id for j in start] == ["old"] and "new" in reasons
    start, _ = plan([new, old], {"CPU": 2.0}, NOW, QueuePolicy(aging_per_hour=0.0))
    assert [j.job_id for j in start] == ["new"]


def test_fractional_gpus_and_memory_reasons() -> None:
    jobs = [job(f"g{i}", 0, i, num_gpus=0.5) for i in range(3)]
    start, reasons = plan(jobs, {"GPU": 1.0, "CPU": 4.0}, NOW, POLICY)
    assert [j.job_id for j in start] == ["g0", "g1"]
    assert reasons == {"g2": "waiting for 0.5 GPU, 0 free"}
    _, reasons = plan([job("m", 0, 1, memory=8 * 2**30)], {"memory": 2.0 * 2**30}, NOW, POLICY)
    assert reasons["m"] == "waiting for 8.0 GiB memory, 2.0 GiB free"


# ---------------------------------------------------------------- persistence


def test_queue_file_roundtrip_stop_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "q" / "queue.json"
    q = JobQueue(path)
    a = q.enqueue("echo a", JobResources(num_cpus=1, memory=2**30), priority=3, name="a",
                  runtime_env={"env_vars": {"X": "1"}}, reserve_in_ray=False)
    q.enqueue("echo b", JobResources(num_gpus=0.25), job_id="b")
    again = JobQueue(path).list_jobs()  # a fresh object sees the same queue
    assert [(j.job_id, j.state, j.seq) for j in again] == [(a.job_id, QUEUED, 1), ("b", QUEUED, 2)]
    assert again[0] == a and again[1].resources.num_gpus == 0.25
    assert json.loads(path.read_text())["version"] == 3
    assert JobQueue(path).stop("b").state == STOPPED
    assert JobQueue(path).list_jobs()[1].reason == "stopped before it started"
    with pytest.raises(ClusterError, match="already has a job b"):
        q.enqueue("echo", JobResources(), job_id="b")
    with pytest.raises(JobNotFoundError, match="zzz"):
        q.stop("zzz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["queue.json", "queue.json.lock"]  # no temp files left
    path.write_text("{not json")
    with pytest.raises(ClusterError, match="unreadable"):
        q.list_jobs()
    assert path.read_text() == "{not json"


def test_a_queue_file_written_before_retry_times_loads(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    old = {"job_id": "a", "name": "a", "entrypoint": "true", "resources": {"num_cpus": 1}, "priority": 0,
           "runtime_env": {}, "metadata": {}, "reserve_in_ray": True, "state": QUEUED, "reason": "submission failed",
           "seq": 1, "enqueued_at": 1.0, "submitted_at": None, "finished_at": None, "stop_requested": False,
           "submit_failures": 1}
    path.write_text(json.dumps({"version": 1, "jobs": [old]}))
    (a,) = JobQueue(path).list_jobs()
    assert (a.retry_at, a.submit_error, a.submit_failures) == (None, "", 1)
    assert [j.job_id for j in plan([a], {"CPU": 1.0}, NOW, POLICY)[0]] == ["a"]
    JobQueue(path).stop("a")  # rewritten as version 3, which an older dgm refuses by its version, unread
    assert json.loads(path.read_text())["version"] == 3
    path.write_text(json.dumps({"version": 4, "jobs": []}))
    with pytest.raises(ClusterError, match=r"unreadable \(format version 4, this dgm reads 1, 2, 3\)"):
        JobQueue(path).list_jobs()


def test_a_queue_path_that_is_a_folder_and_a_job_missing_fields_are_named(tmp_path: Path) -> None:
    """A folder gave IsADirectoryError from `queue add` and "does not exist" from `dgm jobs --queue`; a job entry
    without its resources said only "unreadable ('resources')"."""
    from launch.job_queue import list_jobs

    with pytest.raises(ClusterError, match=rf"queue file {tmp_path} is a folder; give a file such as "):
        JobQueue(tmp_path).enqueue("true", JobResources())
    with pytest.raises(ClusterError, match=rf"queue file {tmp_path} is a folder"):
        list_jobs(tmp_path)
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"version": 2, "jobs": [{"job_id": "j5", "name": "x", "surprise": 1}]}))
    with pytest.raises(ClusterError, match=r"unreadable \(job 'j5': missing field entrypoint, resources; unknown "
                                           r"field surprise\); it was left untouched"):
        JobQueue(path).list_jobs()
    # a hand-edited field of the wrong type is named when read (it crashed the runner's planning)
    job = {"job_id": "j6", "name": "x", "entrypoint": "true", "resources": {"num_cpus": 1}, "priority": "5",
           "reserve_in_ray": 1, "retry_at": None, "submitted_at": 3}
    path.write_text(json.dumps({"version": 3, "jobs": [job]}))
    with pytest.raises(ClusterError, match=r"unreadable \(job 'j6': priority is str '5', not int; reserve_in_ray is "
                                           r"int 1, not bool\); it was left untouched"):
        JobQueue(path).list_jobs()
    job.update(priority=5, reserve_in_ray=True)
    path.write_text(json.dumps({"version": 3, "jobs": [job]}))
    assert JobQueue(path).list_jobs()[0].submitted_at == 3  # an int where a float is expected is a float
    # resources and state: a typo such as "cpus" booked nothing and started at once; "runing" was never tracked
    for edit, said in [({"resources": {"cpus": 4}}, r"resources: unknown key cpus \(known: num_cpus, num_gpus, "
                                                      r"memory, custom\)"),
                       ({"resources": {"memory": "4GiB"}}, "resources: memory is str '4GiB', not a number"),
                       ({"resources": "4 CPU"}, "resources must be an object, got str '4 CPU'"),
                       ({"resources": {"custom": {"tpu": "1"}}}, "resources: custom is .*, not an object of resource"),
                       ({"state": "runing"}, "state 'runing' is not one of queued, running, succeeded")]:
        path.write_text(json.dumps({"version": 3, "jobs": [{**job, **edit}]}))
        with pytest.raises(ClusterError, match=rf"unreadable \(job 'j6': {said}"):
            JobQueue(path).list_jobs()
    with pytest.raises(ClusterError, match=rf"queue file {path}/q.json: cannot create its folder {path} \("):
        JobQueue(path / "q.json")  # a path below a file


def test_a_queued_job_reaches_the_same_store_without_carrying_secrets(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint and region travel with a queued job as with `dgm submit` (without them a MinIO user's job
    spoke to AWS); AWS secrets and the profile never do, even when asked for: the queue file is plain JSON."""
    project = tmp_path / "proj"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "gan.yaml").write_text("name: gan\n")
    monkeypatch.setenv("DGM_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_PROFILE", "laptop-sso")
    monkeypatch.setenv("DGM_FORWARD_AWS_CREDENTIALS", "1")
    queued = enqueue_training(tmp_path / "q.json", str(project / "configs" / "gan.yaml"), [], str(project),
                              JobResources(num_cpus=1), job_id="gan-2")
    env = queued.runtime_env["env_vars"]
    assert env["DGM_S3_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_PROFILE" not in env
    assert "s3cr3t" not in (tmp_path / "q.json").read_text()


def test_enqueue_training_persists_what_submit_would_send(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "gan.yaml").write_text("model: gan\n")
    queued = enqueue_training(tmp_path / "q.json", str(project / "configs" / "gan.yaml"), ["steps=5"], str(project),
                              JobResources(num_cpus=2, num_gpus=1), priority=2, job_id="gan-1")
    (again,) = JobQueue(tmp_path / "q.json").list_jobs()
    assert again == queued and again.name == "gan" and not again.reserve_in_ray
    # The config as it was when queued travels with the job: an edit before `queue run` submits it changes nothing
    (project / "configs" / "gan.yaml").write_text("model: edited\n")
    assert again.runtime_env["env_vars"]["DGM_SUBMITTED_CONFIG"] == "model: gan\n"
    assert again.entrypoint.endswith("python -m launch.cli train .dgm_submitted/gan-1.yaml --address auto steps=5 "
                                     "run_dir=.dgm_jobs/gan-1/runs/experiment")
    assert again.runtime_env["working_dir"] == str(project.resolve()) and "/.venv/" in again.runtime_env["excludes"]


def test_a_queued_config_too_large_to_carry_says_it_is_read_when_submitted(tmp_path: Path, capsys) -> None:
    project = tmp_path / "proj"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "big.yaml").write_text("# " + "x" * 100_000 + "\nname: big\n")
    queued = enqueue_training(tmp_path / "q.json", str(project / "configs" / "big.yaml"), [], str(project),
                              JobResources(num_cpus=1), job_id="big-1")
    assert "train configs/big.yaml" in queued.entrypoint
    assert "the job trains it as it is when the queue submits the job, not as it is now" in capsys.readouterr().err


# ---------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with start_local_cluster(num_cpus=2) as c:
        yield c


def sleeper(seconds: float) -> str:
    return f"python -c {shlex.quote(f'import time; time.sleep({seconds})')}"


@pytest.mark.slow
def test_queue_on_a_real_cluster_with_restart(cluster: LocalRayCluster, tmp_path: Path) -> None:
    path = tmp_path / "queue.json"
    q = JobQueue(path)
    q.enqueue(sleeper(2), JobResources(num_cpus=2), priority=5, job_id="big")
    q.enqueue(sleeper(2), JobResources(num_cpus=1), priority=10, job_id="small-hi")
    q.enqueue(sleeper(2), JobResources(num_cpus=1), priority=1, job_id="small-lo")
    q.enqueue(sleeper(120), JobResources(), priority=0, job_id="watcher")
    q.enqueue(sleeper(1), JobResources(num_gpus=1), priority=9, job_id="needs-gpu")
    lines: list[str] = []
    runner = QueueRunner(path, cluster.address, token=cluster.token, log=lines.append)

    jobs = {j.job_id: j for j in runner.run_once()}
    assert {k: j.state for k, j in jobs.items()} == {
        "big": QUEUED, "small-hi": RUNNING, "small-lo": RUNNING, "watcher": RUNNING, "needs-gpu": FAILED}
    assert jobs["big"].reason == "waiting for 2 CPU, 0 free"
    assert "can never run" in jobs["needs-gpu"].reason and "no node has any GPU" in jobs["needs-gpu"].reason
    q.stop("watcher")
    del runner  # the process running the queue goes away mid-way; a new one picks up from the file

    runner = QueueRunner(JobQueue(path), cluster.address, token=cluster.token, log=lines.append)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        jobs = {j.job_id: j for j in runner.run_once()}
        if all(j.state in FINISHED for j in jobs.values()):
            break
        time.sleep(0.5)
    states = {k: j.state for k, j in jobs.items()}
    assert states == {"big": SUCCEEDED, "small-hi": SUCCEEDED, "small-lo": SUCCEEDED, "watcher": STOPPED,
                      "needs-gpu": FAILED}, {k: j.reason for k, j in jobs.items()}
    hi, lo, big = jobs["small-hi"], jobs["small-lo"], jobs["big"]
    assert hi.submitted_at <= lo.submitted_at < big.submitted_at  # priority first, then backfill, big last
    assert big.submitted_at >= max(hi.finished_at, lo.finished_at)  # it never ran over the small ones
    assert any(line.startswith("big: started") for line in lines)
    client = JobsClient(cluster.address, token=cluster.token)  # per-node free, as the live dashboard reports it
    (node,) = client.cluster_resources().node_free
    assert 0.0 <= node["CPU"] <= 2.0 and node["memory"] > 0


@pytest.mark.slow
def test_a_job_pinned_to_a_node_that_left_before_it_started_is_queued_again(tmp_path: Path) -> None:
    """Ray keeps such a job PENDING (a stop does not reach a supervisor never placed) until its start timeout
    (900 s by default, 4 s on this head) fails it; the queue then frees the id and queues the job again."""
    path = tmp_path / "queue.json"
    q = JobQueue(path)
    for job_id in ("pinned", "stopped", "forgotten"):
        q.enqueue(sleeper(0.5), JobResources(num_cpus=0.5), job_id=job_id)
    lines: list[str] = []
    with start_local_cluster(num_cpus=2, env_extra={"RAY_JOB_START_TIMEOUT_SECONDS": "4"}) as cluster:
        runner = QueueRunner(path, cluster.address, token=cluster.token, log=lines.append)
        client = JobsClient(cluster.address, token=cluster.token)
        with q.locked() as jobs:  # as a round does when a reservation holds the other nodes; this one has gone
            runner._submit(client, jobs[0], pin_ip="10.255.255.1")
            runner._submit(client, jobs[1], pin_ip="10.255.255.1")
            # a runner that deleted the record of a job it was queueing again, then died before saving the queue
            jobs[2].state, jobs[2].pinned_ip = RUNNING, "10.255.255.2"
        jobs = {j.job_id: j for j in runner.run_once()}
        assert (jobs["pinned"].state, jobs["pinned"].pinned_ip) == (RUNNING, "10.255.255.1")
        assert ("the node 10.255.255.1 it was pinned to left the cluster: queued again when Ray's start"
                in jobs["pinned"].reason)
        assert jobs["forgotten"].state == RUNNING and jobs["forgotten"].pinned_ip == ""  # queued again, started
        q.stop("stopped")  # Ray cannot deliver it; the job must not be queued again and started after all
        deadline = time.monotonic() + 90
        while not all(j.state in FINISHED for j in jobs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs = {j.job_id: j for j in runner.run_once()}
        assert {k: j.state for k, j in jobs.items()} == {"pinned": SUCCEEDED, "stopped": STOPPED,
                                                         "forgotten": SUCCEEDED}, {k: j.reason for k, j in jobs.items()}
        assert jobs["stopped"].reason == "stopped before it started"
        assert "pinned: queued again: the node 10.255.255.1 it was pinned to left the cluster before it started" in lines
        assert not any(line.startswith("stopped: queued again") for line in lines)
        assert jobs["pinned"].pinned_ip == "" and client.info("pinned").error_type == ""  # the second one ran
        assert client.info("stopped").error_type == "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"  # never submitted again


def test_a_stop_requested_while_a_round_queued_the_job_again_stops_it(tmp_path: Path) -> None:
    """The round read the job RUNNING and queued it again (its node left); `queue stop` came in meanwhile."""
    from launch.job_queue import _merge

    q = JobQueue(tmp_path / "q.json")
    q.enqueue("true", JobResources(num_cpus=1), job_id="a")
    with q.locked() as jobs:
        jobs[0].state = RUNNING
    (worked,) = q.list_jobs()
    worked.state, worked.reason = QUEUED, "queued again: the node 10.0.0.9 it was pinned to left the cluster"
    q.stop("a")
    with q.locked() as jobs:
        _merge(jobs, {"a": worked}, {"a": RUNNING})
    (job,) = q.list_jobs()
    assert (job.state, job.reason) == (STOPPED, "stopped before it started")


@pytest.mark.slow
def test_a_broken_queue_file_is_not_taken_for_an_unreachable_cluster(cluster: LocalRayCluster,
                                                                    tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text("{not json")
    said: list[str] = []

    class Enough(Exception):
        pass

    def log(line: str) -> None:
        said.append(line)
        if len(said) == 3:
            raise Enough

    runner = QueueRunner(path, cluster.address, token=cluster.token, log=log)
    with pytest.raises(Enough):  # retried (the user may fix the file) past the limit, not given up as "not reached"
        runner.run_forever(poll_s=0.3, give_up_after_s=0.2)
    assert all("queue file" in line and "unreadable" in line for line in said), said
    assert path.read_text() == "{not json"


@pytest.mark.slow
def test_on_two_real_nodes_a_small_job_runs_on_the_node_the_reservation_left_it(tmp_path: Path) -> None:
    """The multi-node rules on a real 2-raylet cluster, not a stand-in: the queue sees both nodes' free CPUs, holds
    the node nearest to fitting the big job, and the small job it pins elsewhere runs there (Ray's driver node)."""
    from tests.fixtures_ray_cluster import WorkerNode

    worker = WorkerNode(num_cpus=4, ip="127.0.0.2", resources={"wnode": 1})
    with start_local_cluster(num_cpus=4, head_resources={"hnode": 1}, workers=(worker,)) as cluster:
        client = JobsClient(cluster.address, token=cluster.token)
        # 2 CPU taken on the head, 3 on the worker: 2 and 1 free, the 3-CPU job fits neither
        client.submit(sleeper(120), job_id="fill-head", resources=JobResources(num_cpus=2, custom={"hnode": 0.5}),
                      check_resources=False)
        client.submit(sleeper(120), job_id="fill-worker",
                      resources=JobResources(num_cpus=3, custom={"wnode": 0.5}), check_resources=False)
        deadline = time.monotonic() + 60
        while sorted(f.get("CPU", 0.0) for f in client.cluster_resources().node_free or []) != [1.0, 2.0]:
            assert time.monotonic() < deadline, "Ray never reported the fill jobs' CPUs"
            time.sleep(0.5)
        q = JobQueue(tmp_path / "q.json")
        q.enqueue(sleeper(1), JobResources(num_cpus=3), priority=5, job_id="big")
        q.enqueue(sleeper(60), JobResources(num_cpus=1), priority=1, job_id="small")
        runner = QueueRunner(q, cluster.address, token=cluster.token, log=lambda _: None,
                             policy=QueuePolicy(reserve_after_s=0.0))
        jobs = {j.job_id: j for j in runner.run_once()}
        assert jobs["big"].state == QUEUED and jobs["big"].reason.startswith("waiting for 3 CPU")
        assert "holds a reservation" in jobs["big"].reason
        assert jobs["small"].state == RUNNING and jobs["small"].pinned_ip == worker.ip  # the head is held for big
        nodes = {n.node_id: n.ip for n in client.cluster_resources().nodes}
        deadline = time.monotonic() + 60
        while not (driver := client._client.get_job_info("small").driver_node_id):
            assert time.monotonic() < deadline, "the small job's driver never started"
            time.sleep(0.3)
        assert nodes[driver] == worker.ip
        for job_id in ("small", "fill-head", "fill-worker"):
            client.stop(job_id, wait_s=10)


@pytest.mark.slow
def test_a_rejected_token_ends_the_runner_at_once(cluster: LocalRayCluster, tmp_path: Path) -> None:
    """It was retried, one line every poll, until --give-up-after (600 s by default), and for ever by a runner
    that had reached the cluster before: a token the head rejects is rejected again."""
    said: list[str] = []
    runner = QueueRunner(tmp_path / "q.json", cluster.address, token="wrong", log=said.append)
    started = time.monotonic()
    with pytest.raises(ClusterError, match="rejected the auth token"):
        runner.run_forever(poll_s=0.2, give_up_after_s=30)
    assert said == [] and time.monotonic() - started < 10
    runner.reached = True  # a token rotated on the head under a runner that had reached it
    with pytest.raises(ClusterError, match="rejected the auth token"):
        runner.run_forever(poll_s=0.2, give_up_after_s=0)


def _node(node_id: str, **total: float) -> NodeResources:
    return NodeResources(node_id, "10.0.0.1", False, dict(total))


def test_a_node_gone_for_a_while_does_not_fail_the_jobs_that_need_it(tmp_path: Path) -> None:
    """Spot workers come and go: a job is judged against every node seen and every node type the cluster file
    can add, so it waits instead of failing for good; what no node can ever hold still fails at once."""
    q = JobQueue(tmp_path / "q.json")
    gpu_job = q.enqueue("echo", JobResources(num_gpus=1), job_id="gpu")
    spread = q.enqueue("echo", JobResources(num_gpus=4), job_id="spread", reserve_in_ray=False)
    runner = QueueRunner(q, "http://127.0.0.1:1", log=lambda _: None)
    runner._remember({"CPU": 8.0, "GPU": 1.0}, [_node("a", CPU=4.0), _node("b", CPU=4.0, GPU=1.0)])
    runner._remember({"CPU": 4.0}, [_node("a", CPU=4.0)])  # the GPU node is reclaimed
    assert runner._feasible(gpu_job, 0.0) and gpu_job.state == QUEUED
    later = QueueRunner(q, "http://127.0.0.1:1", log=lambda _: None)  # a restart, or the next `--once` round
    later._remember({"CPU": 4.0}, [_node("a", CPU=4.0)])
    assert later._feasible(gpu_job, 0.0) and gpu_job.state == QUEUED

    other = JobQueue(tmp_path / "other.json")  # a queue whose runners have only ever seen CPU nodes
    fresh = QueueRunner(other, "http://127.0.0.1:1", log=lambda _: None)
    fresh._remember({"CPU": 4.0}, [_node("a", CPU=4.0)])
    assert not fresh._feasible(gpu_job, 0.0) and gpu_job.state == FAILED
    assert "no node has any GPU" in gpu_job.reason and "--cluster-file" in gpu_job.reason

    gpu_job.state = QUEUED
    scaled = QueueRunner(other, "http://127.0.0.1:1", log=lambda _: None,
                         node_shapes=[{"CPU": 8.0, "GPU": 1.0}], max_total={"CPU": 32.0, "GPU": 4.0})
    scaled._remember({"CPU": 4.0}, [_node("a", CPU=4.0)])
    assert scaled._feasible(gpu_job, 0.0) and scaled._feasible(spread, 0.0)  # 4 one-GPU nodes hold the spread job
    spread.resources = JobResources(num_gpus=5)
    assert not scaled._feasible(spread, 0.0) and "5 GPU" in spread.reason


def test_queue_file_problems_are_named(tmp_path: Path) -> None:
    from launch.job_queue import list_jobs

    with pytest.raises(ClusterError, match="does not exist"):
        list_jobs(tmp_path / "typo.json")
    assert not (tmp_path / "typo.json.lock").exists()
    path = tmp_path / "q.json"
    q = JobQueue(path)
    with pytest.raises(ValueError, match="job id 'team/a'"):
        q.enqueue("echo", JobResources(), job_id="team/a")
    q.enqueue("echo", JobResources(), job_id="a")
    path.chmod(0o664)
    q.enqueue("echo", JobResources(), job_id="b")
    assert path.stat().st_mode & 0o777 == 0o664  # a shared queue stays readable by its group
    path.write_text("[]")
    with pytest.raises(ClusterError, match="unreadable .*expected a JSON object, got list"):
        q.list_jobs()
    # a folder it may not write to: named, not a PermissionError traceback (/proc refuses new files, even to root)
    with pytest.raises(ClusterError, match=r"queue file /proc/q.json: cannot open its lock file /proc/q.json.lock"):
        JobQueue("/proc/q.json").enqueue("echo", JobResources())


@pytest.mark.slow
def test_submissions_that_keep_failing_stop_and_a_stranger_with_our_id_is_not_adopted(
        cluster: LocalRayCluster, tmp_path: Path) -> None:
    from launch.jobs import JobsClient

    JobsClient(cluster.address, token=cluster.token).submit(sleeper(0.1), job_id="taken-elsewhere",
                                                            check_resources=False)
    q = JobQueue(tmp_path / "q.json")
    q.enqueue(sleeper(0.1), JobResources(), job_id="taken-elsewhere")
    q.enqueue("echo", JobResources(), job_id="broken", runtime_env={"working_dir": str(tmp_path / "gone")})
    unreadable = tmp_path / "unreadable"  # packaging it fails with EIO: that used to end the round and the runner
    unreadable.mkdir()
    (unreadable / "mem").symlink_to("/proc/self/mem")
    q.enqueue("echo", JobResources(), job_id="unreadable", runtime_env={"working_dir": str(unreadable)})
    with q.locked() as entries:  # an entry from before ids were checked
        entries.append(QueuedJob(job_id="team/a", name="old", entrypoint="echo", resources=JobResources(), seq=9))
    runner = QueueRunner(q, cluster.address, token=cluster.token, log=lambda _: None, max_submit_failures=2,
                         retry_after_s=0.0)
    jobs = {j.job_id: j for j in runner.run_once()}
    assert jobs["team/a"].state == FAILED and "job id 'team/a'" in jobs["team/a"].reason
    assert jobs["taken-elsewhere"].state == FAILED, jobs["taken-elsewhere"].reason
    assert "already has another job with id taken-elsewhere" in jobs["taken-elsewhere"].reason
    # a working_dir that is gone: Ray's client refuses the runtime env, and would again
    assert jobs["broken"].state == FAILED and "submission refused, not retrying" in jobs["broken"].reason
    assert jobs["unreadable"].state == QUEUED and "(1 of 2 tries), will retry in 0 s" in jobs["unreadable"].reason
    assert "cannot package the job's files" in jobs["unreadable"].reason
    jobs = {j.job_id: j for j in runner.run_once()}
    assert jobs["unreadable"].state == FAILED and "failed 2 times, giving up" in jobs["unreadable"].reason


def test_queue_cli_stop_and_listing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    path = str(tmp_path / "q.json")
    assert main(["jobs", "--queue", path]) == 2 and "does not exist" in capsys.readouterr().err
    assert main(["queue", "stop", "x", "--queue", path]) == 2 and "does not exist" in capsys.readouterr().err
    JobQueue(path).enqueue("echo", JobResources(num_cpus=1), job_id="a")
    assert main(["queue", "stop", "a", "--queue", path]) == 0
    assert "a stopped (stopped before it started)" in capsys.readouterr().out
    assert main(["jobs", "--queue", path]) == 0 and "stopped" in capsys.readouterr().out


def test_a_round_keeps_what_the_cli_changed_meanwhile(tmp_path: Path) -> None:
    """A round talks to the cluster without holding the file lock: jobs enqueued or stopped while it ran survive
    its write-back, and a job it started just as it was stopped is stopped on the next round."""
    import copy

    from launch.job_queue import _merge

    q = JobQueue(tmp_path / "q.json")
    for name in ("a", "b", "c"):
        q.enqueue("echo", JobResources(num_cpus=1), job_id=name)
    work = copy.deepcopy(q.list_jobs())  # what a round read when it began
    before = {j.job_id: j.state for j in work}
    work[0].state, work[0].reason = RUNNING, "submitted"  # the round starts a, leaves b waiting, fails c
    work[1].reason = "waiting for 1 CPU, 0 free"
    work[2].state, work[2].reason = FAILED, "can never run"
    q.stop("a")  # meanwhile, from the CLI
    q.stop("b")
    q.enqueue("echo", JobResources(), job_id="d")
    with q.locked() as jobs:
        _merge(jobs, {j.job_id: j for j in work}, before)
    after = {j.job_id: j for j in q.list_jobs()}
    assert (after["a"].state, after["a"].stop_requested, after["a"].reason) == (RUNNING, True, "stop requested")
    assert (after["b"].state, after["b"].reason) == (STOPPED, "stopped before it started")
    assert after["c"].state == FAILED and after["d"].state == QUEUED


def test_a_runner_that_never_reaches_its_cluster_gives_up_but_one_that_did_waits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    path = str(tmp_path / "q.json")
    JobQueue(path).enqueue("echo", JobResources(num_cpus=1), job_id="a")
    start = time.monotonic()  # port 1: nothing listens, so every round fails at once
    assert main(["queue", "run", "--queue", path, "--address", "http://127.0.0.1:1", "--poll", "0.1",
                 "--give-up-after", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "cluster http://127.0.0.1:1 not reached in" in err and "--give-up-after 0" in err
    assert "does not exist yet" not in err
    assert time.monotonic() - start < 30
    typo = str(tmp_path / "q.jsn")  # a mistyped queue path is said, not served in silence
    assert main(["queue", "run", "--queue", typo, "--address", "http://127.0.0.1:1", "--poll", "0.1",
                 "--give-up-after", "0.2"]) == 2
    assert f"queue file {typo} does not exist yet" in capsys.readouterr().err
    assert [j.state for j in JobQueue(path).list_jobs()] == [QUEUED]  # the queue is left as it was
    with pytest.raises(SystemExit):
        main(["queue", "run", "--queue", path, "--give-up-after", "-1"])
    assert "--give-up-after: -1.0 is below 0.0 (0 waits without limit)" in capsys.readouterr().err

    start = time.monotonic()  # a --poll longer than the limit still gives up at the limit
    assert main(["queue", "run", "--queue", path, "--address", "http://127.0.0.1:1", "--poll", "60",
                 "--give-up-after", "0.5"]) == 2
    assert time.monotonic() - start < 30 and "(--give-up-after 0.5; last:" in capsys.readouterr().err

    runner = QueueRunner(path, "http://127.0.0.1:1", log=lambda _: None)
    rounds = iter(["reached"] + ["lost"] * 8 + ["idle"])

    def one_round() -> list[QueuedJob]:  # the head answers once, is gone for longer than the limit, comes back
        what = next(rounds)
        if what == "lost":
            raise ClusterError("connection refused")
        runner.reached = True
        return [] if what == "idle" else JobQueue(path).list_jobs()

    runner.run_once = one_round  # type: ignore[method-assign]
    runner.run_forever(poll_s=0.02, until_idle=True, give_up_after_s=0.05)
    assert next(rounds, "done") == "done"
