"""Text-to-image prior: loss weighting, causality under every layer's mask, KV-cached = recomputed, per-block gradient
scaling, prompts (truncation, unknown words), export with tokenizer + dVAE; one ZeRO-3 run on the Ray worker group."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from data_pipeline.caption_tokenizer import CaptionTokenizer
from data_pipeline.manifest import DatasetError, load_manifest
from data_pipeline.sources.shapes import ShapesConfig, ShapesSource
from trainer.dalle.dvae import DVAEConfig
from trainer.dalle.prior import DallePrior, PriorConfig, kind_losses
from trainer.dalle.token_data import write_token_dataset
from trainer.export import ExportError, load_export, write_export
from trainer.families.dalle import DalleFamily
from trainer.families.dvae import DVAEFamily
from trainer.loop import data_info
from trainer.transformer import TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES = {"resolution": 32, "min_objects": 1, "max_objects": 3}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A caption tokenizer, a random-init dVAE export (8x8 grid, 32 codes) and token shards for train and eval."""
    root = tmp_path_factory.mktemp("t2i")
    captions = [ShapesSource(ShapesConfig(num_samples=200, seed=9, **SCENES)).sample(i).caption for i in range(200)]
    tokenizer = CaptionTokenizer.train(captions, 320)
    torch.manual_seed(0)
    dvae = DVAEFamily(DVAEConfig(num_codes=32, width=8, blocks_per_group=1, decoder_init=8),
                      {"image_shape": [32, 32, 3]})
    dvae_export = write_export(str(root / "dvae"), dvae, {k: m.state_dict() for k, m in dvae.build_modules().items()})
    urls = {}
    for split, seed, n in (("train", 0, 96), ("eval", 1, 32)):
        urls[split] = str(root / split)
        write_token_dataset(urls[split], ShapesConfig(num_samples=n, seed=seed, **SCENES), tokenizer, dvae_export,
                            samples_per_shard=48)
    info = data_info(load_manifest(urls["train"]))
    assert info["dataset_url"] == urls["train"]  # the folder that holds tokenizer.model beside the manifest
    return {"root": root, "tokenizer": tokenizer, "dvae_export": dvae_export, **urls, "info": info}


def small(**kw) -> PriorConfig:
    layers = kw.pop("n_layer", 4)
    return PriorConfig(text_len=kw.pop("text_len", 10), conv_kernel=3,
                       transformer=TransformerConfig(n_layer=layers, n_head=2, d_model=32), **kw)


def prior(info: dict, seed: int = 0, **kw) -> tuple[DalleFamily, DallePrior]:
    torch.manual_seed(seed)
    fam = DalleFamily(small(**kw), info)
    return fam, fam.build_modules()["model"].eval()


