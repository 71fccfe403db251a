"""``synthsr-bids-slurm``: SLURM job scripts for a whole dataset.

Writes, into one folder (default ``<output_dir>/code/slurm``):

``participants-<hash>.txt``
    one line per array task: a participant label, or ``label<TAB>session`` with
    ``--per-session``. Task *i* (1-based ``SLURM_ARRAY_TASK_ID``) reads line *i*.
    Named by a hash of its content and never rewritten: tasks of an earlier,
    still pending array keep reading the list they were submitted with when the
    scripts are generated again (e.g. to retry some participants).
``participant.sbatch``
    the participant-level job array (one task per line), with the CPU, memory,
    time and GPU requests and the command for bare Python, Docker or
    Singularity/Apptainer. Each task gets its own work directory.
``group.sbatch``
    the group-level job, submitted with ``--dependency=afterany:<array ids>`` so
    that it runs once every participant task has ended (failed ones included:
    the group level reports which participants have no output).
``submit.sh``
    the two ``sbatch`` calls. ``--submit`` runs the same calls from Python.

SLURM caps array indices (``MaxArraySize``, 1001 by default, so indices up to
1000): a longer list is submitted as several arrays of the same script with
``SYNTHSR_BIDS_TASK_OFFSET`` exported, and the group job waits for all of them.
All participant jobs share one output folder; the shared derivative files are
written concurrency-safely (:mod:`synthsr_bids.derivatives.dataset`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn, Sequence

from synthsr_bids import __version__
from synthsr_bids.errors import ExitCode
from synthsr_bids.io import write_text_atomic

__all__ = [
    "ENGINES",
    "ContainerSpec",
    "JobFiles",
    "JobPlan",
    "Resources",
    "SubmitError",
    "Task",
    "array_chunks",
    "build_parser",
    "find_tasks",
    "main",
    "read_participants_file",
    "render_array_script",
    "render_group_script",
    "render_submit_script",
    "submit",
    "write_job_files",
]

LOGGER = logging.getLogger(__name__)

ENGINES = ("none", "docker", "singularity", "apptainer")
DEFAULT_MAX_ARRAY_SIZE = 1000
TASKS_FILE_PREFIX = "participants"
ARRAY_SCRIPT = "participant.sbatch"
GROUP_SCRIPT = "group.sbatch"
SUBMIT_SCRIPT = "submit.sh"
OFFSET_VARIABLE = "SYNTHSR_BIDS_TASK_OFFSET"

#: Where the container sees the dataset, the derivatives and the work directory.
CONTAINER_BIDS = "/bids"
CONTAINER_OUT = "/out"
CONTAINER_WORK = "/work"
CONTAINER_TEMPLATEFLOW = "/templateflow"

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class SubmitError(RuntimeError):
    """``sbatch`` is missing or refused a job."""


@dataclass(frozen=True)
class Task:
    """One array task: a participant, optionally one of its sessions."""

    subject: str
    session: str | None = None

    def line(self) -> str:
        return self.subject if self.session is None else f"{self.subject}\t{self.session}"

    def __str__(self) -> str:
        return f"sub-{self.subject}" + (f" ses-{self.session}" if self.session else "")


@dataclass(frozen=True)
class Resources:
    """What each job asks SLURM for."""

    cpus: int = 2
    mem: str = "8G"
    time: str = "02:00:00"
    gpus: int = 0
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    max_parallel: int | None = None
    """At most this many array tasks at once (``--array=...%N``)."""
    group_cpus: int = 1
    group_mem: str = "4G"
    group_time: str = "01:00:00"
    extra_sbatch: tuple[str, ...] = ()
    """More ``#SBATCH`` options, e.g. ``--constraint=avx2``, for both jobs."""


@dataclass(frozen=True)
class ContainerSpec:
    """How a job runs the app."""

    engine: str = "none"
    """``none`` (the ``synthsr-bids`` command on the node), ``docker``,
    ``singularity`` or ``apptainer``."""
    image: str | None = None
    """Docker image name, or the path of a ``.sif`` file."""
    executable: str | None = None
    """The command: default ``synthsr-bids`` for ``none``, else the engine's name."""
    templateflow_home: Path | None = None
    """A host TemplateFlow folder to bind instead of the image's own copy."""
    binds: tuple[str, ...] = ()
    """More ``SRC[:DST[:ro]]`` mounts (e.g. a folder holding a --model file)."""

    def command(self) -> str:
        if self.executable:
            return self.executable
        return "synthsr-bids" if self.engine == "none" else self.engine


