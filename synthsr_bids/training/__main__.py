"""``python -m synthsr_bids.training {train,export,ship,report,replace-segmenter,compare,benchmark}``.

* ``train``: run/resume the two-stage job of a TOML config (see ``configs/default.toml``) until it
  is done, ``--max-steps`` or ``--max-minutes``; SIGTERM/SIGINT stop after the current step with a
  checkpoint.
* ``export``: write the regression weights of the newest checkpoint as float16 safetensors (the
  weight average when the run keeps one, unless ``--raw``).
* ``ship``: put the newest regression weights and the run's segmenter into the package as the
  bundled ``synthsr-bids`` / ``synthsr-bids-seg`` models (files + ``models.json``).
* ``report``: ``<run dir>/report/index.html``: loss and validation curves, the validation samples
  through the newest checkpoint, Dice per structure.
* ``replace-segmenter``: make a better segmenter file (e.g. from a fine-tuning run, see
  ``[segmentation].init_weights``) the frozen loss network of a run in its regression stage;
  recorded in ``<run dir>/segmenter_history.csv``. Stop the run's training first (refused while
  it holds ``<run dir>/.train.lock``); the next ``train`` resumes with the new segmenter.
* ``compare``: paired A/B of two runs resumed from copies of one checkpoint (identical samples
  step for step): mean training-loss difference per block of steps with a standard error, and
  the validation numbers both logged (:mod:`.compare`).
* ``benchmark``: seconds per generator sample and per network step for the configured sizes.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

LOGGER = logging.getLogger("synthsr_bids.training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m synthsr_bids.training",
                                     description="Train synthsr-bids' segmentation and regression U-Nets.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None, help="training TOML file (default: built-in defaults)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (TOML syntax), e.g. --set run.threads=1")
        p.add_argument("-v", "--verbose", action="count", default=0)

    train = sub.add_parser("train", help="run or resume training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(train)
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this session")
    train.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes")

    export = sub.add_parser("export", help="export float16 regression weights from the newest checkpoint")
    common(export)
    export.add_argument("--output", type=Path, default=None, help="default: <run dir>/model.safetensors")
    export.add_argument("--raw", action="store_true",
                        help="export the raw weights even when the run keeps a weight average ([regression].ema_decay)")

    ship = sub.add_parser("ship", help="bundle the newest weights into the package and register them",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(ship)
    ship.add_argument("--version", required=True, help="model version, e.g. 0.1.0.dev5000 (part of the file names)")
    ship.add_argument("--raw", action="store_true",
                      help="ship the raw weights even when the run keeps a weight average ([regression].ema_decay)")
    ship.add_argument("--preview", action="store_true",
                      help="mark the synthesis model as a preview (an early checkpoint): outputs say so")
    ship.add_argument("--package-data", type=Path, default=Path(__file__).resolve().parents[1] / "data",
                      help="the package's data folder (holds models.json and models/)")

    report = sub.add_parser("report", help="write the run's HTML report: curves and validation samples",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(report)
    report.add_argument("--output", type=Path, default=None, help="folder (default: <run dir>/report)")

    replace = sub.add_parser("replace-segmenter", help="swap the frozen segmenter of a stopped run in its regression stage",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(replace)
    replace.add_argument("segmenter", type=Path, help="segmenter .safetensors with the run's architecture and labels")

    compare = sub.add_parser("compare", help="paired A/B of two runs forked from one checkpoint (loss B - A by step)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    compare.add_argument("run_a", type=Path, help="run folder A (the baseline, e.g. training_runs/default)")
    compare.add_argument("run_b", type=Path, help="run folder B (the fork with the changed setting)")
    compare.add_argument("--stage", choices=("segmentation", "regression"), default="regression")
    compare.add_argument("--metric", choices=("l1", "loss", "dice_loss"), default="l1")
    compare.add_argument("--block", type=_positive_int, default=100, help="steps per block of the table")

    bench = sub.add_parser("benchmark", help="time the generator and the network steps")
    common(bench)
    bench.add_argument("--steps", type=int, default=5)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    from .config import ConfigError, load_config
    from .loop import TrainingError, export_from_checkpoint, latest_checkpoint, replace_segmenter
    from .worker import setup_logging, train_worker

    try:
        config = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 64
    run_dir = Path(config.run.dir).resolve()
    try:
        if args.command in ("export", "ship"):
            setup_logging(args.verbose, None)
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                print(f"error: no checkpoint in {run_dir} (train first)", file=sys.stderr)
                return 66
            LOGGER.info("the exported weights ask inference %s sharpen their outputs ([regression].output_sharpening "
                        "of %s)", "to" if config.regression.output_sharpening else "not to",
                        args.config or "the built-in defaults")
        if args.command == "export":
            out = export_from_checkpoint(ckpt, args.output or run_dir / "model.safetensors", average=not args.raw,
                                         sharpen=config.regression.output_sharpening)
            print(out)
            return 0
        if args.command == "ship":
            from .ship import ShipError, ship_run

            try:
                shipped = ship_run(run_dir, ckpt, version=args.version, package_data=args.package_data,
                                   preview=args.preview, average=not args.raw,
                                   sharpen=config.regression.output_sharpening)
            except ShipError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 65
            for model in shipped:
                print(f"{model.name}\t{model.path}\t{model.size}\t{model.sha256}")
            return 0
        if args.command == "report":
            from .report import write_training_report

            setup_logging(args.verbose, None)
            print(write_training_report(config, output=args.output))
            return 0
        if args.command == "replace-segmenter":
            setup_logging(args.verbose, run_dir / "train.log")
            print(replace_segmenter(config, args.segmenter))
            return 0
        if args.command == "benchmark":
            setup_logging(args.verbose, None)
            return _benchmark(config, args.steps)
        from .parallel import WorkerFailed, launch

        if config.run.processes > 1:
            setup_logging(args.verbose, None)
            LOGGER.info("starting %d data-parallel workers (%d thread(s) each)", config.run.processes,
                        config.run.threads)
        try:
            launch(functools.partial(train_worker, config, verbose=args.verbose, max_steps=args.max_steps,
                                     max_minutes=args.max_minutes), config.run.processes)
        except WorkerFailed as exc:
            LOGGER.error("%s", exc)
            return 65
        return 0
    except TrainingError as exc:
        LOGGER.error("%s", exc)
        return 65


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareError, compare_runs, format_comparison

    try:
        result = compare_runs(args.run_a, args.run_b, stage=args.stage, metric=args.metric, block=args.block)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 66
    print(format_comparison(result, name_a=str(args.run_a), name_b=str(args.run_b)))
    return 0


def _benchmark(config, steps: int) -> int:  # type: ignore[no-untyped-def]
    """Print median seconds per generator sample and per network step (segmentation, regression)."""
    import dataclasses

    import torch

    from synthsr_bids.allocator import keep_freed_memory

    from .loop import Trainer

    if config.run.keep_freed_memory:  # as in training (worker.train_worker)
        keep_freed_memory()
    seg_steps = max(config.segmentation.steps, 1)
    config = dataclasses.replace(config, segmentation=dataclasses.replace(config.segmentation, steps=seg_steps))
    trainer = Trainer(config)
    torch.set_num_threads(config.run.threads)
    results = {}
    for stage in ("segmentation", "regression"):
        if stage == "regression":
            trainer.start_regression_for_timing()
        gen, net = [], []
        for i in range(steps + 1):
            t = time.perf_counter()
            r = trainer.train_step()
            if i:  # the first step warms up allocators and oneDNN kernels
                gen.append(r.generator_seconds)
                net.append(r.network_seconds)
            LOGGER.info("%s step %d: generator %.2fs network %.2fs (total %.2fs)", stage, i, r.generator_seconds,
                        r.network_seconds, time.perf_counter() - t)
        results[stage] = (statistics.median(gen), statistics.median(net))
    shape = "x".join(map(str, config.generator.crop_shape))
    for stage, (g, n) in results.items():
        cfg = config.segmentation if stage == "segmentation" else config.regression
        print(f"{stage:13s} crop {shape} net {cfg.base_features}f/{cfg.n_levels}l threads {config.run.threads} "
              f"autocast {config.run.autocast}: generator {g:.2f} s/sample, network {n:.2f} s/step (median of {steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
