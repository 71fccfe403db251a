"""Regression training throughput: how best to spend the CPU cores on samples per hour.

Measures, in one run and on the same machine, regression training samples per second for

* ``baseline``: one process, all ``--threads`` threads, batch 1, glibc's default allocator;
* ``+ keep freed memory``: the same with :func:`synthsr_bids.allocator.keep_freed_memory`
  (``[run].keep_freed_memory``, on in training), which the next two configurations use too;
* ``batch N``: one process, all threads, batch N (one optimiser step per N samples);
* ``P procs``: P independent processes at ``threads / P`` threads each, batch 1, started together
  (what a data-parallel run, or two paired A/B arms, would get out of the same cores);
* ``P procs, compile``: the same with ``[run].compile`` (torch.compile of the training forward
  passes; the compilation, or its on-disk cache, is in the untimed warm-up step);
* ``P procs, compile, Dice on 1 step in N`` (only when asked: ``--plans ... interval``): the same
  with ``[regression].seg_loss_interval = N`` (``--seg-loss-interval``; the frozen segmenter's loss
  on one step in N, weighted N times; two warm-up steps, one of each kind, and ``--steps`` must be
  a multiple of N so that the timed steps hold the right share of both; compare samples/s or the
  mean step time, not the median, which is that of the cheaper steps);

and prints each as a ratio to the first one measured (``--plans`` picks which; by default all but
``interval``). Every other configuration evaluates the segmenter's loss on every step, whatever
``--config`` says. The network, crop, frozen-segmenter loss and autocast are those of ``--config``
(default: ``configs/default.toml``); the segmenter is untrained (its cost is the same) and nothing
is written to the run directory. Only the first ``--maps`` training maps are loaded (the step cost does not
depend on their number). Stop other CPU work (the background training) first, or the ratios
measure it too::

    python benchmarks/bench_training_throughput.py --steps 12 --batch 2 --procs 2
    python benchmarks/bench_training_throughput.py --steps 12 --plans compile interval --seg-loss-interval 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: ``--plans`` keys, in the default order.
PLANS = ("baseline", "keep", "batch", "procs", "compile", "interval")
DEFAULT_PLANS = PLANS[:-1]


def _trainer(config_path: Path, *, threads: int, batch: int, maps: int,  # type: ignore[no-untyped-def]
             compile: bool = False, seg_loss_interval: int = 1):
    import torch

    from synthsr_bids.training.config import load_config
    from synthsr_bids.training.loop import (
        Trainer,
        find_label_maps,
        label_scheme,
        load_volumes,
    )

    config = load_config(config_path, overrides=[f"run.threads={threads}", f"regression.batch_size={batch}",
                                                 f"run.compile={str(compile).lower()}",
                                                 f"regression.seg_loss_interval={seg_loss_interval}",
                                                 "run.dir=\"/nonexistent-benchmark-run\""])
    scheme = label_scheme(config)
    volumes = load_volumes(find_label_maps(config.data.training_maps)[:maps], scheme)
    trainer = Trainer(config, volumes=volumes, validation_volumes=[], scheme=scheme)
    torch.set_num_threads(threads)
    trainer.start_regression_for_timing()
    return trainer


def worker(config_path: Path, *, threads: int, batch: int, steps: int, maps: int, keep_memory: bool,
           compile: bool = False, seg_loss_interval: int = 1) -> dict[str, float]:
    """Time ``steps`` regression steps (after one warm-up step, two with ``seg_loss_interval`` > 1);
    returns samples/s and the median and mean s/step."""
    import resource

    from synthsr_bids.allocator import keep_freed_memory

    if keep_memory and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() is not available here (not glibc)")
    trainer = _trainer(config_path, threads=threads, batch=batch, maps=maps, compile=compile,
                       seg_loss_interval=seg_loss_interval)
    trainer.train_step()  # warm-up: allocator, oneDNN kernels, compilation
    if seg_loss_interval > 1:
        trainer.train_step()  # ... of a step without the segmenter's term too
    durations = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        durations.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"samples_per_s": steps * batch / wall, "median_step_s": statistics.median(durations),
            "mean_step_s": statistics.fmean(durations),
            "page_faults_per_step": faults / steps}


def _run_workers(args: argparse.Namespace, *, procs: int, threads: int, batch: int, keep_memory: bool,
                 compile: bool = False, seg_loss_interval: int = 1) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", "--config", str(args.config), "--threads", str(threads),
           "--batch", str(batch), "--steps", str(args.steps), "--maps", str(args.maps),
           *(["--keep-memory"] if keep_memory else []), *(["--compile"] if compile else []),
           "--worker-seg-loss-interval", str(seg_loss_interval)]
    children = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    results = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"worker failed (exit {child.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {"samples_per_s": sum(r["samples_per_s"] for r in results),
            "median_step_s": statistics.median(r["median_step_s"] for r in results),
            "mean_step_s": statistics.fmean(r["mean_step_s"] for r in results),
            "page_faults_per_step": statistics.mean(r["page_faults_per_step"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.toml")
    parser.add_argument("--threads", type=int, default=2, help="cores to spend (baseline: one process with all)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after the warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the 'batch N' configuration")
    parser.add_argument("--procs", type=int, default=2, help="processes of the 'P procs' configuration")
    parser.add_argument("--maps", type=int, default=2, help="training label maps to load")
    parser.add_argument("--seg-loss-interval", type=int, default=4,
                        help="N of the 'Dice on 1 step in N' configuration (plan 'interval')")
    parser.add_argument("--plans", nargs="+", choices=PLANS, default=list(DEFAULT_PLANS),
                        help="configurations to measure, in this order (the first is the baseline of the ratios)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-seg-loss-interval", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.config, threads=args.threads, batch=args.batch, steps=args.steps, maps=args.maps,
                                keep_memory=args.keep_memory, compile=args.compile,
                                seg_loss_interval=args.worker_seg_loss_interval)))
        return 0
    if args.seg_loss_interval < 1:
        parser.error("--seg-loss-interval must be >= 1")
    if "interval" in args.plans and args.steps % args.seg_loss_interval:
        parser.error(f"--steps ({args.steps}) must be a multiple of --seg-loss-interval ({args.seg_loss_interval})")
    if args.threads % args.procs:
        parser.error("--threads must be a multiple of --procs")
    per_proc = args.threads // args.procs
    procs = f"{args.procs} procs x {per_proc} thread(s), keep"
    every = args.seg_loss_interval
    plans = {"baseline": ("baseline", 1, args.threads, 1, False, False, 1),
             "keep": ("+ keep freed memory", 1, args.threads, 1, True, False, 1),
             "batch": (f"batch {args.batch}, keep", 1, args.threads, args.batch, True, False, 1),
             "procs": (procs, args.procs, per_proc, 1, True, False, 1),
             "compile": (f"{procs}, compile", args.procs, per_proc, 1, True, True, 1),
             "interval": (f"{procs}, compile, Dice on 1 step in {every}", args.procs, per_proc, 1, True, True, every)}
    rows = []
    for key in args.plans:
        name, procs_, threads, batch, keep, compile, interval = plans[key]
        result = _run_workers(args, procs=procs_, threads=threads, batch=batch, keep_memory=keep, compile=compile,
                              seg_loss_interval=interval)
        rows.append((name, result))
        print(f"# {name}: {result['samples_per_s']:.3f} samples/s, median step {result['median_step_s']:.2f} s, "
              f"mean {result['mean_step_s']:.2f} s",
              file=sys.stderr, flush=True)
    base = rows[0][1]["samples_per_s"]
    print(f"| configuration ({args.threads} cores, {args.steps} steps each) | samples/s | median s/step "
          f"| mean s/step | page faults/step | samples/s vs {rows[0][0]} |")
    print("|---|---|---|---|---|---|")
    for name, result in rows:
        print(f"| {name} | {result['samples_per_s']:.3f} | {result['median_step_s']:.2f} | {result['mean_step_s']:.2f} | "
              f"{result['page_faults_per_step'] / 1e3:.0f}k | {result['samples_per_s'] / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
