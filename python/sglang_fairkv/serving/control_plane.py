"""The fairkv control plane: ``GET /fairkv/plan`` and ``POST /fairkv/replan`` (issue 34).

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
  Otherwise the switch is armed on every rank in the same iteration (new prompts wait from then on, none
  is refused) and answered when it is done (:mod:`~sglang_fairkv.serving.plan_switch` commits it):
  ``drain`` at the first idle iteration, ``migrate`` at the first step boundary with no prompt half
  prefilled (usually the iteration that received it) while the running requests keep decoding. Past
  ``timeout_s`` (rank 0's clock, broadcast) the switch is cancelled (504); a migrate that does not fit the
  running requests is refused (409, the reason); either way plan A keeps serving. 409 for a second switch.
* ``--fairkv-auto-replan GAIN`` (off by default, :mod:`~sglang_fairkv.serving.auto_replan`): rank 0 arms
  the same migrate by itself when the drift report's re-plan gain is at least GAIN.

Hooks: AFTER ``TokenizerControlMixin.init_communicators`` (launcher process) and AFTER
``Scheduler.init_request_dispatcher`` (each scheduler); the message types are registered for
SGLang's msgpack IPC too (pickle is its default).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np
from fastapi import Request  # module level: route annotations are resolved here (postponed evaluation)
from sglang.srt.managers.io_struct import BaseReq

logger = logging.getLogger(__name__)

T_INIT_COMMUNICATORS = "sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.init_communicators"
T_INIT_DISPATCHER = "sglang.srt.managers.scheduler.Scheduler.init_request_dispatcher"
T_INGEST = "sglang.srt.managers.scheduler.Scheduler.ingest_requests"
T_ON_IDLE = "sglang.srt.managers.scheduler.Scheduler.on_idle"
MODES = ("drain", "migrate")
SLOTS_HINT = " (a server reserves more with --fairkv-replan-head-slots N at start)"


class FairKVControlReq(BaseReq, kw_only=True):
    """``op``: ``plan`` | ``replan``; ``body``: the HTTP request's JSON."""

    op: str
    body: Dict[str, Any]


class FairKVControlReqOutput(BaseReq, kw_only=True):
    """``status``: the HTTP status; ``result``: the JSON answer of one DP replica."""

    status: int
    result: Dict[str, Any]


class FairKVSwitchReqOutput(BaseReq, kw_only=True):
    """The answer to a switch (``op`` ``switch``: a drain), which comes when the switch is done: its own
    type and communicator, so ``GET /fairkv/plan`` and dry runs answer meanwhile."""

    status: int
    result: Dict[str, Any]


def _register_types() -> None:
    from sglang.srt.managers import io_struct

    io_struct.hook_custom_types(FairKVControlReq, FairKVControlReqOutput, FairKVSwitchReqOutput)


# ---- launcher process -------------------------------------------------------------------------------
def init_communicators_hook(result, tokenizer_manager, *args, **kwargs):
    """AFTER ``init_communicators``: a fan-out communicator for our requests (one reply per DP replica)."""
    from sglang.srt.managers.communicator import FanOutCommunicator
    from sglang.srt.runtime_context import get_parallel
    from sglang.utils import TypeBasedDispatcher

    _register_types()
    comm = FanOutCommunicator(tokenizer_manager._dispatch_to_scheduler, get_parallel().num_dp_ranks)
    switch = FanOutCommunicator(tokenizer_manager._dispatch_to_scheduler, get_parallel().num_dp_ranks)
    tokenizer_manager.fairkv_control_communicator = comm
    tokenizer_manager.fairkv_switch_communicator = switch
    tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(FairKVSwitchReqOutput, switch.handle_recv),
                                                                  (FairKVControlReqOutput, comm.handle_recv)])
    return result


