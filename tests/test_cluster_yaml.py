"""launch/clusters/*.yaml: valid for Ray's cluster launcher (checked offline), and typos fail with clear messages."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from launch.clusters import (
    CLUSTERS_DIR,
    ClusterConfigError,
    bundled,
    load_cluster_config,
    max_total,
    node_shapes,
)
from launch.jobs import JobResources, infeasibility

YAMLS = sorted(CLUSTERS_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def no_cloud_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must work offline: any boto3 client creation fails the test."""
    import boto3

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cluster validation tried to reach AWS")

    monkeypatch.setattr(boto3.session.Session, "client", refuse)
    monkeypatch.setattr(boto3.session.Session, "resource", refuse)


def test_bundled_files_present() -> None:
    assert {p.stem for p in YAMLS} >= {"aws", "local"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_valid_for_rays_own_validation(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before any cloud call
    validate_config(prepared)
    assert load_cluster_config(path) == prepared


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_project_rules(path: Path) -> None:
    config = load_cluster_config(path)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[commands])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # every node gets the token
    # What a node runs, as Ray's autoscaler picks it: a node type's own worker_setup_commands replace the global
    # list (into which Ray merged setup_commands); they are not added to it.
    setups = [config["head_setup_commands"]] + [
        node.get("worker_setup_commands", config["worker_setup_commands"])
        for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    for commands in setups:
        text = " ".join(commands)
        assert "python3 -m venv ~/dgm-venv" in text and "source ~/dgm-venv/bin/activate" in text, commands
        assert text.index("python3 -m venv") < text.index("torch==2.13.0"), commands
        assert "torch==2.13.0" in text, commands
        assert f"ray[default,train]=={ray.__version__}" in text, commands
    assert config["idle_timeout_minutes"] > 0


def test_aws_node_types() -> None:
    config = load_cluster_config(bundled("aws"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"]["CPU"] == 0
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    cpu = {n: t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")}
    assert {t["node_config"]["InstanceType"][:2] for t in gpu.values()} == {"g5", "p4"}
    assert all(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in cpu.values())
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Name"].startswith("dgm-ray-"), name
        if name != config["head_node_type"]:
            assert t["min_workers"] == 0 and t["max_workers"] > 0, name
    assert sum(t["max_workers"] for t in types.values()) >= config["max_workers"]
    # the shapes let a submission wait for a GPU node instead of being refused; 16 GPUs on one node never fit
    shapes = node_shapes(config)
    assert infeasibility(JobResources(num_cpus=8, num_gpus=8).request(), shapes) is None
    assert "largest node has 8 GPU" in infeasibility(JobResources(num_gpus=16).request(), shapes)
    # a type whose resources Ray would fill in at boot cannot be weighed: named, not silently left out
    types["gpu_a100_x8"]["resources"] = {}
    with pytest.raises(ClusterConfigError, match="node type 'gpu_a100_x8': resources is empty"):
        node_shapes(config)
    assert node_shapes(load_cluster_config(bundled("local"))) == []  # fixed machines: the live cluster tells


def _variant(tmp_path: Path, old: str, new: str, source: str = "aws") -> Path:
    text = bundled(source).read_text()
    assert old in text
    path = tmp_path / f"{source}-typo.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(("old", "new", "message"), [
    ("idle_timeout_minutes: 10", "idle_timeout_minute: 10",
     "unknown key 'idle_timeout_minute' at top level (did you mean 'idle_timeout_minutes'?)"),
    ("    min_workers: 0\n    max_workers: 8", "    min_worker: 0\n    max_workers: 8",
     "unknown key 'min_worker' at available_node_types.cpu_worker (did you mean 'min_workers'?)"),
    ("head_node_type: head", "head_node_type: haed",
     "head_node_type 'haed' is not a node type defined in available_node_types"),
    ("    max_workers: 8", "    max_workers: eight", "at available_node_types.cpu_worker.max_workers: 'eight'"),
    ("    min_workers: 0\n    max_workers: 8", "    min_workers: 9\n    max_workers: 8",
     "'cpu_worker' has min_workers 9 > max_workers 8"),
    ("      InstanceType: m6i.2xlarge", "      InstanceType: m6i.2xlarge\n      aws_secret_access_key: abc",
     "contains AWS credentials"),
    ("max_workers: 12", "max_workers: [", "not valid YAML"),
])
def test_typos_fail_with_clear_messages(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _variant(tmp_path, old, new)
    with pytest.raises(ClusterConfigError) as err:
        load_cluster_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_ray_itself_rejects_the_typos(tmp_path: Path) -> None:
    """The same mistakes fail Ray's own validation too (ours only words them better)."""
    config = prepare_config(yaml.safe_load(_variant(tmp_path, "idle_timeout_minutes: 10",
                                                    "idle_timeout_minute: 10").read_text()))
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(config)
    config = yaml.safe_load(_variant(tmp_path, "head_node_type: head", "head_node_type: haed").read_text())
    with pytest.raises((ValueError, KeyError)):
        validate_config(prepare_config(config))


def test_local_typo_and_missing_file(tmp_path: Path) -> None:
    path = _variant(tmp_path, "worker_ips:", "worker_ip:", source="local")
    with pytest.raises(ClusterConfigError, match="worker_ip"):
        load_cluster_config(path)
    with pytest.raises(ClusterConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "absent.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ClusterConfigError, match=rf"{binary}: not a text file"):
        load_cluster_config(binary)
    with pytest.raises(ClusterConfigError, match="known: aws, local"):
        bundled("gcp")


def test_max_total_counts_the_richest_workers_up_to_the_cluster_cap() -> None:
    config = {"head_node_type": "head", "max_workers": 3,
              "available_node_types": {"head": {"resources": {"CPU": 2}},
                                       "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2},
                                       "cpu": {"resources": {"CPU": 16}, "max_workers": 5}}}
    assert max_total(config) == {"CPU": 2 + 3 * 16, "GPU": 2}  # three workers at most, whichever hold the most
    del config["max_workers"]
    assert max_total(config) == {"CPU": 2 + 2 * 8 + 5 * 16, "GPU": 2}
