"""One step across machines: srun as a launcher (host lists, SLURM variables), pre-emption by real signals,
torchrun restarts after a SIGKILLed worker, two torchrun nodes, and a SLURM batch job that requeues
itself; every interrupted run ends bit-identical (CPU, gloo) to an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_resume import _env, _final, _kill_workers, _last
from tests.test_run import ROOT, run_args
from utils.distributed import (
    choose_device,
    expand_hostlist,
    expand_tasks_per_node,
    relaunch_command,
    slurm_launch_env,
    slurm_port,
)
from utils.errors import UserError
from utils.preemption import PREEMPTED_EXIT_CODE, parse_signals, requeue_slurm_job

# 18 training crops: 9 iterations per epoch with one process, 4 with two; iabn_sync synchronises over
# every process (gloo) so that a layout that split the group differently would show.
EXTRA = ["--epochs", "2", "--crop_size", "48", "--batch_size", "2", "--norm_act", "iabn_sync"]
SLURM_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------------ unit
@pytest.mark.parametrize("text, hosts", [
    ("vm", ["vm"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
    ("x[1],y[3-4]z,w", ["x1", "y3z", "y4z", "w"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-03", "node01]", "n[a-b]", "n[[1]]"])
def test_expand_hostlist_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2x3")


SRUN_TASK = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "2",
             "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_ID": "812",
             "SLURM_STEP_NODELIST": "gpu[07-09]", "SLURM_JOB_NODELIST": "gpu[01-09]", "SLURM_NTASKS": "9"}


def test_slurm_variables_become_torchrun_variables():
    env = slurm_launch_env(SRUN_TASK)
    assert env == {"RANK": "3", "WORLD_SIZE": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "GROUP_WORLD_SIZE": "3", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(slurm_port(812, 2))}
    # the user's MASTER_ADDR / MASTER_PORT win
    given = slurm_launch_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "29400")


def test_no_process_group_from_slurm_under_torchrun_or_in_a_batch_script():
    assert slurm_launch_env({**SRUN_TASK, "RANK": "0", "WORLD_SIZE": "2"}) is None  # torchrun inside srun
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}  # the batch script, salloc's shell
    assert slurm_launch_env(batch) is None
    with pytest.raises(UserError, match="SLURM_PROCID"):
        slurm_launch_env({**SRUN_TASK, "SLURM_PROCID": "x"})


def test_slurm_ports_differ_between_steps_and_jobs_and_stay_below_ephemeral_ports():
    ports = {slurm_port(job, step) for job in range(100, 110) for step in range(8)}
    assert len(ports) == 80 and all(15000 <= p < 32768 for p in ports)


def test_more_srun_tasks_than_gpus_is_one_line_naming_srun():
    with pytest.raises(UserError, match=r"lower srun --ntasks-per-node to 2"):
        choose_device("auto", 2, 4, cuda_built=True, gpu_count=2, driver_present=True, visible_devices="0,1",
                      launcher="srun")
    # srun --gpus-per-task: every task sees its own GPU(s) and takes the first
    device = choose_device("auto", 3, 4, cuda_built=True, gpu_count=1, driver_present=True, visible_devices="3",
                           launcher="srun", own_gpus=True)
    assert device == torch.device("cuda", 0)
    # --gpus-per-task with every GPU visible to every task: the local rank's
    device = choose_device("auto", 3, 4, cuda_built=True, gpu_count=4, driver_present=True, visible_devices=None,
                           launcher="srun", own_gpus=True)
    assert device == torch.device("cuda", 3)


def test_hints_relaunch_srun_tasks_with_srun():
    env = {"SLURM_STEP_ID": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5"}
    assert relaunch_command(["--step", "1"], env=env) == ["srun", "--nodes=2", "--ntasks-per-node=4", "python",
                                                          "run.py", "--step", "1"]
    under_torchrun = {**env, "TORCHELASTIC_RUN_ID": "x"}
    assert relaunch_command([], env=under_torchrun)[:3] == ["torchrun", "--nproc_per_node=4", "--nnodes=2"]


def test_parse_signals():
    assert parse_signals("TERM,usr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals("SIGUSR2") == [signal.SIGUSR2] and parse_signals("") == []
    with pytest.raises(UserError, match="KILL"):
        parse_signals("KILL")
    with pytest.raises(UserError, match="FOO"):
        parse_signals("TERM,FOO")


class _FakeScontrol:
    def __init__(self, show):
        self.show, self.calls = show, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, self.show if cmd[1] == "show" else "", "")


def test_requeue_only_batch_jobs_allowed_to_and_not_after_sigterm():
    job = {"SLURM_JOB_ID": "77"}
    assert requeue_slurm_job(signal.SIGUSR1, env={}) is None  # not under SLURM
    fake = _FakeScontrol("JobId=77 JobName=x Requeue=1 Restarts=0 BatchFlag=1 Reboot=0")
    assert "requeued" in requeue_slurm_job(signal.SIGUSR1, env=job, run=fake)
    assert fake.calls[-1] == ["scontrol", "requeue", "77"]
    fake = _FakeScontrol("JobId=77 Requeue=0 BatchFlag=1")
    assert "not requeued" in requeue_slurm_job(signal.SIGUSR1, env=job, run=fake)
    assert all(call[1] != "requeue" for call in fake.calls)
    fake = _FakeScontrol("JobId=77 Requeue=1 BatchFlag=1")
    assert "not requeued" in requeue_slurm_job(signal.SIGTERM, env=job, run=fake) and not fake.calls


# ------------------------------------------------------------------------------------------------ helpers
def _torchrun(data_root, out, port, *launcher, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "run.py",
            *run_args(data_root, out, 0, extra=[*EXTRA, *extra])]


def _one_node(data_root, out, port, restarts=0):
    return _torchrun(data_root, out, port, "--nproc_per_node=2", f"--master_port={port}",
                     f"--max-restarts={restarts}")


def _node(data_root, out, port, node_rank, extra=()):
    return _torchrun(data_root, out, port, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
                     "--rdzv_backend=static", "--master_addr=127.0.0.1", f"--master_port={port}", "--max-restarts=0",
                     extra=extra)


def _run(cmd, timeout=900):
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return done


def _assert_same_weights(a, b):
    ca, cb = (torch.load(_final(o), map_location="cpu", weights_only=False) for o in (a, b))
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key


def _wait_for(path: Path, procs, timeout=600):
    deadline = time.time() + timeout
    while not path.exists():
        for proc in procs:
            assert proc.poll() is None, f"exited early ({proc.returncode})"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _worker(agent_pid: int, local_rank: int) -> int:
    for pid in _children(agent_pid):
        if _environ(pid).get("LOCAL_RANK") == str(local_rank):
            return pid
    raise AssertionError(f"no worker of local rank {local_rank} under {agent_pid}")


def _start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill_all(procs, out):
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _kill_workers(out)
    for proc in procs:
        proc.communicate()


def _wait_all_succeed(procs, out):
    """(stdout, stderr) of every process once all have ended, each with exit code 0 (any left over is
    killed, with its workers)."""
    try:
        outputs = [proc.communicate(timeout=900) for proc in procs]
    finally:
        _kill_all(procs, out)
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    return outputs


@pytest.fixture(scope="module")
def one_process(data_root, tmp_path_factory):
    """The reference step of one process, trained once."""
    out = tmp_path_factory.mktemp("one_process")
    done = _run([sys.executable, "run.py", *run_args(data_root, out, 0, extra=EXTRA)])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_processes(data_root, tmp_path_factory):
    """The reference step of two gloo processes on one node (torchrun), trained once."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("two_processes")
    done = _run(_one_node(data_root, out, port))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------------ pre-emption
