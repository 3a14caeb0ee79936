"""Where sglang-fairkv plugs into SGLang 0.5.23 inside each scheduler process (thin adapters only).

Registered through SGLang's ``HookRegistry`` (verified after ``apply_hooks``, see ``patches``) and its
attention registry, only when ``FAIRKV_KV_COMPRESS`` is set (``--kv-compress`` given):

* ``KVCacheConfigurator._build_token_to_kv_pool`` (AROUND): the ragged pool instead of the dense MHA
  pool; ``_build_token_to_kv_pool_allocator`` (AROUND): the logical-slot allocator over it.
* ``KVCacheConfigurator.configure`` (AROUND): report as ``max_total_num_tokens`` the prompt tokens the
  TP group's pools hold when empty (the smallest over ranks: under a plan ranks hold different head
  counts), so SGLang's token accounting and idle leak check match the ledger.
* ``PrefillAdder.add_one_req`` / ``add_chunked_req`` (AROUND): name the request being considered to
  the fairkv prefill budget, which charges each TP rank the pages of the segments the request will
  hold there once compressed, and the transient of its prefill (replicas chosen before admission; see
  ``kv.sglang_pool.FairKVPrefillBudget``); ``PrefillAdder.__init__`` (AFTER): the running requests'
  remaining decode reserved in exact pages per rank instead of SGLang's scalar tokens.
* ``ScheduleBatch.prepare_for_extend`` (AFTER): each request's full prompt length, by
  ``req_pool_idx``, so the backend knows which prefill chunk is the last (compress then).
* ``ForwardBatch.init_new`` (AFTER): a decode batch gets the host copy of its ``req_pool_indices``
  that SGLang's scheduler keeps (``ScheduleBatch.req_pool_indices_cpu``; SGLang passes it for prefill
  only), so the backend's per-step bookkeeping never reads the device tensor back.
* ``decode_cuda_graph_runner.build_replay_fb_view`` (AFTER): the padded batch view of a CUDA-graph
  replay carries those host indices too.
* ``mem_cache.common.release_kv_cache`` (BEFORE -- it ends by freeing ``req_pool_idx``): free every
  segment of the request (finish, abort, disconnect, retract).
* ``SchedulerInternalStateController._add_memory_usage`` (AFTER): pool usage in ``/get_server_info``.
* ``SchedulerMetricsCollector.log_stats`` (AFTER, ``--enable-metrics``): the fairkv gauges
  (:mod:`sglang_fairkv.prometheus`: per-layer balance, per-rank pages, plan drift).
"""

from __future__ import annotations

import functools
import logging

from . import env

logger = logging.getLogger(__name__)

BACKEND_NAME = "fairkv"
_CFG = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
T_BUILD_POOL = f"{_CFG}._build_token_to_kv_pool"
T_BUILD_ALLOC = f"{_CFG}._build_token_to_kv_pool_allocator"
T_CONFIGURE = f"{_CFG}.configure"
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


def compress_config():
    """The server's ``CompressConfig`` from the environment, or None (fairkv off)."""
    text = env.kv_compress_json()
    if text is None:
        return None
    from .compress.policy import CompressConfig

    return CompressConfig.from_json(text)