def add_routes(app) -> None:
    """``GET /fairkv/plan`` and ``POST /fairkv/replan`` on SGLang's FastAPI ``app`` (before it starts)."""
    from fastapi.responses import JSONResponse

    async def call(op: str, body: dict) -> JSONResponse:
        from sglang.srt.entrypoints.http_server import get_global_state

        tm = get_global_state().tokenizer_manager
        comm = getattr(tm, "fairkv_switch_communicator" if op == "switch" else "fairkv_control_communicator", None)
        if comm is None:
            return JSONResponse({"error": "the fairkv control plane is not set up in this server"}, status_code=503)
        if op == "switch" and comm._queueing_lock.locked():  # one switch at a time, the next one is refused
            return JSONResponse({"error": "a plan switch is already in progress"}, status_code=409)
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
        switching = body.get("mode", "migrate") in MODES and not body.get("dry_run")  # answered when done
        return await call("switch" if switching else "replan", body)


# ---- scheduler processes ------------------------------------------------------------------------------
def init_dispatcher_hook(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.init_request_dispatcher``: our request type goes to :func:`handle`."""
    from sglang.utils import TypeBasedDispatcher

    _register_types()
    scheduler._request_dispatcher += TypeBasedDispatcher([(FairKVControlReq, lambda req: handle(scheduler, req))])
    return result


def handle(scheduler, req: FairKVControlReq):
    """Every rank of the group runs this in the same iteration; rank 0's answer goes back."""
    from .pool_hooks import process_state

    out = FairKVSwitchReqOutput if req.op == "switch" else FairKVControlReqOutput
    state = process_state()
    if state is None:
        return out(status=404, result={"error": "this server runs without the fairkv backend "
                                                "(no --kv-compress / --fairkv-plan)"})
    try:
        if req.op == "plan":
            return out(status=200, result=running_plan(state))
        if req.op in ("replan", "switch"):
            return replan(scheduler, state, req, out)
        return out(status=400, result={"error": f"unknown fairkv control op {req.op!r}"})
    except Exception as e:  # noqa: BLE001 - one answer for the client, the server keeps serving
        logger.exception("fairkv control request %s failed", req.op)
        return out(status=500, result={"error": f"{type(e).__name__}: {e}"})


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
        from ..placement.drift import fresh_plan

        strategy = str(body.get("strategy", "fairkv"))
        if strategy not in ("fairkv", "assign"):
            raise ValueError(f'strategy must be "fairkv" or "assign", got {strategy!r}')
        copies = int(body.get("max_copies_per_layer", 1)) if strategy == "fairkv" else 0
        b = fresh_plan(a, live, num_q_heads=state.rank_plan.num_q_heads, head_dim=state.pool.head_dim,
                       strategy=strategy, max_copies_per_layer=copies)
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
    last = getattr(scheduler, "last_batch", None)  # overlap scheduling: launched, not yet merged into running
    for r in [*(getattr(getattr(scheduler, "running_batch", None), "reqs", None) or []),
              *(getattr(last, "reqs", None) or [])]:
        slot = getattr(getattr(r, "kv", None), "req_pool_idx", None)
        if slot is not None:
            owed[int(slot)] = max(0, int(r.sampling_params.max_new_tokens or 0) - len(r.output_ids))
    rids = [reqs.admitted[i] for i in idx]
    weights = np.array([state.assigner.weight_of(rid) for rid in rids], dtype=np.float64)
    rows = state.ledger.length[idx].numpy().copy()
    owed_rows = np.array([owed.get(i, 0) for i in idx], dtype=np.int64)
    if state.cfg.decode_enabled:  # decode-time compression bounds what a segment still grows by
        from ..compress.footprint import decode_growth_bound

        owed_rows = np.minimum(owed_rows, decode_growth_bound(state.cfg, rows))
    return LiveSegments(rids, weights, state.ledger.owner[idx].numpy().copy(), rows, owed_rows)


def replan(scheduler, state, req: FairKVControlReq, out=FairKVControlReqOutput) -> FairKVControlReqOutput | None:
    """Dry run, or arm a switch (None: the answer to ``req`` comes at the switch: :func:`ingest_hook` for a
    migrate, :func:`on_idle_hook` for a drain); ``out`` the answer's type (the switch's own for ``op``
    ``switch``)."""
    from .plan_switch import transition_for

    body = req.body

    mode = body.get("mode", "migrate")
    if mode not in MODES:
        return out(status=400, result={"error": f'mode must be one of {", ".join(MODES)}, got {mode!r}'})
    if state.rank_plan.tp == 1:
        return out(status=400, result={"error": "this server runs at TP 1: one rank holds every KV head, there is "
                                                "no placement to switch (re-planning balances the ranks of a TP group)"})
    try:
        b = _plan_b(state, body)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        return out(status=400, result={"error": str(e)})
    live = live_segments(scheduler, state)
    # a migrate flushes the prefix tier before it moves anything: its pages count as free there
    t = transition_for(state, b, live, tier_flushed=mode == "migrate")
    row_bytes = state.pool.bytes_per_row()
    result = {"dry_run": bool(body.get("dry_run")), "mode": mode, "epoch": int(state.plan_epoch),
              "dp_rank": state.dp_rank or 0,
              "running_requests": len(live.rids), "transition": t.summary(row_bytes)}
    if body.get("dry_run"):
        result["success"] = t.fits
        return out(status=200, result=result)
    if state.pending_switch is not None:
        return out(status=409, result={"error": "a plan switch is already in progress"})
    if not t.slots_fit:
        return out(status=400, result={**result, "success": False, "error": t.why + SLOTS_HINT})
    try:
        timeout = float(body.get("timeout_s", 300))
    except (TypeError, ValueError):
        timeout = float("nan")
    if not timeout > 0:
        return out(status=400, result={"error": f"timeout_s must be a number > 0, got {body.get('timeout_s')!r}"})
    # every rank sets it in this iteration; new prompts wait from now on; the reply comes at the switch
    # (a migrate relabels B again from the live segments of its boundary, so it keeps B as given)
    arm(state, plan=t.plan if mode == "drain" else b, mode=mode, timeout=timeout, req=req, result=result, out=out)
    logger.info("fairkv: %s switch to plan %s armed (%d requests running; timeout %.0f s)", mode,
                result["transition"]["plan_hash"], len(live.rids), timeout)
    return None


def arm(state, *, plan, mode: str, timeout: float, req=None, result: dict | None = None, out=None) -> None:
    """A switch to ``plan`` pending on this rank (every rank, the same iteration); ``req`` None: nobody
    waits for the answer (an automatic switch)."""
    now = time.monotonic()
    state.pending_switch = {"plan": plan, "mode": mode, "req": req, "result": result or {"mode": mode},
                            "t0": now, "deadline": now + timeout, "out": out or FairKVSwitchReqOutput}


# ---- the switch: armed above, committed by the hooks below ---------------------------------------------


def gate_admission(state) -> bool:
    """Whether a new prompt must wait (a switch is armed)."""
    return state is not None and state.pending_switch is not None


def group_decides(decision):
    """Rank 0's ``decision`` (any picklable value) on every rank of the TP group (one broadcast on its CPU
    group): deadlines and the automatic re-plan read rank 0's clock and profile only."""
    from sglang.srt.runtime_context import get_parallel

    tp = get_parallel().tp_group
    if tp.world_size == 1:
        return decision
    import torch.distributed as dist

    box = [decision]
    dist.broadcast_object_list(box, src=tp.ranks[0], group=tp.cpu_group)
    return box[0]


def _answer(scheduler, sw: dict, status: int, fields: dict) -> None:
    if sw["req"] is not None:
        scheduler.send_control_output(sw["out"](status=status, result={**sw["result"], **fields}), sw["req"])


def _record(state, sw: dict, reply: dict) -> None:
    """The switch in ``/server_info`` / Prometheus (``state.replan_log``) and the log."""
    log = state.replan_log
    log["switches"] += 1
    log["auto_switches"] += int(sw["req"] is None)
    log["last"] = {k: reply.get(k) for k in ("mode", "epoch", "plan_hash", "pause_ms", "drain_ms", "moved",
                                              "graphs_recaptured", "verified")}
    log["last"]["auto"] = sw["req"] is None
    for k in ("kv_bytes", "weight_bytes", "segments"):
        log[f"{k}_moved_total"] += int((reply.get("moved") or {}).get(k, 0))
    log["last_switch_at"] = time.monotonic()
    logger.info("fairkv: plan switched (%s%s) to %s, epoch %d: %.0f ms waiting, %.1f ms pause; moved %s; "
                "layers re-sliced on this rank %s", sw["mode"], ", automatic" if sw["req"] is None else "",
                reply["plan_hash"], reply["epoch"], reply.get("drain_ms", 0.0), reply["pause_ms"], reply.get("moved"),
                reply.get("layers_resliced_here"))


def _commit(scheduler, state, sw: dict, commit) -> None:
    """Run ``commit()`` (every rank); answer and record. A failure after commit cannot be rolled back:
    answered 500 and raised (the server stops, as SGLang does when a weight update fails half-way)."""
    from .plan_switch import SwitchRefused

    state.pending_switch = None
    waited = (time.monotonic() - sw["t0"]) * 1e3
    try:
        fields = commit()
    except SwitchRefused as e:
        _answer(scheduler, sw, 409, {"success": False, "error": f"switch refused: {e}; plan A keeps serving"})
        logger.warning("fairkv: %s switch refused (%s); plan A keeps serving", sw["mode"], e)
        if sw["req"] is None:  # an automatic one: not again before the interval
            state.replan_log["last_auto_attempt_at"] = time.monotonic()
            state.replan_log["last_auto_skipped"] = str(e)
        return
    except Exception as e:  # noqa: BLE001 - after commit nothing can be rolled back: say so and stop serving
        logger.exception("fairkv: plan switch failed after commit")
        _answer(scheduler, sw, 500, {"success": False, "error": f"switch failed after commit: {type(e).__name__}: {e}"})
        raise
    reply = {**sw["result"], **fields, "success": bool(fields.get("verified", True)), "epoch": int(state.plan_epoch),
             "drain_ms": round(waited, 3), "mode": sw["mode"]}
    _record(state, sw, reply)
    _answer(scheduler, sw, 200 if reply["success"] else 500, reply)


def ingest_hook(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.ingest_requests`` (every iteration, every rank in lockstep): a switch past its
    deadline is cancelled (rank 0 decides, the group follows; plan A keeps serving); a migrate commits at
    the first step boundary; without a switch, the automatic re-plan is checked now and then."""
    from .plan_switch import commit_migrate, migrate_boundary
    from .pool_hooks import process_state

    state = process_state()
    if state is None:
        return result
    sw = state.pending_switch
    if sw is None:
        from .auto_replan import auto_replan_check

        auto_replan_check(scheduler, state)
        return result
    if group_decides(time.monotonic() > sw["deadline"]):
        state.pending_switch = None
        _answer(scheduler, sw, 504, {"success": False, "error": f"the {sw['mode']} switch could not run before "
                                                                "timeout_s: cancelled, plan A keeps serving"})
        logger.warning("fairkv: %s switch cancelled at its timeout; plan A keeps serving", sw["mode"])
    elif sw["mode"] == "migrate" and migrate_boundary(scheduler, state):
        _commit(scheduler, state, sw, lambda: commit_migrate(scheduler, state, sw["plan"], live_segments))
    return result


def on_idle_hook(scheduler, *args, **kwargs):
    """BEFORE ``Scheduler.on_idle`` (no batch to run, every rank the same iteration): a drain switch whose
    requests are all gone commits here (:func:`~sglang_fairkv.serving.plan_switch.commit_drain`)."""
    from .plan_switch import commit_drain
    from .pool_hooks import process_state

    state = process_state()
    sw = None if state is None else state.pending_switch
    if sw is None or sw["mode"] != "drain" or state.requests.admitted or scheduler.chunked_req is not None \
            or scheduler.running_batch.reqs:
        return None
    _commit(scheduler, state, sw, lambda: commit_drain(scheduler, state, sw["plan"]))
    return None
