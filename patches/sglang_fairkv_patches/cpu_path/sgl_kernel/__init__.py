"""CPU stand-in for ``sgl_kernel`` (PyPI ``sglang-kernel``), used only when SGLang runs on a CPU.

Why: ``sgl_kernel`` is a CUDA-only extension; it fails to import on a machine without CUDA, yet with
``SGLANG_USE_CPU_ENGINE=1`` several SGLang 0.5.23 modules import ``*_cpu`` names from it at import
time, e.g. ``sglang/srt/mem_cache/allocation.py`` (``from sgl_kernel import
assign_req_to_token_pool_cpu``) and ``sglang/kernels/ops/kvcache/cache_move.py``. This directory is put
first on ``PYTHONPATH`` by ``sglang_fairkv.launch_server`` on CPU only (``sglang_fairkv_patches.enable_cpu_startup_patches``), so every spawned SGLang process
sees it.

What: ``assign_req_to_token_pool_cpu`` (the only function the Llama serving path calls) is
implemented in torch. Every other attribute resolves to a function that raises
``NotImplementedError`` naming itself when *called*, so that imports succeed but a path that really
needs a CUDA kernel fails loudly instead of computing garbage. No ``torch.ops.sgl_kernel`` ops are
registered, so SGLang keeps its native (non-AMX) fallbacks wherever it probes for them.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+fairkv-cpu-stand-in"
FAIRKV_CPU_STAND_IN = True


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new KV slots into its row of ``req_to_token``.

    Same contract as SGLang's Triton kernel ``assign_req_to_token_pool`` in
    ``sglang/srt/mem_cache/allocation.py``.

    Parameters
    ----------
    req_pool_indices : int64 [B], row of each request in ``req_to_token``.
    req_to_token : int32 [pool_rows, pool_len], token slot table (modified in place).
    start_offset, end_offset : int64 [B], half-open column range written for each request.
    out_cache_loc : int64 [sum(end - start)], the new slots, requests concatenated in order.
    pool_len : int, ``req_to_token.shape[1]``.
    """
    assert req_to_token.shape[1] == pool_len, (req_to_token.shape, pool_len)
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    pos = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n > 0:
            req_to_token[row, s:e] = out_cache_loc[pos : pos + n].to(req_to_token.dtype)
        pos += n


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _cuda_only(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is a CUDA kernel; this is sglang-fairkv's CPU stand-in for "
            "sgl_kernel, which implements only assign_req_to_token_pool_cpu. "
            "This SGLang code path is not supported on CPU."
        )

    _cuda_only.__name__ = name
    return _cuda_only
