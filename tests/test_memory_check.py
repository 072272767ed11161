"""trainer/memory_check.py: a model whose ZeRO states cannot fit a rank's memory is refused before any allocation."""

from __future__ import annotations

import psutil
import pytest
import torch

from sharding.zero import ZeroConfig, estimate_memory
from tests.test_dctransformer import INFO as DCT_INFO
from tests.test_gan import ring_info
from trainer.families.dctransformer import DCTransformerConfig, DCTransformerFamily, DecoderSizes
from trainer.families.dvae import DVAEConfig, DVAEFamily
from trainer.families.image_gpt import ImageGPTConfig, ImageGPTFamily
from trainer.families.slsa_gan import SLSAGanConfig, SLSAGanFamily
from trainer.memory_check import (
    GIB,
    RankMemory,
    cgroup_limit,
    check_model_fits,
    count_parameters,
    rank_memory,
)
from trainer.transformer import TransformerConfig
from trainer.typed_config import ConfigError

FAMILIES = [
    lambda: DCTransformerFamily(DCTransformerConfig(encoder=TransformerConfig(n_layer=2, n_head=2, d_model=32),
                                                    decoders=DecoderSizes(1, 2, 1)), DCT_INFO),
    lambda: ImageGPTFamily(ImageGPTConfig(transformer=TransformerConfig(n_layer=2, n_head=2, d_model=16)), {}),
    lambda: DVAEFamily(DVAEConfig(num_codes=32, width=8, blocks_per_group=1, decoder_init=8),
                       {"image_shape": [32, 32, 3]}),
    lambda: SLSAGanFamily(SLSAGanConfig(), ring_info()),
]


@pytest.mark.parametrize("make", FAMILIES, ids=["dctransformer", "image_gpt", "dvae", "slsa_gan"])
def test_parameters_counted_on_the_meta_device_are_the_real_networks(make) -> None:
    family = make()
    real = {name: sum(p.numel() for p in m.parameters()) for name, m in family.build_modules().items()}
    counted = count_parameters(family.build_modules)
    assert {name: n for name, (n, _) in counted.items()} == real and all(real.values())
    assert all(0 < layer <= n for n, layer in counted.values())


def test_a_model_far_past_the_machine_is_counted_without_allocating_it() -> None:
    big = DCTransformerFamily(DCTransformerConfig(encoder=TransformerConfig(n_layer=48, n_head=32, d_model=4096),
                                                  decoders=DecoderSizes(8, 8, 8)), DCT_INFO)
    before = psutil.Process().memory_info().rss
    (n, layer), = count_parameters(big.build_modules).values()
    assert n > 15e9 and layer >= 4096 * 4096  # 60 GiB of fp32 weights were they real
    assert psutil.Process().memory_info().rss - before < 2 * GIB


def cpu(gib: float) -> RankMemory:
    return RankMemory(device=0.0, host=gib * GIB, ranks_on_host=2)


def test_model_states_past_a_ranks_share_are_refused_with_the_figures_and_what_would_help() -> None:
    zero = ZeroConfig(stage=2, precision="fp32")
    states = {"model": estimate_memory(500_000_000, zero, 2, 0)}  # 4 + 2 + 8 B/param on each rank: 6.52 GiB
    need = states["model"].device_total / GIB
    with pytest.raises(ConfigError) as refused:
        check_model_fits(states, cpu(need - 0.5), zero, 2)
    message = str(refused.value)
    assert f"need {need:.2f} GiB of host memory per rank (ZeRO-2, fp32, 2 rank(s)" in message
    assert f"a rank has {need - 0.5:.2f} GiB ({need - 0.5:.1f} GiB of host memory (the node's RAM over 2 rank(s)))" \
        in message
    assert "raise zero.stage (now 2" in message and "bf16" in message and "offload" not in message  # CPU run
    alone = {"model": estimate_memory(500_000_000, zero, 1, 0)}  # one rank: ZeRO partitions nothing
    with pytest.raises(ConfigError) as refused:
        check_model_fits(alone, cpu(1.0), zero, 1)
    assert "zero.stage" not in str(refused.value) and "use more nodes" in str(refused.value)
    assert "warning: model states take 91% of a rank's host memory" in check_model_fits(states, cpu(need / 0.91),
                                                                                          zero, 2)
    assert check_model_fits(states, cpu(4 * need), zero, 2) == ""
    # every network of the run counts: a GAN's generator and discriminator share the rank
    with pytest.raises(ConfigError, match=f"need {2 * need:.2f} GiB"):
        check_model_fits({"g": states["model"], "d": states["model"]}, cpu(1.5 * need), zero, 2)


def test_a_gpu_rank_is_judged_on_its_device_and_what_it_offloads_on_the_host() -> None:
    zero = ZeroConfig(stage=2, precision="bf16", offload_optimizer=True)
    states = {"model": estimate_memory(2_000_000_000, zero, 8, 0)}
    gpu = RankMemory(device=80 * GIB, host=1 * GIB, ranks_on_host=8, device_name="H100")
    with pytest.raises(ConfigError, match=r"of host memory per rank .* a rank has 1\.00 GiB") as refused:
        check_model_fits(states, gpu, zero, 8)  # Adam's state went to the host, which is too small
    assert "offload less" in str(refused.value) and "set zero.offload" not in str(refused.value)
    no_offload = ZeroConfig(stage=1, precision="bf16")
    with pytest.raises(ConfigError, match=r"of H100 per rank .*set zero.offload_optimizer: true"):
        check_model_fits({"model": estimate_memory(20_000_000_000, no_offload, 8, 0)}, gpu, no_offload, 8)


def test_a_rank_gets_its_share_of_the_nodes_memory(monkeypatch) -> None:
    total = psutil.virtual_memory().total
    one = rank_memory(torch.device("cpu"), {})
    four = rank_memory(torch.device("cpu"), {"LOCAL_WORLD_SIZE": "4"})
    assert one.device == 0 and 0 < one.host <= total and one.ranks_on_host == 1
    assert four.host == pytest.approx(one.host / 4) and four.ranks_on_host == 4
    assert "(the node's RAM over 4 rank(s))" in four.describe()


def test_the_cgroup_limit_is_this_process_own_and_unlimited_reads_as_none(tmp_path) -> None:
    root = tmp_path / "cg"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "kubepods" / "pod1" / "memory.max").write_text("8589934592\n")
    (root / "memory.max").write_text("max\n")
    own = tmp_path / "cgroup"
    own.write_text("0::/kubepods/pod1\n")
    assert cgroup_limit(str(own), str(root)) == 8 * GIB
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "c1").mkdir(parents=True)
    (v1 / "memory" / "docker" / "c1" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "cgroup_v1").write_text("12:memory:/docker/c1\n3:cpu,cpuacct:/docker/c1\n")
    assert cgroup_limit(str(tmp_path / "cgroup_v1"), str(v1)) == float("inf")
    assert cgroup_limit(str(tmp_path / "absent"), str(tmp_path / "nothing")) == float("inf")
