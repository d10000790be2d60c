"""Atomic file writes (temp file beside the target, fsync, rename) and removal of the temps killed writes leave."""
from __future__ import annotations

import glob
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


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
