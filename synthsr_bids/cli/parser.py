"""The ``synthsr-bids`` command line (BIDS-App conventions, fMRIPrep spellings).

:func:`build_parser` only builds the parser (no side effects, so documentation
tools can import it). :func:`parse_args` turns ``argv`` into a
:class:`~synthsr_bids.config.RunConfig` and checks the options against each other.
Usage errors exit with status 64 (BIDS Apps execution spec), not argparse's 2.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn, Sequence

from synthsr_bids import __version__
from synthsr_bids.config import (
    DEFAULT_CONTRASTS,
    DEFAULT_TEMPLATE,
    DownstreamSettings,
    InferenceSettings,
    RunConfig,
)
from synthsr_bids.errors import ExitCode, UsageError

DESCRIPTION = f"""\
synthsr-bids {__version__}: turn clinical brain MRI of any contrast (T1w, T2w, FLAIR,
PDw, ..., even CT), any orientation and any slice thickness into a synthetic 1 mm
isotropic T1-weighted MPRAGE with SynthSR (Iglesias et al., NeuroImage 2021;
Science Advances 2023), written as a BIDS-Derivatives dataset.

Typical use:
  synthsr-bids /data/ds /data/ds/derivatives/synthsr participant --participant-label 01 02
  synthsr-bids /data/ds /data/ds/derivatives/synthsr group
"""

EPILOG = """\
Models: the bundled default is used unless --model is given. Official SynthSR weights
are fetched once, explicitly, with `synthsr-models fetch synthsr-v1`; nothing is
downloaded during a run. See `synthsr-models list`.

