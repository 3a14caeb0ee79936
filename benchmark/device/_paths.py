"""Put this checkout's packages on ``sys.path`` for the device checks.

The lent GPU machine gets the working tree and nothing installed but torch and Triton (SGLang comes
from a carried bundle), so these scripts import the project from its folders: the serving package
(``python/``), the kernels (``kernels/``), the patches (``patches/``) and the float64 decode oracle the
tests use (``test/helpers/decode_reference.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: the folders that hold the project's importable packages, in import order
SOURCE_DIRS = [REPO / "python", REPO / "kernels", REPO / "patches", REPO / "test"]

for _d in reversed(SOURCE_DIRS):
    if str(_d) not in sys.path:
        sys.path.insert(0, str(_d))


def pythonpath(*extra: str | Path) -> str:
    """A ``PYTHONPATH`` for child processes: ``extra`` first, then the project's package folders."""
    return ":".join(str(p) for p in [*extra, *SOURCE_DIRS[:3]])
