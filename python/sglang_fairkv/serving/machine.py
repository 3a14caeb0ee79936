"""Where we run: CUDA or CPU, and the process environment SGLang needs on a CPU-only machine."""

from __future__ import annotations

import os

from .. import env


def has_cuda() -> bool:
    """True when a CUDA device is usable (and ``FAIRKV_FORCE_CPU`` is not set)."""
    if env.force_cpu():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def cpu_omp_bind(tp_size: int, cores: list[int] | None = None) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` value giving each TP rank its own cores.

    Cores are split into ``tp_size`` contiguous groups; with fewer cores than ranks, ranks share
    cores round-robin (correct, just slower). Example: 2 cores, tp 2 -> ``"0|1"``.
    """
    if cores is None:
        cores = sorted(os.sched_getaffinity(0))
    if tp_size <= len(cores):
        per = len(cores) // tp_size
        groups = [cores[r * per : (r + 1) * per] for r in range(tp_size)]
    else:
        groups = [[cores[r % len(cores)]] for r in range(tp_size)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def _affinity_narrowed() -> bool:
    """True when this process may run on fewer cores than the machine has."""
    if not hasattr(os, "sched_getaffinity"):
        return False
    return len(os.sched_getaffinity(0)) < (os.cpu_count() or 1)


def configure_cpu_environment(tp_size: int) -> None:
    """Set, unless the user already did, the environment SGLang 0.5.23 needs on CPU.

    ``tp_size``: the scheduler ranks this process starts (DP replicas x TP ranks), each bound to its
    own cores. Must run before SGLang is imported (several of these are read at import time).
    """
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # else --device cpu imports vllm and dies
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads, ever
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # avoids a 20 s g++ compile at start
    if tp_size > 1 or _affinity_narrowed():
        # each rank its own cores, within the cores this process may use (taskset, a cgroup, a test
        # worker): SGLang's own TP = 1 default binds every core of the NUMA node
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_omp_bind(tp_size))
    from sglang_fairkv_patches import enable_cpu_startup_patches

    enable_cpu_startup_patches()
