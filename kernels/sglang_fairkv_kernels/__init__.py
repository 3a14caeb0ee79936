"""sglang-fairkv's kernels: decode attention that reads the ragged per-head pool's page table.

One contract, two implementations (see :func:`paged_decode` for the tensors):

* :func:`paged_decode` -- Triton (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``), static
  grid and scratch fixed by :class:`DecodeWorkspace`, the step's chunk tables from :func:`chunk_tables`;
  capturable in a CUDA graph.
* :func:`paged_decode_torch` -- plain torch, padded to the layer's longest segment (the CPU server).

No SGLang import: the kernels know the pool's tensors, not the server.
"""

from .ragged_decode import DecodeWorkspace, chunk_tables, paged_decode
from .ragged_torch import paged_decode_torch

__all__ = ["DecodeWorkspace", "chunk_tables", "paged_decode", "paged_decode_torch"]
