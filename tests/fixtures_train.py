"""Fixtures for the training tests: one embedded Ray cluster for the session, prepared digits and ring data sets,
and a one-rank process group in the test process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from data_pipeline.prepare import PrepareConfig, prepare_dataset


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny networks: one torch thread; on a loaded 2-core machine two OpenMP threads spin 20x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """The same embedded cluster `dgm train` starts, shared by every Ray test of the session."""
    import ray

    from launch.train import ensure_ray

    ensure_ray("", object_store_mb=200)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> dict[str, str]:
    """The digits as train and held-out shards (image codec), written once per session."""
    root = tmp_path_factory.mktemp("digits-data")
    out = {}
    for split in ("train", "holdout"):
        url = str(root / split)
        prepare_dataset(PrepareConfig(output=url, source="digits", source_settings={"split": split},
                                      samples_per_shard=200, parallel=False), report=lambda _: None)
        out[split] = url
    return out


@pytest.fixture(scope="session")
def ring_data(tmp_path_factory) -> dict[str, str]:
    """The 8-mode ring: 1024 training points in 8 shards of 128, 512 held out."""
    root = tmp_path_factory.mktemp("ring-data")
    out = {}
    for split, n in (("train", 1024), ("holdout", 512)):
        url = str(root / split)
        prepare_dataset(PrepareConfig(output=url, source="mixture", codec="points", samples_per_shard=128,
                                      source_settings={"num_samples": n, "split": split}, parallel=False),
                        report=lambda _: None)
        out[split] = url
    return out


@pytest.fixture(scope="module")
def world1(tmp_path_factory, one_thread_module) -> Iterator[None]:
    """One rank's process group in this process; DeepSpeed adopts it (as it adopts Ray's)."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups
    import torch.distributed as dist

    init = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    env = pytest.MonkeyPatch()
    env.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine asks for it
    yield
    env.undo()
    dist.destroy_process_group()
    ds_comm.cdb = None  # DeepSpeed's handle on the group just destroyed: a later init_distributed starts over
    ds_groups._WORLD_GROUP = None  # and its clone of that group, which the next module's engines would broadcast on


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def flip_a_master_weight_byte(checkpoint: str, rank: int) -> tuple[str, str]:
    """One byte changed in the middle of rank ``rank``'s fp32 master weights (its largest archive member), as a
    failing disk or a bad copy does: (file, member)."""
    import zipfile

    ds = os.path.join(checkpoint, "model", "ds")
    file = os.path.join(ds, next(n for n in sorted(os.listdir(ds)) if n.startswith(f"zero_pp_rank_{rank}_")
                                 and n.endswith("optim_states.pt")))
    with zipfile.ZipFile(file) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
        start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    with open(file, "r+b") as f:
        f.seek(start + member.file_size // 2 + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x7F]))
    return file, member.filename
