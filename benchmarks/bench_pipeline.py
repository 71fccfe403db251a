#!/usr/bin/env python
"""Speed and memory of the whole synthesis pipeline, next to baselines measured in the same run.

One input (a synthetic head phantom by default, ``--input`` for a real NIfTI) goes through
``synthesize`` (flip averaging and sharpening on, CPU) with the full-size SynthSR U-Net
(random weights with non-trivial BatchNorm). In the same run, each in its own subprocess so
that the peak RSS is per run:

* ``pipeline``   synthsr-bids' ``synthesize`` (resample ... sharpen), the measured product;
* ``naive``      the two network passes (x and flipped x) of the same weights as a plain
                 PyTorch port would run them: contiguous layout, ``torch.cat``, no in-place
                 ops, no allocator tuning;
* ``tensorflow`` the two passes in TensorFlow/Keras (``tools/keras_unet.py``), when a
                 Python with TensorFlow is found (``--tf-python``, default ``/work/tfenv``).

The baselines time only the two passes (no resampling/normalisation/sharpening), which
favours them. With TensorFlow the random weights are created in Keras and read by
synthsr-bids from the ``.h5`` file (the production conversion path), so the outputs are
compared too: "parity" is the largest difference of the flip-averaged network output
``0.5 clip(255 p1) + 0.5 clip(255 p2)`` divided by 255, i.e. in normalised units.

Usage::

    python benchmarks/bench_pipeline.py                    # 182x218x182 phantom
    python benchmarks/bench_pipeline.py --input /path/FLAIR.nii.gz --repeat 2
    python benchmarks/bench_pipeline.py --size 256         # RSS check on a 256^3 phantom
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_TF_PYTHON = Path("/work/tfenv/bin/python")
STAGES = ("resample", "reorient", "normalise", "network", "flip", "postprocess")


# ----------------------------------------------------------------------------- input
def make_phantom(shape: tuple[int, int, int], *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 1 mm LAS head phantom: scalp, skull, CSF, cortex, white matter, ventricles, lesions, noise."""
    rng = np.random.default_rng(seed)
    centre = (np.asarray(shape) - 1) / 2.0
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    # Head semi-axes (mm) scaled to the field of view, capped at a real head's size.
    semi = np.minimum(np.asarray(shape) * 0.42, [75.0, 95.0, 80.0])

    def ellipsoid(scale: float, offset=(0.0, 0.0, 0.0), axes=None) -> np.ndarray:
        axes = semi * scale if axes is None else np.asarray(axes)
        r = sum(((g - c - o) / a) ** 2 for g, c, o, a in zip(grid, centre, offset, axes))
        return r

    head = ellipsoid(1.0)
    data = np.zeros(shape, dtype=np.float64)
    data[head <= 1.0] = 40.0  # scalp
    data[head <= 0.93] = 8.0  # skull
    data[head <= 0.86] = 60.0  # CSF
    brain = ellipsoid(0.8)
    data[brain <= 1.0] = 80.0  # cortex
    data[brain <= 0.75] = 110.0  # white matter
    for side in (-1, 1):
        data[ellipsoid(1.0, offset=(side * 8.0, 0.0, 5.0), axes=(6.0, 25.0, 10.0)) <= 1.0] = 55.0
    for _ in range(12):
        offset = rng.uniform(-0.35, 0.35, 3) * semi
        data[ellipsoid(1.0, offset=offset, axes=rng.uniform(2.0, 5.0, 3)) <= 1.0] = 140.0
    bias = 1.0 + 0.15 * np.sin(grid[0] / shape[0] * np.pi) * np.cos(grid[2] / shape[2] * np.pi)
    data = data * bias + rng.normal(0.0, 3.0, shape)
    data[head > 1.0] = np.abs(rng.normal(0.0, 2.0, np.count_nonzero(head > 1.0)))
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (centre[0], -centre[1], -centre[2])
    return data, affine


# ----------------------------------------------------------------------------- workers
def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _combine(p1: np.ndarray, p2_flipped_back: np.ndarray | None) -> np.ndarray:
    a = np.clip(255.0 * p1, 0, 128)
    if p2_flipped_back is None:
        return a
    return 0.5 * a + 0.5 * np.clip(255.0 * p2_flipped_back, 0, 128)


def _load_model(weights: Path):
    from synthsr_bids.models.weights import load_weights

    return load_weights(weights).model


