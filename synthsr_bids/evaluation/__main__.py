"""``python -m synthsr_bids.evaluation``: score a model and baselines on held-out cases.

Prints one markdown table (stdout; logs and the progress bar go to stderr) and optionally
writes the numbers as JSON. Exit codes: 0 ok, 64 usage error, 66 the model (or every case)
is missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from synthsr_bids.cli.run import setup_logging
from synthsr_bids.errors import ExitCode

from .cases import DEFAULT_DATA_DIR, SYNTHETIC_SEED
from .degrade import DEFAULT_SLICE_PROFILE, SLICE_PROFILES

__all__ = ["build_parser", "main"]

LOGGER = logging.getLogger("synthsr_bids.evaluation")


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with 64 (EX_USAGE), like ``synthsr-bids``."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser only (no side effects)."""
    parser = _Parser(
        prog="python -m synthsr_bids.evaluation",
        description="Evaluate a SynthSR model and interpolation baselines on held-out synthetic cases "
                    "(SynthSR's label maps through the training generator) and a real MS patient "
                    "(open_ms_data patient07: FLAIR/T2 -> T1, 1 mm and 5 mm slices). Prints a markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="NAME|PATH",
                       help="registered model name or .safetensors/.h5 file; None = the registry default")
    model.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                       help="average with the left-right flipped prediction (as mri_synthsr)")
    model.add_argument("--sharpen", action=argparse.BooleanOptionalAction, default=None,
                       help="unsharp-mask the output; None = as the model's weight file asks (mri_synthsr's "
                            "models: yes)")
    model.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    model.add_argument("--threads", type=_positive_int, default=None, help="torch threads; None = torch's default")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                      help="folder holding synthsr/label_maps and open_ms_data/patient07")
    data.add_argument("--label-maps", type=Path, default=None,
                      help="label maps of the synthetic cases; None = DATA_DIR/synthsr/label_maps")
    data.add_argument("--patient-dir", type=Path, default=None,
                      help="patient folder; None = DATA_DIR/open_ms_data/patient07")
    data.add_argument("--synthetic-cases", type=_non_negative_int, default=5,
                      help="number of synthetic cases (case i renders label map i mod 5); 0 = none")
    data.add_argument("--seed", type=int, default=SYNTHETIC_SEED, help="seed of the synthetic cases")
    data.add_argument("--slice-spacing", type=float, default=5.0,
                      help="thick-slice spacing (= thickness) in mm of the patient's degraded inputs")
    data.add_argument("--slice-profile", choices=SLICE_PROFILES, default=DEFAULT_SLICE_PROFILE,
                      help="slice profile of the patient's degraded inputs: box = mean over the slice (as a 2D "
                           "acquisition), gaussian = sigma 0.42 x thickness (the training generator's, blurrier)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-json", type=Path, default=None, metavar="FILE",
                        help="also write the numbers here")
    output.add_argument("--verbose", action="store_true", help="one table row per synthetic case too")
    output.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar on stderr (only shown on a terminal)")
    output.add_argument("-v", "--debug", action="count", default=0, help="more logging (-v: DEBUG)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.slice_spacing > 1.0:
        parser.error(f"--slice-spacing must be > 1 mm, got {args.slice_spacing}")
    setup_logging(args.debug)

    from .report import markdown_table, write_json
    from .run import EvaluationConfig, ModelMissingError, load_model, run_evaluation

    config = EvaluationConfig(
        model=args.model,
        synthetic_cases=args.synthetic_cases,
        label_maps=args.label_maps or args.data_dir / "synthsr" / "label_maps",
        patient_dir=args.patient_dir or args.data_dir / "open_ms_data" / "patient07",
        seed=args.seed,
        slice_spacing_mm=args.slice_spacing,
        slice_profile=args.slice_profile,
        flip=args.flip,
        sharpen=args.sharpen,
        device=args.device,
        threads=args.threads,
    )
    try:
        model = load_model(config.model)
    except ModelMissingError as exc:
        print(f"error: no model to evaluate.\n{exc}", file=sys.stderr)
        return int(ExitCode.NO_INPUT)
    LOGGER.info("model %s (%s, sha256 %s...)", model.info.name, model.info.path, model.info.sha256[:12])

    result = run_evaluation(config, model, progress=args.progress)
    if not result.cases:
        print("error: nothing was evaluated:\n  " + "\n  ".join(result.skipped), file=sys.stderr)
        return int(ExitCode.NO_INPUT)
    print(markdown_table(result, verbose=args.verbose))
    if args.output_json is not None:
        path = write_json(result, args.output_json, command=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
        LOGGER.info("numbers written to %s", path)
    LOGGER.info("%d case(s) evaluated in %.1f s", len(result.cases), result.seconds)
    return int(ExitCode.OK)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
