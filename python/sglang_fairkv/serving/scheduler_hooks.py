"""Hooks on SGLang's scheduler path (each scheduler process, only with ``--kv-compress``).

* ``PrefillAdder.add_one_req`` / ``add_chunked_req`` (AROUND): name the request being considered to
  the fairkv prefill budget (:mod:`~sglang_fairkv.serving.prefill_budget`), which charges each TP rank
  the pages that request will hold there; ``PrefillAdder.__init__`` (AFTER): the running requests'
  remaining decode reserved in exact pages per rank instead of SGLang's scalar tokens.
* ``ScheduleBatch.prepare_for_extend`` (AFTER): each request's full prompt length, by
  ``req_pool_idx``, so the backend knows which prefill chunk is the last (compress then); a request's
  first chunk admits it (replicas, ledger, pool segments).
* ``ForwardBatch.init_new`` (AFTER): a decode batch gets the host copy of its ``req_pool_indices``
  that SGLang's scheduler keeps (``ScheduleBatch.req_pool_indices_cpu``; SGLang passes it for prefill
  only), so the backend's per-step bookkeeping never reads the device tensor back.
* ``decode_cuda_graph_runner.build_replay_fb_view`` (AFTER): the padded batch view of a CUDA-graph
  replay carries those host indices too.
* ``mem_cache.common.release_kv_cache`` (BEFORE -- it ends by freeing ``req_pool_idx``): free every
  segment of the request (finish, abort, disconnect, retract).
* ``SchedulerInternalStateController._add_memory_usage`` (AFTER): pool usage in ``/get_server_info``.
* ``SchedulerMetricsCollector.log_stats`` (AFTER, ``--enable-metrics``): the fairkv gauges.
* ``managers.utils.validate_input_length`` (AFTER): a prompt refused for its length is told why the
  limit is the dense size with compression (:data:`DENSE_PROMPT_LIMIT`).
* ``ModelRunner.forward`` (AFTER, ``--kv-decode-compress``): the decode-time compression of the requests the
  step just launched brought to their interval (:mod:`~sglang_fairkv.attention.decode_compress`), outside
  any CUDA graph, before the next step's metadata.

Every hook finds the state the same way, :func:`~sglang_fairkv.serving.pool_hooks.process_state`, and
does nothing when it is None (fairkv off in this process).
"""

from __future__ import annotations

import logging

from .pool_hooks import process_state

logger = logging.getLogger(__name__)

T_PREPARE_EXTEND = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend"
T_FORWARD_BATCH = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
T_RELEASE = "sglang.srt.mem_cache.common.release_kv_cache"
T_REPLAY_VIEW = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.build_replay_fb_view"
T_ADD_ONE_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
T_ADD_CHUNKED_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"
T_ADDER_INIT = "sglang.srt.managers.schedule_policy.PrefillAdder.__init__"
T_METRICS = "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats"
T_INTERNAL_STATE = ("sglang.srt.managers.scheduler_components.internal_state."
                    "SchedulerInternalStateController._add_memory_usage")
T_INPUT_LENGTH = "sglang.srt.managers.utils.validate_input_length"
T_MODEL_FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner.forward"

#: Why a compressed server's longest prompt is what the pool holds dense (appended to SGLang's 400)
DENSE_PROMPT_LIMIT = (
    " With --kv-compress the limit is still the dense size: SnapKV scores a prompt with its last window of "
    "queries against every key, so the whole prompt's KV is held uncompressed (one layer at a time on the "
    "last chunk, earlier chunks whole) before it is compressed; raise --max-total-tokens (and "
    "--context-length) to serve longer prompts.")


def adder_request_hook(original, adder, req, *args, **kwargs):
    """AROUND ``PrefillAdder.add_one_req`` / ``add_chunked_req``: while SGLang decides on ``req``, the
    fairkv budget knows which request it is (to charge each rank the pages that request needs)."""
    from .prefill_budget import FairKVPrefillBudget

    budget = getattr(adder, "memory_budget", None)
    if not isinstance(budget, FairKVPrefillBudget):
        return original(adder, req, *args, **kwargs)
    if getattr(original, "__name__", "") == "add_one_req":
        from .control_plane import gate_admission

        if gate_admission(process_state()):  # a plan switch is armed: new prompts wait in the queue
            from sglang.srt.managers.schedule_policy import AddReqResult

            return AddReqResult.OTHER
    outer, budget.current_req = budget.current_req, req
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        budget.current_req = outer


def adder_init_hook(result, adder, *args, **kwargs):
    """AFTER ``PrefillAdder.__init__``: the fairkv budget reserves the running requests' decode in exact
    pages per rank instead of SGLang's scalar tokens (``FairKVPrefillBudget.adopt_running``)."""
    from .prefill_budget import FairKVPrefillBudget

    budget = getattr(adder, "memory_budget", None)
    if isinstance(budget, FairKVPrefillBudget):
        budget.adopt_running(adder)
    return None


