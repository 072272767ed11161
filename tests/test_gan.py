"""The self-labelling GAN's pieces: mixture source and points codec, metrics, networks, labels, alignment, steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.codecs import build_codec
from data_pipeline.codecs.image import SampleDecodeError
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.sources import build_source
from data_pipeline.sources.mixtures import MixtureConfig, MixtureSource
from data_pipeline.stream import RankStream, StreamConfig
from trainer.families import family_class
from trainer.families.base import OptimConfig, StepContext
from trainer.families.slsa_gan import SLSAGanConfig, SLSAGanFamily, labelled_share
from trainer.gan import metrics
from trainer.gan.nets import Classifier, frozen, mlp_trunk, params_to_buffers
from trainer.gan.plain import InMemoryData, plain_engines, train_plain

OPTIM = OptimConfig(lr=5e-4, weight_decay=0.0, beta1=0.5, beta2=0.999)


pytestmark = pytest.mark.usefixtures("one_thread")


def ring_info(modes: int = 8, **settings) -> dict:
    src = MixtureSource(MixtureConfig(modes=modes, **settings))
    return {"codec": {"name": "points"}, "image_shape": [2], "source": {"name": "mixture", "settings": src.settings()}}


def ring_samples(n: int, **settings) -> list[dict]:
    src = MixtureSource(MixtureConfig(num_samples=n, **settings))
    return [{"point": s.point, "label": s.label, "key": s.key, "valid": True} for s in map(src.sample, range(n))]


# ---------------------------------------------------------------- data


def test_mixture_source_is_reproducible_split_and_labelled_by_component() -> None:
    src = build_source("mixture", {"num_samples": 500, "seed": 3})
    again = build_source("mixture", {"num_samples": 500, "seed": 3})
    held = build_source("mixture", {"num_samples": 500, "seed": 3, "split": "holdout"})
    a, b, h = src.sample(17), again.sample(17), held.sample(17)
    assert a.key == b.key and np.array_equal(a.point, b.point) and a.key != h.key
    assert not np.array_equal(a.point, h.point)
    pts, labels = src.arrays()
    assert pts.dtype == np.float32 and pts.shape == (500, 2) and set(labels) == set(range(8))
    centres = src.mixture.centres
    assert np.allclose(np.linalg.norm(centres, axis=1), 2.0)
    assert np.abs(np.linalg.norm(pts - centres[labels], axis=1)).max() < 6 * 0.02
    grid = build_source("mixture", {"layout": "grid", "modes": 25, "std": 0.05})
    assert grid.mixture.num_modes == 25 and np.allclose(sorted(set(grid.mixture.centres[:, 0])), [-4, -2, 0, 2, 4])
    with pytest.raises(ValueError, match="square number"):
        build_source("mixture", {"layout": "grid", "modes": 8})
    with pytest.raises(ValueError, match="unknown setting 'radius'"):
        build_source("mixture", {"radius": 2.0})


def test_points_codec_round_trips_and_rejects_bad_members() -> None:
    codec = build_codec("points")
    sample = MixtureSource().sample(0)
    fields = codec.encode(sample)
    out = codec.decode({"__key__": sample.key, **fields})
    assert np.array_equal(out["point"], sample.point) and out["label"] == sample.label
    with pytest.raises(SampleDecodeError, match="undecodable"):
        codec.decode({"__key__": "k", "npy": b"garbage"})
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([1.0, np.nan], dtype=np.float32))
    with pytest.raises(SampleDecodeError, match="finite float32"):
        codec.decode({"__key__": "k", "npy": buf.getvalue()})
    with pytest.raises(SampleDecodeError, match="no .npy"):
        codec.decode({"__key__": "k", "cls": b"1"})


def test_prepared_mixture_streams_into_the_family_batch(tmp_path) -> None:
    url = str(tmp_path / "ring")
    prepare_dataset(PrepareConfig(output=url, source="mixture", codec="points", samples_per_shard=50,
                                  source_settings={"num_samples": 120}, parallel=False), report=lambda _: None)
    manifest = load_manifest(url)
    assert manifest.total == 120 and manifest.extra["image_shape"] == [2]
    stream = RankStream(manifest, StreamConfig(global_batch=40, partitions=2, shuffle_block=50),
                        build_codec("points").decode, 0, 1)
    family = SLSAGanFamily(SLSAGanConfig(label_fraction=0.5), {**ring_info(), "codec": manifest.codec,
                                                               "image_shape": manifest.extra["image_shape"]})
    batch = family.collate(next(iter(stream)))
    assert batch["x"].shape == (40, 2) and batch["label"].min() >= 0 and 0 < batch["labelled"].sum() < 40


# ---------------------------------------------------------------- metrics


def test_matched_accuracy_ignores_label_names_and_hungarian_handles_rectangles() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    assert metrics.matched_accuracy(truth, (truth + 1) % 3, 3, 3) == 1.0
    assert metrics.matched_accuracy(truth, np.array([0, 0, 0, 0, 2, 2]), 3, 3) == pytest.approx(4 / 6)
    assert metrics.hungarian_mapping(np.array([[0, 5, 1], [4, 0, 0]])).tolist() == [1, 0]
    assert metrics.hungarian_mapping(np.array([[3], [5]])).tolist() == [-1, 0]


def test_mixture_metrics_separate_a_perfect_generator_from_a_collapsed_one() -> None:
    mix = MixtureConfig().mixture()
    good, _ = mix.draw(5000, np.random.default_rng(0))
    collapsed = mix.centres[np.zeros(5000, dtype=int)] + 0.02 * np.random.default_rng(1).standard_normal((5000, 2))
    blurred = good + 0.3 * np.random.default_rng(2).standard_normal((5000, 2))
    q_good, q_col, q_blur = (metrics.mixture_quality(p, mix) for p in (good, collapsed, blurred))
    assert q_good.modes_covered == 8 and q_good.high_quality > 0.98
    assert q_col.modes_covered == 1 and q_col.high_quality > 0.98
    assert q_blur.high_quality < 0.1
    jsd = [metrics.mixture_jsd(p, mix) for p in (good, collapsed, blurred)]
    # One mode of eight: JSD = (log(2/9) / 8 + 7 log(2) / 8 + log(16/9)) / 2 = 0.497 nats.
    assert jsd[0] < 0.05 and jsd[1] == pytest.approx(0.497, abs=0.01) and jsd[2] > 0.5 and max(jsd) <= math.log(2)


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift() -> None:
    a = np.random.default_rng(0).standard_normal((2000, 8))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.02)


# ---------------------------------------------------------------- networks and config


def test_modes_build_the_right_networks_and_bad_configs_are_refused() -> None:
    info = ring_info()
    assert sorted(SLSAGanFamily(SLSAGanConfig(), info).build_modules()) == ["classifier", "discriminator", "generator"]
    for mode in ("unconditional", "conditional"):
        assert sorted(SLSAGanFamily(SLSAGanConfig(mode=mode), info).build_modules()) == ["discriminator", "generator"]
    assert family_class("slsa_gan") is SLSAGanFamily
    digits = {"codec": {"name": "image"}, "image_shape": [8, 8, 1]}
    mods = SLSAGanFamily(SLSAGanConfig(latent_dim=16, hidden=32, num_clusters=10), digits).build_modules()
    z, y = torch.randn(3, 16), torch.tensor([0, -1, 9])
    x = mods["generator"](z, y)
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    assert mods["discriminator"](x, y).shape == (3,) and mods["classifier"](x).shape == (3, 10)
    sn = SLSAGanFamily(SLSAGanConfig(latent_dim=16, hidden=32, num_clusters=10, d_spectral_norm=True), digits)
    d_sn = sn.build_modules()["discriminator"]
    assert d_sn(x, y).shape == (3,) and any("parametrizations" in k for k in d_sn.state_dict())
    for bad, match in [({"mode": "semi"}, "mode"), ({"confidence": 1.5}, "confidence"),
                       ({"num_classes": 9, "num_clusters": 8}, "num_classes <= num_clusters"),
                       ({"d_steps": 0}, "d_steps"), ({"d_lr_scale": -1.0}, "d_lr_scale"),
                       ({"g_lr_scale": float("nan")}, "g_lr_scale"), ({"c_real_weight": -0.5}, "c_real_weight"),
                       ({"mode": "conditional", "num_classes": 4, "num_clusters": 8}, "conditional mode"),
                       ({"points_per_image": 0}, "points_per_image must be >= 1"),
                       ({"image_extent": -1.0}, "image_extent must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=match):
            SLSAGanConfig(**bad)
    with pytest.raises(ValueError, match="power-of-2"):
        SLSAGanFamily(SLSAGanConfig(arch="conv"), {"codec": {"name": "image"}, "image_shape": [6, 6, 1]})
    with pytest.raises(ValueError, match=r"model.arch mlp takes point data .* use model.arch conv"):
        SLSAGanFamily(SLSAGanConfig(arch="mlp"), digits)  # it failed at the first step, after Ray and DeepSpeed


def test_classifier_ema_lives_in_buffers_and_follows_the_net() -> None:
    clf = Classifier(mlp_trunk(2, 8, 1), 8, num_clusters=4, num_classes=4)
    assert not any(n.startswith("ema") for n, _ in clf.named_parameters())
    assert any(n.startswith("ema.") for n in clf.state_dict()) and "align" in clf.state_dict()
    ema0 = {n: b.clone() for n, b in clf.ema.named_buffers()}
    with torch.no_grad():
        for p in clf.net.parameters():
            p.add_(1.0)
    clf.update_ema(0.75)
    for n, p in clf.net.named_parameters():
        assert torch.allclose(dict(clf.ema.named_buffers())[n], 0.75 * ema0[n] + 0.25 * p)
    assert len(list(params_to_buffers(torch.nn.Linear(2, 2)).parameters())) == 0


def test_frozen_keeps_gradients_out_of_the_frozen_network() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    b.bias.requires_grad_(False)
    with frozen(b):
        b(a(torch.randn(4, 2))).sum().backward()
    assert all(p.grad is None for p in b.parameters()) and all(p.grad is not None for p in a.parameters())
    assert b.weight.requires_grad and not b.bias.requires_grad


# ---------------------------------------------------------------- labels


def test_labelled_share_is_uniform_and_stable() -> None:
    shares = [labelled_share(f"ring8-t{i:07d}", 0) for i in range(4000)]
    assert abs(np.mean(np.array(shares) < 0.1) - 0.1) < 0.02
    assert labelled_share("k", 0) == labelled_share("k", 0) != labelled_share("k", 1)


def test_latent_partition_gives_every_cell_a_fair_share() -> None:
    family = SLSAGanFamily(SLSAGanConfig(), ring_info())
    _, y = family.noise(40000, torch.Generator().manual_seed(0))
    share = np.bincount(y.numpy(), minlength=8) / 40000
    assert share.min() > 0.08 and share.max() < 0.17
    z, y2 = family.noise(5, torch.Generator().manual_seed(0))
    assert torch.equal(y2, (z @ family.anchors.T).argmax(1))


def _perfect_classifier(family: SLSAGanFamily, perm: torch.Tensor) -> Classifier:
    """A classifier whose EMA predicts perm[component] of a ring point, with confidence from a temperature."""
    clf = family.build_modules()["classifier"]
    centres = torch.tensor(family.mixture.centres, dtype=torch.float32)

    def ema(x: torch.Tensor) -> torch.Tensor:
        comp = torch.cdist(x, centres).argmin(1)
        logits = torch.full((len(x), family.config.num_clusters), -10.0)
        logits[torch.arange(len(x)), perm[comp]] = 10.0
        logits[: len(x) // 4] = 0.0  # a quarter of the points: no confident prediction
        return logits

    clf.ema.forward = ema
    return clf


def test_alignment_recovers_the_permutation_and_real_labels_follow_confidence() -> None:
    family = SLSAGanFamily(SLSAGanConfig(label_fraction=0.5, confidence=0.9), ring_info())
    perm = torch.tensor([3, 1, 7, 0, 2, 6, 4, 5])
    clf = _perfect_classifier(family, perm)
    batch = family.collate(ring_samples(400))
    batch["labelled"][: len(batch["x"]) // 4] = False  # the unconfident quarter carries no manual label here
    family.update_alignment(clf, batch, world_size=1)
    assert torch.equal(clf.align, torch.argsort(torch.argsort(perm)).new_tensor(perm.tolist()))
    y = family.real_labels(clf, batch, step=0)
    quarter = len(y) // 4
    assert (y[:quarter] == -1).all()  # unconfident and unlabelled: unconditional D term
    assert torch.equal(y[quarter:], perm[batch["label"][quarter:]])
    late = SLSAGanFamily(SLSAGanConfig(self_label_start=10), ring_info())
    assert (late.real_labels(_perfect_classifier(late, perm), family.collate(ring_samples(40)), step=3) == -1).all()


def test_conditional_mode_uses_every_label_and_unconditional_none() -> None:
    batch_samples = ring_samples(16)
    cond = SLSAGanFamily(SLSAGanConfig(mode="conditional"), ring_info())
    b = cond.collate(batch_samples)
    assert torch.equal(cond.real_labels(None, b, 0), b["label"])
    unc = SLSAGanFamily(SLSAGanConfig(mode="unconditional"), ring_info())
    assert (unc.real_labels(None, unc.collate(batch_samples), 0) == -1).all()
    assert (unc.noise(5, torch.Generator())[1] == -1).all()


# ---------------------------------------------------------------- steps


def test_train_step_updates_each_network_once_per_configured_step_and_g_never_touches_d() -> None:
    family = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, d_steps=3, g_steps=2, label_fraction=0.3),
                           ring_info())
    engines = plain_engines(family, OPTIM)
    counts = {k: 0 for k in engines}
    for name, e in engines.items():
        step = e.step

        def counted(name=name, step=step) -> None:
            counts[name] += 1
            d_params = list(engines["discriminator"].module.parameters())
            if name == "generator":
                assert all(p.grad is None for p in d_params)
            step()

        e.step = counted
    ctx = StepContext(step=0, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
    out = family.train_step(engines, family.collate(ring_samples(96)), ctx)
    assert counts == {"discriminator": 3, "generator": 2, "classifier": 1}
    assert list(out)[0] == "loss" and {"d_loss", "g_loss", "c_loss", "self_labelled"} <= set(out)
    assert engines["classifier"].module.align.min() >= 0  # labelled data seen: an alignment exists


def test_noise_is_a_function_of_step_and_rank() -> None:
    family = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8), ring_info())
    ctx = lambda step, rank: StepContext(step, rank, 2, torch.device("cpu"), torch.float32)  # noqa: E731
    draw = lambda c: torch.randn(3, generator=family._rng(c, 0))  # noqa: E731
    assert torch.equal(draw(ctx(5, 0)), draw(ctx(5, 0)))
    assert not torch.equal(draw(ctx(5, 0)), draw(ctx(5, 1))) and not torch.equal(draw(ctx(5, 0)), draw(ctx(6, 0)))


def test_self_labels_become_accurate_when_a_ring_is_learned_with_all_labels() -> None:
    """With every label known, the classifier learns the components through the alignment within a few
    hundred steps (a wide, easy ring keeps this fast); the samples cover every mode."""
    settings = {"std": 0.1, "scale": 2.0}
    family = SLSAGanFamily(SLSAGanConfig(hidden=64, latent_dim=16, label_fraction=1.0), ring_info(**settings))
    engines = plain_engines(family, OPTIM)
    train_plain(family, engines, InMemoryData(ring_samples(4000, **settings)), 500, 64)
    mods = {k: e.module for k, e in engines.items()}
    held = family.collate(ring_samples(1000, split="holdout", **settings))
    ev = family.evaluate(mods, held)
    assert ev["label_accuracy"] > 0.9 and ev["confident_share"] > 0.5
    x, y = family.generate(mods, 2000, torch.Generator().manual_seed(0))
    comp, _ = family.mixture.nearest(x.numpy())
    aligned = mods["classifier"].align.numpy()
    # G(z, y) lands in the component whose manual label is aligned with y for most draws.
    assert np.mean(aligned[comp] == y.numpy()) > 0.7
    pics = family.sample_images(mods, 3, torch.Generator().manual_seed(0))
    assert pics.shape == (3, 1, 64, 64) and 0 <= float(pics.min()) and float(pics.max()) <= 1
    assert family.sample_images(mods, 2, torch.Generator(), temperature=0.5, top_k=0, top_p=1.0).shape[0] == 2
    with pytest.raises(ValueError, match="no top_k"):
        family.sample_images(mods, 3, torch.Generator(), top_k=5)


def _bf16_like_deepspeed(engines) -> None:
    """What a bf16 DeepSpeed engine does to its module: parameters cast, buffers (EMA weights, spectral norm's
    power-iteration vectors, the label alignment) left as they are."""
    for engine in engines.values():
        for p in engine.module.parameters():
            p.data = p.data.to(torch.bfloat16)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_bf16_engines_train_evaluate_sample_and_play_the_gap_game(spectral_norm) -> None:
    family = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, label_fraction=0.5,
                                         d_spectral_norm=spectral_norm), ring_info())
    engines = plain_engines(family, OPTIM)
    _bf16_like_deepspeed(engines)
    batch = family.collate(ring_samples(64))
    ctx = StepContext(step=0, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.bfloat16)
    out = family.train_step(engines, batch, ctx)
    assert all(math.isfinite(v) for v in out.values()) and out["self_labelled"] > 0
    modules = {k: e.module for k, e in engines.items()}
    assert all(math.isfinite(v) for v in family.evaluate(modules, batch).values())
    assert family.sample_images(modules, 2, torch.Generator().manual_seed(0)).shape == (2, 1, 64, 64)
    game = family.gap_game(modules, batch)
    (g_in, fake_cond) = game.noise(4, torch.Generator().manual_seed(0))
    assert g_in[0].dtype == torch.bfloat16 and torch.isfinite(game.value(
        modules["generator"], modules["discriminator"], game.real("fit", torch.arange(4)), (g_in, fake_cond)))


def test_a_batch_of_padding_only_trains_and_evaluates_without_nan() -> None:
    """The eval stream pads a rank's last batch; a rank can get a batch with no real sample at all."""
    family = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, label_fraction=0.5), ring_info())
    engines = plain_engines(family, OPTIM)
    batch = family.collate(ring_samples(16))
    batch["valid"][:] = False
    ctx = StepContext(step=0, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
    assert all(math.isfinite(v) for v in family.train_step(engines, batch, ctx).values())
    assert all(math.isfinite(v) for v in family.evaluate({k: e.module for k, e in engines.items()}, batch).values())


def test_a_padded_batch_draws_as_many_fakes_as_a_full_one_and_reuses_no_real_sample(monkeypatch) -> None:
    """Fakes followed the rank's real count (so ranks of a padded last batch drew different numbers), and a D
    update left without reals (fewer reals than d_steps) trained on the whole batch again."""
    family = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, d_steps=4), ring_info())
    engines = plain_engines(family, OPTIM)
    batch = family.collate(ring_samples(16))
    batch["valid"][2:] = False  # 2 reals for 4 D updates
    drawn, reals = [], []
    noise = family.noise
    monkeypatch.setattr(family, "noise", lambda n, *a, **k: (drawn.append(n), noise(n, *a, **k))[1])
    forward = engines["discriminator"].module.forward
    monkeypatch.setattr(engines["discriminator"].module, "forward",
                        lambda x, y: (reals.append(len(x)), forward(x, y))[1])
    ctx = StepContext(step=0, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)
    assert all(math.isfinite(v) for v in family.train_step(engines, batch, ctx).values())
    assert set(drawn) == {4}  # 16 / 4 per update, padding or not
    assert reals[0::2][:4] == [1, 1, 0, 0]  # each D update's real input: the two reals once each


