"""Starting or joining Ray, and the environment every Ray worker gets: shared by `dgm train` and the batch jobs
under trainer/ (the tokenisation job), so a worker sees the same DeepSpeed accelerator, extension cache and S3
settings whichever command started it."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterable
from typing import Any

from trainer.typed_config import ConfigError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a worker needs to reach S3 the way the driver does (workers may start before a test or user sets them).
S3_ENV = ("DGM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
          "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN")
FORWARDED_ENV = (*S3_ENV, "OMP_NUM_THREADS")
# The secret ones. A runtime env given to a cluster this process did not start lands in Ray's job table, where
# anyone who can reach the dashboard reads it (Ray 2.60 masks env_vars for browsers only; the job SDK, `ray job`
# and the state API return them in plain text), so to such a cluster they are sent only on request.
AWS_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Not secret, but this machine's own: a profile of its ~/.aws, which a shared cluster's nodes may not have (boto3
# fails on a profile it cannot find, where the nodes' own credentials would have worked).
AWS_LOCAL_ENV = ("AWS_PROFILE",)
HELD_BACK_ENV = AWS_SECRET_ENV + AWS_LOCAL_ENV
# Which store and region: what a job submitted to a cluster needs to reach the same S3 as this machine, and which
# no one need hide (a queued job keeps only these: its queue file is never a place for secrets).
S3_PLACE_ENV = tuple(key for key in S3_ENV if key not in HELD_BACK_ENV)
FORWARD_SECRETS_VAR = "DGM_FORWARD_AWS_CREDENTIALS"

# Set by ensure_ray: this process attached to a cluster it did not start (`--address`, or `auto` inside a job),
# so what worker_env returns may end up in Ray's records (ray.init's runtime env, an actor's, Ray Train's run
# state, which keeps train_loop_config) for others to read.
_joined_cluster = False


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to 1, true or yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def forward_secrets_requested() -> bool:
    """Whether the user asked for AWS secrets to travel to a shared cluster anyway (DGM_FORWARD_AWS_CREDENTIALS=1)."""
    return env_flag(FORWARD_SECRETS_VAR)


def forwarded_env(shared: bool, keys: Iterable[str] = FORWARDED_ENV) -> tuple[dict[str, str], list[str]]:
    """The ``keys`` set in this process, and the names of those held back: all of them travel to a cluster this
    process starts (same machine, same user); to a ``shared`` one the AWS secrets and profile name stay here unless
    DGM_FORWARD_AWS_CREDENTIALS=1, as its nodes are expected to have credentials of their own."""
    present = {key: os.environ[key] for key in keys if key in os.environ}
    if not shared or forward_secrets_requested():
        return present, []
    withheld = [key for key in present if key in HELD_BACK_ENV]
    return {k: v for k, v in present.items() if k not in withheld}, withheld


def withheld_note(withheld: Iterable[str], where: str) -> str:
    """The one line telling the user what stayed here and why, why the job still reaches S3, and how to opt in."""
    names = list(withheld)
    secrets = [name for name in names if name not in AWS_LOCAL_ENV]
    local = [name for name in names if name in AWS_LOCAL_ENV]
    them = "it" if len(names) == 1 else "them"
    from data_pipeline.s3 import endpoint_url

    endpoint = endpoint_url()
    if endpoint:  # an S3-compatible store (MinIO, on-premises): no instance profile speaks for it
        own = f"the store at {endpoint} needs credentials set on the nodes (their environment or ~/.aws)"
    else:
        own = ("its nodes use their own credentials (launch/clusters/aws.yaml gives them the IAM instance profiles "
               "dgm-ray-head and dgm-ray-worker)")
    said = []
    if secrets:
        verb, these = ("is", "it") if len(secrets) == 1 else ("are", "them")
        said.append(f"{', '.join(secrets)} {verb} set here but not sent to {where}: Ray would keep {these} in its "
                    "job table, readable by anyone with access to the cluster")
    if local:
        held = f"not sent to {where} either" if secrets else f"set here but not sent to {where}"
        said.append(f"AWS_PROFILE is {held}: it names a profile of this machine's AWS config, which the nodes may "
                    "not have (boto3 fails on a missing profile)")
    return f"[ray] {'; '.join(said)}; {own}. To send {them} anyway, set {FORWARD_SECRETS_VAR}=1"


def worker_env(use_gpu: bool = False, shared: bool | None = None) -> dict[str, str]:
    """Environment every Ray worker gets: DeepSpeed's accelerator (CUDA for a GPU run, else the CPU unless
    DS_ACCELERATOR says otherwise), the extension cache, S3 access. ``shared`` (default: whether ensure_ray
    joined an existing cluster) leaves the AWS secrets out, see ``forwarded_env``, and this checkout's extension
    cache: its path means nothing on the cluster's nodes (another user's home, or a job's per-submission
    working folder that compiled every op again), so they keep torch's own cache unless TORCH_EXTENSIONS_DIR is
    set here."""
    shared = _joined_cluster if shared is None else shared
    env = {
        "DS_ACCELERATOR": "cuda" if use_gpu else os.environ.get("DS_ACCELERATOR", "cpu"),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
        # Ray Train would also route print() through its logger, so every progress line reached the console twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or (
        None if shared else os.path.join(PROJECT_ROOT, ".cache", "torch_extensions"))
    if extensions:
        env["TORCH_EXTENSIONS_DIR"] = extensions
    env.update(forwarded_env(shared)[0])
    return env


def job_env_keys() -> set[str]:
    """Environment variables the Ray job this driver runs in already gives every worker (its runtime env). Ray
    refuses a ``ray.init`` runtime env that names one of them again ("Failed to merge the Job's runtime env"),
    and a job's variables are also in this process's environment, where ``worker_env`` would pick them up."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        env_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return set()
    return set(env_vars) if isinstance(env_vars, dict) else set()


