"""Lower-right causal attention of one request's prefill chunk over its whole sequence, never through
SDPA's math kernel where a fused kernel can take it.

A chunk of ``n`` new tokens at the end of a ``t``-token sequence attends ``key j <= t - n + i`` (the
lower-right causal mask). The dispatch, in order:

1. ``n == t`` (a whole prompt in one chunk): SDPA with ``is_causal=True`` and no mask (upper-left equals
   lower-right); on CUDA the flash kernel, GQA included (``enable_gqa``).
2. CUDA and the flash kernel can take the inputs (fp16 / bf16, head dim up to 256): the flash op
   itself with ``is_causal=True``, which flash defines as lower-right when ``n < t``; GQA native
   (K/V keep their ``H`` heads). This is what torch's ``causal_lower_right`` bias dispatches to, without
   its cost: a ``CausalBias`` is a tensor subclass whose constructor allocates an uninitialised
   float32 tensor of ``[2, n, t]`` (1 GB of host memory for a 4096-token chunk over 32k tokens, per
   layer and request; measured with torch 2.13).
3. Otherwise (CPU, fp32 on CUDA, unusual head dims): an explicit ``[n, t]`` boolean mask, and K/V
   expanded to the query heads when grouped, so SDPA is never given both a mask and ``enable_gqa``
   (on CUDA only the math kernel takes that pair; with plain heads the memory-efficient kernel takes
   the mask). Memory: the mask and the expanded K/V of this one request.

Peak temporary memory is one request's chunk x sequence in every case, never a batch's padded product.

The batch in one call (:func:`flash_varlen`, CUDA, fp16 / bf16): every request's queries and keys packed
after each other, ``cu_seqlens`` marking where each starts, torch's varlen flash op with
``is_causal=True`` (FlashAttention-2 aligns the mask bottom-right per sequence, i.e. lower-right for a
chunk over its prefix), GQA native. The backend uses it wherever :func:`varlen_usable` says so.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention


def flash_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> bool:
    """Whether torch's flash kernel takes these ``[1, heads, len, D]`` inputs (CUDA only)."""
    if not q.is_cuda:
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, gqa)))


def varlen_usable(dtype: torch.dtype, head_dim: int, device) -> bool:
    """Whether torch's varlen flash op takes the pool's ``dtype`` and ``head_dim`` on ``device``: CUDA,
    fp16 / bf16, head dim a multiple of 8 up to 256, compute capability 8.0 or newer (FlashAttention-2)."""
    dev = torch.device(device)
    if dev.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 or head_dim > 256 or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(dev)[0] >= 8


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                 max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """A batch of lower-right causal attentions in one call: ``q`` [T, Hq, D] (request ``i``'s queries at
    ``cu_q[i]:cu_q[i + 1]``, the last ones of its sequence), ``k`` / ``v`` [K, H, D] (its keys at
    ``cu_k[i]:cu_k[i + 1]``), ``cu_q`` / ``cu_k`` int32 [b + 1]; ``max_q`` / ``max_k`` host ints.
    Returns [T, Hq, Dv]. No host sync."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


def flash_lower_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's flash op, ``is_causal=True`` (lower-right when ``n < t``), GQA native; [1, Hq, n, Dv]."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal=True, scale=scale)[0]


def lower_right_mask(n: int, t: int, device) -> torch.Tensor:
    """bool ``[n, t]``: query ``i`` (at position ``t - n + i``) sees key ``j <= t - n + i``."""
    return torch.arange(t, device=device)[None, :] <= torch.arange(t - n, t, device=device)[:, None]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` [1, Hq, n, D] over ``k`` / ``v`` [1, H, t, D] (``t >= n``, ``Hq % H == 0``), lower-right
    causal; returns [1, Hq, n, Dv]. No host sync (shapes only)."""
    n, t = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    gqa = group > 1
    if n == t:
        return scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if flash_usable(q, k, v, gqa):
        return flash_lower_right(q, k, v, scale)
    if gqa:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return scaled_dot_product_attention(q, k, v, attn_mask=lower_right_mask(n, t, q.device), scale=scale)
