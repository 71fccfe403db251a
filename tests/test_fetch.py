"""fetch_model / import_model against a real HTTP server on 127.0.0.1 (Range support switchable)."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from filelock import FileLock

from synthsr_bids.models import fetch as fetch_mod
from synthsr_bids.models import registry
from synthsr_bids.models.fetch import ModelDownloadError, fetch_model, import_model, lock_path, partial_path
from synthsr_bids.models.registry import (
    USER_LICENSE,
    ModelIntegrityError,
    ModelNotAvailableError,
    ModelSpec,
    resolve_model,
)

PAYLOAD = random.Random(1234).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: _ModelServer

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        range_header = self.headers.get("Range")
        body = srv.files.get(self.path)
        with srv.lock:
            srv.requests.append({"path": self.path, "range": range_header})
        if body is None:
            self.send_error(404, "no such model")
            return
        start = 0
        if range_header and srv.honour_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match is not None, range_header
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416, "range not satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        with srv.lock:
            limit = srv.cut_after.pop(0) if srv.cut_after else None
        sent = payload if limit is None else payload[:limit]
        with srv.lock:  # recorded before writing: the client may finish reading before this thread resumes
            srv.sent.append(len(sent))
        self.wfile.write(sent)
        self.wfile.flush()
        self.close_connection = True


class _ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str | None]] = []
        self.sent: list[int] = []
        self.cut_after: list[int] = []  # per request: close the connection after this many body bytes
        self.honour_range = True
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[_ModelServer]:
    srv = _ModelServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def _spec(url: str | None, **changes: object) -> ModelSpec:
    spec = ModelSpec(name="tiny", version="1", description="test model", filename="tiny.h5", url=url,
                     size=len(PAYLOAD), sha256=PAYLOAD_SHA256, license="Apache-2.0", file_format="keras-h5",
                     citation="none", bundled=False)
    return dataclasses.replace(spec, **changes)


def _visible(cache: Path) -> list[str]:
    """Files in the cache other than the lock/hash bookkeeping directories."""
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/tiny.h5"


def test_full_download_is_verified_and_not_repeated(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/tiny.h5"] = PAYLOAD
    spec = _spec(server.url("/tiny.h5"))
    path = fetch_model(spec, cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "tiny.h5"
    assert path.read_bytes() == PAYLOAD
    assert _visible(tmp_path) == ["tiny.h5"]
    assert server.requests == [{"path": "/tiny.h5", "range": None}]
    assert server.sent == [len(PAYLOAD)]
    # Already cached and verified: no second request.
    assert fetch_model(spec, cache_dir=tmp_path, progress=False) == path
    assert len(server.requests) == 1
    resolved = resolve_model("tiny", cache_dir=tmp_path, registry={"tiny": spec})
    assert (resolved.path, resolved.sha256, resolved.license) == (path, PAYLOAD_SHA256, "Apache-2.0")


def test_interrupted_download_resumes_with_range(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/tiny.h5"] = PAYLOAD
    server.cut_after = [100_000]
    spec = _spec(server.url("/tiny.h5"))
    with pytest.raises(ModelDownloadError, match="resume") as excinfo:
        fetch_model(spec, cache_dir=tmp_path, progress=False, retries=0)
    assert "100000 of 300000 bytes" in str(excinfo.value)
    part = partial_path(spec, tmp_path)
    assert part.read_bytes() == PAYLOAD[:100_000]
    assert not (tmp_path / "tiny.h5").exists()

    path = fetch_model(spec, cache_dir=tmp_path, progress=False, retries=0)
    assert server.requests[-1] == {"path": "/tiny.h5", "range": "bytes=100000-"}
    assert server.sent == [100_000, len(PAYLOAD) - 100_000]  # only the remainder was sent the second time
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()


def test_retries_resume_within_one_call(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/tiny.h5"] = PAYLOAD
    server.cut_after = [50_000, 70_000]
    path = fetch_model(_spec(server.url("/tiny.h5")), cache_dir=tmp_path, progress=False, retries=2)
    assert [r["range"] for r in server.requests] == [None, "bytes=50000-", "bytes=120000-"]
    assert server.sent == [50_000, 70_000, len(PAYLOAD) - 120_000]
    assert path.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/tiny.h5"] = PAYLOAD
    server.honour_range = False
    spec = _spec(server.url("/tiny.h5"))
    # A stale partial file with bytes that are NOT the payload prefix: appending would corrupt the result.
    partial_path(spec, tmp_path).write_bytes(b"x" * 1000)
    path = fetch_model(spec, cache_dir=tmp_path, progress=False)
    assert server.requests == [{"path": "/tiny.h5", "range": "bytes=1000-"}]
    assert server.sent == [len(PAYLOAD)]
    assert path.read_bytes() == PAYLOAD


def test_complete_partial_is_verified_without_network(tmp_path: Path) -> None:
    spec = _spec(_dead_url())
    partial_path(spec, tmp_path).write_bytes(PAYLOAD)
    assert fetch_model(spec, cache_dir=tmp_path, progress=False).read_bytes() == PAYLOAD


def test_corrupted_download_fails_and_leaves_nothing(server: _ModelServer, tmp_path: Path) -> None:
    corrupted = bytearray(PAYLOAD)
    corrupted[12345] ^= 0xFF
    server.files["/tiny.h5"] = bytes(corrupted)
    spec = _spec(server.url("/tiny.h5"))
    with pytest.raises(ModelIntegrityError) as excinfo:
        fetch_model(spec, cache_dir=tmp_path, progress=False)
    message = str(excinfo.value)
    assert PAYLOAD_SHA256 in message
    assert hashlib.sha256(bytes(corrupted)).hexdigest() in message
    assert _visible(tmp_path) == []


def test_wrong_size_fails_and_leaves_nothing(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/tiny.h5"] = PAYLOAD + b"trailing junk"
    spec = _spec(server.url("/tiny.h5"))
    with pytest.raises(ModelDownloadError, match=r"announces 300013 bytes but tiny has 300000"):
        fetch_model(spec, cache_dir=tmp_path, progress=False)
    assert _visible(tmp_path) == []
    assert len(server.requests) == 1  # not retried: a wrong file is not a transient failure


def test_http_error_names_url_and_status(server: _ModelServer, tmp_path: Path) -> None:
    spec = _spec(server.url("/missing.h5"))
    with pytest.raises(ModelDownloadError, match=r"/missing\.h5: HTTP 404"):
        fetch_model(spec, cache_dir=tmp_path, progress=False)
    assert len(server.requests) == 1


def test_mirror_used_when_primary_fails(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/mirror/tiny.h5"] = PAYLOAD
    spec = _spec(server.url("/gone/tiny.h5"), mirrors=(server.url("/mirror/tiny.h5"),))
    path = fetch_model(spec, cache_dir=tmp_path, progress=False)
    assert [r["path"] for r in server.requests] == ["/gone/tiny.h5", "/mirror/tiny.h5"]
    assert path.read_bytes() == PAYLOAD


def test_env_mirror_and_explicit_url_precedence(server: _ModelServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/base/tiny.h5"] = PAYLOAD
    server.files["/explicit.bin"] = PAYLOAD
    spec = _spec(_dead_url())
    monkeypatch.setenv(fetch_mod.ENV_MODELS_URL, server.url("/base/"))
    assert fetch_mod.candidate_urls(spec) == (server.url("/base/tiny.h5"),)
    fetch_model(spec, cache_dir=tmp_path / "a", progress=False)
    assert server.requests[-1]["path"] == "/base/tiny.h5"
    fetch_model(spec, cache_dir=tmp_path / "b", url=server.url("/explicit.bin"), progress=False)
    assert server.requests[-1]["path"] == "/explicit.bin"
    assert (tmp_path / "b" / "tiny.h5").read_bytes() == PAYLOAD


def test_default_cache_dir_from_environment(server: _ModelServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/tiny.h5"] = PAYLOAD
    monkeypatch.setenv("SYNTHSR_BIDS_MODELS", str(tmp_path / "env-cache"))
    path = fetch_model(_spec(server.url("/tiny.h5")), progress=False)
    assert path == tmp_path / "env-cache" / "tiny.h5"
    assert path.read_bytes() == PAYLOAD


def test_corrupt_cached_file_is_replaced(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/tiny.h5"] = PAYLOAD
    (tmp_path / "tiny.h5").write_bytes(b"\0" * len(PAYLOAD))
    path = fetch_model(_spec(server.url("/tiny.h5")), cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_lock_makes_second_job_wait_and_reuse_the_file(server: _ModelServer, tmp_path: Path) -> None:
    server.files["/tiny.h5"] = PAYLOAD
    spec = _spec(server.url("/tiny.h5"))
    lock_file = lock_path(spec, tmp_path)
    lock_file.parent.mkdir(parents=True)
    results: list[Path] = []
    other_job = FileLock(str(lock_file))
    other_job.acquire()
    try:
        worker = threading.Thread(target=lambda: results.append(fetch_model(spec, cache_dir=tmp_path,
                                                                            progress=False)))
        worker.start()
        worker.join(timeout=0.3)
        assert worker.is_alive()  # blocked on the lock
        assert server.requests == []
        (tmp_path / "tiny.h5").write_bytes(PAYLOAD)  # the "other job" finishes its download
    finally:
        other_job.release()
    worker.join(timeout=30)
    assert results == [tmp_path / "tiny.h5"]
    assert server.requests == []  # the waiting job found the verified file


def test_model_without_download_explains_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fetch_mod.ENV_MODELS_URL, raising=False)
    with pytest.raises(ModelNotAvailableError, match=r"FreeSurfer 7\.4\+.*synthsr-models import PATH"):
        fetch_model(_spec(None), cache_dir=tmp_path, progress=False)


def test_bundled_model_is_not_downloaded(tmp_path: Path) -> None:
    spec = _spec(None, bundled=True, sha256=None, size=None, filename="absent.safetensors",
                 file_format="safetensors")
    with pytest.raises(ModelNotAvailableError, match="bundled inside the synthsr-bids package"):
        fetch_model(spec, cache_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- import_model


def test_import_registered_copy(tmp_path: Path) -> None:
    spec = _spec(None, filename="synthsr_test.h5")
    source = tmp_path / "freesurfer" / "models" / "synthsr_test.h5"
    source.parent.mkdir(parents=True)
    source.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    resolved = import_model(source, cache_dir=cache, registry={"tiny": spec})
    assert resolved.name == "tiny" and resolved.spec == spec and resolved.sha256 == PAYLOAD_SHA256
    assert (cache / "synthsr_test.h5").read_bytes() == PAYLOAD
    again = resolve_model("tiny", cache_dir=cache, registry={"tiny": spec})
    assert again.path == cache / "synthsr_test.h5"


def test_import_damaged_copy_is_refused(tmp_path: Path) -> None:
    spec = _spec(None, filename="synthsr_test.h5")
    source = tmp_path / "synthsr_test.h5"
    source.write_bytes(PAYLOAD[:-1] + b"!")
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match=rf"looks like tiny.*{PAYLOAD_SHA256}"):
        import_model(source, cache_dir=cache, registry={"tiny": spec})
    with pytest.raises(ModelIntegrityError, match="is not tiny"):
        import_model(source, name="tiny", cache_dir=cache, registry={"tiny": spec})
    assert not (cache / "synthsr_test.h5").exists()


def test_import_user_model_then_resolve_by_name(tmp_path: Path) -> None:
    source = tmp_path / "my weights.safetensors"
    source.write_bytes(b"not registered" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="not a valid model name"):
        import_model(source, cache_dir=cache, registry={})
    resolved = import_model(source, name="mine", cache_dir=cache, registry={})
    assert resolved.license == USER_LICENSE and resolved.spec is None
    assert resolved.path == cache / "user" / "mine.safetensors"
    found = resolve_model("mine", cache_dir=cache, registry={})
    assert (found.name, found.path, found.sha256) == ("mine", resolved.path,
                                                      hashlib.sha256(b"not registered" * 100).hexdigest())


def test_unshipped_bundled_model_cannot_be_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "BUNDLED_MODELS_DIR", tmp_path / "package-data")
    spec = ModelSpec(name="ours", version="0.2", description="d", filename="ours_v0.2.safetensors", url=None,
                     size=None, sha256=None, license="Apache-2.0", file_format="safetensors", citation="c",
                     bundled=True)
    with pytest.raises(ModelNotAvailableError, match="bundled inside the synthsr-bids package.*synthsr-models fetch"):
        fetch_model(spec, cache_dir=tmp_path / "cache", progress=False)
