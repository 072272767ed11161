"""Fixtures for the training tests: one embedded Ray cluster for the session, a prepared digits data set."""

from __future__ import annotations

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