@dataclass(frozen=True)
class JobPlan:
    """Everything the scripts say."""

    bids_dir: Path
    output_dir: Path
    script_dir: Path
    tasks: tuple[Task, ...]
    resources: Resources = field(default_factory=Resources)
    container: ContainerSpec = field(default_factory=ContainerSpec)
    app_args: tuple[str, ...] = ()
    """Extra ``synthsr-bids`` options, given to both levels (e.g. ``--model ...``)."""
    job_name: str = "synthsr-bids"
    work_root: str | None = None
    """Parent of the per-task work directories (default: ``$TMPDIR``, else /tmp,
    evaluated on the compute node)."""
    prologue: tuple[str, ...] = ()
    """Shell lines run before the app (``module load ...``, ``source venv/bin/activate``)."""
    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE
    group: bool = True

    @property
    def logs_dir(self) -> Path:
        return self.script_dir / "logs"

    @property
    def tasks_file(self) -> Path:
        """The task list of these scripts, named by its content (see the module docstring)."""
        digest = hashlib.sha256(tasks_text(self.tasks).encode("utf-8")).hexdigest()[:12]
        return self.script_dir / f"{TASKS_FILE_PREFIX}-{digest}.txt"


def tasks_text(tasks: Sequence[Task]) -> str:
    return "".join(task.line() + "\n" for task in tasks)


@dataclass(frozen=True)
class JobFiles:
    tasks: Path
    array_script: Path
    group_script: Path | None
    submit_script: Path


# --------------------------------------------------------------------------- tasks


def _strip(label: str, prefix: str) -> str:
    label = label.strip()
    label = label[len(prefix) :] if label.startswith(prefix) else label
    if not _LABEL_RE.match(label):
        raise ValueError(f"{label!r} is not a valid BIDS label (letters and digits only)")
    return label


