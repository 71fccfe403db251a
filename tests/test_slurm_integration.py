"""A real SLURM cluster of one node on 127.0.0.1 (Debian's slurm-wlm + munge),
started and stopped by the test: synthsr-bids-slurm --submit runs the
participant-level array for 3 subjects (bare Python) and the dependent group job.

Needs root (slurmd), slurmctld, slurmd, munged, mungekey and sbatch; skipped
otherwise. Install with:
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_builder import add_scan, scan, write_dataset_description

DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "squeue", "sinfo", "scontrol")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


MISSING = [name for name in DAEMONS if _which(name) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM/munge not installed (missing {', '.join(MISSING)}); "
                       "apt-get install slurmctld slurmd slurm-client munge"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="slurmd must run as root"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd in ``root``, on free ports, with their own config."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "log" / "jobcomp.txt"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env.pop("SLURM_JOB_ID", None)
        self.munge_dir = root / "munge"
        self.started: list[Path] = []

    def write_config(self) -> None:
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        cpus = min(2, os.cpu_count() or 1)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=synthsrtest",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_dir / 'munge.socket'}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/filetxt",
                    f"JobCompLoc={self.jobcomp}",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "InactiveLimit=0",
                    "MinJobAge=600",
                    "KillWait=5",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> None:
        self.write_config()
        self.munge_dir.mkdir(mode=0o700)
        key = self.munge_dir / "munge.key"
        self._run(_which("mungekey"), "--create", f"--keyfile={key}")
        self._run(
            _which("munged"),
            "--force",
            f"--socket={self.munge_dir / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={self.munge_dir / 'munged.pid'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        )
        self.started.append(self.munge_dir / "munged.pid")
        self._run(_which("slurmctld"), "-i")
        self.started.append(self.root / "slurmctld.pid")
        self._run(_which("slurmd"))
        self.started.append(self.root / "slurmd.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self._run(_which("sinfo"), "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster did not come up (node state {state!r}):\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for pid_file in reversed(self.started):  # only the daemons this test started, by pid
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, signal.SIGKILL)

    def wait_for(self, job_ids: list[str], timeout: float) -> None:
        """Until none of ``job_ids`` is queued or running (safety limit ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = self._run(_which("squeue"), "-h", "-j", ",".join(job_ids), "-o", "%i %T", check=False)
            if queued.returncode == 0 and not queued.stdout.strip():
                return
            time.sleep(2)
        raise TimeoutError(f"jobs {job_ids} still queued:\n{queued.stdout}\n{self.logs()}")

    def finished_jobs(self) -> list[dict[str, str]]:
        """Records of the jobcomp/filetxt log: one dict of key=value pairs per ended job."""
        records = []
        for line in self.jobcomp.read_text().splitlines():
            records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
        return records


@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="slurm-"))  # short: munge's socket path has a length limit
    slurm = LocalSlurm(root)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


def tiny_model(path: Path) -> Path:
    from synthsr_bids.models.network import SynthSRUNet, UNetConfig
    from synthsr_bids.models.weights import save_safetensors

    import torch

    torch.manual_seed(0)
    save_safetensors(SynthSRUNet(UNetConfig(base_features=4, n_levels=3)), path, {"name": "tiny-test"})
    return path


SUBJECTS = {"01": ("FLAIR", (1, 1, 4)), "02": ("T2w", (1, 3, 1)), "03": ("T1w", (2, 2, 2))}


def test_slurm_array_then_group_job(cluster, tmp_path):
    bids = tmp_path / "ds"
    write_dataset_description(bids)
    for seed, (subject, (contrast, zooms)) in enumerate(SUBJECTS.items()):
        add_scan(bids, f"sub-{subject}/anat/sub-{subject}_{contrast}.nii.gz", scan(contrast, zooms=zooms, seed=seed))
    out = tmp_path / "derivatives" / "synthsr"
    model = tiny_model(tmp_path / "tiny.safetensors")

    submitted = subprocess.run(
        [
            sys.executable, "-m", "synthsr_bids.hpc.slurm", str(bids), str(out),
            "--executable", f"{sys.executable} -m synthsr_bids",
            "--cpus", "1", "--mem", "900M", "--time", "00:30:00",
            "--group-mem", "500M", "--work-root", str(tmp_path / "node-tmp"),
            "--submit", "--",
            "--model", str(model), "--skip-bids-validation", "--skip-registration",
        ],
        env=cluster.env, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr + cluster.logs()
    array_id = re.search(r"participant array job\(s\) (\d+)", submitted.stdout).group(1)
    group_id = re.search(r"group job (\d+) \(--dependency=afterany:(\d+)\)", submitted.stdout)
    assert group_id.group(2) == array_id
    group_id = group_id.group(1)

    cluster.wait_for([array_id, group_id], timeout=1800)

    jobs = cluster.finished_jobs()
    tasks = sorted((j for j in jobs if j.get("ArrayJobId") == array_id), key=lambda j: int(j["ArrayTaskId"]))
    assert [j["ArrayTaskId"] for j in tasks] == ["1", "2", "3"]
    assert [(j["JobState"], j["ExitCode"]) for j in tasks] == [("COMPLETED", "0:0")] * 3, cluster.logs()
    (group,) = [j for j in jobs if j["JobId"] == group_id]
    assert (group["JobState"], group["ExitCode"]) == ("COMPLETED", "0:0")
    # afterany: the group job started only once every array task had ended
    assert group["StartTime"] >= max(j["EndTime"] for j in tasks)

    for subject, (contrast, _) in SUBJECTS.items():
        image = out / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-synthsr{contrast}_T1w.nii.gz"
        img = nib.load(image)
        assert np.allclose(img.header.get_zooms()[:3], 1.0)
        assert np.isfinite(np.asanyarray(img.dataobj)).all()
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Sources"] == [f"bids:raw:sub-{subject}/anat/sub-{subject}_{contrast}.nii.gz"]

    logs = out / "code" / "slurm" / "logs"
    for index in (1, 2, 3):
        text = (logs / f"participant-{array_id}_{index}.out").read_text()
        assert f"task {index} exit status 0" in text
    group_log = (logs / f"group-{group_id}.out").read_text()
    assert "3 synthetic T1w image(s) for 3 participant(s)" in group_log
    assert "participants without any synthetic image" not in group_log  # the group level's warning
    assert list((tmp_path / "node-tmp").iterdir()) == []  # every task cleaned its work folder

    from synthsr_bids.validation import validate_dataset

    report = validate_dataset(out)
    assert report.errors == (), report.summary()
