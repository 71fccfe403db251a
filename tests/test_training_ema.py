"""The regression weight average (``[regression].ema_decay``, synthsr_bids/training/ema.py)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synthsr_bids.models.weights import load_weights
from synthsr_bids.training.config import ConfigError, load_config
from synthsr_bids.training.ema import AverageUnavailable, WeightAverage, ema_path
from synthsr_bids.training.labels import label_volume_from_array, load_label_scheme
from synthsr_bids.training.loop import (
    Trainer,
    TrainingError,
    export_from_checkpoint,
    latest_checkpoint,
    regressor_from_checkpoint,
)
from synthsr_bids.training.phantoms import head_phantom


@pytest.fixture(scope="module")
def volumes():
    scheme = load_label_scheme()
    return [label_volume_from_array(head_phantom((36, 36, 36)), scheme, name="phantom0"),
            label_volume_from_array(head_phantom((40, 36, 38)), scheme, name="phantom1")]


def ema_config(run_dir: Path, *, decay: float = 0.5, reg_steps: int = 6, **run) -> object:
    config = load_config(None, overrides=[
        f"run.dir={str(run_dir)!r}", "run.threads=1", "run.seed=5", "run.log_every=1",
        "run.checkpoint_every=1000", "run.validate_every=1000", "run.validation_samples=1",
        "segmentation.steps=1", "segmentation.base_features=4", "segmentation.n_levels=2",
        f"regression.steps={reg_steps}", "regression.base_features=4", "regression.n_levels=2",
        "regression.lr=1e-2", f"regression.ema_decay={decay}",
    ])
    return dataclasses.replace(config, generator=dataclasses.replace(config.generator, crop_shape=(16, 16, 16)),
                               run=dataclasses.replace(config.run, **run))


def trainer_for(config, volumes) -> Trainer:
    return Trainer(config, volumes=volumes, validation_volumes=volumes[:1])


def test_average_is_the_exponential_moving_average_of_the_weights():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    average = WeightAverage(net, 0.75)
    average.updates = 100  # past the warm-up: the decay is 0.75
    history = []
    for value in (3.0, 5.0):
        with torch.no_grad():
            net[0].weight.fill_(value)
            net[1].num_batches_tracked += 7
        average.update(net)
        history.append(float(average.state["0.weight"][0, 0]))
    # 0.75 * 1 + 0.25 * 3 = 1.5, then 0.75 * 1.5 + 0.25 * 5 = 2.375
    assert history == pytest.approx([1.5, 2.375])
    assert average.updates == 102 and average.describe() == "ema 0.75 over 102 steps"
    assert int(average.state["1.num_batches_tracked"]) == 14  # integer buffers are copied, not averaged
    assert float(net[0].weight.detach()[0, 0]) == 5.0  # the network itself is untouched
    copy = average.copy_to(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    assert float(copy[0].weight.detach()[0, 0]) == pytest.approx(2.375)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, 1.0)


def test_young_average_warms_up_instead_of_keeping_its_starting_point():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(100.0)  # e.g. a random initialisation
    average = WeightAverage(net, 0.999)
    assert average.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        net.weight.fill_(0.0)  # the trained weights
    for _ in range(200):
        average.update(net)
    # without the warm-up, 0.999 ** 200 = 82 % of the starting point would remain
    assert float(average.state["weight"]) < 0.01 * 100.0
    average.updates = 10**6
    assert average.current_decay() == 0.999


def test_saved_average_loads_only_for_its_own_step_and_network(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    net = torch.nn.Linear(3, 2)
    average = WeightAverage(net, 0.9)
    average.updates = 42
    with torch.no_grad():
        average.state["weight"].fill_(0.25)
    path = average.save(ema_path(tmp_path, 40), global_step=40)
    assert path.name == "ema-00000040.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    assert load_file(str(path))["weight"].dtype == torch.float32
    back = WeightAverage.load(path, net, 0.9, global_step=40)
    assert back.updates == 42 and torch.equal(back.state["weight"], torch.full((2, 3), 0.25))
    with pytest.raises(AverageUnavailable, match="belongs to global step 40, not 41"):
        WeightAverage.load(path, net, 0.9, global_step=41)
    with pytest.raises(AverageUnavailable, match="does not fit"):
        WeightAverage.load(path, torch.nn.Linear(4, 2), 0.9, global_step=40)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AverageUnavailable, match="not a readable"):
        WeightAverage.load(tmp_path / "broken.safetensors", net, 0.9, global_step=40)
    # an output layer that gained a row keeps its averaged rows; the new one comes from the network
    wider = torch.nn.Linear(3, 3)
    grown = WeightAverage.load(path, wider, 0.9, global_step=40, resizable=("weight", "bias"))
    assert torch.equal(grown.state["weight"][:2], torch.full((2, 3), 0.25))
    assert torch.equal(grown.state["weight"][2], wider.weight.detach()[2])
    # resume(): the same, but a fresh average (with the reason logged) instead of an error
    with caplog.at_level(logging.WARNING):
        stale = WeightAverage.resume(path, net, 0.9, global_step=41)
    assert stale.updates == 0 and torch.equal(stale.state["weight"], net.weight.detach())
    assert "restarts from the current weights" in caplog.text


def test_config_accepts_decay_in_regression_only(tmp_path: Path):
    assert load_config(None, overrides=["regression.ema_decay=0.999"]).regression.ema_decay == 0.999
    for bad in ("regression.ema_decay=1.0", "regression.ema_decay=-0.1", "segmentation.ema_decay=0.9"):
        with pytest.raises(ConfigError, match="ema_decay"):
            load_config(None, overrides=[bad])


def run_files(run: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(prefix))


def test_training_keeps_validates_resumes_and_exports_the_average(tmp_path: Path, volumes):
    run = tmp_path / "run"
    trainer = trainer_for(ema_config(run, checkpoint_every=1), volumes)
    trainer.run(max_steps=4)  # 1 segmentation + 3 regression steps
    # one average, beside its checkpoint; none in the segmentation stage's checkpoints
    assert run_files(run, "ema-") == ["ema-00000004.safetensors"] and run_files(run, "ckpt-") == ["ckpt-00000004.pt"]
    assert trainer.reg_ema.updates == 3
    raw = trainer.regressor.state_dict()
    assert not torch.equal(raw["head.weight"], trainer.reg_ema.state["head.weight"])  # lr 1e-2 moved the weights

    # resume: continues with the saved average, exactly like a run that never stopped
    shutil.copytree(run, tmp_path / "copy")
    resumed = trainer_for(ema_config(tmp_path / "copy"), volumes)
    resumed.run(max_steps=2)
    straight = trainer_for(ema_config(tmp_path / "straight"), volumes)
    straight.run(max_steps=6)
    assert resumed.reg_ema.updates == straight.reg_ema.updates == 5
    for key, value in straight.reg_ema.state.items():
        assert torch.allclose(resumed.reg_ema.state[key], value, atol=1e-6), key
    assert run_files(tmp_path / "copy", "ema-") == ["ema-00000006.safetensors"]  # the old one is gone

    # validation logs the average next to the raw weights
    summary = resumed.validate()
    assert summary["l1_ema"] != summary["l1"]
    rows = [r.split(",") for r in (tmp_path / "copy" / "validation.csv").read_text().splitlines()[1:]]
    assert {"l1", "l1_ema"} <= {r[3] for r in rows if r[1] == "regression"}

    # exports: the average by default (as the run's own model.safetensors), the raw weights on request
    ckpt = latest_checkpoint(tmp_path / "copy")
    from_ckpt = regressor_from_checkpoint(ckpt)
    assert from_ckpt.weights == "ema 0.5 over 5 steps" and from_ckpt.steps == 5
    assert torch.allclose(from_ckpt.model.state_dict()["head.weight"], resumed.reg_ema.state["head.weight"])
    raw_ckpt = regressor_from_checkpoint(ckpt, average=False)
    assert raw_ckpt.weights == "raw"
    assert torch.allclose(raw_ckpt.model.state_dict()["head.weight"], resumed.regressor.state_dict()["head.weight"])
    exported = load_weights(export_from_checkpoint(ckpt, tmp_path / "ema.safetensors", sharpen=True))
    assert exported.metadata["synthsr_bids.weights"] == "ema 0.5 over 5 steps"
    own = load_weights(tmp_path / "copy" / "model.safetensors")
    assert own.metadata["synthsr_bids.weights"] == "ema 0.5 over 5 steps"
    assert torch.allclose(own.model.state_dict()["head.weight"].float(),
                          resumed.reg_ema.state["head.weight"].float(), atol=1e-3)
    # without its average, a checkpoint of such a run refuses to export it silently as raw weights
    ema_path(tmp_path / "copy", 6).unlink()
    with pytest.raises(TrainingError, match="--raw"):
        regressor_from_checkpoint(ckpt)
    assert regressor_from_checkpoint(ckpt, average=False).weights == "raw"


def test_lost_average_restarts_from_the_checkpoint_weights(tmp_path: Path, volumes, caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    trainer_for(ema_config(run), volumes).run(max_steps=3)
    # a crash between the two writes of the next checkpoint leaves the next average beside the
    # last checkpoint and its own average: the resume uses the checkpoint's own
    shutil.copyfile(run / "ema-00000003.safetensors", run / "ema-00000004.safetensors")
    crashed = trainer_for(ema_config(run), volumes)
    crashed.load_checkpoint(latest_checkpoint(run))
    assert crashed.reg_ema.updates == 2
    # a checkpoint without its average (lost, or copied without it) restarts it from its weights
    (run / "ema-00000003.safetensors").unlink()
    with caplog.at_level(logging.INFO):
        resumed = trainer_for(ema_config(run), volumes)
        resumed.load_checkpoint(latest_checkpoint(run))
    assert "starts at global step 3 from the current weights" in caplog.text
    assert resumed.reg_ema.updates == 0
    for key, value in resumed.regressor.state_dict().items():
        assert torch.equal(resumed.reg_ema.state[key], value), key


def test_switching_auxiliary_outputs_keeps_the_average(tmp_path: Path, volumes):
    run = tmp_path / "run"
    first = trainer_for(ema_config(run), volumes)
    first.run(max_steps=4)
    before = first.reg_ema.state["head.weight"].clone()
    config = ema_config(run)
    config = dataclasses.replace(config, regression=dataclasses.replace(config.regression, aux_seg_weight=0.5))
    resumed = trainer_for(config, volumes)
    resumed.load_checkpoint(latest_checkpoint(run))
    assert resumed.reg_ema.updates == 3  # kept, not restarted
    head = resumed.reg_ema.state["head.weight"]
    assert head.shape[0] == resumed.reg_config.out_channels > 1
    assert torch.equal(head[:1], before)
