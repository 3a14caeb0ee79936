"""Hooks that put the ragged pool where SGLang builds its KV pool (each scheduler process).

* ``KVCacheConfigurator._build_token_to_kv_pool`` (AROUND): the ragged pool instead of the dense MHA
  pool; ``_build_token_to_kv_pool_allocator`` (AROUND): the logical-slot allocator over it.
* ``KVCacheConfigurator.configure`` (AROUND): report as ``max_total_num_tokens`` the prompt tokens the
  TP group's pools hold when empty (the smallest over ranks: under a plan ranks hold different head
  counts), so SGLang's token accounting and idle leak check match the ledger.
"""

from __future__ import annotations

import logging
import os

from .. import env

logger = logging.getLogger(__name__)

_CFG = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
T_BUILD_POOL = f"{_CFG}._build_token_to_kv_pool"
T_BUILD_ALLOC = f"{_CFG}._build_token_to_kv_pool_allocator"
T_CONFIGURE = f"{_CFG}.configure"

#: the FairKVState of this scheduler process (set when its pool is built), else None
_PROCESS_STATE = None


def process_state():
    """The :class:`~sglang_fairkv.serving.state.FairKVState` of this scheduler process, or None (fairkv
    off, or the pool not built yet). One process serves one TP rank of one replica: one state."""
    return _PROCESS_STATE


def build_pool_hook(original, self, *args, **kwargs):
    """AROUND ``_build_token_to_kv_pool``: the fairkv pool (ragged rows, no dense buffers)."""
    from .server_plan import compress_config, server_rank_plan

    cfg = compress_config()
    if cfg is None or self.is_draft_worker:
        return original(self, *args, **kwargs)
    from sglang.srt.runtime_context import get_parallel

    from ..compress.policy import load_config_head_budgets
    from .kv_cache import FairKVCache
    from .state import build_state

    sizes = kwargs["sizes"]
    req_to_token = kwargs["req_to_token_pool"].req_to_token
    mc = self.model_config
    layers = self.layer_info.num_effective_layers
    rank_plan = server_rank_plan(mc.hf_config, layers)
    head_budgets = load_config_head_budgets(cfg, layers, rank_plan.plan.num_kv_heads)
    p = get_parallel()
    dp_rank = getattr(p, "dp_rank", None)  # None without --dp-size
    state = build_state(cfg, head_budgets, rank_plan=rank_plan,
                        max_total_tokens=sizes.max_total_num_tokens,
                        rows_per_token_budget=layers * mc.get_num_kv_heads(p.attn_tp_size, p.attn_dcp_size),
                        page_size=env.kv_page_size(), head_dim=mc.head_dim,
                        max_reqs=req_to_token.shape[0], max_context=min(mc.context_len, req_to_token.shape[1]),
                        dtype=self.kv_cache_dtype, store_dtype=env.kv_store_dtype(), device=self.device,
                        group=max(1, mc.num_attention_heads // max(1, mc.num_key_value_heads)),
                        profile_path=_profile_path(p.tp_rank, dp_rank), dp_rank=dp_rank,
                        prefix_tier=env.prefix_tier_fraction(), head_slots=env.replan_head_slots())
    global _PROCESS_STATE
    _PROCESS_STATE = state
    return FairKVCache(state, size=sizes.max_total_num_tokens, page_size=1, dtype=self.kv_cache_dtype,
                       layer_num=layers, device=self.device, start_layer=self.layer_info.start_layer,
                       end_layer=self.layer_info.end_layer)


def _profile_path(tp_rank: int, dp_rank: int | None = None) -> str | None:
    """``FAIRKV_PROFILE_DIR/rank{t}.jsonl``; a DP replica > 0 profiles into ``dp{d}/`` below it (each
    replica is its own TP group with its own traffic: a plan per replica is made from its own profile)."""
    d = env.profile_dir()
    if d is None:
        return None
    if dp_rank:
        d = os.path.join(d, f"dp{dp_rank}")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"rank{tp_rank}.jsonl")


def build_allocator_hook(original, self, *args, **kwargs):
    """AROUND ``_build_token_to_kv_pool_allocator``: logical slots + capacity from the ragged pool."""
    from .allocator import FairKVTokenAllocator
    from .kv_cache import FairKVCache

    pool = kwargs.get("token_to_kv_pool")
    if not isinstance(pool, FairKVCache):
        return original(self, *args, **kwargs)
    return FairKVTokenAllocator(pool.state, max_total_tokens=kwargs["sizes"].max_total_num_tokens,
                                dtype=self.kv_cache_dtype, device=self.device, kvcache=pool)


def configure_hook(original, self, *args, **kwargs):
    """AROUND ``KVCacheConfigurator.configure``: ``max_total_num_tokens`` = the ledger's empty capacity."""
    from .allocator import FairKVTokenAllocator

    result = original(self, *args, **kwargs)
    alloc = result.token_to_kv_pool_allocator
    if not isinstance(alloc, FairKVTokenAllocator):
        return result
    import msgspec

    cap = alloc.state.ledger.capacity_when_empty()
    if cap != result.max_total_num_tokens:
        logger.info("sglang-fairkv: max_total_num_tokens %d -> %d (prompt tokens every rank's pool holds "
                    "under the plan; expected KV rows per token by rank %s)", result.max_total_num_tokens,
                    cap, [round(x, 2) for x in alloc.state.ledger.rows_per_token.tolist()])
    return msgspec.structs.replace(result, max_total_num_tokens=cap)