def worker_init_torch(args: argparse.Namespace) -> dict:
    """Random full-size weights with non-trivial BatchNorm, saved as safetensors (no TensorFlow)."""
    import torch

    from synthsr_bids.models.network import SynthSRUNet, UNetConfig
    from synthsr_bids.models.weights import save_safetensors

    torch.manual_seed(args.seed)
    model = SynthSRUNet(UNetConfig())
    generator = torch.Generator().manual_seed(args.seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            n = module.num_features
            sign = torch.where(torch.rand(n, generator=generator) < 0.2, -1.0, 1.0)
            module.weight.data = (0.5 + torch.rand(n, generator=generator)) * sign
            module.bias.data = 0.3 * torch.randn(n, generator=generator)
            module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.3 + 1.7 * torch.rand(n, generator=generator))
    # Calibrate the head so that outputs land mostly inside the clipping window (0, 0.5):
    # otherwise clip(255 p, 0, 128) saturates and hides every difference.
    model.eval()
    with torch.no_grad():
        probe = model(torch.rand(1, 1, 64, 64, 64, generator=generator))
        mean, std = float(probe.mean()), float(probe.std()) + 1e-12
        model.head.weight.mul_(0.08 / std)
        model.head.bias.copy_((model.head.bias - mean) * 0.08 / std + 0.25)
    save_safetensors(model, Path(args.weights), {"note": "random weights for benchmarking"})
    return {"weights": str(args.weights)}


def worker_pipeline(args: argparse.Namespace) -> dict:
    import nibabel as nib
    import torch

    from synthsr_bids.inference.predict import SynthesisOptions, run_network, synthesize
    from synthsr_bids.inference.device import Attempt

    torch.set_num_threads(args.threads)
    model = _load_model(Path(args.weights))
    img = nib.load(args.input_path)
    data = np.asarray(img.dataobj, dtype=np.float64)
    options = SynthesisOptions(device="cpu", crop_background=args.crop_background)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    result = synthesize(data, img.affine, model, options)
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    rss = _peak_rss_gb()
    np.save(Path(args.out_dir) / "pipeline_output.npy", result.data)
    out = {"wall": wall, "cpu": cpu, "peak_rss_gb": rss, "timings": result.timings, "notes": result.notes}
    if args.worker_warm:
        # A second scan in the same process (as a participant run with several scans): oneDNN's
        # kernels are compiled; the workspace is new, so its pages are faulted in again.
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        synthesize(data, img.affine, model, options)
        out["warm_wall"], out["warm_cpu"] = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    if args.worker_parity:
        # Untimed, after the RSS reading: the flip-averaged network output on the baselines' input.
        batch = np.load(Path(args.out_dir) / "network_input.npy")
        prediction, _ = run_network(model, batch, attempts=(Attempt("cpu", False),), flip=True)
        np.save(Path(args.out_dir) / "pipeline_prediction.npy", prediction)
    return out


def worker_naive(args: argparse.Namespace) -> dict:
    """Two passes as a plain PyTorch port runs them (the network's autograd path, no tricks)."""
    import torch

    torch.set_num_threads(args.threads)
    model = _load_model(Path(args.weights))
    model = model.to(memory_format=torch.contiguous_format).eval()
    batch = torch.from_numpy(np.load(Path(args.out_dir) / "network_input.npy"))[None]
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    # SynthSRUNet.forward is the plain PyTorch network: F.elu, torch.cat, F.interpolate, here on
    # contiguous tensors (as ported code would run it, without inference_mode).
    with torch.enable_grad():
        p1 = model(batch)
        p2 = torch.flip(model(torch.flip(batch, dims=(2,))), dims=(2,))
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    rss = _peak_rss_gb()
    prediction = _combine(p1[0, 0].detach().numpy(), p2[0, 0].detach().numpy())
    np.save(Path(args.out_dir) / "naive_prediction.npy", prediction)
    return {"wall": wall, "cpu": cpu, "peak_rss_gb": rss}


def worker_tf_init(args: argparse.Namespace) -> dict:
    """(Runs in the TensorFlow Python.) Random Keras weights saved as .h5."""
    sys.path.insert(0, str(REPO / "tools"))
    import tensorflow as tf
    from keras_unet import build_keras_unet, randomize_weights

    tf.keras.utils.set_random_seed(args.seed)
    model = build_keras_unet()
    randomize_weights(model, np.random.default_rng(args.seed))
    model.save_weights(str(args.weights), save_format="h5")
    return {"weights": str(args.weights), "tensorflow": tf.__version__}


