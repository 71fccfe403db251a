""".circleci/config.yml: CircleCI's JSON schema (check-jsonschema's vendored copy, offline),
the references the schema cannot see (jobs, commands, executors, steps, scripts), the
BIDS-Apps pipeline it promises, and the committed list of expected outputs against a real
participant + group run.

    pip install check-jsonschema
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
CONFIG_PATH = REPO / ".circleci" / "config.yml"
if not CONFIG_PATH.is_file():  # e.g. inside the test image
    pytest.skip(".circleci/config.yml is not in this tree", allow_module_level=True)
CONFIG = yaml.safe_load(CONFIG_PATH.read_text())
CHECK = shutil.which("check-jsonschema")
needs_checker = pytest.mark.skipif(CHECK is None, reason="check-jsonschema is not installed (pip install check-jsonschema)")

#: CircleCI's built-in steps.
BUILTIN_STEPS = {
    "run", "checkout", "setup_remote_docker", "save_cache", "restore_cache", "store_artifacts",
    "store_test_results", "persist_to_workspace", "attach_workspace", "add_ssh_keys", "when", "unless",
}


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHECK, "--builtin-schema", "vendor.circle-ci", str(path)], capture_output=True, text=True)


@needs_checker
def test_config_matches_circleci_schema():
    done = schema_check(CONFIG_PATH)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_checker
@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("version", 3),
        lambda c: c["jobs"]["build"].__setitem__("stepz", c["jobs"]["build"].pop("steps")),
        lambda c: c["workflows"]["build_test_deploy"]["jobs"][1]["unit_tests"].__setitem__("requires", "build"),
    ],
    ids=["version", "misspelt-key", "requires-not-a-list"],
)
def test_schema_rejects_broken_configs(tmp_path, mutate):
    broken = copy.deepcopy(CONFIG)
    mutate(broken)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(broken))
    assert schema_check(path).returncode == 1


def _steps(job_or_command: dict) -> list:
    return job_or_command.get("steps", [])


def _step_name(step) -> str:
    return step if isinstance(step, str) else next(iter(step))


def test_every_reference_resolves():
    jobs, commands, executors = CONFIG["jobs"], CONFIG.get("commands", {}), CONFIG.get("executors", {})
    for name, job in jobs.items():
        assert job.get("executor") in executors, f"job {name}: unknown executor"
        for step in _steps(job):
            assert _step_name(step) in BUILTIN_STEPS | set(commands), f"job {name}: unknown step {_step_name(step)}"
    for name, command in commands.items():
        for step in _steps(command):
            assert _step_name(step) in BUILTIN_STEPS, f"command {name}: unknown step {_step_name(step)}"
    for workflow in CONFIG["workflows"].values():
        names = [next(iter(j)) if isinstance(j, dict) else j for j in workflow["jobs"]]
        assert set(names) <= set(jobs)
        for entry in workflow["jobs"]:
            if isinstance(entry, dict):
                (spec,) = entry.values()
                assert set(spec.get("requires", [])) <= set(names)


def test_pipeline_parameters_are_declared():
    text = CONFIG_PATH.read_text()
    used = set(re.findall(r"<< pipeline\.parameters\.([\w-]+) >>", text))
    assert used and used <= set(CONFIG["parameters"])


def test_scripts_the_config_calls_exist():
    text = CONFIG_PATH.read_text()
    scripts = set(re.findall(r"((?:tools/container|\.circleci)/[\w.-]+\.sh)", text))
    assert scripts == {"tools/container/smoke.sh", ".circleci/list_outputs.sh"}
    for script in scripts:
        assert os.access(REPO / script, os.X_OK), script
    assert (REPO / ".circleci" / "expected_outputs.txt").is_file()


def _run_lines(job: str) -> str:
    steps = CONFIG["jobs"][job]["steps"]
    return "\n".join(s["run"]["command"] if isinstance(s["run"], dict) else s["run"] for s in steps if _step_name(s) == "run")


def test_bids_apps_pipeline():
    (workflow,) = CONFIG["workflows"].values()
    specs = {next(iter(j)): next(iter(j.values())) for j in workflow["jobs"]}
    assert specs["unit_tests"]["requires"] == ["build"] and specs["test_dataset"]["requires"] == ["build"]
    assert set(specs["deploy"]["requires"]) == {"unit_tests", "test_dataset"}
    # every job runs for tags (CircleCI skips tag pipelines otherwise); deploy runs only for tags
    for name in ("build", "unit_tests", "test_dataset"):
        assert specs[name]["filters"]["tags"]["only"] == "/.*/"
    assert specs["deploy"]["filters"]["branches"]["ignore"] == "/.*/"
    tag_pattern = specs["deploy"]["filters"]["tags"]["only"].strip("/")
    assert re.fullmatch(tag_pattern, "0.1.0") and re.fullmatch(tag_pattern, "1.2.0rc1")
    assert not re.fullmatch(tag_pattern, "v0.1.0")

    build = CONFIG["jobs"]["build"]["steps"]
    restore = next(s["restore_cache"] for s in build if _step_name(s) == "restore_cache")
    save = next(s["save_cache"] for s in build if _step_name(s) == "save_cache")
    assert save["key"] == restore["keys"][0]
    assert "--cache-from" in _run_lines("build") and "--target" in _run_lines("build")

    unit = _run_lines("unit_tests")
    assert ':test"' in unit and '-m "not slow"' in unit and "--junitxml" in unit

    e2e = _run_lines("test_dataset")
    assert "tools/container/smoke.sh" in e2e
    smoke = (REPO / "tools" / "container" / "smoke.sh").read_text()
    assert "--read-only --tmpfs /tmp" in smoke and "run_app participant" in smoke and "run_app group" in smoke
    assert "--entrypoint bids-validator-deno" in e2e
    assert "diff -u .circleci/expected_outputs.txt" in e2e
    artifacts = [s["store_artifacts"]["path"] for s in CONFIG["jobs"]["test_dataset"]["steps"] if _step_name(s) == "store_artifacts"]
    assert "/tmp/reports" in artifacts

    deploy = _run_lines("deploy")
    assert 'docker push "${IMAGE}:${CIRCLE_TAG}"' in deploy and "VARIANT=cuda" in deploy


@pytest.mark.slow
def test_expected_outputs_match_a_real_run(tmp_path):
    """What CircleCI's smoke run writes, by the same CLI outside a container."""
    bids, models, out = tmp_path / "bids", tmp_path / "models", tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "tools" / "container" / "make_smoke_dataset.py"), str(bids), str(models)],
                   check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for level in (["participant", "--model", str(models / "tiny.safetensors"), "--nthreads", "1"], ["group", "--skip-registration"]):
        done = subprocess.run([sys.executable, "-m", "synthsr_bids", str(bids), str(out), *level, "-w", str(tmp_path / "work")],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    listed = subprocess.run([str(REPO / ".circleci" / "list_outputs.sh"), str(out)], capture_output=True, text=True, check=True)
    assert listed.stdout == (REPO / ".circleci" / "expected_outputs.txt").read_text()
