"""Tests of the training job (tiny nets, phantoms): loss goes down, exact resume, export, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from synthsr_bids.models.network import SynthSRUNet, UNetConfig
from synthsr_bids.hashing import sha256_file
from synthsr_bids.models.weights import load_weights, save_safetensors
from synthsr_bids.training.config import ConfigError, NetworkStage, load_config
from synthsr_bids.training.generator import GeneratorConfig
from synthsr_bids.training.labels import label_volume_from_array, load_label_scheme
from synthsr_bids.training.loop import (
    CHECKPOINT_FORMAT,
    LOSS_COLUMNS,
    Trainer,
    TrainingError,
    _cxx_compiler,
    latest_checkpoint,
    replace_segmenter,
)
from synthsr_bids.training.losses import (
    hard_dice,
    regression_loss,
    soft_dice,
    soft_dice_loss,
    softmax_dice_loss,
)
from synthsr_bids.training.phantoms import head_phantom
from synthsr_bids.training.report import read_loss_log

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scheme():
    return load_label_scheme()


@pytest.fixture(scope="module")
def volumes(scheme):
    maps = [head_phantom((36, 36, 36)), head_phantom((40, 36, 38))]
    return [label_volume_from_array(m, scheme, name=f"phantom{i}") for i, m in enumerate(maps)]


def tiny_config(run_dir: Path, *, seg_steps: int = 3, reg_steps: int = 4, **run) -> object:
    config = load_config(None, overrides=[
        f"run.dir={str(run_dir)!r}", "run.threads=1", "run.seed=11", "run.log_every=1",
        "run.checkpoint_every=1000", "run.validate_every=1000", "run.validation_samples=2",
        f"segmentation.steps={seg_steps}", "segmentation.base_features=4", "segmentation.n_levels=2",
        "segmentation.lr=1e-3",
        f"regression.steps={reg_steps}", "regression.base_features=4", "regression.n_levels=2",
        "regression.lr=1e-3",
    ])
    gen = dataclasses.replace(config.generator, crop_shape=(16, 16, 16))
    config = dataclasses.replace(config, generator=gen, run=dataclasses.replace(config.run, **run))
    return config


def make_trainer(config, volumes):
    return Trainer(config, volumes=volumes, validation_volumes=volumes[:1])


# ---------------------------------------------------------------------------- losses
def test_soft_dice_is_one_for_a_perfect_prediction_and_fused_gradient_matches_autograd():
    labels = torch.randint(0, 4, (2, 1, 5, 6, 7), generator=torch.Generator().manual_seed(0))
    onehot = torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    assert torch.allclose(soft_dice(onehot, labels), torch.ones(2, 4))
    assert float(soft_dice_loss(onehot, labels)) == pytest.approx(0.0, abs=1e-6)
    # p = 0.5 everywhere, labels (0, 0, 0, 1): class 0 has 2 * 1.5 / (4 * 0.25 + 3) = 3/4,
    # class 1 has 2 * 0.5 / (4 * 0.25 + 1) = 1/2
    lab = torch.tensor([0, 0, 0, 1]).view(1, 1, 2, 2, 1)
    uniform = torch.full((1, 2, 2, 2, 1), 0.5)
    assert torch.allclose(soft_dice(uniform, lab, eps=0.0), torch.tensor([[0.75, 0.5]]))
    logits = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    ref = soft_dice_loss(torch.softmax(logits, 1), labels)
    (g_ref,) = torch.autograd.grad(ref, logits)
    fused = softmax_dice_loss(logits, labels)
    (g_fused,) = torch.autograd.grad(fused, logits)
    assert float(fused.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert torch.allclose(g_fused, g_ref, atol=1e-8, rtol=1e-4)


def test_hard_dice_per_class():
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    dice, present = hard_dice(pred, truth, 4)
    assert dice.tolist() == pytest.approx([2 * 1 / (3 + 2), 2 * 2 / (3 + 2), 0.0, 1.0])
    assert present.tolist() == [True, True, True, False]


# ---------------------------------------------------------------------------- config
def test_default_config_file_parses_and_is_consistent():
    config = load_config(REPO / "configs" / "default.toml")
    assert config.regression.base_features == 16 and config.regression.n_levels == 4
    assert config.regression.lr == pytest.approx(1e-4) and config.regression.seg_loss_weight == 0.25
    assert config.run.dir == (REPO / "training_runs" / "default").resolve()
    assert config.data.training_maps[0].name == "label_maps"
    assert config.data.validation_aliases == {29: 2, 31: 4}
    assert dict(config.generator.contrast_probs)["random"] == 0.5
    assert config.generator.crop_shape == (96, 96, 96)
    assert config.regression.output_sharpening is False  # measured: MODEL_CARD.md, "Post-processing"


def test_config_errors_name_the_file_and_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[regression]\nbase_featurs = 8\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*base_featurs"):
        load_config(bad)
    bad.write_text("[generator]\ncrop_shape = [20, 20, 20]\n")
    with pytest.raises(ConfigError, match=r"multiples of 8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, overrides=["threads=2"])
    with pytest.raises(ConfigError, match=r"\[segmentation\]\.output_sharpening.*regression stage"):
        load_config(None, overrides=["segmentation.output_sharpening=false"])


def test_learning_rate_schedule_warmup_and_cosine():
    stage = NetworkStage(steps=110, lr=1e-3, lr_schedule="cosine", lr_min=1e-5, warmup_steps=10)
    assert stage.learning_rate(0) == pytest.approx(1e-4)  # warm-up ramp: lr * 1/10
    assert stage.learning_rate(9) == pytest.approx(1e-3)
    assert stage.learning_rate(10) == pytest.approx(1e-3)  # cosine starts at the peak ...
    assert stage.learning_rate(60) == pytest.approx((1e-3 + 1e-5) / 2)  # ... is half-way at mid-span ...
    assert stage.learning_rate(110) == pytest.approx(1e-5)  # ... and ends at lr_min
    assert stage.learning_rate(500) == pytest.approx(1e-5)  # steps raised later: no wrap-around
    assert NetworkStage(lr=3e-4).learning_rate(12345) == pytest.approx(3e-4)


def test_learning_rate_config_errors():
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(None, overrides=["regression.lr_schedule=\"step\""])
    with pytest.raises(ConfigError, match="lr_min <= lr"):
        load_config(None, overrides=["regression.lr=1e-4", "regression.lr_min=1e-3"])


def test_resumed_run_follows_the_configured_learning_rate(tmp_path: Path, volumes):
    # The optimiser state in a checkpoint carries the old rate; the configuration must win.
    make_trainer(tiny_config(tmp_path / "run", seg_steps=0, reg_steps=10), volumes).run(max_steps=2)
    config = tiny_config(tmp_path / "run", seg_steps=0, reg_steps=10)
    config = dataclasses.replace(config, regression=dataclasses.replace(config.regression, lr=2e-4))
    trainer = make_trainer(config, volumes)
    trainer.run(max_steps=1)
    assert trainer.step == 3
    assert [g["lr"] for g in trainer.reg_opt.param_groups] == [pytest.approx(2e-4)]


def test_a_finished_run_continues_when_its_steps_are_raised(tmp_path: Path, volumes, caplog):
    config = tiny_config(tmp_path / "run", seg_steps=0, reg_steps=3)
    config = dataclasses.replace(config, regression=dataclasses.replace(
        config.regression, lr_schedule="cosine", lr_min=1e-5))
    finished = make_trainer(config, volumes).run()
    assert (finished.stage, finished.global_step) == ("done", 3)
    again = make_trainer(config, volumes)
    assert again.run().steps_this_session == 0  # same length: nothing left to do
    assert again.stage == "done"

    longer = dataclasses.replace(config, regression=dataclasses.replace(config.regression, steps=6))
    trainer = make_trainer(longer, volumes)
    with caplog.at_level(logging.INFO, logger="synthsr_bids.training"):
        summary = trainer.run(max_steps=2)
    assert (summary.stage, summary.steps_this_session, trainer.step) == ("regression", 2, 5)
    assert "ended at step 3; [regression].steps = 6 continues it" in caplog.text
    # the cosine schedule of the 6-step run, not of the 3-step one (which had reached lr_min)
    assert [g["lr"] for g in trainer.reg_opt.param_groups] == [pytest.approx(longer.regression.learning_rate(4))]
    assert longer.regression.learning_rate(4) > 2 * config.regression.lr_min
    rest = make_trainer(longer, volumes).run()
    assert (rest.stage, rest.global_step, rest.steps_this_session) == ("done", 6, 1)

    # a segmentation-only run has no regression stage to continue: it says so
    seg_only = tiny_config(tmp_path / "seg", seg_steps=2, reg_steps=0)
    make_trainer(seg_only, volumes).run()
    with caplog.at_level(logging.WARNING, logger="synthsr_bids.training"):
        again = make_trainer(tiny_config(tmp_path / "seg", seg_steps=2, reg_steps=3), volumes).run()
    assert again.steps_this_session == 0 and "trained a segmenter only" in caplog.text
    assert [int(r["global_step"]) for r in csv.DictReader((tmp_path / "run" / "loss.csv").open())] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------- training
def test_tiny_training_reduces_the_loss(tmp_path: Path, volumes):
    config = tiny_config(tmp_path / "run", seg_steps=0, reg_steps=40)
    # an easy, fixed task: no spatial/intensity randomness, so the loss curve is not noise
    still = GeneratorConfig(crop_shape=(16, 16, 16), scaling=(1.0, 1.0), rotation_deg=0.0, shear=0.0,
                            translation_mm=0.0, svf_std_max=0.0, flip_prob=0.0, skull_strip_prob=0.0,
                            contrast_probs=(("t1", 1.0),), isotropic_prob=1.0, bias_std_max=0.0, gamma_std=0.0,
                            noise_max=0.0, plaque_prob=0.0, stroke_prob=0.0, tumour_prob=0.0)
    config = dataclasses.replace(config, generator=still,
                                 regression=dataclasses.replace(config.regression, lr=3e-3))
    trainer = make_trainer(config, volumes)
    losses = []
    summary = trainer.run(on_step=lambda r: losses.append(r.loss))
    assert summary.stage == "done" and len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.slow
@pytest.mark.skipif(_cxx_compiler() is None, reason="torch.compile needs a C++ compiler on CPU (.ci/run installs g++)")
def test_compiled_training_steps_match_eager_ones(tmp_path: Path, volumes):
    """[run].compile: the same losses step for step (float32), same weights, uncompiled state dicts."""
    results = {}
    for compile_ in (False, True):
        config = tiny_config(tmp_path / f"run-{compile_}", seg_steps=2, reg_steps=2, autocast=False, compile=compile_)
        trainer = make_trainer(config, volumes)
        losses = []
        trainer.run(on_step=lambda r: losses.append((r.stage, r.loss)))
        results[compile_] = (losses, trainer.regressor.state_dict(), len(trainer._compiled))
    (eager, eager_state, n_eager), (compiled, compiled_state, n_compiled) = results[False], results[True]
    assert n_eager == 0 and n_compiled == 3  # segmenter in stage 1, frozen segmenter + regressor in stage 2
    assert [s for s, _ in compiled] == [s for s, _ in eager] == ["segmentation"] * 2 + ["regression"] * 2
    np.testing.assert_allclose([v for _, v in compiled], [v for _, v in eager], rtol=1e-4)
    assert compiled_state.keys() == eager_state.keys()  # no "_orig_mod." prefixes in checkpoints/exports
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-3, atol=1e-5)


def test_compile_without_a_cxx_compiler_says_how_to_turn_it_off(tmp_path: Path, volumes, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(TrainingError, match="run.compile=false"):
        make_trainer(tiny_config(tmp_path / "run", compile=True), volumes)
    make_trainer(tiny_config(tmp_path / "run2", compile=False), volumes)  # the default needs none


def test_segmentation_stage_reduces_the_dice_loss(tmp_path: Path, volumes):
    config = tiny_config(tmp_path / "run", seg_steps=30, reg_steps=0)
    still = GeneratorConfig(crop_shape=(16, 16, 16), scaling=(1.0, 1.0), rotation_deg=0.0, shear=0.0,
                            translation_mm=0.0, svf_std_max=0.0, flip_prob=0.0, contrast_probs=(("t1", 1.0),),
                            isotropic_prob=1.0, plaque_prob=0.0, stroke_prob=0.0, tumour_prob=0.0)
    config = dataclasses.replace(config, generator=still,
                                 segmentation=dataclasses.replace(config.segmentation, lr=1e-2))
    losses = []
    make_trainer(config, volumes).run(max_steps=30, on_step=lambda r: losses.append(r.loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.02


@pytest.mark.parametrize("stop_at", [2, 5])  # inside stage 1, and inside stage 2 (after the freeze)
def test_resume_restores_exactly(tmp_path: Path, volumes, stop_at: int):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    config_a = tiny_config(run_a)
    first = make_trainer(config_a, volumes).run(max_steps=stop_at)
    assert first.global_step == stop_at
    assert latest_checkpoint(run_a).name == f"ckpt-{stop_at:08d}.pt"
    shutil.copytree(run_a, run_b)
    # A continues in a fresh process-like trainer too; B resumes from the copied run directory.
    cont_a: list[float] = []
    make_trainer(config_a, volumes).run(max_steps=2, on_step=lambda r: cont_a.append(r.loss))
    cont_b: list[float] = []
    make_trainer(tiny_config(run_b), volumes).run(max_steps=2, on_step=lambda r: cont_b.append(r.loss))
    assert len(cont_a) == 2 and cont_a == cont_b
    # ... and the same as a run that never stopped
    straight: list[float] = []
    make_trainer(tiny_config(tmp_path / "c"), volumes).run(max_steps=stop_at + 2,
                                                            on_step=lambda r: straight.append(r.loss))
    assert straight[-2:] == cont_a


def test_checkpoint_contents_size_and_single_file(tmp_path: Path, volumes):
    config = tiny_config(tmp_path / "run", seg_steps=2, reg_steps=3, checkpoint_every=1)
    trainer = make_trainer(config, volumes)
    summary = trainer.run()
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert [f for f in files if f.startswith("ckpt-")] == ["ckpt-00000005.pt"]
    for name in ("segmenter.safetensors", "model.safetensors", "loss.csv", "validation.csv", "config.json"):
        assert name in files
    state = torch.load(summary.checkpoint, map_location="cpu", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["stage"] == "done" and state["step"] == 3
    assert set(state["regressor"]) == set(trainer.regressor.state_dict())
    assert len(state["reg_opt"]["state"]) == len(list(trainer.regressor.parameters()))
    log = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert log[0].startswith("time,stage,step") and len(log) == 1 + 5
    assert [row.split(",")[1] for row in log[1:]] == ["segmentation"] * 2 + ["regression"] * 3


def test_validation_writes_dice_per_structure(tmp_path: Path, volumes):
    config = tiny_config(tmp_path / "run", seg_steps=2, reg_steps=2, validate_every=2)
    make_trainer(config, volumes).run()
    rows = (tmp_path / "run" / "validation.csv").read_text().splitlines()
    assert rows[0] == "global_step,stage,step,metric,label,structure,value"
    seg_rows = [r.split(",") for r in rows[1:] if r.split(",")[1] == "segmentation"]
    structures = {r[5] for r in seg_rows if r[3] == "dice"}
    assert {"left-cerebral-white-matter", "right-cerebral-white-matter"} <= structures
    assert all(0.0 <= float(r[6]) <= 1.0 for r in seg_rows)
    reg_metrics = {r.split(",")[3] for r in rows[1:] if r.split(",")[1] == "regression"}
    assert {"l1", "mean_dice"} <= reg_metrics


def test_exported_safetensors_loads_into_synthsrunet(tmp_path: Path, volumes):
    config = tiny_config(tmp_path / "run", seg_steps=1, reg_steps=3)
    trainer = make_trainer(config, volumes)
    summary = trainer.run()
    loaded = load_weights(summary.model)
    assert loaded.config == UNetConfig(base_features=4, n_levels=2, final_activation="linear")
    assert loaded.metadata["synthsr_bids.role"] == "regression"
    assert loaded.metadata["synthsr_bids.sharpen"] == "true"
    raw = summary.model.read_bytes()
    assert b'"F16"' in raw  # stored as float16
    # same numbers as the trained regressor with its weights rounded to float16
    reference = SynthSRUNet(loaded.config)
    reference.load_state_dict({k: v.half().float() for k, v in trainer.regressor.state_dict().items()})
    reference.eval()
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), reference(x), atol=1e-5)


def test_auxiliary_segmentation_outputs_train_and_are_dropped_at_export(tmp_path: Path, volumes):
    config = tiny_config(tmp_path / "run", seg_steps=1, reg_steps=3)
    config = dataclasses.replace(config, regression=dataclasses.replace(config.regression, aux_seg_weight=0.5))
    trainer = make_trainer(config, volumes)
    n_seg = trainer.scheme.n_segmentation_labels
    assert trainer.reg_config.out_channels == 1 + n_seg
    results = []
    summary = trainer.run(on_step=lambda r: results.append(r))
    reg = [r for r in results if r.stage == "regression"]
    assert len(reg) == 3 and all(0.0 < r.aux_dice_loss < 1.0 for r in reg)
    # the logged total is L1 + 0.25 x frozen-segmenter Dice + 0.5 x auxiliary Dice
    assert all(r.loss == pytest.approx(r.l1 + 0.25 * r.dice_loss + 0.5 * r.aux_dice_loss, rel=1e-5) for r in reg)
    header = (tmp_path / "run" / "loss.csv").read_text().splitlines()[0]
    assert header.endswith(",aux_dice_loss")
    loaded = load_weights(summary.model)
    assert loaded.config.out_channels == 1  # the shipped network is the image channel only
    full = SynthSRUNet(trainer.reg_config)
    full.load_state_dict({k: v.half().float() for k, v in trainer.regressor.state_dict().items()})
    full.eval()
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), full(x)[:, :1], atol=1e-5)


def test_segmenter_loss_every_nth_step_weighted_n_times(tmp_path: Path, volumes):
    config = tiny_config(tmp_path / "run", seg_steps=1, reg_steps=5)
    config = dataclasses.replace(config, regression=dataclasses.replace(config.regression, seg_loss_interval=2))
    results = []
    make_trainer(config, volumes).run(on_step=lambda r: results.append(r))
    reg = [r for r in results if r.stage == "regression"]
    assert [r.step for r in reg] == [1, 2, 3, 4, 5]
    with_dice = [r for r in reg if r.step % 2 == 1]  # 0-based steps 0, 2, 4
    without = [r for r in reg if r.step % 2 == 0]
    # where the term is evaluated it weighs 2 x 0.25; elsewhere the loss is the L1 alone and no Dice is logged
    assert all(0.0 < r.dice_loss < 1.0 for r in with_dice)
    assert all(r.loss == pytest.approx(r.l1 + 0.5 * r.dice_loss, rel=1e-5) for r in with_dice)
    assert all(math.isnan(r.dice_loss) and r.loss == pytest.approx(r.l1, rel=1e-6) for r in without)
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    header = rows[0].split(",")
    dice_column = {int(r.split(",")[header.index("step")]): r.split(",")[header.index("dice_loss")]
                   for r in rows[1:] if r.split(",")[header.index("stage")] == "regression"}
    assert dice_column[2] == dice_column[4] == "" and float(dice_column[3]) > 0
    curve = read_loss_log(tmp_path / "run" / "loss.csv")["regression"]
    assert np.isnan(curve.dice_loss[1]) and curve.dice_loss[2] > 0


def test_segmenter_loss_interval_keeps_its_phase_across_a_resume(tmp_path: Path, volumes):
    def config(run_dir: Path):  # type: ignore[no-untyped-def]
        base = tiny_config(run_dir, seg_steps=1, reg_steps=6)
        return dataclasses.replace(base, regression=dataclasses.replace(base.regression, seg_loss_interval=2))

    straight: list = []
    make_trainer(config(tmp_path / "straight"), volumes).run(on_step=straight.append)
    resumed: list = []
    make_trainer(config(tmp_path / "resumed"), volumes).run(max_steps=2, on_step=resumed.append)  # stops after reg. step 1
    make_trainer(config(tmp_path / "resumed"), volumes).run(on_step=resumed.append)
    reg_straight = [r for r in straight if r.stage == "regression"]
    reg_resumed = [r for r in resumed if r.stage == "regression"]
    assert [r.step for r in reg_resumed] == [1, 2, 3, 4, 5, 6]
    # the Dice term on regression steps 1, 3, 5 (0-based 0, 2, 4) in both, and the same losses
    assert [math.isnan(r.dice_loss) for r in reg_resumed] == [False, True, False, True, False, True]
    assert [r.loss for r in reg_resumed] == [r.loss for r in reg_straight]


def test_segmenter_loss_interval_config_errors():
    with pytest.raises(ConfigError, match="seg_loss_interval must be >= 1"):
        load_config(None, overrides=["regression.seg_loss_interval=0"])
    with pytest.raises(ConfigError, match="belongs to the regression stage"):
        load_config(None, overrides=["segmentation.seg_loss_interval=2"])


def test_auxiliary_outputs_can_be_switched_on_and_off_in_a_running_job(tmp_path: Path, volumes):
    run = tmp_path / "run"

    def config(aux: float):
        c = tiny_config(run, seg_steps=1, reg_steps=20)
        return dataclasses.replace(c, regression=dataclasses.replace(c.regression, aux_seg_weight=aux))

    plain = make_trainer(config(0.0), volumes)
    plain.run(max_steps=3)
    before = {k: v.clone() for k, v in plain.regressor.state_dict().items()}
    on = make_trainer(config(0.5), volumes)
    on.load_checkpoint(latest_checkpoint(run))
    n_out = on.reg_config.out_channels
    assert n_out > 1 and on.step == 2
    head = on.regressor.state_dict()["head.weight"]
    assert torch.equal(head[:1], before["head.weight"]) and not head[1:].any()  # image kept, aux at zero
    moments = on.reg_opt.state_dict()["state"]
    assert all(m["exp_avg"].shape == p.shape for m, p in zip(moments.values(), on.regressor.parameters()))
    on.run(max_steps=2)  # trains with the auxiliary loss, checkpoints the wider head
    off = make_trainer(config(0.0), volumes)
    off.load_checkpoint(latest_checkpoint(run))
    assert off.reg_config.out_channels == 1 and off.step == 4
    assert torch.equal(off.regressor.state_dict()["head.weight"], on.regressor.state_dict()["head.weight"][:1])
    steps: list = []
    off.run(max_steps=1, on_step=steps.append)  # trains on without the auxiliary head
    assert off.step == 5 and len(steps) == 1 and math.isfinite(steps[0].loss)


def test_segmenter_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="belong to the segmentation stage"):
        load_config(None, overrides=[f"regression.init_weights={str(tmp_path)!r}"])
    with pytest.raises(ConfigError, match="belong to the segmentation stage"):
        load_config(None, overrides=["regression.target_blur_max=1.0"])
    with pytest.raises(ConfigError, match="steps = 0"):
        load_config(None, overrides=[f"segmentation.init_weights={str(tmp_path)!r}", "segmentation.steps=0"])
    with pytest.raises(ConfigError, match="target_input_prob"):
        load_config(None, overrides=["segmentation.target_input_prob=1.5"])
    with pytest.raises(ConfigError, match="target_blur_max"):
        load_config(None, overrides=["segmentation.target_blur_max=-1"])


def _seg_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in trainer.segmenter.state_dict().items()}


def test_segmenter_fine_tuning_run_starts_from_the_given_weights(tmp_path: Path, volumes):
    base = make_trainer(tiny_config(tmp_path / "base", seg_steps=3, reg_steps=0), volumes)
    assert base.run().stage == "done"
    source = tmp_path / "base" / "segmenter.safetensors"
    assert load_weights(source).metadata["synthsr_bids.steps"] == "3"
    assert not (tmp_path / "base" / "model.safetensors").exists()  # segmentation-only: no regressor
    again = make_trainer(tiny_config(tmp_path / "base", seg_steps=3, reg_steps=0), volumes)
    assert again.run().stage == "done" and again.regressor is None  # a rerun does not invent one either
    assert not (tmp_path / "base" / "model.safetensors").exists()

    config = tiny_config(tmp_path / "ft", seg_steps=2, reg_steps=0, validate_every=2)
    config = dataclasses.replace(config, segmentation=dataclasses.replace(
        config.segmentation, init_weights=source, target_input_prob=1.0, target_blur_max=1.5))
    ft = make_trainer(config, volumes)
    ft.initialise_segmenter()  # what run() does on a fresh stage
    start = _seg_state(ft)
    reference = load_weights(source).model.state_dict()
    for key, value in start.items():  # float16 file -> the same weights, not a random initialisation
        torch.testing.assert_close(value, reference[key].float(), rtol=0, atol=0)
    assert ft.run().stage == "done"
    tuned = load_weights(tmp_path / "ft" / "segmenter.safetensors")
    assert tuned.metadata["synthsr_bids.steps"] == "5"
    assert tuned.metadata["synthsr_bids.fine_tuned_from"] == sha256_file(source)
    rows = [r.split(",") for r in (tmp_path / "ft" / "validation.csv").read_text().splitlines()[1:]]
    assert len([r for r in rows if r[3] == "mean_dice_target"]) == 1

    missing = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=tmp_path / "ft3"),
                                  segmentation=dataclasses.replace(config.segmentation,
                                                                   init_weights=tmp_path / "gone.safetensors"))
    with pytest.raises(TrainingError, match="gone.safetensors: cannot read the segmenter"):
        make_trainer(missing, volumes).run()

    # a resumed fine-tuning run keeps its origin even if the init file changes meanwhile
    original_sha = sha256_file(source)
    resumed = tiny_config(tmp_path / "ft2", seg_steps=2, reg_steps=0)
    resumed = dataclasses.replace(resumed, segmentation=dataclasses.replace(resumed.segmentation, init_weights=source))
    make_trainer(resumed, volumes).run(max_steps=1)
    shutil.copy(tmp_path / "ft" / "segmenter.safetensors", source)
    assert make_trainer(resumed, volumes).run().stage == "done"
    tuned = load_weights(tmp_path / "ft2" / "segmenter.safetensors")
    assert tuned.metadata["synthsr_bids.fine_tuned_from"] == original_sha
    assert tuned.metadata["synthsr_bids.steps"] == "5"

    # the target Dice of a validation pass is the segmenter's Dice on the clean targets
    check_config = tiny_config(tmp_path / "check", seg_steps=30, reg_steps=0)
    # input and target differ in contrast (PD vs T1), and the segmenter learns enough to tell them apart
    still = GeneratorConfig(crop_shape=(16, 16, 16), scaling=(1.0, 1.0), rotation_deg=0.0, shear=0.0,
                            translation_mm=0.0, svf_std_max=0.0, flip_prob=0.0, contrast_probs=(("pd", 1.0),),
                            isotropic_prob=1.0, plaque_prob=0.0, stroke_prob=0.0, tumour_prob=0.0)
    check_config = dataclasses.replace(check_config, generator=still, segmentation=dataclasses.replace(
        check_config.segmentation, lr=1e-2, target_input_prob=0.5))
    check = make_trainer(check_config, volumes)
    check.run(max_steps=20)
    summary = check.validate()
    check.segmenter.eval()
    n = check.scheme.n_segmentation_labels
    total, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for b in check.validation_batches():
        with torch.no_grad(), check._autocast():
            logits = check.segmenter(check._to_net(b.target * 255.0 / 128.0))
        dice, present = hard_dice(logits.argmax(1), b.labels[:, 0], n)
        total += torch.where(present, dice, torch.zeros_like(dice))
        count += present.double()
    foreground = [float(total[k] / count[k]) for k, label in enumerate(check.scheme.segmentation_labels)
                  if count[k] > 0 and label != 0]
    assert summary["mean_dice_target"] == pytest.approx(np.mean(foreground))
    assert summary["mean_dice_target"] > 0 and summary["mean_dice_target"] != pytest.approx(summary["mean_dice"])

    # what the segmenter sees: the generator input, or the (blurred) clean target
    batch = ft.generator.generate(1)
    for prob, blur_max in ((0.0, 1.5), (1.0, 0.0), (1.0, 1.5)):
        ft.config = dataclasses.replace(config, segmentation=dataclasses.replace(
            config.segmentation, target_input_prob=prob, target_blur_max=blur_max))
        x = ft.segmentation_input(batch)
        if prob == 0.0:
            assert x is batch.input
            continue
        target = batch.target * 255.0 / 128.0
        if blur_max == 0.0:
            torch.testing.assert_close(x, target)
        else:  # smoother (smaller neighbour differences), same mean intensity
            assert x.shape == target.shape and not torch.equal(x, target)
            assert x.diff(dim=2).abs().mean() < target.diff(dim=2).abs().mean()
            assert float(x.mean()) == pytest.approx(float(target.mean()), rel=0.05)


def test_replace_segmenter_in_a_running_regression(tmp_path: Path, volumes):
    run = tmp_path / "run"
    config = tiny_config(run, seg_steps=2, reg_steps=10)
    make_trainer(config, volumes).run(max_steps=4)  # regression step 2
    other = make_trainer(tiny_config(tmp_path / "other", seg_steps=3, reg_steps=0, seed=5), volumes)
    other.run()
    new_file = tmp_path / "other" / "segmenter.safetensors"

    # copying a file by hand is refused at resume: the checkpoint names its segmenter
    old_bytes = (run / "segmenter.safetensors").read_bytes()
    shutil.copy(new_file, run / "segmenter.safetensors")
    with pytest.raises(TrainingError, match="sha256 differs"):
        make_trainer(config, volumes).run(max_steps=1)
    (run / "segmenter.safetensors").write_bytes(old_bytes)

    old_sha, new_sha = sha256_file(run / "segmenter.safetensors"), sha256_file(new_file)
    replace_segmenter(config, new_file)
    assert sha256_file(run / "segmenter.safetensors") == new_sha
    history = (run / "segmenter_history.csv").read_text().splitlines()
    assert history[0] == "time,global_step,step,old_sha256,new_sha256,new_steps,source"
    assert history[1].split(",")[1:] == ["4", "2", old_sha, new_sha, "3", str(new_file.resolve())]
    trainer = make_trainer(config, volumes)
    trainer.run(max_steps=1)
    assert trainer.step == 3
    reference = load_weights(new_file).model.state_dict()
    for key, value in trainer.segmenter.state_dict().items():
        if key in reference:
            torch.testing.assert_close(value.float(), reference[key].float())

    # a second call with the same file changes nothing
    replace_segmenter(config, new_file)
    assert len((run / "segmenter_history.csv").read_text().splitlines()) == 2
    # refused while a training process holds the run directory
    from synthsr_bids.training.loop import run_lock
    with run_lock(run, "test"):
        with pytest.raises(TrainingError, match="in use by another training process"):
            replace_segmenter(config, new_file)
        with pytest.raises(TrainingError, match="in use by another training process"):
            make_trainer(config, volumes).run(max_steps=1)
    # other labels are refused
    relabelled = tmp_path / "relabelled.safetensors"
    loaded = load_weights(new_file)
    labels = json.loads(loaded.metadata["labels"])
    save_safetensors(loaded.model, relabelled, {**loaded.metadata, "labels": json.dumps(labels[::-1])})
    with pytest.raises(TrainingError, match="not this run's segmentation labels"):
        replace_segmenter(config, relabelled)
    assert sha256_file(run / "segmenter.safetensors") == new_sha

    # segmenters written before the "labels" key (like training_runs/default's) still resume
    legacy = load_weights(run / "segmenter.safetensors")
    metadata = {k: v for k, v in legacy.metadata.items() if k != "labels"}
    metadata["synthsr_bids.segmentation_labels"] = legacy.metadata["labels"]
    save_safetensors(legacy.model, tmp_path / "legacy.safetensors", metadata)
    replace_segmenter(config, tmp_path / "legacy.safetensors")
    resumed = make_trainer(config, volumes)
    steps: list = []
    resumed.run(max_steps=1, on_step=steps.append)
    assert len(steps) == 1 and steps[0].stage == "regression" and math.isfinite(steps[0].loss)
    frozen = resumed.segmenter.state_dict()
    assert all(torch.equal(frozen[k].cpu(), v) for k, v in legacy.model.state_dict().items())  # the legacy weights

    from synthsr_bids.training.report import write_training_report
    html = write_training_report(config).read_text()
    assert "Frozen segmenter replaced</th><td>at regression steps 2, 3 (" in html

    wrong = tiny_config(tmp_path / "wrong", seg_steps=1, reg_steps=0)
    wrong = dataclasses.replace(wrong, segmentation=dataclasses.replace(wrong.segmentation, base_features=6))
    make_trainer(wrong, volumes).run()
    with pytest.raises(TrainingError, match="does not match"):
        replace_segmenter(config, tmp_path / "wrong" / "segmenter.safetensors")
    with pytest.raises(TrainingError, match="regression stage"):
        replace_segmenter(tiny_config(tmp_path / "other", seg_steps=3, reg_steps=0), new_file)


def test_regression_loss_terms():
    target = torch.full((1, 1, 4, 4, 4), 0.5)
    labels = torch.zeros(1, 1, 4, 4, 4, dtype=torch.int64)
    labels[..., 2:] = 1
    image = torch.full((1, 1, 4, 4, 4), 0.25)
    plain = regression_loss(image, target, labels, segmenter=None, seg_weight=0.25)
    assert plain.l1 == pytest.approx(0.25) and plain.dice_loss == 0.0 and plain.aux_dice_loss == 0.0
    # perfect auxiliary logits: softmax ~ one-hot of the labels, Dice loss ~ 0
    logits = torch.nn.functional.one_hot(labels[:, 0], 2).permute(0, 4, 1, 2, 3).float() * 40.0
    terms = regression_loss(torch.cat([image, logits], 1), target, labels, segmenter=None, seg_weight=0.25,
                            aux_weight=2.0)
    assert terms.l1 == pytest.approx(0.25) and terms.aux_dice_loss == pytest.approx(0.0, abs=1e-4)
    swapped = regression_loss(torch.cat([image, logits.flip(1)], 1), target, labels, segmenter=None,
                              seg_weight=0.25, aux_weight=2.0)
    assert swapped.aux_dice_loss == pytest.approx(1.0, abs=1e-4)
    assert float(swapped.total) == pytest.approx(0.25 + 2.0 * swapped.aux_dice_loss, rel=1e-5)
    with pytest.raises(ValueError, match="auxiliary"):
        regression_loss(image, target, labels, segmenter=None, seg_weight=0.0, aux_weight=1.0)


def test_old_loss_log_is_upgraded_before_new_rows_are_appended(tmp_path: Path, volumes):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.csv").write_text("time,stage,step,global_step,loss,l1,dice_loss,generator_s,network_s\n"
                                  "1,segmentation,1,1,0.9,,0.9,0.5,1.5\n")
    make_trainer(tiny_config(run, seg_steps=2, reg_steps=0), volumes).run(max_steps=1)
    lines = (run / "loss.csv").read_text().splitlines()
    assert lines[0].split(",") == list(LOSS_COLUMNS)
    assert lines[1] == "1,segmentation,1,1,0.9,,0.9,0.5,1.5,"
    assert len(lines) == 3 and len(lines[2].split(",")) == len(LOSS_COLUMNS)


def test_command_line_train_and_export(tmp_path: Path):
    maps = tmp_path / "maps"
    maps.mkdir()
    for i, shape in enumerate([(36, 36, 36), (38, 36, 36)]):
        nib.save(nib.Nifti1Image(head_phantom(shape), np.eye(4)), maps / f"seg_{i}.nii.gz")
    left_only = np.where(np.isin(head_phantom((36, 36, 36)), [41, 42]), 2, head_phantom((36, 36, 36)))
    nib.save(nib.Nifti1Image(left_only.astype(np.int32), np.eye(4)), maps / "val.nii")
    (tmp_path / "val").mkdir()
    (maps / "val.nii").rename(tmp_path / "val" / "val.nii")
    toml = tmp_path / "train.toml"
    toml.write_text(
        '[run]\ndir = "run"\nthreads = 1\nlog_every = 1\nvalidate_every = 2\nvalidation_samples = 1\n'
        '[data]\ntraining_maps = ["maps"]\nvalidation_maps = ["val"]\nvalidation_split_left_right = true\n'
        '[generator]\ncrop_shape = [16, 16, 16]\n'
        '[segmentation]\nbase_features = 4\nn_levels = 2\nsteps = 2\n'
        '[regression]\nbase_features = 4\nn_levels = 2\nsteps = 2\nema_decay = 0.9\n'
    )
    cmd = [sys.executable, "-m", "synthsr_bids.training"]
    # a time budget already spent: no step, a clean exit
    done = subprocess.run(cmd + ["train", "--config", str(toml), "--max-minutes", "0"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "global step 0 (0 steps this session)" in done.stderr
    done = subprocess.run(cmd + ["train", "--config", str(toml)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "session over: stage done, global step 4 (4 steps this session)" in done.stderr
    run = tmp_path / "run"
    assert (run / "train.log").is_file() and latest_checkpoint(run).name == "ckpt-00000004.pt"
    out = tmp_path / "exported.safetensors"
    done = subprocess.run(cmd + ["export", "--config", str(toml), "--output", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_weights(out).config.base_features == 4
    assert load_weights(out).metadata["synthsr_bids.weights"] == "ema 0.9 over 2 steps"  # the weight average
    assert load_weights(out).sharpen is True  # [regression].output_sharpening defaults to mri_synthsr's
    done = subprocess.run(cmd + ["export", "--config", str(toml), "--output", str(out), "--raw",
                                 "--set", "regression.output_sharpening=false"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and load_weights(out).metadata["synthsr_bids.weights"] == "raw"
    assert load_weights(out).sharpen is False and "ask inference not to sharpen" in done.stderr

    # report: curves from the logs, the validation sample through the newest checkpoint
    done = subprocess.run(cmd + ["report", "--config", str(toml)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    index = Path(done.stdout.strip())
    assert index == run / "report" / "index.html"
    html = index.read_text()
    assert "Regression stage</th><td>2 of 2 steps" in html and "ckpt-00000004.pt" in html
    assert 'src="curves.png"' in html and 'src="samples.png"' in html
    assert "weight average: ema 0.9 over 2 steps" in html and "l1_ema" in html
    for name in ("curves.png", "samples.png"):
        assert (index.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # ship: both networks into a copy of the package data, registered with size and sha256
    package = tmp_path / "package-data"
    (package / "models").mkdir(parents=True)
    shutil.copy(REPO / "synthsr_bids" / "data" / "models.json", package / "models.json")
    (package / "models" / "synthsr-bids_v0.0.1.safetensors").write_bytes(b"older version")
    done = subprocess.run(cmd + ["ship", "--config", str(toml), "--version", "0.1.0.dev2", "--preview",
                                 "--set", "regression.output_sharpening=false",
                                 "--package-data", str(package)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    check_shipped(package, version="0.1.0.dev2", reg_steps=2, seg_steps=2)
    reg = load_weights(package / "models" / "synthsr-bids_v0.1.0.dev2.safetensors")
    assert reg.metadata["synthsr_bids.status"] == "preview"
    assert reg.metadata["synthsr_bids.weights"] == "ema 0.9 over 2 steps"
    assert reg.sharpen is False and reg.metadata["synthsr_bids.sharpen"] == "false"  # the pipeline follows it
    done = subprocess.run(cmd + ["ship", "--config", str(toml), "--version", "0.1.0.dev3", "--raw",
                                 "--package-data", str(package)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    raw = load_weights(package / "models" / "synthsr-bids_v0.1.0.dev3.safetensors")
    assert raw.metadata["synthsr_bids.weights"] == "raw" and "synthsr_bids.status" not in raw.metadata
    assert raw.sharpen is True
    bad = subprocess.run(cmd + ["ship", "--config", str(toml), "--version", "../x", "--package-data", str(package)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 65 and "version" in bad.stderr

    bad = subprocess.run(cmd + ["replace-segmenter", "--config", str(toml), str(run / "segmenter.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 65 and "only be replaced in the regression stage" in bad.stderr

    bad = subprocess.run(cmd + ["train", "--config", str(toml), "--set", "regression.bogus=1"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 64 and "bogus" in bad.stderr


def check_shipped(package: Path, *, version: str, reg_steps: int, seg_steps: int) -> None:
    """The registry names both files with their true size and SHA-256; the segmenter meets morphometry's contract."""
    from synthsr_bids.hashing import sha256_file
    from synthsr_bids.models.registry import _parse_registry
    from synthsr_bids.morphometry.segment import segmenter_from_network

    specs, default = _parse_registry((package / "models.json").read_text(), source="test", allow_bundled=True)
    assert default == "synthsr-bids"
    files = sorted(p.name for p in (package / "models").iterdir())
    assert files == [f"synthsr-bids-seg_v{version}.safetensors", f"synthsr-bids_v{version}.safetensors"]
    for name in ("synthsr-bids", "synthsr-bids-seg"):
        spec = specs[name]
        path = package / "models" / spec.filename
        assert spec.bundled and spec.version == version and spec.license == "Apache-2.0"
        assert spec.size == path.stat().st_size and spec.sha256 == sha256_file(path)
    assert {"synthsr-v1", "synthsr-v2", "synthsr-lowfield"} <= set(specs)  # other entries kept
    reg = load_weights(package / "models" / specs["synthsr-bids"].filename)
    assert reg.config.final_activation == "linear" and reg.metadata["synthsr_bids.trained_steps"] == str(reg_steps)
    seg = load_weights(package / "models" / specs["synthsr-bids-seg"].filename)
    segmenter = segmenter_from_network(seg.model, seg.metadata, name="synthsr-bids-seg", sha256="x")
    assert segmenter.input_scale == pytest.approx(1 / 128)
    assert len(segmenter.table.ids) == seg.config.out_channels and 2 in segmenter.table.ids and 41 in segmenter.table.ids
    assert seg.metadata["synthsr_bids.steps"] == str(seg_steps)


def test_loss_log_of_an_older_run_gets_the_new_columns_atomically(tmp_path: Path):
    from synthsr_bids.training.loop import LOSS_COLUMNS, _upgrade_loss_log

    log = tmp_path / "loss.csv"
    log.write_text("time,stage,step,global_step,loss,l1,dice_loss,generator_s,network_s\n"
                   "1,regression,7,107,0.3,0.2,0.4,0.1,1.0\n")
    _upgrade_loss_log(log)
    lines = log.read_text().splitlines()
    assert lines == [",".join(LOSS_COLUMNS), "1,regression,7,107,0.3,0.2,0.4,0.1,1.0,"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv"]  # no temporary file left
    before = log.stat().st_mtime_ns
    _upgrade_loss_log(log)  # already current: not rewritten
    assert log.stat().st_mtime_ns == before