def worker_tf(args: argparse.Namespace) -> dict:
    """(Runs in the TensorFlow Python.) The two passes in Keras, as mri_synthsr runs them."""
    sys.path.insert(0, str(REPO / "tools"))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from keras_unet import build_keras_unet

    model = build_keras_unet()
    model.load_weights(str(args.weights))
    batch = np.load(Path(args.out_dir) / "network_input.npy")  # (C, X, Y, Z)
    image = np.moveaxis(batch, 0, -1)[None]  # (1, X, Y, Z, C), as mri_synthsr feeds Keras
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    p1 = np.squeeze(model.predict(image, verbose=0))
    p2 = np.flip(np.squeeze(model.predict(np.flip(image, axis=1), verbose=0)), axis=0)
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    rss = _peak_rss_gb()
    np.save(Path(args.out_dir) / "tensorflow_prediction.npy", _combine(p1, p2))
    out = {"wall": wall, "cpu": cpu, "peak_rss_gb": rss, "tensorflow": tf.__version__}
    if args.worker_warm:
        # TensorFlow's steady state: the same two passes again, graph built and memory pooled.
        cpu0, wall0 = _cpu_seconds(), time.perf_counter()
        model.predict(image, verbose=0)
        model.predict(np.flip(image, axis=1), verbose=0)
        out["warm_wall"], out["warm_cpu"] = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    return out


WORKERS = {
    "init_torch": worker_init_torch,
    "pipeline": worker_pipeline,
    "naive": worker_naive,
    "tf_init": worker_tf_init,
    "tensorflow": worker_tf,
}


# ----------------------------------------------------------------------------- driver
def _run_worker(name: str, args: argparse.Namespace, *, python: str = sys.executable, extra=()) -> dict:
    command = [
        python, str(Path(__file__).resolve()), "--worker", name,
        "--out-dir", str(args.out_dir), "--weights", str(args.weights),
        "--input-path", str(args.input_path), "--threads", str(args.threads), "--seed", str(args.seed),
        *extra,
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tensorflow_python(requested: str | None) -> str | None:
    candidates = [requested] if requested else [str(DEFAULT_TF_PYTHON), sys.executable]
    for python in candidates:
        if python and Path(python).exists():
            probe = subprocess.run(
                [python, "-c", "import tensorflow"], capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            )
            if probe.returncode == 0:
                return python
    return None


def _prepare(args: argparse.Namespace):
    """Write the input NIfTI and the network input that the baselines use; return the bookkeeping."""
    import nibabel as nib

    from synthsr_bids.inference.predict import prepare_input
    from synthsr_bids.preprocessing.orientation import reorient_to_ras
    from synthsr_bids.preprocessing.resample import resample_to_isotropic

    if args.input:
        img = nib.load(args.input)
        data, affine = np.asarray(img.dataobj, dtype=np.float64), img.affine
    else:
        shape = (args.size,) * 3 if args.size else (182, 218, 182)
        data, affine = make_phantom(shape, seed=args.seed)
    if data.ndim == 4:
        data = data[..., 0]
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), args.input_path)
    resampled = resample_to_isotropic(data, affine)
    volume, _, reorientation = reorient_to_ras(resampled.data, resampled.affine)
    prepared = prepare_input(volume)
    np.save(Path(args.out_dir) / "network_input.npy", prepared.array)
    return data.shape, prepared, reorientation


def _fmt_stats(values: list[float], unit: str = "s") -> str:
    if len(values) == 1:
        return f"{values[0]:7.2f} {unit}"
    return f"{statistics.median(values):7.2f} {unit} (min {min(values):.2f}, max {max(values):.2f})"


def _final_parity(out_dir: Path, reference: str, prepared, reorientation) -> str:
    """The pipeline's final output vs the reference prediction put through the same post-processing."""
    from synthsr_bids.inference.predict import finish_output
    from synthsr_bids.preprocessing.orientation import undo_reorientation

    prediction = np.load(out_dir / f"{reference}_prediction.npy").astype(np.float32)
    expected = undo_reorientation(finish_output(prediction, prepared, sharpen=True), reorientation)
    output = np.load(out_dir / "pipeline_output.npy")
    diff = np.abs(expected.astype(np.float64) - output) / 255.0
    return f"max {diff.max():.2e}, mean {diff.mean():.2e} (after sharpening, which can amplify up to 3x)"


