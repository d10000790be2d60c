"""Run a benchmark campaign: datasets x tasks x splits x methods x seeds, every step, step 0 shared.

    python scripts/campaign.py --data_root data --datasets vaihingen --tasks 4-1 3-1s 2-1s 1s \\
        --methods FT LWF LWF-MC ILT EWC RW PI MiB HCISS MiCro --seeds 1 2 3 [--nproc 2] [-- run.py options]

Methods whose step-0 training is identical (Method.step0_signature: same step-0 losses and state)
train step 0 once per (dataset, task, split, seed) under a shared name; their step 1 starts from it
through --step_ckpt. A step whose checkpoint and results row exist with the same options is skipped,
so the same command can be re-run after any failure (an interrupted step is re-run with the same
command line). At the end the tables (paper layout, per step, per class; mean ± std over seeds) are
written as Markdown, LaTeX and CSV, and the figures as PNG.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tasks
from argparser import parse_args
from methods import METHODS, get_method_class
from utils.checkpoint import checkpoint_path
from utils.data_layout import DATASETS, dataset_dir, meta_file
from utils.errors import UserError, exit_on_user_error
from utils.result_tables import DEFAULT_SEED, effective_name, split_seed
from utils.results import read_results, results_path

ROOT = Path(__file__).resolve().parents[1]

# Options the campaign sets per run: not allowed among the extra run.py options.
CAMPAIGN_OPTIONS = ("--data_root", "--dataset", "--task", "--task_file", "--step", "--method", "--random_seed",
                    "--step_ckpt", "--test", "--ckpt", "--local_rank", "--local-rank")
# Options that do not change what a step trains and tests (paths, logging, launch, resumption):
# a finished step whose other options match is done whatever these were.
BOOKKEEPING_OPTIONS = {"command_line", "local_rank", "num_workers", "logdir", "print_interval", "sample_num",
                       "checkpoint_dir", "results_dir", "data_root", "step_ckpt", "ckpt", "test", "val_interval",
                       "no_resume", "resume", "device"}


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
    status: str = "todo"  # todo | done | ok | failed | blocked
    detail: str = ""

    @property
    def overlap(self) -> bool:
        return self.split == "overlap"

    @property
    def shared(self) -> bool:
        return len(self.users) > 1

    def describe(self) -> str:
        who = f"{self.name} ({', '.join(self.users)})" if self.shared else self.name
        return f"{self.dataset} {self.task} {self.split} seed {self.seed} step {self.step}: {who}"


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
                        help="folder for the tables and figures (default: <results_dir>/campaign)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for run.py (default: this one)")
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


class Campaign:
    def __init__(self, opts, extra: list[str]):
        self.opts = opts
        self.extra = extra
        self.methods = [get_method_class(m).name for m in opts.methods]
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
        self.runs: list[Run] = []
        self.sharing: dict[tuple, list[list[str]]] = {}
        self.plan()

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
            signature = get_method_class(method).step0_signature(parse_args(args))
            groups.setdefault(signature if not self.opts.no_share else method, []).append(method)
        return list(groups.values())

    def _canonical_trainer(self, dataset, split, task, group: list[str]) -> tuple[str, str]:
        """(method, shared name) of a shared step 0: the first registered method with the group's
        signature, so the shared run is the same whichever of the group's methods a campaign lists."""
        def signature(method):
            args = self._args(dataset, split, task, DEFAULT_SEED, method, method, 0)
            return get_method_class(method).step0_signature(parse_args(args))

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
                                        step_ckpt = str(checkpoint_path(self.checkpoint_dir, task, dataset,
                                                                        split == "overlap", shared.effective, 0))
                                    run = self._add(dataset=dataset, split=split, task=task, seed=seed,
                                                    method=method, name=self.opts.name or method, step=step,
                                                    users=[method], deps=[previous.index] if previous else [],
                                                    step_ckpt=step_ckpt)
                                    previous = run
        self.mark_done()

    # ---------------------------------------------------------------- what is done
    def paths(self, run: Run) -> tuple[Path, Path]:
        ckpt = checkpoint_path(self.checkpoint_dir, run.task, run.dataset, run.overlap, run.effective, run.step)
        csv_path = results_path(self.results_dir, run.dataset, run.task, run.overlap, run.effective)
        return ckpt, csv_path

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
                        if k not in BOOKKEEPING_OPTIONS and run.opts[k] != recorded[k])
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
    def command(self, run: Run) -> list[str]:
        script = os.path.relpath(ROOT / "run.py")
        if script.startswith(".."):
            script = str(ROOT / "run.py")
        if self.opts.nproc > 1:
            return [self.opts.python, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.opts.nproc}", script, *run.argv]
        return [self.opts.python, script, *run.argv]

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
            iters = run.opts["epochs"] * (crops // (run.opts["batch_size"] * self.opts.nproc))
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
        by_index = {r.index: r for r in self.runs}
        todo = [r for r in self.runs if r.status == "todo"]
        start = time.time()
        for n, run in enumerate(todo, 1):
            broken = [by_index[d] for d in run.deps if by_index[d].status in ("failed", "blocked")]
            if broken:
                run.status, run.detail = "blocked", f"needs run {broken[0].index}"
                continue
            print(f"\n== [{n}/{len(todo)}] {run.describe()} ==", flush=True)
            began, run.detail = time.time(), ""
            try:
                code = subprocess.call(self.command(run))
            except OSError as err:
                code, run.detail = -1, str(err)
            except KeyboardInterrupt:
                run.status, run.detail = "failed", "interrupted"
                self.report(time.time() - start)
                print("interrupted: run the same command again to continue", flush=True)
                return 130
            minutes = (time.time() - began) / 60
            if code == 0:
                run.status, run.detail = "ok", f"{minutes:.1f} min"
            else:
                run.status = "failed"
                run.detail = run.detail or f"exit code {code} after {minutes:.1f} min"
                print(f"!! run {run.index} failed ({run.detail}); independent runs continue", flush=True)
        self.report(time.time() - start)
        return 1 if any(r.status == "failed" for r in self.runs) else 0

    def report(self, seconds: float) -> None:
        counts = {s: sum(r.status == s for r in self.runs) for s in ("ok", "done", "failed", "blocked")}
        print(f"\ncampaign finished in {seconds / 60:.1f} min: {counts['ok']} trained, {counts['done']} already "
              f"done, {counts['failed']} failed, {counts['blocked']} not run (they need a failed run)")
        failed = [r for r in self.runs if r.status == "failed"]
        if failed:
            print("failed runs (re-run the campaign, or one of these commands, after fixing the cause):")
            for run in failed:
                print(f"  [{run.index}] {run.describe()}: {run.detail}\n      {shlex.join(self.command(run))}")

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
        from utils.result_figures import plot_per_class, plot_steps
        from utils.result_tables import collect, paper_tables, per_class_tables, to_markdown, write_tables

        files = self.results_files()
        if not files:
            print("no results yet: no tables written")
            return
        experiments = collect(files)
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
    campaign.print_plan(verbose=opts.dry_run or bool(opts.emit_commands))
    if opts.dry_run:
        return 0
    if opts.emit_commands:
        campaign.emit(opts.emit_commands)
        return 0
    code = campaign.execute()
    if code != 130:  # not after Ctrl-C
        campaign.write_tables()
    return code


if __name__ == "__main__":
    sys.exit(main())
