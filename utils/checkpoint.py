"""Checkpoint saving (atomic, utils/atomic_files.py) and loading (names: utils/run_id.py), resume helpers (RNG states,
hashes) and the output-folder checks made before training."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from utils.atomic_files import atomic_write
from utils.errors import UserError


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
        raise UserError(f"checkpoint {path} does not exist; train that step first or give the right file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # truncated file, not a torch file, pickle errors ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path} ({first_line}); re-run the step that writes it") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of states; check the file")
    return state


# ---------------------------------------------------------------------- resume, hashes, output checks
def file_sha256(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file (about 1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def loader_generator(loader) -> torch.Generator | None:
    """The generator that decides a training loader's order and augmentations (its sampler's; see
    dataset.SeededSampler), whose state resume saves and restores; None for loaders without one."""
    return getattr(loader.sampler, "generator", None)


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
