"""What limits a synthesis model: the network itself, measured on inputs it should find easy.

The evaluation (``python -m synthsr_bids.evaluation``) scores hard cases (thick slices, other
contrasts, lesions, a real patient). This diagnostic asks simpler questions, whose answers say
whether more training (or a bigger network) is what is missing, and how far real scans are from
the synthetic ones:

1. **Clean synthetic input -> its own target.** Held-out label maps rendered by the training
   generator as a clean 1 mm input of one contrast family (``--contrasts``: the generator's T1,
   T2, FLAIR or PD priors; no bias, no noise, no gamma, no lesions, no spatial augmentation);
   reference: the generator's synthetic T1 target of the same map. A well-trained model
   reproduces the target (r close to 1); for T1 inputs the input itself is the baseline: a model
   that scores below its input is losing information the input has.
2. **The same contrast on a real scan.** patient07's real 1 mm T1, T2 and FLAIR -> its real T1.
   The difference between a contrast's synthetic and real rows is the domain gap of that
   contrast (what the generator does not simulate); the synthetic rows are the network's limit.
3. **Equivalent blur.** The Gaussian blur (sigma, mm) of the reference whose result correlates
   best with the prediction (searched on a grid up to 4 mm), and that best r. A sharp model scores
   about the targets' own 0.5-voxel blur (the synthetic reference already has it: ~0); a blurred
   one scores more, and the best r says how much is left once the blur is accounted for
   (intensity errors, wrong anatomy).
4. **Robustness** (``--perturbations``). The clean synthetic inputs again, each with one change
   real scans may have and the generator may not make (:data:`PERTURBATIONS`: a 1 mm blur,
   spatially correlated texture at two scales, i.i.d. noise, a smooth multiplicative field);
   the drop of r from the clean input says which of them the network has not learnt to ignore,
   i.e. candidates for the domain gap of row 2.
5. **Resolution of the real scans.** A 1 mm voxel grid does not mean 1 mm resolution: a scan
   acquired with thick slices and resampled keeps its blur along the slice axis. For each real scan
   (the reference and the inputs), :func:`axis_blur` estimates from its power spectra how much
   blurrier each axis is than the sharpest (Gaussian sigma, mm); the real rows also score the
   prediction blurred like the reference, i.e. at the reference's own resolution.

Data: ``../shared/data`` next to the repository (SynthSR's held-out maps; the open_ms_data patient
for the real rows). Example::

    python benchmarks/diagnose_synthesis.py --model /tmp/model.safetensors --cases 3 --threads 2
    python benchmarks/diagnose_synthesis.py --contrasts flair t2 --perturbations
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BLUR_GRID_MM = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
#: Generator settings of the clean 1 mm inputs (on top of the evaluation's: no spatial augmentation).
CLEAN = {
    "bias_std_max": 0.0, "gamma_std": 0.0, "noise_max": 0.0, "isotropic_prob": 1.0, "isotropic_spacing": (1.0, 1.0),
    "plaque_prob": 0.0, "stroke_prob": 0.0, "tumour_prob": 0.0,
}
#: Generator contrast family -> patient07's 1 mm case of that contrast (None: no real scan).
REAL_CASE = {"t1": "T1 1mm", "t2": "T2 1mm", "flair": "FLAIR 1mm", "pd": None}


def correlated_texture(volume: np.ndarray, head: np.ndarray, rng: np.random.Generator, *, sigma_mm: float,
                       amount: float) -> np.ndarray:
    """``volume x (1 + amount x n)`` inside ``head``, unchanged outside; ``n`` is white noise smoothed by a
    Gaussian of ``sigma_mm`` (1 mm voxels) and scaled to unit standard deviation."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(volume.shape), sigma_mm)
    field /= field.std()
    return np.where(head, volume * (1.0 + amount * field), volume)


