"""Every ``FAIRKV_*`` environment variable the project reads, in one place.

Read through these accessors, never with ``os.environ`` elsewhere in the package.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository checkout this package runs from (editable install), or None for a wheel install.
_PKG_DIR = Path(__file__).resolve().parent
_REPO_DIR = _PKG_DIR.parents[1] if (_PKG_DIR.parents[1] / "Makefile").exists() else None


def model_dir() -> Path:
    """``FAIRKV_MODEL_DIR``: where local models are prepared.

    Default: ``<repo>/models`` in a checkout, else ``~/.cache/sglang-fairkv/models``.
    """
    v = os.environ.get("FAIRKV_MODEL_DIR")
    if v:
        return Path(v)
    if _REPO_DIR is not None:
        return _REPO_DIR / "models"
    return Path.home() / ".cache" / "sglang-fairkv" / "models"


def force_cpu() -> bool:
    """``FAIRKV_FORCE_CPU=1``: behave as on a machine without CUDA even when CUDA is present."""
    return os.environ.get("FAIRKV_FORCE_CPU", "") == "1"


def kv_compress_json() -> str | None:
    """``FAIRKV_KV_COMPRESS``: the server's ``CompressConfig`` as JSON, set by ``launch_server`` when
    the fairkv backend is on (scheduler processes are spawned: settings travel in the environment)."""
    return os.environ.get("FAIRKV_KV_COMPRESS") or None


def set_kv_compress_json(text: str) -> None:
    os.environ["FAIRKV_KV_COMPRESS"] = text


def kv_page_size() -> int:
    """``FAIRKV_KV_PAGE_SIZE``: rows per page of the ragged pool (default 16)."""
    v = os.environ.get("FAIRKV_KV_PAGE_SIZE", "16")
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"FAIRKV_KV_PAGE_SIZE must be a positive integer, got {v!r}")
    return int(v)


def profile_dir() -> str | None:
    """``FAIRKV_PROFILE_DIR``: when set, every fairkv scheduler appends one JSON line per compressed
    prompt (kept tokens per layer and KV head) to ``<dir>/rank<tp_rank>.jsonl`` (used by
    ``python -m sglang_fairkv.profiler``)."""
    return os.environ.get("FAIRKV_PROFILE_DIR") or None


def decode_kernel() -> str:
    """``FAIRKV_DECODE_KERNEL``: the fairkv backend's CUDA decode path, ``triton`` (default, the ragged
    kernel in ``kernels/``, reading the page table) or ``torch`` (padded torch path, as on CPU)."""
    v = os.environ.get("FAIRKV_DECODE_KERNEL", "triton")
    if v not in ("triton", "torch"):
        raise ValueError(f"FAIRKV_DECODE_KERNEL must be triton or torch, got {v!r}")
    return v


def plan_path() -> str | None:
    """``FAIRKV_PLAN``: the ``fairkv-plan/1`` file every scheduler process serves (written by
    ``launch_server`` from ``--fairkv-plan``, already checked against the model and TP size). Unset:
    TP = 1 with every head on rank 0."""
    return os.environ.get("FAIRKV_PLAN") or None


def set_plan_path(path: str) -> None:
    os.environ["FAIRKV_PLAN"] = path


def cpu_start_method() -> str:
    """``FAIRKV_CPU_START_METHOD``: how a CPU server starts SGLang's scheduler and detokenizer
    processes: ``fork`` (default: they inherit the launcher's imports instead of importing SGLang and
    torch again) or ``spawn`` (SGLang's own choice, needed on CUDA)."""
    v = os.environ.get("FAIRKV_CPU_START_METHOD", "fork")
    if v not in ("fork", "spawn"):
        raise ValueError(f"FAIRKV_CPU_START_METHOD must be fork or spawn, got {v!r}")
    return v


def _positive(name: str, default: str, cast=int):
    v = os.environ.get(name, default)
    try:
        x = cast(v)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if x < 0 or (cast is int and x == 0):
        raise ValueError(f"{name} must be {'>= 1' if cast is int else '>= 0'}, got {v!r}")
    return x


def live_window() -> int:
    """``FAIRKV_LIVE_WINDOW``: compressed prompts the live profile keeps (the most recent; default 1024)."""
    return _positive("FAIRKV_LIVE_WINDOW", "1024")


def balance_sample_steps() -> int:
    """``FAIRKV_BALANCE_SAMPLE_STEPS``: the per-layer balance is added to its since-start average every
    this many decode steps (default 16; host work, outside the forward)."""
    return _positive("FAIRKV_BALANCE_SAMPLE_STEPS", "16")


def drift_interval_s() -> float:
    """``FAIRKV_DRIFT_INTERVAL_S``: the plan-drift report (it runs the planner) is recomputed at most this
    often, seconds (default 30; 0: whenever new prompts arrived)."""
    return _positive("FAIRKV_DRIFT_INTERVAL_S", "30", float)


def prefix_tier_fraction() -> float:
    """``FAIRKV_PREFIX_TIER``: the most of each rank's KV pages the dense prefix tier may keep once its
    prefills are done, in [0, 1] (0: no tier, SGLang's radix cache off; set by ``launch_server`` from
    ``--fairkv-prefix-tier``, default 0 when unset, i.e. outside our launcher)."""
    v = os.environ.get("FAIRKV_PREFIX_TIER", "0")
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"FAIRKV_PREFIX_TIER must be a number in [0, 1], got {v!r}") from None
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"FAIRKV_PREFIX_TIER must be in [0, 1], got {v!r}")
    return x


