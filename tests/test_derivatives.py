import json
import multiprocessing
from pathlib import Path

import pytest

from synthsr_bids.derivatives import dataset
from synthsr_bids.derivatives.naming import build_name, desc_for, output_paths
from synthsr_bids.derivatives.sidecars import ModelInfo, provenance, provenance_matches
from synthsr_bids.discovery import parse_entities


@pytest.mark.parametrize(
    "source,expected",
    [
        ("sub-01_ses-1_acq-ax_FLAIR.nii.gz", "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_desc-synthsrFLAIR_T1w.nii.gz"),
        ("sub-01_T2w.nii", "sub-01/anat/sub-01_desc-synthsrT2w_T1w.nii.gz"),
        ("sub-01_ses-a_acq-cor_ce-gad_rec-x_run-02_echo-1_part-mag_T1w.nii.gz",
         "sub-01/ses-a/anat/sub-01_ses-a_acq-cor_ce-gad_rec-x_run-02_echo-1_part-mag_desc-synthsrT1w_T1w.nii.gz"),
    ],
)
def test_output_names_keep_every_entity(tmp_path, source, expected):
    entities = parse_entities(source)
    suffix = source.split("_")[-1].split(".")[0]
    paths = output_paths(tmp_path, entities, suffix)
    assert paths.t1w == tmp_path / expected
    assert paths.sidecar == tmp_path / expected.replace(".nii.gz", ".json")
    assert paths.native_t1w is None


def test_flair_and_t2w_of_one_session_do_not_collide(tmp_path):
    entities = parse_entities("sub-01_ses-1_run-1_FLAIR.nii.gz")
    flair = output_paths(tmp_path, entities, "FLAIR")
    t2w = output_paths(tmp_path, entities, "T2w")
    other_run = output_paths(tmp_path, parse_entities("sub-01_ses-1_run-2_FLAIR.nii.gz"), "FLAIR")
    assert len({flair.t1w, t2w.t1w, other_run.t1w}) == 3


def test_native_grid_names_use_res(tmp_path):
    paths = output_paths(tmp_path, parse_entities("sub-01_FLAIR.nii.gz"), "FLAIR", native_grid=True)
    assert paths.t1w.name == "sub-01_res-1_desc-synthsrFLAIR_T1w.nii.gz"
    assert paths.native_t1w.name == "sub-01_res-native_desc-synthsrFLAIR_T1w.nii.gz"
    assert paths.native_sidecar.name == "sub-01_res-native_desc-synthsrFLAIR_T1w.json"


def test_desc_is_alphanumeric():
    assert desc_for("T2starw") == "synthsrT2starw"
    assert build_name({"subject": "1"}, suffix="T1w", extension=".json", extra={"desc": "x"}) == "sub-1_desc-x_T1w.json"


def test_dataset_description(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(
        json.dumps({"Name": "Study", "BIDSVersion": "1.9.0", "DatasetDOI": "doi:10.1/x", "License": "CC0"})
    )
    monkeypatch.setenv("SYNTHSR_BIDS_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("SYNTHSR_BIDS_CONTAINER_TAG", "synthsr-bids:0.1.0")
    path = dataset.ensure_dataset_description(tmp_path / "out", raw)
    description = json.loads(path.read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "synthsr-bids"
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "synthsr-bids:0.1.0"}
    assert description["SourceDatasets"][0]["DOI"] == "doi:10.1/x"
    assert description["DatasetLinks"]["raw"] == raw.as_uri()
    # a second job keeps the first file
    path.write_text(json.dumps({**description, "Name": "first"}))
    dataset.ensure_dataset_description(tmp_path / "out", raw)
    assert json.loads(path.read_text())["Name"] == "first"


def test_container_info_singularity():
    assert dataset.container_info({"APPTAINER_CONTAINER": "/images/synthsr.sif"}) == {
        "Type": "singularity", "URI": "/images/synthsr.sif"}
    assert dataset.container_info({}) is None


def _concurrent_job(args):
    output_dir, raw, index = args
    output_dir = Path(output_dir)
    for round_ in range(5):
        dataset.ensure_dataset_description(output_dir, Path(raw))
        dataset.add_descriptions(output_dir, {f"synthsr{index}x{round_}": f"job {index} round {round_}"})
        dataset.ensure_bidsignore(output_dir, [f"job{index}/"] + list(dataset.BIDSIGNORE_LINES))
    return index


def test_shared_files_survive_concurrent_jobs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "Study", "BIDSVersion": "1.9.0"}))
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        assert sorted(pool.map(_concurrent_job, [(str(out), str(raw), i) for i in range(4)])) == [0, 1, 2, 3]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    rows = (out / "descriptions.tsv").read_text().splitlines()
    assert rows[0] == "desc_id\tdescription"
    assert sorted(rows[1:]) == sorted(f"desc-synthsr{i}x{r}\tjob {i} round {r}" for i in range(4) for r in range(5))
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert sorted(ignore) == sorted(set(ignore))
    assert {f"job{i}/" for i in range(4)} <= set(ignore)
    assert not list(out.glob(".tmp-*"))


def test_provenance_roundtrip(tmp_path):
    model = ModelInfo(name="m", sha256="ab" * 32, license="Apache-2.0")
    prov = provenance(source_relpath="sub-01/anat/x.nii.gz", source_sha256="cd" * 32, model=model,
                      flip=True, sharpen=True, ct=False, native_grid=False, precision="float32")
    sidecar = tmp_path / "x.json"
    assert not provenance_matches(sidecar, prov)
    sidecar.write_text(json.dumps({"SynthSR": {"Provenance": prov}}))
    assert provenance_matches(sidecar, prov)
    assert not provenance_matches(sidecar, {**prov, "TestTimeFlipping": False})
    assert not provenance_matches(sidecar, {**prov, "Precision": "float16-autocast"})  # --half on a GPU
    sidecar.write_text("{truncated")
    assert not provenance_matches(sidecar, prov)
    # written before Precision joined the provenance: SynthSR.Precision stands in (an upgrade redoes nothing)
    old = {k: v for k, v in prov.items() if k != "Precision"}
    sidecar.write_text(json.dumps({"SynthSR": {"Provenance": old, "Precision": "float32"}}))
    assert provenance_matches(sidecar, prov)
    assert not provenance_matches(sidecar, {**prov, "Precision": "float16-autocast"})


def test_dataset_description_without_hard_links(tmp_path, monkeypatch):
    """Filesystems without hard links (some FUSE/SMB mounts) fall back to lock + rename."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "Study", "BIDSVersion": "1.9.0"}))

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(dataset.os, "link", no_links)
    path = dataset.ensure_dataset_description(tmp_path / "out", raw)
    assert json.loads(path.read_text())["DatasetType"] == "derivative"
    path.write_text(json.dumps({"Name": "first", "DatasetType": "derivative"}))
    dataset.ensure_dataset_description(tmp_path / "out", raw)
    assert json.loads(path.read_text())["Name"] == "first"
    assert not list((tmp_path / "out").glob(".tmp-*"))
