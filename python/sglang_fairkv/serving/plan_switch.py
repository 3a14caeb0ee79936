"""Commit a plan switch on one rank of a TP group: drain (at an empty pool) or migrate (while requests
decode). Both run on every rank of the group in the same scheduler iteration, from state identical on
every rank, and end with a group-wide check; :mod:`~sglang_fairkv.serving.control_plane` arms them.

* **Drain** (:func:`commit_drain`): the pool is empty; the radix tree (the prefix tier) is reset, the state
  follows plan B (:meth:`FairKVState.switch_plan`), the changed layers' q/k/v/o slices are re-read from the
  checkpoint (:func:`~sglang_fairkv.model.reslice.reslice_attention`).
* **Migrate** (:func:`commit_migrate`): at a step boundary with no prompt half prefilled (the caller checks
  :func:`migrate_boundary`), the device synchronised (no forward in flight), the prefix tier flushed (its
  blocks are priced per held head; no running request holds tier tokens after its prefill), the transition
  recomputed from the live ledger (:func:`~sglang_fairkv.placement.transition.plan_transition`: B relabeled
  to overlap A, owners, rounds; refused with the reason if it does not fit now), then
  :func:`migrate_state`: the segments move (:func:`~sglang_fairkv.kv.segment_mover.move_segments`), the
  weight slices a rank gains come by P2P from a rank that holds them
  (:func:`~sglang_fairkv.model.reslice.exchange_attention`), and ledger owners, charges and replica
  choices follow (:meth:`FairKVState.switch_plan` with the running requests).

Either way decode graphs are recaptured on every rank when any rank's head count in any layer changed (a
recapture runs collectives: all ranks or none), and the backend's per-layer checks start again. The reply
carries each rank's ledger check and pages (gathered on the group's CPU group).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..kv.segment_mover import move_segments, p2p_exchange
from ..placement.runtime import RankPlan
from ..placement.transition import LiveSegments, Transition, plan_hash, request_pages
from .state import FairKVState, RunningUnderB

logger = logging.getLogger(__name__)


class SwitchRefused(Exception):
    """The switch cannot be made now (it does not fit the running requests): plan A keeps serving."""


def transition_for(state: FairKVState, plan_b, live: LiveSegments, *, tier_flushed: bool) -> Transition:
    """The transition from ``state``'s plan to ``plan_b`` for ``live``, against every rank's usable pages (with
    the prefix tier's counted as free when the switch flushes it first: ``tier_flushed``) and pool head slots."""
    from ..placement.transition import plan_transition

    a = state.rank_plan.plan
    usable = state.ledger.usable - (0 if tier_flushed else state.ledger.tier_pages())
    pool_heads = np.array(state.pool_heads_of or [state.pool.num_kv_heads] * a.tp)
    return plan_transition(a, plan_b, live, usable=usable.numpy(), page_size=state.pool.page_size,
                           pool_heads=pool_heads)


def charged_under(t: Transition, live: LiveSegments, page_size: int) -> np.ndarray:
    """int64 ``[R, tp]``: pages each rank holds for each running request for the rest of its life under
    the transition's plan (its rows and the decode rows it is still owed, on B's owners)."""
    return request_pages(t.owner, live.rows + live.owed[:, None, None], t.plan.tp, page_size)


def migrate_state(state: FairKVState, t: Transition, live: LiveSegments, req_idx: np.ndarray, exchange,
                  model=None) -> dict:
    """Carry out ``t`` (plan A = ``state``'s -> ``t.plan``) on this rank: segments moved, the model's
    attention re-sliced by P2P (``model``: None in the mover tests without a model), the state on B with
    the running requests (``req_idx`` int64 ``[R]``, ``live``'s order). ``exchange(sends, recv_numel)``:
    the group's P2P exchange of uint8 buffers. Returns what moved here and the times (ms)."""
    a, rank = state.rank_plan.plan, state.rank_plan.rank
    rp_b = RankPlan(t.plan, rank, state.rank_plan.num_q_heads)
    t0 = time.perf_counter()
    kv = move_segments(state.pool, moves=t.moves, rounds=t.rounds, req_idx=req_idx, owner_b=t.owner, rank=rank,
                       heads_a=state.rank_plan.local_heads, heads_b=rp_b.local_heads, exchange=exchange)
    t1 = time.perf_counter()
    changed, weight_bytes = [], 0
    if model is not None:
        from ..model.reslice import exchange_attention

        changed, weight_bytes = exchange_attention(model, a, t.plan, rp_b, exchange)
    t2 = time.perf_counter()
    running = RunningUnderB(req_idx=np.asarray(req_idx, dtype=np.int64), weights=live.weights, owner=t.owner,
                            charged=charged_under(t, live, state.pool.page_size))
    state.switch_plan(t.plan, running=running)
    return {**kv, "weight_bytes_received": weight_bytes, "layers_resliced_here": changed,
            "kv_ms": round((t1 - t0) * 1e3, 3), "weights_ms": round((t2 - t1) * 1e3, 3)}


# ---- the group (SGLang's TP group) ------------------------------------------------------------------------


def _tp():
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_group


def group_exchange(device: torch.device):
    """``exchange(sends, recv_numel)`` over SGLang's TP group: its device group (NCCL on GPU, gloo on CPU)."""
    tp = _tp()

    def exchange(sends, recv_numel):
        return p2p_exchange(sends, recv_numel, dtype=torch.uint8, device=device, group=tp.device_group,
                            ranks=list(tp.ranks))

    return exchange


def group_gather(obj) -> list:
    """``obj`` of every rank of the TP group, in rank order (its CPU group)."""
    tp = _tp()
    if tp.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * tp.world_size
    dist.all_gather_object(out, obj, group=tp.cpu_group)
    return out


def any_shape_changed(a, b, num_q_heads: int) -> bool:
    """Whether any rank's head count in any layer differs between plans ``a`` and ``b`` (a decode graph's
    shapes): the same answer on every rank."""
    return any(RankPlan(a, q, num_q_heads).heads_per_layer() != RankPlan(b, q, num_q_heads).heads_per_layer()
               for q in range(a.tp))


def _after_switch(scheduler, state, a, b, moved: dict | None = None) -> dict:
    """The backend's per-layer checks restart; decode graphs recaptured where a shape changed (every rank
    or none); each rank's ledger check, pages and what it received (``moved``) gathered, with the group's
    totals."""
    runner = scheduler.tp_worker.model_runner
    backend = getattr(runner, "attn_backend", None)
    if backend is not None and hasattr(backend, "_checked_layers"):
        backend._checked_layers.clear()
    recaptured = False
    if any_shape_changed(a, b, state.rank_plan.num_q_heads) and str(runner.device).startswith("cuda") \
            and getattr(runner, "decode_cuda_graph_runner", None):
        runner.recapture_decode_cuda_graph()
        recaptured = True
    mine = {"tp_rank": state.rank_plan.rank, "ledger_ok": state.ledger_mismatch() is None,
            "pages_used": state.pool.used_pages(), "plan_hash": plan_hash(state.rank_plan.plan)}
    moved = moved or {}
    for k in ("segments_received", "bytes_received", "weight_bytes_received"):
        mine[k] = int(moved.get(k, 0))
    ranks = group_gather(mine)
    return {"ranks": ranks, "graphs_recaptured": recaptured,
            "moved": {"segments": sum(r["segments_received"] for r in ranks),
                      "kv_bytes": sum(r["bytes_received"] for r in ranks),
                      "weight_bytes": sum(r["weight_bytes_received"] for r in ranks)},
            "verified": all(r["ledger_ok"] for r in ranks) and len({r["plan_hash"] for r in ranks}) == 1}


def commit_drain(scheduler, state, plan) -> dict:
    """The drain switch at an empty pool (every rank, the same idle iteration); returns the reply's fields."""
    from ..model.reslice import reslice_attention

    runner = scheduler.tp_worker.model_runner
    t0 = time.perf_counter()
    a = state.rank_plan.plan
    scheduler.tree_cache.reset()  # the tier's blocks: priced per held head, so they go with plan A
    state.switch_plan(plan)
    changed = reslice_attention(runner.model, state.rank_plan, runner.model_config.model_path)
    out = _after_switch(scheduler, state, a, plan)
    return {**out, "layers_resliced_here": changed, "plan_hash": plan_hash(plan),
            "pause_ms": round((time.perf_counter() - t0) * 1e3, 3)}


def migrate_boundary(scheduler, state) -> bool:
    """A migrate may run now: no chunked prefill open, every admitted request past its prompt (its window
    queries are per local head) and no request holding prefix-tier tokens (under overlap scheduling a
    prompt's last chunk is checkpointed into the radix tree -- its tier tokens and tree lock dropped -- when
    its result is processed, an iteration after its launch); the same answer on every rank."""
    if scheduler.chunked_req is not None:
        return False
    reqs = state.requests
    if reqs.tier_tok:
        return False
    idx = reqs.admitted_indices()
    return bool(reqs.prompt_done[idx].all()) if idx.size else True


def flush_prefix_tier(scheduler, state) -> None:
    """Every cached prefix evicted (the same LRU order on every rank): no running request holds tier tokens
    after its prefill, so the tier is empty after."""
    tree = getattr(scheduler, "tree_cache", None)
    if state.tier is None or tree is None or not hasattr(tree, "evict_until"):
        return
    tree.evict_until(lambda: state.tier.blocks_used == 0)
    if state.tier.blocks_used:
        raise SwitchRefused(f"the prefix tier still holds {state.tier.blocks_used} blocks a request locks")


def commit_migrate(scheduler, state, plan_b, live_segments) -> dict:
    """The migrate switch at a step boundary (every rank, the same iteration); ``live_segments(scheduler,
    state)`` gives the running requests. Raises :class:`SwitchRefused` (nothing changed) when B does not
    fit them now. Returns the reply's fields."""
    runner = scheduler.tp_worker.model_runner
    device = state.pool.device
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the launched step (overlap scheduling) has written its rows
    a = state.rank_plan.plan
    live = live_segments(scheduler, state)
    t = transition_for(state, plan_b, live, tier_flushed=True)  # the tier is flushed before anything moves
    if not t.fits:
        from .control_plane import SLOTS_HINT

        raise SwitchRefused(t.why + ("" if t.slots_fit else SLOTS_HINT))
    flush_prefix_tier(scheduler, state)
    req_idx = state.requests.admitted_indices()
    moved = migrate_state(state, t, live, req_idx, group_exchange(device), model=runner.model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = _after_switch(scheduler, state, a, t.plan, moved)
    return {**out, "kv_ms_here": moved["kv_ms"], "weights_ms_here": moved["weights_ms"],
            "layers_resliced_here": moved["layers_resliced_here"],
            "transition": t.summary(state.pool.bytes_per_row()), "plan_hash": plan_hash(t.plan),
            "pause_ms": round((time.perf_counter() - t0) * 1e3, 3)}


__all__ = ["SwitchRefused", "any_shape_changed", "transition_for", "charged_under", "commit_drain", "commit_migrate",
           "flush_prefix_tier", "group_exchange", "group_gather", "migrate_boundary", "migrate_state"]
