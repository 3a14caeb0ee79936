"""SGLang's ``token_to_kv_pool`` of a fairkv server: the ragged pool behind SGLang's ``KVCache``.

It holds no dense per-layer buffer: the KV bytes are the ragged pool's rows (in the bytes SGLang's
stock pool would take for ``--max-total-tokens``), read and written only by the fairkv attention backend.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import KVCache

from .state import FairKVState


class FairKVCache(KVCache):
    """``token_to_kv_pool`` of a fairkv server: the ragged pool, no dense per-layer buffers."""

    def __init__(self, state: FairKVState, *, size: int, page_size: int, dtype: torch.dtype,
                 layer_num: int, device: str, start_layer: int | None = None,
                 end_layer: int | None = None):
        super().__init__(size, page_size, dtype, layer_num, device, False, start_layer, end_layer)
        self.state = state
        self.head_num = state.pool.num_kv_heads
        self.head_dim = state.pool.head_dim
        self.v_head_dim = state.pool.head_dim
        self._finalize_allocation_log(size)

    def get_kv_size_bytes(self):
        p = self.state.pool
        return p.k_rows.numel() * p.k_rows.element_size(), p.v_rows.numel() * p.v_rows.element_size()

    def _no_dense(self, *_a, **_k):
        raise NotImplementedError(
            "the fairkv KV pool is ragged per (request, layer, KV head): it has no dense per-layer "
            "buffer; only the fairkv attention backend can read or write it")

    get_key_buffer = get_value_buffer = get_kv_buffer = set_kv_buffer = _no_dense