def read_participants_file(path: Path) -> list[str]:
    """Labels from a text file (one per line, ``sub-`` optional, ``#`` comments) or
    a ``participants.tsv`` (its ``participant_id`` column)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"the participants file {path} lists no participant (an empty list would select all)")
    header = lines[0].split("\t")
    if "participant_id" in header:
        column = header.index("participant_id")
        if len(lines) == 1:
            raise ValueError(f"the participants file {path} has a header but no participant")
        return [_strip(line.split("\t")[column], "sub-") for line in lines[1:]]
    return [_strip(line, "sub-") for line in lines]


def find_tasks(
    bids_dir: Path, participant_labels: Sequence[str] = (), *, per_session: bool = False
) -> list[Task]:
    """The array tasks for ``bids_dir``: every ``sub-*`` folder (or only
    ``participant_labels``), split by ``ses-*`` folder when ``per_session``.

    Reads folder names only (no indexing), so it is quick on thousands of subjects.
    """
    bids_dir = Path(bids_dir)
    present = sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir() and _LABEL_RE.match(p.name[4:]))
    if participant_labels:
        wanted = list(dict.fromkeys(_strip(label, "sub-") for label in participant_labels))
        missing = [label for label in wanted if label not in present]
        if missing:
            raise ValueError(
                f"participant(s) not found in {bids_dir}: " + ", ".join(f"sub-{m}" for m in missing)
            )
        subjects = wanted
    else:
        subjects = present
    tasks: list[Task] = []
    for subject in subjects:
        sessions = []
        if per_session:
            sessions = sorted(
                p.name[4:] for p in (bids_dir / f"sub-{subject}").glob("ses-*") if p.is_dir() and _LABEL_RE.match(p.name[4:])
            )
        if sessions:
            tasks.extend(Task(subject, session) for session in sessions)
        else:
            tasks.append(Task(subject))
    return tasks


def array_chunks(n_tasks: int, max_array_size: int = DEFAULT_MAX_ARRAY_SIZE) -> list[tuple[int, int]]:
    """``(offset, size)`` of each array submission: task ``offset + i`` runs as array index ``i``."""
    if max_array_size < 1:
        raise ValueError("max_array_size must be at least 1")
    return [(offset, min(max_array_size, n_tasks - offset)) for offset in range(0, n_tasks, max_array_size)]


# --------------------------------------------------------------------------- rendering


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _header(plan: JobPlan, *, level: str) -> list[str]:
    res = plan.resources
    if level == "participant":
        name, cpus, mem, time = plan.job_name, res.cpus, res.mem, res.time
        output = plan.logs_dir / "participant-%A_%a.out"
    else:
        name, cpus, mem, time = f"{plan.job_name}-group", res.group_cpus, res.group_mem, res.group_time
        output = plan.logs_dir / "group-%j.out"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"]
    if level == "participant":
        chunks = array_chunks(len(plan.tasks), plan.max_array_size)
        size = chunks[0][1] if plan.tasks else 0
        throttle = per_array_limit(res.max_parallel, len(chunks))
        limit = f"%{throttle}" if throttle else ""
        lines.append(f"#SBATCH --array=1-{size}{limit}")
    lines += [
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={mem}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={output}",
    ]
    for option, value in (("partition", res.partition), ("account", res.account), ("qos", res.qos)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    if level == "participant" and res.gpus:
        lines.append(f"#SBATCH --gres=gpu:{res.gpus}")
    lines += [f"#SBATCH {option}" for option in res.extra_sbatch]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        f"# Written by synthsr-bids-slurm {__version__} on {stamp}.",
        f"# Submit everything with: bash {_q(plan.script_dir / SUBMIT_SCRIPT)}",
    ]
    return lines


def _app_lines(plan: JobPlan, level: str) -> list[str]:
    """The command that runs synthsr-bids, as bash lines (uses $BIDS_DIR, $OUTPUT_DIR,
    $WORK_DIR, $NTHREADS and, for the participant level, the SELECT array)."""
    spec = plan.container
    select = ' "${SELECT[@]}"' if level == "participant" else ""
    app_args = "".join(f" {_q(a)}" for a in plan.app_args)
    gpu = level == "participant" and plan.resources.gpus > 0
    device = " --device cuda" if gpu and "--device" not in plan.app_args else ""
    tail = f'{level}{select} --nthreads "$NTHREADS"{device}{app_args}'
    if spec.engine == "none":
        return [f'{spec.command()} "$BIDS_DIR" "$OUTPUT_DIR" {tail} -w "$WORK_DIR"']
    if not spec.image:
        raise ValueError(f"--image is required with --engine {spec.engine}")
    binds = [
        f'"$BIDS_DIR":{CONTAINER_BIDS}:ro',
        f'"$OUTPUT_DIR":{CONTAINER_OUT}',
        f'"$WORK_DIR":{CONTAINER_WORK}',
    ]
    env: list[str] = []
    if spec.templateflow_home:
        binds.append(f"{_q(spec.templateflow_home)}:{CONTAINER_TEMPLATEFLOW}:ro")
        env.append(f"TEMPLATEFLOW_HOME={CONTAINER_TEMPLATEFLOW}")
    binds += [_q(b) for b in spec.binds]
    inner = f"{CONTAINER_BIDS} {CONTAINER_OUT} {tail} -w {CONTAINER_WORK}"
    setup: list[str] = []
    if spec.engine == "docker":
        # --init: signals (scancel, time limit) reach Python; the name lets the EXIT trap kill a container
        # dockerd would otherwise keep running outside the job's cgroup; the job's CPUs and memory are
        # enforced inside the container too.
        mem = plan.resources.mem if level == "participant" else plan.resources.group_mem
        options = ["run --rm --init --read-only --tmpfs /tmp", '--name "$CONTAINER"', '--user "$(id -u):$(id -g)"',
                   '--cpus "$NTHREADS"']
        if docker_memory(mem):
            options.append(f"--memory {_q(docker_memory(mem))}")
        setup.append('CONTAINER="synthsr-bids_${SLURM_JOB_ID:-local}_${SLURM_ARRAY_TASK_ID:-group}_$$"')
        if gpu:
            # docker parses --gpus as CSV: a device list must be quoted inside the value
            setup.append('GPUS=all; if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then '
                         r'GPUS="\"device=${CUDA_VISIBLE_DEVICES}\""; fi')
            options.append('--gpus "$GPUS"')
        options += [f"-v {b}" for b in binds] + [f"-e {e}" for e in env]
    else:  # singularity / apptainer: BABS-style isolation
        options = ["run --containall --writable-tmpfs"]
        if gpu:
            options.append("--nv")
        options += [f"-B {b}" for b in binds] + [f"--env {e}" for e in env]
    parts = [spec.command(), *options, _q(spec.image), inner]
    return [*setup, " \\\n  ".join(parts)]


def docker_memory(slurm_mem: str) -> str | None:
    """SLURM's memory size for ``docker --memory`` (``None``: SLURM's 0, all the node's memory). A bare
    number is megabytes to SLURM, bytes to docker."""
    if int(re.sub(r"\D", "", slurm_mem) or 0) == 0:
        return None
    return f"{slurm_mem}M" if slurm_mem.isdigit() else slurm_mem


def _cleanup_trap(plan: JobPlan) -> str:
    """On exit (also after scancel or the time limit): stop a Docker container still running, then
    delete the task's work folder."""
    kill = ""
    if plan.container.engine == "docker":
        # never fails (the trap runs under set -e): after a normal end --rm has removed the container
        kill = f'{{ [ -z \"${{CONTAINER:-}}\" ] || {plan.container.command()} kill \"$CONTAINER\" >/dev/null 2>&1 || true; }}; '
    return f"trap '{kill}rm -rf \"$WORK_DIR\"' EXIT"


