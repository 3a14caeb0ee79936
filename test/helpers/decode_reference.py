"""The float64 oracle of ragged decode: one segment at a time, read through the page table by a loop.

Independent of both implementations in ``sglang_fairkv_kernels`` (no chunking, no padding, no
batching); syncs freely. Used by the tests and by the device checks (``benchmark/device/``).
"""

from __future__ import annotations

import torch


def segment_rows(seg_pages: torch.Tensor, page_size: int, r: int, layer: int, h: int, n: int) -> torch.Tensor:
    """int64 ``[n]``: the rows of tokens ``0..n-1`` of segment ``(r, layer, h)``."""
    t = torch.arange(n, device=seg_pages.device)
    return seg_pages[r, layer, h, t // page_size].to(torch.int64) * page_size + t % page_size


def paged_decode_reference(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor,
                           seg_pages: torch.Tensor, seg_len: torch.Tensor, req_idx: torch.Tensor,
                           layer: int, page_size: int, sm_scale: float) -> torch.Tensor:
    """Per-segment float64 loop. ``q`` [B, Hl, G, D]; returns [B, Hl, G, D] float64; zero-length segments
    give zeros."""
    B, Hl, G, D = q.shape
    out = torch.zeros(B, Hl, G, D, dtype=torch.float64, device=q.device)
    for b, r in enumerate(req_idx.tolist()):
        for h in range(Hl):
            n = int(seg_len[r, layer, h])
            if n == 0:
                continue
            rows = segment_rows(seg_pages, page_size, r, layer, h, n)
            k, v = k_rows[rows].double(), v_rows[rows].double()
            out[b, h] = torch.softmax(q[b, h].double() @ k.T * sm_scale, dim=-1) @ v
    return out
