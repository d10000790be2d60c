"""Results tooling: grouping over seeds, mean ± std, paper / per-step / per-class tables, md/LaTeX/CSV,
the step-0 link through --step_ckpt, figures; on results files written here with known numbers."""
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from dataset.colormap import CLASS_NAMES
from utils.errors import UserError
from utils.reporting.figures import per_class_figure, steps_figure
from utils.reporting.results import write_results
from utils.reporting.tables import (
    collect,
    paper_tables,
    per_class_tables,
    to_csv,
    to_latex,
    to_markdown,
)
from utils.run_id import RunId, effective_name, split_seed

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (42, 1, 2)
TASK_KNOWLEDGE = (tasks.num_steps_if_known, tasks.table_task_order())  # what the scripts pass `collect`


def known(method: int, task: str, step: int, seed: int) -> dict:
    """A results dict whose numbers encode (method, task, step, seed): fractions with 4 decimals."""
    base = 0.1 * (method + 1) + 0.01 * step + 0.003 * SEEDS.index(seed) ** 2 + 0.0001 * len(task)
    iou = [round(base + 0.02 * c, 4) for c in range(6)]
    return {"iou": iou, "miou_old": round(base + 0.05, 4), "miou_new": None if step == 0 else round(base + 0.07, 4),
            "miou_all": round(base + 0.06, 4), "miou_all_bg": base, "overall_acc": base}


def write_task(root, task, method_index, name, seed, steps=None, opts_by_step=None):
    order = tasks.get_order("vaihingen", task)
    n = tasks.num_steps("vaihingen", task)
    for step in steps if steps is not None else range(n):
        seen = order[:sum(tasks.get_per_task_classes("vaihingen", task, step))]
        write_results(RunId.from_run_name("vaihingen", task, "", effective_name(name, seed)).results(root), step,
                      known(method_index, task, step, seed), CLASS_NAMES, seen,
                      (opts_by_step or {}).get(step, {"random_seed": seed}))


@pytest.fixture
def results_dir(tmp_path):
    """FT and MiB on 4-1 and 2-1s, seeds 42, 1, 2; MiB 4-1 seed 2 starts at step 1 from a shared step 0."""
    for task in ("4-1", "2-1s"):
        for seed in SEEDS:
            write_task(tmp_path, task, 0, "FT", seed)
            if task == "4-1" and seed == 2:
                write_task(tmp_path, task, 5, "step0-abc", seed, steps=[0])
                ckpt = f"some/where/step/4-1-vaihingen_{effective_name('step0-abc', 2)}_0.pth"
                write_task(tmp_path, task, 1, "MiB", seed, steps=[1], opts_by_step={1: {"step_ckpt": ckpt}})
            else:
                write_task(tmp_path, task, 1, "MiB", seed)
    return tmp_path


def test_seed_names():
    assert effective_name("MiB", 42) == "MiB" and effective_name("MiB", 3) == "MiB-s3"
    assert split_seed("MiB-s3") == ("MiB", 3) and split_seed("MiB") == ("MiB", 42)
    assert split_seed("my_run-s12-s7") == ("my_run-s12", 7) and split_seed("MiB-CD") == ("MiB-CD", 42)


def _paper_csv(table):
    return {row[0]: row for row in csv.reader(to_csv(table).splitlines()[1:])}, to_csv(table).splitlines()[0].split(",")


