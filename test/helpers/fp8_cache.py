"""An HF transformers KV cache rounded through fp8 the way the fairkv server reads its fp8 pool.

Used by the HF reference (``hf_ref.greedy(..., kv_dtype=...)``) and by the kvpress run
(``kvpress_generate.py``, its own venv): plain torch + transformers, no project import.

The reading (scale 1.0, as a checkpoint without KV scales): a prefill chunk attends its own K/V as the
model computed them and earlier chunks' as stored (fp8, widened) -- FlashInfer's ragged + paged prefill
in SGLang; decode attends every row as stored, the new token's included (it is written first). Stored
rows are rounded lazily, at the next update: a press that runs after the prefill's attention (kvpress's
forward hook) therefore scores the chunk's own keys unrounded, as the server's SnapKV does, and keeps
rows that are then rounded, as the server's pool holds them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` through ``dtype`` and back (a plain cast: SGLang's quantisation at scale 1.0)."""
    return x.to(dtype).to(x.dtype)


def fp8_cache(dtype: torch.dtype = torch.float8_e4m3fn, prefix_kv: list | None = None) -> DynamicCache:
    """A ``DynamicCache`` whose layers store K/V rounded through ``dtype`` (see the module text).
    ``prefix_kv``: per layer ``(K, V)`` of the prompt's first tokens as the server's prefix cache holds
    them (a prefix hit: computed by an earlier prefill, stored rounded): the prefill uses them in place
    of its own K/V for those tokens, for attention and scores alike (:func:`cached_prefix_kv`)."""
    count = iter(range(1 << 30))

    class Fp8Layer(DynamicLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.index = next(count)  # layers are created in order, one per model layer

        def update(self, key_states, value_states, *args, **kwargs):
            if self.is_initialized:  # what the previous forward left unrounded is stored as fp8 now
                self.keys, self.values = rounded(self.keys, dtype), rounded(self.values, dtype)
            elif prefix_kv is not None:
                pk, pv = prefix_kv[self.index]
                n = pk.shape[-2]
                key_states = torch.cat([pk, key_states[..., n:, :]], dim=-2)
                value_states = torch.cat([pv, value_states[..., n:, :]], dim=-2)
            if key_states.shape[-2] == 1:  # decode: the new row is written, then read, as fp8
                key_states, value_states = rounded(key_states, dtype), rounded(value_states, dtype)
            return super().update(key_states, value_states, *args, **kwargs)

    cache = DynamicCache()
    cache.layer_class_to_replicate = Fp8Layer
    assert not cache.layers
    return cache


def cached_prefix_kv(model, ids: list[int], dtype: torch.dtype) -> list:
    """Per layer (K, V) of ``ids`` as a prefix cache holds them after an earlier prefill of a prompt
    starting with them: causal attention makes them the K/V of ``ids`` prefilled alone; rounded."""
    cache = fp8_cache(dtype)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), past_key_values=cache)
    return [(rounded(layer.keys, dtype), rounded(layer.values, dtype)) for layer in cache.layers]