Exit codes: 0 ok, 1 some scan failed (the others were written), 16 BIDS validation
failed, 64 usage error, 65 bad input data, 66 nothing selected, 73 cannot create output.
"""

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with 64 (EX_USAGE)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def _label(prefix: str):
    def parse(value: str) -> str:
        label = value[len(prefix) :] if value.startswith(prefix) else value
        if not _LABEL_RE.match(label):
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a valid BIDS label (letters and digits only, "
                f"optionally prefixed with {prefix!r})"
            )
        return label

    parse.__name__ = f"{prefix.rstrip('-')}label"
    return parse


def _device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a device: use auto, cpu, cuda or cuda:N"
        )
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _filter_file(value: str) -> dict[str, Any]:
    """Read an fMRIPrep-style ``--bids-filter-file`` (JSON object of entity filters)."""
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"BIDS filter file {path} does not exist")
    try:
        filters = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise argparse.ArgumentTypeError(
            f"BIDS filter file {path} is not valid JSON ({exc}); see "
            "https://fmriprep.org/en/stable/faq.html#how-do-i-select-only-certain-files"
        ) from None
    if not isinstance(filters, dict) or not all(
        isinstance(v, dict) for v in filters.values()
    ):
        raise argparse.ArgumentTypeError(
            f"BIDS filter file {path} must hold a JSON object mapping a query name "
            '("anat" or a contrast such as "flair") to an object of entity filters, '
            'e.g. {"anat": {"acquisition": "ax"}}'
        )
    return filters


def _existing_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a directory")
    return path.resolve()


def _template_name(value: str) -> str:
    name = value[4:] if value.startswith("tpl-") else value
    if not _LABEL_RE.match(name):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a TemplateFlow template identifier (letters and digits, "
            "e.g. MNI152NLin2009cAsym)"
        )
    return name


def _add_downstream_options(parser: argparse.ArgumentParser) -> None:
    downstream = parser.add_argument_group("Reports, segmentation and group level")
    downstream.add_argument(
        "--skip-reports",
        "--skip_reports",
        dest="skip_reports",
        action="store_true",
        help="do not write the HTML reports (sub-<label>.html, group.html) and their figures; at group "
        "level an earlier group.html and its figures are removed (the group outputs describe this run only)",
    )
    downstream.add_argument(
        "--skip-segmentation",
        "--skip_segmentation",
        dest="skip_segmentation",
        action="store_true",
        help="do not segment the synthetic T1w images (no dseg, no volumes)",
    )
    downstream.add_argument(
        "--segmentation-model",
        "--segmentation_model",
        dest="segmentation_model",
        metavar="NAME|PATH",
        help="segmentation U-Net: a registered name or a .safetensors file with 'labels' "
        "metadata (default: the bundled synthsr-bids-seg)",
    )
    downstream.add_argument(
        "--lesion-masks",
        "--lesion_masks",
        dest="lesion_masks",
        type=_existing_dir,
        metavar="DIR",
        help="folder with lesion masks in BIDS layout (sub-<label>/[ses-<label>/]anat/"
        "*_label-lesion_roi|mask.nii.gz or *_desc-lesion_mask.nii.gz), searched in addition "
        "to the raw dataset",
    )
    downstream.add_argument(
        "--template",
        type=_template_name,
        default=DEFAULT_TEMPLATE,
        metavar="NAME",
        help=f"group level: TemplateFlow template to register to (default: {DEFAULT_TEMPLATE}); "
        "it is read from $TEMPLATEFLOW_HOME",
    )
    downstream.add_argument(
        "--template-resolution",
        "--template_resolution",
        dest="template_resolution",
        type=_positive_int,
        default=1,
        metavar="N",
        help="group level: TemplateFlow resolution index of the template (default: 1, i.e. res-01)",
    )
    downstream.add_argument(
        "--skip-registration",
        "--skip_registration",
        dest="skip_registration",
        action="store_true",
        help="group level: no template registration (no median template, no lesion map)",
    )
    downstream.add_argument(
        "--registration",
        choices=["SyN", "Affine"],
        default="SyN",
        help="group level: ANTsPy transform, SyN (affine then SyN, default) or Affine only",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (no side effects)."""
    parser = _Parser(
        prog="synthsr-bids",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "bids_dir", type=Path, help="the root of the input BIDS dataset (read only)"
    )
    parser.add_argument(
        "output_dir",
        type=Path,
        help="where the derivatives go, e.g. <bids_dir>/derivatives/synthsr",
    )
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="'participant' synthesises every selected scan; 'group' summarises what "
        "participant level wrote",
    )
    parser.add_argument("--version", action="version", version=f"synthsr-bids {__version__}")

    selection = parser.add_argument_group("Selecting the inputs")
    selection.add_argument(
        "--participant-label",
        "--participant_label",
        dest="participant_label",
        nargs="+",
        type=_label("sub-"),
        metavar="LABEL",
        help="participants to process, with or without 'sub-' (default: all)",
    )
    selection.add_argument(
        "--session-label",
        "--session_label",
        dest="session_label",
        nargs="+",
        type=_label("ses-"),
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    selection.add_argument(
        "--contrasts",
        nargs="+",
        metavar="SUFFIX",
        default=list(DEFAULT_CONTRASTS),
        help="BIDS suffixes of the anatomical images to process "
        f"(default: {' '.join(DEFAULT_CONTRASTS)})",
    )
    selection.add_argument(
        "--bids-filter-file",
        "--bids_filter_file",
        dest="bids_filter_file",
        type=_filter_file,
        metavar="FILE",
        help='JSON file of entity filters in fMRIPrep\'s format, e.g. {"anat": '
        '{"acquisition": "ax"}, "flair": {"run": 1}}; "anat" applies to every '
        "contrast, a lower-case suffix to that contrast only; JSON sidecar fields work "
        'too (e.g. {"flair": {"MagneticFieldStrength": 3}}), at the cost of reading every sidecar',
    )
    selection.add_argument(
        "--skip-bids-validation",
        "--skip_bids_validation",
        dest="skip_bids_validation",
        action="store_true",
        help="do not check the input dataset: neither the BIDS validator (which otherwise "
        "checks the selected participants and the dataset-level files; time limit "
        "$SYNTHSR_BIDS_VALIDATOR_TIMEOUT seconds, default 600) nor the check for "
        "git-annex/DataLad files whose content is not fetched",
    )
    selection.add_argument(
        "--bids-database-dir",
        dest="bids_database_dir",
        type=Path,
        metavar="DIR",
        help="folder where the pybids index of the input dataset is saved and reused "
        "by later runs and by concurrent jobs (e.g. a SLURM array) on the same dataset, "
        "whatever their --participant-label, to save indexing time on big datasets; "
        "one folder can serve several datasets. Files added to the dataset after the "
        "index was built are not seen: delete the folder to re-index. Must be outside "
        "the input dataset (or under its derivatives/)",
    )

    synthesis = parser.add_argument_group("Synthesis")
    synthesis.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="registered model name (see `synthsr-models list`) or path to a .h5 / "
        ".safetensors weight file (default: the bundled model)",
    )
    synthesis.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    synthesis.add_argument(
        "--nthreads",
        "--n-cpus",
        "--n_cpus",
        "--nprocs",
        "--omp-nthreads",
        dest="nthreads",
        type=_positive_int,
        metavar="N",
        help="CPU threads used by the network (default: all available); one process runs the scans "
        "in turn, so fMRIPrep's --nprocs and --omp-nthreads are accepted as the same limit",
    )
    synthesis.add_argument(
        "--half",
        action="store_true",
        help="fp16 autocast on CUDA (faster, less memory; ignored on CPU)",
    )
    synthesis.add_argument(
        "--disable-flipping",
        "--disable_flipping",
        dest="disable_flipping",
        action="store_true",
        help="skip the left-right flipped second pass (2x faster, slightly less robust)",
    )
    sharpening = synthesis.add_mutually_exclusive_group()
    sharpening.add_argument(
        "--disable-sharpening",
        "--disable_sharpening",
        dest="sharpen",
        action="store_const",
        const=False,
        help="skip the final unsharp mask (default: as the model asks; mri_synthsr's models are "
        "sharpened, the bundled synthsr-bids model is not: see MODEL_CARD.md)",
    )
    sharpening.add_argument(
        "--enable-sharpening",
        "--enable_sharpening",
        dest="sharpen",
        action="store_const",
        const=True,
        help="apply the final unsharp mask even when the model asks not to",
    )
    synthesis.add_argument(
        "--ct",
        action="store_true",
        help="inputs are CT: clip intensities to [0, 80] Hounsfield units first",
    )

    outputs = parser.add_argument_group("Outputs and execution")
    outputs.add_argument(
        "--native-grid",
        "--native_grid",
        dest="native_grid",
        action="store_true",
        help="also write the synthetic T1w resampled onto each input's own grid "
        "(res-native); the 1 mm image is then labelled res-1",
    )
    outputs.add_argument(
        "-w",
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        type=Path,
        metavar="DIR",
        help="scratch space (default: synthsr_work_<user> in the system temporary directory)",
    )
    outputs.add_argument(
        "--overwrite",
        action="store_true",
        help="redo scans whose outputs already exist (default: skip finished scans)",
    )
    outputs.add_argument(
        "-v",
        "--verbose",
        dest="verbose_count",
        action="count",
        default=0,
        help="more log output (-v: debug for synthsr-bids, -vv: also libraries)",
    )
    _add_downstream_options(parser)
    return parser


