"""launch/jobs.py: input checks offline, then the Jobs API against a real local Ray head (token auth on)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from launch import job_spec, jobs, log_follow
from launch.jobs import ClusterError, InfeasibleJobError, JobNotFoundError, JobResources
from tests.fixtures_ray_cluster import LocalRayCluster, free_port, start_local_cluster

PY = "python"


def py(code: str) -> str:
    """A `python -c` entrypoint (shell-quoted)."""
    return f"{PY} -c {shlex.quote(code)}"


# ---------------------------------------------------------------- offline


def test_parse_memory() -> None:
    assert jobs.parse_memory("512MiB") == 512 * 2**20
    assert jobs.parse_memory("16GB") == 16 * 10**9
    assert jobs.parse_memory("2g") == 2 * 10**9
    assert jobs.parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert jobs.parse_memory(1024) == 1024
    with pytest.raises(ValueError, match="memory"):
        jobs.parse_memory("lots")


def test_job_resources_validation_and_request() -> None:
    r = JobResources(num_cpus=2, num_gpus=0.5, memory=2**30, custom={"ssd": 1})
    assert r.request() == {"CPU": 2.0, "GPU": 0.5, "memory": float(2**30), "ssd": 1.0}
    assert JobResources.from_dict(r.to_dict()) == r
    assert JobResources().request() == {}
    assert "0.5 GPU" in str(r)
    with pytest.raises(ValueError, match="num_cpus"):
        JobResources(num_cpus=-1)
    with pytest.raises(ValueError, match="fractions"):
        JobResources(num_gpus=1.5)
    with pytest.raises(ValueError, match="custom"):
        JobResources(custom={"GPU": 1})


def test_resolve_address() -> None:
    assert jobs.resolve_address("http://10.0.0.1:8265/") == "http://10.0.0.1:8265"
    assert jobs.resolve_address("10.0.0.1:9000") == "http://10.0.0.1:9000"
    assert jobs.resolve_address("head.example") == "http://head.example:8265"
    assert jobs.resolve_address("https://ray.example.com") == "https://ray.example.com"  # a proxy on 443
    assert jobs.resolve_address("http://[::1]:8265") == "http://[::1]:8265"  # IPv6, refused as "not a URL" before
    assert jobs.resolve_address("[fd00::5]") == "http://[fd00::5]:8265"
    for bad in ("ray://head:10001", "auto", "http://bad host:1", "::1:8265"):
        with pytest.raises(ClusterError):
            jobs.resolve_address(bad)


def test_resolve_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.resolve_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.resolve_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.resolve_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.resolve_token() == "from-env"
    assert jobs.resolve_token("explicit") == "explicit"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.resolve_token() is None


def test_unreachable_address_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}"):
        jobs.list_jobs(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5


def test_a_server_that_is_not_a_ray_dashboard_is_named() -> None:
    """Another web server on that port (or a proxy's page) answered 404 with an empty body: "HTTP 404: "."""
    import http.server

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(ClusterError, match=rf"{address}/api/version answered HTTP 404: is {address} a Ray "
                                               r"dashboard \(default port 8265\)\?"):
            jobs.list_jobs(address)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: the case that hangs a client without timeouts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def test_silent_address_times_out(silent_server: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"127.0.0.1:{silent_server}"):
        jobs.JobsClient(f"http://127.0.0.1:{silent_server}", connect_timeout_s=1.0)
    assert time.monotonic() - t0 < 5


def test_training_entrypoint_quotes_overrides() -> None:
    cmd = job_spec.training_entrypoint("configs/a b.yaml", ["train.lr=1e-4", "name=x y"])
    assert cmd == "python -m launch.cli train 'configs/a b.yaml' --address auto train.lr=1e-4 'name=x y'"


def test_training_job_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="nope.yaml"):
        job_spec.submit_training_job("127.0.0.1:1", str(tmp_path / "nope.yaml"), [], str(tmp_path), None, JobResources())


class ScriptedStreams:
    """`open_stream` for stream_with_heartbeat: its nth call opens the nth script, whose chunks come (a number in
    them: a pause of that many seconds), then the stream ends or, if `ends` is False, waits forever, as a connection
    that died silently. Records when each stream opens and closes."""

    def __init__(self, *scripts: tuple[list[str | float], bool]) -> None:
        self.scripts = scripts
        self.opened = 0
        self.events: list[str] = []

    def __call__(self) -> AsyncIterator[str]:
        self.opened += 1
        return self._stream(self.opened - 1, *self.scripts[self.opened - 1])

    async def _stream(self, n: int, chunks: list[str | float], ends: bool) -> AsyncIterator[str]:
        self.events.append(f"open {n}")
        try:
            for chunk in chunks:
                if isinstance(chunk, str):
                    yield chunk
                else:
                    await asyncio.sleep(chunk)
            if not ends:
                await asyncio.Event().wait()
        finally:
            self.events.append(f"close {n}")


