"""Group QC outliers and the group report ``group.html`` written from given table rows: which
image is flagged and for what, figures marking exactly what the tables flag, outliers listed as
text, bounded registration figures, failed participants explained."""

from __future__ import annotations

import html.parser
import math
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from bids_builder import write_dataset_description
from synthsr_bids.cli.parser import parse_args
from synthsr_bids.group.qc import (
    ABSOLUTE_FLOOR,
    OUTLIER_METRICS,
    column_outliers,
    flagged_metrics,
    outlier_flags,
    robust_z,
)
from synthsr_bids.group.templates import TemplateSpace
from synthsr_bids.reports import group as group_report
from synthsr_bids.reports.figures import pages, spread, wrap_label
from synthsr_bids.reports.render import render
from test_reports import parse_report, red_pixels

RUN1 = "sub-02_ses-1_run-01_desc-synthsrT2w_T1w"
RUN2 = "sub-02_ses-1_run-02_desc-synthsrT2w_T1w"
STEMS = [
    "sub-01_ses-1_desc-synthsrT2w_T1w", RUN1, RUN2, "sub-03_ses-1_desc-synthsrT1w_T1w",
    "sub-05_ses-1_acq-ax_desc-synthsrFLAIR_T1w", "sub-05_ses-1_acq-cor_desc-synthsrFLAIR_T1w",
    "sub-06_ses-1_desc-synthsrT2w_T1w",
]
BASE = {"fg_fraction": 0.35, "intensity_p99": 120.0, "saturated_fraction": 0.0, "wm_median": 110.0, "cjv": 0.5,
        "segmented_volume_mm3": 1.2e6, "template_corr": math.nan, "runtime_s": 10.0}


def qc_rows(**per_metric: list[float]) -> list[dict]:
    """One QC row per image of ``STEMS`` (all metrics alike unless given), flagged as run.py does."""
    rows = []
    for index, stem in enumerate(STEMS):
        subject = stem.split("_")[0]
        row = {
            "participant_id": subject, "session_id": "ses-1", "image": f"{subject}/ses-1/anat/{stem}.nii.gz",
            "source_contrast": "T2w", "source_voxel_size": "1 1 3", "source_max_voxel_mm": 3.0, "model": "identity",
            "lesion_volume_mm3": math.nan, **BASE,
        }
        row["fg_fraction"] += 0.001 * index  # a little spread, far from any flag
        for metric, values in per_metric.items():
            row[metric] = values[index]
        rows.append(row)
    for row, flags in zip(rows, outlier_flags(rows)):
        row["qc_flags"] = flags or None
    return rows


def subject_report(out: Path, subject: str, stems: list[str], failures: list[dict] | None = None) -> None:
    """A participant report like subject.py's: one section (id = stem) per image, then errors."""
    images = [{"name": f"{s}.nii.gz", "short": s, "anchor": s, "facts": [], "warnings": [], "figures": [],
               "volumes": []} for s in stems]
    (out / f"{subject}.html").write_text(render("subject.html", subject=subject[4:], images=images,
                                                failures=failures or [], segmentation_status=""))


@pytest.fixture
def config(tmp_path):
    write_dataset_description(tmp_path / "ds")
    config = parse_args([str(tmp_path / "ds"), str(tmp_path / "out"), "group"])
    config.output_dir.mkdir()
    return config


def write(config, rows, *, volume_rows=(), structures=(), asymmetry=(), missing=(), space=None) -> Path:
    return group_report.write_group_report(
        config, qc_rows=rows, volume_rows=list(volume_rows), structures=list(structures),
        asymmetry_columns=list(asymmetry), missing_subjects=list(missing), missing_scans=[], errors=[], space=space,
    )