def check_paths(
    parser: argparse.ArgumentParser, bids_dir: Path, output_dir: Path, work_dir: Path
) -> None:
    """Refuse output locations that would write into the raw dataset."""
    if output_dir == bids_dir:
        parser.error(
            "the output directory must not be the BIDS dataset itself; use e.g. "
            f"{bids_dir / 'derivatives' / 'synthsr'}"
        )
    if output_dir.is_relative_to(bids_dir) and not output_dir.is_relative_to(bids_dir / "derivatives"):
        parser.error(
            f"the output directory {output_dir} is inside the raw dataset but not under "
            f"its derivatives/ folder; use e.g. {bids_dir / 'derivatives' / 'synthsr'}"
        )
    if work_dir.is_relative_to(bids_dir) and not work_dir.is_relative_to(bids_dir / "derivatives"):
        parser.error(
            f"the work directory {work_dir} must not be inside the raw dataset {bids_dir}"
        )


def default_work_dir() -> Path:
    """``<tmp>/synthsr_work_<user>``: per user, so that users of a shared machine never collide."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name (e.g. an arbitrary UID in a container)
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"synthsr_work_{re.sub(r'[^A-Za-z0-9_.-]', '_', user)}"


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse ``argv`` into a :class:`RunConfig` (exits 64 on usage errors)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parser.parse_args(argv)

    bids_dir = opts.bids_dir.expanduser().resolve()
    output_dir = opts.output_dir.expanduser().resolve()
    work_dir = (
        opts.work_dir.expanduser().resolve()
        if opts.work_dir
        else default_work_dir()
    )
    check_paths(parser, bids_dir, output_dir, work_dir)
    bids_database_dir = None
    if opts.bids_database_dir is not None:
        from synthsr_bids.discovery import check_database_dir

        try:
            bids_database_dir = check_database_dir(opts.bids_database_dir, bids_dir)
        except UsageError as exc:
            parser.error(str(exc))

    unknown = [c for c in opts.contrasts if not re.match(r"^[A-Za-z0-9]+$", c)]
    if unknown:
        parser.error(f"--contrasts: {unknown} are not BIDS suffixes")

    inference = InferenceSettings(
        model=opts.model,
        device=opts.device,
        nthreads=opts.nthreads,
        flip=not opts.disable_flipping,
        sharpen=opts.sharpen,
        ct=opts.ct,
        half=opts.half,
    )
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S_") + uuid.uuid4().hex[:8]
    return RunConfig(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=opts.analysis_level,
        work_dir=work_dir,
        participant_labels=tuple(dict.fromkeys(opts.participant_label or ())),
        session_labels=tuple(dict.fromkeys(opts.session_label or ())),
        contrasts=tuple(dict.fromkeys(opts.contrasts)),
        bids_filters=opts.bids_filter_file or {},
        skip_bids_validation=opts.skip_bids_validation,
        bids_database_dir=bids_database_dir,
        inference=inference,
        native_grid=opts.native_grid,
        overwrite=opts.overwrite,
        verbosity=opts.verbose_count,
        command_line=("synthsr-bids", *argv),
        run_id=run_id,
        downstream=DownstreamSettings(
            reports=not opts.skip_reports,
            segmentation=not opts.skip_segmentation,
            segmentation_model=opts.segmentation_model,
            lesion_masks=opts.lesion_masks,
            template=opts.template,
            template_resolution=opts.template_resolution,
            registration=not opts.skip_registration,
            registration_type=opts.registration,
        ),
    )