RUNNING = jobs.JobInfo("j-1", "RUNNING", "python train.py")


def test_a_silent_stream_whose_cluster_stopped_answering_is_a_cluster_error() -> None:
    """The stream never yields and never closes (a connection gone without a close frame); the heartbeat's status
    check fails: ClusterError naming the address, the job and how long nothing came, not an endless wait."""
    checks: list[float] = []

    def unreachable() -> jobs.JobInfo:
        checks.append(time.monotonic())
        raise ClusterError("job j-1: lost the Ray dashboard at http://head:8265 (ConnectionError)")

    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"job j-1 on http://head:8265: nothing came for 0\.[2-9] s .*ConnectionError"):
        asyncio.run(log_follow.stream_with_heartbeat(ScriptedStreams(([], False)), print, unreachable, 0.25,
                                               address="http://head:8265", job_id="j-1", stored_log=lambda: ""))
    assert len(checks) == 1 and 0.25 <= checks[0] - t0 < 2


def test_a_silent_stream_whose_job_was_deleted_says_the_job_is_gone() -> None:
    """The heartbeat's check finds no such job (deleted from the cluster): JobNotFoundError saying so, not the
    unreachable cluster's "the job may still be running"."""
    def deleted() -> jobs.JobInfo:
        raise JobNotFoundError("job j-1: no such job on the cluster at http://head:8265")

    with pytest.raises(JobNotFoundError, match=r"job j-1 on http://head:8265: nothing came for .* no longer exists "
                                               "on the cluster") as caught:
        asyncio.run(log_follow.stream_with_heartbeat(ScriptedStreams(([], False)), print, deleted, 0.05,
                                               address="http://head:8265", job_id="j-1", stored_log=lambda: ""))
    assert "may still be running" not in str(caught.value)


def test_a_silent_stream_is_reopened_and_its_replay_skips_what_was_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """Each stream dies silently while the job runs; after two heartbeats a new one is opened, which replays the log
    from its start in chunks cut elsewhere: what was printed is dropped, the rest printed once. A replay that stalls
    short of it is not a shorter log (the stored one is longer): reopened again, no note. Each stream is closed
    before the next opens."""
    streams = ScriptedStreams((["ab", "cde"], False),  # 5 printed, then silence
                              (["abc"], False),  # a replay that stalls
                              (["a", "bcd", "efg", "h"], False),  # 5 dropped across 3 chunks, "fgh" printed
                              (["abcdefghi", "j"], True))  # 8 dropped, "ij" printed, the job ends
    written: list[str] = []
    cursor = log_follow.LogCursor()
    result = asyncio.run(log_follow.stream_with_heartbeat(streams, written.append, lambda: RUNNING, 0.05,
                                                    address="http://head:8265", job_id="j-1",
                                                    stored_log=lambda: "abcdefgh", cursor=cursor))
    assert result is None
    assert written == ["ab", "cde", "fg", "h", "i", "j"] and cursor.offset == 10
    assert streams.events == [f"{what} {n}" for n in range(4) for what in ("open", "close")]
    assert capsys.readouterr().err == ""


