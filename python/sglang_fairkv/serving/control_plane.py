"""The fairkv control plane: ``GET /fairkv/plan`` and ``POST /fairkv/replan`` (issue 34, first part).

SGLang's own control-plane pattern (``/update_weights_from_disk``, ``/flush_cache``): the HTTP route
sends a request through the tokenizer manager's fan-out communicator; the scheduler of TP rank 0 of
every DP replica receives it, broadcasts it to its TP group in the same iteration as every other
input, each rank handles it from state identical on every rank (the group ledger), and rank 0 replies.

* ``GET /fairkv/plan``: the running plan (``fairkv-plan/1``), its epoch (switches so far) and its hash
  (:func:`~sglang_fairkv.placement.transition.plan_hash`), per DP replica.
* ``POST /fairkv/replan``: ``{"plan": {...}}`` | ``{"plan_path": "..."}`` | ``{"from_live": true,
  "strategy": "fairkv" | "assign", "max_copies_per_layer": K}`` (planned from the server's live
  profile), ``"mode": "drain" | "migrate"``, ``"dry_run"``. A plan for another model shape or TP size:
  400 naming the problem. ``dry_run``: the transition the switch would make from the live segments
  (:func:`~sglang_fairkv.placement.transition.plan_transition`: owners under B, segments / rows / bytes
  that move, pages per rank before and after, whether it fits and in how many rounds); nothing changes.
  The switch itself (drain, migrate) is not built yet: 501 with that message, plan A keeps serving.

Hooks: AFTER ``TokenizerControlMixin.init_communicators`` (launcher process) and AFTER
``Scheduler.init_request_dispatcher`` (each scheduler); the message types are registered for
SGLang's msgpack IPC too (pickle is its default).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import numpy as np
from fastapi import Request  # module level: route annotations are resolved here (postponed evaluation)
from sglang.srt.managers.io_struct import BaseReq

logger = logging.getLogger(__name__)

T_INIT_COMMUNICATORS = "sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.init_communicators"
T_INIT_DISPATCHER = "sglang.srt.managers.scheduler.Scheduler.init_request_dispatcher"
MODES = ("drain", "migrate")


class FairKVControlReq(BaseReq, kw_only=True):
    """``op``: ``plan`` | ``replan``; ``body``: the HTTP request's JSON."""

    op: str
    body: Dict[str, Any]


class FairKVControlReqOutput(BaseReq, kw_only=True):
    """``status``: the HTTP status; ``result``: the JSON answer of one DP replica."""

    status: int
    result: Dict[str, Any]


def _register_types() -> None:
    from sglang.srt.managers import io_struct

    io_struct.hook_custom_types(FairKVControlReq, FairKVControlReqOutput)


# ---- launcher process -------------------------------------------------------------------------------
def init_communicators_hook(result, tokenizer_manager, *args, **kwargs):
    """AFTER ``init_communicators``: a fan-out communicator for our requests (one reply per DP replica)."""
    from sglang.srt.managers.communicator import FanOutCommunicator
    from sglang.srt.runtime_context import get_parallel
    from sglang.utils import TypeBasedDispatcher

    _register_types()
    comm = FanOutCommunicator(tokenizer_manager._dispatch_to_scheduler, get_parallel().num_dp_ranks)
    tokenizer_manager.fairkv_control_communicator = comm
    tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(FairKVControlReqOutput, comm.handle_recv)])
    return result


def add_routes(app) -> None:
    """``GET /fairkv/plan`` and ``POST /fairkv/replan`` on SGLang's FastAPI ``app`` (before it starts)."""
    from fastapi.responses import JSONResponse

    async def call(op: str, body: dict) -> JSONResponse:
        from sglang.srt.entrypoints.http_server import get_global_state

        tm = get_global_state().tokenizer_manager
        comm = getattr(tm, "fairkv_control_communicator", None)
        if comm is None:
            return JSONResponse({"error": "the fairkv control plane is not set up in this server"}, status_code=503)
        tm.auto_create_handle_loop()
        outs = await comm.queueing_call(FairKVControlReq(op=op, body=body))
        status = max(o.status for o in outs)
        results = [o.result for o in outs]
        return JSONResponse(results[0] if len(results) == 1 else {"replicas": results}, status_code=status)

    @app.get("/fairkv/plan")
    async def fairkv_plan():  # noqa: ANN202 - FastAPI route
        return await call("plan", {})

    @app.post("/fairkv/replan")
    async def fairkv_replan(request: Request):  # noqa: ANN202 - FastAPI route
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        return await call("replan", body)