def random_tokens(fam: DalleFamily, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(fam.text_vocab, (b, fam.text_len), generator=g)
    text[0, 6:] = fam.pad_id  # a short caption: PAD-filled
    image = torch.randint(fam.image_vocab, (b, fam.grid[0] * fam.grid[1]), generator=g)
    return text, image


def test_loss_is_normalised_per_kind_and_weighted_as_configured(world):
    """Hand computation: -log softmax at each target, averaged separately over text and image positions."""
    fam, model = prior(world["info"], text_loss_weight=0.3, image_loss_weight=0.6)
    text, image = random_tokens(fam, 2, seed=1)
    text_logits, image_logits = model(text, image)

    def mean_nll(logits, targets):
        out = []
        for b in range(logits.shape[0]):
            terms = []
            for t in range(logits.shape[1]):
                row = [float(x) for x in logits[b, t].detach()]
                log_z = math.log(sum(math.exp(x) for x in row))
                terms.append(log_z - row[int(targets[b, t])])
            out.append(sum(terms) / len(terms))
        return torch.tensor(out)

    text_ce, image_ce = kind_losses(text_logits, text, image_logits, image)
    torch.testing.assert_close(text_ce, mean_nll(text_logits, text), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_ce, mean_nll(image_logits, image), rtol=1e-5, atol=1e-5)
    assert text_logits.shape[1] == fam.text_len and image_logits.shape[1] == 64  # normalisers: 10 and 64 targets
    loss, t_loss, i_loss = (x.detach() for x in model.losses(text, image))
    torch.testing.assert_close(loss, 0.3 * mean_nll(text_logits, text) + 0.6 * mean_nll(image_logits, image))
    # The family's batch loss: invalid (padding) samples are left out of both kinds' means.
    batch = {"text": text, "image": image, "valid": torch.tensor([True, False])}
    metrics = fam.evaluate({"model": model}, batch)
    assert metrics["text_loss"] == pytest.approx(float(t_loss[0]), rel=1e-5)
    assert metrics["loss"] == pytest.approx(0.3 * float(t_loss[0]) + 0.6 * float(i_loss[0]), rel=1e-5)
    assert PriorConfig().text_loss_weight == 1 / 8 and PriorConfig().image_loss_weight == 7 / 8


@pytest.mark.parametrize("heads", ["separate", "joint"])
def test_position_t_never_sees_a_later_token(world, heads):
    """Under each layer's mask (row, row, column, conv) the logits at t are unchanged when tokens after t change."""
    fam, model = prior(world["info"], heads=heads)
    text, image = random_tokens(fam, 2, seed=2)
    held = torch.cat([torch.zeros(2, 1, dtype=torch.long), text, image[:, :-1]], dim=1)
    with torch.no_grad():
        base = model.hidden(held)
        for t in (0, 4, fam.text_len, fam.text_len + 3, fam.text_len + 12, held.shape[1] - 2):
            changed = held.clone()
            g = torch.Generator().manual_seed(t)
            for p in range(t + 1, held.shape[1]):
                vocab = fam.text_vocab if p <= fam.text_len else fam.image_vocab
                changed[:, p] = torch.randint(vocab, (2,), generator=g)
            out = model.hidden(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])  # later positions did see the change
    text_logits, image_logits = model.logits(base, 0)
    if heads == "joint":
        assert torch.isfinite(text_logits).all() and torch.isfinite(image_logits).all()
        joint = model.head(base).float()
        assert not torch.allclose(text_logits.logsumexp(-1), joint[:, : fam.text_len].logsumexp(-1))


@pytest.mark.parametrize("kw", [{"heads": "separate"}, {"heads": "joint", "grad_scaling": "per_block"},
                                {"n_layer": 6}])
