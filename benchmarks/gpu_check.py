"""Every CUDA path the CPU test suite cannot reach, in one command on one GPU (about 5 minutes), with one
table at the end: run it through benchmarks/gpu_check.sh.

    bash benchmarks/gpu_check.sh                 # on a machine with a GPU
    bash benchmarks/gpu_check.sh --device cpu    # rehearsal of the plumbing on the CPU (tiny sizes)

Rows: AMP bf16 and fp16 with the in-place ABN CUDA kernels, --channels_last, --compile, the loader at its
default workers (pinned memory), an nccl process group (all-reduce, DDP backward, the gloo side group of
the pre-emption flag), a step pre-empted by SIGUSR1 mid-epoch and resumed on the GPU (weights against an
uninterrupted run), and the peak memory of a ResNet-101 training iteration at crop 512, batch 12 (fp32 and
bf16). Each training row is a real `run.py` step on synthetic Vaihingen. Exit code 0 when no row failed,
1 otherwise, 2 when no GPU is visible (without --device cpu).
"""
from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# (sizes on the GPU, sizes of the CPU rehearsal)
SIZES = {"cuda": dict(tile=768, n_train=6, crop=256, batch=8, backbone="resnet50", mem=("resnet101", 512, 12)),
         "cpu": dict(tile=180, n_train=3, crop=64, batch=2, backbone="resnet18", mem=("resnet18", 64, 2))}


class CheckFailed(Exception):
    pass