def build_pool_hook(original, self, *args, **kwargs):
    """AROUND ``_build_token_to_kv_pool``: the fairkv pool (ragged rows, no dense buffers)."""
    cfg = compress_config()
    if cfg is None or self.is_draft_worker:
        return original(self, *args, **kwargs)
    from .compress.policy import load_config_head_budgets
    from .kv.sglang_pool import FairKVCache, build_state

    sizes = kwargs["sizes"]
    req_to_token = kwargs["req_to_token_pool"].req_to_token
    mc = self.model_config
    layers = self.layer_info.num_effective_layers
    rank_plan = server_rank_plan(mc.hf_config, layers)
    head_budgets = load_config_head_budgets(cfg, layers, rank_plan.plan.num_kv_heads)
    state = build_state(cfg, head_budgets, rank_plan=rank_plan,
                        max_total_tokens=sizes.max_total_num_tokens,
                        rows_per_token_budget=layers * _num_kv_heads(self),
                        page_size=env.kv_page_size(), head_dim=mc.head_dim,
                        max_reqs=req_to_token.shape[0], max_context=min(mc.context_len, req_to_token.shape[1]),
                        dtype=self.kv_cache_dtype, device=self.device,
                        group=max(1, mc.num_attention_heads // max(1, mc.num_key_value_heads)),
                        profile_path=_profile_path())
    global _ACTIVE_STATE
    _ACTIVE_STATE = state  # this scheduler process's (the metrics hook has no path to the pool)
    return FairKVCache(state, size=sizes.max_total_num_tokens, page_size=1, dtype=self.kv_cache_dtype,
                       layer_num=layers, device=self.device, start_layer=self.layer_info.start_layer,
                       end_layer=self.layer_info.end_layer)


#: the FairKVState of this scheduler process (set when its pool is built), else None
_ACTIVE_STATE = None


def server_rank_plan(hf_config, num_layers: int | None = None):
    """This scheduler's :class:`RankPlan` for an HF config (model classes and pool hook alike):
    ``FAIRKV_PLAN`` checked against the checkpoint's shape and the TP size, or at TP = 1 without
    one, every head on rank 0. ``num_layers`` defaults to the config's."""
    from sglang.srt.runtime_context import get_parallel

    from .model.heads import checkpoint_heads
    from .placement.runtime import RankPlan

    p = get_parallel()
    q, kv, _ = checkpoint_heads(hf_config)  # SGLang pads head counts on CPU at odd TP
    layers = hf_config.num_hidden_layers if num_layers is None else num_layers
    plan = _server_plan(env.plan_path(), getattr(hf_config, "_name_or_path", ""), layers, kv, q, p.tp_size)
    return RankPlan(plan, p.tp_rank, q)


@functools.lru_cache(maxsize=4)
def _server_plan(path: str | None, model: str, num_layers: int, num_kv_heads: int, num_q_heads: int, tp: int):
    """Read and check the plan once per process (the model load and the pool hook both need it)."""
    from .placement.runtime import resolve_plan, sha_plan

    if path is None:
        if tp != 1:
            raise RuntimeError("the fairkv backend at TP > 1 needs a FairKV plan (launch with "
                               "python -m sglang_fairkv.launch_server; it passes --fairkv-plan sha by default)")
        return sha_plan(model, num_layers, num_kv_heads, num_q_heads, 1)
    return resolve_plan(path, model=model, num_layers=num_layers, num_kv_heads=num_kv_heads,
                        num_q_heads=num_q_heads, tp=tp)


def _profile_path() -> str | None:
    d = env.profile_dir()
    if d is None:
        return None
    import os

    from sglang.srt.runtime_context import get_parallel

    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"rank{get_parallel().tp_rank}.jsonl")


def _num_kv_heads(configurator) -> int:
    from sglang.srt.runtime_context import get_parallel

    p = get_parallel()
    return configurator.model_config.get_num_kv_heads(p.attn_tp_size, p.attn_dcp_size)


def build_allocator_hook(original, self, *args, **kwargs):
    """AROUND ``_build_token_to_kv_pool_allocator``: logical slots + capacity from the ragged pool."""
    from .kv.sglang_pool import FairKVCache, FairKVTokenAllocator

    pool = kwargs.get("token_to_kv_pool")
    if not isinstance(pool, FairKVCache):
        return original(self, *args, **kwargs)
    return FairKVTokenAllocator(pool.state, max_total_tokens=kwargs["sizes"].max_total_num_tokens,
                                dtype=self.kv_cache_dtype, device=self.device, kvcache=pool)


def configure_hook(original, self, *args, **kwargs):
    """AROUND ``KVCacheConfigurator.configure``: ``max_total_num_tokens`` = the ledger's empty capacity."""
    result = original(self, *args, **kwargs)
    state = _state_of(result.token_to_kv_pool_allocator)
    if state is None:
        return result
    import msgspec

    cap = state.ledger.capacity_when_empty()
    if cap != result.max_total_num_tokens:
        logger.info("sglang-fairkv: max_total_num_tokens %d -> %d (prompt tokens every rank's pool holds "
                    "under the plan; expected KV rows per token by rank %s)", result.max_total_num_tokens,
                    cap, [round(x, 2) for x in state.ledger.rows_per_token.tolist()])
    return msgspec.structs.replace(result, max_total_num_tokens=cap)


def _state_of(allocator):
    from .kv.sglang_pool import FairKVTokenAllocator

    return allocator.state if isinstance(allocator, FairKVTokenAllocator) else None


def adder_request_hook(original, adder, req, *args, **kwargs):
    """AROUND ``PrefillAdder.add_one_req`` / ``add_chunked_req``: while SGLang decides on ``req``, the
    fairkv budget knows which request it is (to charge each rank the pages that request needs)."""
    from .kv.sglang_pool import FairKVPrefillBudget

    budget = getattr(adder, "memory_budget", None)
    if not isinstance(budget, FairKVPrefillBudget):
        return original(adder, req, *args, **kwargs)
    outer, budget.current_req = budget.current_req, req
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        budget.current_req = outer


def adder_init_hook(result, adder, *args, **kwargs):
    """AFTER ``PrefillAdder.__init__``: the fairkv budget reserves the running requests' decode in exact
    pages per rank instead of SGLang's scalar tokens (``FairKVPrefillBudget.adopt_running``)."""
    from .kv.sglang_pool import FairKVPrefillBudget

    budget = getattr(adder, "memory_budget", None)
    if isinstance(budget, FairKVPrefillBudget):
        budget.adopt_running(adder)
    return None