def test_a_replay_shorter_than_what_was_printed_is_noted_and_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """The log was cut down while the connection was dead: the replay stops short of the 10 characters printed and
    the stored log is shorter too. One line on stderr says so; the new log is printed from its start, and the next
    replay skips only that."""
    streams = ScriptedStreams((["0123456789"], False), (["xy", "z"], False), (["xyzne", "w"], True))
    written: list[str] = []
    result = asyncio.run(log_follow.stream_with_heartbeat(streams, written.append, lambda: RUNNING, 0.05,
                                                    address="http://head:8265", job_id="j-1",
                                                    stored_log=lambda: "xyz"))
    assert result is None
    assert written == ["0123456789", "xyz", "ne", "w"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job j-1 is now shorter than the 10 characters already printed" in err


def test_a_stream_slow_to_start_gets_more_time_after_each_reopening_that_brought_nothing() -> None:
    """Ray's head waits a second before a new stream's first word, longer than two short heartbeats: a reopened
    stream that brought nothing gets twice the heartbeats, so a slow head delays the follow but cannot starve it."""
    streams = ScriptedStreams(([5.0, "never"], False), ([0.3, "ab"], True))  # silent for 2 checks; silent for 3
    written: list[str] = []
    asyncio.run(log_follow.stream_with_heartbeat(streams, written.append, lambda: RUNNING, 0.1,
                                           address="http://head:8265", job_id="j-1", stored_log=lambda: ""))
    assert written == ["ab"] and streams.opened == 2


def test_a_quiet_jobs_log_is_replayed_ever_more_rarely() -> None:
    """Each reopening makes Ray send the whole log again: while nothing new comes, the wait before the next one
    doubles (2, 2, 4, 8, 16, 16 heartbeats), where every replay used to count as news and reset it to 2."""
    streams = ScriptedStreams(*[(["hello\n"], False)] * 40)
    checks = iter(range(10**6))

    def status() -> jobs.JobInfo:
        return RUNNING if next(checks) < 40 else jobs.JobInfo("j-1", "SUCCEEDED", "python train.py")

    written: list[str] = []
    done = asyncio.run(log_follow.stream_with_heartbeat(streams, written.append, status, 0.02,
                                                  address="http://head:8265", job_id="j-1", stored_log=lambda: ""))
    assert done.status == "SUCCEEDED" and written == ["hello\n"]
    assert streams.opened == 6, streams.events  # reopened at checks 2, 4, 8, 16, 32 (then 48, after the end)


def test_a_pending_jobs_stream_is_not_reopened() -> None:
    """A pending job has no driver and no log yet; its stream waits for one, however many heartbeats pass."""
    streams = ScriptedStreams(([0.6, "ab"], True))
    written: list[str] = []
    pending = jobs.JobInfo("j-1", "PENDING", "python train.py")
    asyncio.run(log_follow.stream_with_heartbeat(streams, written.append, lambda: pending, 0.05,
                                           address="http://head:8265", job_id="j-1", stored_log=lambda: ""))
    assert written == ["ab"] and streams.opened == 1


def test_logs_heartbeat_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import build_parser

    assert build_parser().parse_args(["logs", "j-1", "--follow"]).heartbeat == jobs.HEARTBEAT_S
    assert build_parser().parse_args(["logs", "j-1", "--follow", "--heartbeat", "2.5"]).heartbeat == 2.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["logs", "j-1", "--follow", "--heartbeat", "0"])
    assert "argument --heartbeat" in capsys.readouterr().err


# ---------------------------------------------------------------- against a real cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with start_local_cluster(num_cpus=2) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: LocalRayCluster) -> jobs.JobsClient:
    return jobs.JobsClient(cluster.address, token=cluster.token)


@pytest.mark.slow
def test_short_job_logs_follow_and_succeed(cluster: LocalRayCluster, client: jobs.JobsClient) -> None:
    code = "import time\nfor i in range(4):\n    print('line', i, flush=True)\n    time.sleep(0.3)"
    job_id = jobs.submit_entrypoint(cluster.address, py(code), token=cluster.token,
                                    resources=JobResources(num_cpus=1))
    chunks: list[str] = []
    final = client.follow_logs(job_id, write=chunks.append)
    assert final.status == "SUCCEEDED" and final.terminal and final.exit_code == 0
    out = "".join(chunks)
    assert [f"line {i}" in out for i in range(4)] == [True] * 4
    assert out.index("line 0") < out.index("line 3")
    assert "line 3" in jobs.job_logs(cluster.address, job_id, token=cluster.token)
    assert JobResources.from_dict(json.loads(final.metadata["dgm.resources"])).num_cpus == 1


@pytest.mark.slow
def test_stop_long_job_and_list_both(cluster: LocalRayCluster, client: jobs.JobsClient) -> None:
    job_id = client.submit(py("import time; print('started', flush=True); time.sleep(120)"), job_id="long-1")
    deadline = time.monotonic() + 30
    while client.info(job_id).status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.info(job_id).status == "RUNNING"
    stopped = jobs.stop_job(cluster.address, job_id, token=cluster.token)
    assert stopped.status == "STOPPED"
    listed = {j.job_id: j.status for j in jobs.list_jobs(cluster.address, token=cluster.token)}
    assert listed["long-1"] == "STOPPED"
    assert "SUCCEEDED" in listed.values()
    with pytest.raises(ClusterError, match="long-1"):
        client.submit("echo again", job_id="long-1")  # ids are unique per cluster


@pytest.mark.slow
def test_unknown_job_id(cluster: LocalRayCluster, client: jobs.JobsClient) -> None:
    for call in (client.info, client.logs, client.stop, client.follow_logs):
        with pytest.raises(JobNotFoundError, match="no-such-job"):
            call("no-such-job")


@pytest.mark.slow
def test_impossible_resources_refused_at_submission(cluster: LocalRayCluster, client: jobs.JobsClient) -> None:
    before = len(client.jobs())
    cases = [
        (JobResources(num_cpus=64), "64 CPU but the largest node has 2 CPU"),
        (JobResources(num_gpus=1), "no node has any GPU"),
        (JobResources(memory=2**50), "memory but the largest node has"),
        (JobResources(custom={"TPU": 1}), "no node has any TPU"),
    ]
    for resources, message in cases:
        with pytest.raises(InfeasibleJobError, match=message):
            jobs.submit_entrypoint(cluster.address, "echo never", resources=resources, token=cluster.token)
    assert len(client.jobs()) == before
    # a GPU node type that the autoscaler can add makes the same request feasible
    client.check_feasible(JobResources(num_cpus=8, num_gpus=1), node_shapes=[{"CPU": 8, "GPU": 1}])
    free = client.cluster_resources()
    assert free.total["CPU"] == 2 and 0 <= free.available["CPU"] <= 2 and len(free.nodes) == 1


