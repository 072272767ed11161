"""The contrastive reranker: its loss, its hard-negative captions, scoring, tokenizer checks, and the spine."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.caption_tokenizer import CaptionTokenizer
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.sources.shape_language import score_objects
from data_pipeline.sources.shapes import ShapesConfig, ShapesSource
from trainer.dalle.clip_eval import held_out_samples
from trainer.dalle.contrastive import (
    ContrastiveConfig,
    ContrastiveModel,
    contrastive_loss,
    retrieval_accuracy,
)
from trainer.dalle.hard_negatives import perturb_caption, perturbations
from trainer.export import load_export
from trainer.families.contrastive import ContrastiveFamily, TokenizerMismatch
from trainer.loop import data_info
from trainer.transformer import TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES = {"resolution": 32, "min_objects": 1, "max_objects": 3}
TINY = ContrastiveConfig(embed_dim=16, image_channels=[8, 8], text=TransformerConfig(n_layer=1, n_head=2, d_model=16))


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- loss and metrics --------------------------------------------------------------------------------------------

def test_loss_is_symmetric_in_images_and_texts():
    a, b, scale = unit(6, 8, 0), unit(6, 8, 1), torch.tensor(7.0)
    assert torch.allclose(contrastive_loss(a, b, scale), contrastive_loss(b, a, scale))
    # ...and it is the mean of the two directions' cross-entropies, written out by hand
    logits = scale * a @ b.t()
    i2t = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    t2i = -(logits.diag() - logits.logsumexp(dim=0)).mean()
    assert torch.allclose(contrastive_loss(a, b, scale), (i2t + t2i) / 2)


def test_loss_is_log_n_for_identical_embeddings_and_near_zero_for_perfect_pairs():
    n = 8
    same = unit(1, 8, 0).expand(n, 8)
    assert contrastive_loss(same, same, torch.tensor(50.0)).item() == pytest.approx(math.log(n), abs=1e-5)
    eye = torch.eye(n)
    assert contrastive_loss(eye, eye, torch.tensor(100.0)).item() < 1e-6


def test_repeated_captions_are_joint_positives():
    """Two scenes with the same caption: with caption keys the pair is not a negative (loss ~0), one-hot is not."""
    images = torch.eye(4)[[0, 0, 2, 3]]
    texts = images.clone()
    keys = torch.tensor([7, 7, 8, 9])
    scale = torch.tensor(100.0)
    assert contrastive_loss(images, texts, scale, keys).item() < 1e-6
    assert contrastive_loss(images, texts, scale).item() == pytest.approx(0.5 * math.log(2), rel=1e-4)  # 50/50


def test_hard_negatives_only_add_to_the_image_to_text_loss():
    a, b, scale = unit(5, 8, 0), unit(5, 8, 1), torch.tensor(10.0)
    negatives = unit(3, 8, 2)
    plain, hard = contrastive_loss(a, b, scale), contrastive_loss(a, b, scale, negative_text_emb=negatives)
    assert hard > plain
    logits = scale * a @ b.t()
    t2i = F.cross_entropy(logits.t(), torch.arange(5))
    i2t = F.cross_entropy(torch.cat([logits, scale * a @ negatives.t()], 1), torch.arange(5))
    assert torch.allclose(hard, (i2t + t2i) / 2)


def _gathered_grads(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of two: the global batch's loss over gathered embeddings, gradients averaged as DeepSpeed does."""
    import torch.distributed as dist

    from trainer.families.base import StepContext

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        image_enc, text_enc, scale, images, texts = _gather_problem()
        ctx = StepContext(step=0, rank=rank, world_size=2, device=torch.device("cpu"), dtype=torch.float32)
        mine = slice(4 * rank, 4 * rank + 4)
        image_emb = ContrastiveFamily._gather(F.normalize(image_enc(images[mine]), dim=-1), ctx)
        text_emb = ContrastiveFamily._gather(F.normalize(text_enc(texts[mine]), dim=-1), ctx)
        contrastive_loss(image_emb, text_emb, scale.exp()).backward()
        grads = [image_enc.weight.grad, text_enc.weight.grad, scale.grad]
        for g in grads:
            dist.all_reduce(g)
            g /= 2
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _gather_problem() -> tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Parameter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    image_enc, text_enc = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    g = torch.Generator().manual_seed(1)
    return image_enc, text_enc, torch.nn.Parameter(torch.tensor(2.0)), torch.randn(8, 6, generator=g), \
        torch.randn(8, 5, generator=g)