def test_signal_mid_epoch_stops_writes_the_checkpoint_and_the_rerun_is_bit_identical(data_root, tmp_path,
                                                                                    one_process):
    # --ckpt_interval changes nothing in training: its first checkpoint (iteration 3 of 9) says the run is
    # inside epoch 1, and the signal sent then stops it after iteration 3 or 4
    cmd = [sys.executable, "run.py", *run_args(data_root, tmp_path, 0, extra=[*EXTRA, "--ckpt_interval", "3"])]
    proc = _start(cmd)
    try:
        _wait_for(_last(tmp_path), [proc])
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_all([proc], tmp_path)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert not _final(tmp_path).exists()
    state = torch.load(_last(tmp_path), map_location="cpu", weights_only=False)
    assert state["epoch"] == 0 and 3 <= state["iteration_in_epoch"] < 9, "stop inside epoch 1"
    assert state["manifest"]["torch"] == torch.__version__ and state["manifest"]["world_size"] == 1
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped by SIGUSR1")]
    assert len(stopped) == 1 and f"iteration {state['iteration_in_epoch']} of epoch 1" in stopped[0]
    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"iteration {state['iteration_in_epoch'] + 1} (" in resumed.stdout
    _assert_same_weights(one_process, tmp_path)


def test_resume_in_another_environment_says_what_differs(data_root, tmp_path):
    """A requeued job may land on another machine: the resumed run names what differs (here: torch)."""
    cmd = [sys.executable, "run.py", *run_args(data_root, tmp_path, 0, extra=[*EXTRA, "--epochs", "1",
                                                                              "--ckpt_interval", "3"])]
    proc = _start(cmd)
    try:
        _wait_for(_last(tmp_path), [proc])
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    finally:
        _kill_all([proc], tmp_path)
    assert proc.returncode == PREEMPTED_EXIT_CODE
    state = torch.load(_last(tmp_path), map_location="cpu", weights_only=False)
    state["manifest"]["torch"] = "1.13.1"
    torch.save(state, _last(tmp_path))
    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warned = [line for line in resumed.stdout.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and f"torch 1.13.1 -> {torch.__version__}" in warned[0], resumed.stdout[-2000:]


def test_sigterm_to_one_rank_stops_both_at_one_iteration(data_root, tmp_path, free_port, two_processes):
    """Only rank 1 gets SIGTERM: the all-reduced flag stops rank 0 at the same iteration (no rank waits in a
    collective), both exit 75 after the checkpoint is written, and the re-run ends where an uninterrupted
    run ends."""
    cmd = _one_node(data_root, tmp_path, free_port) + ["--ckpt_interval", "2"]  # 4 iterations per epoch
    proc = _start(cmd)
    try:
        _wait_for(_last(tmp_path), [proc])  # iteration 2 of epoch 1: the stop follows inside the epoch
        os.kill(_worker(proc.pid, 1), signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_all([proc], tmp_path)
    assert "exitcode: 75" in stderr and "exitcode: -" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    state = torch.load(_last(tmp_path), map_location="cpu", weights_only=False)
    assert state["epoch"] == 0 and 2 <= state["iteration_in_epoch"] < 4
    resumed = _run(_one_node(data_root, tmp_path, free_port))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    _assert_same_weights(two_processes, tmp_path)


# ------------------------------------------------------------------------------------------------ torchrun
def test_restart_after_a_sigkilled_worker_resumes_bit_identically(data_root, tmp_path, free_port, two_processes):
    """torchrun --max-restarts 1: rank 0's worker is SIGKILLed after epoch 1's checkpoint; the restarted
    group joins (its own keys in the agent's store) and resumes; the step ends as an uninterrupted one."""
    proc = _start(_one_node(data_root, tmp_path, free_port, restarts=1))
    try:
        _wait_for(_last(tmp_path), [proc])
        os.kill(_worker(proc.pid, 0), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        _kill_all([proc], tmp_path)
    assert proc.returncode == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr  # the kill happened and the agent restarted the group
    assert stdout.count("resuming from") == 1, stdout[-3000:]
    _assert_same_weights(two_processes, tmp_path)


def test_two_torchrun_nodes_match_one_node_and_only_rank_0_writes(data_root, tmp_path, free_port, two_processes):
    # node 1 gets folders of its own for the files rank 0 writes: they must stay empty (checkpoints are shared)
    node1 = ["--logdir", str(tmp_path / "node1" / "logs"), "--results_dir", str(tmp_path / "node1" / "results")]
    procs = [_start(_node(data_root, tmp_path, free_port, 0)), _start(_node(data_root, tmp_path, free_port, 1,
                                                                              extra=node1))]
    outputs = _wait_all_succeed(procs, tmp_path)
    assert not (tmp_path / "node1").exists() or not any((tmp_path / "node1").rglob("*"))
    assert outputs[0][0].count("results row of step 0 written") == 1 and "results row" not in outputs[1][0]
    _assert_same_weights(two_processes, tmp_path)
    recorded = _manifest(tmp_path)
    assert (recorded["nodes"], recorded["processes_per_node"], recorded["world_size"]) == (2, 1, 2)
    assert recorded["bn_sync_group"] == 2 and recorded["launcher"] == "torchrun"  # in-place ABN sync spans nodes
    assert recorded["effective_batch_size"] == 4 and recorded["device"] == "cpu" and recorded["gpu_count"] == 0
    step = torch.load(_final(tmp_path), map_location="cpu", weights_only=False)
    assert step["manifest"] == recorded


@pytest.mark.parametrize("first, then", [("two_nodes", "one_node"), ("one_node", "two_nodes")])
def test_resume_checkpoint_moves_between_layouts(data_root, tmp_path, free_port, two_processes, first, then):
    """The step's identity does not depend on the layout: 2 nodes x 1 process and 1 node x 2 processes
    continue each other's resume checkpoint bit-identically (another number of processes is refused:
    tests/test_resume.py)."""
    def start(layout):
        if layout == "one_node":
            return [_start(_one_node(data_root, tmp_path, free_port))]
        return [_start(_node(data_root, tmp_path, free_port, rank)) for rank in (0, 1)]

    procs = start(first)
    try:
        _wait_for(_last(tmp_path), procs)
    finally:
        _kill_all(procs, tmp_path)
    assert not _final(tmp_path).exists()
    procs = start(then)
    outputs = _wait_all_succeed(procs, tmp_path)
    assert "resuming from" in outputs[0][0]
    _assert_same_weights(two_processes, tmp_path)


# ------------------------------------------------------------------------------------------------ SLURM
def test_srun_two_tasks_train_one_step_identical_to_torchrun(slurm_cluster, data_root, tmp_path, two_processes):
    cmd = ["srun", "-p", slurm_cluster, "-n", "2", "--kill-on-bad-exit=1", "--export=ALL", sys.executable, "run.py",
           *run_args(data_root, tmp_path, 0, extra=EXTRA)]
    done = _run(cmd, timeout=SLURM_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = [line for line in done.stdout.splitlines() if line.startswith("launched by srun")]
    assert len(launched) == 1 and "2 tasks on 1 node(s)" in launched[0], done.stdout[-2000:]
    assert done.stdout.count("train step 0") == 1 and "2 process(es)" in done.stdout
    rows = (tmp_path / "results" / "vaihingen_4-1_FT.csv").read_text().splitlines()
    assert len(rows) == 2  # header and one step
    _assert_same_weights(two_processes, tmp_path)
    recorded = _manifest(tmp_path)
    assert (recorded["launcher"], recorded["world_size"], recorded["nodes"]) == ("srun", 2, 1)


def _manifest(out) -> dict:
    import json
    return json.loads((out / "results" / "vaihingen_4-1_FT.json").read_text())["steps"]["0"]["manifest"]


def _job_fields(job: str) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(part.split("=", 1) for part in shown.split() if "=" in part)


@pytest.mark.parametrize("launch", ["exec", "srun"])
def test_sbatch_job_signalled_ahead_of_its_end_requeues_and_finishes(slurm_cluster, data_root, tmp_path, launch,
                                                                    request):
    """`exec`: one process that is the batch shell, signalled as --signal=B:USR1@S would (scancel --batch);
    `srun`: two srun tasks, signalled as --signal=USR1@S would (every task of the job step). Either way the
    job stops, requeues itself, starts again, resumes and ends as an uninterrupted run."""
    reference = request.getfixturevalue("one_process" if launch == "exec" else "two_processes")
    script = tmp_path / "job.sh"
    args = " ".join(run_args(data_root, tmp_path, 0, extra=EXTRA))
    command = f"exec {sys.executable}" if launch == "exec" else f"srun --kill-on-bad-exit=1 {sys.executable}"
    script.write_text(f"#!/bin/bash\n{command} run.py {args}\n")
    log = tmp_path / "job.log"
    signal_option = "--signal=B:USR1@30" if launch == "exec" else "--signal=USR1@30"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "-p", slurm_cluster, "-n", "1" if launch == "exec" else "2", "--requeue",
         signal_option, "--open-mode=append", "-o", str(log), "-D", str(ROOT), "--export=ALL", str(script)],
        env=_env(), capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + SLURM_TIMEOUT_S
        while not _last(tmp_path).exists():
            assert time.time() < deadline and _job_fields(job).get("JobState") in ("PENDING", "RUNNING"), \
                log.read_text()[-3000:] if log.exists() else _job_fields(job)
            time.sleep(0.05)
        # what SLURM sends --signal's time before the limit, sent now
        target = ["--batch"] if launch == "exec" else []
        subprocess.run(["scancel", "--signal=USR1", *target, job], check=True)
        while _job_fields(job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            assert time.time() < deadline, _job_fields(job)
            time.sleep(0.5)
        fields = _job_fields(job)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields.get("Restarts") == "1", (fields, text[-3000:])
    assert text.count("stopped by SIGUSR1") == 1 and f"SLURM job {job} requeued" in text, text[-3000:]
    assert text.count("resuming from") == 1
    _assert_same_weights(reference, tmp_path)


# ------------------------------------------------------------------------------------------------ GPU check
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
def test_gpu_check_refuses_without_a_gpu_in_one_line():
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=dict(_env(), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gpu_check needs a CUDA GPU") and "--device cpu" in err[0]