def test_labels_outside_the_classes_are_named_and_more_classes_than_cells_evaluate() -> None:
    eight = ring_samples(64)  # labels 0..7
    for cfg in (SLSAGanConfig(mode="conditional", num_clusters=4), SLSAGanConfig(num_clusters=4, label_fraction=0.5)):
        with pytest.raises(ValueError, match=r"sample ring8-t\d+: label [4-7] is outside the model's 4 classes"):
            SLSAGanFamily(cfg, ring_info()).collate(eight)
    # self-labelling without manual labels never reads them: K=4 cells on 8 modes trains, and evaluates with the
    # extra classes counted as misses (at most 4 of 8 classes can be matched)
    family = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, num_clusters=4), ring_info())
    batch = family.collate(eight)
    ev = family.evaluate({k: m for k, m in family.build_modules().items()}, batch)
    assert 0.0 < ev["label_accuracy"] <= 0.5 + 1e-9


def test_the_games_value_is_claimed_only_where_a_generator_can_match_the_real_pairs() -> None:
    """A real sample without a label gets only D's unconditional term while every fake carries its cell: D tells
    them apart even against a perfect G, so V* = -2 would inflate value_gap; it is then not claimed."""
    batch = lambda family: family.collate(ring_samples(64))  # noqa: E731
    uncond = SLSAGanFamily(SLSAGanConfig(mode="unconditional", hidden=16, latent_dim=8), ring_info())
    assert uncond.gap_game(uncond.build_modules(), batch(uncond)).game_value == -2.0
    selfl = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, confidence=1.0), ring_info())
    assert selfl.gap_game(selfl.build_modules(), batch(selfl)).game_value is None  # no confident self-label
    sure = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, confidence=0.0), ring_info())
    game = sure.gap_game(sure.build_modules(), batch(sure))  # every real sample labelled, by an untrained C
    real, fake = game.splits["eval"][1][0], sure.noise(1 << 16, torch.Generator().manual_seed(0))[1]
    tv = 0.5 * sum(abs(float((real == k).double().mean() - (fake == k).double().mean())) for k in range(8))
    assert tv > 0.1 and game.game_value == pytest.approx(-2.0 + 2 * tv)  # D wins the label frequencies' gap


