"""Kernels of sglang-fairkv (importable as ``sglang_fairkv.kernels``).

``ragged_decode``: decode attention that reads the ragged pool's page table (``paged_decode``, Triton
on CUDA or under ``TRITON_INTERPRET=1`` on CPU), its static bounds (``DecodeWorkspace``), the per-step
chunk tables (``chunk_tables``) and a float64 reference (``paged_decode_reference``).
"""

from .ragged_decode import DecodeWorkspace, chunk_tables, paged_decode, paged_decode_reference

__all__ = ["DecodeWorkspace", "chunk_tables", "paged_decode", "paged_decode_reference"]
