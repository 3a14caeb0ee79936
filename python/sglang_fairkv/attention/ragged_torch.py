"""Ragged decode attention in plain torch over the pool's page table: the CPU path of the fairkv backend.

Same contract as ``kernels.ragged_decode.paged_decode`` (the CUDA path): segments are padded to the
longest one of the layer in this step (``max_len``, known on the host from the pool's host mirror,
so no sync) and run as one batched matmul -- fine on CPU where batches are small; on a GPU the skew
would make the padding expensive, which is what the kernel avoids.
"""

from __future__ import annotations

import torch


def paged_decode_torch(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, rows: torch.Tensor,
                       lens: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Decode attention of ``q`` [B, Hl, G, D] over the first ``lens[b, h]`` of ``rows[b, h]``.

    ``rows``: int64 ``[B, Hl, T]`` pool rows of positions ``0..T-1`` of each segment (from
    ``RaggedKVPool.rows_at``; entries past the length are ignored); ``lens``: int ``[B, Hl]``.
    Returns [B, Hl, G, D] in ``q.dtype``, computed in float32; zero-length segments give zeros.
    """
    T = rows.shape[-1]
    valid = torch.arange(T, device=q.device) < lens[..., None]  # [B, Hl, T]
    safe = torch.where(valid, rows, 0)
    k = k_rows[safe].float()  # [B, Hl, T, D]
    v = v_rows[safe].float()
    logits = torch.matmul(q.float(), k.transpose(-1, -2)) * sm_scale  # [B, Hl, G, T]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty segments: all -inf
    return torch.matmul(probs, v).to(q.dtype)
