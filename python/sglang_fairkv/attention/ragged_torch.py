"""Ragged decode attention in plain torch: the CPU path of the fairkv backend.

Same contract as ``kernels.ragged_decode.ragged_decode`` (whose Triton kernel is the CUDA path):
segments are padded to the longest one of the batch and run as one batched matmul -- fine on CPU
where the batch is small; on a GPU skew would make padding expensive, which is what the kernel avoids.
"""

from __future__ import annotations

import torch


def ragged_decode_torch(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                        seg_indptr: torch.Tensor, seg_rows: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Decode attention of ``q`` [S, G, D] over segment ``s``'s rows ``seg_rows[indptr[s]:indptr[s+1]]``.

    ``k_rows``, ``v_rows``: [N, D]. Returns [S, G, D] in ``q.dtype``, computed in float32;
    zero-length segments give zeros.
    """
    S, G, D = q.shape
    indptr = seg_indptr.to(torch.int64)
    lens = indptr[1:] - indptr[:-1]
    if S == 0:
        return q.new_zeros(0, G, D)
    lmax = int(lens.max())
    if lmax == 0:
        return q.new_zeros(S, G, D)
    t = torch.arange(lmax, device=q.device)
    valid = t[None, :] < lens[:, None]  # [S, Lmax]
    flat = (indptr[:-1, None] + t[None, :]).clamp_max(max(seg_rows.numel() - 1, 0))
    rows = torch.where(valid, seg_rows[flat], torch.zeros_like(flat))
    k = k_rows[rows].float()  # [S, Lmax, D]
    v = v_rows[rows].float()
    logits = torch.matmul(q.float(), k.transpose(1, 2)) * sm_scale  # [S, G, Lmax]
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # empty segments: all -inf
    return torch.matmul(probs, v).to(q.dtype)
