"""``--fairkv-auto-replan GAIN``: the TP group re-plans by itself when the traffic has moved (issue 34).

Every ``check_steps`` scheduler iterations (``FAIRKV_AUTO_REPLAN_CHECK_STEPS``; the loop runs in lockstep on
every rank, so the count is the same everywhere) rank 0 reads the drift report of the live profile
(:meth:`~sglang_fairkv.telemetry.live_traffic.LiveTraffic.drift`: the planner's cost-model gain of a fresh
plan over the running one, over the last ``FAIRKV_LIVE_WINDOW`` compressed prompts, recomputed at most every
``FAIRKV_DRIFT_INTERVAL_S``). When the gain is at least GAIN, at least ``min_samples`` prompts are profiled
and the last switch or attempt is at least ``interval_s`` ago, rank 0 makes that plan, checks that it fits
every rank's pool head slots, and broadcasts it (one ``broadcast_object_list`` on the TP CPU group per
check, decision or not); every rank arms a migrate to it (:func:`~.control_plane.arm`), which commits at
the next step boundary like a requested one. Nobody waits for an answer: the log and ``/server_info``
``replan`` say what happened (``auto_switches``, ``last_auto_gain``, ``last_auto_skipped``).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .control_plane import SLOTS_HINT, arm, group_decides

logger = logging.getLogger(__name__)


def auto_replan_due(gain: float | None, samples: int, since_last_s: float, *, threshold: float | None,
                    min_samples: int, interval_s: float) -> bool:
    """Whether the group should switch by itself: on (``threshold`` set), enough compressed prompts
    profiled, the last switch or attempt at least ``interval_s`` ago, and the cost-model gain of a fresh
    plan at least ``threshold``."""
    return (threshold is not None and gain is not None and samples >= min_samples and since_last_s >= interval_s
            and gain >= threshold)


def auto_replan_check(scheduler, state) -> None:
    """Count an iteration; every ``check_steps`` of them rank 0 decides (:func:`_auto_plan`) and broadcasts
    the plan or None; every rank arms a migrate to it."""
    from .. import env

    cfg = env.auto_replan()
    if cfg is None:
        return
    state.auto_iter += 1
    if state.auto_iter % cfg["check_steps"]:
        return
    decision = _auto_plan(state, cfg) if state.rank_plan.rank == 0 else None
    decision = group_decides(decision)
    if decision is None:
        return
    from ..placement.schema import plan_from_json

    arm(state, plan=plan_from_json(decision["plan"]), mode="migrate", timeout=cfg["timeout_s"],
        result={"mode": "migrate", "auto": decision["why"]})
    logger.info("fairkv: automatic re-plan armed: %s", decision["why"])


def _auto_plan(state, cfg: dict) -> dict | None:
    """Rank 0: the plan to switch to now (JSON, with why), or None."""
    from ..placement.drift import fresh_plan, fresh_strategy
    from ..placement.transition import LiveSegments

    from .plan_switch import transition_for

    traffic, plan, log = state.traffic, state.rank_plan.plan, state.replan_log
    samples = min(traffic.seen, traffic.window)
    since = time.monotonic() - max(log["last_switch_at"], log["last_auto_attempt_at"])
    if not auto_replan_due(np.inf, samples, since, threshold=cfg["gain"], min_samples=cfg["min_samples"],
                           interval_s=cfg["interval_s"]):
        return None
    nq, hd = state.rank_plan.num_q_heads, state.pool.head_dim
    drift = traffic.drift(plan, num_q_heads=nq, head_dim=hd)  # cached: the planner runs at most every interval
    if drift is None:
        return None
    gain = float(drift["replan_gain"])
    log["last_auto_gain"] = round(gain, 6)
    if gain < cfg["gain"]:
        return None
    strategy, copies = fresh_strategy(plan)  # the plan the gain was computed for
    b = fresh_plan(plan, traffic.live_mean(), num_q_heads=nq, head_dim=hd, strategy=strategy,
                   max_copies_per_layer=copies, balance_memory=False)
    t = transition_for(state, b, LiveSegments.empty(plan.num_layers, plan.num_kv_heads), tier_flushed=True)
    if not t.slots_fit:  # the pools cannot take it: say so, and not again before the interval
        log["last_auto_attempt_at"] = time.monotonic()
        log["last_auto_skipped"] = t.why + SLOTS_HINT
        logger.warning("fairkv: automatic re-plan (gain %.3f) skipped: %s", gain, log["last_auto_skipped"])
        return None
    return {"plan": b.to_json(), "why": f"re-plan gain {gain:.3f} >= {cfg['gain']} over {samples} prompts"}
