"""A resume on another number of ranks loads DeepSpeed's universal checkpoint, which (unhelped) reset persistent
buffers to their initial values, gave every param group of a ZeRO-3 optimizer group 0's weight decay and one
shared step counter; a same-world resume kept the checkpoint's optimizer settings over a changed config. The load
is done here at one rank, in this process: DeepSpeed's universal path is the same whatever the world size."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from data_pipeline.manifest import load_manifest
from launch.config import load_config
from launch.train import run_spec
from trainer.checkpoint import CheckpointStore, to_universal
from trainer.engine_state import base_optimizer
from trainer.families import family_class
from trainer.loop import RunSpec, build_engines, data_info, train_worker

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP2 = "step-00000002"


def spec_for(config: str, run_dir, data, *extra: str) -> RunSpec:
    overrides = [f"run_dir={run_dir}", f"data.train={data['train']}", f"data.eval={data['holdout']}", "name=u",
                 "trainer.steps=2", "trainer.eval_every=2", "trainer.sample_every=2", "trainer.checkpoint_every=2",
                 "trainer.eval_batches=1", "trainer.num_samples=1", "trainer.schedule.total_steps=12",
                 "trainer.schedule.warmup_steps=1", "trainer.deterministic=false", "data.stream.global_batch=16",
                 "data.stream.shuffle_block=16", "cluster.workers=1", *extra]
    cfg, raw = load_config(os.path.join(ROOT, "configs", config), overrides)
    return run_spec(cfg, raw)


def load_universal(spec: RunSpec) -> dict:
    """The step-2 checkpoint converted and loaded as a resume at another world size would."""
    store = CheckpointStore(spec.checkpoint_root)
    family = family_class(spec.family)(spec.model, data_info(load_manifest(spec.train_data)))
    engines = build_engines(family, spec, world=1, universal=True)
    for name in engines:
        to_universal(store.local_copy(STEP2), name)
    store.load(STEP2, engines, expect_family=spec.family, universal=True, zero_stage=spec.zero.stage)
    return engines


IGPT = ("model.transformer.n_layer=1", "model.transformer.d_model=16", "model.transformer.n_head=2")


def test_zero3_keeps_each_groups_weight_decay_and_its_own_step_count(world1, digits_data, tmp_path):
    spec = spec_for("digits_igpt.yaml", tmp_path / "run", digits_data, *IGPT, "zero.stage=3",
                    "trainer.optim.weight_decay=0.1")
    train_worker(spec)
    optimizer = base_optimizer(load_universal(spec)["model"])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # DeepSpeed gave both 0.1
    steps = [state["step"] for state in optimizer.state.values()]
    assert len(steps) == 2 and steps[0] is not steps[1]  # one shared tensor counted two steps per step
    assert [float(s) for s in steps] == [2.0, 2.0]


def test_a_same_world_resume_takes_the_configs_optimizer_settings_and_says_so(world1, digits_data, tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    train_worker(spec_for("digits_igpt.yaml", run, digits_data, *IGPT, "trainer.optim.weight_decay=0.1"))
    capsys.readouterr()
    changed = spec_for("digits_igpt.yaml", run, digits_data, *IGPT, "trainer.optim.weight_decay=0.5",
                       "trainer.optim.beta2=0.9", "trainer.steps=4", "trainer.eval_every=4",
                       "trainer.sample_every=4")
    store = CheckpointStore(changed.checkpoint_root)
    family = family_class(changed.family)(changed.model, data_info(load_manifest(changed.train_data)))
    engines = build_engines(family, changed, world=1, universal=False)
    store.load(STEP2, engines, expect_family=changed.family)
    groups = base_optimizer(engines["model"]).param_groups
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.5, (0.9, 0.9)), (0.0, (0.9, 0.9))]
    train_worker(changed)  # the resume itself says what changed
    out = capsys.readouterr().out
    assert "the optimizer settings differ from the checkpoint's (trainer.optim.beta2: 0.95 -> 0.9; " \
           "trainer.optim.weight_decay: 0.1 -> 0.5): the run goes on with this config's" in out


def test_the_gan_classifiers_buffers_survive_a_universal_load(world1, ring_data, tmp_path):
    """Its EMA weights, confusion counts and cluster-to-class alignment are buffers: a resumed run continues with the
    same self-labeller only if they come back."""
    spec = spec_for("gan_ring.yaml", tmp_path / "run", ring_data, "model.hidden=16", "trainer.steps=2")
    train_worker(spec)
    engines = load_universal(spec)
    fresh = build_engines(family_class(spec.family)(spec.model, data_info(load_manifest(spec.train_data))), spec,
                          world=1, universal=False)
    compared = 0
    for name, engine in engines.items():
        (states,) = glob.glob(os.path.join(spec.checkpoint_root, STEP2, name, "ds", "*model_states.pt"))
        saved = torch.load(states, map_location="cpu", weights_only=False)["module"]
        initial = dict(fresh[name].module.named_buffers())
        for key, buffer in engine.module.named_buffers():
            if key in saved:
                assert torch.equal(buffer, saved[key]), f"{name}.{key}"
                compared += not torch.equal(saved[key], initial[key])
    assert compared >= 2  # training moved some buffers away from their initial values: the load brought them back
