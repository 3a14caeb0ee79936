"""The compatibility patches sglang-fairkv applies to SGLang 0.5.23 (see ``patches/README.md``).

Two kinds:
  * environment patches for the slim CPU install: the ``sgl_kernel`` stand-in (``cpu_path/``, put
    first on ``PYTHONPATH`` for the launcher and every process SGLang spawns) and the torchvision
    schema patch (``torchvision_ops.py``, installed into the venv as a ``.pth`` import hook by
    ``make install``, because every ``transformers`` import trips over it, not only SGLang's), and
  * function hooks registered with SGLang's ``HookRegistry`` inside each scheduler process
    (:func:`apply_process_patches`), verified after they are applied.

This module is importable without torch or SGLang.
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


PTH_NAME = "fairkv_torchvision_fix.pth"
#: One line, executed by ``site`` at every interpreter start in the venv (see torchvision_ops.py).
PTH_LINE = (
    "import sys; exec('try:\\n from sglang_fairkv.patches.torchvision_ops import install_import_hook"
    " as _f\\nexcept ImportError:\\n pass\\nelse:\\n _f()')\n"
)


def registered_hook_targets(on_cpu: bool) -> list[tuple[str, object, str]]:
    """The ``(target, hook, hook_type name)`` triples this project registers for a device."""
    targets: list[tuple[str, object, str]] = []
    if on_cpu:
        from . import pynccl_cpu

        targets.append((pynccl_cpu.TARGET, pynccl_cpu.force_no_pynccl, "BEFORE"))
    return targets


def apply_process_patches(on_cpu: bool, extra: list[tuple[str, object, str]] = ()) -> list[str]:
    """Register this project's hooks with SGLang's ``HookRegistry``, apply them, verify.

    ``HookRegistry.apply_hooks`` only logs a failure; we raise instead, so that a scheduler process
    whose patch did not apply dies at start-up (and the server with it) rather than serving wrongly.

    Returns the list of patched targets.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    triples = registered_hook_targets(on_cpu) + list(extra)
    for target, hook, kind in triples:
        already = any(h is hook for _, h, _ in HookRegistry._hooks.get(target, []))
        if not already:
            HookRegistry.register(target, hook, HookType[kind])
    HookRegistry.apply_hooks()
    missing = [t for t, _, _ in triples if t not in HookRegistry._patched]
    if missing:
        raise RuntimeError(
            f"sglang-fairkv: SGLang hooks did not apply to {missing}; this SGLang version "
            "(expected 0.5.23) does not have the code these patches change. Refusing to start."
        )
    return [t for t, _, _ in triples]


def install_torchvision_pth() -> Path:
    """Write the torchvision import-hook ``.pth`` into this interpreter's site-packages."""
    import sysconfig

    path = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    if not path.exists() or path.read_text() != PTH_LINE:
        path.write_text(PTH_LINE)
    return path
