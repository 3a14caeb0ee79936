"""The compatibility patches sglang-fairkv applies to SGLang 0.5.23 (see ``patches/README.md``).

Two kinds:
  * environment patches for the slim CPU install: the ``sgl_kernel`` stand-in (``cpu_path/``, put
    first on ``PYTHONPATH`` for the launcher and every process SGLang spawns) and the torchvision
    schema patch (``torchvision_ops.py``, installed into the venv as a ``.pth`` import hook by
    ``make install``, because every ``transformers`` import trips over it, not only SGLang's), and
  * an import hook for SGLang's frontend language (``frontend_chat_template.py``: SmolLM2-Instruct ->
    ChatML), installed as a ``.pth`` by ``make install``, and
  * function hooks for SGLang's ``HookRegistry`` (``pynccl_cpu``: every CPU scheduler process;
    ``fork_children``: a CPU launcher). Each module names its ``TARGET`` and its hook; which process
    registers which, and the check that they applied, live in ``sglang_fairkv.serving.hooks``.

This package is importable without torch or SGLang, and imports nothing of ``sglang_fairkv``.
"""

from __future__ import annotations

import os
from pathlib import Path

CPU_PATH = Path(__file__).resolve().parent / "cpu_path"


def cpu_pythonpath(existing: str | None) -> str:
    """``PYTHONPATH`` value with the CPU start-up folder first (idempotent)."""
    parts = [p for p in (existing or "").split(os.pathsep) if p and p != str(CPU_PATH)]
    return os.pathsep.join([str(CPU_PATH), *parts])


def enable_cpu_startup_patches() -> None:
    """Make the current process and every child it spawns find the ``sgl_kernel`` stand-in.

    Must run before the first ``import sglang`` of this process.
    """
    import sys

    os.environ["PYTHONPATH"] = cpu_pythonpath(os.environ.get("PYTHONPATH"))
    if str(CPU_PATH) not in sys.path:
        sys.path.insert(0, str(CPU_PATH))
    from .torchvision_ops import install_import_hook

    install_import_hook()  # no-op when the venv's .pth hook is already installed


def _pth_line(module: str) -> str:
    """One ``.pth`` line, run by ``site`` at every interpreter start in the venv: ``module``'s
    ``install_import_hook()`` (nothing when this package is not importable)."""
    return (f"import sys; exec('try:\\n from {module} import install_import_hook as _f\\nexcept ImportError:\\n"
            " pass\\nelse:\\n _f()')\n")


PTH_NAME = "fairkv_torchvision_fix.pth"
#: the torchvision schema patch (slim CPU install only; see torchvision_ops.py)
PTH_LINE = _pth_line("sglang_fairkv_patches.torchvision_ops")
FRONTEND_PTH_NAME = "fairkv_frontend_chat_template.pth"
#: SmolLM2-Instruct -> ChatML in SGLang's frontend language (every install; see frontend_chat_template.py)
FRONTEND_PTH_LINE = _pth_line("sglang_fairkv_patches.frontend_chat_template")


def _write_pth(name: str, line: str) -> Path:
    import sysconfig

    path = Path(sysconfig.get_paths()["purelib"]) / name
    if not path.exists() or path.read_text() != line:
        path.write_text(line)
    return path


def install_frontend_pth() -> Path:
    """Write the frontend chat-template import-hook ``.pth`` into this interpreter's site-packages."""
    return _write_pth(FRONTEND_PTH_NAME, FRONTEND_PTH_LINE)


def install_torchvision_pth() -> Path:
    """Write the torchvision import-hook ``.pth`` into this interpreter's site-packages."""
    return _write_pth(PTH_NAME, PTH_LINE)