def set_prefix_tier_fraction(x: float) -> None:
    os.environ["FAIRKV_PREFIX_TIER"] = repr(float(x))


#: ``--kv-cache-dtype`` values the ragged pool stores itself (fp8 rows), and their torch dtype names
KV_STORE_DTYPES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def kv_store_dtype():
    """``FAIRKV_KV_DTYPE``: the ragged pool's row dtype when it is not the model's (``fp8_e4m3`` /
    ``fp8_e5m2``, set by ``launch_server`` from ``--kv-cache-dtype``), as a torch dtype; None: the model's."""
    v = os.environ.get("FAIRKV_KV_DTYPE") or None
    if v is None:
        return None
    if v not in KV_STORE_DTYPES:
        raise ValueError(f"FAIRKV_KV_DTYPE must be one of {', '.join(KV_STORE_DTYPES)}, got {v!r}")
    import torch

    return getattr(torch, KV_STORE_DTYPES[v])


def set_kv_store_dtype(name: str | None) -> None:
    if name is None:
        os.environ.pop("FAIRKV_KV_DTYPE", None)
    else:
        os.environ["FAIRKV_KV_DTYPE"] = name


def auto_replan() -> dict | None:
    """The automatic re-plan (``--fairkv-auto-replan GAIN``, off when ``FAIRKV_AUTO_REPLAN`` is unset):
    ``gain`` (switch when a fresh plan's cost-model gain is at least this), ``interval_s``
    (``FAIRKV_AUTO_REPLAN_INTERVAL_S``, default 600: never more often), ``min_samples``
    (``FAIRKV_AUTO_REPLAN_MIN_SAMPLES``, default 64 compressed prompts profiled), ``check_steps``
    (``FAIRKV_AUTO_REPLAN_CHECK_STEPS``, default 256 scheduler iterations between checks), ``timeout_s``
    (``FAIRKV_AUTO_REPLAN_TIMEOUT_S``, default 60: how long the armed switch waits for a step boundary)."""
    v = os.environ.get("FAIRKV_AUTO_REPLAN") or None
    if v is None:
        return None
    try:
        gain = float(v)
    except ValueError:
        raise ValueError(f"FAIRKV_AUTO_REPLAN must be a number >= 1, got {v!r}") from None
    if not gain >= 1.0:
        raise ValueError(f"FAIRKV_AUTO_REPLAN must be a number >= 1, got {v!r}")
    return {"gain": gain, "interval_s": _positive("FAIRKV_AUTO_REPLAN_INTERVAL_S", "600", float),
            "min_samples": _positive("FAIRKV_AUTO_REPLAN_MIN_SAMPLES", "64"),
            "check_steps": _positive("FAIRKV_AUTO_REPLAN_CHECK_STEPS", "256"),
            "timeout_s": _positive("FAIRKV_AUTO_REPLAN_TIMEOUT_S", "60", float)}


def set_auto_replan(gain: float | None, interval_s: float | None = None, min_samples: int | None = None) -> None:
    """What ``launch_server`` hands the schedulers from ``--fairkv-auto-replan*`` (None: leave as is)."""
    for name, x in (("FAIRKV_AUTO_REPLAN", gain), ("FAIRKV_AUTO_REPLAN_INTERVAL_S", interval_s),
                    ("FAIRKV_AUTO_REPLAN_MIN_SAMPLES", min_samples)):
        if x is not None:
            os.environ[name] = repr(x) if isinstance(x, float) else str(x)


def replan_head_slots() -> int | None:
    """``FAIRKV_REPLAN_HEAD_SLOTS`` (``--fairkv-replan-head-slots``): KV head slots per layer every rank's pool
    reserves for later plans (None: the start plan's most heads on a rank)."""
    v = os.environ.get("FAIRKV_REPLAN_HEAD_SLOTS") or None
    return None if v is None else _positive("FAIRKV_REPLAN_HEAD_SLOTS", v)


def set_replan_head_slots(n: int | None) -> None:
    if n is None:
        os.environ.pop("FAIRKV_REPLAN_HEAD_SLOTS", None)
    else:
        os.environ["FAIRKV_REPLAN_HEAD_SLOTS"] = str(int(n))