def test_the_real_term_is_weighted_by_the_ranks_share_of_real_samples():
    """Every rank draws the same number of fakes, but a padded last batch leaves a rank fewer real samples: its
    real term is weighted by its share (StepContext.batch_share) so that the ranks' average is the mean over all
    real samples, as the other families' losses are."""
    fam = SLSAGanFamily(SLSAGanConfig(mode="unconditional", hidden=16, latent_dim=8), ring_info())
    d_real, d_fake = torch.tensor([0.5, -1.0]), torch.tensor([0.2, -0.4, 0.0])
    real_term, fake_term = float(F.relu(1 - d_real).mean()), float(F.relu(1 + d_fake).mean())
    assert float(fam.d_loss(d_real, d_fake)) == pytest.approx(real_term + fake_term)
    assert float(fam.d_loss(d_real, d_fake, torch.tensor(2.0))) == pytest.approx(2 * real_term + fake_term)
    assert float(fam.d_loss(d_real[:0], d_fake, torch.tensor(0.0))) == pytest.approx(fake_term)


def test_each_network_decays_over_the_whole_run_at_its_own_update_count() -> None:
    """Every engine.step() advances its scheduler: at 5 D updates a step, D's warm-up and cosine ended in a fifth
    of trainer.schedule.total_steps."""
    from sharding.zero import ScheduleConfig
    from trainer.loop import network_schedule

    family = SLSAGanFamily(SLSAGanConfig(d_steps=5, g_steps=1, c_steps=2), ring_info())
    assert [family.updates_per_step(n) for n in ("discriminator", "generator", "classifier")] == [5, 1, 2]
    run = ScheduleConfig(warmup_steps=10, total_steps=100, min_ratio=0.1)
    d = network_schedule(run, family.updates_per_step("discriminator"))
    assert network_schedule(run, 1) is run
    for step in (1, 10, 37, 100):  # D's update at the end of training step `step` runs at that step's rate
        assert d.ratio(5 * step) == pytest.approx(run.ratio(step), abs=0.02)
    assert d.ratio(5 * 50) > 0.5 and run.ratio(5 * 50) == pytest.approx(0.1)  # half-way for D, not at the floor