@pytest.mark.slow
def test_submit_cli_weighs_the_cluster_files_node_types(cluster: LocalRayCluster, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.cli import main

    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)
    argv = ["submit", "configs/demo.yaml", "--address", cluster.address, "--gpus", "64"]
    assert main(argv) == 2  # the demo's data lives under runs/, which the upload leaves out
    assert "data.train=runs/demo/data/train: a local path the job will not find" in capsys.readouterr().err
    assert main([*argv, "trainer.stpes=5"]) == 2
    assert "trainer.stpes: unknown key" in capsys.readouterr().err  # checked here, not after the upload
    argv += ["data.train=s3://data/train", "data.eval=s3://data/eval", "checkpoint_root=s3://data/ckpt"]
    assert main(argv) == 2
    assert "no node has any GPU" in capsys.readouterr().err  # the live node alone
    assert main([*argv, "--cluster-file", "launch/clusters/aws.yaml"]) == 2
    assert "it asks for 64 GPU but the largest node has 8 GPU" in capsys.readouterr().err  # p4d.24xlarge counted


@pytest.mark.slow
def test_missing_or_wrong_token(cluster: LocalRayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ClusterError, match="needs an auth token.*auth_token"):
        jobs.list_jobs(cluster.address)
    with pytest.raises(ClusterError, match="rejected the auth token"):
        jobs.list_jobs(cluster.address, token="wrong")
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)  # the documented way for the CLI
    assert isinstance(jobs.list_jobs(cluster.address), list)


def _fake_project(root: Path) -> Path:
    """A project whose `launch.cli train` reports what the job sees: argv, its config, the shipped folders."""
    (root / "launch").mkdir(parents=True)
    (root / "launch" / "__init__.py").write_text("")
    (root / "launch" / "cli.py").write_text(
        "import os, pathlib, sys\n"
        "print('ARGV', sys.argv[1:])\n"
        "print('CONFIG', pathlib.Path(sys.argv[2]).read_text().strip())\n"
        "print('SHIPPED', sorted(p for p in os.listdir('.') if not p.startswith('.dgm_submitted')))\n")
    (root / "configs").mkdir()
    (root / "configs" / "in.yaml").write_text("model: inside\n")
    for junk in (".venv/lib", "runs/r1", ".cache/x", ".git/objects"):
        (root / junk).mkdir(parents=True)
        (root / junk / "big.bin").write_bytes(b"0" * 1000)
    return root


@pytest.mark.slow
def test_training_job_ships_project_and_config(cluster: LocalRayCluster, client: jobs.JobsClient,
                                                tmp_path: Path) -> None:
    project = _fake_project(tmp_path / "proj")
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("model: outside\n")
    ids = {
        "inside": job_spec.submit_training_job(cluster.address, str(project / "configs" / "in.yaml"), ["steps=3"],
                                           str(project), None, JobResources(num_cpus=0.5), token=cluster.token),
        "outside": job_spec.submit_training_job(cluster.address, str(outside), ["name=a b"], str(project),
                                            "train-outside", JobResources(), token=cluster.token),
    }
    assert ids["outside"] == "train-outside" and ids["inside"].startswith("dgm-")
    for where, job_id in ids.items():
        info = client.wait(job_id, timeout_s=60)
        logs = client.logs(job_id)
        assert info.status == "SUCCEEDED", logs
        assert f"CONFIG model: {where}" in logs
        assert "SHIPPED ['configs', 'launch']" in logs  # .venv, runs, .cache, .git stay home
    assert f"'--address', 'auto', 'steps=3', 'run_dir=.dgm_jobs/{ids['inside']}/runs/experiment'" \
        in client.logs(ids["inside"])
    assert "'name=a b', 'run_dir=.dgm_jobs/train-outside/runs/a b'" in client.logs(ids["outside"])