# ---- scheduler processes ------------------------------------------------------------------------------
def init_dispatcher_hook(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.init_request_dispatcher``: our request type goes to :func:`handle`."""
    from sglang.utils import TypeBasedDispatcher

    _register_types()
    scheduler._request_dispatcher += TypeBasedDispatcher([(FairKVControlReq, lambda req: handle(scheduler, req))])
    return result


def handle(scheduler, req: FairKVControlReq) -> FairKVControlReqOutput:
    """Every rank of the group runs this in the same iteration; rank 0's answer goes back."""
    from .pool_hooks import process_state

    state = process_state()
    if state is None:
        return FairKVControlReqOutput(status=404, result={"error": "this server runs without the fairkv backend "
                                                                   "(no --kv-compress / --fairkv-plan)"})
    try:
        if req.op == "plan":
            return FairKVControlReqOutput(status=200, result=running_plan(state))
        if req.op == "replan":
            return replan(scheduler, state, req.body)
        return FairKVControlReqOutput(status=400, result={"error": f"unknown fairkv control op {req.op!r}"})
    except Exception as e:  # noqa: BLE001 - one answer for the client, the server keeps serving
        logger.exception("fairkv control request %s failed", req.op)
        return FairKVControlReqOutput(status=500, result={"error": f"{type(e).__name__}: {e}"})


def running_plan(state) -> dict:
    from ..placement.transition import plan_hash

    plan = state.rank_plan.plan
    return {"plan": plan.to_json(), "epoch": int(state.plan_epoch), "plan_hash": plan_hash(plan),
            "tp": plan.tp, "dp_rank": state.dp_rank or 0}


def _plan_b(state, body: dict):
    """Plan B from the request body (PlanError / ValueError: a 400)."""
    from ..placement.schema import PlanError, load_plan, plan_from_json

    a = state.rank_plan.plan
    given = [k for k in ("plan", "plan_path", "from_live") if body.get(k)]
    if len(given) != 1:
        raise ValueError('give exactly one of "plan" (a fairkv-plan/1 object), "plan_path" or "from_live": true')
    if given[0] == "plan":
        b = plan_from_json(body["plan"])
    elif given[0] == "plan_path":
        if not Path(str(body["plan_path"])).is_file():
            raise ValueError(f"plan_path {body['plan_path']}: no such file on the server")
        b = load_plan(str(body["plan_path"]))
    else:
        live = state.traffic.live_mean()
        if live is None:
            raise ValueError("from_live: no compressed prompt profiled yet (the live profile is empty)")
        from ..placement.drift import planning_cost
        from ..placement.planner import build_plan
        from ..placement.stats import KVStats

        strategy = str(body.get("strategy", "fairkv"))
        if strategy not in ("fairkv", "assign"):
            raise ValueError(f'strategy must be "fairkv" or "assign", got {strategy!r}')
        stats = KVStats(model=a.model, num_layers=a.num_layers, num_q_heads=state.rank_plan.num_q_heads,
                        num_kv_heads=a.num_kv_heads, head_dim=state.pool.head_dim, kv_len_mean=live)
        copies = int(body.get("max_copies_per_layer", 1)) if strategy == "fairkv" else 0
        b, _ = build_plan(stats, a.tp, strategy, cost=planning_cost(a, stats.group_size, stats.hidden),
                          max_copies_per_layer=copies)
    try:
        b.check_model(a.num_layers, a.num_kv_heads, a.tp, state.rank_plan.num_q_heads)
    except PlanError as e:
        raise ValueError(str(e)) from None
    return b


def live_segments(scheduler, state):
    """The running requests as the group ledger holds them (admission order), with the decode rows each
    may still add (``max_new_tokens`` less the tokens it generated)."""
    from ..placement.transition import LiveSegments

    reqs = state.requests
    idx = [int(r) for r in reqs.admitted]
    if not idx:
        return LiveSegments.empty(state.ledger.owner.shape[1], state.ledger.owner.shape[2])
    owed = {}
    for r in getattr(getattr(scheduler, "running_batch", None), "reqs", None) or []:
        slot = getattr(getattr(r, "kv", None), "req_pool_idx", None)
        if slot is not None:
            owed[int(slot)] = max(0, int(r.sampling_params.max_new_tokens or 0) - len(r.output_ids))
    rids = [reqs.admitted[i] for i in idx]
    weights = np.array([state.assigner.weight_of(rid) for rid in rids], dtype=np.float64)
    return LiveSegments(rids, weights, state.ledger.owner[idx].numpy().copy(), state.ledger.length[idx].numpy().copy(),
                        np.array([owed.get(i, 0) for i in idx], dtype=np.int64))


def replan(scheduler, state, body: dict) -> FairKVControlReqOutput:
    from ..placement.transition import plan_transition

    mode = body.get("mode", "migrate")
    if mode not in MODES:
        return FairKVControlReqOutput(status=400, result={"error": f'mode must be one of {", ".join(MODES)}, got {mode!r}'})
    try:
        b = _plan_b(state, body)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        return FairKVControlReqOutput(status=400, result={"error": str(e)})
    a = state.rank_plan.plan
    live = live_segments(scheduler, state)
    tier = state.ledger.tier_pages()
    usable = (state.ledger.usable - tier).numpy()
    pool_heads = np.array([state.pool.num_kv_heads if q == state.rank_plan.rank else max(
        1, max(len(a.heads_on_rank(l, q)) for l in range(a.num_layers))) for q in range(a.tp)])
    t = plan_transition(a, b, live, usable=usable, page_size=state.pool.page_size, pool_heads=pool_heads)
    row_bytes = 2 * state.pool.head_dim * state.pool.k_rows.element_size()
    result = {"dry_run": bool(body.get("dry_run")), "mode": mode, "epoch": int(state.plan_epoch),
              "running_requests": len(live.rids), "transition": t.summary(row_bytes)}
    if body.get("dry_run"):
        result["success"] = t.fits
        return FairKVControlReqOutput(status=200, result=result)
    result.update(success=False, error=f"the {mode} switch is not built yet (issue 34): only \"dry_run\": true "
                  "answers; plan A keeps serving")
    return FairKVControlReqOutput(status=501, result=result)