def test_cached_steps_give_the_recomputed_logits(world, kw):
    fam, model = prior(world["info"], **kw)
    text, image = random_tokens(fam, 2, seed=3)
    with torch.no_grad():
        full_text, full_image = model(text, image)
        cache = model.stack.new_cache()
        held = torch.cat([torch.zeros(2, 1, dtype=torch.long), text], dim=1)
        h = model.hidden(held, 0, cache)  # the caption prefix in one call
        step_text, first_image = model.logits(h, 0)
        steps = [first_image]
        for k in range(image.shape[1] - 1):
            h = model.hidden(image[:, k: k + 1], fam.text_len + 1 + k, cache)  # one image token at a time
            steps.append(model.logits(h, fam.text_len + 1 + k)[1])
    torch.testing.assert_close(step_text, full_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full_image, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prompted", [True, False])
def test_kv_cached_sampling_draws_the_tokens_of_recomputation(world, prompted):
    fam, model = prior(world["info"])
    text = random_tokens(fam, 3, seed=4)[0] if prompted else torch.zeros(3, 0, dtype=torch.long)
    draws = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        draws.append(model.generate(text, g, temperature=1.0, top_k=20, top_p=0.95, use_cache=use_cache))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    caption, image = draws[0]
    assert image.shape == (3, 64) and int(image.max()) < fam.image_vocab
    if prompted:
        assert torch.equal(caption, text)
    else:  # drawn captions: once PAD, always PAD
        is_pad = caption == fam.pad_id
        assert torch.equal(is_pad, is_pad.cummax(dim=1).values)


def _grads(model: DallePrior, text: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.losses(text, image)[0].mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def on_mlp_grad(model: DallePrior, layer: int, fn):  # noqa: ANN001, ANN201
    """Run ``fn`` on the gradient of block ``layer``'s MLP output (its return value replaces the gradient)."""

    def forward_hook(module, inputs, out) -> None:  # noqa: ANN001
        out.register_hook(fn)

    return model.stack.blocks[layer].mlp.register_forward_hook(forward_hook)


def test_per_block_gradient_scaling_leaves_fp32_gradients_unchanged(world):
    fam, plain = prior(world["info"], seed=5)
    _, scaled = prior(world["info"], seed=5, grad_scaling="per_block")
    scaled.grad_scaler.log2_scales.copy_(torch.tensor([3, -2, 9, 14]))
    text, image = random_tokens(fam, 2, seed=5)
    expected, got = _grads(plain, text, image), _grads(scaled, text, image)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-8, msg=name)
    assert not scaled.grad_scaler.overflow.any()
    # Inside block 3 the backward really runs 2^14 larger: a hook on its MLP output sees the scaled gradient.
    seen = {}
    on_mlp_grad(scaled, 3, lambda g: seen.__setitem__("scaled", g.abs().max()))
    on_mlp_grad(plain, 3, lambda g: seen.__setitem__("plain", g.abs().max()))
    _grads(scaled, text, image), _grads(plain, text, image)
    assert float(seen["scaled"] / seen["plain"]) == pytest.approx(2.0**14, rel=1e-4)


def test_block_scales_beyond_fp16s_range_still_scale_fp16_gradients():
    """fp16 tops out at 65504: a block scale of 2^16 cast to fp16 was inf, which made every gradient of the block
    inf (and 0 * inf NaN), so the filter zeroed the block's and all lower blocks' gradients on a clean step."""
    from trainer.dalle.grad_scaling import _ScaleGrad, filtered_unscale

    x = torch.ones(3, dtype=torch.float16, requires_grad=True)
    scale = torch.tensor(2.0**16)
    (_ScaleGrad.apply(x, scale) * torch.tensor([0.0, 1e-3, -2e-4], dtype=torch.float16)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0] == 0
    overflow = torch.zeros(1, dtype=torch.bool)
    back = filtered_unscale(x.grad, scale, overflow, 0)
    torch.testing.assert_close(back, torch.tensor([0.0, 1e-3, -2e-4], dtype=torch.float16), rtol=1e-3, atol=0)
    assert not overflow.any()


def test_block_scales_back_off_on_overflow_and_grow_when_clean(world):
    fam, model = prior(world["info"], seed=6, grad_scaling="per_block", block_scale_init_log2=5,
                       block_scale_growth_interval=2)
    scaler = model.grad_scaler
    text, image = random_tokens(fam, 2, seed=6)
    def poison_first_token(g: torch.Tensor) -> torch.Tensor:  # an inf inside block 1's backward
        g = g.clone()
        g[0, 0, 0] = float("inf")
        return g

    poison = on_mlp_grad(model, 1, poison_first_token)
    grads = _grads(model, text, image)
    poison.remove()
    assert scaler.overflow.tolist() == [False, True, False, False]
    assert all(torch.isfinite(g).all() for g in grads.values())  # filtered: nothing non-finite escapes block 1
    assert grads["stack.blocks.0.mlp.0.weight"].abs().sum() > 0  # the blocks below still learn
    assert scaler.update() == [1]
    assert scaler.log2_scales.tolist() == [5, 4, 5, 5] and not scaler.overflow.any()
    _grads(model, text, image)
    assert scaler.update() == [] and scaler.log2_scales.tolist() == [6, 4, 6, 6]  # 2 clean steps for 0, 2, 3
    _grads(model, text, image)
    assert scaler.update() == [] and scaler.log2_scales.tolist() == [6, 5, 6, 6]  # block 1's 2nd clean step


def test_text_ids_truncate_pad_and_name_unknown_words(world):
    fam = DalleFamily(small(), world["info"])
    tok = world["tokenizer"]
    short = "a small red circle"
    ids, truncated, unknown = fam.text_ids(short)
    n = len(tok.encode(short))
    assert not truncated and unknown == [] and ids.shape == (10,)
    assert ids[:n].tolist() == tok.encode(short) and (ids[n:] == fam.pad_id).all()
    long = "a large blue square above a small red circle and a green triangle left of a purple zebra"
    ids, truncated, unknown = fam.text_ids(long)
    assert truncated and ids.tolist() == tok.encode(long)[:10] and unknown == ["zebra"]
    for empty in ("", "   "):  # no caption starts with padding in training: a prompt without tokens is refused
        with pytest.raises(ValueError, match="has no tokens"):
            fam.text_ids(empty)


def test_an_export_of_another_family_in_place_of_the_dvae_is_named(world, tmp_path):
    from trainer.dalle.tokenise_job import _dvae_export

    fam, model = prior(world["info"])
    not_a_dvae = write_export(str(tmp_path / "prior"), fam, {"model": model.state_dict()})
    with pytest.raises(DatasetError, match="is a 'dalle' export, not a dVAE"):
        _dvae_export(not_a_dvae)
    with pytest.raises(DatasetError, match="is a 'dalle' export, not the dVAE"):
        DalleFamily(small(), {**world["info"], "dvae_export": not_a_dvae}).dvae()
    weights, config, shape = _dvae_export(world["dvae_export"])
    assert len(weights) == len(config) == 64 and weights != config and len(shape) == 3


def test_the_shuffled_baseline_never_pairs_a_caption_with_itself():
    from trainer.dalle.faithfulness import other_captions

    texts = ["a red circle", "a red circle", "a blue square", "a red circle", "two shapes"]
    others = other_captions(texts)
    assert all(o != t for o, t in zip(others, texts, strict=True))
    assert others == ["a blue square", "a blue square", "a red circle", "two shapes", "a red circle"]
    with pytest.raises(ValueError, match="two different"):
        other_captions(["same", "same"])


def test_faithfulness_and_generate_refuse_sizes_they_cannot_serve(world):
    from trainer.dalle.faithfulness import evaluate, main

    with pytest.raises(ValueError, match="captions and candidates must be >= 1, got 0 and 8"):
        evaluate("prior", "clip", world["eval"], captions=0)  # checked before the exports are read
    with pytest.raises(SystemExit):
        main(["prior", "clip", world["eval"], "--candidates", "0"])
    fam, model = prior(world["info"])
    with pytest.raises(ValueError, match=r"text must be \[B, n <= text_len=\d+\] caption ids, got \(1, \d+\)"):
        model.generate(torch.zeros(1, fam.text_len + 1, dtype=torch.long))


def test_collate_truncates_pads_and_refuses_wrong_grids(world):
    fam = DalleFamily(small(text_len=4), world["info"])
    import numpy as np

    samples = [{"text": np.arange(7), "image_tokens": np.zeros(64, dtype=np.int64)},
               {"text": np.array([3]), "image_tokens": np.ones(64, dtype=np.int64), "valid": False}]
    batch = fam.collate(samples)
    assert batch["text"].tolist() == [[0, 1, 2, 3], [3, fam.pad_id, fam.pad_id, fam.pad_id]]
    assert batch["valid"].tolist() == [True, False]
    with pytest.raises(DatasetError, match="sample 'k7': 16 image tokens"):
        fam.collate([{"key": "k7", "text": np.arange(3), "image_tokens": np.zeros(16, dtype=np.int64)}])
    with pytest.raises(DatasetError, match="trains on token shards"):
        DalleFamily(small(), {"image_shape": [32, 32, 3], "codec": {"name": "image"}})
    with pytest.raises(ValueError, match="model.heads"):
        small(heads="both")


def test_export_carries_tokenizer_and_dvae_and_samples_from_a_prompt(world, tmp_path, capsys):
    fam, model = prior(world["info"])
    out = write_export(str(tmp_path / "export"), fam, {"model": model.state_dict()})
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
    assert os.path.exists(os.path.join(out, "dvae", "model.safetensors"))
    shutil.rmtree(world["dvae_export"] + "-moved", ignore_errors=True)
    os.rename(world["dvae_export"], world["dvae_export"] + "-moved")  # the export must not need the original
    try:
        loaded, modules, _ = load_export(out)
        images = loaded.sample_images(modules, 2, torch.Generator().manual_seed(0), prompt="a small red circle",
                                      top_k=10)
    finally:
        os.rename(world["dvae_export"] + "-moved", world["dvae_export"])
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(loaded.generate_tokens(modules, 2, g1, prompt=["a", "b"])[1],
                               fam.generate_tokens({"model": model}, 2, g2, prompt=["a", "b"])[1])
    from launch.cli import main  # an empty --prompt was taken for no prompt: the model drew its own captions

    assert main(["sample", out, "--prompt", "", "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "prompt '' has no tokens" in err and not os.path.exists(tmp_path / "s.png"), err


def test_an_export_that_would_not_load_back_never_replaces_a_good_one(world, tmp_path):
    """The bundled dVAE is copied, not re-checked, by export_files: a copy damaged on disk must not be published
    over the export that loads (it would only fail when someone samples)."""
    dvae = shutil.copytree(world["dvae_export"], tmp_path / "dvae")
    info = {**world["info"], "dvae_export": str(dvae)}
    fam, model = prior(info)
    out = write_export(str(tmp_path / "export"), fam, {"model": model.state_dict()}, {"step": 1})
    with open(dvae / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 64)
    with pytest.raises(ExportError, match=rf"^{out}: the new export does not load back, nothing was replaced "
                                          rf"\({out}/dvae/model.safetensors: sha256 does not match"):
        write_export(out, prior(info)[0], {"model": model.state_dict()}, {"step": 2})
    assert load_export(out)[2]["step"] == 1 and sorted(os.listdir(tmp_path)) == ["dvae", "export"]


def test_held_out_tokens_of_another_dvae_are_refused_before_training(world):
    fam = DalleFamily(small(), world["info"])
    eval_info = data_info(load_manifest(world["eval"]))
    fam.check_eval_data(eval_info, world["eval"])  # one dVAE and tokenizer for both splits: fine
    other = {**eval_info, "dvae_weights_sha256": "0" * 64}
    with pytest.raises(DatasetError, match=r"data.eval .*eval: tokenised differently from the training data "
                                           r"\(dvae_weights_sha256 '0000"):
        fam.check_eval_data(other, world["eval"])


def test_a_tokenizer_that_does_not_match_training_is_refused(world, tmp_path):
    fam, model = prior(world["info"])
    out = write_export(str(tmp_path / "export"), fam, {"model": model.state_dict()})
    other = CaptionTokenizer.train(["a zebra", "two zebras", "three tall giraffes"], 280)
    other.save(os.path.join(out, "tokenizer.model"))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["files"]["tokenizer.model"] = other.sha256  # consistent files, wrong tokenizer
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ExportError, match=f"tokenizer sha256 {other.sha256} .*recorded at training "
                                          f"\\({world['tokenizer'].sha256}\\)"):
        load_export(out)
    bad_info = {**world["info"], "tokenizer": {**world["info"]["tokenizer"], "sha256": "0" * 64}}
    with pytest.raises(DatasetError, match=f"{world['tokenizer'].sha256} does not match .*{'0' * 64}"):
        DalleFamily(small(), bad_info).text_ids("a red circle")


@pytest.mark.slow
def test_zero3_on_the_ray_worker_group_trains_exports_and_samples(ray_local, world, tmp_path):
    from launch.config import load_config
    from launch.export import export_checkpoint
    from launch.train import run_training

    run, steps = str(tmp_path / "run"), 10
    cfg, raw = load_config(os.path.join(ROOT, "configs", "t2i_prior.yaml"), [
        f"run_dir={run}", f"data.train={world['train']}", f"data.eval={world['eval']}", f"trainer.steps={steps}",
        "trainer.log_every=5", f"trainer.eval_every={steps}", f"trainer.sample_every={steps}",
        f"trainer.checkpoint_every={steps}", "trainer.eval_batches=1", "trainer.num_samples=2",
        f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=1", "trainer.optim.lr=0.003",
        "data.stream.global_batch=16", "data.stream.shuffle_block=32", "data.stream.partitions=4",
        "model.text_len=12", "model.grad_scaling=per_block", "model.transformer.d_model=32",
        "model.transformer.n_head=2", "model.transformer.n_layer=3",
    ])
    assert cfg.zero.stage == 3
    run_training(cfg, raw)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert train[-1]["loss"] < train[0]["loss"] - 0.3 and all(r["block_overflows"] == 0 for r in train)
    assert any(r["split"] == "eval" and 0 < r["image_loss"] < math.log(32) + 0.5 for r in records)
    assert os.path.exists(os.path.join(run, "samples", f"step-{steps:08d}.png"))
    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(run, "checkpoints"), out)
    fam, modules, _ = load_export(out)
    assert fam.sample_images(modules, 2, torch.Generator().manual_seed(0), prompt="a red circle").shape == \
        (2, 3, 32, 32)
