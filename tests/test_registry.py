"""Model registry: packaged data, site registries, cache location, resolve_model, sha256 records."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest

from synthsr_bids.models import registry
from synthsr_bids.models.registry import (
    DEFAULT_MODEL,
    ENV_EXTRA_MODELS,
    REGISTRY,
    USER_LICENSE,
    ModelNotAvailableError,
    ModelSpec,
    file_sha256,
    get_registry,
    load_registry_file,
    model_status,
    models_cache_dir,
    resolve_model,
)

DATA = b"synthetic weights " * 1000
DATA_SHA256 = hashlib.sha256(DATA).hexdigest()

ENTRY = {
    "name": "site-model",
    "version": "3",
    "description": "in-house model",
    "filename": "site_model.h5",
    "url": "https://models.example.org/site_model.h5",
    "size": len(DATA),
    "sha256": DATA_SHA256,
    "license": "CC-BY-4.0",
    "file_format": "keras-h5",
    "citation": "us",
    "in_channels": 2,
}


def _write_registry(path: Path, *entries: dict) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "models": list(entries)}), encoding="utf-8")
    return path


def _site_registry(tmp_path: Path, **changes: object) -> dict[str, ModelSpec]:
    return load_registry_file(_write_registry(tmp_path / "site.json", {**ENTRY, **changes}))


# --------------------------------------------------------------------------- packaged data


def test_packaged_registry_holds_the_official_models() -> None:
    assert DEFAULT_MODEL == "synthsr-bids"
    assert list(REGISTRY) == ["synthsr-bids", "synthsr-bids-seg", "synthsr-v1", "synthsr-v2", "synthsr-lowfield"]
    v1 = REGISTRY["synthsr-v1"]
    assert v1.url == "https://raw.githubusercontent.com/BBillot/SynthSR/main/models/SynthSR_v10_210712.h5"
    assert (v1.size, v1.sha256) == (53_075_984, "2fd59e96196388360eba95254fb6dfc9eb9eb8638018b590575e47e0a387f255")
    assert (v1.license, v1.file_format, v1.in_channels, v1.bundled) == ("Apache-2.0", "keras-h5", 1, False)
    v2 = REGISTRY["synthsr-v2"]
    assert (v2.filename, v2.size, v2.license) == ("synthsr_v20_230130.h5", 106_163_752, "FreeSurfer")
    assert v2.sha256 == "a472f776e7b33b5ea6e10c801f55fee488f1477a208b3e6998dc1aec1d9c5f8b"
    low = REGISTRY["synthsr-lowfield"]
    assert (low.filename, low.size) == ("synthsr_lowfield_v20_230130.h5", 106_163_752)
    assert low.sha256 == "a7c5ea91c94fe31f3c716252caae0d181629201bd884dc59af88ddfd75ed4b84"
    # FreeSurfer's git-annex object URLs embed the size and the hash of the file they serve.
    for spec in (v2, low):
        assert f"SHA256E-s{spec.size}--{spec.sha256}.h5" in spec.url
    bundled = REGISTRY["synthsr-bids"]
    assert bundled.bundled and bundled.url is None and bundled.file_format == "safetensors"
    assert bundled.license == "Apache-2.0"


def test_bundled_model_not_shipped_explains_alternative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "BUNDLED_MODELS_DIR", tmp_path / "package-data")
    unshipped = ModelSpec(name="ours", version="0.2", description="d", filename="ours_v0.2.safetensors", url=None,
                          size=None, sha256=None, license="Apache-2.0", file_format="safetensors", citation="c",
                          bundled=True)
    with pytest.raises(ModelNotAvailableError) as excinfo:
        resolve_model("ours", cache_dir=tmp_path, registry={"ours": unshipped, "synthsr-v1": REGISTRY["synthsr-v1"]})
    message = str(excinfo.value)
    assert "not yet shipped" in message
    assert "`synthsr-models fetch synthsr-v1`" in message


def test_bundled_model_resolves_from_package_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled_dir = tmp_path / "package-data"
    bundled_dir.mkdir()
    monkeypatch.setattr(registry, "BUNDLED_MODELS_DIR", bundled_dir)
    spec = ModelSpec(name="ours", version="0.1", description="d", filename="ours.safetensors", url=None,
                     size=len(DATA), sha256=DATA_SHA256, license="Apache-2.0", file_format="safetensors",
                     citation="c", bundled=True)
    (bundled_dir / "ours.safetensors").write_bytes(DATA)
    resolved = resolve_model("ours", cache_dir=tmp_path / "cache", registry={"ours": spec})
    assert (resolved.path, resolved.sha256, resolved.spec) == (bundled_dir / "ours.safetensors", DATA_SHA256, spec)
    assert model_status(spec, cache_dir=tmp_path / "cache", verify=True).status == "bundled"
    (bundled_dir / "ours.safetensors").write_bytes(DATA[:-1] + b"?")
    with pytest.raises(ModelNotAvailableError, match="corrupt.*Reinstall synthsr-bids"):
        resolve_model("ours", cache_dir=tmp_path / "cache", registry={"ours": spec})


# --------------------------------------------------------------------------- registry files


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"sha256": "ABC"}, "sha256 must be 64 lowercase hex digits"),
        ({"size": 0}, "size must be a positive integer"),
        ({"size": None}, "'size' and 'sha256' are required"),
        ({"filename": "model.pt"}, "filename must be a bare file name ending in .h5 or .safetensors"),
        ({"filename": "../escape.h5"}, "filename must be a bare file name"),
        ({"file_format": "safetensors"}, "does not match the file name"),
        ({"bundled": True}, "only the packaged registry may declare bundled models"),
        ({"name": "bad name"}, "names may only use"),
        ({"colour": "blue"}, "unknown field"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
    ],
)
def test_invalid_registry_entries_name_file_and_problem(tmp_path: Path, changes: dict, problem: str) -> None:
    path = _write_registry(tmp_path / "site.json", {**ENTRY, **changes})
    with pytest.raises(ValueError) as excinfo:
        load_registry_file(path)
    assert str(path) in str(excinfo.value)
    assert problem in str(excinfo.value)


def test_registry_file_errors(tmp_path: Path) -> None:
    dup = _write_registry(tmp_path / "dup.json", ENTRY, copy.deepcopy(ENTRY))
    with pytest.raises(ValueError, match="declared twice"):
        load_registry_file(dup)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_registry_file(broken)
    with pytest.raises(ValueError, match="cannot read model registry"):
        load_registry_file(tmp_path / "absent.json")


def test_site_registry_extends_packaged_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_EXTRA_MODELS, str(_write_registry(tmp_path / "site.json", ENTRY)))
    merged = get_registry()
    assert list(merged) == [*REGISTRY, "site-model"]
    site = merged["site-model"]
    assert (site.size, site.sha256, site.in_channels, site.license) == (len(DATA), DATA_SHA256, 2, "CC-BY-4.0")
    clash = {**ENTRY, "name": "synthsr-v1"}
    monkeypatch.setenv(ENV_EXTRA_MODELS, str(_write_registry(tmp_path / "clash.json", clash)))
    with pytest.raises(ValueError, match="synthsr-v1 are already registered"):
        get_registry()


# --------------------------------------------------------------------------- cache location


def test_models_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SYNTHSR_BIDS_MODELS", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models_cache_dir() == tmp_path / "home" / ".cache" / "synthsr-bids" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models_cache_dir() == tmp_path / "xdg" / "synthsr-bids" / "models"
    monkeypatch.setenv("SYNTHSR_BIDS_MODELS", str(tmp_path / "explicit"))
    assert models_cache_dir() == tmp_path / "explicit"


def test_resolve_uses_cache_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = _site_registry(tmp_path)
    monkeypatch.setenv("SYNTHSR_BIDS_MODELS", str(tmp_path / "env-cache"))
    (tmp_path / "env-cache").mkdir()
    (tmp_path / "env-cache" / "site_model.h5").write_bytes(DATA)
    resolved = resolve_model("site-model", registry=specs)
    assert resolved.path == tmp_path / "env-cache" / "site_model.h5"


# --------------------------------------------------------------------------- resolve_model


def test_registered_model_not_cached_names_fetch_command(tmp_path: Path) -> None:
    specs = _site_registry(tmp_path)
    with pytest.raises(ModelNotAvailableError, match=r"Run `synthsr-models fetch site-model` to download it"):
        resolve_model("site-model", cache_dir=tmp_path / "cache", registry=specs)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "site_model.h5.part").write_bytes(DATA[:10])
    with pytest.raises(ModelNotAvailableError, match="partial download exists; fetching again resumes it"):
        resolve_model("site-model", cache_dir=tmp_path / "cache", registry=specs)
    assert model_status(specs["site-model"], cache_dir=tmp_path / "cache").status == "partial"


def test_freesurfer_only_model_explains_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    specs = _site_registry(tmp_path, url=None)
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    with pytest.raises(ModelNotAvailableError, match=r"no public download.*synthsr-models import PATH"):
        resolve_model("site-model", cache_dir=tmp_path / "cache", registry=specs)
    fs_models = tmp_path / "freesurfer" / "models"
    fs_models.mkdir(parents=True)
    (fs_models / "site_model.h5").write_bytes(DATA)
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path / "freesurfer"))
    with pytest.raises(ModelNotAvailableError) as excinfo:
        resolve_model("site-model", cache_dir=tmp_path / "cache", registry=specs)
    assert f"`synthsr-models import {fs_models / 'site_model.h5'}`" in str(excinfo.value)


def test_cached_model_resolves_with_verified_hash(tmp_path: Path) -> None:
    specs = _site_registry(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "site_model.h5").write_bytes(DATA)
    resolved = resolve_model("site-model", cache_dir=cache, registry=specs)
    assert resolved == registry.ResolvedModel(name="site-model", path=cache / "site_model.h5", sha256=DATA_SHA256,
                                              license="CC-BY-4.0", spec=specs["site-model"])
    records = list((cache / ".sha256").glob("*.json"))
    assert len(records) == 1
    assert json.loads(records[0].read_text())["sha256"] == DATA_SHA256


def test_hash_record_reused_until_size_or_mtime_change(tmp_path: Path) -> None:
    specs = _site_registry(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    model = cache / "site_model.h5"
    model.write_bytes(DATA)
    resolve_model("site-model", cache_dir=cache, registry=specs)
    stat = model.stat()
    # Same size, same mtime: the record is trusted and the file is not re-read.
    model.write_bytes(DATA[:-1] + b"#")
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resolve_model("site-model", cache_dir=cache, registry=specs).sha256 == DATA_SHA256
    # A new mtime invalidates the record: the corruption is found, and both hashes are named.
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    corrupt_sha = hashlib.sha256(DATA[:-1] + b"#").hexdigest()
    with pytest.raises(ModelNotAvailableError, match=rf"corrupt: sha256 {corrupt_sha} but site-model must have "
                                                     rf"{DATA_SHA256}"):
        resolve_model("site-model", cache_dir=cache, registry=specs)
    # verify=True (synthsr-models verify) always re-reads the file.
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    status = model_status(specs["site-model"], cache_dir=cache, verify=True)
    assert (status.status, status.sha256) == ("corrupt", corrupt_sha)


def test_cached_model_with_wrong_size(tmp_path: Path) -> None:
    specs = _site_registry(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "site_model.h5").write_bytes(DATA[:100])
    with pytest.raises(ModelNotAvailableError, match=rf"has 100 bytes but site-model has {len(DATA)}"):
        resolve_model("site-model", cache_dir=cache, registry=specs)
    assert model_status(specs["site-model"], cache_dir=cache).status == "corrupt"


def test_local_path_is_a_user_model(tmp_path: Path) -> None:
    weights = tmp_path / "weights" / "my_unet.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"abc" * 10)
    expected = hashlib.sha256(b"abc" * 10).hexdigest()
    for given in (str(weights), weights):
        resolved = resolve_model(given, cache_dir=tmp_path / "cache", registry=REGISTRY)
        assert (resolved.name, resolved.path, resolved.sha256) == ("my_unet", weights, expected)
        assert resolved.license == USER_LICENSE and resolved.spec is None


def test_local_copy_of_registered_model_keeps_its_license(tmp_path: Path) -> None:
    specs = _site_registry(tmp_path)
    copy_path = tmp_path / "downloads" / "renamed.h5"
    copy_path.parent.mkdir()
    copy_path.write_bytes(DATA)
    resolved = resolve_model(str(copy_path), cache_dir=tmp_path / "cache", registry=specs)
    assert (resolved.name, resolved.license, resolved.spec) == ("renamed", "CC-BY-4.0", specs["site-model"])


@pytest.mark.parametrize("given", ["missing.h5", "sub/dir/missing.safetensors"])
def test_missing_path_is_named(tmp_path: Path, given: str) -> None:
    target = tmp_path / given
    with pytest.raises(ModelNotAvailableError, match=rf"Model file {target} does not exist"):
        resolve_model(str(target), cache_dir=tmp_path / "cache", registry=REGISTRY)


def test_wrong_suffix_and_unknown_name(tmp_path: Path) -> None:
    text = tmp_path / "weights.pt"
    text.write_bytes(b"pickle")
    with pytest.raises(ModelNotAvailableError, match=r"suffix '\.pt'.*\.h5 files and \.safetensors files only"):
        resolve_model(str(text), cache_dir=tmp_path, registry=REGISTRY)
    with pytest.raises(ModelNotAvailableError, match=r"Unknown model 'synthsr-v3'\. Registered models: "
                                                     r"synthsr-bids, synthsr-bids-seg, synthsr-v1, synthsr-v2, synthsr-lowfield"):
        resolve_model("synthsr-v3", cache_dir=tmp_path, registry=REGISTRY)


def test_file_sha256_without_writable_cache(tmp_path: Path) -> None:
    target = tmp_path / "w.h5"
    target.write_bytes(DATA)
    not_a_dir = tmp_path / "file-not-dir"
    not_a_dir.write_text("x")
    assert file_sha256(target, cache_dir=not_a_dir) == DATA_SHA256