def _prologue_lines(plan: JobPlan) -> list[str]:
    """The user's prologue, with ``set -u`` off around it: module systems (Lmod, environment-modules)
    and conda's activation scripts read unset variables and would abort the job under it."""
    if not plan.prologue:
        return []
    return ["set +u", *plan.prologue, "set -u"]


def _common_body(plan: JobPlan) -> list[str]:
    return [
        "set -euo pipefail",
        "",
        f"BIDS_DIR={_q(plan.bids_dir)}",
        f"OUTPUT_DIR={_q(plan.output_dir)}",
        f"WORK_ROOT={_q(plan.work_root)}" if plan.work_root else 'WORK_ROOT="${TMPDIR:-/tmp}"',
    ]


def render_array_script(plan: JobPlan) -> str:
    """The participant-level job array."""
    lines = _header(plan, level="participant")
    lines += [
        "# One task per line of the participants file; rerun failed tasks with",
        f"#   sbatch --array=<task ids> {_q(plan.script_dir / ARRAY_SCRIPT)}",
        "# (finished scans are skipped on rerun).",
        *_common_body(plan),
        f"TASKS_FILE={_q(plan.tasks_file)}",
        "",
        ': "${SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a job array}"',
        f'TASK_INDEX=$(( SLURM_ARRAY_TASK_ID + ${{{OFFSET_VARIABLE}:-0}} ))',
        'TASK_LINE=$(sed -n "${TASK_INDEX}p" "$TASKS_FILE")',
        'if [ -z "$TASK_LINE" ]; then',
        '  echo "synthsr-bids-slurm: no line ${TASK_INDEX} in ${TASKS_FILE}" >&2',
        "  exit 64",
        "fi",
        "SESSION=",
        "IFS=$'\\t' read -r SUBJECT SESSION <<< \"$TASK_LINE\"",
        'SELECT=(--participant-label "$SUBJECT")',
        'if [ -n "$SESSION" ]; then SELECT+=(--session-label "$SESSION"); fi',
        f'NTHREADS="${{SLURM_CPUS_PER_TASK:-{plan.resources.cpus}}}"',
        'WORK_DIR="${WORK_ROOT}/synthsr-bids_${SLURM_ARRAY_JOB_ID:-local}_${SLURM_ARRAY_TASK_ID}"',
        'mkdir -p "$WORK_DIR"',
        _cleanup_trap(plan),
        "",
        *_prologue_lines(plan),
        'echo "synthsr-bids: task ${TASK_INDEX}: sub-${SUBJECT}${SESSION:+ ses-${SESSION}} on $(hostname)"',
        "status=0",
    ]
    *setup, command = _app_lines(plan, "participant")
    lines += [*setup, command + " || status=$?", 'echo "synthsr-bids: task ${TASK_INDEX} exit status ${status}"', 'exit "$status"', ""]
    return "\n".join(lines)


def render_group_script(plan: JobPlan) -> str:
    """The group-level job (submitted after the array with ``afterany``)."""
    lines = _header(plan, level="group")
    lines += [
        *_common_body(plan),
        f'NTHREADS="${{SLURM_CPUS_PER_TASK:-{plan.resources.group_cpus}}}"',
        'WORK_DIR="${WORK_ROOT}/synthsr-bids_group_${SLURM_JOB_ID:-local}"',
        'mkdir -p "$WORK_DIR"',
        _cleanup_trap(plan),
        "",
        *_prologue_lines(plan),
        "status=0",
    ]
    *setup, command = _app_lines(plan, "group")
    lines += [*setup, command + " || status=$?", 'exit "$status"', ""]
    return "\n".join(lines)


