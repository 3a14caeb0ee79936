"""Where a device-check phase writes its figures: ``$RESULT_JSON`` (set by ``run.py``; else
``$OUT/<default name>``), rewritten whole after every part so a phase killed at its deadline still
returns what it measured (a temporary name, then a rename: never a half-written file)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def result_path(default_name: str) -> Path:
    p = os.environ.get("RESULT_JSON")
    if p:
        return Path(p)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    return out / default_name


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary name and a rename: a kill leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_results(obj: dict, default_name: str) -> Path:
    path = result_path(default_name)
    atomic_write(path, json.dumps(obj, indent=1, default=str).encode())
    return path


def deadline_left(start: float) -> float | None:
    """Seconds left of this phase's deadline (``$PHASE_DEADLINE_S``, set by ``run.py``), or None."""
    import time

    d = os.environ.get("PHASE_DEADLINE_S")
    return None if d is None else float(d) - (time.time() - start)


def register_group(pgid: int) -> None:
    """A server's process group, for ``run.py`` to kill at this phase's deadline (servers run in
    sessions of their own and outlive a killed phase otherwise)."""
    d = os.environ.get("PHASE_DIR")
    if d:
        with open(Path(d) / "pgids", "a") as f:
            f.write(f"{pgid}\n")