def test_sampling_an_export_with_broken_generator_weights_is_an_error(tmp_path, capsys) -> None:
    """A generator with NaN weights drew an all-black grid and exited 0; the samplers of the autoregressive
    families already refuse NaN logits."""
    from launch.cli import main
    from trainer.export import write_export

    digits = {"codec": {"name": "image"}, "image_shape": [8, 8, 1]}
    family = SLSAGanFamily(SLSAGanConfig(latent_dim=16, hidden=32, num_clusters=10), digits)
    states = {k: m.state_dict() for k, m in family.build_modules().items()}
    good = write_export(str(tmp_path / "good"), family, states)
    assert main(["sample", good, "--n", "4", "--out", str(tmp_path / "good.png")]) == 0
    weight = next(k for k, v in states["generator"].items() if v.is_floating_point() and v.dim() == 2)
    states["generator"][weight] = torch.full_like(states["generator"][weight], float("nan"))
    broken = write_export(str(tmp_path / "broken"), family, states)
    capsys.readouterr()
    assert main(["sample", broken, "--n", "4", "--out", str(tmp_path / "broken.png")]) == 2
    assert "the model draws non-finite pixels (NaN or inf)" in capsys.readouterr().err
    assert not (tmp_path / "broken.png").exists()


def _classifier_problem() -> tuple[SLSAGanFamily, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """C, 16 fakes with their cells, and 3 labelled reals with their aligned labels (all on rank 1 of two)."""
    fam = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8, label_fraction=0.1, c_real_weight=2.0), ring_info())
    torch.manual_seed(0)
    C = fam.build_modules()["classifier"]
    g = torch.Generator().manual_seed(1)
    return (fam, C, torch.randn(16, 2, generator=g), torch.randint(0, 8, (16,), generator=g),
            torch.randn(3, 2, generator=g), torch.tensor([1, 5, 6]))


