"""Atomic checkpoint / file writing and the checkpoint naming of DESIGN.md §4."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, IO

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
        raise UserError(f"checkpoint {path} does not exist; train that step first or pass the right file with --ckpt/--step_ckpt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # truncated file, not a torch file, pickle errors ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path} ({first_line}); re-run the step that writes it") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of states; check the file")
    return state
