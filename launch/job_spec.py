"""What a training job ships to a cluster: the project folder as its working dir (less what never belongs there),
the `dgm train` command it runs, and its config, carried inline when the upload would leave it behind or when a
queued job must train the config as it was when queued."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.jobs import ClusterError, JobResources, JobsClient, check_job_id, new_job_id

log = logging.getLogger(__name__)

# Folders that never belong in a job's working_dir (Ray also honours the project's .gitignore and .rayignore).
DEFAULT_EXCLUDES = ("/.venv/", "/.git/", "/runs/", "/.cache/", "/build/", "/dist/",
                    "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", ".ipynb_checkpoints/")
INLINE_CONFIG_LIMIT = 96 * 1024  # carried in an environment variable: Linux caps one at 128 KiB


def project_runtime_env(project_dir: str | Path, excludes: Iterable[str] = DEFAULT_EXCLUDES,
                        env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The runtime env that ships the project folder (minus venvs, runs, caches, .git) as the job's cwd."""
    root = Path(project_dir).resolve()
    if not root.is_dir():
        raise ClusterError(f"project dir {root} does not exist")
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(excludes)}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def training_entrypoint(config_in_job: str, overrides: Iterable[str]) -> str:
    """The command the cluster runs: the same `train` as locally, attached to the cluster (`--address auto`)."""
    return " ".join(["python", "-m", "launch.cli", "train", shlex.quote(config_in_job), "--address", "auto",
                     *(shlex.quote(o) for o in overrides)])


@dataclass(frozen=True)
class JobSpec:
    """Everything Ray needs to run a job, JSON-serialisable so the queue can persist it."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def training_job_spec(config_path: str, overrides: Iterable[str], project_dir: str, job_id: str,
                      env_vars: Mapping[str, str] | None = None, snapshot: bool = False) -> JobSpec:
    """The job that runs `dgm train CONFIG --address auto OVERRIDES...` in a copy of the project.

    A config inside the project travels with it; one outside it (or in a folder the upload leaves out, such as
    runs/) is carried in the runtime env and written to
    `.dgm_submitted/<job id>.yaml` in the job's working dir before training starts. ``snapshot`` carries it so
    whenever it fits (a queued job, submitted later, trains the config as it was when queued, not as edited since).
    """
    check_job_id(job_id)
    overrides = list(overrides)
    root = Path(project_dir).resolve()
    config = Path(config_path).resolve()
    if not config.is_file():
        raise ClusterError(f"config {config_path} does not exist")
    env = dict(env_vars or {})
    text = config.read_text()
    # measured as Ray passes it: JSON-escaped on a worker's command line (non-ASCII grows to \uXXXX), where Linux
    # allows 128 KiB per argument; past it the job stays PENDING without an error
    fits_inline = len(json.dumps(text)) <= INLINE_CONFIG_LIMIT
    travels = config.is_relative_to(root) and not excluded_from_upload(root, config)
    if travels and not (snapshot and fits_inline):
        config_in_job = config.relative_to(root).as_posix()
        prelude = ""
        if snapshot:  # too large to carry: the job reads the file as it is when the job is submitted
            print(f"[queue] warning: config {config} is larger than {INLINE_CONFIG_LIMIT // 1024} KiB, so the job "
                  "trains it as it is when the queue submits the job, not as it is now; leave it unchanged "
                  "until then", file=sys.stderr)
    else:
        if not fits_inline:
            raise ClusterError(f"config {config} is larger than {INLINE_CONFIG_LIMIT // 1024} KiB: move it into "
                               f"the project dir {root} so it travels with it")
        config_in_job = f".dgm_submitted/{job_id}.yaml"
        env["DGM_SUBMITTED_CONFIG"] = text
        writer = ("import os,pathlib,sys; p=pathlib.Path(sys.argv[1]); p.parent.mkdir(exist_ok=True); "
                  "p.write_text(os.environ['DGM_SUBMITTED_CONFIG'])")
        prelude = f"python -c {shlex.quote(writer)} {shlex.quote(config_in_job)} && "
    run_dir = job_run_dir(config, overrides, job_id)
    if run_dir:
        overrides = [*overrides, string_override("run_dir", run_dir)]
    return JobSpec(entrypoint=prelude + training_entrypoint(config_in_job, overrides),
                   runtime_env=project_runtime_env(root, env_vars=env), metadata={"dgm.config": str(config)})


def job_run_dir(config: Path, overrides: Iterable[str], job_id: str) -> str | None:
    """The job's own folder for a relative run_dir (None for an absolute one, left as given).

    Ray unpacks every job of the same project code into one folder named by the upload's hash, and a job's config
    travels outside that hash (in its env), so jobs of one config would otherwise share run.json, metrics, sample
    grids and Ray Train's storage: a re-submission with another checkpoint_root was refused, one without it
    resumed the other job's checkpoints, and queued variants wrote over each other."""
    from launch.config import ExperimentConfig, default_run_dir, read_yaml

    raw = read_yaml(str(config), list(overrides))
    run_dir = str(raw.get("run_dir") or default_run_dir(str(raw.get("name") or ExperimentConfig.name)))
    if Path(run_dir).is_absolute():
        return None
    return (Path(".dgm_jobs") / job_id / run_dir).as_posix()