def per_array_limit(max_parallel: int | None, n_arrays: int) -> int | None:
    """The ``%N`` of each array so that all the arrays together run at most ``max_parallel`` tasks."""
    return None if not max_parallel else max(1, max_parallel // max(n_arrays, 1))


def _array_option(size: int, max_parallel: int | None) -> str:
    return f"--array=1-{size}" + (f"%{max_parallel}" if max_parallel else "")


def render_submit_script(plan: JobPlan, sbatch: str = "sbatch") -> str:
    """``submit.sh``: the array(s), then the group job depending on all of them."""
    lines = [
        "#!/bin/bash",
        f"# Written by synthsr-bids-slurm {__version__}: submits {len(plan.tasks)} participant task(s)"
        + (" and the group-level job." if plan.group else "."),
        "set -euo pipefail",
        f"cd {_q(plan.script_dir)}",
        "ids=()",
    ]
    chunks = array_chunks(len(plan.tasks), plan.max_array_size)
    throttle = per_array_limit(plan.resources.max_parallel, len(chunks))
    for offset, size in chunks:
        export = f" --export=ALL,{OFFSET_VARIABLE}={offset}" if offset else ""
        lines += [
            f"id=$({sbatch} --parsable {_array_option(size, throttle)}{export} {ARRAY_SCRIPT})",
            'ids+=("${id%%;*}")',
            f'echo "participant array job ${{id%%;*}}: tasks {offset + 1}-{offset + size}"',
        ]
    if plan.group:
        lines += [
            'deps=$(IFS=:; echo "${ids[*]}")',
            f'gid=$({sbatch} --parsable --dependency=afterany:"$deps" {GROUP_SCRIPT})',
            'echo "group job ${gid%%;*} (after participant job(s) ${deps})"',
        ]
    return "\n".join(lines) + "\n"


def write_job_files(plan: JobPlan) -> JobFiles:
    """Write the participants list and the scripts into ``plan.script_dir``."""
    if not plan.tasks:
        raise ValueError(f"no participants to process in {plan.bids_dir}")
    plan.script_dir.mkdir(parents=True, exist_ok=True)
    plan.logs_dir.mkdir(parents=True, exist_ok=True)
    tasks = plan.tasks_file
    if not tasks.is_file():  # same name, same content: an existing file is never rewritten
        write_text_atomic(tasks, tasks_text(plan.tasks))
    array = plan.script_dir / ARRAY_SCRIPT
    array.write_text(render_array_script(plan))
    group = None
    if plan.group:
        group = plan.script_dir / GROUP_SCRIPT
        group.write_text(render_group_script(plan))
    submit_script = plan.script_dir / SUBMIT_SCRIPT
    submit_script.write_text(render_submit_script(plan))
    for path in (array, group, submit_script):
        if path is not None:
            path.chmod(0o755)
    return JobFiles(tasks=tasks, array_script=array, group_script=group, submit_script=submit_script)


# --------------------------------------------------------------------------- submission


def _sbatch(sbatch: str, arguments: Sequence[str], cwd: Path) -> str:
    command = [sbatch, "--parsable", *arguments]
    LOGGER.debug("running %s", " ".join(command))
    try:
        completed = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError:
        raise SubmitError(f"{sbatch} not found: run this on a SLURM login node, or submit later with submit.sh") from None
    if completed.returncode != 0:
        raise SubmitError(f"{' '.join(command)} failed (exit {completed.returncode}): {completed.stderr.strip()}")
    job_id = completed.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"unexpected answer from sbatch: {completed.stdout.strip()!r}")
    return job_id