def test_each_job_trains_in_its_own_run_dir(tmp_path: Path) -> None:
    """Ray unpacks every job of the same code into one folder, so a relative run_dir would be shared: a second job
    of the config found the first one's run.json (refused with another checkpoint_root, resumed its checkpoints
    without one) and queued variants wrote over each other's metrics."""
    from launch.config import load_config

    project = tmp_path / "proj"
    (project / "configs").mkdir(parents=True)
    config = project / "configs" / "demo.yaml"
    config.write_text("name: demo\ncheckpoint_root: s3://b/ck\n")
    first = job_spec.training_job_spec(str(config), ["checkpoint_root=s3://b/ckA"], str(project), "job-a")
    second = job_spec.training_job_spec(str(config), [], str(project), "job-b")
    assert first.entrypoint.endswith("checkpoint_root=s3://b/ckA run_dir=.dgm_jobs/job-a/runs/demo")
    assert second.entrypoint.endswith("--address auto run_dir=.dgm_jobs/job-b/runs/demo")
    config.write_text("name: demo\nrun_dir: out/r1\n")
    named = job_spec.training_job_spec(str(config), ["name=other"], str(project), "job-c")
    assert named.entrypoint.endswith("name=other run_dir=.dgm_jobs/job-c/out/r1")
    named = project / "configs" / "named.yaml"
    named.write_text('name: "ablation: lr=3e-4 #2"\n')
    odd = job_spec.training_job_spec(str(named), [], str(project), "j-e")
    assert odd.entrypoint.endswith("""'run_dir=".dgm_jobs/j-e/runs/ablation: lr=3e-4 #2"'""")  # YAML would cut it
    cfg, _ = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
                         [shlex.split(odd.entrypoint)[-1]])
    assert cfg.run_dir == ".dgm_jobs/j-e/runs/ablation: lr=3e-4 #2"
    shared = job_spec.training_job_spec(str(config), [f"run_dir={tmp_path}/nfs/r1"], str(project), "job-d")
    assert "run_dir=.dgm_jobs" not in shared.entrypoint  # an absolute run_dir may be a filesystem every node mounts
    # the appended override is the one the job's `dgm train` applies
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg, _ = load_config(str(demo), ["run_dir=runs/x", "run_dir=.dgm_jobs/job-a/runs/demo"])
    assert cfg.run_dir == ".dgm_jobs/job-a/runs/demo"


def test_an_inline_config_is_measured_as_ray_passes_it(tmp_path: Path) -> None:
    """Ray puts the runtime env JSON-escaped on a worker's command line: 40,000 Cyrillic letters are 80 KB of UTF-8
    but 240 KB escaped, past Linux's 128 KiB per argument (the job stayed PENDING without an error)."""
    project, outside = tmp_path / "proj", tmp_path / "cfg.yaml"
    project.mkdir()
    outside.write_text("# " + "я" * 40_000 + "\nname: x\n")
    with pytest.raises(ClusterError, match="larger than 96 KiB"):
        job_spec.training_job_spec(str(outside), [], str(project), "job-1")
    outside.write_text("# " + "a" * 90_000 + "\nname: x\n")
    assert job_spec.training_job_spec(str(outside), [], str(project), "job-1").runtime_env["env_vars"]


def test_job_ids_and_configs_that_would_not_reach_the_cluster(tmp_path: Path) -> None:
    """A job id with '/' or spaces could never be queried or stopped; a config under an excluded folder (runs/)
    would not be in the shipped project: it travels inline instead."""
    for bad in ("team/a", "a b", "", "-x"):
        with pytest.raises(ValueError, match="job id"):
            jobs.check_job_id(bad)
    assert jobs.check_job_id("gan-1.v2_b") == "gan-1.v2_b"
    project = tmp_path / "proj"
    (project / "runs" / "exp").mkdir(parents=True)
    (project / "configs").mkdir()
    (project / "runs" / "exp" / "cfg.yaml").write_text("name: x\n")
    (project / "configs" / "cfg.yaml").write_text("name: y\n")
    (project / "exp" / "out").mkdir(parents=True)
    (project / "exp" / "out" / "cfg.yaml").write_text("name: z\n")
    (project / ".gitignore").write_text("out/\n")  # Ray leaves out what .gitignore names, at any depth
    inline = job_spec.training_job_spec(str(project / "runs" / "exp" / "cfg.yaml"), [], str(project), "job-1")
    assert inline.runtime_env["env_vars"]["DGM_SUBMITTED_CONFIG"] == "name: x\n"
    assert "train .dgm_submitted/job-1.yaml" in inline.entrypoint
    ignored = job_spec.training_job_spec(str(project / "exp" / "out" / "cfg.yaml"), [], str(project), "job-3")
    assert ignored.runtime_env["env_vars"]["DGM_SUBMITTED_CONFIG"] == "name: z\n"
    (project / "configs" / "local").mkdir()
    (project / "configs" / "local" / "mine.yaml").write_text("name: w\n")
    (project / "configs" / ".gitignore").write_text("local/\n")  # a nested ignore file: Ray honours it too
    nested = job_spec.training_job_spec(str(project / "configs" / "local" / "mine.yaml"), [], str(project), "job-4")
    assert nested.runtime_env["env_vars"]["DGM_SUBMITTED_CONFIG"] == "name: w\n"
    (project / "configs" / "team" / "alice").mkdir(parents=True)  # an ignore file two levels down
    (project / "configs" / "team" / "alice" / ".rayignore").write_text("scratch.yaml\n")
    (project / "configs" / "team" / "alice" / "run.yaml").write_text("name: a\n")
    deep = job_spec.training_job_spec(str(project / "configs" / "team" / "alice" / "run.yaml"), [], str(project), "j5")
    assert deep.entrypoint.startswith("python -m launch.cli train configs/team/alice/run.yaml")
    shipped = job_spec.training_job_spec(str(project / "configs" / "cfg.yaml"), [], str(project), "job-2")
    assert "DGM_SUBMITTED_CONFIG" not in shipped.runtime_env.get("env_vars", {})
    assert shipped.entrypoint.startswith("python -m launch.cli train configs/cfg.yaml")
    with pytest.raises(ValueError, match="job id 'a/b'"):
        job_spec.training_job_spec(str(project / "configs" / "cfg.yaml"), [], str(project), "a/b")


