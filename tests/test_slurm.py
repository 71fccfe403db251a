"""synthsr-bids-slurm: task lists, the scripts it writes (run for real with bash,
with a stand-in for the app), and the sbatch calls of --submit (a stand-in sbatch
that records its arguments). The real cluster is in test_slurm_integration.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from synthsr_bids.hpc import slurm

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def make_dataset(root: Path, layout: dict[str, list[str]]) -> Path:
    """Folders only: {subject: [sessions]} (an empty list: no session level)."""
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    for subject, sessions in layout.items():
        for session in sessions or [None]:
            anat = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
            anat.mkdir(parents=True, exist_ok=True)
    (root / "sub-bad_name").mkdir()  # not a valid label: ignored
    (root / "sub-file").write_text("")  # not a folder: ignored
    return root


def recording_tool(path: Path, log: Path, stdout: str = "", fail_on: str | None = None) -> Path:
    """An executable that appends its arguments (one per line, then ---) to ``log``; with ``fail_on``,
    exits 1 when its first argument is that (as ``docker kill`` does for a container already gone)."""
    path.write_text(
        "#!/bin/bash\n"
        f'for a in "$@"; do printf "%s\\n" "$a" >> {log}; done\n'
        f'echo --- >> {log}\n'
        + (f"echo '{stdout}'\n" if stdout else "")
        + (f'if [ "$1" = {fail_on} ]; then exit 1; fi\n' if fail_on else "")
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def calls(log: Path) -> list[list[str]]:
    blocks, current = [], []
    for line in log.read_text().splitlines():
        if line == "---":
            blocks.append(current)
            current = []
        else:
            current.append(line)
    return blocks


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds", {"01": ["a", "b"], "02": [], "10": ["a"]})


def test_find_tasks_per_participant_and_per_session(dataset):
    assert [str(t) for t in slurm.find_tasks(dataset)] == ["sub-01", "sub-02", "sub-10"]
    per_session = slurm.find_tasks(dataset, per_session=True)
    assert [(t.subject, t.session) for t in per_session] == [("01", "a"), ("01", "b"), ("02", None), ("10", "a")]
    assert [t.line() for t in per_session] == ["01\ta", "01\tb", "02", "10\ta"]
    selected = slurm.find_tasks(dataset, ["sub-10", "01", "10"])
    assert [t.subject for t in selected] == ["10", "01"]


def test_find_tasks_rejects_unknown_participants(dataset):
    with pytest.raises(ValueError, match="sub-99"):
        slurm.find_tasks(dataset, ["01", "99"])
    with pytest.raises(ValueError, match="not a valid BIDS label"):
        slurm.find_tasks(dataset, ["0_1"])


def test_participants_file_formats(tmp_path):
    plain = tmp_path / "list.txt"
    plain.write_text("# cohort A\nsub-01\n\n02\n")
    assert slurm.read_participants_file(plain) == ["01", "02"]
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("age\tparticipant_id\n30\tsub-07\n41\tsub-08\n")
    assert slurm.read_participants_file(tsv) == ["07", "08"]


@pytest.mark.parametrize(
    "n,size,expected",
    [(1, 1000, [(0, 1)]), (1000, 1000, [(0, 1000)]), (1001, 1000, [(0, 1000), (1000, 1)]), (5, 2, [(0, 2), (2, 2), (4, 1)])],
)
def test_array_chunks(n, size, expected):
    assert slurm.array_chunks(n, size) == expected


def _plan(dataset: Path, tmp_path: Path, argv: list[str]) -> slurm.JobPlan:
    plan, _ = slurm.plan_from_args([str(dataset), str(tmp_path / "out"), *argv])
    return plan


def test_scripts_request_the_resources(dataset, tmp_path):
    plan = _plan(
        dataset,
        tmp_path,
        ["--cpus", "4", "--mem", "16G", "--time", "1-00:00:00", "--gpus", "1", "--partition", "gpu",
         "--account", "lab", "--max-parallel", "50", "--sbatch-option=--constraint=avx2"],
    )
    files = slurm.write_job_files(plan)
    array = files.array_script.read_text()
    for line in ("#SBATCH --array=1-3%50", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "#SBATCH --constraint=avx2"):
        assert line in array.splitlines()
    group = files.group_script.read_text()
    assert "#SBATCH --gres=gpu:1" not in group
    assert "#SBATCH --cpus-per-task=1" in group.splitlines()
    assert " --device cuda" in array and " --device cuda" not in group
    assert files.tasks.read_text() == "01\n02\n10\n"
    assert files.array_script.parent == tmp_path / "out" / "code" / "slurm"
    for path in (files.array_script, files.group_script, files.submit_script):
        assert os.access(path, os.X_OK)
        assert subprocess.run([BASH, "-n", str(path)], capture_output=True).returncode == 0


def run_array_task(files: slurm.JobFiles, index: int, tmp_path: Path, offset: int | None = None,
                   **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "3",
           "SLURM_JOB_ID": "78", "TMPDIR": str(tmp_path / "node-tmp"), **extra_env}
    if offset is not None:
        env["SYNTHSR_BIDS_TASK_OFFSET"] = str(offset)
    (tmp_path / "node-tmp").mkdir(exist_ok=True)
    return subprocess.run([BASH, str(files.array_script)], env=env, capture_output=True, text=True)


def test_array_task_runs_its_participant_bare(dataset, tmp_path):
    log = tmp_path / "app.log"
    app = recording_tool(tmp_path / "fake-app", log)
    plan = _plan(dataset, tmp_path, ["--per-session", "--executable", str(app), "--", "--model", "/m/x y.safetensors"])
    files = slurm.write_job_files(plan)
    for index in (1, 3, 4):
        done = run_array_task(files, index, tmp_path)
        assert done.returncode == 0, done.stderr
    first, second, third = calls(log)
    assert first[:3] == [str(dataset), str(tmp_path / "out"), "participant"]
    assert first[3:] == ["--participant-label", "01", "--session-label", "a", "--nthreads", "3",
                         "--model", "/m/x y.safetensors", "-w", str(tmp_path / "node-tmp" / "synthsr-bids_77_1")]
    assert second[3:5] == ["--participant-label", "02"] and "--session-label" not in second
    assert third[3:7] == ["--participant-label", "10", "--session-label", "a"]
    # each task's work folder is removed when it ends
    assert list((tmp_path / "node-tmp").iterdir()) == []


def test_array_offset_and_out_of_range_task(dataset, tmp_path):
    log = tmp_path / "app.log"
    plan = _plan(dataset, tmp_path, ["--executable", str(recording_tool(tmp_path / "app", log))])
    files = slurm.write_job_files(plan)
    assert run_array_task(files, 1, tmp_path, offset=2).returncode == 0
    assert calls(log)[0][3:5] == ["--participant-label", "10"]
    beyond = run_array_task(files, 4, tmp_path)
    assert beyond.returncode == 64
    assert "no line 4" in beyond.stderr


def test_array_task_passes_the_app_exit_status(dataset, tmp_path):
    failing = tmp_path / "failing-app"
    failing.write_text("#!/bin/bash\nexit 65\n")
    failing.chmod(0o755)
    files = slurm.write_job_files(_plan(dataset, tmp_path, ["--executable", str(failing)]))
    done = run_array_task(files, 2, tmp_path)
    assert done.returncode == 65
    assert "task 2 exit status 65" in done.stdout


@pytest.mark.parametrize("engine", ["docker", "apptainer", "singularity"])
def test_container_commands(dataset, tmp_path, engine):
    log = tmp_path / "engine.log"
    engine_tool = recording_tool(tmp_path / engine, log, fail_on="kill")  # --rm already removed the container
    image = "synthsr/synthsr-bids:0.1.0" if engine == "docker" else "/images/synthsr-bids.sif"
    plan = _plan(dataset, tmp_path, ["--engine", engine, "--image", image, "--executable", str(engine_tool),
                                     "--templateflow-home", str(tmp_path / "tf"), "--bind", "/models:/models:ro",
                                     "--gpus", "1", "--", "--model", "/models/m.safetensors"])
    files = slurm.write_job_files(plan)
    done = run_array_task(files, 2, tmp_path, CUDA_VISIBLE_DEVICES="0,1")
    assert done.returncode == 0, done.stderr  # the app's status, not the trap's
    assert not (tmp_path / "node-tmp" / "synthsr-bids_77_2").exists()  # the work folder is still removed
    if engine == "docker":
        args, kill = calls(log)  # the run, then the EXIT trap's kill of a container still running
    else:
        (args,) = calls(log)
    assert args[0] == "run"
    inner = args[args.index(image) + 1 :]
    assert inner == ["/bids", "/out", "participant", "--participant-label", "02", "--nthreads", "3", "--device", "cuda",
                     "--model", "/models/m.safetensors", "-w", "/work"]
    mounts = [f"{dataset}:/bids:ro", f"{tmp_path / 'out'}:/out", f"{tmp_path / 'node-tmp' / 'synthsr-bids_77_2'}:/work",
              f"{tmp_path / 'tf'}:/templateflow:ro", "/models:/models:ro"]
    flag = "-v" if engine == "docker" else "-B"
    assert [args[i + 1] for i, a in enumerate(args) if a == flag] == mounts
    if engine == "docker":
        assert {"--rm", "--init", "--read-only", "--tmpfs"} <= set(args)
        assert args[args.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
        assert args[args.index("-e") + 1] == "TEMPLATEFLOW_HOME=/templateflow"
        assert args[args.index("--cpus") + 1] == "3" and args[args.index("--memory") + 1] == "8G"
        assert args[args.index("--gpus") + 1] == '"device=0,1"'  # docker's CSV syntax for a device list
        name = args[args.index("--name") + 1]
        assert name.startswith("synthsr-bids_78_2_") and kill == ["kill", name]
    else:
        assert {"--containall", "--writable-tmpfs", "--nv"} <= set(args)
        assert args[args.index("--env") + 1] == "TEMPLATEFLOW_HOME=/templateflow"


def test_submit_chains_the_group_job_after_every_array(dataset, tmp_path):
    log = tmp_path / "sbatch.log"
    sbatch = recording_tool(tmp_path / "sbatch", log, stdout="4242;cluster")
    plan = _plan(dataset, tmp_path, ["--max-array-size", "2", "--max-parallel", "7"])
    files = slurm.write_job_files(plan)
    array_ids, group_id = slurm.submit(plan, files, sbatch=str(sbatch))
    assert array_ids == ["4242", "4242"] and group_id == "4242"
    first, second, group = calls(log)
    # --max-parallel 7 over two arrays: at most 3 + 3 tasks at once
    assert first == ["--parsable", "--array=1-2%3", str(files.array_script)]
    assert second == ["--parsable", "--array=1-1%3", "--export=ALL,SYNTHSR_BIDS_TASK_OFFSET=2", str(files.array_script)]
    assert "#SBATCH --array=1-2%3" in files.array_script.read_text()
    assert group == ["--parsable", "--dependency=afterany:4242:4242", str(files.group_script)]


def test_submit_script_makes_the_same_calls(dataset, tmp_path):
    log = tmp_path / "sbatch.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recording_tool(bin_dir / "sbatch", log, stdout="17")
    files = slurm.write_job_files(_plan(dataset, tmp_path, ["--max-array-size", "2"]))
    done = subprocess.run([BASH, str(files.submit_script)], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert [c[1:] for c in calls(log)] == [
        ["--array=1-2", "participant.sbatch"],
        ["--array=1-1", "--export=ALL,SYNTHSR_BIDS_TASK_OFFSET=2", "participant.sbatch"],
        ["--dependency=afterany:17:17", "group.sbatch"],
    ]
    assert "group job 17 (after participant job(s) 17:17)" in done.stdout


def test_submit_reports_sbatch_errors(dataset, tmp_path):
    refusing = tmp_path / "sbatch"
    refusing.write_text("#!/bin/bash\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    refusing.chmod(0o755)
    plan = _plan(dataset, tmp_path, [])
    with pytest.raises(slurm.SubmitError, match="invalid partition"):
        slurm.submit(plan, slurm.write_job_files(plan), sbatch=str(refusing))


def run_cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synthsr_bids.hpc.slurm", *argv], capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--engine", "docker"], "needs --image"),
        (["--participant-label", "99"], "sub-99"),
        (["--mem", "lots"], "not a SLURM memory size"),
        (["--", "--participant-label", "01"], "set by the job scripts"),
        (["--", "--nprocs", "16"], "--nprocs after `--` is set by the job scripts"),  # the app's aliases too
        (["--", "--omp-nthreads=8"], "--omp-nthreads after `--`"),
    ],
)
def test_cli_usage_errors_exit_64(dataset, tmp_path, argv, message):
    done = run_cli(str(dataset), str(tmp_path / "out"), *argv)
    assert done.returncode == 64
    assert message in done.stderr


def test_cli_writes_scripts_and_submit_needs_sbatch(dataset, tmp_path):
    done = run_cli(str(dataset), str(tmp_path / "out"), "--script-dir", str(tmp_path / "jobs"), "--",
                   "--skip-bids-validation")  # folders only: not valid BIDS
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "jobs" / "participant.sbatch").read_text().count("--skip-bids-validation") == 1
    assert f"bash {tmp_path / 'jobs' / 'submit.sh'}" in done.stdout
    (tasks,) = (tmp_path / "jobs").glob("participants-*.txt")
    assert tasks.read_text() == "01\n02\n10\n" and str(tasks) in (tmp_path / "jobs" / "participant.sbatch").read_text()
    missing = run_cli(str(dataset), str(tmp_path / "out"), "--submit", "--sbatch", str(tmp_path / "no-sbatch"), "--",
                      "--skip-bids-validation")
    assert missing.returncode == 64
    assert "not found" in missing.stderr


def test_empty_participants_file_is_an_error_not_everyone(dataset, tmp_path):
    comments = tmp_path / "retry.txt"
    comments.write_text("# nothing failed\n\n")
    header_only = tmp_path / "participants.tsv"
    header_only.write_text("participant_id\tage\n")
    for path, message in ((comments, "lists no participant"), (header_only, "has a header but no participant")):
        done = run_cli(str(dataset), str(tmp_path / "out"), "--participants-file", str(path))
        assert done.returncode == 64 and message in done.stderr


def test_regenerated_scripts_leave_pending_tasks_their_list(dataset, tmp_path):
    """A retry generation must not change what the tasks of an earlier, still pending array read."""
    first = slurm.write_job_files(_plan(dataset, tmp_path, []))
    first_script = first.array_script.read_text()  # what sbatch copied at submission
    retry = slurm.write_job_files(_plan(dataset, tmp_path, ["--participant-label", "10"]))
    assert first.tasks != retry.tasks and first.tasks.read_text() == "01\n02\n10\n"
    assert retry.tasks.read_text() == "10\n"
    assert f"TASKS_FILE={first.tasks}" in first_script and f"TASKS_FILE={retry.tasks}" in retry.array_script.read_text()
    again = slurm.write_job_files(_plan(dataset, tmp_path, []))
    assert again.tasks == first.tasks  # same list, same file


def test_prologue_runs_without_set_u(dataset, tmp_path):
    """Module systems and conda read unset variables; the job's own lines still run with set -u."""
    log = tmp_path / "app.log"
    plan = _plan(dataset, tmp_path, ["--executable", str(recording_tool(tmp_path / "app", log)),
                                     "--prologue", 'echo "prologue saw [${SURELY_UNSET_VARIABLE}]"'])
    done = run_array_task(slurm.write_job_files(plan), 1, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "prologue saw []" in done.stdout and len(calls(log)) == 1


def test_the_input_is_validated_once_at_generation_and_the_jobs_skip_it(tmp_path):
    """The real validator, once: N tasks would each read the whole dataset."""
    from bids_builder import add_scan, build_clean_dataset, scan

    bids = build_clean_dataset(tmp_path / "ds", layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS"),
                                                        "sub-02/anat/sub-02_FLAIR.nii.gz": ("FLAIR", (1, 1, 2), "RAS")})
    done = run_cli(str(bids), str(tmp_path / "out"), "--script-dir", str(tmp_path / "jobs"))
    assert done.returncode == 0, done.stderr
    assert "BIDS validation passed" in done.stdout and "for the 2 participant(s)" in done.stdout
    for script in ("participant.sbatch", "group.sbatch"):
        assert " --skip-bids-validation" in (tmp_path / "jobs" / script).read_text()
    (bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz").write_bytes(b"not a nifti")  # an invalid file
    failed = run_cli(str(bids), str(tmp_path / "out"), "--script-dir", str(tmp_path / "jobs2"))
    assert failed.returncode == 16 and "not valid BIDS" in failed.stderr and "sub-02" in failed.stderr
    assert not (tmp_path / "jobs2").exists()  # nothing written for a dataset that fails
    only_01 = run_cli(str(bids), str(tmp_path / "out"), "--script-dir", str(tmp_path / "jobs3"),
                      "--participant-label", "01")  # the check covers the selected participants
    assert only_01.returncode == 0, only_01.stderr
    add_scan(bids, "sub-01/anat/sub-01_T1w.nii.gz", scan("T1w"))
    annexed = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    annexed.unlink()
    annexed.symlink_to("../../.git/annex/objects/Xx/Yy/KEY/KEY")
    fetch = run_cli(str(bids), str(tmp_path / "out"), "--script-dir", str(tmp_path / "jobs4"), "--participant-label", "01")
    assert fetch.returncode == 65 and "datalad get sub-01/anat/sub-01_T1w.nii.gz" in fetch.stderr


@pytest.mark.parametrize(("requested", "expected"), [("8G", "8G"), ("16000", "16000M"), ("512M", "512M"), ("0", None)])
def test_docker_memory_units(requested, expected):
    assert slurm.docker_memory(requested) == expected


def test_a_shared_pybids_index_is_built_once_at_generation(tmp_path):
    from bids_builder import build_clean_dataset

    bids = build_clean_dataset(tmp_path / "ds", layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS")})
    database = tmp_path / "pybids-db"
    done = run_cli(str(bids), str(tmp_path / "out"), "--script-dir", str(tmp_path / "jobs"), "--",
                   "--skip-bids-validation", "--bids-database-dir", str(database))
    assert done.returncode == 0, done.stderr
    (index,) = database.glob("layout-*")
    assert (index / "layout_index.sqlite").is_file() and "the jobs read it" in done.stdout
    assert f"--bids-database-dir {database}" in (tmp_path / "jobs" / "participant.sbatch").read_text()
