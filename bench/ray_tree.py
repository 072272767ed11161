"""Which source tree a bench's Ray workers run (not a benchmark: a helper of the Ray-based ones).

A Ray worker is a fresh interpreter that imports trainer.ray_env (the worker set-up hook) before it sees the
driver's sys.path, so it ran whatever tree the venv's editable install names, not necessarily the checkout the bench
was started from. PYTHONPATH set before Ray starts reaches every worker of the local cluster (the raylet inherits
it) and comes before the editable install's finder; ``workers_tree`` asks a worker where it imported from, so the
JSON says which code was measured.
"""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_checkout() -> None:
    """Put this checkout first on the path of every process started from here on (Ray workers, child scripts)."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *rest])


def workers_tree() -> dict[str, object]:
    """The folder the running Ray cluster's workers import ``trainer`` from, and whether it is this checkout."""
    import ray

    @ray.remote(num_cpus=0)
    def where() -> str:
        import trainer

        return os.path.dirname(os.path.dirname(os.path.abspath(trainer.__file__)))

    tree = ray.get(where.remote())
    return {"ray_workers_tree": tree, "ray_workers_run_checkout": os.path.realpath(tree) == os.path.realpath(ROOT)}