def test_paper_table_mean_std_over_seeds(results_dir):
    experiments = collect(sorted(results_dir.glob("*.csv")), *TASK_KNOWLEDGE)
    names = {(e.task, e.name): e.seeds for e in experiments}
    assert names[("4-1", "FT")] == [1, 2, 42] and names[("4-1", "step0-abc")] == [2]
    (table,) = paper_tables(experiments, order=["MiB", "FT"])
    rows, header = _paper_csv(table)
    assert [r[0][0] for r in table.rows] == ["MiB", "FT"]  # order given; step0-abc has no final step: left out
    for m, method in enumerate(("FT", "MiB")):
        for task, last in (("4-1", 1), ("2-1s", 3)):
            for column, label in (("miou_old", "old"), ("miou_new", "new"), ("miou_all", "all")):
                values = [100 * known(m, task, last, s)[column] for s in SEEDS]
                i = header.index(f"{task} {label}")
                assert float(rows[method][i]) == pytest.approx(statistics.mean(values), abs=1e-3)
                assert float(rows[method][i + 1]) == pytest.approx(statistics.stdev(values), abs=1e-3)
                assert rows[method][i + 2] == "3"
    ft_old = [100 * known(0, "4-1", 1, s)["miou_old"] for s in SEEDS]
    text = f"{statistics.mean(ft_old):.2f} ± {statistics.stdev(ft_old):.2f}"
    assert f"| FT | {text} |" in to_markdown(table)
    latex_text = text.replace(" ± ", r" $\pm$ ")
    assert f"FT & {latex_text} &" in to_latex(table)
    assert r"\multicolumn{3}{c}{4-1} & \multicolumn{3}{c}{2-1s}" in to_latex(table)


def test_every_step_and_the_shared_step0_link(results_dir):
    experiments = collect(sorted(results_dir.glob("*.csv")), *TASK_KNOWLEDGE)
    mib = next(e for e in experiments if (e.task, e.name) == ("4-1", "MiB"))
    # seed 2 of MiB has only step 1 in its file; step 0 comes from the run named in its --step_ckpt
    assert mib.steps_by_seed[2][0]["miou_old"] == pytest.approx(100 * known(5, "4-1", 0, 2)["miou_old"])
    step0 = [100 * known(1, "4-1", 0, 42)["miou_old"], 100 * known(1, "4-1", 0, 1)["miou_old"],
             100 * known(5, "4-1", 0, 2)["miou_old"]]
    assert sorted(mib.value(0, "miou_old").values) == pytest.approx(sorted(step0))
    (table,) = paper_tables(experiments, all_steps=True)
    labels = [tuple(r[0]) for r in table.rows]
    assert ("FT", "3") in labels and ("MiB", "0") in labels and ("step0-abc", "0") in labels
    cells = dict((tuple(r[0]), r[1]) for r in table.rows)
    assert cells[("MiB", "0")][0].mean == pytest.approx(statistics.mean(step0))
    assert cells[("FT", "3")][0] is None  # 4-1 has no step 3
    assert cells[("MiB", "0")][1] is None  # no new classes at step 0


def test_per_class_table(results_dir):
    experiments = collect(sorted(results_dir.glob("*.csv")), *TASK_KNOWLEDGE)
    tables = {t.key: t for t in per_class_tables(experiments)}
    table = tables["per_class_vaihingen_2-1s"]
    assert table.groups[0] == ("IoU", list(CLASS_NAMES))
    rows = {r[0][0]: r[1] for r in table.rows}
    for c in range(6):
        values = [100 * known(0, "2-1s", 3, s)["iou"][c] for s in SEEDS]
        assert rows["FT"][c].mean == pytest.approx(statistics.mean(values))
        assert rows["FT"][c].std == pytest.approx(statistics.stdev(values))
    assert "| IoU car |" in to_markdown(table).splitlines()[2]


def test_fewer_seeds_in_a_cell_are_marked(tmp_path):
    write_task(tmp_path, "4-1", 0, "FT", 42)
    write_task(tmp_path, "4-1", 0, "FT", 1, steps=[0])  # seed 1 stopped after step 0
    (table,) = paper_tables(collect(sorted(tmp_path.glob("*.csv")), *TASK_KNOWLEDGE))
    line = next(l for l in to_markdown(table).splitlines() if l.startswith("| FT"))
    assert f"{100 * known(0, '4-1', 1, 42)['miou_old']:.2f} (n=1)" in line and line.endswith("| 1 42 |")