def string_override(key: str, text: str) -> str:
    """``key=text`` that the job's `dgm train` reads back as this very string: overrides are YAML, where a name
    such as "ablation: lr=3e-4" would be a mapping and " #" start a comment, so those go JSON-quoted."""
    from launch.config import set_dotted

    probe: dict[str, Any] = {}
    set_dotted(probe, f"{key}={text}")
    return f"{key}={text}" if probe.get(key) == text else f"{key}={json.dumps(text)}"


def excluded_from_upload(root: Path, path: Path) -> bool:
    """Whether the project upload leaves ``path`` out: Ray's own matching of DEFAULT_EXCLUDES and the
    .gitignore / .rayignore files (Ray honours both, in every folder it walks), applied to the file and each folder
    above it. Erring towards "excluded" is safe: the config then travels inline."""
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    folders = [root, *(parent for parent in reversed(path.parents) if parent.is_relative_to(root) and parent != root)]
    matchers = [(root, _get_excludes(root, list(DEFAULT_EXCLUDES)))]
    for folder in folders:  # an ignore file speaks of what lies below its own folder
        matchers += [(folder, m) for m in get_excludes_from_ignore_files(folder, include_gitignore=True, logger=log)]
    while path != root:
        if any(path.is_relative_to(folder) and path != folder and match(path) for folder, match in matchers):
            return True
        path = path.parent
    return False


def submit_training_job(address: str, config_path: str, overrides: list[str], project_dir: str,
                        job_id: str | None, resources: JobResources, *, token: str | None = None,
                        check_resources: bool = True, node_shapes: Iterable[Mapping[str, float]] = (),
                        env_vars: Mapping[str, str] | None = None) -> str:
    """Ship the project and run `dgm train CONFIG --address auto OVERRIDES...` on the cluster; returns the job id."""
    from trainer.ray_env import S3_ENV, forwarded_env, withheld_note

    job_id = job_id or new_job_id()
    # the S3 endpoint and region travel as with `dgm train --address`; the job's runtime env is stored in the
    # cluster's job table for anyone with access to read, so AWS secrets go there only on request
    # (DGM_FORWARD_AWS_CREDENTIALS=1), with the profile name; the nodes are expected to have credentials of their own
    s3_env, withheld = forwarded_env(shared=True, keys=S3_ENV)
    spec = training_job_spec(config_path, overrides, project_dir, job_id, {**s3_env, **(env_vars or {})})
    if withheld:
        print(withheld_note(withheld, f"job {job_id}"), file=sys.stderr)
    return JobsClient(address, token).submit(
        spec.entrypoint, resources=resources, job_id=job_id, runtime_env=spec.runtime_env, metadata=spec.metadata,
        check_resources=check_resources, node_shapes=node_shapes)
