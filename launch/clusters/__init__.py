"""Cluster launcher definitions (aws.yaml, local.yaml) and their offline validation.

`load_cluster_config` checks a file the way `ray up` would before it touches a cloud (Ray's JSON schema, then
`prepare_config` + `validate_config`), but first with messages that name the file, the key path and the likely
intended spelling, so a typo fails on the laptop instead of half-way through `ray up`. It makes no cloud calls.
`node_shapes` gives the resources of every node type the autoscaler may add, so `dgm submit` can tell a job that
waits for a node to come up from one no node type can ever hold (see launch.jobs.JobsClient.check_feasible).
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml

CLUSTERS_DIR = Path(__file__).resolve().parent
_SECRET = re.compile(r"aws_secret_access_key|aws_access_key_id|aws_session_token|\bAKIA[0-9A-Z]{16}\b", re.I)


class ClusterConfigError(ValueError):
    """A cluster YAML that `ray up` would reject (or that breaks a rule of this project)."""


def bundled(name: str) -> Path:
    """The path of a definition shipped with dgm: bundled('aws') -> .../launch/clusters/aws.yaml."""
    path = CLUSTERS_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))
        raise ClusterConfigError(f"no bundled cluster definition {name!r}; known: {', '.join(known)}")
    return path


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _schema_errors(config: dict[str, Any], where: str) -> list[str]:
    """Every violation of Ray's schema, as 'file: at a.b.c: message (did you mean ...)'."""
    import jsonschema

    messages = []
    validator = jsonschema.Draft7Validator(_ray_schema())
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        at = ".".join(str(p) for p in err.absolute_path) or "top level"
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(allowed)):
                messages.append(f"{where}: unknown key {key!r} at {at}{_suggest(key, allowed)}")
        else:
            messages.append(f"{where}: at {at}: {err.message}")
    return messages


def _reference_errors(config: dict[str, Any], where: str) -> list[str]:
    """Names that must point at a defined node type, and min/max worker bounds."""
    types = config.get("available_node_types")
    if not isinstance(types, dict):
        return []
    messages = []
    head = config.get("head_node_type")
    if head is None:
        messages.append(f"{where}: head_node_type is missing; it must name one of {sorted(types)}")
    elif head not in types:
        messages.append(f"{where}: head_node_type {head!r} is not a node type defined in available_node_types "
                        f"{sorted(types)}{_suggest(str(head), list(types))}")
    for name, node in types.items():
        low, high = (node.get("min_workers", 0), node.get("max_workers")) if isinstance(node, dict) else (0, None)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            messages.append(f"{where}: node type {name!r} has min_workers {node['min_workers']} > max_workers "
                            f"{node['max_workers']}")
    return messages


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Parse and validate a cluster YAML offline; returns the config as `ray up` would use it (defaults filled)."""
    from click import ClickException
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClusterConfigError(f"{where}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ClusterConfigError(f"{where}: not a text file (a cluster YAML is UTF-8 text)") from None
    if _SECRET.search(text):
        raise ClusterConfigError(f"{where}: contains AWS credentials; nodes must get S3 access from their IAM "
                                 "instance profile (IamInstanceProfile), never from keys in this file")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{where}: expected a mapping of cluster settings at the top level")
    raw = copy.deepcopy(config)
    if (raw.get("provider") or {}).get("type") == "local":
        raw.pop("min_workers", None)  # the local provider moves it into its single node type
    problems = _schema_errors(raw, where) + _reference_errors(raw, where)
    if problems:
        raise ClusterConfigError("\n".join(problems))
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except (ValueError, KeyError, RuntimeError, AssertionError) as e:
        raise ClusterConfigError(f"{where}: rejected by Ray's cluster launcher: {e}") from None
    except ClickException as e:  # cli_logger.abort(), e.g. for local-provider mistakes
        raise ClusterConfigError(f"{where}: rejected by Ray's cluster launcher: {e.format_message()}") from None
    return prepared


def node_shapes(config: dict[str, Any] | str | Path) -> list[dict[str, float]]:
    """Resources of each node type that can exist (the head, and worker types with max_workers > 0)."""
    if not isinstance(config, dict):
        config = load_cluster_config(config)
    shapes = []
    for name, node in config.get("available_node_types", {}).items():
        if name == config.get("head_node_type") or node.get("max_workers", 0) > 0:
            resources = {k: float(v) for k, v in (node.get("resources") or {}).items()}
            if not resources and (config.get("provider") or {}).get("type") == "local":
                continue  # fixed machines, all running: the live cluster shows what they have
            if not resources:  # left out, a job this type could run would be refused as fitting nowhere
                raise ClusterConfigError(f"node type {name!r}: resources is empty (Ray fills it in when the node "
                                         "starts); set its CPU/GPU/memory so dgm can judge which jobs fit")
            shapes.append(resources)
    return shapes


def max_total(config: dict[str, Any] | str | Path) -> dict[str, float]:
    """Most of each resource the cluster can hold at once: the head's plus that of the richest workers in it
    (each type up to its max_workers, all of them up to the cluster-wide max_workers): what a job spread over
    many nodes, such as a Ray Train worker group, can at most be given."""
    if not isinstance(config, dict):
        config = load_cluster_config(config)
    types = config.get("available_node_types", {})
    head = types.get(config.get("head_node_type"), {})
    total = {k: float(v) for k, v in (head.get("resources") or {}).items()}
    workers = [(node.get("resources") or {}, int(node.get("max_workers", 0)))
               for name, node in types.items() if name != config.get("head_node_type")]
    cap = int(config.get("max_workers", sum(count for _, count in workers)))
    for k in {k for resources, _ in workers for k in resources}:
        values = sorted((float(r.get(k, 0.0)) for r, count in workers for _ in range(count)), reverse=True)
        total[k] = total.get(k, 0.0) + sum(values[:cap])
    return total