def test_figures_plot_the_table_numbers(results_dir):
    experiments = [e for e in collect(sorted(results_dir.glob("*.csv")), *TASK_KNOWLEDGE) if e.task == "4-1"]
    fig = steps_figure(experiments, order=["FT", "MiB"])
    old_axis = fig.axes[0]
    ft_line = next(l for l in old_axis.lines if l.get_label() == "FT")
    assert list(ft_line.get_xdata()) == [0, 1]
    ft = next(e for e in experiments if e.name == "FT")
    assert list(ft_line.get_ydata()) == pytest.approx([ft.value(s, "miou_old").mean for s in (0, 1)])
    bars = per_class_figure(experiments, order=["FT", "MiB"]).axes[0].patches
    heights = [b.get_height() for b in bars]
    assert len(heights) == 2 * 6  # 6 classes x (FT, MiB)
    assert heights[:6] == pytest.approx([ft.value(1, c).mean for c in CLASS_NAMES])


def test_cli_writes_every_format_and_figures(results_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    files = sorted(str(p) for p in results_dir.glob("*.csv"))
    out, figures = tmp_path / "tables", tmp_path / "figures"
    proc = subprocess.run([sys.executable, "scripts/summarize_results.py", *files, "--format", "md", "latex", "csv",
                           "--out", str(out), "--all_steps", "--per_class", "--plot", str(figures)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("paper_vaihingen", "paper_steps_vaihingen", "per_class_vaihingen_4-1",
                                     "per_class_vaihingen_2-1s") for ext in ("md", "tex", "csv"))
    pngs = sorted(p.name for p in figures.iterdir())
    assert pngs == ["per_class_vaihingen_2-1s.png", "per_class_vaihingen_4-1.png", "steps_vaihingen_2-1s.png",
                    "steps_vaihingen_4-1.png"]
    assert all((figures / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # the plain call of the README prints the paper table
    plain = subprocess.run([sys.executable, "scripts/summarize_results.py", *files], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "| method | 4-1 old | 4-1 new | 4-1 all | 2-1s old |" in plain.stdout


def test_bad_file_names_are_user_errors(tmp_path):
    bad = tmp_path / "notaresult.csv"
    bad.write_text("step\n")
    with pytest.raises(UserError, match="<dataset>_<task>"):
        collect([bad], *TASK_KNOWLEDGE)
    proc = subprocess.run([sys.executable, "scripts/summarize_results.py", str(tmp_path / "missing_4-1_FT.csv")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_a_task_unknown_to_tasks_py_ends_at_its_last_step_in_the_file(tmp_path):
    for step in range(3):
        write_results(RunId("potsdam", "9s", "", "FT").results(tmp_path), step, known(0, "9s", step, 42), CLASS_NAMES,
                      range(2 + step), {})
    (table,) = paper_tables(collect(sorted(tmp_path.glob("*.csv")), *TASK_KNOWLEDGE))
    assert table.groups == [("9s", ["old", "new", "all"])]
    assert table.rows[0][1][0].mean == pytest.approx(100 * known(0, "9s", 2, 42)["miou_old"])


def test_columns_appended_to_results_files_are_tolerated(tmp_path):
    header = ["step", *CLASS_NAMES, "miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc", "f1_macro",
              "seed"]
    rows = [["0", "10", "20", "30", "40", "50", "x", "35.00", "x", "35.00", "30.00", "60.00", "0.5", "42"],
            ["1", "11", "21", "31", "41", "51", "61", "36.00", "61.00", "41.00", "36.00", "61.00", "0.6", "42"]]
    (tmp_path / "vaihingen_4-1_FT.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    (exp,) = collect([tmp_path / "vaihingen_4-1_FT.csv"], *TASK_KNOWLEDGE)
    assert exp.classes(1) == list(CLASS_NAMES)
    (table,) = per_class_tables([exp])
    assert [c.mean for c in table.rows[0][1]] == [11, 21, 31, 41, 51, 61, 36, 61, 41]
