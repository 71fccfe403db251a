"""Data-parallel training ([run].processes > 1, synthsr_bids/training/parallel.py): real gloo workers on loopback."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synthsr_bids.training.config import ConfigError, load_config
from synthsr_bids.training.labels import label_volume_from_array, load_label_scheme
from synthsr_bids.training.loop import Trainer, latest_checkpoint
from synthsr_bids.training.parallel import SINGLE, ProcessGroup, WorkerFailed, launch
from synthsr_bids.training.phantoms import head_phantom


def _config(run_dir: Path, **regression):  # type: ignore[no-untyped-def]
    config = load_config(None, overrides=[
        f"run.dir={str(run_dir)!r}", "run.threads=1", "run.seed=3", "run.log_every=1", "run.processes=2",
        "run.checkpoint_every=1000", "run.validate_every=1000", "run.validation_samples=1",
        "segmentation.steps=2", "segmentation.base_features=4", "segmentation.n_levels=2",
        "regression.steps=3", "regression.base_features=4", "regression.n_levels=2", "regression.lr=1e-2",
    ])
    return dataclasses.replace(config, generator=dataclasses.replace(config.generator, crop_shape=(16, 16, 16)),
                               regression=dataclasses.replace(config.regression, **regression))


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _two_workers(out: Path, group: ProcessGroup, regression: dict | None = None) -> None:
    """Spawned worker: train a tiny run, then report its weights' digest and first sample (rank by rank)."""
    scheme = load_label_scheme()
    volumes = [label_volume_from_array(head_phantom((36, 36, 36)), scheme, name="p0"),
               label_volume_from_array(head_phantom((40, 36, 38)), scheme, name="p1")]
    trainer = Trainer(_config(out / "run", **(regression or {})), volumes=volumes, validation_volumes=volumes[:1],
                      group=group)
    losses: list[float] = []
    dice: list[float] = []
    trainer.run(on_step=lambda r: (losses.append(r.loss), dice.append(r.dice_loss)))
    sample = trainer.generator.generate(1).input
    result = {"rank": group.rank, "regressor": _digest(trainer.regressor), "segmenter": _digest(trainer.segmenter),
              "sample": float(sample.sum()), "losses": losses, "dice": [None if math.isnan(d) else d for d in dice]}
    (out / f"rank{group.rank}.json").write_text(json.dumps(result))