class Context:
    def __init__(self, device: str, work: Path):
        self.device, self.work = device, work
        self.sizes = SIZES[device]
        self.data = work / "data"

    def step_args(self, out: Path, *extra) -> list[str]:
        s = self.sizes
        return ["--data_root", str(self.data), "--dataset", "vaihingen", "--task", "4-1", "--step", "0",
                "--method", "FT", "--backbone", s["backbone"], "--no_pretrained", "--crop_size", str(s["crop"]),
                "--batch_size", str(s["batch"]), "--device", self.device, "--checkpoint_dir", str(out / "ckpt"),
                "--logdir", str(out / "logs"), "--results_dir", str(out / "results"), "--sample_num", "0", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


def run_step(ctx: Context, name: str, *extra, timeout=600):
    out = ctx.work / name
    done = subprocess.run([PY, "run.py", *ctx.step_args(out, *extra)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckFailed(f"run.py exit {done.returncode}: {tail[:160]}")
    return out, done


def miou(out: Path) -> str:
    record = json.loads((out / "results" / "vaihingen_4-1_FT.json").read_text())["steps"]["0"]
    return f"mIoU {100 * record['miou_all']:.1f}" if record.get("miou_all") is not None else "mIoU x"


def epoch_seconds(stdout: str) -> str:
    times = re.findall(r"^epoch \d+/\d+: .*\(([\d.]+)s, lr", stdout, re.M)
    return f"{times[-1]} s/epoch" if times else ""


def implementation(stdout: str) -> str:
    found = re.search(r"--norm_act \S+: (.+)$", stdout, re.M)
    return found.group(1) if found else "?"


# ------------------------------------------------------------------------------------------------ checks
def check_amp(ctx, level, dtype):
    def check():
        out, done = run_step(ctx, f"amp_{dtype}", "--opt_level", level, "--norm_act", "iabn", "--epochs", "1",
                             "--debug", "--num_workers", "2")
        impl = implementation(done.stdout)
        if ctx.device == "cuda" and "inplace_abn" not in impl:
            raise CheckFailed(f"in-place ABN ran as '{impl}', not the package's CUDA kernels")
        return "ok", f"{impl}; {miou(out)}"
    return check


def check_channels_last(ctx):
    out, done = run_step(ctx, "channels_last", "--channels_last", "--opt_level", "O2", "--norm_act", "iabn",
                         "--epochs", "1", "--debug", "--num_workers", "2")
    return "ok", f"bf16, {miou(out)}"


def check_compile(ctx):
    out, done = run_step(ctx, "compile", "--compile", "--norm_act", "iabn", "--epochs", "1", "--debug",
                         "--num_workers", "2", timeout=900)
    fallback = re.search(r"--compile: torch.compile is not available here \((.*)\)", done.stderr)
    if fallback:
        return "fallback", f"ran eager: {fallback.group(1)[:120]}"
    return "ok", f"compiled; {miou(out)}"


def check_default_workers(ctx):
    from utils.distributed import available_cpus
    out, done = run_step(ctx, "loader", "--norm_act", "iabn", "--epochs", "1")
    return "ok", f"{min(8, available_cpus())} workers (default), {epoch_seconds(done.stdout)}"


NCCL_PROBE = r"""
import os, sys, torch, torch.distributed as dist
from datetime import timedelta
from utils.distributed import rendezvous_store
from utils.preemption import Preemption
cuda = sys.argv[1] == "cuda"
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
dist.init_process_group("nccl" if cuda else "gloo", store=rendezvous_store(0, 1, timedelta(seconds=60)), rank=0,
                        world_size=1, timeout=timedelta(seconds=60))
t = torch.full((4,), 2.0, device=device)
dist.all_reduce(t)
assert t.sum().item() == 8.0, t
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 4, 3).to(device),
                                                  device_ids=[0] if cuda else None)
model(torch.randn(2, 3, 8, 8, device=device)).sum().backward()
control = dist.new_group(backend="gloo")
assert Preemption([], True, control).should_stop() is False
print(dist.get_backend(), "all_reduce, DDP backward, gloo side group")
dist.destroy_process_group()
"""


def check_nccl(ctx):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = subprocess.run([PY, "-c", NCCL_PROBE, ctx.device], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise CheckFailed((done.stderr.strip().splitlines() or ["no output"])[-1][:160])
    return "ok", done.stdout.strip()


def check_resume(ctx):
    """Pre-empted by SIGUSR1 inside epoch 2, re-run: weights against an uninterrupted step."""
    import torch
    extra = ("--norm_act", "iabn", "--epochs", "2", "--num_workers", "2")
    straight, _ = run_step(ctx, "resume_straight", *extra)
    out = ctx.work / "resume_signalled"
    cmd = [PY, "run.py", *ctx.step_args(out, *extra)]
    last = out / "ckpt" / "step" / "4-1-vaihingen_FT_0.last.pth"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not last.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise CheckFailed("the step ended before its first resume checkpoint")
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=300)
    if proc.returncode != 75:
        raise CheckFailed(f"SIGUSR1: exit {proc.returncode}, expected 75")
    state = torch.load(last, map_location="cpu", weights_only=False)
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or "resuming from" not in done.stdout:
        raise CheckFailed(f"re-run: exit {done.returncode}, resumed: {'resuming from' in done.stdout}")
    a, b = (torch.load(o / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth", map_location="cpu",
                       weights_only=False)["model"] for o in (straight, out))
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    why = " (cudnn.benchmark)" if diff else " (identical)"
    return "ok", (f"stopped at epoch {state['epoch'] + 1} iteration {state['iteration_in_epoch']}, resumed; "
                  f"largest weight difference to an uninterrupted run {diff:.2e}{why}")


MEMORY_PROBE = r"""
import sys, torch, torch.nn.functional as F
from argparser import model_options, parse_args
from modules import make_model
backbone, crop, batch, device, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
opts = parse_args(["--backbone", backbone, "--norm_act", "iabn", "--no_pretrained", "--output_stride", "16"])
model = make_model(model_options(opts), [6]).to(device).train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(batch, 3, crop, crop, device=device)
y = torch.randint(0, 6, (batch, crop, crop), device=device)
amp = {"fp32": None, "bf16": torch.bfloat16}[dtype]
for _ in range(2):  # the second iteration holds the optimiser's momentum too
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device, dtype=amp, enabled=amp is not None):
        logits, _ = model(x)
    F.cross_entropy(logits.float(), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0)
"""


def check_memory(ctx):
    backbone, crop, batch = ctx.sizes["mem"]
    peaks = []
    for dtype in ("fp32", "bf16"):
        done = subprocess.run([PY, "-c", MEMORY_PROBE, backbone, str(crop), str(batch), ctx.device, dtype], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise CheckFailed(f"{dtype}: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:160])
        peaks.append(f"{dtype} {float(done.stdout.split()[-1]):.2f} GiB")
    what = f"{backbone}, crop {crop}, batch {batch}"
    if ctx.device != "cuda":
        return "ok", f"{what}: ran (peak memory is measured on CUDA only)"
    return "ok", f"{what}: peak allocated " + ", ".join(peaks)


def checks(ctx):
    return [("AMP bf16 (O2), in-place ABN kernels", check_amp(ctx, "O2", "bf16")),
            ("AMP fp16 (O1) + GradScaler, in-place ABN", check_amp(ctx, "O1", "fp16")),
            ("--channels_last", lambda: check_channels_last(ctx)),
            ("--compile", lambda: check_compile(ctx)),
            ("loader at the default workers", lambda: check_default_workers(ctx)),
            ("nccl process group" if ctx.device == "cuda" else "process group (gloo rehearsal)",
             lambda: check_nccl(ctx)),
            ("pre-empted (SIGUSR1) and resumed", lambda: check_resume(ctx)),
            ("peak memory, one training iteration", lambda: check_memory(ctx))]


def make_data(ctx):
    from process_data.isprs_processing import VAIHINGEN
    from process_data.make_synthetic_isprs import generate
    from process_data.tile_processing import process_dataset
    raw = ctx.work / "raw"
    s = ctx.sizes
    generate("vaihingen", raw, seed=0, tile_size=s["tile"], n_train=s["n_train"], n_test=2, object_scale=1.0)
    process_dataset(VAIHINGEN, raw, ctx.data, crop_size=s["crop"], stride=s["crop"], seed=42, progress=False)


def environment(device: str) -> str:
    import torch
    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    if device == "cuda":
        parts += [torch.cuda.get_device_name(0), f"cuDNN {torch.backends.cudnn.version()}"]
        try:
            parts.append("NCCL " + ".".join(map(str, torch.cuda.nccl.version())))
        except (AttributeError, RuntimeError, TypeError):
            pass
    return ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default); cpu rehearses the script with tiny sizes (CUDA-only figures empty)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temp folder)")
    opts = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    if opts.device == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no GPU"
        print(f"error: gpu_check needs a CUDA GPU: {why} (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it on a GPU machine, or pass --device cpu "
              f"to rehearse it", file=sys.stderr)
        return 2
    work = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(opts.device, work)
    started = time.time()
    make_data(ctx)
    rows = [("synthetic data", "ok", time.time() - started, f"Vaihingen look-alike, crops {ctx.sizes['crop']} px")]
    for name, check in checks(ctx):
        t0 = time.time()
        try:
            status, detail = check()
        except CheckFailed as err:
            status, detail = "FAIL", str(err)
        except Exception as err:  # noqa: BLE001 - a broken check is a row, the others still run
            status, detail = "FAIL", f"{type(err).__name__}: {str(err)[:160]}"
        rows.append((name, status, time.time() - t0, detail))
        print(f"[gpu_check] {name}: {status} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n**gpu_check** on {environment(opts.device)}; {time.time() - started:.0f} s in all\n")
    print("| check | result | seconds | detail |\n|---|---|---|---|")
    for name, status, seconds, detail in rows:
        print(f"| {name} | {status} | {seconds:.0f} | {detail.replace('|', '/')} |")
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(status == "FAIL" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
