"""Participant reports: figures drawn with matplotlib, self-contained HTML that references
existing files, errors listed, concurrent jobs, and a real browser rendering."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from bids_builder import add_broken_scans, add_scan, scan, write_dataset_description
from downstream_builder import phantom_lesion_mask, write_segmenter
from models_builder import identity_unet, write_model
from synthsr_bids.cli.run import main
from synthsr_bids.reports.figures import (
    Layer,
    intensity_window,
    mosaic,
    slice_indices,
    slice_reference,
    strip_plots,
)

REPO = Path(__file__).resolve().parents[1]


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.alts: list[str] = []
        self.links: list[str] = []  # the files linked to (without any #fragment)
        self.fragments: list[str] = []  # links into a section of a file: "sub-01.html#<id>"
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        for key in ("src", "href"):
            value = values.get(key)
            if value and value.startswith(("http:", "https:", "//")):
                self.external.append(value)
        if tag == "img":
            self.images.append(values["src"])
            self.alts.append(values.get("alt") or "")
        if tag == "a" and values.get("href") and not values["href"].startswith("#"):
            target, _, fragment = values["href"].partition("#")
            self.links.append(target)
            if fragment:
                self.fragments.append(values["href"])
        if tag in ("script", "link"):
            self.external.append(f"<{tag}>")

    def handle_data(self, data):
        self.text.append(data)


def parse_report(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text())
    return parser


def red_pixels(png: Path) -> int:
    rgb = matplotlib.image.imread(str(png))[..., :3]
    return int(((rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.4) & (rgb[..., 2] < 0.4)).sum())


# ---------------------------------------------------------------------------- figures
def test_slice_positions_cover_the_foreground():
    volume = np.zeros((40, 50, 30))
    volume[10:30, 5:45, 3:27] = 1.0
    assert slice_indices(volume, 0, 5) == [13, 16, 20, 23, 26]
    assert all(5 <= i < 45 for i in slice_indices(volume, 1, 5))
    assert intensity_window(volume) == (1.0, 2.0)  # constant foreground: a non-empty window


def test_slices_follow_the_input_when_the_synthetic_image_is_blank():
    volume = np.zeros((40, 50, 30))
    volume[20:30, 5:45, 3:27] = 1.0
    blank = np.zeros_like(volume)
    assert slice_reference([Layer("input", volume), Layer("synthetic", blank)]) is volume
    assert slice_reference([Layer("input", volume * 0.5), Layer("synthetic", volume)]) is volume
    assert slice_reference([Layer("input", blank), Layer("synthetic", blank)]) is blank


def test_mosaic_draws_rows_planes_and_lesion_outline(tmp_path):
    volume = np.zeros((40, 48, 36))
    volume[5:35, 6:42, 4:32] = 100.0
    lesion = np.zeros(volume.shape, dtype=bool)
    lesion[22:28, 20:28, 14:22] = True
    plain = mosaic([Layer("input", volume * 0.5), Layer("synthetic", volume)], tmp_path / "a.png", n_slices=4)
    outlined = mosaic([Layer("input", volume * 0.5), Layer("synthetic", volume)], tmp_path / "b.png",
                      contour=lesion, n_slices=4)
    a, b = matplotlib.image.imread(str(plain)), matplotlib.image.imread(str(outlined))
    assert a.shape == b.shape and a.shape[0] > a.shape[1]  # 6 rows (3 planes x 2 layers) of 4 slices
    assert red_pixels(plain) == 0 and red_pixels(outlined) > 20
    assert not list(tmp_path.glob(".tmp-*"))


def test_strip_plot_marks_flagged_points(tmp_path):
    path = strip_plots({"x": [1.0, 1.1, 5.0], "y": [float("nan")] * 3}, ["a", "b", "c"], tmp_path / "s.png",
                       flagged={"x": [False, False, True]})
    rgb = matplotlib.image.imread(str(path))[..., :3]
    assert red_pixels(path) > 10 and rgb.shape[0] > 100


# ---------------------------------------------------------------------------- participant reports
@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """Participant level on sub-01 (FLAIR + T2w, lesion mask) and sub-03 (one good scan, two
    broken ones), with a segmentation model."""
    root = tmp_path_factory.mktemp("reports")
    bids = root / "ds"
    write_dataset_description(bids)
    add_scan(bids, "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz", scan("FLAIR", zooms=(1, 1, 4)))
    add_scan(bids, "sub-01/ses-1/anat/sub-01_ses-1_run-01_T2w.nii.gz", scan("T2w", zooms=(1, 3, 1), axcodes="LAS"))
    add_broken_scans(bids)
    nib.save(phantom_lesion_mask(), str(bids / "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_label-lesion_roi.nii.gz"))
    out = root / "out"
    argv = [str(bids), str(out), "participant", "--model", str(write_model(identity_unet(), root / "m.safetensors")),
            "--segmentation-model", str(write_segmenter(root / "seg.safetensors")), "--nthreads", "1",
            "--skip-bids-validation", "-w", str(root / "work")]
    code = main(argv)
    return {"root": root, "bids": bids, "out": out, "code": code, "argv": argv}


def test_reports_exist_per_participant_with_existing_figures(reported):
    out = reported["out"]
    assert reported["code"] == 1  # sub-03 has broken scans
    assert sorted(p.name for p in out.glob("sub-*.html")) == ["sub-01.html", "sub-03.html"]
    for name in ("sub-01.html", "sub-03.html"):
        links = parse_report(out / name)
        assert links.external == []  # offline: no CDN, no scripts, no external styles
        assert links.images, name
        for target in links.images + links.links:
            assert (out / target).is_file(), f"{name} references missing {target}"
            assert not target.startswith("/")
    figures = sorted(p.name for p in (out / "sub-01" / "figures").glob("*.png"))
    assert figures == [
        "sub-01_ses-1_acq-ax_desc-synthsrFLAIR_T1w_dseg.png", "sub-01_ses-1_acq-ax_desc-synthsrFLAIR_T1w_mosaic.png",
        "sub-01_ses-1_run-01_desc-synthsrT2w_T1w_dseg.png", "sub-01_ses-1_run-01_desc-synthsrT2w_T1w_mosaic.png",
    ]
    # the lesion mask is outlined in red on the FLAIR mosaic
    assert red_pixels(out / "sub-01/figures/sub-01_ses-1_acq-ax_desc-synthsrFLAIR_T1w_mosaic.png") > 20


def test_report_shows_sidecar_facts_volumes_and_errors(reported):
    out = reported["out"]
    text = " ".join(parse_report(out / "sub-01.html").text)
    assert "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz" in text
    assert "1 × 1 × 4 mm" in text and "1 × 3 × 1 mm" in text
    assert "FLAIR" in text and "T2w" in text and "(sha256" in text
    assert "No errors in this run." in text
    assert "Cerebral-Cortex" in text and "Volumes (mm³)" in text
    assert "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_acq-ax_label-lesion_roi.nii.gz" in text
    report3 = (out / "sub-03.html").read_text()
    text3 = " ".join(parse_report(out / "sub-03.html").text)
    assert "sub-03/ses-1/anat/sub-03_ses-1_T2w.nii.gz" in text3 and "empty (0-byte) file" in text3
    assert "truncated or corrupt" in text3
    assert report3.count('class="error"') == 2
    assert "sub-03_ses-1_desc-synthsrFLAIR_T1w.nii.gz" in text3  # the good scan is shown


def test_report_escapes_error_text(reported, tmp_path):
    from synthsr_bids.cli.parser import parse_args
    from synthsr_bids.morphometry.participant import Failure
    from synthsr_bids.reports.subject import write_subject_report

    out = tmp_path / "copy"
    shutil.copytree(reported["out"], out)
    config = parse_args([str(reported["bids"]), str(out), "participant"])
    path = write_subject_report(config, "01", failures=[Failure("<b>x</b>", "<script>alert(1)</script> & more")])
    content = path.read_text()
    assert "<script>" not in content and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in content


def test_rerun_keeps_reports_and_figures_in_sync(reported):
    out = reported["out"]
    figure = out / "sub-01/figures/sub-01_ses-1_acq-ax_desc-synthsrFLAIR_T1w_mosaic.png"
    stamp = figure.stat().st_mtime_ns
    assert main(reported["argv"] + ["--participant-label", "01"]) == 0
    assert figure.stat().st_mtime_ns == stamp  # nothing changed: the figure is not redrawn
    assert "No errors in this run." in (out / "sub-01.html").read_text()


@pytest.mark.slow
def test_concurrent_jobs_of_one_participant_share_the_report(tmp_path, reported):
    """Two jobs (one per session) of the same participant at once: both finish, the report
    lists both images and every figure it references exists."""
    bids = tmp_path / "ds"
    write_dataset_description(bids)
    add_scan(bids, "sub-05/ses-1/anat/sub-05_ses-1_FLAIR.nii.gz", scan("FLAIR", zooms=(1, 1, 3)))
    add_scan(bids, "sub-05/ses-2/anat/sub-05_ses-2_T2w.nii.gz", scan("T2w", zooms=(1, 1, 2)))
    out = tmp_path / "out"
    model = reported["argv"][reported["argv"].index("--model") + 1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    commands = [
        [sys.executable, "-m", "synthsr_bids", str(bids), str(out), "participant", "--model", model,
         "--session-label", session, "--skip-bids-validation", "--nthreads", "1", "-w", str(tmp_path / f"w{session}")]
        for session in ("1", "2")
    ]
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in commands]
    outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    links = parse_report(out / "sub-05.html")
    text = " ".join(links.text)
    assert "sub-05_ses-1_desc-synthsrFLAIR_T1w.nii.gz" in text and "sub-05_ses-2_desc-synthsrT2w_T1w.nii.gz" in text
    # per image a mosaic and a segmentation figure (the bundled segmenter is the default)
    assert len(links.images) == 4 and all((out / src).is_file() for src in links.images)
    assert all("segmentation model synthsr-bids-seg" in output for output in outputs)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(reported, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1800",
         f"--screenshot={shot}", (reported["out"] / "sub-01.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    rgb = matplotlib.image.imread(str(shot))[..., :3]
    assert rgb.shape[:2] == (1800, 1200)
    dark = (rgb.mean(axis=2) < 0.15).mean()  # the figures' dark background
    assert dark > 0.05, "the figures are not displayed"
    header = rgb[:40].reshape(-1, 3).mean(axis=0)
    assert header[2] > header[0]  # the blue title bar (CSS applied)