def _parity(out_dir: Path, reference: str, other: str) -> str:
    a = np.load(out_dir / f"{reference}_prediction.npy")
    b = np.load(out_dir / f"{other}_prediction.npy")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) / 255.0
    return f"max {diff.max():.2e}, mean {diff.mean():.2e} (normalised units; tolerance 1e-4)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="a NIfTI image (default: synthetic phantom)")
    parser.add_argument("--size", type=int, default=0, help="phantom of size^3 voxels (default 182x218x182)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (noise estimate)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-tf", action="store_true")
    parser.add_argument("--tf-python", help="Python interpreter with TensorFlow (default /work/tfenv/bin/python)")
    parser.add_argument("--crop-background", action="store_true", help="measure the opt-in background crop")
    parser.add_argument("--no-parity", dest="parity", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the intermediate files in this folder")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--input-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-parity", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a second run in the same process (steady state) for the pipeline and TF")
    parser.add_argument("--worker-warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="synthsr-bench-"))
    args.out_dir = args.keep or tmp
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.input_path = args.out_dir / "input.nii.gz"
    try:
        input_shape, prepared, reorientation = _prepare(args)
        network_shape = prepared.array.shape[1:]
        tf_python = None if args.skip_tf else _tensorflow_python(args.tf_python)
        if tf_python:
            args.weights = args.out_dir / "weights.h5"
            info = _run_worker("tf_init", args, python=tf_python)
            weights_note = f"random Keras weights (TensorFlow {info['tensorflow']}) read from .h5"
        else:
            args.weights = args.out_dir / "weights.safetensors"
            _run_worker("init_torch", args)
            weights_note = "random PyTorch weights (TensorFlow not found: no TF baseline)"
        load = os.getloadavg()[0]
        print(f"input {'phantom' if not args.input else args.input} {input_shape}; network input {network_shape}")
        print(f"{weights_note}; {args.threads} thread(s); load average before: {load:.2f}")

        runs: dict[str, list[dict]] = {"pipeline": [], "naive": [], "tensorflow": []}
        extra = ["--crop-background"] if args.crop_background else []
        warm = ["--worker-warm"] if args.warm else []
        for index in range(args.repeat):
            parity = ["--worker-parity"] if (args.parity and index == 0) else []
            runs["pipeline"].append(_run_worker("pipeline", args, extra=[*extra, *parity, *warm]))
            if not args.skip_naive:
                runs["naive"].append(_run_worker("naive", args))
            if tf_python:
                runs["tensorflow"].append(_run_worker("tensorflow", args, python=tf_python, extra=warm))

        print("\nwall time (whole run; baselines: the two network passes only), CPU time, peak RSS")
        for name, results in runs.items():
            if not results:
                continue
            walls = [r["wall"] for r in results]
            cpus = [r["cpu"] for r in results]
            rss = [r["peak_rss_gb"] for r in results]
            print(f"  {name:<11} wall {_fmt_stats(walls)}  cpu {_fmt_stats(cpus)}  peak RSS {max(rss):.2f} GB")
        warm_runs = {name: results for name, results in runs.items() if results and "warm_wall" in results[0]}
        for name, results in warm_runs.items():
            print(f"  {name + ' warm':<11} wall {_fmt_stats([r['warm_wall'] for r in results])}  "
                  f"cpu {_fmt_stats([r['warm_cpu'] for r in results])}  (second run in the same process)")
        stages = runs["pipeline"]
        print("\npipeline stages (median s): " + ", ".join(
            f"{k} {statistics.median([r['timings'].get(k, 0.0) for r in stages]):.2f}" for k in STAGES
        ))
        best = {name: min(r["wall"] for r in results) for name, results in runs.items() if results}
        best_cpu = {name: min(r["cpu"] for r in results) for name, results in runs.items() if results}
        for name in ("naive", "tensorflow"):
            if name in best:
                print(
                    f"speed-up of the pipeline vs {name}: {best[name] / best['pipeline']:.2f}x wall (best runs), "
                    f"{best_cpu[name] / best_cpu['pipeline']:.2f}x CPU time"
                )
        if "pipeline" in warm_runs and "tensorflow" in warm_runs:
            best_warm = {name: min(r["warm_wall"] for r in results) for name, results in warm_runs.items()}
            warm_cpu = {name: min(r["warm_cpu"] for r in results) for name, results in warm_runs.items()}
            print(f"speed-up of the pipeline vs tensorflow, both warm: "
                  f"{best_warm['tensorflow'] / best_warm['pipeline']:.2f}x wall (best runs), "
                  f"{warm_cpu['tensorflow'] / warm_cpu['pipeline']:.2f}x CPU time")
        if args.parity:
            print("\nparity of the flip-averaged network output on the same input:")
            if runs["naive"]:
                print("  pipeline vs naive PyTorch: " + _parity(args.out_dir, "naive", "pipeline"))
            if runs["tensorflow"]:
                print("  pipeline vs TensorFlow:    " + _parity(args.out_dir, "tensorflow", "pipeline"))
                if runs["naive"]:
                    print("  naive vs TensorFlow:       " + _parity(args.out_dir, "tensorflow", "naive"))
            reference = "tensorflow" if runs["tensorflow"] else ("naive" if runs["naive"] else None)
            if reference:
                print(f"  final output vs {reference} + same post-processing: "
                      + _final_parity(args.out_dir, reference, prepared, reorientation))
        if stages[0]["notes"]:
            print("notes: " + "; ".join(stages[0]["notes"]))
        print(f"load average after: {os.getloadavg()[0]:.2f} (other processes share the cores: compare CPU times)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
