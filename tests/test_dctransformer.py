"""DCTransformer: chunking, no leak into the encoder, masks, KV-cached sampling, export; one real-stack run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.codecs import dct_codec
from data_pipeline.codecs.dct_config import DCTCodecConfig
from data_pipeline.sources.shapes import ShapesConfig, ShapesSource
from trainer.dct.chunks import channel_mask, chunk_rows, position_mask, triple_nll, value_mask
from trainer.dct.model import DecoderSizes
from trainer.dct.sampling import DrawSettings
from trainer.export import load_export, write_export
from trainer.families.dctransformer import DCTransformerConfig, DCTransformerFamily
from trainer.transformer import TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODEC = DCTCodecConfig(resolution=32, quality=50, value_range=64)
INFO = {"codec": {"name": "dct", "settings": CODEC.to_dict()},
        "source": {"name": "shapes", "settings": {"num_samples": 64, "resolution": 32, "seed": 3}}}


def small(**kw) -> DCTransformerConfig:
    return DCTransformerConfig(encoder=TransformerConfig(n_layer=1, n_head=2, d_model=32),
                               decoders=DecoderSizes(1, 1, 1), **kw)


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    src = ShapesSource(ShapesConfig(num_samples=16, resolution=32, seed=5))
    samples = [src.sample(i) for i in range(6)]
    seqs = dct_codec.encode([s.image for s in samples], CODEC)
    return [{"tokens": t, "label": s.label, "image": s.image} for t, s in zip(seqs, samples, strict=True)]


def family(**kw) -> tuple[DCTransformerFamily, torch.nn.Module]:
    torch.manual_seed(0)
    fam = DCTransformerFamily(small(**kw), INFO)
    return fam, fam.build_modules()["model"].eval()


@pytest.mark.parametrize("mode", ["unconditional", "colourise", "superres"])
def test_one_chunk_covering_the_sequence_gives_the_exact_sequence_nll(scenes, mode):
    fam, model = family(chunk_size=400, mode=mode, num_classes=7)
    batch = fam.collate(scenes)
    assert int(batch["lengths"].max()) <= 400
    with torch.no_grad():
        starts = fam.random_starts(batch["lengths"], seed=1)
        assert starts.eq(0).all()
        one_chunk = fam.chunk_nll(model, batch, starts)[0].sum(dim=1)
        whole = fam.sequence_nll(model, batch)
    torch.testing.assert_close(one_chunk, whole)
    # The same weights chunked into 16-triple pieces score every triple once: a finite total of the same order.
    fam16 = DCTransformerFamily(small(chunk_size=16, mode=mode, num_classes=7), INFO)
    m16 = fam16.build_modules()["model"].eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("chunk_pos")}
    m16.load_state_dict({**m16.state_dict(), **state})
    with torch.no_grad():
        chunked = fam16.sequence_nll(m16, batch)
    assert torch.isfinite(chunked).all()


def test_the_training_loss_is_an_unbiased_estimate_of_the_whole_sequences_nll(scenes):
    """One chunk per image, chosen uniformly among its n: weighted by n, the chunk's NLL averages to the image's.
    Unweighted (as before) the objective was sum_i NLL_i / n_i, which favours short sequences (fewer objects)."""
    fam, model = family(chunk_size=24)
    batch = fam.collate(scenes)
    lengths = batch["lengths"]
    n_chunks = (lengths + 23) // 24
    assert len(set(n_chunks.tolist())) > 1  # images of different chunk counts, or there is nothing to weigh
    with torch.no_grad():
        per_chunk = torch.stack([fam.chunk_nll(model, batch, torch.full_like(lengths, 24 * k))[0]
                                 for k in range(int(n_chunks.max()))], dim=1)  # [B, K, T]
        exact = float(fam.sequence_nll(model, batch).sum() / lengths.sum())
    rows = torch.arange(len(lengths))
    estimates = [float(fam.chunk_loss(per_chunk[rows, fam.random_starts(lengths, seed) // 24], batch))
                 for seed in range(4000)]
    mean, spread = float(np.mean(estimates)), float(np.std(estimates)) / np.sqrt(len(estimates))
    assert abs(mean - exact) < 4 * spread + 1e-6, (mean, exact, spread)
    unweighted = float((per_chunk.sum(2).sum(1) / n_chunks).sum() / lengths.sum())  # the old objective's mean
    assert exact - unweighted > 20 * spread  # which the test tells apart


def test_chunk_loss_equals_the_triple_by_triple_cached_reference(scenes):
    """Teacher forcing through the sampler's KV-cache path reproduces the batched chunk logits' NLL."""
    fam, model = family(chunk_size=24)
    model = model.double()
    batch = fam.collate(scenes[:2])
    starts = torch.tensor([24, 48])
    with torch.no_grad():
        nll, target = fam.chunk_nll(model, batch, starts)
        ch = fam.chunk_batch(batch, starts)
        memory = model.encode(ch["dense"].double())
        caches = [model.channel_dec.new_cache(), model.position_dec.new_cache(), model.value_dec.new_cache()]
        ref = torch.zeros_like(nll)
        for j in range(24):
            prev, tgt = ch["prev"][:, j:j + 1], ch["target"][:, j:j + 1]
            h_c = model.channel_hidden(memory, prev, j, caches[0])
            h_p = model.position_hidden(memory, h_c, tgt[..., 0], caches[1])
            h_v = model.value_hidden(memory, h_p, tgt[..., 0], tgt[..., 1], caches[2])
            logits = (model.channel_head(h_c), model.position_head(h_p), model.value_head(h_v))
            ref[:, j] = triple_nll(logits, prev, tgt, fam.space)[:, 0]
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    assert target.shape == (2, 24, 3)


def test_no_triple_of_the_chunk_or_after_reaches_the_encoder(scenes):
    fam, _ = family(chunk_size=16)
    batch = fam.collate(scenes)
    rng = np.random.default_rng(0)
    for trial in range(20):
        starts = torch.tensor([int(rng.integers(0, int(n))) for n in batch["lengths"]])
        before = fam.chunk_batch(batch, starts)["dense"]
        changed = {**batch, "tokens": batch["tokens"].clone()}
        for b, s in enumerate(starts.tolist()):
            n = int(batch["lengths"][b]) - 1  # rows s..n-1 are regular triples of the chunk or after it
            if s < n:
                rows = torch.arange(s, n)
                changed["tokens"][b, rows, 2] = torch.randint(0, 2 * CODEC.value_range, (len(rows),))
                changed["tokens"][b, rows, 1] = torch.randint(0, CODEC.num_positions, (len(rows),))
                changed["tokens"][b, rows, 0] = torch.randint(0, 384, (len(rows),))
        after = fam.chunk_batch(changed, starts)["dense"]
        assert torch.equal(before, after), trial
    # ...while a triple just before the chunk does reach it.
    starts = torch.full_like(batch["lengths"], 10)
    changed = {**batch, "tokens": batch["tokens"].clone()}
    changed["tokens"][:, 9, 2] = (changed["tokens"][:, 9, 2] + 1) % (2 * CODEC.value_range)
    assert not torch.equal(fam.chunk_batch(batch, starts)["dense"], fam.chunk_batch(changed, starts)["dense"])


@pytest.mark.parametrize("mode", ["unconditional", "colourise"])
def test_masks_never_mask_the_true_next_token(scenes, mode):
    fam, _ = family(chunk_size=7, mode=mode)
    batch = fam.collate(scenes)
    tokens, space = batch["tokens"], fam.space
    for start in range(0, tokens.shape[1], 7):
        prev, target = chunk_rows(tokens, torch.full((tokens.shape[0],), start), 7, space)
        real = target[..., 0] != space.c_pad
        c, p, v = target.unbind(-1)
        cm = channel_mask(prev, space, fam.allowed)
        assert cm.gather(-1, c.clamp(max=385)[..., None])[..., 0][real].all()
        pm = position_mask(prev, c, space)
        assert pm.gather(-1, p.clamp(max=space.p_pad)[..., None])[..., 0][real].all()
        vm = value_mask(c, space)
        assert vm.gather(-1, v.clamp(max=space.v_pad)[..., None])[..., 0][real].all()
        assert (cm.any(-1) & pm.any(-1) & vm.any(-1)).all()
    # and it does mask: after (channel 10, last position), channels <= 10 are impossible
    prev = torch.tensor([[[10, space.num_positions - 1, 3]]])
    assert not channel_mask(prev, space)[0, 0, :11].any()


def test_kv_cached_sampling_draws_the_tokens_of_prefix_recomputation():
    fam, model = family(chunk_size=8, num_classes=7, max_triples=20)
    model = model.double()
    kw = {"labels": [2, 5], "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    cached, _ = fam.sample_tokens(model, 2, torch.Generator().manual_seed(3), use_cache=True, **kw)
    full, _ = fam.sample_tokens(model, 2, torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert cached.shape[1] > 8  # crossed a chunk boundary
    assert torch.equal(cached, full)
    rows = cached[0]
    end = rows[:, 0] >= 384
    body = rows[: int(end.float().argmax()) if end.any() else len(rows)]
    dc, dp = body[1:, 0] - body[:-1, 0], body[1:, 1] - body[:-1, 1]
    assert ((dc > 0) | ((dc == 0) & (dp > 0))).all()


@pytest.mark.parametrize("mode", ["unconditional", "colourise", "superres"])
def test_sampler_scores_each_triple_as_training_does_across_chunks(scenes, mode, monkeypatch):
    """Replaying a data sequence through ``generate`` (chunk after chunk: the encoder rebuilt from the triples
    drawn so far, the decoders' caches restarted) gives every triple the log-probability the training loss gives
    it: sampling draws from the distribution that was trained."""
    import trainer.dct.sampling as sampling

    fam, model = family(chunk_size=16, mode=mode, num_classes=7)
    model = model.double()
    batch = fam.collate(scenes)
    tokens, lengths = batch["tokens"], batch["lengths"]
    longest = int(lengths.max())
    assert longest > 3 * 16  # several chunks
    with torch.no_grad():
        trained = torch.cat([fam.chunk_nll(model, batch, torch.full_like(lengths, s))[0]
                             for s in range(0, longest, 16)], dim=1)[:, :longest]
    seen: list[torch.Tensor] = []
    real_draw = sampling.sample_logits

    def spy(logits, *args):
        seen.append(torch.log_softmax(logits.double(), -1))
        return real_draw(logits, *args)

    monkeypatch.setattr(sampling, "sample_logits", spy)
    given = None if mode == "unconditional" else np.stack([s["image"] for s in scenes])
    cond = fam.sampling_condition(model, len(scenes), labels=batch["labels"].tolist(), images=given)
    teacher = torch.cat([tokens, torch.tensor(fam.space.pad).repeat(len(scenes), 8, 1)], dim=1)
    sampling.generate(model, len(scenes), fam.space, 16, longest + 8, cond, DrawSettings(),
                      torch.Generator().manual_seed(0), teacher=teacher)
    replayed = torch.zeros_like(trained)
    for t in range(longest):
        for k, logp in enumerate(seen[3 * t: 3 * t + 3]):
            tok = tokens[:, t, k].clamp(max=logp.shape[-1] - 1)
            replayed[:, t] -= logp.gather(1, tok[:, None])[:, 0]
    real = tokens[:, :longest, 0] != fam.space.c_pad
    torch.testing.assert_close(replayed[real], trained[real], rtol=1e-6, atol=1e-6)


def test_completion_keeps_the_given_rows_and_draws_the_rest(scenes):
    """``teacher_rows`` replays a sequence's start (across a chunk boundary) and draws what follows from the
    model; the same generator gives the same completion, and without the limit the whole sequence is replayed."""
    from trainer.dct.sampling import generate

    fam, model = family(chunk_size=16)
    tokens = fam.collate(scenes)["tokens"]
    n, limit = len(scenes), tokens.shape[1] + 8
    teacher = torch.cat([tokens, torch.tensor(fam.space.pad).repeat(n, 8, 1)], dim=1)
    cond = fam.sampling_condition(model, n)

    def complete(rows: int | None) -> torch.Tensor:
        return generate(model, n, fam.space, 16, limit, cond, DrawSettings(), torch.Generator().manual_seed(0),
                        teacher=teacher, teacher_rows=rows)

    done = complete(20)
    assert torch.equal(done[:, :20], tokens[:, :20])
    assert not torch.equal(done[:, 20:24], tokens[:, 20:24])  # an untrained model does not redraw the data
    assert torch.equal(done, complete(20))
    replayed = complete(None)
    assert torch.equal(replayed[:, : tokens.shape[1]], tokens[:, : replayed.shape[1]])


def test_value_draw_settings_change_the_values_only():
    assert DrawSettings(0.7, 5, 0.9).for_values() == DrawSettings(0.7, 5, 0.9)
    assert DrawSettings(0.7, 5, 0.9, value_temperature=1.0, value_top_p=1.0).for_values() == DrawSettings(1.0, 5, 1.0)
    fam, model = family(chunk_size=8, max_triples=3)
    greedy, _ = fam.sample_tokens(model, 16, torch.Generator().manual_seed(0), temperature=0.0)
    mixed, _ = fam.sample_tokens(model, 16, torch.Generator().manual_seed(0), temperature=0.0, value_temperature=1.0)
    assert (greedy[:, 0, 0] < 384).all()  # the first triple is a regular coefficient, so its value is drawn
    assert torch.equal(greedy[:, 0, :2], mixed[:, 0, :2])  # where it goes is still the argmax
    assert not torch.equal(greedy[:, 0, 2], mixed[:, 0, 2])  # its value is now sampled
    again, _ = fam.sample_tokens(model, 16, torch.Generator().manual_seed(0), temperature=0.0, value_temperature=0.0)
    assert torch.equal(again, greedy)


@pytest.mark.parametrize("mode", ["unconditional", "colourise", "superres"])
def test_export_load_sample(tmp_path, mode):
    fam, model = family(chunk_size=16, mode=mode, max_triples=40)
    out = write_export(str(tmp_path / "export"), fam, {"model": model.state_dict()})
    fam2, modules, cfg = load_export(out)
    assert cfg["data_info"]["codec"]["settings"]["quality"] == 50
    images = fam2.sample_images(modules, 3, torch.Generator().manual_seed(0), temperature=0.8)
    assert images.shape == (3, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1
    if mode == "colourise":  # the given luma survives: grey levels of the sample match the condition's luma
        src = fam2.source_images(3).astype(np.float32)
        y_src = src @ np.array([0.299, 0.587, 0.114])
        y_out = (images.permute(0, 2, 3, 1).numpy() * 255) @ np.array([0.299, 0.587, 0.114])
        assert np.abs(y_src - y_out).mean() < 20


def test_dgm_sample_cli_from_an_export(tmp_path, capsys, monkeypatch):
    fam, model = family(chunk_size=16, max_triples=30)
    out = write_export(str(tmp_path / "export"), fam, {"model": model.state_dict()})
    png = str(tmp_path / "s.png")
    subprocess.run([sys.executable, "-m", "launch.cli", "sample", out, "--out", png, "--n", "2", "--top-k", "20"],
                   cwd=ROOT, check=True, capture_output=True)
    assert os.path.getsize(png) > 100
    from launch.cli import main

    assert main(["sample", out, "--out", png, "--n", "1", "--mean-of", "2"]) == 2  # unconditional: refused
    os.remove(png)
    import trainer.families.dctransformer as dct_family

    drawn_with: list[DrawSettings] = []

    class Recorded(DrawSettings):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            drawn_with.append(self)

    monkeypatch.setattr(dct_family, "DrawSettings", Recorded)
    assert main(["sample", out, "--out", png, "--n", "2", "--top-p", "0.8", "--value-top-p", "1.0"]) == 0
    assert os.path.getsize(png) > 100
    assert [(d.top_p, d.value_top_p, d.value_temperature) for d in drawn_with] == [(0.8, 1.0, None)]
    # another family has no separate value draw: refused by name, not a TypeError deep inside
    from trainer.families.image_gpt import ImageGPTConfig, ImageGPTFamily

    igpt = ImageGPTFamily(ImageGPTConfig(transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16)), {})
    other = write_export(str(tmp_path / "igpt"), igpt, {k: m.state_dict() for k, m in igpt.build_modules().items()})
    assert main(["sample", other, "--out", png, "--n", "1", "--value-top-p", "1.0"]) == 2
    assert ("'image_gpt' export does not take --value-top-p (it takes --temperature, --top-k, --top-p, --labels)"
            in capsys.readouterr().err)
    assert main(["sample", other, "--out", png, "--n", "1", "--mean-of", "2", "--images", png]) == 2
    assert "'image_gpt' export does not take --images, --mean-of" in capsys.readouterr().err
    # a grid written over the export's own weights destroyed them: only a .png path is taken
    weights = os.path.join(out, "model.safetensors")
    before = open(weights, "rb").read()
    assert main(["sample", out, "--out", weights, "--n", "1"]) == 2
    assert f"--out {weights}: the sample grid is a PNG; give a path ending in .png" in capsys.readouterr().err
    assert open(weights, "rb").read() == before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="codec 'dct'.*codec is 'image'"):
        DCTransformerFamily(small(), {"codec": {"name": "image", "settings": {}}})
    with pytest.raises(ValueError, match=r"codec is not named \(no data_info.codec\)"):
        DCTransformerFamily(small(), {})
    with pytest.raises(ValueError, match="model.mode"):
        small(mode="inpaint")
    with pytest.raises(ValueError, match="model.superres_target"):
        small(mode="superres", superres_target="delta")
    fam = DCTransformerFamily(small(num_classes=3), INFO)
    with pytest.raises(ValueError, match="label in 0..2"):
        fam.collate([{"tokens": np.array([[384, CODEC.num_positions, 128]], dtype=np.int16), "label": 5}])


def test_a_held_out_set_under_other_dct_settings_is_refused():
    """It was scored under the training codec: another quality without a word, another size or value range
    failed at the first eval as a corrupt sample. How images were brought to size is no difference."""
    from data_pipeline.manifest import DatasetError

    fam = DCTransformerFamily(small(), INFO)
    for change, said in ((dict(quality=90), "quality 90 vs the training data's 50"),
                         (dict(resolution=48), r"resolution \(48, 48\) vs the training data's \(32, 32\)"),
                         (dict(value_range=256), "value_range 256 vs the training data's 64")):
        other = DCTCodecConfig(**{**dict(resolution=32, quality=50, value_range=64), **change})
        with pytest.raises(DatasetError, match=rf"data.eval s3://b/ev: coded with other DCT settings than the "
                                               rf"training data \({said}\)"):
            fam.check_eval_data({"codec": {"name": "dct", "settings": other.to_dict()}}, "s3://b/ev")
    with pytest.raises(DatasetError, match="data.eval s3://b/ev: dctransformer trains on DCT shards"):
        fam.check_eval_data({"codec": {"name": "image", "settings": {}}}, "s3://b/ev")
    cropped = DCTCodecConfig(resolution=32, quality=50, value_range=64, size_policy="crop", alpha="drop")
    fam.check_eval_data({"codec": {"name": "dct", "settings": cropped.to_dict()}}, "s3://b/ev")


def test_a_training_grid_larger_than_the_held_out_source_goes_through_it_again():
    """A colourisation run with 9 held-out scenes and the default 16-draw grid failed at its first grid (and at
    every resume) with advice for `dgm sample`."""
    info = {**INFO, "eval_source": {"name": "shapes", "settings": {"num_samples": 9, "resolution": 32, "seed": 1}}}
    fam = DCTransformerFamily(small(mode="colourise"), info)
    images = fam.source_images(16)
    assert images.shape == (16, 32, 32, 3)
    assert np.array_equal(images[9:], images[:7]) and not np.array_equal(images[0], images[1])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["dct_shapes.yaml", "dct_shapes_zero3.yaml"])
def test_real_stack_trains_exports_and_samples(ray_local, tmp_path, config):
    from data_pipeline.prepare import PrepareConfig, prepare_dataset
    from launch.config import load_config
    from launch.export import export_checkpoint
    from launch.train import run_training

    data = {}
    # 9 held-out scenes in global batches of 8 over 4 partitions: rank 0's second eval batch is padding only; it
    # still runs its forward (under ZeRO-3 a forward may gather parameters, a collective) and counts for nothing
    for split, seed, n in (("train", 0, 96), ("eval", 1, 9)):
        url = str(tmp_path / split)
        prepare_dataset(PrepareConfig(output=url, source="shapes", codec="dct", parallel=False,
                                      source_settings={"num_samples": n, "resolution": 32, "seed": seed,
                                                       "max_objects": 4},
                                      codec_settings={"resolution": 32, "quality": 50, "value_range": 256},
                                      samples_per_shard=48), report=lambda _: None)
        data[split] = url
    run = str(tmp_path / "run")
    steps = 4
    cfg, raw = load_config(os.path.join(ROOT, "configs", config), [
        f"run_dir={run}", f"data.train={data['train']}", f"data.eval={data['eval']}", f"trainer.steps={steps}",
        "trainer.log_every=2", f"trainer.eval_every={steps}", f"trainer.sample_every={steps}",
        f"trainer.checkpoint_every={steps}", "trainer.eval_batches=2", "trainer.num_samples=2",
        f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=1", "data.stream.global_batch=8",
        "data.stream.shuffle_block=32", "data.stream.partitions=4", "model.max_triples=40",
        "model.encoder.d_model=32", "model.encoder.n_head=2", "model.encoder.n_layer=1",
    ])
    run_training(cfg, raw)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, steps + 1))
    assert any(r["split"] == "eval" and r["bits_per_image"] > 0 for r in records)
    assert os.path.exists(os.path.join(run, "samples", f"step-{steps:08d}.png"))
    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(run, "checkpoints"), out)
    fam, modules, _ = load_export(out)
    assert fam.sample_images(modules, 2, torch.Generator().manual_seed(0)).shape == (2, 3, 32, 32)


def test_encoder_attends_both_ways_over_the_grid():
    """Every macroblock's encoding depends on every other one (a causal mask would hide later positions)."""
    fam = DCTransformerFamily(small(), {**INFO, "codec": {"name": "dct", "settings": DCTCodecConfig(
        resolution=48, quality=50, value_range=64).to_dict()}})
    torch.manual_seed(0)
    model = fam.build_modules()["model"].eval()
    dense = torch.zeros(1, 384, fam.space.num_positions)
    changed = dense.clone()
    changed[0, 0, -1] = 5.0  # the DC of the last macroblock
    with torch.no_grad():
        a, b = model.encode(dense), model.encode(changed)
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_superres_hint_is_the_bicubic_upsample_and_reaches_the_value_decoder_at_its_coefficient(scenes):
    from PIL import Image

    fam, model = family(chunk_size=16, mode="superres")
    images = np.stack([s["image"] for s in scenes[:2]])
    small = images.reshape(2, 16, 2, 16, 2, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    assert np.array_equal(fam.low_resolution(images), small)
    hint = fam.superres_hint(small)
    up = [np.asarray(Image.fromarray(s).resize((32, 32), Image.BICUBIC)) for s in small]
    coded = dct_codec.encode(up, CODEC)[0][:-1]  # the bicubic image's own sequence: the hint's non-zeros
    dense = hint[0].numpy()
    assert np.count_nonzero(dense) == len(coded)
    values = CODEC.vocab.token_to_value(coded[:, 2])
    assert np.array_equal(dense[coded[:, 0], coded[:, 1]], np.clip(values, -64, 64))
    c, p = torch.from_numpy(coded[None, :, 0].astype(np.int64)), torch.from_numpy(coded[None, :, 1].astype(np.int64))
    ids = model.hint_tokens(hint[:1], c, p)
    assert torch.equal(ids[0], torch.from_numpy(coded[:, 2].astype(np.int64)))  # the codec's own value ids
    assert int(model.hint_tokens(hint[:1], torch.tensor([[383]]), torch.tensor([[0]]))) == 2 * 64 or \
        dense[383, 0] != 0


def test_dense_to_sequence_inverts_dense_before_on_codec_sequences(scenes):
    from trainer.dct.chunks import dense_before, dense_to_sequence, pad_batch

    fam = DCTransformerFamily(small(), INFO)
    for s in scenes:
        seq = torch.from_numpy(s["tokens"].astype(np.int64))
        dense = dense_before(pad_batch([seq], fam.space), torch.tensor([len(seq)]), fam.space)[0]
        assert torch.equal(dense_to_sequence(dense, fam.space), seq)


@pytest.mark.parametrize("target", ["residual", "full"])
def test_superres_targets_reconstruct_the_coded_image_and_residual_is_shorter(scenes, target):
    """Given hint + the residual sequence (or the full sequence alone) decodes to the codec's own image."""
    from trainer.dct.sampling import Conditioning

    fam = DCTransformerFamily(small(mode="superres", superres_target=target), INFO)
    seqs = [torch.from_numpy(s["tokens"].astype(np.int64)) for s in scenes]
    images = np.stack([s["image"] for s in scenes])
    batch = fam.conditioning(seqs, None, images)
    given = batch.get("cond_dense")
    assert (given is not None) == (target == "residual")
    rgb = fam.tokens_to_rgb(batch["tokens"], Conditioning(dense=given))
    assert np.array_equal(rgb, dct_codec.decode([s["tokens"] for s in scenes], CODEC))
    if target == "residual":  # bicubic already explains most coefficients
        assert torch.equal(given, batch["hint"].round())
        assert batch["lengths"].float().mean() < 0.8 * np.mean([len(s) for s in seqs])


def test_superres_residual_stopping_at_once_returns_the_hint():
    """A residual model that emits EOS first leaves the bicubic hint through the codec, not a blank image."""
    fam, model = family(chunk_size=16, mode="superres", max_triples=1)
    src = fam.source_images(2)
    out = (fam.sample_images({"model": model}, 2, torch.Generator().manual_seed(0), images=src,
                             temperature=0.0).permute(0, 2, 3, 1).numpy() * 255).round()
    coded = dct_codec.decode(dct_codec.encode(list(src), CODEC), CODEC)  # full-size images go through the codec
    hint = fam.superres_hint(fam.low_resolution(coded)).round().numpy().astype(np.int16).reshape(2, 384, *CODEC.grid)
    from data_pipeline.codecs.dct_transform import dct_image_to_rgb

    expected = dct_image_to_rgb(hint, CODEC.quality, upsampling=CODEC.upsampling, channels_last=False)
    assert np.array_equal(out.astype(np.uint8), expected)
    assert expected.std() > 5  # the scenes' objects are there


def test_mean_of_draws_averages_conditional_samples_and_is_refused_unconditionally():
    fam, model = family(chunk_size=16, mode="superres", max_triples=24)
    src = fam.source_images(2)
    gen = torch.Generator().manual_seed(4)
    draws = [fam.sample_images({"model": model}, 2, gen, images=src) for _ in range(3)]
    mean = fam.sample_images({"model": model}, 2, torch.Generator().manual_seed(4), images=src, mean_of=3)
    torch.testing.assert_close(mean, sum(draws) / 3)
    assert not torch.equal(draws[0], draws[1])  # the draws differ, so the mean is not one of them
    ufam, umodel = family(chunk_size=16, max_triples=8)
    with pytest.raises(ValueError, match="conditional model"):
        ufam.sample_images({"model": umodel}, 1, torch.Generator(), mean_of=2)


def test_sampling_labels_must_be_the_models_classes():
    fam, model = family(num_classes=3, max_triples=20)
    with pytest.raises(ValueError, match=r"labels \[1, 3\]: this dctransformer model has 3 classes \(0..2\)"):
        fam.sampling_condition(model, 2, labels=[1, 3])
    with pytest.raises(ValueError, match=r"labels \[1\]: one label per sample, 2 samples"):
        fam.sampling_condition(model, 2, labels=[1])
    assert fam.sampling_condition(model, 2, labels=[2, 0]).labels.tolist() == [2, 0]
    plain, model = family(max_triples=20)
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.sample_images({"model": model}, 1, torch.Generator(), labels=[0])


def test_conditioning_images_are_checked_and_brought_to_the_codec():
    fam, model = family(chunk_size=16, mode="colourise", max_triples=8)
    assert np.array_equal(fam.source_images(65)[64], fam.source_images(1)[0])  # 64 held-out scenes, gone through again
    with pytest.raises(ValueError, match=r"images: 1 given for 2 samples"):
        fam.sampling_condition(model, 2, images=fam.source_images(1))
    grey_rgba = [np.full((32, 32), 90, np.uint8), np.full((32, 32, 4), 200, np.uint8)]
    assert fam.condition_images(2, grey_rgba).shape == (2, 32, 32, 3)  # documented conversions
    with pytest.raises(ValueError, match=r"image 0: size 40x40 \(HxW\) does not match the codec resolution 32x32"):
        fam.sampling_condition(model, 1, images=[np.zeros((40, 40, 3), np.uint8)])
    plain, umodel = family(max_triples=8)
    with pytest.raises(ValueError, match="an unconditional model takes no images"):
        plain.sample_images({"model": umodel}, 1, torch.Generator(), images=[np.zeros((32, 32, 3), np.uint8)])

    # photos of many sizes, prepared without a resolution: the codec's size policy fits them, as in prepare
    crop = DCTCodecConfig(resolution=32, quality=50, value_range=64, size_policy="crop")
    photos = DCTransformerFamily(small(chunk_size=16, mode="colourise"),
                                 {"codec": {"name": "dct", "settings": crop.to_dict()},
                                  "source": {"name": "image_folder", "settings": {"path": "builtin:samples"}}})
    assert photos.source_images(4).shape == (4, 32, 32, 3)
    # With a held-out set, its scenes are the default conditions, not the training scenes the model saw.
    held = {"name": "shapes", "settings": {"num_samples": 16, "resolution": 32, "seed": 99}}
    ceval = DCTransformerFamily(small(chunk_size=16, mode="colourise"), {**INFO, "eval_source": held})
    train_last = DCTransformerFamily(small(chunk_size=16, mode="colourise"), INFO).source_images(1)
    eval_last = ShapesSource(ShapesConfig(num_samples=16, resolution=32, seed=99)).sample(15).image
    assert np.array_equal(ceval.source_images(1)[0], eval_last) and not np.array_equal(eval_last, train_last[0])


def test_superres_takes_low_resolution_images_as_they_are():
    """Given the H/2 x W/2 image itself, the hint is its bicubic upsample; given a full-size image, the hint is
    built as training builds it from a shard (through the codec, then downsampled)."""
    fam, model = family(chunk_size=16, mode="superres", max_triples=8)
    full = fam.source_images(2)
    small_images = fam.low_resolution(full)
    cond = fam.sampling_condition(model, 2, images=list(small_images))
    torch.testing.assert_close(cond.hint, fam.superres_hint(small_images))
    torch.testing.assert_close(cond.dense, cond.hint.round())
    coded = dct_codec.decode(dct_codec.encode(list(full), CODEC), CODEC)
    torch.testing.assert_close(fam.sampling_condition(model, 2, images=full).hint,
                               fam.superres_hint(fam.low_resolution(coded)))
    out = fam.sample_images({"model": model}, 2, torch.Generator().manual_seed(0), images=list(small_images))
    assert out.shape == (2, 3, 32, 32)
    mixed = fam.sampling_condition(model, 2, images=[small_images[0], full[1]])  # each image by its own size
    torch.testing.assert_close(mixed.hint[0], cond.hint[0])
    torch.testing.assert_close(mixed.hint[1], fam.superres_hint(fam.low_resolution(coded))[1])
    with pytest.raises(ValueError, match=r"image 1: size 20x20 \(HxW\) does not match the codec resolution 32x32"):
        fam.sampling_condition(model, 2, images=[small_images[0], np.zeros((20, 20, 3), np.uint8)])


def test_dgm_sample_conditions_on_the_users_images(tmp_path, capsys):
    """--images FILE|DIR: super-resolution from low-resolution PNGs, colourisation from full-size ones; every
    bad path, file or count is one line naming it."""
    from PIL import Image

    from launch.cli import main

    fam, model = family(chunk_size=16, mode="superres", max_triples=20)
    export = write_export(str(tmp_path / "sr"), fam, {"model": model.state_dict()})
    folder = tmp_path / "small"
    folder.mkdir()
    for i, img in enumerate(fam.low_resolution(fam.source_images(3))):
        Image.fromarray(img).save(folder / f"{i}.png")
    png = str(tmp_path / "sr.png")
    assert main(["sample", export, "--images", str(folder), "--out", png]) == 0
    assert "[sample] 3 samples" in capsys.readouterr().out and Image.open(png).size[0] > 3 * 32

    odd = tmp_path / "odd"  # a wrong size: the file is named, with advice `dgm sample` can follow
    odd.mkdir()
    Image.fromarray(fam.source_images(1)[0]).save(odd / "a.png")
    Image.new("RGB", (40, 24)).save(odd / "b.png")
    assert main(["sample", export, "--images", str(odd), "--out", png]) == 2
    assert (f"--images {odd / 'b.png'}: size 24x40 (HxW) does not match the codec resolution 32x32 under "
            "size_policy='error'; resize it to the export's codec resolution") in capsys.readouterr().err
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in [
        (["--images", str(folder)], "broken.png: cannot decode image"),
        (["--images", str(folder / "0.png"), "--n", "2"], "sample counts disagree: --n gives 2, --images"),
        (["--images", str(tmp_path / "nope")], "no such file or folder"),
        (["--images", str(empty)], "holds no .jpg, .jpeg or .png files"),
        (["--keep", "2"], "--keep chooses among the candidates of --prompt"),
    ]:
        assert main(["sample", export, "--out", png, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv

    cfam, cmodel = family(chunk_size=16, mode="colourise", max_triples=20)
    colour = write_export(str(tmp_path / "col"), cfam, {"model": cmodel.state_dict()})
    Image.fromarray(cfam.source_images(1)[0]).convert("L").save(tmp_path / "grey.png")
    assert main(["sample", colour, "--images", str(tmp_path / "grey.png"), "--out", png]) == 0
    grey = (tmp_path / "grey.png").read_bytes()  # a grid written over the image it was drawn from
    assert main(["sample", colour, "--images", str(tmp_path / "grey.png"), "--out", str(tmp_path / "grey.png")]) == 2
    assert "is one of the --images files: the grid would replace the image it was drawn from" in capsys.readouterr().err
    assert (tmp_path / "grey.png").read_bytes() == grey
    (tmp_path / "inputs").mkdir()  # the same through a folder of images
    (tmp_path / "inputs" / "a.png").write_bytes(grey)
    (tmp_path / "inputs" / "b.png").write_bytes(grey)
    assert main(["sample", colour, "--images", str(tmp_path / "inputs"), "--out",
                 str(tmp_path / "inputs" / "b.png")]) == 2
    assert "is one of the --images files" in capsys.readouterr().err
    assert (tmp_path / "inputs" / "b.png").read_bytes() == grey
    ufam, umodel = family(chunk_size=16, max_triples=20)
    plain = write_export(str(tmp_path / "plain"), ufam, {"model": umodel.state_dict()})
    (tmp_path / "corrupt.png").write_bytes(b"not a png")  # refused for the model's mode, before it is read
    for given in ("grey.png", "corrupt.png"):
        assert main(["sample", plain, "--images", str(tmp_path / given), "--out", png]) == 2
        assert ("'dctransformer' export (mode unconditional, no classes) does not take --images"
                in capsys.readouterr().err), given
    assert main(["sample", plain, "--labels", "0,1", "--out", png]) == 2  # refused, not advertised
    assert ("'dctransformer' export (mode unconditional, no classes) does not take --labels (it takes --temperature, "
            "--top-k, --top-p, --value-temperature, --value-top-p)") in capsys.readouterr().err


def test_draws_cut_by_the_sampling_limit_are_reported(caplog):
    fam, model = family(chunk_size=8, max_triples=4)
    with caplog.at_level("WARNING"):
        seq, _ = fam.sample_tokens(model, 6, torch.Generator().manual_seed(0), temperature=1.0)
    running = int((seq[:, 2, 0] < fam.space.c_eos).sum())  # still drawing coefficients at the last free slot
    assert running > 0 and f"{running} of 6 draws reached the sampling limit of 4 triples" in caplog.text
    caplog.clear()
    roomy, roomy_model = family(chunk_size=8, max_triples=0)
    with caplog.at_level("WARNING"):
        roomy.sample_tokens(roomy_model, 1, torch.Generator().manual_seed(0), temperature=0.0, top_k=1)
    assert "sampling limit" not in caplog.text


def test_the_sampling_limit_warning_counts_every_averaged_draw_once(caplog):
    fam, model = family(chunk_size=8, mode="superres", max_triples=3)
    with caplog.at_level("WARNING"):
        fam.sample_images({"model": model}, 2, torch.Generator().manual_seed(0), mean_of=3)
    warnings = [r.getMessage() for r in caplog.records if "sampling limit" in r.getMessage()]
    assert len(warnings) == 1 and " of 6 draws reached the sampling limit of 3 triples" in warnings[0]


def test_no_context_baseline_keeps_the_condition_and_eval_totals_are_exact(scenes):
    """use_context=False forgets the triples drawn before the chunk, not the luma a colourisation model is given.
    Held-out bits per triple over several batches are total nats over total triples (the loop weighs the ratio by
    its triples), equal to one batch holding them all."""
    from trainer.loop import accumulate

    fam, _ = family(mode="colourise", use_context=False)
    batch = fam.collate(scenes)
    ch = fam.chunk_batch(batch, torch.full_like(batch["lengths"], 16))
    assert batch["cond_dense"].abs().sum() > 0 and torch.equal(ch["dense"], batch["cond_dense"])

    fam, model = family(chunk_size=16)
    order = sorted(range(len(scenes)), key=lambda i: len(scenes[i]["tokens"]))
    short, long = [scenes[i] for i in order[:2]], [scenes[i] for i in order[2:]]
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    with torch.no_grad():
        for part in (short, long):
            accumulate(sums, weights, fam.evaluate({"model": model}, fam.collate(part)), len(part))
        whole = fam.evaluate({"model": model}, fam.collate(scenes))
    assert sums["bits_per_triple"] / weights["bits_per_triple"] == pytest.approx(whole["bits_per_triple"][0])
    assert sums["bits_per_image"] / weights["bits_per_image"] == pytest.approx(whole["bits_per_image"])


def test_chunk_choice_follows_trainer_seed_step_and_rank(scenes):
    from trainer.families.base import StepContext

    fam, _ = family(chunk_size=16)
    lengths = fam.collate(scenes)["lengths"]

    def starts(**kw):
        ctx = StepContext(**{"step": 3, "rank": 0, "world_size": 2, "device": torch.device("cpu"),
                             "dtype": torch.float32, **kw})
        return fam.random_starts(lengths, fam.chunk_seed(ctx)).tolist()

    assert starts() == starts()  # a resumed step picks the same chunks
    assert len({str(starts(seed=s)) for s in range(4)}) > 1  # other trainer seeds, other chunks
    assert len({str(starts(step=s)) for s in range(4)}) > 1