def driver_runtime_env(shared: bool | None = None) -> dict[str, Any]:
    """What ``ray.init`` adds to every worker: ``worker_env`` less what an enclosing job already sets."""
    taken = job_env_keys()
    return {"env_vars": {k: v for k, v in worker_env(shared=shared).items() if k not in taken},
            "worker_process_setup_hook": quiet_worker_noise}


def ensure_ray(address: str = "", object_store_mb: int = 256) -> bool:
    """Connect to ``address``, or start an in-process local cluster sized to this machine. True if started here.

    Joining a cluster keeps the AWS secrets out of what its workers are sent (``forwarded_env``), saying so."""
    import ray

    global _joined_cluster
    if ray.is_initialized():
        return False
    _joined_cluster = bool(address)
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
    if address:
        # an enclosing job's own variables reach the workers through the job, not through this driver
        withheld = [key for key in forwarded_env(shared=True)[1] if key not in job_env_keys()]
        if withheld:
            print(withheld_note(withheld, f"the Ray cluster at {address}"), file=sys.stderr)
        check_reachable(address)
        try:
            ray.init(address=address, runtime_env=driver_runtime_env(), log_to_driver=True)
        except ConnectionError as e:
            raise ConfigError(f"--address {address}: cannot join the Ray cluster there ({e})") from None
        return False
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=object_store_mb << 20,
             runtime_env=driver_runtime_env(), log_to_driver=True, configure_logging=False)
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, where ``ray.init`` would retry for minutes (a host:port nobody listens
    on) or answer with advice about RAY_ADDRESS (a dashboard URL given where the cluster's own address belongs)."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: that is a Ray dashboard URL (for `dgm submit`, `dgm jobs`); joining "
                         "a cluster takes its own address: host:6379, ray://host:10001, or auto on a cluster node")
    from ray._common.network_utils import parse_address  # Ray's own reading: [::1]:6379 is ('::1', '6379')

    host, port = parse_address(address.removeprefix("ray://")) or ("", "")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected host:port (e.g. 10.0.0.5:6379), ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); check the "
                              "host and port (a head node's GCS listens on 6379, Ray Client on 10001)") from None


def quiet_worker_noise() -> None:
    """Ray worker setup: silence library chatter a user cannot act on, so training logs show training.
    - The embedded cluster runs without the dashboard, so without Ray's state API, which Ray Train's placement-group
      cleaner polls every second, warning each time (hundreds of lines a run). Its job, removing a dead
      controller's placement group, is done there by the cluster ending with the driver.
    - DeepSpeed's ZeRO-2 calls torch's deprecated ``all_gather_into_tensor`` spelling, a FutureWarning per rank.
    - boto's credential lookup says where it found them ("Found credentials in environment variables."), once per
      rank and S3 client, at INFO under Ray's worker logging."""
    import logging
    import warnings

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def absolute(url: str) -> str:
    """Local paths made absolute (workers may run elsewhere); URLs and empty strings unchanged. A mistyped URL
    (``s3:/bucket``) is refused here, before it would become a local path under the current folder."""
    if not url or "://" in url:
        return url
    from data_pipeline.storage import is_remote

    is_remote(url)  # raises StorageError for s3:/x, s3:x, file:/x
    return os.path.abspath(url)