def submit(plan: JobPlan, files: JobFiles, *, sbatch: str = "sbatch") -> tuple[list[str], str | None]:
    """Submit the array(s) then the dependent group job; return the job ids."""
    array_ids = []
    chunks = array_chunks(len(plan.tasks), plan.max_array_size)
    throttle = per_array_limit(plan.resources.max_parallel, len(chunks))
    for offset, size in chunks:
        arguments = [_array_option(size, throttle)]
        if offset:
            arguments.append(f"--export=ALL,{OFFSET_VARIABLE}={offset}")
        array_ids.append(_sbatch(sbatch, [*arguments, str(files.array_script)], plan.script_dir))
    group_id = None
    if files.group_script is not None:
        group_id = _sbatch(
            sbatch, [f"--dependency=afterany:{':'.join(array_ids)}", str(files.group_script)], plan.script_dir
        )
    return array_ids, group_id


# --------------------------------------------------------------------------- command line

DESCRIPTION = """\
Write SLURM job scripts that run synthsr-bids on a whole dataset: a job array with
one task per participant (or participant-session), then a group-level job that
starts when every task has ended (--dependency=afterany). Options after `--` are
passed to synthsr-bids at both levels. The input is validated once, here (the
official BIDS validator on the selected participants, and a check for un-fetched
DataLad files), and the jobs skip that check; `-- --skip-bids-validation` skips it.

Examples:
  synthsr-bids-slurm /data/ds /data/ds/derivatives/synthsr --cpus 4 --mem 16G --submit
  synthsr-bids-slurm /data/ds /scratch/synthsr --engine apptainer \\
      --image /images/synthsr-bids_0.1.0.sif --max-parallel 200 --submit -- --model synthsr-v1
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def _checked(pattern: re.Pattern[str], what: str):
    def parse(value: str) -> str:
        if not pattern.match(value):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return value

    return parse


def _count(minimum: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r} must be at least {minimum}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (no side effects)."""
    parser = _Parser(prog="synthsr-bids-slurm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="the derivatives folder all jobs write to")
    parser.add_argument("--version", action="version", version=f"synthsr-bids {__version__}")

    select = parser.add_argument_group("Tasks")
    select.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+", metavar="LABEL",
                        help="only these participants (default: every sub-* folder)")
    select.add_argument("--participants-file", type=Path, metavar="FILE",
                        help="read the participants from a file (one label per line, or a participants.tsv)")
    select.add_argument("--per-session", action="store_true",
                        help="one task per participant-session instead of one per participant")

    resources = parser.add_argument_group("Resources")
    resources.add_argument("--cpus", type=_count(1), default=2, help="CPUs per participant task (default: 2)")
    resources.add_argument("--mem", type=_checked(_MEM_RE, "a SLURM memory size (e.g. 8G)"), default="8G",
                           help="memory per participant task (default: 8G)")
    resources.add_argument("--time", type=_checked(_TIME_RE, "a SLURM time limit (e.g. 02:00:00)"), default="02:00:00",
                           help="time limit per participant task (default: 02:00:00)")
    resources.add_argument("--gpus", type=_count(0), default=0,
                           help="GPUs per participant task (--gres=gpu:N; runs with --device cuda; default: 0)")
    resources.add_argument("--group-cpus", type=_count(1), default=1, help="CPUs of the group job (default: 1)")
    resources.add_argument("--group-mem", type=_checked(_MEM_RE, "a SLURM memory size"), default="4G",
                           help="memory of the group job (default: 4G)")
    resources.add_argument("--group-time", type=_checked(_TIME_RE, "a SLURM time limit"), default="01:00:00",
                           help="time limit of the group job (default: 01:00:00)")
    resources.add_argument("--partition", help="SLURM partition")
    resources.add_argument("--account", help="SLURM account")
    resources.add_argument("--qos", help="SLURM quality of service")
    resources.add_argument("--max-parallel", type=_count(1), metavar="N",
                           help="run at most N participant tasks at once (--array=...%%N; split across the arrays "
                                "when the list is longer than --max-array-size, at least one task per array)")
    resources.add_argument("--max-array-size", type=_count(1), default=DEFAULT_MAX_ARRAY_SIZE, metavar="N",
                           help="split longer lists into several arrays (your cluster's MaxArraySize - 1; default: 1000)")
    resources.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                           help="extra #SBATCH line for both jobs, e.g. --sbatch-option=--constraint=avx2 (repeatable)")

    runtime = parser.add_argument_group("How the jobs run synthsr-bids")
    runtime.add_argument("--engine", choices=ENGINES, default="none",
                         help="none: the synthsr-bids command on the node; docker; singularity or apptainer (default: none)")
    runtime.add_argument("--image", help="Docker image (e.g. synthsr/synthsr-bids:0.1.0) or .sif file")
    runtime.add_argument("--executable", metavar="CMD",
                         help="the command to call (default: synthsr-bids, or the engine's name); e.g. "
                              "'/opt/venv/bin/python -m synthsr_bids'")
    runtime.add_argument("--bind", action="append", default=[], metavar="SRC[:DST[:ro]]",
                         help="extra container mount (repeatable), e.g. for a --model file")
    runtime.add_argument("--templateflow-home", type=Path, metavar="DIR",
                         help="bind this TemplateFlow folder into the container instead of the image's copy")
    runtime.add_argument("--prologue", action="append", default=[], metavar="LINE",
                         help="shell line run before the app, e.g. 'module load apptainer' (repeatable)")
    runtime.add_argument("--work-root", metavar="DIR",
                         help="parent of the per-task work folders (default: $TMPDIR on the node, else /tmp)")
    runtime.add_argument("--job-name", default="synthsr-bids", help="SLURM job name (default: synthsr-bids)")
    runtime.add_argument("--no-group", action="store_true", help="do not write or submit the group-level job")

    output = parser.add_argument_group("Output")
    output.add_argument("--script-dir", type=Path, metavar="DIR",
                        help="where the scripts go (default: <output_dir>/code/slurm)")
    output.add_argument("--submit", action="store_true", help="submit with sbatch after writing the scripts")
    output.add_argument("--sbatch", default="sbatch", metavar="PATH", help="the sbatch command (default: sbatch)")
    return parser


