"""trainer/ray_env.py: what a Ray driver hands its workers, which on a cluster it joined is also what Ray keeps in
its job table for anyone with access to read (the end-to-end checks against a real head are in test_jobs.py)."""
from __future__ import annotations

import pytest

from trainer import ray_env
from trainer.ray_env import FORWARD_SECRETS_VAR, FORWARDED_ENV, driver_runtime_env, forwarded_env

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "test-secret-key",
           "AWS_SESSION_TOKEN": "test-session-token"}
PLAIN = {"DGM_S3_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
PROFILE = {"AWS_PROFILE": "team"}  # this machine's ~/.aws profile: a shared cluster's nodes may not have it


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver with AWS keys in its environment (as after `aws configure export-credentials`), outside any job."""
    for key in (*FORWARDED_ENV, FORWARD_SECRETS_VAR, "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**SECRETS, **PLAIN, **PROFILE}.items():
        monkeypatch.setenv(key, value)


def test_a_driver_joining_a_cluster_keeps_aws_secrets_out_of_its_runtime_env(aws_env: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    env = driver_runtime_env(shared=True)["env_vars"]
    assert not set(SECRETS) & set(env) and "AWS_PROFILE" not in env
    assert {key: env.get(key) for key in PLAIN} == PLAIN  # where the data is still goes
    assert sorted(forwarded_env(shared=True)[1]) == sorted([*SECRETS, *PROFILE])  # named, for the line that says so
    note = ray_env.withheld_note([*SECRETS, *PROFILE], "the Ray cluster at 10.0.0.1:6379")
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN are set here but not sent" in note
    assert "AWS_PROFILE is not sent to the Ray cluster at 10.0.0.1:6379 either: it names a profile of this " in note
    assert ray_env.withheld_note(list(PROFILE), "job j").startswith(
        "[ray] AWS_PROFILE is set here but not sent to job j: it names a profile of this machine's AWS config")
    assert "DGM_FORWARD_AWS_CREDENTIALS=1" in note and "\n" not in note
    assert "the store at http://minio:9000 needs credentials set on the nodes" in note  # no instance profile there
    for key in ("DGM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    assert "launch/clusters/aws.yaml" in ray_env.withheld_note(list(SECRETS), "job j")  # AWS's own S3


def test_the_opt_in_sends_aws_secrets_to_a_joined_cluster(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORWARD_SECRETS_VAR, "1")
    env = driver_runtime_env(shared=True)["env_vars"]
    assert {key: env.get(key) for key in {**SECRETS, **PLAIN, **PROFILE}} == {**SECRETS, **PLAIN, **PROFILE}
    assert forwarded_env(shared=True)[1] == []  # nothing held back, nothing to say
    monkeypatch.setenv(FORWARD_SECRETS_VAR, "0")
    assert not set(SECRETS) & set(driver_runtime_env(shared=True)["env_vars"])


def test_the_embedded_cluster_still_gets_every_variable(aws_env: None) -> None:
    """No address: the cluster lives in this process, on this machine, for this user; nothing is published."""
    env = driver_runtime_env(shared=False)["env_vars"]
    assert {key: env.get(key) for key in {**SECRETS, **PLAIN, **PROFILE}} == {**SECRETS, **PLAIN, **PROFILE}
    assert forwarded_env(shared=False)[1] == []


def test_an_address_nobody_answers_or_a_dashboard_url_is_named_in_seconds() -> None:
    """ray.init retried a closed host:port for minutes (dgm prepare --address 127.0.0.1:1 hung), and met a dashboard
    URL with advice about RAY_ADDRESS, which the user never set."""
    import socket
    import time

    from trainer.typed_config import ConfigError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    with pytest.raises(ConfigError, match=rf"--address 127.0.0.1:{port}: no Ray cluster answers there"):
        ray_env.check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - began < 10
    with pytest.raises(ConfigError, match=r"that is a Ray dashboard URL .*host:6379, ray://host:10001, or auto"):
        ray_env.check_reachable("http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match=r"--address nowhere: expected host:port"):
        ray_env.check_reachable("nowhere")
    with pytest.raises(ConfigError, match=rf"--address ray://127.0.0.1:{port}: no Ray cluster answers"):
        ray_env.check_reachable(f"ray://127.0.0.1:{port}")
    ray_env.check_reachable("auto")  # resolved by Ray on a cluster node
    ray_env.check_reachable("local")
    with pytest.raises(ConfigError, match=r"--address ray://head: expected host:port"):  # gRPC would try 443
        ray_env.check_reachable("ray://head")
    if socket.has_ipv6:
        with socket.socket(socket.AF_INET6) as six:
            try:
                six.bind(("::1", 0))
            except OSError:  # no IPv6 loopback on this machine
                six = None
            if six is not None:
                six.listen()
                ray_env.check_reachable(f"[::1]:{six.getsockname()[1]}")  # as Ray reads it
                ray_env.check_reachable(f"ray://[::1]:{six.getsockname()[1]}")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        ray_env.check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")  # something answers: Ray takes it on


def test_a_joined_cluster_keeps_its_own_extension_cache_unless_one_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """This checkout's cache path was sent to every node of a joined cluster (another machine, where it may not be
    writable; in a job, a per-submission folder that compiled every op again)."""
    from trainer.ray_env import PROJECT_ROOT, worker_env

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert "TORCH_EXTENSIONS_DIR" not in worker_env(shared=True)
    assert worker_env(shared=False)["TORCH_EXTENSIONS_DIR"].startswith(PROJECT_ROOT)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/shared/ext")
    assert worker_env(shared=True)["TORCH_EXTENSIONS_DIR"] == worker_env(shared=False)["TORCH_EXTENSIONS_DIR"] \
        == "/shared/ext"
