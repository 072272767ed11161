"""The discrete VAE (DALL-E stage 1): shapes, the logit-Laplace density, schedules, KL, tokens; one spine run."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

from trainer.dalle.dvae import (
    DiscreteVAE,
    DVAEConfig,
    ResBlock,
    beta_at,
    kl_to_uniform,
    logit_laplace_log_prob,
    logit_normal_log_prob,
    map_pixels,
    tau_at,
    unmap_pixels,
)
from trainer.families.dvae import DVAEFamily, code_stats, psnr_db

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_codes=64, width=8, blocks_per_group=1, decoder_init=16)


def small_family(**kw) -> DVAEFamily:
    return DVAEFamily(DVAEConfig(**{**SMALL, **kw}), {"image_shape": [32, 32, 3]})


def scenes(n: int) -> np.ndarray:
    from data_pipeline.sources.shapes import ShapesConfig, ShapesSource

    src = ShapesSource(ShapesConfig(num_samples=n, resolution=32, min_objects=1, max_objects=3))
    return np.stack([src.sample(i).image for i in range(n)])


@pytest.mark.parametrize("n_pools,grid", [(2, 8), (3, 4), (0, 32)])
def test_encoder_and_decoder_shapes(one_thread, n_pools, grid):
    torch.manual_seed(0)
    model = DiscreteVAE(DVAEConfig(**SMALL, n_pools=n_pools))
    x = torch.rand(2, 3, 32, 32)
    logits, decoded = model(x, tau=1.0)
    assert logits.shape == (2, 64, grid, grid)
    assert decoded.shape == (2, 6, 32, 32)
    assert model.decoder(model.one_hot(logits.argmax(1), torch.float32)).shape == (2, 6, 32, 32)


def test_residual_branches_are_scaled_by_one_over_layers_squared():
    cfg = DVAEConfig(**{**SMALL, "blocks_per_group": 2}, n_pools=2)
    blocks = [m for m in DiscreteVAE(cfg).modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 2 * cfg.n_layers == 12
    assert {b.gain for b in blocks} == {1 / 36}


@pytest.mark.parametrize("mu,log_b", [(0.0, 0.0), (1.2, -1.0), (-0.7, 0.5)])
def test_logit_laplace_density_integrates_to_one_and_matches_the_formula(mu, log_b):
    x = torch.linspace(1e-7, 1 - 1e-7, 2_000_001, dtype=torch.float64)
    mu_t, lb = torch.full_like(x, mu), torch.full_like(x, log_b)
    logp = logit_laplace_log_prob(x, mu_t, lb)
    assert float(torch.trapezoid(logp.exp(), x)) == pytest.approx(1.0, abs=2e-3)
    b = math.exp(log_b)
    direct = torch.exp(-(torch.log(x / (1 - x)) - mu).abs() / b) / (2 * b * x * (1 - x))
    pts = slice(1000, None, 100_000)
    assert torch.allclose(logp[pts].exp(), direct[pts], rtol=1e-9)


def test_logit_normal_warmup_density_integrates_to_one_and_is_used_only_during_warmup(one_thread):
    x = torch.linspace(1e-7, 1 - 1e-7, 2_000_001, dtype=torch.float64)
    logp = logit_normal_log_prob(x, torch.full_like(x, 0.7), 0.6)
    assert float(torch.trapezoid(logp.exp(), x)) == pytest.approx(1.0, abs=2e-3)
    fam = small_family(gaussian_warmup_steps=5)
    images = fam.collate([{"image": im} for im in scenes(2)])["images"]
    logits, decoded = fam.build_modules()["dvae"](images, 1.0)
    terms = {s: fam.elb_terms(images, logits, decoded, torch.Generator().manual_seed(0), step=s)[0]
             for s in (None, 0, 4, 5)}
    assert torch.equal(terms[0], terms[4]) and torch.equal(terms[5], terms[None])  # held-out ELB: the Laplace one
    assert not torch.allclose(terms[4], terms[5])
    decoded_other_b = decoded.clone()
    decoded_other_b[:, 3:] += 1.0  # the fixed-scale warm-up ignores the decoder's ln b
    warm = fam.elb_terms(images, logits, decoded_other_b, torch.Generator().manual_seed(0), step=0)[0]
    assert torch.equal(warm, terms[0])


def test_logit_normal_likelihood_is_used_throughout_when_configured(one_thread):
    fam = small_family(likelihood="logit_normal", gaussian_scale=0.2)
    images = fam.collate([{"image": im} for im in scenes(2)])["images"]
    logits, decoded = fam.build_modules()["dvae"](images, 1.0)
    held_out = fam.elb_terms(images, logits, decoded, torch.Generator().manual_seed(0))[0]
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    x = map_pixels((torch.round(images.float() * 255) + noise) / 256, fam.config.eps)
    expected = (logit_normal_log_prob(x, decoded[:, :3].float(), 0.2) + math.log(0.8)).flatten(1).sum(1)
    assert torch.allclose(held_out, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="model.likelihood"):
        DVAEConfig(likelihood="laplace")
    with pytest.raises(ValueError, match="model.gaussian_scale"):
        DVAEConfig(gaussian_scale=0.0)


def test_pixel_mapping_round_trips_and_stays_inside_the_support():
    x = torch.linspace(0, 1, 11)
    y = map_pixels(x, 0.1)
    assert float(y.min()) == pytest.approx(0.1) and float(y.max()) == pytest.approx(0.9)
    assert torch.allclose(unmap_pixels(y, 0.1), x, atol=1e-6)
    assert float(unmap_pixels(torch.tensor([0.0, 1.0]), 0.1).min()) == 0.0  # clamped to [0, 1]


def test_beta_ramp_and_cosine_tau_values():
    cfg = DVAEConfig(beta_max=6.6, beta_ramp_steps=500, tau_start=1.0, tau_end=1 / 16, tau_steps=2000)
    assert [beta_at(s, cfg) for s in (0, 250, 500, 10_000)] == pytest.approx([0.0, 3.3, 6.6, 6.6])
    assert tau_at(0, cfg) == pytest.approx(1.0)
    assert tau_at(1000, cfg) == pytest.approx((1 + 1 / 16) / 2)
    assert tau_at(500, cfg) == pytest.approx(1 / 16 + (15 / 16) * (1 + math.cos(math.pi / 4)) / 2)
    assert tau_at(2000, cfg) == tau_at(5000, cfg) == pytest.approx(1 / 16)
    assert beta_at(0, DVAEConfig(beta_ramp_steps=0)) == 6.6
    assert beta_at(300, DVAEConfig(beta_max=0.0)) == 0.0


def test_kl_to_uniform_is_zero_for_uniform_logits_and_at_most_log_k():
    assert torch.allclose(kl_to_uniform(torch.full((2, 16, 3, 3), 4.2)), torch.zeros(2, 3, 3), atol=1e-6)
    peaked = torch.zeros(1, 16, 1, 1)
    peaked[0, 3] = 100.0
    assert float(kl_to_uniform(peaked)) == pytest.approx(math.log(16), abs=1e-4)
    q = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0)
    assert float(kl_to_uniform(torch.tensor([1.0, 2.0, 3.0]), dim=0)) == pytest.approx(
        float((q * (q * 3).log()).sum()), rel=1e-5)


def test_encode_tokens_is_deterministic_in_range_and_round_trips_through_decode(one_thread):
    torch.manual_seed(0)
    fam = small_family()
    modules = fam.build_modules()
    images = scenes(4)
    a, b = fam.encode_tokens(modules, images), fam.encode_tokens(modules, torch.from_numpy(images))
    assert a.dtype == torch.long and a.shape == (4, 8, 8) and fam.grid == (8, 8) and fam.num_codes == 64
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 64
    out = fam.decode_tokens(modules, a)
    assert out.shape == (4, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert fam.sample_images(modules, 3, torch.Generator().manual_seed(1)).shape == (3, 3, 32, 32)


def test_bad_images_tokens_and_config_are_refused():
    fam = small_family()
    modules = fam.build_modules()
    with pytest.raises(ValueError, match=r"expected uint8 images \[B, 32, 32, 3\], got torch.float32"):
        fam.encode_tokens(modules, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"token ids must be in 0..63, got 0..64"):
        fam.decode_tokens(modules, torch.tensor([[[0] * 8] * 7 + [[64] * 8]]))
    with pytest.raises(ValueError, match=r"expected integer tokens \[B, 8, 8\]"):
        fam.decode_tokens(modules, torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"model.tau_end must be in \(0, tau_start\]"):
        DVAEConfig(tau_start=0.5, tau_end=1.0)
    with pytest.raises(ValueError, match="not divisible by 8"):
        DVAEFamily(DVAEConfig(n_pools=3), {"image_shape": [36, 36, 3]})
    with pytest.raises(ValueError, match="RGB images"):
        DVAEFamily(DVAEConfig(), {"image_shape": [8, 8, 1]})


def test_code_statistics_and_psnr():
    stats = code_stats(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 16)
    assert stats["perplexity"] == pytest.approx(4.0) and stats["usage"] == pytest.approx(4 / 16)
    assert code_stats(torch.zeros(10, dtype=torch.long), 8)["perplexity"] == pytest.approx(1.0)
    x = torch.full((1, 3, 4, 4), 0.5)
    assert float(psnr_db(x + 0.1, x)[0]) == pytest.approx(20.0, abs=1e-4)


class PlainEngine:
    """A torch-only stand-in with the Engine protocol (the spine test below uses DeepSpeed's)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.opt = torch.optim.Adam(module.parameters(), lr=3e-3)

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()

    def step(self) -> None:
        self.opt.step()


def test_train_step_lowers_the_loss_and_reports_the_schedules(one_thread):
    from trainer.families.base import StepContext

    torch.manual_seed(0)
    fam = small_family(beta_ramp_steps=10, tau_steps=20)
    modules = fam.build_modules()
    batch = fam.collate([{"image": im} for im in scenes(8)])
    engine = PlainEngine(modules["dvae"])
    runs = [fam.train_step({"dvae": engine}, batch, StepContext(s, 0, 1, torch.device("cpu"), torch.float32))
            for s in range(12)]
    assert runs[-1]["elb_bits_per_dim"] < runs[0]["elb_bits_per_dim"] - 0.1, [r["elb_bits_per_dim"] for r in runs]
    assert [runs[0]["beta"], runs[5]["beta"], runs[11]["beta"]] == pytest.approx([0.0, 3.3, 6.6])
    assert runs[10]["tau"] == pytest.approx(tau_at(10, fam.config))
    ev = fam.evaluate(modules, batch)
    assert set(ev) >= {"loss", "elb_bits_per_dim", "psnr_db", "perplexity", "usage"} and not {"beta", "tau"} & set(ev)
    assert ev == fam.evaluate(modules, batch)  # hard codes, seeded draw: repeatable
    assert ev["elb_bits_per_dim"] == pytest.approx((ev["loss"] + math.log(256)) / math.log(2), rel=1e-5)


@pytest.mark.slow
def test_dvae_trains_on_the_spine_exports_and_tokenises(ray_local, tmp_path):
    from data_pipeline.prepare import PrepareConfig, prepare_dataset
    from launch.config import load_config
    from launch.export import export_checkpoint
    from launch.train import run_training
    from trainer.export import load_export

    data = {}
    for split, seed in (("train", 0), ("eval", 1)):
        data[split] = str(tmp_path / split)
        prepare_dataset(PrepareConfig(
            output=data[split], source="shapes", samples_per_shard=64, parallel=False, codec="image",
            codec_settings={"keep": ["caption", "attributes"]},
            source_settings={"num_samples": 128, "resolution": 32, "seed": seed, "min_objects": 1, "max_objects": 3},
        ), report=lambda _: None)
    run = str(tmp_path / "run")
    cfg, raw = load_config(os.path.join(ROOT, "configs", "t2i_dvae.yaml"), [
        f"run_dir={run}", f"data.train={data['train']}", f"data.eval={data['eval']}", "trainer.steps=8",
        "trainer.log_every=4", "trainer.eval_every=8", "trainer.sample_every=8", "trainer.checkpoint_every=8",
        "trainer.eval_batches=2", "trainer.num_samples=4", "trainer.schedule.total_steps=8",
        "trainer.schedule.warmup_steps=1", "data.stream.global_batch=16", "data.stream.partitions=4",
        "data.stream.shuffle_block=32", "model.width=8", "model.blocks_per_group=1", "model.num_codes=64",
        "model.decoder_init=16", "model.beta_ramp_steps=4", "model.beta_max=6.6",
    ])
    run_training(cfg, raw)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    ev = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9)) and len(ev) == 1
    assert train[-1]["beta"] == pytest.approx(6.6) and train[0]["beta"] == 0.0
    assert all(math.isfinite(r["loss"]) for r in train) and ev[0]["psnr_db"] > 10
    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(run, "checkpoints"), out)
    family, modules, config = load_export(out)
    assert config["family"] == "dvae" and family.grid == (8, 8) and family.num_codes == 64
    images = scenes(4)
    tokens = family.encode_tokens(modules, images)
    assert tokens.shape == (4, 8, 8) and int(tokens.max()) < 64
    recon = family.decode_tokens(modules, tokens)
    assert recon.shape == (4, 3, 32, 32)
    # The export holds the trained weights: its held-out PSNR is the run's last eval figure.
    from data_pipeline.codecs import build_codec
    from data_pipeline.manifest import load_manifest
    from data_pipeline.stream import RankStream, StreamConfig

    stream_cfg = StreamConfig(global_batch=16, partitions=4, shuffle_block=32, drop_last=False, shuffle_shards=False)
    got = []
    for rank in range(2):
        s = RankStream(load_manifest(data["eval"]), stream_cfg, build_codec("image").decode, rank, 2)
        batches = itertools.islice(s.iterate(1), 2)
        got += [family.evaluate(modules, family.collate(b))["psnr_db"] for b in batches]
    assert sum(got) / len(got) == pytest.approx(ev[0]["psnr_db"], abs=1e-3)
