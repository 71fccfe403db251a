"""The regression weight average (``[regression].ema_decay``, synthsr_bids/training/ema.py)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from synthsr_bids.models.weights import load_weights
from synthsr_bids.training.config import ConfigError, load_config
from synthsr_bids.training.ema import EMA_FILE, WeightAverage
from synthsr_bids.training.labels import label_volume_from_array, load_label_scheme
from synthsr_bids.training.loop import (
    Trainer,
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
    history = []
    for value in (3.0, 5.0):
        with torch.no_grad():
            net[0].weight.fill_(value)
            net[1].num_batches_tracked += 7
        average.update(net)
        history.append(float(average.state["0.weight"][0, 0]))
    # 0.75 * 1 + 0.25 * 3 = 1.5, then 0.75 * 1.5 + 0.25 * 5 = 2.375
    assert history == pytest.approx([1.5, 2.375])
    assert int(average.state["1.num_batches_tracked"]) == 14  # integer buffers are copied, not averaged
    assert float(net[0].weight.detach()[0, 0]) == 5.0  # the network itself is untouched
    copy = average.copy_to(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    assert float(copy[0].weight.detach()[0, 0]) == pytest.approx(2.375)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, 1.0)


def test_saved_average_resumes_only_at_its_own_step(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    net = torch.nn.Linear(3, 1)
    average = WeightAverage(net, 0.9)
    with torch.no_grad():
        average.state["weight"].fill_(0.25)
    path = average.save(tmp_path / EMA_FILE, global_step=40)
    assert sorted(p.name for p in tmp_path.iterdir()) == [EMA_FILE]
    assert load_file(str(path))["weight"].dtype == torch.float32
    back = WeightAverage.resume(path, net, 0.9, global_step=40)
    assert back.restored and torch.equal(back.state["weight"], torch.full((1, 3), 0.25))
    with caplog.at_level(logging.WARNING):
        stale = WeightAverage.resume(path, net, 0.9, global_step=41)
    assert not stale.restored and torch.equal(stale.state["weight"], net.weight.detach())
    assert "belongs to global step 40" in caplog.text
    other = WeightAverage.resume(path, torch.nn.Linear(4, 1), 0.9, global_step=40)  # another network
    assert not other.restored
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert not WeightAverage.resume(tmp_path / "broken.safetensors", net, 0.9, global_step=40).restored
    assert not WeightAverage.resume(tmp_path / "missing.safetensors", net, 0.9, global_step=40).restored


def test_config_accepts_decay_in_regression_only(tmp_path: Path):
    assert load_config(None, overrides=["regression.ema_decay=0.999"]).regression.ema_decay == 0.999
    for bad in ("regression.ema_decay=1.0", "regression.ema_decay=-0.1", "segmentation.ema_decay=0.9"):
        with pytest.raises(ConfigError, match="ema_decay"):
            load_config(None, overrides=[bad])


def test_training_keeps_validates_resumes_and_exports_the_average(tmp_path: Path, volumes):
    run = tmp_path / "run"
    trainer = trainer_for(ema_config(run), volumes)
    trainer.run(max_steps=4)  # 1 segmentation + 3 regression steps
    assert (run / EMA_FILE).is_file()
    raw = {k: v.clone() for k, v in trainer.regressor.state_dict().items()}
    averaged = {k: v.clone() for k, v in trainer.reg_ema.state.items()}
    assert not torch.equal(raw["head.weight"], averaged["head.weight"])  # lr 1e-2 moved the weights

    # resume: continues with the saved average, exactly like a run that never stopped
    shutil.copytree(run, tmp_path / "copy")
    resumed = trainer_for(ema_config(tmp_path / "copy"), volumes)
    resumed.run(max_steps=2)
    straight = trainer_for(ema_config(tmp_path / "straight"), volumes)
    straight.run(max_steps=6)
    for key, value in straight.reg_ema.state.items():
        assert torch.allclose(resumed.reg_ema.state[key], value, atol=1e-6), key

    # validation logs the average next to the raw weights
    summary = resumed.validate()
    assert summary["l1_ema"] != summary["l1"]
    rows = [r.split(",") for r in (tmp_path / "copy" / "validation.csv").read_text().splitlines()[1:]]
    metrics = {r[3]: float(r[6]) for r in rows if r[1] == "regression"}
    assert {"l1", "l1_ema"} <= set(metrics) and metrics["l1"] != metrics["l1_ema"]

    # exports: the average by default (as the run's own model.safetensors), the raw weights on request
    ckpt = latest_checkpoint(tmp_path / "copy")
    from_ckpt = regressor_from_checkpoint(ckpt)
    assert from_ckpt.weights == "ema 0.5" and from_ckpt.steps == 5
    assert torch.allclose(from_ckpt.model.state_dict()["head.weight"], resumed.reg_ema.state["head.weight"])
    assert regressor_from_checkpoint(ckpt, average=False).weights == "raw"
    exported = load_weights(export_from_checkpoint(ckpt, tmp_path / "ema.safetensors"))
    assert exported.metadata["synthsr_bids.weights"] == "ema 0.5"
    own = load_weights(tmp_path / "copy" / "model.safetensors")
    assert own.metadata["synthsr_bids.weights"] == "ema 0.5"
    assert torch.allclose(own.model.state_dict()["head.weight"].float(),
                          resumed.reg_ema.state["head.weight"].float(), atol=1e-3)


def test_average_older_than_the_checkpoint_is_restarted(tmp_path: Path, volumes, caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    trainer_for(ema_config(run), volumes).run(max_steps=3)
    average = load_file(str(run / EMA_FILE))
    # simulate a crash between the two writes: the average of another step
    save_file(average, str(run / EMA_FILE), metadata={"global_step": "2"})
    with caplog.at_level(logging.WARNING):
        resumed = trainer_for(ema_config(run), volumes)
        resumed.run(max_steps=1)
    assert "belongs to global step 2" in caplog.text
    assert regressor_from_checkpoint(latest_checkpoint(run)).weights == "ema 0.5"  # the new file is consistent
