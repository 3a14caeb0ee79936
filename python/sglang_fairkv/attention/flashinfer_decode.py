"""FlashInfer decode over the ragged pool (CUDA; ``FAIRKV_DECODE_KERNEL=flashinfer``).

Each (request, KV head) segment is one FlashInfer "request" with one KV head, page size 1: the pool's
rows are the pages (``k_rows.view(-1, 1, 1, D)``, NHD), the segment's CSR rows are its page indices,
the GQA group is the query heads. Correct, but ``plan()`` runs on the host for every layer (its
segment lengths differ per layer) and skew serialises it (DESIGN section 7 of the shared notes:
0.2-1 ms per plan, 1.2-4.7x slower than uniform decode) -- the default CUDA path is the Triton kernel.
"""

from __future__ import annotations

import torch


class FlashInferRaggedDecode:
    """Holds the workspace; :meth:`run` plans and runs one layer."""

    def __init__(self, device: torch.device | str, workspace_bytes: int = 128 * 1024 * 1024):
        import flashinfer

        self._flashinfer = flashinfer
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)

    def run(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, seg_indptr: torch.Tensor,
            seg_rows: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """``q`` [S, G, D] (pool dtype), rows [N, D], ``seg_indptr`` [S + 1], ``seg_rows`` [nnz] -> [S, G, D]."""
        s, g, d = q.shape
        w = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        indptr = seg_indptr.to(torch.int32)
        # one row per page: the last page holds 1 row (an empty segment has no page: kv_len 0)
        last = torch.ones(s, dtype=torch.int32, device=q.device)
        w.plan(indptr, seg_rows.to(torch.int32), last, g, 1, d, 1, q_data_type=q.dtype,
               kv_data_type=k_rows.dtype, sm_scale=sm_scale)
        return w.run(q.contiguous(), (k_rows.view(-1, 1, 1, d), v_rows.view(-1, 1, 1, d)))