def scripted_app_options() -> set[str]:
    """Every spelling of the ``synthsr-bids`` options the job scripts set themselves (read from the
    app's own parser, so that aliases such as ``--nprocs`` are refused too)."""
    from synthsr_bids.cli.parser import build_parser as app_parser

    scripted = {"participant_label", "session_label", "work_dir", "nthreads"}
    found = {option for action in app_parser()._actions if action.dest in scripted for option in action.option_strings}
    missing = scripted - {action.dest for action in app_parser()._actions}
    if missing:  # pragma: no cover - a renamed option must be renamed here too
        raise RuntimeError(f"synthsr-bids has no option with dest {sorted(missing)}")
    return found


def _split_app_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1 :]
    return argv, []


def plan_from_args(argv: Sequence[str] | None = None) -> tuple[JobPlan, argparse.Namespace]:
    """Parse the command line into a :class:`JobPlan` (exits 64 on usage errors)."""
    parser = build_parser()
    own, app_args = _split_app_args(sys.argv[1:] if argv is None else argv)
    opts = parser.parse_args(own)
    bids_dir = opts.bids_dir.expanduser().resolve()
    output_dir = opts.output_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        parser.error(f"the BIDS directory {bids_dir} does not exist")
    if opts.engine != "none" and not opts.image:
        parser.error(f"--engine {opts.engine} needs --image")
    forbidden = scripted_app_options()
    clash = sorted(forbidden.intersection(a.split("=")[0] for a in app_args))
    if clash:
        parser.error(f"{', '.join(clash)} after `--` is set by the job scripts; use this command's own options")
    labels = list(opts.participant_label or ())
    try:
        if opts.participants_file:
            labels += read_participants_file(opts.participants_file)
        tasks = find_tasks(bids_dir, labels, per_session=opts.per_session)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if not tasks:
        parser.error(f"no sub-* folders in {bids_dir}")
    plan = JobPlan(
        bids_dir=bids_dir,
        output_dir=output_dir,
        script_dir=(opts.script_dir.expanduser().resolve() if opts.script_dir else output_dir / "code" / "slurm"),
        tasks=tuple(tasks),
        resources=Resources(
            cpus=opts.cpus,
            mem=opts.mem,
            time=opts.time,
            gpus=opts.gpus,
            partition=opts.partition,
            account=opts.account,
            qos=opts.qos,
            max_parallel=opts.max_parallel,
            group_cpus=opts.group_cpus,
            group_mem=opts.group_mem,
            group_time=opts.group_time,
            extra_sbatch=tuple(opts.sbatch_option),
        ),
        container=ContainerSpec(
            engine=opts.engine,
            image=opts.image,
            executable=opts.executable,
            templateflow_home=opts.templateflow_home.expanduser().resolve() if opts.templateflow_home else None,
            binds=tuple(opts.bind),
        ),
        app_args=tuple(app_args),
        job_name=opts.job_name,
        work_root=opts.work_root,
        prologue=tuple(opts.prologue),
        max_array_size=opts.max_array_size,
        group=not opts.no_group,
    )
    return plan, opts