def prepare_for_extend_hook(result, batch, *args, **kwargs):
    """AFTER ``ScheduleBatch.prepare_for_extend``: record each request's full prompt length and, on its
    first chunk, admit it: replicas chosen (same on every rank), its segments on this rank activated."""
    state = process_state()
    if state is not None:
        from ..telemetry.report import maybe_log_group_usage

        reqs = state.requests
        tree = state.tree
        for req in batch.reqs:
            r, n = int(req.kv.req_pool_idx), len(req.full_untruncated_fill_ids)
            reqs.target_len[r] = n
            first = r not in reqs.admitted
            tier = reqs.planned_tier.pop(req.rid, False)  # read before admit clears the pass's plans
            if first:
                req.fairkv_no_reuse = False  # (a retracted request matches again when it comes back)
            state.admit(r, req.rid, n)
            m = int(req.prefix_len)
            if first and tree is not None and (m > 0 or tier):
                # the prefill uses the dense prefix tier (a cache hit, or admission chose to cache the
                # prompt): the matched prefix's tier tokens (locked by the request until it is inserted)
                state.tier_begin(r, tree.path_tok(req.last_node)[:m])
                state.tier_stats["hit_tokens"] += m
                state.tier_stats["hits"] += int(m > 0)
            reqs.fixed_length[r] = bool(getattr(req.sampling_params, "ignore_eos", False))
        maybe_log_group_usage(state)
    return result


def forward_batch_hook(result, cls, batch, *args, **kwargs):
    """AFTER ``ForwardBatch.init_new`` (a classmethod: ``cls`` first): give a fairkv decode batch the
    host ``req_pool_indices`` the scheduler keeps beside the device tensor (SGLang forwards them for
    prefill only)."""
    if (process_state() is not None and getattr(result, "req_pool_indices_cpu", None) is None
            and result.forward_mode.is_decode()):
        cpu = getattr(batch, "req_pool_indices_cpu", None)
        if cpu is not None and cpu.shape[0] == result.req_pool_indices.shape[0]:
            result.req_pool_indices_cpu = cpu
    return None


def replay_view_hook(result, *args, **kwargs):
    """AFTER ``decode_cuda_graph_runner.build_replay_fb_view`` (the padded batch view a CUDA-graph replay
    hands the backend): carry the real batch's host ``req_pool_indices`` (the view has only the padded
    device buffer), so a graph replay's bookkeeping reads no device tensor back either."""
    fb = kwargs.get("forward_batch", args[0] if args else None)
    cpu = getattr(fb, "req_pool_indices_cpu", None)
    if cpu is not None and getattr(result, "req_pool_indices_cpu", None) is None:
        result.req_pool_indices_cpu = cpu
    return result


def model_forward_hook(result, runner, *args, **kwargs):
    """AFTER ``ModelRunner.forward``: run the decode-time compression the step marked (fairkv backend
    with ``--kv-decode-compress``; a no-op otherwise)."""
    run = getattr(getattr(runner, "attn_backend", None), "run_pending_compression", None)
    if run is not None and process_state() is not None:
        run()
    return result


def release_hook(req, tree_cache, *args, **kwargs):
    """BEFORE ``release_kv_cache``: free the request's segments while ``req_pool_idx`` is still its. Its
    own prefix-tier tokens stay when SGLang checkpoints it next into the fairkv tree (a request that
    finished in its prefill step: its prompt goes into the cache); the tree's ``on_release`` drops the
    rest."""
    state = process_state()
    if state is not None and req.kv.req_pool_idx is not None and (
            req.kv.holds_kv or int(req.kv.req_pool_idx) in state.requests.admitted):
        state.release(int(req.kv.req_pool_idx), drop_tier=state.tree is None)
    return None


def internal_state_hook(result, controller, state_dict, *args, **kwargs):
    """AFTER ``_add_memory_usage``: ``internal_states[i]["fairkv"]`` in ``/get_server_info``."""
    state = process_state()
    if state is not None:
        from ..telemetry.report import fairkv_stats

        state_dict["fairkv"] = fairkv_stats(state)
    return result


def input_length_hook(result, *args, **kwargs):
    """AFTER ``validate_input_length``: SGLang's "exceeds the maximum allowed length" message, plus why."""
    state = process_state()
    if isinstance(result, str) and state is not None and state.cfg.enabled:
        return result + DENSE_PROMPT_LIMIT
    return None


def metrics_hook(result, collector, *args, **kwargs):
    """AFTER ``SchedulerMetricsCollector.log_stats``: the fairkv gauges of this process's state."""
    state = process_state()
    if state is not None:
        from ..telemetry.prometheus import export

        try:
            export(collector, state)
        except Exception:  # metrics must never take the scheduler down
            logger.exception("sglang-fairkv: exporting the fairkv gauges failed")
    return result
