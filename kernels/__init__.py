"""Kernels of sglang-fairkv (importable as ``sglang_fairkv.kernels``).

``ragged_decode``: decode attention over ragged per-(request, KV head) segments, Triton on CUDA (or
under ``TRITON_INTERPRET=1`` on CPU), with ``ragged_decode_reference`` the float32 torch version.
"""

from .ragged_decode import ragged_decode, ragged_decode_reference, chunk_indptr_for

__all__ = ["ragged_decode", "ragged_decode_reference", "chunk_indptr_for"]