def _classifier_grads(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of two: its 8 fakes and its labelled reals (none on rank 0), gradients averaged as DeepSpeed does."""
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        fam, C, fake, y_fake, known_x, known_y = _classifier_problem()
        ctx = StepContext(step=0, rank=rank, world_size=2, device=torch.device("cpu"), dtype=torch.float32)
        mine = slice(8 * rank, 8 * rank + 8)
        known_x, known_y = (known_x, known_y) if rank == 1 else (known_x[:0], known_y[:0])
        share = ctx.batch_share(torch.tensor(len(known_y)))
        fam.classifier_loss(C, fake[mine], y_fake[mine], known_x, known_y, share).backward()
        grads = [p.grad for p in C.parameters() if p.grad is not None]
        for grad in grads:
            dist.all_reduce(grad)
            grad /= 2
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_classifiers_labelled_real_term_does_not_depend_on_the_world_size(tmp_path):
    """An unweighted per-rank mean gave rank 1's 3 labelled reals half the weight they have on one rank (rank 0
    had none): C trained differently on 2 ranks than on 1."""
    import torch.multiprocessing as mp

    fam, C, fake, y_fake, known_x, known_y = _classifier_problem()
    fam.classifier_loss(C, fake, y_fake, known_x, known_y, torch.tensor(1.0)).backward()
    want = [p.grad for p in C.parameters() if p.grad is not None]
    mp.start_processes(_classifier_grads, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_trainer_seed_changes_the_noise_and_seed_0_draws_as_before():
    """The noise was seeded from model.seed alone: runs repeated with another trainer.seed drew the same noise."""
    fam = SLSAGanFamily(SLSAGanConfig(hidden=16, latent_dim=8), ring_info())

    def noise(seed: int, step: int = 5) -> torch.Tensor:
        ctx = StepContext(step=step, rank=1, world_size=2, device=torch.device("cpu"), dtype=torch.float32, seed=seed)
        return torch.randn(4, generator=fam._rng(ctx, 0))

    assert not torch.equal(noise(0), noise(12345)) and torch.equal(noise(7), noise(7))
    before = torch.randn(4, generator=torch.Generator().manual_seed(5 * 7919 + 104_729))  # model.seed 0, step 5
    assert torch.equal(noise(0), before)
