"""Where the FairKV model classes get this rank's plan (the model floor imports nothing above it).

The serving floor installs the provider in every scheduler process before the model loads
(:func:`sglang_fairkv.serving.worker.prepare_scheduler_process` -> :func:`set_provider`): it answers
with the one current plan of the process (``serving.server_plan``: the start plan, then each switched
one), so weights, pool and ledger follow the same plan.
"""

from __future__ import annotations

from collections.abc import Callable

_provider: Callable | None = None


def set_provider(fn: Callable) -> None:
    """``fn(hf_config) -> RankPlan``: this process's current rank plan for a model config."""
    global _provider
    _provider = fn


def rank_plan(hf_config):
    """This rank's current plan for ``hf_config`` (a :class:`~sglang_fairkv.placement.runtime.RankPlan`)."""
    if _provider is None:
        raise RuntimeError("the FairKV model classes load inside sglang-fairkv's scheduler processes (launch "
                           "with python -m sglang_fairkv.launch_server): no rank-plan provider is installed")
    return _provider(hf_config)