def test_workers_keep_identical_weights_on_different_samples(tmp_path: Path):
    launch(_worker_target(tmp_path), 2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["regressor"] == ranks[1]["regressor"] and ranks[0]["segmenter"] == ranks[1]["segmenter"]
    assert ranks[0]["sample"] != ranks[1]["sample"]  # each worker draws its own samples
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 5  # the workers' mean
    run = tmp_path / "run"
    # rank 0 alone wrote the files: one loss row per step, one checkpoint with both workers' streams
    rows = list(csv.DictReader((run / "loss.csv").open()))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == pytest.approx(ranks[0]["losses"], rel=1e-5)
    state = torch.load(latest_checkpoint(run), map_location="cpu", weights_only=True)
    assert len(state["generator_rng_ranks"]) == 2 and len(state["torch_rng_ranks"]) == 2
    assert (run / "model.safetensors").is_file()


def _worker_target(out: Path, **regression):  # type: ignore[no-untyped-def]
    import functools

    return functools.partial(_two_workers, out, regression=regression)


def test_workers_take_the_sparse_segmenter_loss_on_the_same_steps(tmp_path: Path):
    launch(_worker_target(tmp_path, seg_loss_interval=2), 2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["regressor"] == ranks[1]["regressor"]
    # 2 segmentation steps, then regression steps 0-based 0, 1, 2: the Dice term on 0 and 2 only, in both
    # workers (a worker out of phase would make the averaged Dice nan on every step)
    for rank in ranks:
        reg = rank["dice"][2:]
        assert reg[0] is not None and reg[1] is None and reg[2] is not None
    rows = [r for r in csv.DictReader((tmp_path / "run" / "loss.csv").open()) if r["stage"] == "regression"]
    assert [r["dice_loss"] == "" for r in rows] == [False, True, False]


def _finish_then_abort_in_teardown(out: Path, group: ProcessGroup) -> None:
    (out / f"done{group.rank}").write_text("1")
    if group.rank == 1:  # as torch/gloo under load: "terminate called without an active exception"
        torch.distributed.destroy_process_group = os.abort


def _abort_during_work(out: Path, group: ProcessGroup) -> None:
    if group.rank == 1:
        os.abort()
    (out / f"done{group.rank}").write_text("1")


def test_a_worker_aborting_in_teardown_after_the_work_is_not_a_failure(tmp_path: Path, caplog):
    import functools

    with caplog.at_level(logging.WARNING, logger="synthsr_bids.training"):
        launch(functools.partial(_finish_then_abort_in_teardown, tmp_path), 2)
    assert (tmp_path / "done0").is_file() and (tmp_path / "done1").is_file()
    assert "ended abnormally while shutting down" in caplog.text
    with pytest.raises(WorkerFailed, match="SIGABRT"):
        launch(functools.partial(_abort_during_work, tmp_path / "x"), 2)


def test_single_group_is_a_no_op():
    net = torch.nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    grad = net.weight.grad.clone()
    SINGLE.average_gradients(net.parameters())
    assert torch.equal(net.weight.grad, grad)
    assert SINGLE.mean([1.0, float("nan")])[0] == 1.0 and SINGLE.any(True) and not SINGLE.any(False)
    assert SINGLE.gather("x") == ["x"] and SINGLE.generator_seed(7) == 7


def test_processes_config_errors():
    assert load_config(None, overrides=["run.processes=2"]).run.processes == 2
    with pytest.raises(ConfigError, match="processes"):
        load_config(None, overrides=["run.processes=0"])
    with pytest.raises(ConfigError, match="CPU"):
        load_config(None, overrides=["run.processes=2", 'run.device="cuda"'])


def _write_toml(tmp_path: Path, run: str, *, processes: int = 2, steps: int = 4) -> Path:
    maps = tmp_path / "maps"
    if not maps.exists():
        maps.mkdir()
        for i, shape in enumerate([(36, 36, 36), (38, 36, 36)]):
            nib.save(nib.Nifti1Image(head_phantom(shape), np.eye(4)), maps / f"seg_{i}.nii.gz")
    toml = tmp_path / f"{run}.toml"
    toml.write_text(
        f'[run]\ndir = "{run}"\nthreads = 1\nprocesses = {processes}\nlog_every = 1\ncheckpoint_every = 1000\n'
        'validate_every = 1000\nseed = 9\n'
        '[data]\ntraining_maps = ["maps"]\n'
        '[generator]\ncrop_shape = [16, 16, 16]\n'
        '[segmentation]\nbase_features = 4\nn_levels = 2\nsteps = 1\n'
        f'[regression]\nbase_features = 4\nn_levels = 2\nsteps = {steps}\nlr = 1e-2\nema_decay = 0.5\n')
    return toml


def _losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((run / "loss.csv").open())]


def test_command_line_resume_continues_every_worker_exactly(tmp_path: Path):
    cmd = [sys.executable, "-m", "synthsr_bids.training", "train"]
    straight = subprocess.run(cmd + ["--config", str(_write_toml(tmp_path, "straight", steps=4))],
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    toml = _write_toml(tmp_path, "stopped", steps=4)
    first = subprocess.run(cmd + ["--config", str(toml), "--max-steps", "3"], capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr
    assert "starting 2 data-parallel workers" in first.stderr
    second = subprocess.run(cmd + ["--config", str(toml)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert len(_losses(tmp_path / "stopped")) == 5
    assert _losses(tmp_path / "stopped") == pytest.approx(_losses(tmp_path / "straight"), rel=1e-6)
    log = (tmp_path / "stopped" / "train.log").read_text()
    assert "resumed from" in log and "weight average resumed" in log
    # the same exported weights (the weight average) as the run that never stopped
    ours, theirs = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("stopped", "straight"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_command_line_resume_from_a_single_process_checkpoint(tmp_path: Path):
    cmd = [sys.executable, "-m", "synthsr_bids.training", "train", "--config"]
    toml = _write_toml(tmp_path, "run", processes=1, steps=4)
    first = subprocess.run(cmd + [str(toml), "--max-steps", "2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    single = _losses(tmp_path / "run")
    toml.write_text(toml.read_text().replace("processes = 1", "processes = 2"))
    second = subprocess.run(cmd + [str(toml)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "written by 1 worker(s), this run has 2" in (tmp_path / "run" / "train.log").read_text()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 5 and losses[:2] == single
    state = torch.load(latest_checkpoint(tmp_path / "run"), map_location="cpu", weights_only=True)
    assert state["stage"] == "done" and len(state["generator_rng_ranks"]) == 2


def test_a_failing_worker_stops_the_run_with_a_clear_error(tmp_path: Path):
    from synthsr_bids.training.loop import run_lock

    toml = _write_toml(tmp_path, "run", steps=4)
    (tmp_path / "run").mkdir()
    with run_lock(tmp_path / "run", "test"):  # another job holds the run: rank 0 refuses to start
        done = subprocess.run([sys.executable, "-m", "synthsr_bids.training", "train", "--config", str(toml)],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 65
    assert "a training worker failed" in done.stderr and "in use by another training process" in done.stderr
    assert "in use by another training process" in (tmp_path / "run" / "train.log").read_text()


def test_sigterm_to_the_launcher_stops_all_workers_with_a_checkpoint(tmp_path: Path):
    toml = _write_toml(tmp_path, "run", steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "synthsr_bids.training", "train", "--config", str(toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "loss.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    steps = len(_losses(tmp_path / "run"))
    assert steps >= 3
    assert latest_checkpoint(tmp_path / "run").name == f"ckpt-{steps:08d}.pt"
    assert f"session over: stage regression, global step {steps}" in (tmp_path / "run" / "train.log").read_text()
