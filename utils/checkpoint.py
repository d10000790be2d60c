"""Atomic checkpoint / file writing, checkpoint naming, resume helpers (RNG states, stale temps, hashes)
and the output-folder checks made before training."""
from __future__ import annotations

import glob
import hashlib
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch

from utils.errors import UserError


def split_suffix(overlap) -> str:
    """Suffix naming a run's training split: True -> '-ov', False -> '', a string is the suffix itself
    (tasks.split_suffix of the filter mode, e.g. '-noov')."""
    return overlap if isinstance(overlap, str) else ("-ov" if overlap else "")


def run_tag(task: str, dataset: str, overlap) -> str:
    """`<task>-<dataset>[-ov|-noov]`, the prefix of checkpoint names and log folders (overlap: see split_suffix)."""
    return f"{task}-{dataset}{split_suffix(overlap)}"


def checkpoint_path(root, task: str, dataset: str, overlap, name: str, step: int) -> Path:
    """`<root>/step/<task>-<dataset>[-ov]_<name>_<step>.pth` (root: --checkpoint_dir, default checkpoints)."""
    return Path(root) / "step" / f"{run_tag(task, dataset, overlap)}_{name}_{int(step)}.pth"


def atomic_write(path, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename it over `path`.

    A crash or an exception leaves either the previous file or none under `path`, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Own unique name opened with "x" (not mkstemp) so the file gets the usual umask permissions.
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp_name, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, state: dict) -> Path:
    """torch.save `state` to `path` atomically (parent folders created)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu", weights_only: bool = False) -> dict:
    """Load a checkpoint dict; a missing or unreadable file is a UserError naming it.

    weights_only defaults to False because our checkpoints also carry options and method
    state; pass True for files from untrusted sources.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train that step first or pass the right file with "
                        f"--ckpt/--step_ckpt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # truncated file, not a torch file, pickle errors ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path} ({first_line}); re-run the step that writes it") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of states; check the file")
    return state


# ---------------------------------------------------------------------- resume, hashes, output checks
def last_checkpoint_path(root, task: str, dataset: str, overlap: bool, name: str, step: int) -> Path:
    """The resume ("last") checkpoint beside the step checkpoint: `<...>_<step>.last.pth`."""
    return checkpoint_path(root, task, dataset, overlap, name, step).with_suffix(".last.pth")


def file_sha256(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file (about 1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(paths) -> list[Path]:
    """Remove temp files that killed atomic writes of `paths` left (`.<name>.<pid>.<hex>.tmp` of a dead pid).

    Returns the removed files. Temps of a live process (a concurrent save) are kept.
    """
    removed = []
    for path in map(Path, paths):
        if not path.parent.is_dir():
            continue
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            parts = tmp.name[len(path.name) + 2:].split(".")
            if len(parts) == 3 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
                try:
                    tmp.unlink()
                    removed.append(tmp)
                except FileNotFoundError:
                    pass
    return removed


def _closest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder, option: str) -> Path:
    """Write/remove a probe file in `folder`, or, while it does not exist yet, in the closest folder above
    it that does (so a run that fails later leaves no empty folders); a UserError naming `option` otherwise."""
    folder = Path(folder)
    existing = _closest_existing(folder)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory")
        probe = existing / f".write_probe.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        with open(probe, "xb") as f:
            f.write(b"0")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = folder if existing == folder else f"{folder} (at {existing})"
        raise UserError(f"cannot write to {where} ({reason}); pass a writable folder with {option}") from None
    return folder


def check_free_space(folder, needed_bytes: int, what: str) -> None:
    """UserError when the file system of `folder` has less than `needed_bytes` free."""
    free = shutil.disk_usage(_closest_existing(Path(folder))).free
    if free < needed_bytes:
        raise UserError(f"{folder} has {free / 2**20:.0f} MiB free but {what} needs about "
                        f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another folder")


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts/lists (a checkpoint size estimate)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def non_finite_tensors(named_tensors) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    bad = []
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states of this process."""
    # the global numpy state is what resume must restore, legacy API or not
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}  # noqa: NPY002
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
