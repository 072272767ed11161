"""launch/jobs.py: input checks offline, then the Jobs API against a real local Ray head (token auth on)."""
from __future__ import annotations

import json
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch import jobs
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
    for bad in ("ray://head:10001", "auto", "http://bad host:1"):
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
    cmd = jobs.training_entrypoint("configs/a b.yaml", ["train.lr=1e-4", "name=x y"])
    assert cmd == "python -m launch.cli train 'configs/a b.yaml' --address auto train.lr=1e-4 'name=x y'"


def test_training_job_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="nope.yaml"):
        jobs.submit_training_job("127.0.0.1:1", str(tmp_path / "nope.yaml"), [], str(tmp_path), None, JobResources())


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
        "inside": jobs.submit_training_job(cluster.address, str(project / "configs" / "in.yaml"), ["steps=3"],
                                           str(project), None, JobResources(num_cpus=0.5), token=cluster.token),
        "outside": jobs.submit_training_job(cluster.address, str(outside), ["name=a b"], str(project),
                                            "train-outside", JobResources(), token=cluster.token),
    }
    assert ids["outside"] == "train-outside" and ids["inside"].startswith("dgm-")
    for where, job_id in ids.items():
        info = client.wait(job_id, timeout_s=60)
        logs = client.logs(job_id)
        assert info.status == "SUCCEEDED", logs
        assert f"CONFIG model: {where}" in logs
        assert "SHIPPED ['configs', 'launch']" in logs  # .venv, runs, .cache, .git stay home
    assert "'--address', 'auto', 'steps=3'" in client.logs(ids["inside"])
    assert "'name=a b'" in client.logs(ids["outside"])


def test_an_inline_config_is_measured_as_ray_passes_it(tmp_path: Path) -> None:
    """Ray puts the runtime env JSON-escaped on a worker's command line: 40,000 Cyrillic letters are 80 KB of UTF-8
    but 240 KB escaped, past Linux's 128 KiB per argument (the job stayed PENDING without an error)."""
    project, outside = tmp_path / "proj", tmp_path / "cfg.yaml"
    project.mkdir()
    outside.write_text("# " + "я" * 40_000 + "\nname: x\n")
    with pytest.raises(ClusterError, match="larger than 96 KiB"):
        jobs.training_job_spec(str(outside), [], str(project), "job-1")
    outside.write_text("# " + "a" * 90_000 + "\nname: x\n")
    assert jobs.training_job_spec(str(outside), [], str(project), "job-1").runtime_env["env_vars"]


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
    inline = jobs.training_job_spec(str(project / "runs" / "exp" / "cfg.yaml"), [], str(project), "job-1")
    assert inline.runtime_env["env_vars"]["DGM_SUBMITTED_CONFIG"] == "name: x\n"
    assert "train .dgm_submitted/job-1.yaml" in inline.entrypoint
    ignored = jobs.training_job_spec(str(project / "exp" / "out" / "cfg.yaml"), [], str(project), "job-3")
    assert ignored.runtime_env["env_vars"]["DGM_SUBMITTED_CONFIG"] == "name: z\n"
    (project / "configs" / "local").mkdir()
    (project / "configs" / "local" / "mine.yaml").write_text("name: w\n")
    (project / "configs" / ".gitignore").write_text("local/\n")  # a nested ignore file: Ray honours it too
    nested = jobs.training_job_spec(str(project / "configs" / "local" / "mine.yaml"), [], str(project), "job-4")
    assert nested.runtime_env["env_vars"]["DGM_SUBMITTED_CONFIG"] == "name: w\n"
    (project / "configs" / "team" / "alice").mkdir(parents=True)  # an ignore file two levels down
    (project / "configs" / "team" / "alice" / ".rayignore").write_text("scratch.yaml\n")
    (project / "configs" / "team" / "alice" / "run.yaml").write_text("name: a\n")
    deep = jobs.training_job_spec(str(project / "configs" / "team" / "alice" / "run.yaml"), [], str(project), "j5")
    assert deep.entrypoint.startswith("python -m launch.cli train configs/team/alice/run.yaml")
    shipped = jobs.training_job_spec(str(project / "configs" / "cfg.yaml"), [], str(project), "job-2")
    assert "DGM_SUBMITTED_CONFIG" not in shipped.runtime_env.get("env_vars", {})
    assert shipped.entrypoint.startswith("python -m launch.cli train configs/cfg.yaml")
    with pytest.raises(ValueError, match="job id 'a/b'"):
        jobs.training_job_spec(str(project / "configs" / "cfg.yaml"), [], str(project), "a/b")


def test_a_jobs_own_env_vars_do_not_clash_with_the_drivers_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dgm submit --env DGM_S3_ENDPOINT_URL=...` (a MinIO endpoint) puts the variable in the job's runtime env and
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
