"""Patch: start SGLang's scheduler and detokenizer processes by ``fork`` on a CPU server.

Why: ``sglang/srt/entrypoints/engine.py::_set_envs_and_config`` (SGLang 0.5.23) forces
``mp.set_start_method("spawn", force=True)``, which CUDA needs. On a CPU each spawned child imports
SGLang and torch again (about 15 s of one core each, two children per rank). Forked, they inherit the
launcher's modules, hooks and environment: a SmolLM2 AdaKV server on one core is healthy after 31 s
instead of 52 s, with the same answers. The launcher runs no model and no OpenMP-parallel torch op
before it forks, so the children's thread pools start clean.

What: an AFTER hook on that function, registered in the launcher process on CPU only, unless
``FAIRKV_CPU_START_METHOD=spawn`` (see ``sglang_fairkv.serving.hooks.launcher_hooks``).
"""

from __future__ import annotations

TARGET = "sglang.srt.entrypoints.engine._set_envs_and_config"


def fork_children_hook(result, *args, **kwargs):
    """AFTER hook: SGLang's children start by ``fork`` from here on."""
    import multiprocessing as mp

    mp.set_start_method("fork", force=True)
    return None
