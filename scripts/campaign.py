"""Run a benchmark campaign: datasets x tasks x splits x methods x seeds, every step, step 0 shared.

    python scripts/campaign.py --data_root data --datasets vaihingen --tasks 4-1 3-1s 2-1s 1s \\
        --methods FT LWF LWF-MC ILT EWC RW PI MiB HCISS MiCro --seeds 1 2 3 [--nproc 2] [-- run.py options]

Methods whose step-0 training is identical (Method.step0_signature: same step-0 losses and state)
train step 0 once per (dataset, task, split, seed) under a shared name; their step 1 starts from it
through --step_ckpt. A step whose checkpoint and results row exist with the same options is skipped,
so the same command can be re-run after any failure (an interrupted step is re-run with the same
command line). Runs go one after the other, or side by side: `--parallel N` on the CPU, `--gpus 0,1,2,3`
(one run per `--gpus_per_run` GPUs), or as SLURM jobs with dependencies (`--slurm`). At the end the
tables (paper layout, per step, per class; mean ± std over seeds) are written as Markdown, LaTeX and CSV,
and the figures as PNG.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import tasks
from argparser import method_options, options_of_kind, parse_args, per_run_flags
from dataset.layout import DATASETS, dataset_dir, meta_file
from methods import METHODS, get_method_class
from utils import slurm
from utils.atomic_files import atomic_write
from utils.errors import UserError, exit_on_user_error
from utils.parallel_runs import Job, ParallelRunner
from utils.reporting.results import read_results
from utils.run_id import DEFAULT_SEED, RunId, effective_name, split_seed

ROOT = Path(__file__).resolve().parents[1]

# Options the campaign sets per run (Role.per_run): not allowed among the extra run.py options.
CAMPAIGN_OPTIONS = per_run_flags()
# Options that do not change what a step trains and tests (paths, logging, launch, resumption; Role kind
# "bookkeeping"), and the checkpoint a step starts from ("source": the campaign follows dependencies):
# a finished step whose other options match is done whatever these were.
DONE_CHECK_IGNORES = options_of_kind("bookkeeping", "source")


@dataclass
class Run:
    """One step training of one (dataset, split, task, seed) chain."""

    index: int
    dataset: str
    split: str
    task: str
    seed: int
    method: str  # --method given to run.py
    name: str  # --name given to run.py
    step: int
    users: list[str]  # the campaign's methods whose results depend on this run
    deps: list[int] = field(default_factory=list)
    step_ckpt: str | None = None
    argv: list[str] = field(default_factory=list)  # run.py options
    opts: dict = field(default_factory=dict)  # parsed, for the done check
    effective: str = ""  # the name run.py writes under (with -s<seed>)
    status: str = "todo"  # todo | done | ok | failed | blocked (| queued | running: SLURM jobs)
    detail: str = ""

    @property
    def overlap(self) -> bool:
        return self.split == "overlap"

    @property
    def run_id(self) -> RunId:
        return RunId.from_run_name(self.dataset, self.task, "-ov" if self.overlap else "", self.effective)

    @property
    def shared(self) -> bool:
        return len(self.users) > 1

    def describe(self) -> str:
        who = f"{self.name} ({', '.join(self.users)})" if self.shared else self.name
        return f"{self.dataset} {self.task} {self.split} seed {self.seed} step {self.step}: {who}"


# run.py's line after every epoch: "epoch 3/40: total 0.1234, ... (12.3s, lr 1.00e-02)"
EPOCH_LINE = re.compile(r"^epoch \d+/\d+: .*\((\d+(?:\.\d+)?)s, lr ", re.M)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="campaign.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=doc[0] + "\n\n" + doc[1] + "\n\n" + doc[2],
        epilog="Everything after `--` goes to every run.py call (e.g. --batch_size 12 --epochs 40 "
               "--checkpoint_dir ckpt --results_dir res). See docs/campaign.md.")
    parser.add_argument("--data_root", default="data", help="processed data root (default: data)")
    parser.add_argument("--datasets", nargs="+", default=["vaihingen"],
                        help=f"datasets: built in {', '.join(sorted(DATASETS))}, or processed from a spec "
                             f"into --data_root (default: vaihingen)")
    parser.add_argument("--tasks", nargs="+", default=["4-1", "3-1s", "2-1s", "1s"],
                        help="tasks of the datasets or of --task_file (default: 4-1 3-1s 2-1s 1s)")
    parser.add_argument("--task_file", default=None, help="JSON task file, passed to every run (run.py --task_file)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods (default: all registered)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[DEFAULT_SEED],
                        help=f"--random_seed of the runs (default: {DEFAULT_SEED}); names get -s<seed> "
                             f"unless it is {DEFAULT_SEED}")
    parser.add_argument("--name", default=None,
                        help="experiment name instead of the method name (one method only)")
    parser.add_argument("--overlap", action="store_true", help="overlapped split only (same as --splits overlap)")
    parser.add_argument("--splits", nargs="+", choices=["disjoint", "overlap"], default=None,
                        help="splits to run (default: disjoint)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run; > 1 launches torchrun (--batch_size is per process)")
    parser.add_argument("--no_share", action="store_true", help="every method trains its own step 0")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and exit")
    parser.add_argument("--emit_commands", default=None, metavar="FILE",
                        help="write the commands of the steps still to do, one per line in dependency order "
                             "(each line's trailing comment names the lines it needs), and exit")
    parser.add_argument("--out", default=None,
                        help="the campaign's folder: tables, figures, run logs, SLURM job list "
                             "(default: <results_dir>/campaign)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for run.py (default: this one)")
    side = parser.add_argument_group("runs side by side (default: one after the other)")
    side.add_argument("--parallel", type=int, default=1, metavar="N",
                      help="CPU: N runs at once, the cores shared out (OMP_NUM_THREADS = cores / N per run)")
    side.add_argument("--gpus", default=None, metavar="IDS",
                      help="GPUs to use, e.g. 0,1,2,3 or all: a run starts as soon as --gpus_per_run of them "
                           "are free (CUDA_VISIBLE_DEVICES, own rendezvous port)")
    side.add_argument("--gpus_per_run", type=int, default=1, metavar="K",
                      help="GPUs (= processes) per run with --gpus or --slurm; K > 1 launches torchrun (default 1)")
    cluster = parser.add_argument_group("SLURM (see docs/campaign.md)")
    cluster.add_argument("--slurm", action="store_true",
                         help="submit every step still to do as an sbatch job (afterok on the step it starts "
                              "from); re-running submits only what is not queued, running or done")
    cluster.add_argument("--slurm_args", default="", metavar="'ARGS'",
                         help="sbatch options for every job, e.g. '--partition gpu --time 12:00:00 --account x'")
    cluster.add_argument("--slurm_signal", default="USR1@180", metavar="SIG@S",
                         help="signal the step gets S seconds before its time limit (sbatch --signal B:SIG@S; "
                              "default USR1@180); jobs are submitted with --requeue")
    cluster.add_argument("--wait", action="store_true",
                         help="with --slurm: follow the jobs until none is queued or running, then report "
                              "and write the tables")
    cluster.add_argument("--poll_s", type=float, default=15.0, help=argparse.SUPPRESS)
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _check_extra(extra: list[str]) -> tuple[list[str], bool, str | None]:
    """Refuse the options the campaign sets per run; `--overlap` and `--name` among them are taken as
    the campaign's (the split; the experiment name)."""
    overlap, experiment, kept = False, None, []
    args = iter(extra)
    for arg in args:
        if arg in ("--overlap", "--overlapped"):
            overlap = True
            continue
        if arg == "--name" or arg.startswith("--name="):
            experiment = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            continue
        name = arg.split("=", 1)[0]
        if name in CAMPAIGN_OPTIONS:
            raise UserError(f"{name} is set by the campaign for every run; use the campaign's own options "
                            f"(--datasets --tasks --methods --seeds --data_root) instead of passing it after --")
        kept.append(arg)
    return kept, overlap, experiment


