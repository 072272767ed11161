"""Class labels recorded by the shards: a model with too few classes is refused before training, and a default
sample grid draws the classes the data holds (not classes no sample ever had)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from data_pipeline.manifest import DatasetError, load_manifest
from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.sources import build_source
from launch.config import load_config
from trainer.families.image_gpt import ImageGPTConfig, ImageGPTFamily
from trainer.families.slsa_gan import SLSAGanConfig, SLSAGanFamily
from trainer.transformer import TransformerConfig
from trainer.typed_config import ConfigError

from .test_dctransformer import INFO, small

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits_igpt.yaml")
POINTS = {"codec": {"name": "points", "settings": {}}, "image_shape": [2]}


def _shapes(out: str, **settings: object) -> None:
    prepare_dataset(PrepareConfig(output=out, source="shapes", samples_per_shard=16, parallel=False,
                                  source_settings={"num_samples": 40, "resolution": 32, "max_objects": 4,
                                                   **settings}), report=lambda _: None)


def test_prepare_records_the_samples_per_label_and_rewrites_shards_written_without_them(tmp_path):
    out = str(tmp_path / "shapes")
    _shapes(out)
    source = build_source("shapes", {"num_samples": 40, "resolution": 32, "max_objects": 4})
    truth = Counter(str(source.sample(i).label) for i in range(40))
    manifest = load_manifest(out)
    assert manifest.label_counts == dict(sorted(truth.items())) and set(truth) <= {"2", "3", "4"}
    assert [sum(s.labels.values()) for s in manifest.shards] == [16, 16, 8]

    # shards an older dgm wrote carry no labels in their info files: a re-run writes them again
    for info_file in sorted(p for p in os.listdir(out) if p.endswith(".info.json")):
        path = os.path.join(out, info_file)
        record = json.load(open(path))
        del record["shard"]["labels"]
        json.dump(record, open(path, "w"))
    lines: list[str] = []
    prepare_dataset(PrepareConfig(output=out, source="shapes", samples_per_shard=16, parallel=False,
                                  source_settings={"num_samples": 40, "resolution": 32, "max_objects": 4}),
                    report=lines.append)
    assert any("(0 already done)" in line for line in lines), lines
    assert load_manifest(out).label_counts == manifest.label_counts
    assert all(json.load(open(os.path.join(out, p)))["shard"]["labels"] for p in os.listdir(out)
               if p.endswith(".info.json"))
    assert any(line.startswith("[prepare] class labels (samples): ") for line in lines)

    unlabelled = str(tmp_path / "unlabelled")
    _shapes(unlabelled, label="none")
    assert load_manifest(unlabelled).label_counts == {}
    assert "labels" not in open(os.path.join(unlabelled, "manifest.json")).read()


@pytest.mark.parametrize("labels, message", [
    ({"-1": 3}, "label '-1' is not an integer >= 0"),
    ({"02": 3}, "label '02' is not an integer >= 0"),
    ({"2": 0}, r"labels.2 must be a count \(an int >= 1\)"),
    ({"2": 17}, "counts 17 labelled samples, but the shard holds 16"),
    ([2, 3], "must be an object of label -> count"),
])
def test_a_manifest_with_malformed_labels_is_refused_by_field(tmp_path, labels, message):
    out = str(tmp_path / "shapes")
    _shapes(out)
    path = os.path.join(out, "manifest.json")
    data = json.load(open(path))
    data["shards"][0]["labels"] = labels
    json.dump(data, open(path, "w"))
    with pytest.raises(DatasetError, match=rf"manifest.json: shards\[0\].*{message}"):
        load_manifest(out)


def test_training_data_with_more_classes_than_the_model_is_refused_before_ray(digits_data, tmp_path,
                                                                             monkeypatch):
    """Label 9 of the digits met an 8-class model at the first batch that held one, inside a Ray worker."""
    import launch.train
    from launch.train import run_training

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the labels were checked")

    monkeypatch.setattr(launch.train, "ensure_ray", started)
    cfg, raw = load_config(DIGITS, [f"data.train={digits_data['train']}", f"data.eval={digits_data['holdout']}",
                                    f"run_dir={tmp_path}", "model.num_classes=8"])
    counts = load_manifest(digits_data["train"]).label_counts
    with pytest.raises(ConfigError, match=rf"data set {digits_data['train']} holds class labels 8, 9 "
                                          rf"\({counts['8'] + counts['9']} samples\), but this image_gpt model has "
                                          r"8 classes \(0..7\): raise model.num_classes to at least 10"):
        run_training(cfg, raw)


def test_default_labels_are_the_classes_the_data_holds():
    from trainer.families.dctransformer import DCTransformerFamily

    held = {**INFO, "label_counts": {"2": 5, "3": 9, "4": 2}}
    fam = DCTransformerFamily(small(num_classes=7), held)
    model = fam.build_modules()["model"]
    assert fam.sampling_condition(model, 7).labels.tolist() == [2, 3, 4, 2, 3, 4, 2]
    unrecorded = DCTransformerFamily(small(num_classes=7), INFO)
    assert unrecorded.sampling_condition(model, 8).labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert fam.sampling_condition(model, 2, labels=[6, 0]).labels.tolist() == [6, 0]  # asked for: as asked

    gpt = ImageGPTFamily(ImageGPTConfig(num_classes=10, levels=4,
                                        transformer=TransformerConfig(n_layer=1, n_head=1, d_model=8)),
                         {"image_shape": [4, 4, 1], "label_counts": {"3": 1, "7": 1}})
    starts: list[list[int]] = []

    def generate(model, start, generator, **options):  # records the start tokens the grid is drawn from
        starts.append(start.tolist())
        return torch.zeros(len(start), 16, dtype=torch.long)

    gpt.generate = generate
    gpt.sample_images(gpt.build_modules(), 4, torch.Generator().manual_seed(1))
    assert starts == [[3, 7, 3, 7]]


def test_each_family_says_which_labels_its_data_may_hold():
    info = {"label_counts": {"0": 4, "5": 4}}
    gan = SLSAGanConfig(mode="conditional", num_clusters=4)
    with pytest.raises(ConfigError, match=r"holds class labels 5 \(4 samples\).*raise model.num_clusters to at "
                                          "least 6"):
        SLSAGanFamily(gan, POINTS).check_labels(info, "ring")
    # self-labelling without manual labels, unconditional: the labels are never read, so any are fine
    for config in (SLSAGanConfig(mode="self_labelled", num_clusters=4, label_fraction=0.0),
                   SLSAGanConfig(mode="unconditional")):
        SLSAGanFamily(config, POINTS).check_labels(info, "ring")
    # self-labelling with manual labels: the setting to raise is the one that bounds the classes (each advice was
    # checked to be accepted: num_classes may not exceed num_clusters)
    for clusters, classes, advice in ((4, 0, "model.num_clusters"), (8, 4, "model.num_classes"),
                                      (4, 3, "model.num_classes and model.num_clusters")):
        with pytest.raises(ConfigError, match=f"raise {advice} to at least 6"):
            SLSAGanFamily(SLSAGanConfig(mode="self_labelled", num_clusters=clusters, num_classes=classes,
                                        label_fraction=0.5), POINTS).check_labels(info, "ring")
        fixed = {"num_clusters": max(clusters, 6) if "clusters" in advice else clusters,
                 "num_classes": 6 if "classes" in advice else classes}
        SLSAGanFamily(SLSAGanConfig(mode="self_labelled", label_fraction=0.5, **fixed), POINTS).check_labels(
            info, "ring")
    ImageGPTFamily(ImageGPTConfig(num_classes=10, class_conditional=False), {}).check_labels(
        {"label_counts": {"12": 1}}, "digits")
