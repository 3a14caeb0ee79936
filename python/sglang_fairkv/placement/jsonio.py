"""JSON reading and field checks shared by the stats and plan schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, error: type[ValueError]) -> Any:
    """Parse ``path``; unreadable files and invalid JSON raise ``error`` with the reason."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from e


def require_int(d: dict, key: str, error: type[ValueError], *, lo: int = 1, where: str = "",
                required: bool = True) -> int | None:
    """``d[key]`` as an int >= ``lo`` (bools refused); missing -> ``error`` or None."""
    if key not in d:
        if required:
            raise error(f"{where}missing field {key!r}")
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise error(f"{where}{key} must be an integer >= {lo}, got {v!r}")
    return v