def _seed_in_name_by_parser() -> bool:
    """Whether run.py itself appends -s<seed> to --name (then the campaign passes the plain name)."""
    return parse_args(["--name", "x", "--random_seed", str(DEFAULT_SEED + 1)]).name != "x"


def _comparable(opts) -> dict:
    return json.loads(json.dumps(vars(opts), default=str))


def _signature_name(signature: str) -> str:
    return "step0-" + hashlib.sha1(signature.encode()).hexdigest()[:8]


def _method_name(name: str) -> str:
    try:
        return get_method_class(name).name
    except UserError as err:
        raise err.reworded(method=f"--methods value {name!r}") from None


class Campaign:
    def __init__(self, opts, extra: list[str]):
        self.opts = opts
        self.extra = extra
        self.methods = [_method_name(m) for m in opts.methods]
        for flag, values in (("--methods", self.methods), ("--datasets", opts.datasets), ("--tasks", opts.tasks),
                             ("--seeds", opts.seeds), ("--splits", opts.splits or [])):
            if len(set(values)) != len(values):
                raise UserError(f"{flag} lists a value twice: {' '.join(map(str, values))}")
        if opts.name and len(self.methods) != 1:
            raise UserError(f"--name {opts.name} names the runs of one method; give one --methods or no --name")
        if opts.name and split_seed(opts.name)[0] != opts.name:
            raise UserError(f"--name {opts.name} ends like a seed suffix (-s<digits>); choose another name")
        for dataset in opts.datasets:
            tasks.prepare(dataset, opts.data_root, opts.task_file)  # UserError for an unknown dataset or bad file
            for task in opts.tasks:
                tasks.num_steps(dataset, task)  # UserError for an unknown task
        if opts.nproc < 1:
            raise UserError(f"--nproc must be >= 1 (got {opts.nproc})")
        self.name_by_parser = _seed_in_name_by_parser()
        probe = parse_args(self.extra)  # UserError / exit for a bad extra option, before anything runs
        self.checkpoint_dir = probe.checkpoint_dir
        self.results_dir = probe.results_dir
        self.out = Path(opts.out) if opts.out else Path(self.results_dir) / "campaign"
        self.on_cpu = probe.device == "cpu"
        self.slots, self.nproc = self._slots()
        self.runs: list[Run] = []
        self.sharing: dict[tuple, list[list[str]]] = {}
        self.plan()

    def _slots(self) -> tuple[list, int]:
        """(slots of this machine: GPU ids or one None per CPU share; processes per run)."""
        o = self.opts
        if o.parallel < 1:
            raise UserError(f"--parallel must be >= 1 (got {o.parallel})")
        if o.gpus_per_run < 1:
            raise UserError(f"--gpus_per_run must be >= 1 (got {o.gpus_per_run})")
        if o.slurm and (o.gpus or o.parallel > 1):
            raise UserError("--gpus and --parallel share out this machine; with --slurm the cluster places the "
                            "jobs (GPUs per job: --gpus_per_run)")
        if o.wait and not o.slurm:
            raise UserError("--wait follows SLURM jobs; add --slurm (without it the campaign runs the steps itself)")
        if o.gpus_per_run > 1 and o.nproc not in (1, o.gpus_per_run):
            raise UserError(f"--nproc {o.nproc} and --gpus_per_run {o.gpus_per_run} disagree: a run has one "
                            f"process per GPU; give --gpus_per_run only")
        if not o.gpus:
            if o.gpus_per_run > 1 and not o.slurm:
                raise UserError("--gpus_per_run is for --gpus or --slurm; for one run on several processes "
                                "give --nproc")
            if o.slurm and not self.on_cpu:
                return [], o.gpus_per_run if o.gpus_per_run > 1 else o.nproc
            return [None] * o.parallel, o.nproc
        if o.parallel > 1:
            raise UserError("--parallel shares out the CPU; with --gpus the runs share out the GPUs: give one of them")
        if self.on_cpu:
            raise UserError("--gpus with --device cpu after --: drop one of them")
        if o.gpus == "all":
            import torch
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v.strip() for v in visible.split(",") if v.strip()][:count] if visible else \
                [str(i) for i in range(count)]
            if not ids:
                raise UserError("--gpus all: torch sees no GPU here; list the GPUs (--gpus 0,1) or use --parallel N "
                                "on the CPU")
        else:
            ids = [v.strip() for v in o.gpus.split(",") if v.strip()]
            if not ids or len(set(ids)) != len(ids):
                raise UserError(f"--gpus {o.gpus}: give distinct GPU ids separated by commas (0,1,2,3) or all")
        if len(ids) < o.gpus_per_run:
            raise UserError(f"--gpus_per_run {o.gpus_per_run} needs at least that many GPUs; --gpus gives {len(ids)}")
        return ids, o.gpus_per_run

    # ---------------------------------------------------------------- planning
    def _args(self, dataset, split, task, seed, method, name, step, step_ckpt=None) -> list[str]:
        passed = name if self.name_by_parser else effective_name(name, seed)
        args = ["--data_root", self.opts.data_root, "--dataset", dataset, "--task", task, "--step", str(step),
                "--method", method, "--name", passed, "--random_seed", str(seed)]
        if split == "overlap":
            args.append("--overlap")
        if self.opts.task_file:
            args += ["--task_file", self.opts.task_file]
        if step_ckpt:
            args += ["--step_ckpt", step_ckpt]
        return args + self.extra

    def _add(self, **kwargs) -> Run:
        run = Run(index=len(self.runs) + 1, **kwargs)
        run.argv = self._args(run.dataset, run.split, run.task, run.seed, run.method, run.name, run.step,
                              run.step_ckpt)
        parsed = parse_args(run.argv)
        run.opts = _comparable(parsed)
        run.effective = parsed.name
        self.runs.append(run)
        return run

    def share_groups(self, dataset, split, task) -> list[list[str]]:
        """The campaign's methods grouped by step-0 signature (first-seen order)."""
        groups: dict[str, list[str]] = {}
        for method in self.methods:
            args = self._args(dataset, split, task, DEFAULT_SEED, method, method, 0)
            signature = get_method_class(method).step0_signature(method_options(parse_args(args)))
            groups.setdefault(signature if not self.opts.no_share else method, []).append(method)
        return list(groups.values())

    def _canonical_trainer(self, dataset, split, task, group: list[str]) -> tuple[str, str]:
        """(method, shared name) of a shared step 0: the first registered method with the group's
        signature, so the shared run is the same whichever of the group's methods a campaign lists."""
        def signature(method):
            args = self._args(dataset, split, task, DEFAULT_SEED, method, method, 0)
            return get_method_class(method).step0_signature(method_options(parse_args(args)))

        wanted = signature(group[0])
        trainer = next((m for m in METHODS if signature(m) == wanted), group[0])
        return trainer, _signature_name(wanted)

    def plan(self) -> None:
        splits = self.opts.splits or (["overlap"] if self.opts.overlap else ["disjoint"])
        for dataset in self.opts.datasets:
            for task in self.opts.tasks:
                n_steps = tasks.num_steps(dataset, task)
                for split in splits:
                    groups = self.share_groups(dataset, split, task)
                    self.sharing[(dataset, task, split)] = groups
                    for seed in self.opts.seeds:
                        for group in groups:
                            shared = None
                            if len(group) > 1 and n_steps > 1:
                                method, name = self._canonical_trainer(dataset, split, task, group)
                                shared = self._add(dataset=dataset, split=split, task=task, seed=seed, method=method,
                                                   name=name, step=0, users=list(group))
                            for method in group:
                                previous = shared
                                for step in range(1 if shared else 0, n_steps):
                                    step_ckpt = None
                                    if previous is shared and shared is not None:
                                        step_ckpt = str(shared.run_id.checkpoint(self.checkpoint_dir, 0))
                                    run = self._add(dataset=dataset, split=split, task=task, seed=seed,
                                                    method=method, name=self.opts.name or method, step=step,
                                                    users=[method], deps=[previous.index] if previous else [],
                                                    step_ckpt=step_ckpt)
                                    previous = run
        self.mark_done()

    # ---------------------------------------------------------------- what is done
    def paths(self, run: Run) -> tuple[Path, Path]:
        return run.run_id.checkpoint(self.checkpoint_dir, run.step), run.run_id.results(self.results_dir)

    def finished(self, run: Run) -> tuple[bool, str]:
        """Checkpoint and results row exist and the recorded options match the planned ones."""
        ckpt, csv_path = self.paths(run)
        if not ckpt.is_file():
            return False, "no checkpoint"
        json_path = csv_path.with_suffix(".json")
        if not csv_path.is_file() or not json_path.is_file():
            return False, "no results"
        try:
            rows = {row["step"]: row for row in read_results(csv_path)}
            recorded = json.loads(json_path.read_text(encoding="utf-8"))["steps"][str(run.step)]["options"]
        except (UserError, OSError, ValueError, KeyError, TypeError):
            return False, "no results row"
        if run.step not in rows:
            return False, "no results row"
        differ = sorted(k for k in run.opts.keys() & recorded.keys()
                        if k not in DONE_CHECK_IGNORES and run.opts[k] != recorded[k])
        if differ:
            return False, "options differ: " + ", ".join(f"{k} {recorded[k]!r} -> {run.opts[k]!r}" for k in differ[:4])
        return True, ""

    def mark_done(self) -> None:
        """A run is done when it finished and so did every run it needs, none of them more recently."""
        by_index = {r.index: r for r in self.runs}
        for run in self.runs:
            done, why = self.finished(run)
            if done:
                for dep in (by_index[i] for i in run.deps):
                    if dep.status != "done":
                        done, why = False, f"needs run {dep.index}"
                    elif self.paths(dep)[0].stat().st_mtime > self.paths(run)[0].stat().st_mtime:
                        done, why = False, f"run {dep.index} was trained again after it"
            run.status, run.detail = ("done", "") if done else ("todo", why)

    # ---------------------------------------------------------------- commands
    def command(self, run: Run, port: int | None = None) -> list[str]:
        """run.py's command line; with a `port` torchrun's rendezvous is on that port of this machine."""
        script = os.path.relpath(ROOT / "run.py")
        if script.startswith(".."):
            script = str(ROOT / "run.py")
        if self.nproc > 1:
            where = ["--standalone"] if port is None else \
                ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
            return [self.opts.python, "-m", "torch.distributed.run", *where,
                    f"--nproc_per_node={self.nproc}", script, *run.argv]
        return [self.opts.python, script, *run.argv]

    def log_path(self, run: Run, folder: str = "logs") -> Path:
        return run.run_id.step_log(self.out / folder, run.step)

    def estimate_iterations(self) -> tuple[int, int] | None:
        """(iterations of the plan, iterations without step-0 sharing) from meta.json's split sizes."""
        total = unshared = 0
        for run in self.runs:
            meta_path = meta_file(dataset_dir(self.opts.data_root, run.dataset))
            try:
                sizes = json.loads(meta_path.read_text(encoding="utf-8"))["split"]["sizes"]
                crops = sizes[run.task + ("-ov" if run.overlap else "")][run.step]
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                return None
            iters = run.opts["epochs"] * (crops // (run.opts["batch_size"] * self.nproc))
            total += iters
            unshared += iters * len(run.users)
        return total, unshared

    def print_plan(self, verbose: bool) -> None:
        o = self.opts
        print(f"campaign: {len(o.datasets)} dataset(s) x {len(o.tasks)} task(s) x "
              f"{len(self.sharing) // max(1, len(o.datasets) * len(o.tasks))} split(s) x {len(self.methods)} "
              f"method(s) x {len(o.seeds)} seed(s)")
        for (dataset, task, split), groups in self.sharing.items():
            shared = [g for g in groups if len(g) > 1 and tasks.num_steps(dataset, task) > 1]
            own = [g[0] for g in groups if g not in shared]
            text = "; ".join(f"shared by {', '.join(g)}" for g in shared) or "nothing shared"
            print(f"  step 0 of {dataset} {task} {split}: {text}" + (f"; own: {', '.join(own)}" if own else ""))
        step0 = sum(r.step == 0 for r in self.runs)
        unshared = sum(len(r.users) for r in self.runs)
        todo = [r for r in self.runs if r.status == "todo"]
        print(f"step trainings: {len(self.runs)} ({step0} of step 0, {len(self.runs) - step0} later); "
              f"{unshared} without step-0 sharing; {len(self.runs) - len(todo)} done, {len(todo)} to run")
        estimate = self.estimate_iterations()
        if estimate:
            total, unshared_iters = estimate
            saved = 100 * (1 - total / unshared_iters) if unshared_iters else 0.0
            print(f"training iterations (from {o.data_root}/<dataset>/meta.json split sizes): {total} "
                  f"vs {unshared_iters} without sharing ({saved:.1f} % saved)")
        if verbose:
            for run in self.runs:
                after = f" after {run.deps[0]}" if run.deps else ""
                why = f" ({run.detail})" if run.status == "todo" and run.detail not in ("", "no checkpoint") else ""
                print(f"  [{run.index:>3}] {run.status:<5} {run.describe()}{after}{why}")

    def emit(self, path) -> int:
        todo = [r for r in self.runs if r.status == "todo"]
        lines = [f"# {len(todo)} step trainings of a campaign, in dependency order; run from {os.getcwd()}",
                 "# each line's comment: [its number] after [the numbers it needs] (done ones are left out)"]
        for run in todo:
            needs = [d for d in run.deps if self.runs[d - 1].status == "todo"]
            after = f" after {' '.join(f'[{d}]' for d in needs)}" if needs else ""
            lines.append(f"{shlex.join(self.command(run))}  # [{run.index}]{after} {run.describe()}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(todo)} commands to {path}")
        return len(todo)

    # ---------------------------------------------------------------- running
    def execute(self) -> int:
        """Train every step to do on this machine's slots (one after the other with one slot)."""
        todo = [r for r in self.runs if r.status == "todo"]
        jobs = [Job(key=r.index, label=r.describe(), log=self.log_path(r), deps=list(r.deps)) for r in todo]
        by_key = {r.index: r for r in self.runs}
        runner = ParallelRunner(jobs, self.slots, self.nproc if self.slots[0] is not None else 1, self._launch,
                                seconds_left=lambda job: self.seconds_left(by_key[job.key], job))
        if len(self.slots) > 1:
            what = f"GPUs {','.join(self.slots)}" if self.slots[0] is not None else \
                f"{len(self.slots)} CPU shares of {self.threads_per_run()} thread(s)"
            print(f"running up to {runner.width} at once on {what}; logs in {self.out / 'logs'}", flush=True)
        start = time.time()
        finished = runner.run()
        for job in jobs:
            run = by_key[job.key]
            if job.status in ("ok", "failed", "blocked"):
                run.status, run.detail = job.status, job.detail
            elif job.status == "interrupted":
                run.status, run.detail = "failed", "interrupted"
        self.report(time.time() - start)
        if not finished:
            print("interrupted: run the same command again to continue", flush=True)
            return 130
        return 1 if any(r.status == "failed" for r in self.runs) else 0

    def threads_per_run(self) -> int:
        from utils.distributed import available_cpus
        return max(1, available_cpus() // max(1, len(self.slots) * (self.nproc if self.slots[0] is None else 1)))

    def _launch(self, job: Job, slots: list) -> tuple[list[str], dict]:
        run = self.runs[job.key - 1]
        env = dict(os.environ)
        if len(self.slots) > 1 or slots[0] is not None:  # side by side: each run its share of the cores
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads_per_run())
        if slots[0] is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
        port = None
        if self.nproc > 1 and (len(self.slots) > 1 or slots[0] is not None):
            port = self._free_port()
            env["MASTER_PORT"] = str(port)
        return self.command(run, port), env

    def _free_port(self) -> int:
        """A port nobody listens on, not one handed to a run that is still starting."""
        used = getattr(self, "_ports", set())
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in used:
                self._ports = used | {port}
                return port

    def seconds_left(self, run: Run, job: Job) -> float | None:
        """Epochs left times the mean epoch time logged so far by steps like it (same dataset, task and step
        when there are any, else any step); None before any epoch time is known."""
        times = self._epoch_times()
        like = times.get((run.dataset, run.task, run.step)) or [t for ts in times.values() for t in ts]
        if not like:
            return None
        epochs = run.opts["epochs"]
        done = len(self._epochs_logged(self.log_path(run))) if job.status == "running" else 0
        return max(epochs - done, 0) * sum(like) / len(like)

    def _epoch_times(self) -> dict[tuple, list[float]]:
        times = {}
        for run in self.runs:
            seconds = self._epochs_logged(self.log_path(run))
            if seconds:
                times.setdefault((run.dataset, run.task, run.step), []).extend(seconds)
        return times

    def _epochs_logged(self, path: Path) -> list[float]:
        """Epoch times of a log file (of the last attempt); cached by file size."""
        cache = self.__dict__.setdefault("_epoch_cache", {})
        try:
            size = path.stat().st_size
        except OSError:
            return []
        if cache.get(path, (None,))[0] != size:
            text = path.read_text(encoding="utf-8", errors="replace").rsplit("=== started", 1)[-1]
            cache[path] = (size, [float(m) for m in EPOCH_LINE.findall(text)])
        return cache[path][1]

    def report(self, seconds: float) -> None:
        counts = {s: sum(r.status == s for r in self.runs) for s in ("ok", "done", "failed", "blocked")}
        print(f"\ncampaign finished in {seconds / 60:.1f} min: {counts['ok']} trained, {counts['done']} already "
              f"done, {counts['failed']} failed, {counts['blocked']} not run (they need a failed run)")
        failed = [r for r in self.runs if r.status == "failed"]
        if failed:
            print("failed runs (re-run the campaign, or one of these commands, after fixing the cause):")
            for run in failed:
                log = f" (log {self.log_path(run)})" if self.log_path(run).is_file() else ""
                print(f"  [{run.index}] {run.describe()}: {run.detail}{log}\n      {shlex.join(self.command(run))}")

    def lock(self):
        """An exclusive lock on the campaign's folder: two campaigns never train or submit the same steps."""
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / ".campaign.lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"another campaign ({holder}) is running with the folder {self.out}; wait for it to "
                            f"end (or stop it with Ctrl-C) before running this one") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    # ---------------------------------------------------------------- SLURM
    @property
    def state_path(self) -> Path:
        return self.out / "slurm_jobs.json"

    def load_state(self) -> dict:
        if not self.state_path.is_file():
            return {"jobs": {}}
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            assert isinstance(state.get("jobs"), dict)
            return state
        except (OSError, ValueError, AssertionError) as err:
            raise UserError(f"cannot read the campaign's job list {self.state_path} ({err}); cancel the campaign's "
                            f"jobs (squeue -u $USER) and remove that file") from None

    def save_state(self, state: dict) -> None:
        atomic_write(self.state_path, lambda f: f.write(json.dumps(state, indent=1) + "\n"), binary=False)

    @staticmethod
    def run_key(run: Run) -> str:
        return f"{run.dataset}/{run.task}/{run.split}/{run.effective}/step{run.step}"

    @staticmethod
    def job_name(run: Run) -> str:
        who = "+".join(run.users) if run.shared else run.name
        return f"{run.dataset}.{run.task}.{run.split}.{who}.s{run.seed}.step{run.step}"

    def job_script(self, run: Run) -> str:
        """One process: exec'd, so it gets --slurm_signal itself. torchrun: the signal is passed on to its
        workers (torchrun would die of it)."""
        head = ["#!/bin/bash", f"# {run.describe()} (written by scripts/campaign.py --slurm)",
                "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}",
                'echo "=== started $(date +%Y-%m-%dT%H:%M:%S) job $SLURM_JOB_ID on $(hostname)'
                ' (restart ${SLURM_RESTART_COUNT:-0})"']
        command = shlex.join(self.command(run))
        if self.nproc == 1:
            return "\n".join([*head, "exec " + command, ""])
        signal_name = (self.opts.slurm_signal or "none").split("@")[0]
        forward = [f"trap 'pkill -{signal_name} -P $child' {signal_name}"] if signal_name != "none" else []
        return "\n".join([*head, command + " &", "child=$!", *forward, 'wait "$child"; status=$?',
                          'while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done',
                          'exit "$status"', ""])

    def sbatch_options(self, run: Run, after: list[str]) -> list[str]:
        log = self.out.resolve() / "slurm" / f"{self.log_path(run).stem}_%j.log"
        options = [f"--job-name={self.job_name(run)}", f"--output={log}", "--open-mode=append",
                   f"--chdir={os.getcwd()}", "--nodes=1", "--ntasks=1", "--requeue", "--kill-on-invalid-dep=yes"]
        if self.opts.slurm_signal and self.opts.slurm_signal != "none":
            options.append(f"--signal=B:{self.opts.slurm_signal}")
        if not self.on_cpu:
            options.append(f"--gres=gpu:{self.nproc}")
        if after:
            options.append("--dependency=afterok:" + ":".join(after))
        return options + shlex.split(self.opts.slurm_args)  # last: the user's options win

    def active_jobs(self) -> dict[str, slurm.JobState]:
        """Queued or running jobs of this campaign's job list (by run key); none without a job list."""
        if not self.state_path.is_file():
            return {}
        jobs = self.load_state()["jobs"]
        known = slurm.job_states(e["job_id"] for e in jobs.values())
        return {key: known[e["job_id"]] for key, e in jobs.items()
                if e["job_id"] in known and known[e["job_id"]].active}

    def submit(self) -> int:
        """sbatch every step to do that has no queued or running job; returns the number submitted."""
        (self.out / "slurm").mkdir(parents=True, exist_ok=True)
        state = self.load_state()
        jobs = state["jobs"]
        known = slurm.job_states(e["job_id"] for e in jobs.values())
        job_of: dict[int, str] = {}  # run index -> its queued, running or new job
        remade: set[int] = set()
        submitted = 0
        for run in self.runs:
            if run.status == "done":
                continue
            key = self.run_key(run)
            entry = jobs.get(key)
            info = known.get(entry["job_id"]) if entry else None
            command = shlex.join(self.command(run))
            if info is not None and info.active:
                if entry.get("command") != command:
                    why = f"job {entry['job_id']} cancelled: the step's options changed"
                elif any(d in remade for d in run.deps):
                    why = f"job {entry['job_id']} cancelled: a step it needs is trained again"
                else:
                    job_of[run.index] = entry["job_id"]
                    continue
                slurm.cancel([entry["job_id"]])
            elif entry is not None:
                why = f"job {entry['job_id']} {self._ended(info)}"
            else:
                why = ""
            after = [job_of[d] for d in run.deps if d in job_of]
            job_id = slurm.submit(self.job_script(run), self.sbatch_options(run, after))
            history = (entry or {}).get("history", []) + ([{"job_id": entry["job_id"], "end": why}] if entry else [])
            jobs[key] = {"job_id": job_id, "job_name": self.job_name(run), "run": run.describe(), "command": command,
                         "after": after,
                         "log": str(self.out.resolve() / "slurm" / f"{self.log_path(run).stem}_{job_id}.log"),
                         "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "history": history}
            self.save_state(state)  # at once: an interruption never loses a submitted job's id
            job_of[run.index] = job_id
            remade.add(run.index)
            submitted += 1
            again = f" (again: {why})" if why else ""
            wait = f" after {' '.join(after)}" if after else ""
            print(f"submitted job {job_id}{wait}: {run.describe()}{again}", flush=True)
        waiting = sum(1 for r in self.runs if r.status != "done") - submitted
        print(f"SLURM: {submitted} job(s) submitted, {waiting} already queued or running; job list {self.state_path}",
              flush=True)
        return submitted

    @staticmethod
    def _ended(info: slurm.JobState | None) -> str:
        if info is None:
            return "ended (SLURM no longer knows it) without finishing the step"
        if info.reason == slurm.DEPENDENCY_FAILED:
            return "not run: a job it needs failed"
        return f"{info.state.lower()} (exit code {info.exit_code})" if info.exit_code else info.state.lower()

    def follow(self, wait: bool) -> int:
        """State of the submitted steps (until none is queued or running with `wait`); report; tables when all
        are done."""
        state = self.load_state()
        jobs = state["jobs"]
        pending = [r for r in self.runs if r.status != "done"]
        bar = tqdm(total=len(pending), unit="job", dynamic_ncols=True, disable=None if wait else True)
        start, shown = time.time(), {}
        while True:
            open_runs = [r for r in pending if r.status not in ("ok", "failed", "blocked")]
            known = slurm.job_states(jobs[self.run_key(r)]["job_id"] for r in open_runs if self.run_key(r) in jobs)
            for run in open_runs:
                entry = jobs.get(self.run_key(run), {})
                info = known.get(entry.get("job_id"))
                if info is not None:
                    entry.update(state=info.state, start=info.start_time, end=info.end_time)
                if info is not None and info.active:
                    run.status = "running" if info.state in ("RUNNING", "COMPLETING") else "queued"
                    run.detail = f"job {info.job_id} {info.state.lower()}" + (
                        f" ({info.reason})" if info.reason not in ("", "None") else "")
                elif self.finished(run)[0]:
                    run.status, run.detail = "ok", f"job {entry.get('job_id')}"
                elif info is not None and info.reason == slurm.DEPENDENCY_FAILED:
                    run.status, run.detail = "blocked", f"job {info.job_id} not run: a job it needs failed"
                else:
                    run.status, run.detail = "failed", f"job {entry.get('job_id')} {self._ended(info)}"
                if wait and shown.get(run.index) != run.status and run.status in ("running", "ok", "failed"):
                    tqdm.write(f"{run.status:<7} {run.describe()} ({run.detail})", file=sys.stdout)
                shown[run.index] = run.status
            counts = {s: sum(r.status == s for r in pending) for s in ("queued", "running", "ok", "failed", "blocked")}
            bar.n = counts["ok"] + counts["failed"] + counts["blocked"]
            bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in counts.items()), refresh=True)
            if not wait or not counts["queued"] + counts["running"]:
                break
            time.sleep(self.opts.poll_s)
        bar.close()
        self.save_state(state)
        return self.slurm_report(time.time() - start, counts)

    def slurm_report(self, seconds: float, counts: dict) -> int:
        done = sum(r.status == "done" for r in self.runs)
        print(f"\nSLURM campaign: {done + counts['ok']} of {len(self.runs)} steps done, {counts['running']} running, "
              f"{counts['queued']} queued, {counts['failed']} failed, {counts['blocked']} not run (they need a failed "
              f"step)" + (f"; followed for {seconds / 60:.1f} min" if self.opts.wait else ""))
        rerun = shlex.join([os.path.relpath(Path(__file__).resolve()), *self.argv])
        jobs = self.load_state()["jobs"]
        failed = [r for r in self.runs if r.status == "failed"]
        if failed:
            print("failed steps (their logs say why):")
            for run in failed:
                log = jobs.get(self.run_key(run), {}).get("log", "")
                print(f"  [{run.index}] {run.describe()}: {run.detail} (log {log})\n"
                      f"      {shlex.join(self.command(run))}")
        if failed or counts["blocked"]:
            print(f"after fixing the cause, resubmit the failed steps and those that need them with:\n  python {rerun}")
            return 1
        if counts["queued"] or counts["running"]:
            print(f"follow with `squeue -u {os.environ.get('USER', '$USER')}` and the logs in {self.out / 'slurm'}; "
                  f"run the same command again (add --wait to stay) to see where it stands and write the tables")
            return 0
        return 0

    def results_files(self) -> list[Path]:
        """Results CSVs of the campaign's methods (not the shared step-0 runs) that exist."""
        files = []
        for run in self.runs:
            path = self.paths(run)[1]
            if run.shared or not path.is_file() or path in files:
                continue
            try:
                read_results(path)
            except UserError as err:
                print(f"left out of the tables: {err}")
                continue
            files.append(path)
        return files

    def write_tables(self) -> None:
        from utils.reporting.figures import plot_per_class, plot_steps
        from utils.reporting.tables import collect, paper_tables, per_class_tables, to_markdown, write_tables

        files = self.results_files()
        if not files:
            print("no results yet: no tables written")
            return
        experiments = collect(files, tasks.num_steps_if_known, tasks.table_task_order())
        final = paper_tables(experiments, order=self.methods)
        tables = final + paper_tables(experiments, all_steps=True, order=self.methods) + \
            per_class_tables(experiments, order=self.methods)
        written = write_tables(tables, self.out, ["md", "latex", "csv"])
        figures = plot_steps(experiments, self.out / "figures", self.methods) + \
            plot_per_class(experiments, self.out / "figures", self.methods)
        print(f"\nwrote {len(written)} table files and {len(figures)} figures to {self.out}/")
        for table in final:
            print("\n" + to_markdown(table))


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = split_argv(argv)
    opts = build_parser().parse_args(own)
    extra, overlap, name = _check_extra(extra)
    opts.overlap = opts.overlap or overlap
    opts.name = opts.name or name
    campaign = Campaign(opts, extra)
    campaign.argv = argv
    campaign.print_plan(verbose=opts.dry_run or bool(opts.emit_commands))
    if opts.dry_run:
        return 0
    if opts.emit_commands:
        campaign.emit(opts.emit_commands)
        return 0
    lock = campaign.lock()  # held until this process ends, however it ends
    if opts.slurm:
        campaign.submit()
        lock.close()  # submitted: following the jobs needs no lock
        code = campaign.follow(wait=opts.wait)
        if all(r.status in ("done", "ok") for r in campaign.runs):
            campaign.write_tables()
        return code
    try:
        busy = campaign.active_jobs() if shutil.which("squeue") else {}
    except UserError as err:  # SLURM unreachable from here: its jobs cannot be checked
        print(f"warning: cannot check the campaign's SLURM jobs ({err})", flush=True)
        busy = {}
    if busy:
        raise UserError(f"{len(busy)} step(s) of this campaign are queued or running as SLURM jobs (e.g. "
                        f"{next(iter(busy))}): follow them with --slurm --wait, or cancel them (scancel) first")
    code = campaign.execute()
    if code != 130:  # not after Ctrl-C
        campaign.write_tables()
    return code


if __name__ == "__main__":
    sys.exit(main())
