"""Pre-emption: a signal asks the run to stop at the next iteration boundary that every rank agrees on,
after which the resume checkpoint is written and the process exits with PREEMPTED_EXIT_CODE; under
SLURM the batch job puts itself back into the queue when it may be requeued."""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

from utils.errors import UserError

# EX_TEMPFAIL of sysexits.h: "try again later". A job script or a campaign re-runs the same command.
PREEMPTED_EXIT_CODE = 75
DEFAULT_SIGNALS = "TERM,USR1"
# Signals that mean "the scheduler ends this job" rather than "time is nearly up": no requeue after them
# (scancel sends SIGTERM; a pre-emption with PreemptMode=REQUEUE requeues by itself).
NO_REQUEUE = {signal.SIGTERM}


class Preempted(Exception):
    """Every rank stops here: `epoch` epochs and `iteration_in_epoch` iterations of the next one are done."""

    def __init__(self, epoch: int, iteration_in_epoch: int):
        super().__init__(f"stopped after epoch {epoch}, iteration {iteration_in_epoch}")
        self.epoch, self.iteration_in_epoch = epoch, iteration_in_epoch


def parse_signals(text: str) -> list[signal.Signals]:
    """`TERM,USR1` (or `SIGTERM,SIGUSR1`; empty: none) -> the signals; an unknown name is the user's error."""
    names = [part.strip().upper() for part in (text or "").split(",") if part.strip()]
    found = []
    for name in names:
        full = name if name.startswith("SIG") else f"SIG{name}"
        if full in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, full):
            raise UserError(f"--preempt_signals: {name} is no signal a process can catch; give names such as "
                            f"TERM,USR1,USR2 (or an empty string for none)")
        found.append(signal.Signals[full])
    return found


class Preemption:
    """Catches the given signals (they only set a flag) and answers, collectively, whether any rank got one.

    `should_stop` is a collective when `distributed`: every rank must call it at the same points. It
    all-reduces one integer on the CPU (through `group`: gloo next to nccl), so all ranks take the same
    decision at the same iteration and none is left waiting in a collective."""

    def __init__(self, signals, distributed: bool = False, group=None):
        self.signals = list(signals)
        self.distributed, self.group = distributed, group
        self.received: signal.Signals | None = None  # by this process
        self.decided: signal.Signals | None = None  # by any rank, as the last should_stop agreed
        self._previous: dict = {}

    def install(self) -> Preemption:
        """Catch the signals (Python allows it in the main thread only: elsewhere, e.g. a run started from a
        thread, nothing is caught)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # Repeats change nothing: a signal may come from SLURM and from torchrun's agent both. A run that
        # does not stop is ended by the launcher's SIGKILL after its grace period.
        if self.received is None:
            self.received = signal.Signals(signum)

    def should_stop(self) -> bool:
        """Whether any rank got a stop signal; `decided` then holds it (the highest number where ranks got
        different ones) on every rank."""
        flag = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int32)
        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        value = int(flag.item())
        self.decided = signal.Signals(value) if value else None
        return self.decided is not None


def requeue_slurm_job(received, env=None, run=subprocess.run) -> str | None:
    """Put this SLURM batch job back into the queue when it may be requeued (Requeue=1: `sbatch --requeue`
    or the cluster's JobRequeue=1) and the signal was not SIGTERM. Returns what was done, None outside a
    SLURM job."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job:
        return None
    if received in NO_REQUEUE:
        return f"SLURM job {job} not requeued ({received.name} ends the job; scancel and pre-emption send it)"
    try:
        shown = run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"SLURM job {job} not requeued: scontrol is not available ({err})"
    fields = dict(part.split("=", 1) for part in shown.stdout.split() if "=" in part)
    if fields.get("Requeue") != "1" or fields.get("BatchFlag") != "1":
        return f"SLURM job {job} not requeued: it is no batch job submitted with requeue allowed (sbatch --requeue)"
    done = run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return f"SLURM job {job} not requeued: scontrol requeue failed ({(done.stderr or done.stdout).strip()})"
    return f"SLURM job {job} requeued: it starts again and resumes from the checkpoint"
