"""The ``synthsr-models`` console script, run for real (subprocess) against a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest

from synthsr_bids.cli.models import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

REPO_ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = random.Random(99).randbytes(200_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict]:
    """A web root serving tiny.h5, a site registry that points at it, and an isolated cache/home."""
    webroot = tmp_path / "www"
    webroot.mkdir()
    (webroot / "tiny.h5").write_bytes(PAYLOAD)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(webroot)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    registry = tmp_path / "site-models.json"
    registry.write_text(json.dumps({"schema_version": 1, "models": [{
        "name": "tiny", "version": "1", "description": "test", "filename": "tiny.h5",
        "url": f"http://127.0.0.1:{server.server_address[1]}/tiny.h5", "size": len(PAYLOAD),
        "sha256": PAYLOAD_SHA256, "license": "Apache-2.0", "file_format": "keras-h5", "citation": "none"}]}))
    try:
        yield {"webroot": webroot, "registry": registry, "cache": tmp_path / "cache", "home": tmp_path / "home",
               "base_url": f"http://127.0.0.1:{server.server_address[1]}"}
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _env(site: dict) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("XDG_CACHE_HOME", "SYNTHSR_BIDS_MODELS_URL", "FREESURFER_HOME")}
    env.update(SYNTHSR_BIDS_MODELS=str(site["cache"]), SYNTHSR_BIDS_EXTRA_MODELS=str(site["registry"]),
               HOME=str(site["home"]), PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return env


def _run(site: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "synthsr_bids.cli.models", *args], env=_env(site),
                          capture_output=True, text=True, timeout=120, check=False)


def _table(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines()[1:]:
        cells = line.split()
        if cells and not line.startswith("Cache:"):
            rows[cells[0]] = cells
    return rows


def test_list_fetch_verify_path_roundtrip(site: dict) -> None:
    listed = _run(site, "list")
    assert listed.returncode == EXIT_OK, listed.stderr
    rows = _table(listed.stdout)
    assert set(rows) == {"synthsr-bids", "synthsr-bids-seg", "synthsr-v1", "synthsr-v2", "synthsr-lowfield", "tiny"}
    assert rows["tiny"][-2:] == ["missing", str(site["cache"] / "tiny.h5")]
    assert "53.1 MB" in " ".join(rows["synthsr-v1"])
    assert f"Cache: {site['cache']}" in listed.stdout

    fetched = _run(site, "fetch", "tiny", "--no-progress")
    assert fetched.returncode == EXIT_OK, fetched.stderr
    assert fetched.stdout.strip() == f"tiny: {site['cache'] / 'tiny.h5'}"
    assert (site["cache"] / "tiny.h5").read_bytes() == PAYLOAD

    assert _table(_run(site, "list").stdout)["tiny"][-2] == "cached"
    verified = _run(site, "verify", "tiny")
    assert verified.returncode == EXIT_OK
    assert f"tiny: OK (cached, sha256 {PAYLOAD_SHA256})" in verified.stdout
    located = _run(site, "path", "tiny")
    assert (located.returncode, located.stdout.strip()) == (EXIT_OK, str(site["cache"] / "tiny.h5"))

    # Damage the cached copy: verify and path both fail and say how to repair it.
    damaged = bytearray(PAYLOAD)
    damaged[0] ^= 1
    (site["cache"] / "tiny.h5").write_bytes(bytes(damaged))
    verified = _run(site, "verify")
    assert verified.returncode == EXIT_FAILURE
    assert f"sha256 {hashlib.sha256(bytes(damaged)).hexdigest()}, expected {PAYLOAD_SHA256}" in verified.stdout
    assert "synthsr-v2: missing (not installed)" in verified.stdout
    located = _run(site, "path", "tiny")
    assert located.returncode == EXIT_FAILURE and "is corrupt" in located.stderr
    # fetch repairs it.
    assert _run(site, "fetch", "tiny", "--no-progress").returncode == EXIT_OK
    assert (site["cache"] / "tiny.h5").read_bytes() == PAYLOAD


def test_fetch_failure_messages(site: dict) -> None:
    (site["webroot"] / "bad.h5").write_bytes(PAYLOAD[:-1] + b"\0")
    result = _run(site, "fetch", "tiny", "--url", f"{site['base_url']}/bad.h5", "--no-progress")
    assert result.returncode == EXIT_FAILURE
    assert f"expected sha256 {PAYLOAD_SHA256}" in result.stderr
    assert not (site["cache"] / "tiny.h5").exists()
    bundled = _run(site, "fetch", "synthsr-bids")  # shipped in the package: nothing to download
    assert bundled.returncode == EXIT_OK and "synthsr_bids/data/models/synthsr-bids_v" in bundled.stdout


def test_import_registered_damaged_and_user_models(site: dict, tmp_path: Path) -> None:
    fs_copy = tmp_path / "freesurfer" / "tiny.h5"
    fs_copy.parent.mkdir()
    fs_copy.write_bytes(PAYLOAD)
    imported = _run(site, "import", str(fs_copy))
    assert imported.returncode == EXIT_OK, imported.stderr
    assert f"as registered model tiny (sha256 {PAYLOAD_SHA256})" in imported.stdout
    assert (site["cache"] / "tiny.h5").read_bytes() == PAYLOAD

    damaged = tmp_path / "damaged" / "tiny.h5"
    damaged.parent.mkdir()
    damaged.write_bytes(PAYLOAD[:-1] + b"\1")
    refused = _run(site, "import", str(damaged))
    assert refused.returncode == EXIT_FAILURE and "looks like tiny" in refused.stderr
    refused = _run(site, "import", str(damaged), "--name", "tiny")
    assert refused.returncode == EXIT_FAILURE and f"{damaged} is not tiny" in refused.stderr

    mine = tmp_path / "custom.safetensors"
    mine.write_bytes(b"my own weights")
    imported = _run(site, "import", str(mine), "--name", "mine")
    assert imported.returncode == EXIT_OK, imported.stderr
    user_file = site["cache"] / "user" / "mine.safetensors"
    assert _run(site, "path", "mine").stdout.strip() == str(user_file)
    assert _table(_run(site, "list").stdout)["mine"][-2:] == ["imported", str(user_file)]


def test_missing_model_and_usage_errors(site: dict) -> None:
    missing = _run(site, "path", "synthsr-v2")
    assert missing.returncode == EXIT_FAILURE
    assert "Run `synthsr-models fetch synthsr-v2` to download it" in missing.stderr
    assert _run(site).returncode == EXIT_USAGE
    assert _run(site, "frobnicate").returncode == EXIT_USAGE
    assert _run(site, "fetch").returncode == EXIT_USAGE
    unknown = _run(site, "fetch", "nope")
    assert unknown.returncode == EXIT_USAGE and "unknown model(s) nope" in unknown.stderr
    assert _run(site, "fetch", "tiny", "synthsr-v1", "--url", "http://127.0.0.1:1/x").returncode == EXIT_USAGE
    assert _run(site, "verify", "nope").returncode == EXIT_USAGE


def test_main_in_process_honours_cache_dir_option(site: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in _env(site).items():
        monkeypatch.setenv(key, value)
    other = tmp_path / "other-cache"
    assert main(["fetch", "tiny", "--cache-dir", str(other), "--no-progress", "-q"]) == EXIT_OK
    assert (other / "tiny.h5").read_bytes() == PAYLOAD
    assert not (site["cache"] / "tiny.h5").exists()
    capsys.readouterr()
    assert main(["path", "tiny", "--cache-dir", str(other)]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(other / "tiny.h5")
    assert main(["--help"]) == EXIT_OK


def test_console_script_entry_point() -> None:
    try:
        entry_points = metadata.distribution("synthsr-bids").entry_points
    except metadata.PackageNotFoundError:
        pytest.skip("synthsr-bids is not installed (pip install -e .)")
    (entry,) = [ep for ep in entry_points if ep.name == "synthsr-models" and ep.group == "console_scripts"]
    assert entry.value == "synthsr_bids.cli.models:main"
    assert entry.load() is main