def test_gathered_loss_gives_every_parameter_the_one_rank_gradient(tmp_path):
    """gather_across_ranks on 2 ranks must train like 1 rank on the same global batch: the encoders too, not only
    the logit scale (a detached gather gives the encoders half)."""
    import torch.multiprocessing as mp

    image_enc, text_enc, scale, images, texts = _gather_problem()
    contrastive_loss(F.normalize(image_enc(images), dim=-1), F.normalize(text_enc(texts), dim=-1),
                     scale.exp()).backward()
    mp.start_processes(_gathered_grads, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g, want in zip(got, [image_enc.weight.grad, text_enc.weight.grad, scale.grad], strict=True):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def test_retrieval_accuracy_counts_a_same_caption_hit_as_right():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.0, 0.1, 0.5]])
    assert retrieval_accuracy(sim, torch.tensor([1, 2, 3])) == pytest.approx((2 / 3, 1.0))  # row 1 picks text 0
    assert retrieval_accuracy(sim, torch.tensor([1, 1, 3])) == pytest.approx((1.0, 1.0))
    # A rank's micro-batch of padding only (a held-out set's last one): no crash, no NaN, a graph to backward.
    empty = torch.zeros(0, 4, requires_grad=True)
    assert retrieval_accuracy(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)) == (0.0, 0.0)
    loss = contrastive_loss(empty, empty, torch.tensor(10.0), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0


def test_logit_scale_is_clamped_without_gradient_beyond_the_cap():
    model = ContrastiveModel(TINY, vocab_size=10, height=8, width=8)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    scale = model.scale()
    scale.backward()
    assert scale.item() == pytest.approx(100.0, rel=1e-5) and model.logit_scale.grad.item() == 0.0


def test_text_embedding_ignores_padding_and_sees_word_order():
    torch.manual_seed(0)
    model = ContrastiveModel(TINY, vocab_size=10, height=8, width=8).eval()
    ids = torch.tensor([[1, 2, 3, 10, 10], [3, 2, 1, 4, 5]])
    mask = ids != 10
    both = model.encode_texts(ids, mask)
    alone = model.encode_texts(ids[:1, :3], mask[:1, :3])
    assert torch.allclose(both[0], alone[0], atol=1e-5)
    reordered = model.encode_texts(torch.tensor([[3, 2, 1]]), torch.ones(1, 3, dtype=torch.bool))
    assert not torch.allclose(alone, reordered, atol=1e-3)


# --- hard-negative captions --------------------------------------------------------------------------------------

def test_perturbed_captions_change_one_word_and_are_false_for_the_scene():
    source = ShapesSource(ShapesConfig(num_samples=60, **SCENES))
    kinds = set()
    for i in range(60):
        s = source.sample(i)
        assert score_objects(s.attributes["objects"], s.caption)["all"] == 1.0
        out = perturb_caption(s.caption, s.attributes, s.key, max_count=3)
        assert out is not None, s.caption
        wrong, kind = out
        kinds.add(kind)
        assert out == perturb_caption(s.caption, s.attributes, s.key, max_count=3)  # same sample, same negative
        changed = [(a, b) for a, b in zip(s.caption.split(), wrong.split(), strict=True) if a != b]
        assert len(changed) == 1 or kind == "count", (s.caption, wrong)  # count may also change "is" / "are"
        assert score_objects(s.attributes["objects"], wrong)["all"] < 1.0
    assert kinds == {"colour", "shape", "size", "count", "relation"}


def test_relations_flip_to_their_opposite():
    source = ShapesSource(ShapesConfig(num_samples=200, **SCENES))
    flips = [(s.caption, perturbations(s.caption, s.attributes, 3).get("relation")) for s in map(source.sample,
                                                                                                  range(200))]
    flips = [(c, f) for c, f in flips if f]
    assert flips
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for caption, (flipped,) in flips:
        rel = next(r for r in opposite if f" {r} " in caption)
        assert flipped == caption.replace(f" {rel} ", f" {opposite[rel]} ")


# --- the family on a tiny prepared data set ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, str]:
    """Scene shards (caption + attributes kept) with the train split's tokenizer beside each manifest."""
    root = tmp_path_factory.mktemp("clip-data")
    out = {}
    for split, seed, n in (("train", 0, 96), ("eval", 1, 32)):
        url = str(root / split)
        prepare_dataset(PrepareConfig(
            output=url, source="shapes", source_settings={"num_samples": n, "seed": seed, **SCENES},
            codec="image", codec_settings={"keep": ["caption", "attributes"]}, samples_per_shard=48, parallel=False,
            tokenizer_vocab_size=300 if split == "train" else 0, tokenizer_from="" if split == "train" else out["train"],
        ), report=lambda _: None)
        out[split] = url
    return out


def info_of(url: str) -> dict:
    """What the loop tells a family about the data set at ``url``."""
    return data_info(load_manifest(url))


def family_for(url: str, config: ContrastiveConfig = TINY) -> ContrastiveFamily:
    return ContrastiveFamily(config, info_of(url))


def test_collate_tokenises_captions_with_the_datasets_tokenizer(scenes, one_thread):
    family = family_for(scenes["train"])
    samples = held_out_samples(scenes["train"], 8)
    batch = family.collate(samples)
    tokenizer = CaptionTokenizer.load(os.path.join(scenes["train"], "tokenizer.model"))
    lengths = [len(tokenizer.encode(s["caption"])) for s in samples]
    assert max(lengths) > TINY.text_len  # a near character-level vocabulary: some captions get truncated
    for i, s in enumerate(samples):
        kept = tokenizer.encode(s["caption"])[:TINY.text_len]  # the truncation rule: the first text_len ids
        assert batch["text"][i, :len(kept)].tolist() == kept and batch["text_mask"][i].sum() == len(kept)
    assert batch["text"].shape[1] == min(max(lengths), TINY.text_len)
    assert batch["images"].shape == (8, 3, 32, 32) and 0 <= batch["images"].min() <= batch["images"].max() <= 1
    assert batch["has_negative"].all() and not torch.equal(batch["negative_text"], batch["text"])
    samples[3] = {**samples[3], "caption": "  "}
    with pytest.raises(ValueError, match=f"sample {samples[3]['key']} has an empty caption"):
        family.collate(samples)


def test_score_shape_range_and_agreement_with_the_similarity_matrix(scenes, one_thread):
    torch.manual_seed(0)
    family = family_for(scenes["train"])
    modules = {k: m.eval() for k, m in family.build_modules().items()}
    samples = held_out_samples(scenes["train"], 6)
    batch = family.collate(samples)
    captions = [s["caption"] for s in samples]
    scores = family.score(modules, batch["images"], captions)
    assert scores.shape == (6,) and scores.dtype == torch.float32 and scores.abs().max() <= 1 + 1e-5
    model = modules["model"]
    sim = model.encode_images(batch["images"]) @ model.encode_texts(batch["text"], batch["text_mask"]).t()
    assert torch.allclose(scores, sim.diag(), atol=1e-5)
    assert torch.allclose(family.score(modules, batch["images"][2:3], captions[2:3]), scores[2:3], atol=1e-5)
    with pytest.raises(ValueError, match="6 images but 5 captions"):
        family.score(modules, batch["images"], captions[:5])
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 32, 32\]"):
        family.score(modules, batch["images"][:, :, :16], captions)
    picture = family.sample_images(modules, 4, torch.Generator())
    assert picture.shape == (1, 3, 64, 64) and 0 <= picture.min() <= picture.max() <= 1