def test_a_jobs_own_env_vars_do_not_clash_with_the_drivers_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dgm submit` with DGM_S3_ENDPOINT_URL set (a MinIO endpoint) puts the variable in the job's runtime env and
    in the driver's environment; naming it again in ray.init's runtime env made Ray refuse the merge."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from trainer.ray_env import driver_runtime_env, worker_env

    job_env = {"env_vars": {"DGM_S3_ENDPOINT_URL": "http://minio:9000", "DS_ACCELERATOR": "cpu"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    monkeypatch.setenv("DGM_S3_ENDPOINT_URL", "http://minio:9000")
    assert _merge_runtime_env(job_env, {"env_vars": worker_env()}) is None  # what ray.init was given before
    merged = _merge_runtime_env(job_env, driver_runtime_env())
    assert merged is not None and merged["env_vars"]["DGM_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "TORCH_EXTENSIONS_DIR" in merged["env_vars"]  # what the job does not set still reaches the workers


# ---------------------------------------------------------------- a log stream that dies silently


class SilentDropProxy:
    """A TCP relay to the dashboard whose open connections can be cut silently: they stay open but carry nothing
    more either way, as when a NAT forgets an idle flow or a head node vanishes without closing its sockets.
    New connections still pass (the NAT case) until `refuse()` (the cluster is gone)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self._target = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._links: list[dict] = []
        self._lock = threading.Lock()
        self.requests_after_cut: list[str] = []  # first request line of each connection opened after cut()
        self.tails_left_open: list[int] = []  # for each log stream opened: how many earlier ones the client kept
        self._was_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._server.accept()
                far = socket.create_connection(self._target, timeout=5)
            except OSError:
                return
            far.settimeout(None)
            link = {"socks": (near, far), "cut": False, "late": self._was_cut, "tail": False, "closed": False}
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, near, far, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, far, near, False), daemon=True).start()

    def _pump(self, link: dict, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        first = True
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = None
            if outbound and not data:
                link["closed"] = True  # by the client
            if data is None:
                return
            if outbound and first and data:
                request = data.split(b"\r\n", 1)[0].decode(errors="replace")
                if link["late"]:
                    self.requests_after_cut.append(request)
                if "/logs/tail " in request:
                    self._count_tails_left_open(link)
            first = False
            if link["cut"]:
                if not data:
                    return  # the far end closed: the near end never hears of it
                continue
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def _count_tails_left_open(self, link: dict) -> None:
        """A new log stream: the earlier ones should be closed by now (given a moment for their FINs to land)."""
        with self._lock:
            link["tail"] = True
            earlier = [other for other in self._links if other["tail"] and other is not link]
        deadline = time.monotonic() + 2.0
        while any(not other["closed"] for other in earlier) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.tails_left_open.append(sum(not other["closed"] for other in earlier))

    def cut(self) -> None:
        """Every connection open now goes silent; later ones work."""
        with self._lock:
            self._was_cut = True
            for link in self._links:
                link["cut"] = True

    def refuse(self) -> None:
        """New connections are refused from now on."""
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a bare close() would not)
        self._server.close()

    def close(self) -> None:
        self.refuse()
        with self._lock:
            for link in self._links:
                for sock in link["socks"]:
                    sock.close()


def _follow_in_thread(address: str, job_id: str, token: str, heartbeat_s: float,
                      on_chunk: Callable[[str], None], reconnect_after: int = jobs.RECONNECT_AFTER,
                      ) -> tuple[threading.Thread, dict]:
    """follow_job_logs in a thread, so that a follow that waits forever fails the test instead of hanging it."""
    out: dict = {"chunks": []}

    def write(chunk: str) -> None:
        out["chunks"].append(chunk)
        on_chunk("".join(out["chunks"]))

    def run() -> None:
        try:
            out["info"] = jobs.follow_job_logs(address, job_id, write=write, token=token, heartbeat_s=heartbeat_s,
                                                 reconnect_after=reconnect_after)
        except Exception as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.slow
def test_follow_outlives_a_log_connection_that_dies_silently(cluster: LocalRayCluster,
                                                               client: jobs.JobsClient) -> None:
    """The job prints, stays quiet for 4 s, prints again and ends; right after its first line the log connection
    goes silent for good. With reopening put off (reconnect_after), the heartbeat finds the job running (keeps
    waiting), then ended: the follow ends with the job, and what the dead stream missed comes from the stored log,
    nothing printed twice."""
    # printed as "mark one" / "mark two": the log also echoes the entrypoint, where they are spelled apart
    job_id = client.submit(py("import time\nprint('mark', 'one', flush=True)\ntime.sleep(4)\n"
                              "print('mark', 'two', flush=True)"))
    proxy = SilentDropProxy(cluster.address)

    def cut_after_first_line(text: str) -> None:
        if "mark one" in text and not proxy._was_cut:
            proxy.cut()

    t0 = time.monotonic()
    thread, out = _follow_in_thread(proxy.address, job_id, cluster.token, 0.5, cut_after_first_line,
                                    reconnect_after=1000)
    try:
        thread.join(timeout=40)
        assert not thread.is_alive(), "follow_logs is still waiting on the dead connection"
    finally:
        proxy.close()
    assert "error" not in out, out.get("error")
    assert out["info"].status == "SUCCEEDED" and time.monotonic() - t0 >= 4
    text = "".join(out["chunks"])
    assert text.count("mark one") == 1 and text.count("mark two") == 1
    assert text.index("mark one") < text.index("mark two")
    status_checks = [r for r in proxy.requests_after_cut if r.startswith(f"GET /api/jobs/{job_id} ")]
    assert len(status_checks) >= 3, proxy.requests_after_cut  # running (>= 1), ended, then wait()'s own


@pytest.mark.slow
def test_follow_reopens_a_dead_log_connection_while_the_job_runs(cluster: LocalRayCluster, client: jobs.JobsClient,
                                                                 tmp_path: Path) -> None:
    """The log connection goes silent for good after the job's first line, and the next one after its second; the
    job goes on printing and waits, after each line, for a file the test creates only once that line has reached
    the follow (giving up, FAILED, after 30 s): it succeeds only if every line made it out while it ran, each
    through a new stream opened after two silent heartbeats. The follow's output is the stored log, each character
    once, and each stream is closed before the next opens."""
    go = [tmp_path / f"go{i}" for i in range(3)]
    code = ("import os, time\n"
            "def wait_for(path):\n"
            "    deadline = time.monotonic() + 30\n"
            "    while not os.path.exists(path):\n"
            "        if time.monotonic() > deadline:\n"
            "            raise SystemExit(f'gave up waiting for {path}')\n"
            "        time.sleep(0.1)\n"
            "print('mark', 'one', flush=True)\n"
            f"wait_for({str(go[0])!r})\n"
            "print('late', 'one', flush=True)\n"
            f"wait_for({str(go[1])!r})\n"
            "print('late', 'two', flush=True)\n"
            f"wait_for({str(go[2])!r})\n"
            "print('mark', 'two', flush=True)\n")
    job_id = client.submit(py(code))
    proxy = SilentDropProxy(cluster.address)
    steps = [("mark one", True), ("late one", True), ("late two", False)]  # (line seen, cut the connection first)

    def on_chunk(text: str) -> None:
        for i, (line, cut) in enumerate(steps):
            if line in text and not go[i].exists():
                if cut:
                    proxy.cut()
                go[i].touch()

    thread, out = _follow_in_thread(proxy.address, job_id, cluster.token, 0.5, on_chunk)
    try:
        thread.join(timeout=60)
        assert not thread.is_alive(), "follow_logs is still waiting on a dead connection"
    finally:
        proxy.close()
    assert "error" not in out, out.get("error")
    text = "".join(out["chunks"])
    assert out["info"].status == "SUCCEEDED", (out["info"], text)
    for line in ("mark one", "late one", "late two", "mark two"):
        assert text.count(line) == 1, (line, text)
    assert text == client.logs(job_id)
    reopened = [r for r in proxy.requests_after_cut if r.startswith(f"GET /api/jobs/{job_id}/logs/tail ")]
    assert len(reopened) >= 2, proxy.requests_after_cut
    assert len(proxy.tails_left_open) > len(reopened) and not any(proxy.tails_left_open), proxy.tails_left_open


@pytest.mark.slow
def test_follow_gives_up_with_a_clear_error_when_the_cluster_is_gone(cluster: LocalRayCluster,
                                                                       client: jobs.JobsClient) -> None:
    job_id = client.submit(py("import time\nprint('mark', 'one', flush=True)\ntime.sleep(30)"))
    proxy = SilentDropProxy(cluster.address)

    def vanish_after_first_line(text: str) -> None:
        if "mark one" in text and not proxy._was_cut:
            proxy.cut()
            proxy.refuse()

    thread, out = _follow_in_thread(proxy.address, job_id, cluster.token, 0.5, vanish_after_first_line)
    try:
        thread.join(timeout=30)
        assert not thread.is_alive(), "follow_logs is still waiting on the dead connection"
    finally:
        proxy.close()
        client.stop(job_id)
    error = out.get("error")
    assert isinstance(error, ClusterError), out
    assert f"job {job_id} on {proxy.address}: nothing came for" in str(error)
    assert "ConnectionError" in str(error) and f"dgm status {job_id}" in str(error)


# ---------------------------------------------------------------- AWS secrets and the cluster's job table

AWS_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "test-secret-key",
               "AWS_SESSION_TOKEN": "test-session-token"}
JOINING_DRIVER = """
import json, sys
import ray
from trainer.ray_env import ensure_ray, worker_env
ensure_ray(sys.argv[1])
print("RESULT", json.dumps({"job": ray.get_runtime_context().get_job_id(), "worker_env": sorted(worker_env())}))
ray.shutdown()
"""


def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*AWS_SECRETS, "DGM_FORWARD_AWS_CREDENTIALS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in AWS_SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DGM_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_PROFILE", "laptop-sso")  # a profile of this machine's ~/.aws, not of the nodes'


@pytest.mark.slow
def test_a_driver_joining_the_cluster_keeps_aws_secrets_out_of_its_job_table(
        cluster: LocalRayCluster, client: jobs.JobsClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dgm train --address`: the runtime env of ray.init is stored in the cluster's job table, which the job SDK
    (not only the dashboard) returns in plain text; the secrets go there only with DGM_FORWARD_AWS_CREDENTIALS=1."""
    _aws_env(monkeypatch)
    gcs = cluster.gcs
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
    for opt_in in (False, True):
        if opt_in:
            env["DGM_FORWARD_AWS_CREDENTIALS"] = "1"
        run = subprocess.run([sys.executable, "-c", JOINING_DRIVER, gcs], env=env, capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
        record = client._client.get_job_info(result["job"]).runtime_env["env_vars"]
        assert record["DGM_S3_ENDPOINT_URL"] == "http://minio:9000"
        note = "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN are set here but not sent to the Ray " \
               f"cluster at {gcs}"
        if opt_in:
            assert {k: record.get(k) for k in AWS_SECRETS} == AWS_SECRETS
            assert note not in run.stderr and record["AWS_PROFILE"] == "laptop-sso"
        else:
            assert not set(AWS_SECRETS) & set(record), record
            assert "AWS_PROFILE" not in record and "AWS_PROFILE is not sent to the Ray cluster at" in run.stderr
            assert not set(AWS_SECRETS) & set(result["worker_env"])  # nor in Ray Train's train_loop_config
            assert note in run.stderr and "DGM_FORWARD_AWS_CREDENTIALS=1" in run.stderr


@pytest.mark.slow
def test_submit_keeps_aws_secrets_out_of_the_job_unless_asked(
        cluster: LocalRayCluster, client: jobs.JobsClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _aws_env(monkeypatch)
    project = _fake_project(tmp_path / "proj")
    config = str(project / "configs" / "in.yaml")
    plain = job_spec.submit_training_job(cluster.address, config, [], str(project), "aws-plain", JobResources(),
                                     token=cluster.token)
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN are set here but not sent to job " \
           "aws-plain" in capsys.readouterr().err
    monkeypatch.setenv("DGM_FORWARD_AWS_CREDENTIALS", "1")
    asked = job_spec.submit_training_job(cluster.address, config, [], str(project), "aws-asked", JobResources(),
                                     token=cluster.token)
    assert "not sent" not in capsys.readouterr().err
    records = {job_id: client._client.get_job_info(job_id).runtime_env.get("env_vars") or {}
               for job_id in (plain, asked)}
    assert not set(AWS_SECRETS) & set(records[plain]) and "AWS_PROFILE" not in records[plain], records[plain]
    for record in records.values():  # the store and region travel either way, as with `dgm train --address`
        assert record["DGM_S3_ENDPOINT_URL"] == "http://minio:9000" and record["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert {k: records[asked].get(k) for k in {**AWS_SECRETS, "AWS_PROFILE": ""}} == {**AWS_SECRETS,
                                                                                     "AWS_PROFILE": "laptop-sso"}
    for job_id in (plain, asked):
        assert client.wait(job_id, timeout_s=60).status == "SUCCEEDED", client.logs(job_id)
