"""sglang-fairkv's kernels: decode attention that reads the ragged per-head pool's page table.

One contract, two implementations (see :func:`paged_decode` for the tensors):

* :func:`plan_decode` + :func:`paged_decode` -- Triton (CUDA, or the CPU interpreter under
  ``TRITON_INTERPRET=1``), split-KV with the work split by length: once per step the plan cuts every
  layer's tokens into pieces of at most its even share over all (slot, head) segments, then each layer
  runs one piece per program of a static grid (:class:`DecodeWorkspace`) and merges; capturable in a CUDA
  graph.
* :func:`paged_decode_torch` -- plain torch, padded to the layer's longest segment (the CPU server).

* :func:`apply_table_writes` and :func:`decode_step` -- a decode step's device part of the pool's
  bookkeeping (the upload's table writes; new rows, lengths and the step's metadata) in two launches.

No SGLang import: the kernels know the pool's tensors, not the server.
"""

from .decode_step import apply_table_writes, decode_step
from .ragged_decode import FP8_DTYPES, DecodeWorkspace, paged_decode, plan_decode, target_programs_for
from .ragged_torch import paged_decode_torch

__all__ = ["FP8_DTYPES", "DecodeWorkspace", "apply_table_writes", "decode_step", "paged_decode", "paged_decode_torch", "plan_decode",
           "target_programs_for"]
