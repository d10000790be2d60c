"""Commands side by side on this machine: each starts when the commands it needs succeeded and enough
slots (GPUs, or shares of the CPU) are free, runs in its own process group with its own log file, and
Ctrl-C (SIGINT) or SIGTERM ends every group before returning. One live status line (tqdm)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

# Seconds a stopped command gets between SIGTERM (it may save its state) and SIGKILL.
STOP_GRACE_S = 30.0


@dataclass
class Job:
    """One command of a campaign: `deps` are keys of jobs that must succeed first."""

    key: int
    label: str
    log: Path
    deps: list[int] = field(default_factory=list)
    status: str = "queued"  # queued | running | ok | failed | blocked | interrupted
    detail: str = ""
    slots: list = field(default_factory=list)
    started: float | None = None
    ended: float | None = None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the campaign dies, even by SIGKILL (Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ParallelRunner:
    """Run `jobs` on `slots` (GPU ids, or None per CPU share), `per_job` slots each.

    `launch(job, slots)` returns the (command, environment) of a job when it starts (so each gets its own
    GPUs and rendezvous port); `seconds_left(job)` estimates the time a queued or running job still needs
    (None: unknown) for the status line.
    """

    def __init__(self, jobs: list[Job], slots: list, per_job: int,
                 launch: Callable[[Job, list], tuple[list[str], dict]],
                 seconds_left: Callable[[Job], float | None] = lambda job: None,
                 poll_s: float = 0.5, stop_grace_s: float = STOP_GRACE_S):
        self.jobs = jobs
        self.free = list(slots)
        self.width = max(1, len(slots) // per_job)  # jobs at once
        self.per_job = per_job
        self.launch = launch
        self.seconds_left = seconds_left
        self.poll_s = poll_s
        self.stop_grace_s = stop_grace_s
        self.running: dict[int, tuple[Job, subprocess.Popen, object]] = {}
        self.signals: list[int] = []
        self.started_count = 0

    # ------------------------------------------------------------------ events
    def _say(self, text: str) -> None:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    def _start(self, job: Job) -> None:
        job.slots, self.free = self.free[:self.per_job], self.free[self.per_job:]
        command, env = self.launch(job, job.slots)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log, "a", encoding="utf-8")
        job.started, job.status, job.detail = time.time(), "running", ""
        shown = {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_PORT") if k in env}
        log.write(f"=== started {_stamp(job.started)} {' '.join(f'{k}={v}' for k, v in shown.items())}\n"
                  f"=== command {subprocess.list2cmdline(command)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except OSError as err:
            log.close()
            self._finish(job, None, str(err))
            return
        self.running[job.key] = (job, proc, log)
        self.started_count += 1
        where = f" on GPU {','.join(map(str, job.slots))}" if any(s is not None for s in job.slots) else ""
        self._say(f"== [{self.started_count}/{len(self.jobs)}] started{where}: {job.label} (log {job.log})")

    def _finish(self, job: Job, code: int | None, error: str = "") -> None:
        job.ended = time.time()
        minutes = (job.ended - (job.started or job.ended)) / 60
        if job.key in self.running:
            _, proc, log = self.running.pop(job.key)
            _kill_group(proc.pid, signal.SIGKILL)  # stragglers of the group (e.g. torchrun workers)
            log.write(f"=== ended {_stamp(job.ended)} exit code {code}\n")
            log.close()
        self.free += job.slots
        if code == 0:
            job.status, job.detail = "ok", f"{minutes:.1f} min"
            self._say(f"== done: {job.label} ({job.detail})")
        else:
            job.status = "failed"
            job.detail = error or f"exit code {code} after {minutes:.1f} min"
            self._say(f"!! failed: {job.label}: {job.detail} (log {job.log}); the runs that need it will not run")

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def run(self) -> bool:
        """Run until every job ended or can never start; False when interrupted by SIGINT/SIGTERM
        (every job that was running is then stopped and marked interrupted)."""
        by_key = {job.key: job for job in self.jobs}
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=len(self.jobs), unit="run", dynamic_ncols=True, disable=None, file=sys.stderr,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}{postfix}]")
        try:
            while not self.signals:
                for job, proc, _ in list(self.running.values()):
                    code = proc.poll()
                    if code is not None:
                        self._finish(job, code)
                for job in self.jobs:
                    if job.status == "queued":
                        broken = [by_key[d] for d in job.deps if d in by_key and
                                  by_key[d].status in ("failed", "blocked")]
                        if broken:
                            job.status, job.detail = "blocked", f"needs {broken[0].label}"
                            self._say(f"-- not run: {job.label} (it needs {broken[0].label}, which failed)")
                for job in self.jobs:
                    if self.signals or len(self.free) < self.per_job:
                        break
                    if job.status == "queued" and all(by_key[d].status == "ok" for d in job.deps if d in by_key):
                        self._start(job)
                self._update(bar)
                if not self.running:
                    break  # nothing runs, so nothing queued can start any more
                self._sleep()
        finally:
            if self.running:
                self._stop_all()
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return not self.signals

    def _sleep(self) -> None:
        """poll_s, cut short by a signal (so Ctrl-C stops the runs at once)."""
        until = time.time() + self.poll_s
        while not self.signals and time.time() < until:
            time.sleep(0.02)

    def _update(self, bar) -> None:
        counts = {s: sum(j.status == s for j in self.jobs) for s in ("queued", "running", "ok", "failed", "blocked")}
        bar.n = counts["ok"] + counts["failed"] + counts["blocked"]
        left = self.estimate_left()
        eta = f", ~{left / 60:.1f} min left" if left is not None else ""
        bar.set_postfix_str(f"running {counts['running']}, queued {counts['queued']}, done {counts['ok']}, "
                            f"failed {counts['failed']}, not run {counts['blocked']}{eta}", refresh=False)
        bar.refresh()

    def estimate_left(self) -> float | None:
        """Work left spread over the jobs that run at once, never less than the longest single job left."""
        lefts = [self.seconds_left(j) for j in self.jobs if j.status in ("queued", "running")]
        if not lefts:
            return 0.0
        if any(x is None for x in lefts):
            return None
        return max(sum(lefts) / self.width, max(lefts))

    def _stop_all(self) -> None:
        """SIGTERM to every running group (a step may save its state), SIGKILL after the grace time."""
        self._say(f"stopping {len(self.running)} running run(s)")
        for _, proc, _ in self.running.values():
            _kill_group(proc.pid, signal.SIGTERM)
        deadline = time.time() + self.stop_grace_s
        while time.time() < deadline and any(p.poll() is None for _, p, _ in self.running.values()):
            time.sleep(0.1)
        for job, proc, log in list(self.running.values()):
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            self.running.pop(job.key)
            job.ended = time.time()
            job.status, job.detail = "interrupted", "stopped by a signal"
            log.write(f"=== ended {_stamp(job.ended)} interrupted\n")
            log.close()
            self.free += job.slots
