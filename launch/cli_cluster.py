"""The cluster half of `dgm`: submit, jobs, status, logs, stop, and the priority queue (queue add / queue run)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from launch.arg_types import at_least, positive
from launch.train import PROJECT_ROOT

Command = Callable[[argparse.Namespace], int]
ADDRESS_HELP = "Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS or that)"


def _resources(args: argparse.Namespace):
    from launch.jobs import JobResources, parse_memory

    return JobResources(num_cpus=args.cpus, num_gpus=args.gpus, memory=parse_memory(args.memory or 0))


def check_submittable(config_path: str, overrides: list[str]) -> None:
    """What the cluster would only find after the upload (and perhaps a GPU node's start): a config or override
    that does not validate, or data under a local path the upload leaves out (runs/, ignored folders) or that
    is not in the project at all. Local outputs are only warned about: they live in the job's working dir."""
    from pathlib import Path

    from launch.config import load_config
    from launch.job_spec import excluded_from_upload
    from launch.jobs import ClusterError

    cfg, _ = load_config(config_path, overrides)
    root = Path(PROJECT_ROOT).resolve()
    for key, url in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if not url or "://" in url or os.path.isabs(url):
            continue  # s3:// travels by itself; an absolute path may be a filesystem every node mounts
        path = (root / url).resolve()
        if not path.is_relative_to(root) or excluded_from_upload(root, path) or not path.exists():
            raise ClusterError(f"{key}={url}: a local path the job will not find on the cluster (the upload leaves "
                               "out runs/ and ignored folders); give the data set's s3:// URL")
    if "://" not in cfg.checkpoints and not os.path.isabs(cfg.checkpoints):
        print(f"[submit] warning: checkpoints go to {cfg.checkpoints} under the job's own folder on the head "
              "node (.dgm_jobs/<job id>/), where no later job finds them; set checkpoint_root to an s3:// URL to "
              "keep them", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    from launch.clusters import node_shapes
    from launch.job_spec import submit_training_job

    check_submittable(args.config, args.overrides)
    # an autoscaling cluster may add nodes its running ones lack (a GPU type): its file says which can exist
    shapes = node_shapes(args.cluster_file) if args.cluster_file else ()
    job_id = submit_training_job(args.address, args.config, args.overrides, PROJECT_ROOT, args.job_id,
                                 _resources(args), node_shapes=shapes)
    print(job_id)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.queue:
        from launch.job_queue import list_jobs as queued

        for job in queued(args.queue):
            print(f"{job.job_id:28s} {job.state:10s} prio {job.priority:<3d} {str(job.resources):28s} {job.reason}")
        return 0
    from launch.jobs import list_jobs

    for job in list_jobs(args.address):
        print(f"{job.job_id:28s} {job.status:10s} {job.entrypoint[:70]}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from launch.jobs import job_status

    info = job_status(args.address, args.job_id)
    print(f"{info.job_id} {info.status} {info.message}".rstrip())
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from launch.jobs import follow_job_logs, job_logs

    if args.follow:
        info = follow_job_logs(args.address, args.job_id, heartbeat_s=args.heartbeat)
        print(f"[logs] {info.job_id} {info.status}", file=sys.stderr)
        return 0 if info.status == "SUCCEEDED" else 1
    print(job_logs(args.address, args.job_id), end="")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from launch.jobs import stop_job

    info = stop_job(args.address, args.job_id)
    print(f"{info.job_id} {info.status}")
    if not info.terminal:
        print(f"[stop] {info.job_id} is still {info.status} after the wait; check `dgm status {info.job_id}`",
              file=sys.stderr)
        return 1
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from launch import job_queue

    if args.queue_command == "add":
        check_submittable(args.config, args.overrides)
        resources = _resources(args)
        job = job_queue.enqueue_training(args.queue, args.config, args.overrides, PROJECT_ROOT, resources,
                                         args.priority)
        print(f"{job.job_id} queued (priority {job.priority}, {job.resources})")
        if not resources.request():
            print("[queue] warning: the job declares no resources (--cpus/--gpus/--memory unset or 0): it books "
                  "nothing, so it starts at once and priorities cannot order it against others", file=sys.stderr)
        return 0
    if args.queue_command == "stop":
        job_queue.list_jobs(args.queue)  # a mistyped queue file is named, not created
        job = job_queue.JobQueue(args.queue).stop(args.job_id)
        print(f"{job.job_id} {job.state} ({job.reason})")
        return 0
    from launch.clusters import max_total, node_shapes

    scale = {"node_shapes": node_shapes(args.cluster_file), "max_total": max_total(args.cluster_file)} \
        if args.cluster_file else {}
    if not os.path.exists(args.queue):  # said, as a mistyped path would otherwise run an empty queue in silence
        print(f"[queue] warning: queue file {args.queue} does not exist yet: this runner serves the jobs "
              f"`dgm queue add ... --queue {args.queue}` puts there", file=sys.stderr)
    if args.once:
        for job in job_queue.run_once(args.queue, args.address, **scale):
            print(f"{job.job_id:28s} {job.state:10s} {job.reason}")
    else:
        job_queue.run_forever(args.queue, args.address, poll_s=args.poll, give_up_after_s=args.give_up_after,
                              **scale)
    return 0


def _add_resources(p: argparse.ArgumentParser, queued: bool = False) -> None:
    cpus = ("CPUs the job needs in all (the queue books them; its Ray Train workers claim them)" if queued
            else "CPUs the job's driver reserves")
    p.add_argument("--cpus", type=at_least(0.0), default=0.0, help=cpus)
    p.add_argument("--gpus", type=at_least(0.0), default=0.0, help="GPUs (fractions below 1 allowed)")
    p.add_argument("--memory", default="", help="memory, e.g. 4GiB")


def add_cluster_commands(sub: argparse._SubParsersAction, commands: dict[str, Command]) -> None:
    default_queue = os.path.join("runs", "queue.json")
    p = sub.add_parser("submit", help="send `dgm train CONFIG` to a Ray cluster as a Ray job",
                       description="Ships the project folder and the config as the job's runtime environment; the "
                       "job runs `dgm train` on the cluster. Refuses resources no node can ever provide.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--address", default="", help=ADDRESS_HELP)
    p.add_argument("--job-id", default=None)
    p.add_argument("--cluster-file", default="", metavar="CLUSTER.yaml",
                   help="an autoscaling cluster's file (e.g. launch/clusters/aws.yaml): a request that fits a node "
                        "type it may add is accepted and waits for that node, not refused as infeasible")
    _add_resources(p)
    commands["submit"] = cmd_submit

    p = sub.add_parser("jobs", help="list the cluster's jobs (or the priority queue's, with --queue)")
    p.add_argument("--address", default="", help=ADDRESS_HELP)
    p.add_argument("--queue", nargs="?", const=default_queue, default="",
                   help=f"a queue file: show queued jobs with their state and reason (no value: {default_queue})")
    commands["jobs"] = cmd_jobs

    for name, fn, helptext in (("status", cmd_status, "one job's state"), ("stop", cmd_stop, "stop a job"),
                               ("logs", cmd_logs, "a job's logs (--follow to stream until it ends)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job_id")
        p.add_argument("--address", default="", help=ADDRESS_HELP)
        if name == "logs":
            p.add_argument("--follow", action="store_true")
            # launch.jobs.HEARTBEAT_S, not imported here: that module imports Ray, which `dgm --help` should not wait for
            p.add_argument("--heartbeat", type=positive(float), default=30.0, metavar="SECONDS",
                           help="with --follow: after this long without output, check that the job and the "
                                "cluster are still there (a dropped connection otherwise waits forever)")
        commands[name] = fn

    p = sub.add_parser("queue", help="priority queue for mixed jobs on one cluster (Ray has none)",
                       description="`queue add` puts a training job in a queue file; `queue run` submits queued "
                       "jobs as resources free up: higher priority first, smaller jobs backfill, waiting jobs age.")
    qsub = p.add_subparsers(dest="queue_command", required=True)
    q = qsub.add_parser("add", help="queue `dgm train CONFIG` with a priority and resources")
    q.add_argument("config")
    q.add_argument("overrides", nargs="*")
    q.add_argument("--queue", default=default_queue, help=f"the queue file (default {default_queue})")
    q.add_argument("--priority", type=int, default=0)
    _add_resources(q, queued=True)
    q = qsub.add_parser("stop", help="stop a queued job (at once) or a running one (on the runner's next round)")
    q.add_argument("job_id")
    q.add_argument("--queue", default=default_queue, help=f"the queue file (default {default_queue})")
    q = qsub.add_parser("run", help="run the queue against a cluster (survives restarts: state is in the file)")
    q.add_argument("--queue", default=default_queue, help=f"the queue file (default {default_queue})")
    q.add_argument("--address", default="", help=ADDRESS_HELP)
    q.add_argument("--cluster-file", default="", metavar="CLUSTER.yaml",
                   help="an autoscaling cluster's file: jobs that fit node types it may add wait for them instead "
                        "of failing as impossible")
    q.add_argument("--poll", type=positive(float), default=5.0, help="seconds between scheduling rounds")
    q.add_argument("--once", action="store_true", help="one scheduling round, then exit")
    q.add_argument("--give-up-after", type=at_least(0.0, float, "0 waits without limit"), default=600.0, metavar="SECONDS",
                   help="exit with an error when the cluster was never reached in this long (0: wait without "
                        "limit); once reached, a lost cluster is waited for without limit")
    commands["queue"] = cmd_queue