SKIP_VALIDATION = ("--skip-bids-validation", "--skip_bids_validation")


def validate_once(plan: JobPlan) -> tuple[JobPlan, int | None]:
    """Check the input once, here, rather than in every task: each validator run reads the whole
    dataset, so N tasks would read it N times (N x N files) on shared storage. Returns the plan
    whose jobs skip the check, or an exit code (65, 16 or 64) after printing why."""
    from synthsr_bids.validation import UnfetchedContentError, ValidatorUnavailableError, check_input

    if any(a in SKIP_VALIDATION for a in plan.app_args):
        return plan, None
    labels = sorted({task.subject for task in plan.tasks})
    try:
        report = check_input(plan.bids_dir, labels)
    except UnfetchedContentError as exc:
        print(f"synthsr-bids-slurm: {exc}", file=sys.stderr)
        return plan, int(ExitCode.DATA_ERROR)
    except ValidatorUnavailableError as exc:
        print(f"synthsr-bids-slurm: {exc} (or pass `-- --skip-bids-validation`)", file=sys.stderr)
        return plan, int(ExitCode.USAGE)
    if report.errors:
        print(f"synthsr-bids-slurm: the input dataset is not valid BIDS:\n{report.summary()}\n"
              "Fix the dataset, or pass `-- --skip-bids-validation` at your own risk.", file=sys.stderr)
        return plan, int(ExitCode.VALIDATION_FAILED)
    print(f"BIDS validation passed ({len(report.warnings)} warnings) for the {len(labels)} participant(s): "
          "the jobs do not repeat it")
    return dataclasses.replace(plan, app_args=(*plan.app_args, SKIP_VALIDATION[0])), None


def prebuild_index(plan: JobPlan) -> int | None:
    """With ``-- --bids-database-dir DIR`` and bare-Python jobs, build the saved pybids index here,
    once: otherwise every task of the first wave would index the whole dataset at the same time.
    (In a container the folder is a path inside it: the first task builds it.) Returns an exit code
    after printing why, or ``None``."""
    from synthsr_bids.cli.parser import parse_args
    from synthsr_bids.discovery import build_layout
    from synthsr_bids.errors import SynthSRBidsError

    wanted = any(a == "--bids-database-dir" or a.startswith("--bids-database-dir=") for a in plan.app_args)
    if not wanted or plan.container.engine != "none":
        return None
    config = parse_args([str(plan.bids_dir), str(plan.output_dir), "participant", *plan.app_args])
    try:
        build_layout(config)
    except SynthSRBidsError as exc:
        print(f"synthsr-bids-slurm: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(f"pybids index of {plan.bids_dir} saved in {config.bids_database_dir}: the jobs read it")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan, opts = plan_from_args(argv)
    plan, failed = validate_once(plan)
    if failed is None:
        failed = prebuild_index(plan)
    if failed is not None:
        return failed
    try:
        files = write_job_files(plan)
    except OSError as exc:
        print(f"synthsr-bids-slurm: cannot write the scripts: {exc}", file=sys.stderr)
        return int(ExitCode.CANNOT_CREATE)
    chunks = array_chunks(len(plan.tasks), plan.max_array_size)
    print(f"{len(plan.tasks)} task(s) in {files.tasks}")
    print(f"participant job array: {files.array_script}" + (f" ({len(chunks)} arrays)" if len(chunks) > 1 else ""))
    if files.group_script:
        print(f"group job:             {files.group_script}")
    if not opts.submit:
        print(f"submit with:           bash {files.submit_script}")
        return 0
    if shutil.which(opts.sbatch) is None and not Path(opts.sbatch).is_file():
        print(f"synthsr-bids-slurm: {opts.sbatch} not found; submit later with: bash {files.submit_script}", file=sys.stderr)
        return int(ExitCode.USAGE)
    try:
        array_ids, group_id = submit(plan, files, sbatch=opts.sbatch)
    except SubmitError as exc:
        print(f"synthsr-bids-slurm: {exc}", file=sys.stderr)
        return 1
    print(f"submitted participant array job(s) {', '.join(array_ids)}")
    if group_id:
        print(f"submitted group job {group_id} (--dependency=afterany:{':'.join(array_ids)})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