def _evaluate_half(rank: int, init_file: str, url: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        family, modules, samples = _eval_problem(url)
        metrics = family.evaluate(modules, family.collate(samples[4 * rank:4 * rank + 4]))
        torch.save(metrics, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _eval_problem(url: str) -> tuple[ContrastiveFamily, dict, list]:
    torch.manual_seed(0)
    family = family_for(url)
    return family, {k: m.eval() for k, m in family.build_modules().items()}, held_out_samples(url, 8)


def test_held_out_metrics_do_not_depend_on_the_world_size(scenes, one_thread, tmp_path):
    """Two ranks evaluating half a batch each report what one rank reports for the whole batch: the retrieval
    ranks every caption of the global batch, not only this rank's."""
    import torch.multiprocessing as mp

    family, modules, samples = _eval_problem(scenes["train"])
    want = family.evaluate(modules, family.collate(samples))
    mp.start_processes(_evaluate_half, args=(str(tmp_path / "init"), scenes["train"], str(tmp_path)), nprocs=2,
                       start_method="spawn")
    halves = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("loss", "image_to_text_acc", "text_to_image_acc"):
        assert halves[0][key] == pytest.approx(want[key], abs=1e-5) == halves[1][key], key
    assert (halves[0]["hard_negative_acc"] + halves[1]["hard_negative_acc"]) / 2 == pytest.approx(
        want["hard_negative_acc"])


def test_a_tokenizer_other_than_the_trained_one_is_refused(scenes, tmp_path):
    info = info_of(scenes["train"])
    other = CaptionTokenizer.train(["a blue square left of a red circle"] * 20 + ["two objects"] * 5, 300)
    forged = {**info, "tokenizer": {**info["tokenizer"], "sha256": other.sha256}}
    with pytest.raises(TokenizerMismatch, match="does not match the one this model was trained with"):
        _ = ContrastiveFamily(TINY, forged).tokenizer
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    other.save(str(export_dir / "tokenizer.model"))
    with pytest.raises(TokenizerMismatch, match="tokenizer.model: caption tokenizer"):
        ContrastiveFamily(TINY, info).attach_export(str(export_dir))
    no_tokenizer = {k: v for k, v in info.items() if k != "tokenizer"}
    with pytest.raises(ValueError, match="no caption tokenizer in its manifest"):
        ContrastiveFamily(TINY, no_tokenizer)


@pytest.mark.slow
def test_spine_trains_exports_and_the_export_scores(ray_local, scenes, tmp_path, capsys):
    from launch.config import load_config
    from launch.export import export_checkpoint
    from launch.train import run_training

    run = str(tmp_path / "run")
    steps = 4
    cfg, raw = load_config(os.path.join(ROOT, "configs", "t2i_clip.yaml"), [
        f"run_dir={run}", f"data.train={scenes['train']}", f"data.eval={scenes['eval']}", f"trainer.steps={steps}",
        "trainer.log_every=2", f"trainer.eval_every={steps}", f"trainer.sample_every={steps}",
        f"trainer.checkpoint_every={steps}", "trainer.eval_batches=1", "trainer.num_samples=4",
        f"trainer.schedule.total_steps={steps}", "trainer.schedule.warmup_steps=1", "data.stream.global_batch=16",
        "data.stream.shuffle_block=16", "data.stream.partitions=4", "model.hard_negatives=true",
        "model.embed_dim=16", "model.image_channels=[8,8]", "model.text.n_layer=1", "model.text.d_model=16",
        "model.text.n_head=2",
    ])
    run_training(cfg, raw)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(0 <= r["image_to_text_acc"] <= 1 and r["loss"] > 0 for r in train)
    assert any(r["split"] == "eval" and 0 <= r["hard_negative_acc"] <= 1 for r in records)
    assert os.path.exists(os.path.join(run, "samples", f"step-{steps:08d}.png"))
    out = str(tmp_path / "export")
    export_checkpoint(os.path.join(run, "checkpoints"), out)
    shutil.rmtree(scenes["train"] + "-moved", ignore_errors=True)
    os.rename(scenes["train"], scenes["train"] + "-moved")  # the export must not need the data set
    try:
        family, modules, config = load_export(out)
        batch = family.collate(held_out_samples(scenes["eval"], 4))
        captions = ["a small red circle left of a blue square", "two objects", "a green triangle", "one shape"]
        scores = family.score(modules, batch["images"], captions)
    finally:
        os.rename(scenes["train"] + "-moved", scenes["train"])
    assert config["family"] == "contrastive" and "tokenizer.model" in config["files"]
    assert scores.shape == (4,) and scores.abs().max() <= 1 + 1e-5
    from launch.cli import main  # a scorer has text_ids too, but draws no images: --prompt is refused, named

    assert main(["sample", out, "--prompt", "a red circle"]) == 2
    assert "a 'contrastive' export does not take --prompt" in capsys.readouterr().err