def white_noise(volume: np.ndarray, head: np.ndarray, rng: np.random.Generator, *, fraction: float) -> np.ndarray:
    """Gaussian i.i.d. noise of ``fraction`` x the mean of ``volume`` in ``head``, added inside ``head`` only."""
    scale = fraction * float(volume[head].mean()) if head.any() else 0.0
    return np.where(head, volume + scale * rng.standard_normal(volume.shape), volume)


def _blur(volume: np.ndarray, head: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(volume, 1.0)


#: Robustness test (``--perturbations``): name -> change of a clean 1 mm input, ``(volume, head mask, rng)
#: -> volume``. The generator's own 1 mm inputs carry ~8-12 % within-tissue variation with a neighbour
#: correlation of ~0.4-0.7 (benchmarks/README.md); the textures here are stronger or smoother than that.
PERTURBATIONS = {
    "blur 1 mm": _blur,
    "texture 1 mm, 15 %": lambda v, head, rng: correlated_texture(v, head, rng, sigma_mm=1.0, amount=0.15),
    "texture 2 mm, 8 %": lambda v, head, rng: correlated_texture(v, head, rng, sigma_mm=2.0, amount=0.08),
    "white noise 5 %": lambda v, head, rng: white_noise(v, head, rng, fraction=0.05),
    "smooth field 20 mm, 15 %": lambda v, head, rng: correlated_texture(v, head, rng, sigma_mm=20.0, amount=0.15),
}


def equivalent_blur(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                    grid: tuple[float, ...] = BLUR_GRID_MM) -> tuple[float, float]:
    """(sigma, r): the Gaussian blur of ``reference`` (1 mm voxels) best correlated with ``prediction`` in ``mask``."""
    from scipy import ndimage

    from synthsr_bids.evaluation.metrics import pearson

    scores = [(pearson(prediction, ndimage.gaussian_filter(reference, s) if s else reference, mask), s) for s in grid]
    r, sigma = max(scores)
    return sigma, r


def axis_blur(volume: np.ndarray, mask: np.ndarray, *, margin: int = 20,
              band: tuple[float, float] = (0.05, 0.3)) -> tuple[float, float, float]:
    """How much blurrier each axis of ``volume`` (1 mm voxels) is than its sharpest axis: Gaussian sigmas, mm.

    A scan acquired with thick slices and resampled to 1 mm loses its high spatial frequencies along the
    slice axis only. On a cube inside ``mask``'s bounding box (shrunk by ``margin`` voxels), the power
    spectrum along each axis (Hann window, averaged over the other two) is compared with axis 0's: a
    Gaussian blur of sigma multiplies power at ``f`` cycles/mm by ``exp(-4 pi^2 sigma^2 f^2)``, so the log of
    the ratio, fitted as ``c - 4 pi^2 s f^2`` over ``band``, gives ``s = sigma_axis^2 - sigma_0^2`` (the
    constant ``c`` absorbs the anisotropy of the anatomy). The sigmas squared are then taken relative to
    the smallest. Noise-dominated frequencies bias it towards 0, hence the band's upper limit."""
    corner = np.argwhere(mask).min(0) + margin
    side = int(min(np.argwhere(mask).max(0) + 1 - margin - corner))
    if side < 16:
        raise ValueError(f"the mask's bounding box minus {margin} voxels is too small ({side} voxels)")
    cube = volume[tuple(slice(c, c + side) for c in corner)].astype(np.float64)
    frequencies = np.fft.rfftfreq(side)
    used = (frequencies >= band[0]) & (frequencies <= band[1])
    powers = []
    for axis in range(3):
        centred = cube - cube.mean(axis=axis, keepdims=True)
        window = np.hanning(side).reshape([-1 if a == axis else 1 for a in range(3)])
        spectrum = np.abs(np.fft.rfft(centred * window, axis=axis)) ** 2
        powers.append(spectrum.mean(axis=tuple(a for a in range(3) if a != axis))[used])
    design = np.stack([np.ones(used.sum()), -4.0 * np.pi ** 2 * frequencies[used] ** 2], axis=1)
    squared = np.array([0.0] + [np.linalg.lstsq(design, np.log(powers[a] / powers[0]), rcond=None)[0][1]
                                for a in (1, 2)])
    sigmas = np.sqrt(np.clip(squared - squared.min(), 0.0, None))
    return float(sigmas[0]), float(sigmas[1]), float(sigmas[2])


def _row(name: str, prediction: np.ndarray, target: np.ndarray, given: np.ndarray, brain: np.ndarray,
         started: float, target_blur: tuple[float, float, float] | None = None) -> tuple[str, ...]:
    """A row of the main table; with ``target_blur`` (:func:`axis_blur` of the target), also the r of the
    prediction blurred like the target, i.e. compared at the target's own resolution."""
    from scipy import ndimage

    from synthsr_bids.evaluation.metrics import image_metrics, pearson

    ours = image_metrics(prediction, target, brain)
    baseline = image_metrics(given, target, brain)
    sigma, r_blurred = equivalent_blur(prediction, target, brain)
    at_target_resolution = "–" if target_blur is None else \
        f"{pearson(ndimage.gaussian_filter(prediction, target_blur), target, brain):.3f}"
    print(f"# {name}: model r {ours.r:.3f}, input r {baseline.r:.3f}", file=sys.stderr, flush=True)
    return (name, f"{ours.r:.3f} / {ours.ssim:.3f}", f"{baseline.r:.3f} / {baseline.ssim:.3f}", f"{sigma:g}",
            f"{r_blurred:.3f}", at_target_resolution, f"{time.perf_counter() - started:.1f}")


def synthetic_rows(model, options, label_dir: Path, count: int,  # type: ignore[no-untyped-def]
                   contrast: str = "t1", *, robustness: list[tuple[str, ...]] | None = None,
                   seed: int = 0) -> list[tuple[str, ...]]:
    """The clean synthetic rows of ``contrast``; with a ``robustness`` list, also one row per case appended to it
    (:func:`perturbation_cells`, random streams from ``seed``), reusing the clean prediction."""
    from synthsr_bids.evaluation.cases import synthetic_cases
    from synthsr_bids.evaluation.metrics import pearson
    from synthsr_bids.inference.predict import synthesize

    rng = np.random.default_rng(seed)
    rows = []
    for case in synthetic_cases(label_dir, count, overrides={**CLEAN, "contrast_probs": ((contrast, 1.0),)}):
        started = time.perf_counter()
        result = synthesize(case.input.data, case.input.affine, model, options)
        if result.data.shape != case.reference.shape:
            raise SystemExit(f"{case.name}: prediction {result.data.shape} != reference {case.reference.shape}")
        name = f"{case.name}, synthetic {contrast}"
        rows.append(_row(name, result.data, case.reference.data, case.input.data, case.brain_mask, started))
        if robustness is not None:
            clean_r = pearson(result.data, case.reference.data, case.brain_mask)
            robustness.append((name, *perturbation_cells(case, clean_r, model, options, rng)))
            print(f"# {name}: perturbations done", file=sys.stderr, flush=True)
    return rows


def perturbation_cells(case, clean_r: float, model, options,  # type: ignore[no-untyped-def]
                       rng: np.random.Generator) -> list[str]:
    """r of the clean input (``clean_r``), then r and its change with each of :data:`PERTURBATIONS`."""
    from synthsr_bids.evaluation.metrics import pearson
    from synthsr_bids.inference.predict import synthesize

    clean = case.input.data.astype(np.float64)
    # The head: where the target has tissue (the rendered background is not 0 after min-max).
    head = case.reference.data > 0
    cells = [f"{clean_r:.3f}"]
    for perturb in PERTURBATIONS.values():
        result = synthesize(perturb(clean, head, rng).astype(np.float32), case.input.affine, model, options)
        r = pearson(result.data, case.reference.data, case.brain_mask)
        cells.append(f"{r:.3f} ({r - clean_r:+.3f})")
    return cells


def _blur_cells(sigmas: tuple[float, float, float]) -> tuple[str, ...]:
    return tuple(f"{s:.2f}" for s in sigmas)


def patient_rows(model, options, patient_dir: Path, names: list[str],  # type: ignore[no-untyped-def]
                 resolution: list[tuple[str, ...]] | None = None) -> list[tuple[str, ...]]:
    """The real rows; the :func:`axis_blur` of the reference and of each input scan go to ``resolution``."""
    from synthsr_bids.evaluation.cases import patient_cases
    from synthsr_bids.evaluation.volume import resample_onto
    from synthsr_bids.inference.predict import synthesize

    rows = []
    for case in patient_cases(patient_dir):
        if case.name not in names:
            continue
        started = time.perf_counter()
        result = synthesize(case.input.data, case.input.affine, model, options)
        prediction = resample_onto(result.data, result.affine, case.reference.shape, case.reference.affine, order=1)
        given = resample_onto(case.input.data, case.input.affine, case.reference.shape, case.reference.affine, order=1)
        reference_blur = axis_blur(case.reference.data, case.brain_mask)
        if resolution is not None:
            if not resolution:
                resolution.append((f"{patient_dir.name} reference T1", *_blur_cells(reference_blur)))
            resolution.append((f"{patient_dir.name} input {case.name}",
                               *_blur_cells(axis_blur(given, case.brain_mask))))
        rows.append(_row(f"{patient_dir.name} real {case.name}", prediction, case.reference.data, given,
                         case.brain_mask, started, reference_blur))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registered name or weight file (default: the default model)")
    parser.add_argument("--label-maps", type=Path, default=DATA / "synthsr" / "label_maps")
    parser.add_argument("--patient-dir", type=Path, default=DATA / "open_ms_data" / "patient07")
    parser.add_argument("--cases", type=int, default=3, help="clean synthetic cases (one per map, cycling)")
    parser.add_argument("--contrasts", nargs="+", choices=sorted(REAL_CASE), default=["t1", "t2", "flair"],
                        help="generator contrast families of the clean synthetic inputs (and their real rows)")
    parser.add_argument("--perturbations", action="store_true",
                        help="also score the clean synthetic inputs with each perturbation (robustness table)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from synthsr_bids.evaluation.run import load_model
    from synthsr_bids.inference.predict import SynthesisOptions

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    # As the pipeline runs it: flip averaging, and sharpening when the weight file asks for it.
    options = SynthesisOptions(sharpen=loaded.sharpen)
    rows = []
    robustness: list[tuple[str, ...]] | None = [] if args.perturbations else None
    for contrast in args.contrasts:
        rows += synthetic_rows(loaded.network, options, args.label_maps, args.cases, contrast, robustness=robustness)
    real = [REAL_CASE[c] for c in args.contrasts if REAL_CASE[c]]
    resolution: list[tuple[str, ...]] = []
    if args.patient_dir.is_dir():
        rows += patient_rows(loaded.network, options, args.patient_dir, real, resolution)
    else:
        print(f"# no patient directory {args.patient_dir}: real rows skipped", file=sys.stderr)
    print(f"Model: {loaded.info.name} (sha256 {loaded.info.sha256[:12]}; sharpening {'on' if loaded.sharpen else 'off'})\n")
    print("| case (clean 1 mm input) | model r / SSIM | input r / SSIM (baseline for T1) "
          "| equivalent blur of the reference (sigma, mm) | r at that blur "
          "| r, prediction blurred like the reference | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if resolution:
        print("\n| real scan (1 mm voxels) | blur along x (sigma, mm) | along y | along z |")
        print("|---|---|---|---|")
        for row in resolution:
            print("| " + " | ".join(row) + " |")
    if robustness is not None:
        print("\n| case (clean 1 mm input) | model r, clean | " + " | ".join(
            f"{name}: r (change)" for name in PERTURBATIONS) + " |")
        print("|---" * (2 + len(PERTURBATIONS)) + "|")
        for row in robustness:
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
