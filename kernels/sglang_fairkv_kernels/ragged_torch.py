"""The torch twin of :func:`~sglang_fairkv_kernels.ragged_decode.paged_decode`: the CPU decode path.

Same contract as the Triton kernel (the pool's page table read in place, ``[B, Hl, G, D]`` out, zeros
for empty segments), computed differently: segments are padded to ``max_len``, the longest segment of
the layer in this step (a host value the caller knows from the pool's host mirror, so no sync), and
run as one batched matmul. Fine on a CPU, where batches are small; on a GPU the padding would cost
what the kernel's chunking avoids, so the CUDA path uses the kernel.
"""

from __future__ import annotations

import torch


def paged_decode_torch(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, seg_pages: torch.Tensor,
                       seg_len: torch.Tensor, req_idx: torch.Tensor, layer: int, sm_scale: float,
                       page_size: int, *, max_len: int, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> torch.Tensor:
    """Decode attention of one layer over the pool's page table, in torch.

    Parameters
    ----------
    q : [B, Hl, G, D], any float dtype; the G query heads of local KV head ``h`` of batch slot ``b``.
    k_rows, v_rows : [N, D], the pool's rows: any float dtype, fp8 included (rows hold ``K / k_scale``,
        ``V / v_scale``; dequantised here as they are gathered).
    seg_pages : int32 ``[R, L, H, MP]`` pages of every segment; ``seg_len`` int ``[R, L, H]`` lengths.
    req_idx : int ``[B]``, the ``req_pool_idx`` of each slot.
    max_len : host int, at least the longest ``seg_len[req_idx, layer, :Hl]`` (longer is only slower).

    Returns ``[B, Hl, G, D]`` in ``q.dtype``, computed in float32; zero-length segments give zeros.
    """
    Hl = q.shape[1]
    r = req_idx.to(torch.int64)
    lens = seg_len[r, layer, :Hl]  # [B, Hl]
    t = torch.arange(max_len, device=q.device)
    pages = seg_pages[r, layer, :Hl][:, :, t // page_size]  # [B, Hl, T]
    rows = pages.to(torch.int64) * page_size + t % page_size
    valid = t < lens[..., None]  # [B, Hl, T]
    safe = torch.where(valid, rows, 0)
    k = k_rows[safe].float()  # [B, Hl, T, D]
    v = v_rows[safe].float()
    if k_scale != 1.0:
        k = k * k_scale
    if v_scale != 1.0:
        v = v * v_scale
    logits = torch.matmul(q.float(), k.transpose(-1, -2)) * sm_scale  # [B, Hl, G, T]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty segments: all -inf
    return torch.matmul(probs, v).to(q.dtype)