class _Table(html.parser.HTMLParser):
    """Cells (text, class) of the first table whose header starts with ``image``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, str]]] = []
        self._cell: list[str] | None = None
        self._class = ""

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell, self._class = [], dict(attrs).get("class") or ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(("".join(self._cell).strip(), self._class))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def qc_table(path: Path) -> list[dict[str, tuple[str, str]]]:
    parser = _Table()
    parser.feed(path.read_text())
    start = next(i for i, row in enumerate(parser.rows) if row and row[0][0] == "image")
    header = [text for text, _ in parser.rows[start]]
    body = []
    for row in parser.rows[start + 1:]:
        if len(row) != len(header):
            break
        body.append(dict(zip(header, row)))
    return body


# ---------------------------------------------------------------------------- outlier maths
def test_an_outlier_from_a_zero_median_is_flagged_tiny_differences_are_not():
    saturated = [0.0] * 6 + [0.4]
    assert outlier_flags([{"saturated_fraction": v} for v in saturated])[-1] == ["saturated_fraction+"]
    assert robust_z(saturated, ABSOLUTE_FLOOR["saturated_fraction"])[-1] == pytest.approx(0.4 / 0.01)
    # below 3.5 floors (3.5 % of the head at the ceiling) nothing is flagged
    for small in (0.0001, 0.02, 0.034):
        assert outlier_flags([{"saturated_fraction": v} for v in [0.0] * 6 + [small]]) == [[]] * 7
    # every metric has a floor, so no metric is blind when the whole group agrees
    assert set(ABSOLUTE_FLOOR) == set(OUTLIER_METRICS)
    for metric, floor in ABSOLUTE_FLOOR.items():
        base = 0.9 if metric == "template_corr" else 0.0  # (a correlation below 0.5 is flagged by rule)
        flags = outlier_flags([{metric: base}] * 6 + [{metric: base - 10 * floor}])
        assert flags == [[]] * 6 + [[f"{metric}-"]], metric
        assert outlier_flags([{metric: base}] * 6 + [{metric: base - 3 * floor}]) == [[]] * 7, metric
    # volume and asymmetry columns: a structure absent from most images, one asymmetric image
    volumes = [{"Lesion": 0.0, "asym_Hippocampus": 0.0}] * 6 + [{"Lesion": 500.0, "asym_Hippocampus": 0.2}]
    found = column_outliers(volumes, ["Lesion"], 10.0) + column_outliers(volumes, ["asym_Hippocampus"], 0.01)
    assert [(o.row, o.column, o.value, o.median, o.direction) for o in found] == [
        (6, "Lesion", 500.0, 0.0, "above"), (6, "asym_Hippocampus", 0.2, 0.0, "above")]
    assert column_outliers(volumes[:6] + [{"Lesion": 20.0}], ["Lesion"], 10.0) == []


def test_flag_names_round_trip():
    assert flagged_metrics(["cjv+", "wm_median-", "template_corr<0.5"]) == {"cjv", "wm_median", "template_corr"}
    assert flagged_metrics(None) == set() and flagged_metrics([]) == set()


def test_label_helpers():
    assert wrap_label(RUN1, 24) == "sub-02_ses-1_run-01_\ndesc-synthsrT2w_T1w"
    assert wrap_label("sub-05 ses-1") == "sub-05 ses-1"
    assert spread([0.51, 0.5, 0.5, 0.95], gap=0.1).tolist() == pytest.approx([0.7, 0.5, 0.6, 0.95])
    assert spread([1.0, 0.95, 0.9], gap=0.1).tolist() == pytest.approx([1.0, 0.9, 0.8])  # pushed down from the top
    assert [len(p) for p in pages(1000, 48)] == [48, 47, 48, 47, 48, 48, 47, 48, 48, 47, 48, 47, 48, 48, 47, 48,
                                                 48, 47, 48, 47, 48]
    assert [p for r in pages(1000, 48) for p in r] == list(range(1000))
    assert pages(3, 48) == [range(0, 3)] and pages(0, 48) == []


# ---------------------------------------------------------------------------- group.html
def test_table_names_each_image_links_its_section_and_shows_every_flagged_metric(config):
    volumes = [1.2e6] * 7
    volumes[1] = 0.6e6  # run-01: half a brain segmented
    rows = qc_rows(saturated_fraction=[0, 0, 0.4, 0, 0, 0, 0], segmented_volume_mm3=volumes)
    assert rows[1]["qc_flags"] == ["segmented_volume_mm3-"] and rows[2]["qc_flags"] == ["saturated_fraction+"]
    subject_report(config.output_dir, "sub-02", [RUN1, RUN2])
    subject_report(config.output_dir, "sub-01", [])  # an older report without the image's section
    path = write(config, rows)
    table = qc_table(path)
    assert [r["image"][0] for r in table] == STEMS
    assert set(OUTLIER_METRICS) | {"participant_id", "session_id", "qc_flags"} <= set(table[0])
    assert table[1]["segmented_volume_mm3"] == ("600000", "num flag")
    assert table[2]["saturated_fraction"] == ("0.4", "num flag")
    assert table[1]["saturated_fraction"] == ("0", "num") and table[2]["segmented_volume_mm3"] == ("1200000", "num")
    flagged_cells = [(i, c) for i, r in enumerate(table) for c, (_, cls) in r.items() if "flag" in cls.split()]
    assert flagged_cells == [(1, "segmented_volume_mm3"), (2, "saturated_fraction")]
    links = parse_report(path)
    assert f"sub-02.html#{RUN1}" in links.fragments and f"sub-02.html#{RUN2}" in links.fragments
    assert "sub-01.html" in links.links and not any(f.startswith("sub-01.html#") for f in links.fragments)
    assert all((config.output_dir / target).is_file() for target in links.links + links.images)
    for fragment in links.fragments:  # every anchor exists in its report
        target, anchor = fragment.split("#")
        assert f'id="{anchor}"' in (config.output_dir / target).read_text()


def test_qc_figure_is_red_exactly_where_the_table_flags(config):
    rows = qc_rows(source_max_voxel_mm=[1, 1, 1, 1.2, 1, 1, 6])
    assert all(r["qc_flags"] is None for r in rows)
    path = write(config, rows)
    figure = config.output_dir / "figures/group_desc-qc_plot.png"
    assert red_pixels(figure) == 0  # the informational voxel-size panel is never red
    assert "no image is flagged" in parse_report(path).alts[0]
    assert "source_max_voxel_mm (info)" in path.read_text()
    rows = qc_rows(saturated_fraction=[0, 0, 0.4, 0, 0, 0, 0], source_max_voxel_mm=[1, 1, 1, 1.2, 1, 1, 6])
    marks = group_report.qc_marks(rows)
    assert marks["saturated_fraction"] == [False, False, True, False, False, False, False]
    assert not any(any(v) for m, v in marks.items() if m != "saturated_fraction")
    write(config, rows)
    assert red_pixels(figure) > 10


def test_volume_and_asymmetry_outliers_are_listed_as_text(config):
    rows = qc_rows()
    volume_rows = [{"participant_id": r["participant_id"], "session_id": "ses-1", "image": r["image"],
                    "Left-Hippocampus": 4000.0 + i, "Right-Hippocampus": 4000.0, "asym_Hippocampus": 0.001 * i}
                   for i, r in enumerate(rows)]
    volume_rows[2]["Left-Hippocampus"] = 6000.0
    volume_rows[5]["asym_Hippocampus"] = -0.3
    subject_report(config.output_dir, "sub-02", [RUN1, RUN2])
    path = write(config, rows, volume_rows=volume_rows, structures=["Left-Hippocampus", "Right-Hippocampus"],
                 asymmetry=["asym_Hippocampus"])
    links = parse_report(path)
    text = " ".join("".join(links.text).split())
    assert f"{RUN2}: Left-Hippocampus 6000 mm³, above the group median 4004 mm³ (robust z +" in text
    assert ("sub-05_ses-1_acq-cor_desc-synthsrFLAIR_T1w: asymmetry of Hippocampus -0.300, below the group "
            "median +0.002 (robust z -30.2)") in text
    assert f"sub-02.html#{RUN2}" in links.fragments
    alts = dict(zip((Path(i).name for i in links.images), links.alts))
    assert alts["group_desc-volumes_plot.png"] == (
        "Strip plots of the volumes of 2 structures over 7 segmented images; 1 outlying volume, listed below")
    assert alts["group_desc-asymmetry_plot.png"].endswith("1 outlying value, listed below")
    assert all(len(alt) > 40 for alt in links.alts)


def tiny_space(folder: Path, n_registered: int, *, lesion: bool = False) -> TemplateSpace:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    template = np.zeros((12, 12, 12), np.float32)
    template[2:10, 2:10, 2:10] = 100.0
    nib.save(nib.Nifti1Image(template, np.eye(4)), str(folder / "tpl.nii.gz"))
    space = TemplateSpace(name="Tiny", t1w=folder / "tpl.nii.gz")
    for index in range(n_registered):
        path = folder / f"reg{index}.nii.gz"
        nib.save(nib.Nifti1Image(template + rng.normal(0, 5, template.shape).astype(np.float32), np.eye(4)), str(path))
        space.registered.append((STEMS[index % len(STEMS)], path))
    if lesion:
        frequency = np.zeros(template.shape, np.float32)
        frequency[5:7, 5:7, 5:7] = 1.0
        nib.save(nib.Nifti1Image(frequency, np.eye(4)), str(folder / "lesion.nii.gz"))
        space.lesion_map, space.lesion_n = folder / "lesion.nii.gz", 1
    return space


def test_registration_figures_are_bounded(config, monkeypatch, tmp_path):
    figures = config.output_dir / "figures"
    # a small dataset: one figure, under its usual name
    path = write(config, qc_rows(), space=tiny_space(tmp_path / "a", 3))
    assert sorted(p.name for p in figures.glob("*registration*")) == ["group_space-Tiny_desc-registration_plot.png"]
    assert sum("registration" in src for src in parse_report(path).images) == 1
    # many images: figures of at most MAX_THUMBNAILS tiles (one row of 4 here), stale pages removed
    monkeypatch.setattr(group_report, "MAX_THUMBNAILS", 4)
    (figures / "group_space-Tiny_desc-registration_page-5_plot.png").write_bytes(b"old")
    path = write(config, qc_rows(), space=tiny_space(tmp_path / "b", 10))
    names = sorted(p.name for p in figures.glob("*registration*"))
    assert names == ["group_space-Tiny_desc-registration_page-2_plot.png",
                     "group_space-Tiny_desc-registration_page-3_plot.png",
                     "group_space-Tiny_desc-registration_plot.png"]
    for name in names:
        height, width = matplotlib.image.imread(str(figures / name)).shape[:2]
        assert height <= (2.4 + 0.4) * 80 + 1 and width <= 4 * 2.2 * 80 + 1  # one row of at most 4 tiles
    links = parse_report(path)
    pages_shown = [(src, alt) for src, alt in zip(links.images, links.alts) if "registration" in src]
    assert [Path(src).name for src, _ in pages_shown] == [names[2], names[0], names[1]]
    assert "(images 1 to 3 of 10)" in pages_shown[0][1] and "(images 8 to 10 of 10)" in pages_shown[2][1]
    assert "All 10 registered images, in 3 figures of at most 4 images each" in " ".join(links.text)


def test_lesion_counts_and_failed_participants(config, monkeypatch, tmp_path):
    titles = []
    real_mosaic = group_report.mosaic

    def spy(*args, **kwargs):
        titles.append(kwargs.get("title"))
        return real_mosaic(*args, **kwargs)

    monkeypatch.setattr(group_report, "mosaic", spy)
    subject_report(config.output_dir, "sub-04", [], failures=[
        {"what": "sub-04/anat/sub-04_T1w.nii.gz", "error": "is constant (every voxel is 0) <b>", "crash": None}])
    path = write(config, qc_rows(), space=tiny_space(tmp_path / "s", 2, lesion=True), missing=["sub-04", "sub-07"])
    assert titles == ["Lesion frequency (1 participant with a lesion mask)"]
    assert group_report.count(1, "participant") == "1 participant" and group_report.count(2, "image") == "2 images"
    links = parse_report(path)
    text = " ".join("".join(links.text).split())
    assert "Fraction of the 1 participant with a lesion mask" in text
    assert "sub-04.html#errors" in links.fragments
    assert "sub-04/anat/sub-04_T1w.nii.gz is constant (every voxel is 0) <b>" in text  # the reason, escaped
    assert "sub-07 has no synthetic image. It has no participant report" in text
    assert not any(link.startswith("sub-07") for link in links.links)
