"""What this server serves, read in each scheduler process: the compression setting and the FairKV plan.

The launcher checks both before anything starts and hands them to SGLang's scheduler processes
through the environment (``FAIRKV_KV_COMPRESS``, ``FAIRKV_PLAN``: schedulers are spawned on CUDA, so
nothing else travels); here they are read back once per process. The model classes
(:mod:`sglang_fairkv.model`, through the provider :mod:`~sglang_fairkv.model.plan_source` the worker installs)
and the pool hook both ask :func:`server_rank_plan`, so a rank's weights and its KV pool follow the same
plan; a plan switch sets the process's current plan (:func:`set_current_plan`).
"""

from __future__ import annotations

import functools
import os

from .. import env


def compress_config():
    """The server's ``CompressConfig`` from the environment, or None (fairkv off)."""
    text = env.kv_compress_json()
    if text is None:
        return None
    from ..compress.policy import CompressConfig

    return CompressConfig.from_json(text)


def server_rank_plan(hf_config, num_layers: int | None = None):
    """This scheduler's :class:`RankPlan` for an HF config (model classes and pool hook alike):
    ``FAIRKV_PLAN`` checked against the checkpoint's shape and the TP size, or at TP = 1 without
    one, every head on rank 0. ``num_layers`` defaults to the config's."""
    from sglang.srt.runtime_context import get_parallel

    from ..model.heads import checkpoint_heads
    from ..placement.runtime import RankPlan

    p = get_parallel()
    q, kv, _ = checkpoint_heads(hf_config)  # SGLang pads head counts on CPU at odd TP
    layers = hf_config.num_hidden_layers if num_layers is None else num_layers
    plan = _CURRENT[0] if _CURRENT else _server_plan(env.plan_path(), getattr(hf_config, "_name_or_path", ""),
                                                      layers, kv, q, p.tp_size)
    return RankPlan(plan, p.tp_rank, q)


#: the plan this process serves after a switch (the one owner of "the current plan"; empty: the start plan)
_CURRENT: list = []


def set_current_plan(plan) -> None:
    """A plan switch committed: every later :func:`server_rank_plan` answers ``plan``."""
    _CURRENT[:] = [plan]


@functools.lru_cache(maxsize=4)
def _server_plan(path: str | None, model: str, num_layers: int, num_kv_heads: int, num_q_heads: int, tp: int):
    """Read and check the plan once per process (the model load and the pool hook both need it)."""
    from ..placement.runtime import resolve_plan, sha_plan

    if path is None:
        if tp != 1:
            raise RuntimeError("the fairkv backend at TP > 1 needs a FairKV plan (launch with "
                               "python -m sglang_fairkv.launch_server; it passes --fairkv-plan sha by default)")
        return sha_plan(model, num_layers, num_kv_heads, num_q_heads, 1)
    return resolve_plan(path, model=model, num_layers=num_layers, num_kv_heads=num_kv_heads,
                        num_q_heads=num_q_heads, tp=tp)


def check_model_package() -> None:
    """With a FairKV plan, SGLang must resolve our model classes (it only logs a failed import of an
    external model package and would fall back to its own, which splits heads contiguously)."""
    if env.plan_path() is None:
        return
    from sglang.srt.models.registry import ModelRegistry

    from ..model import ARCHITECTURES

    if os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE") != "sglang_fairkv.model":
        raise RuntimeError("FAIRKV_PLAN is set but SGLANG_EXTERNAL_MODEL_PACKAGE is not sglang_fairkv.model")
    for arch in ARCHITECTURES:
        got = ModelRegistry.models.get(arch)
        if got is None or not getattr(got, "fairkv", False):
            raise RuntimeError(f"SGLang resolves {arch} to {got}, not the FairKV class (see the "
                               "log for an import error in sglang_fairkv.model)")
