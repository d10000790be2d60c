"""SLURM through its own commands: submit a batch script (sbatch), read job states (squeue for the jobs
in the queue, scontrol for those the controller still remembers; accounting, sacct, is not needed) and
cancel jobs (scancel)."""
from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass

from utils.errors import UserError

# States of a job that is still queued or running (it may yet succeed).
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "SPECIAL_EXIT", "RESV_DEL_HOLD"}
# scontrol's reason of a job cancelled (or held) because a job it waited for failed.
DEPENDENCY_FAILED = "DependencyNeverSatisfied"


@dataclass
class JobState:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... (SLURM's names)
    reason: str = ""
    exit_code: str = ""
    submit_time: str = ""
    start_time: str = ""
    end_time: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _call(command: list[str], what: str, input_text: str | None = None, check: bool = True):
    if shutil.which(command[0]) is None:
        raise UserError(f"{command[0]} is not on PATH: run --slurm on a machine that submits SLURM jobs "
                        f"(a login node), or without --slurm")
    proc = subprocess.run(command, input=input_text, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"{what} failed: {message[-1] if message else f'exit code {proc.returncode}'}")
    return proc


def submit(script: str, options: list[str]) -> str:
    """Submit `script` (its text) with sbatch `options`; the job id."""
    proc = _call(["sbatch", "--parsable", *options], "sbatch", input_text=script)
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch gave no job id (output {proc.stdout.strip()!r}); check --slurm_args")
    return job_id


def _fields(line: str) -> dict[str, str]:
    """KEY=VALUE words of `scontrol show job -o` (values without spaces, which those read here are)."""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def job_states(job_ids) -> dict[str, JobState]:
    """States of the given jobs that SLURM still knows (jobs it forgot are left out)."""
    wanted = {str(j) for j in job_ids}
    if not wanted:
        return {}
    states = {}
    queue = _call(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T|%r"], "squeue").stdout
    for line in queue.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in wanted:
            states[parts[0]] = JobState(parts[0], parts[1], parts[2])
    for job_id in sorted(wanted - states.keys()) + sorted(j for j in states if states[j].state == "RUNNING"):
        proc = _call(["scontrol", "show", "job", "-o", job_id], "scontrol", check=False)
        if proc.returncode != 0:
            continue  # forgotten (MinJobAge passed)
        f = _fields(proc.stdout)
        states[job_id] = JobState(job_id, f.get("JobState", "UNKNOWN"), f.get("Reason", ""), f.get("ExitCode", ""),
                                  f.get("SubmitTime", ""), f.get("StartTime", ""), f.get("EndTime", ""))
    return states


def cancel(job_ids) -> None:
    ids = [str(j) for j in job_ids]
    if ids:
        _call(["scancel", *ids], "scancel", check=False)