def prepare_for_extend_hook(result, batch, *args, **kwargs):
    """AFTER ``ScheduleBatch.prepare_for_extend``: record each request's full prompt length and, on its
    first chunk, admit it: replicas chosen (same on every rank), its segments on this rank activated."""
    state = _state_of(batch.token_to_kv_pool_allocator)
    if state is not None:
        for req in batch.reqs:
            r, n = int(req.kv.req_pool_idx), len(req.full_untruncated_fill_ids)
            state.target_len[r] = n
            state.admit(r, req.rid, n)
            state.fixed_length[r] = bool(getattr(req.sampling_params, "ignore_eos", False))
        state.maybe_log_group_usage()
    return result


def forward_batch_hook(result, cls, batch, *args, **kwargs):
    """AFTER ``ForwardBatch.init_new`` (a classmethod: ``cls`` first): give a fairkv decode batch the
    host ``req_pool_indices`` the scheduler keeps beside the device tensor (SGLang forwards them for
    prefill only)."""
    if (getattr(result, "req_pool_indices_cpu", None) is None and result.forward_mode.is_decode()
            and _state_of(getattr(batch, "token_to_kv_pool_allocator", None)) is not None):
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


def release_hook(req, tree_cache, *args, **kwargs):
    """BEFORE ``release_kv_cache``: free the request's segments while ``req_pool_idx`` is still its."""
    state = _state_of(tree_cache.token_to_kv_pool_allocator)
    if state is not None and req.kv.req_pool_idx is not None and (
            req.kv.holds_kv or int(req.kv.req_pool_idx) in state.admitted):
        state.release(int(req.kv.req_pool_idx))
    return None


def internal_state_hook(result, controller, state_dict, *args, **kwargs):
    """AFTER ``_add_memory_usage``: ``internal_states[i]["fairkv"]`` in ``/get_server_info``."""
    fk = _state_of(controller.scheduler.token_to_kv_pool_allocator)
    if fk is not None:
        state_dict["fairkv"] = fk.stats()
    return result


def metrics_hook(result, collector, *args, **kwargs):
    """AFTER ``SchedulerMetricsCollector.log_stats``: the fairkv gauges of this process's state."""
    if _ACTIVE_STATE is not None:
        from .prometheus import export

        try:
            export(collector, _ACTIVE_STATE)
        except Exception:  # metrics must never take the scheduler down
            logger.exception("sglang-fairkv: exporting the fairkv gauges failed")
    return result


def hook_triples() -> list[tuple[str, object, str]]:
    """The fairkv hooks as ``(target, hook, HookType name)`` (empty when fairkv is off)."""
    if compress_config() is None:
        return []
    return [(T_BUILD_POOL, build_pool_hook, "AROUND"), (T_BUILD_ALLOC, build_allocator_hook, "AROUND"),
            (T_CONFIGURE, configure_hook, "AROUND"),
            (T_ADD_ONE_REQ, adder_request_hook, "AROUND"), (T_ADD_CHUNKED_REQ, adder_request_hook, "AROUND"),
            (T_ADDER_INIT, adder_init_hook, "AFTER"),
            (T_PREPARE_EXTEND, prepare_for_extend_hook, "AFTER"),
            (T_FORWARD_BATCH, forward_batch_hook, "AFTER"), (T_REPLAY_VIEW, replay_view_hook, "AFTER"),
            (T_RELEASE, release_hook, "BEFORE"),
            (T_INTERNAL_STATE, internal_state_hook, "AFTER"), (T_METRICS, metrics_hook, "AFTER")]


def check_model_package() -> None:
    """With a FairKV plan, SGLang must resolve our model classes (it only logs a failed import of an
    external model package and would fall back to its own, which splits heads contiguously)."""
    if env.plan_path() is None:
        return
    import os

    from sglang.srt.models.registry import ModelRegistry

    from .model import ARCHITECTURES

    if os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE") != "sglang_fairkv.model":
        raise RuntimeError("FAIRKV_PLAN is set but SGLANG_EXTERNAL_MODEL_PACKAGE is not sglang_fairkv.model")
    for arch in ARCHITECTURES:
        got = ModelRegistry.models.get(arch)
        if got is None or not getattr(got, "fairkv", False):
            raise RuntimeError(f"SGLang resolves {arch} to {got}, not the FairKV class (see the "
                               "log for an import error in sglang_fairkv.model)")


def register_backend() -> None:
    """Put ``fairkv`` into SGLang's attention registry (each scheduler process)."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from .attention.fairkv_backend import create_fairkv_backend

    register_attention_backend(BACKEND_NAME)(create_fairkv_backend)


def add_backend_choice() -> None:
    """Let SGLang's argument parser accept ``--attention-backend fairkv`` (main process, before parsing)."""
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
