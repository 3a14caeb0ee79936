"""The ragged pool's row codec: the one place K/V rows are written, read and copied.

Rows are in the model's dtype, or fp8 (``float8_e4m3fn`` / ``float8_e5m2``, ``--kv-cache-dtype fp8_*``):
then they hold ``K / k_scale`` and ``V / v_scale`` (the layer's scales, SGLang's ``k_scale_float``, 1.0
without checkpoint scales). :meth:`~RowCodecMixin.write_rows` quantises (a plain cast after the division,
as SGLang's own pools do), :meth:`~RowCodecMixin.read_rows` dequantises what it gathers, moves
(compaction, tier fills) copy the raw bytes: a row is quantised exactly once. Every indexed read, write
and copy of fp8 rows goes through a ``uint8`` view (indexing kernels exist for it on every device).
The decode kernel reads fp8 rows itself and widens them in registers.
"""

from __future__ import annotations

import torch
from sglang_fairkv_kernels import FP8_DTYPES


class RowCodecMixin:
    """Of :class:`~sglang_fairkv.kv.ragged_pool.RaggedKVPool` (its ``k_rows`` / ``v_rows`` and ``dtype``)."""

    def _init_codec(self) -> None:
        #: fp8 rows: quantised on write, dequantised on read (``read_rows``; the decode kernel in registers)
        self.quantized = self.dtype in FP8_DTYPES
        # what indexing touches: the rows themselves, or their bytes for fp8
        self._k_raw = self.k_rows.view(torch.uint8) if self.quantized else self.k_rows
        self._v_raw = self.v_rows.view(torch.uint8) if self.quantized else self.v_rows

    def write_rows(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
        """K/V ``[..., D]`` (any float dtype) into rows ``rows`` (int64, ``k.shape[:-1]``): one scatter
        each; fp8 rows get ``K / k_scale`` cast (SGLang's ``set_kv_buffer`` quantisation)."""
        self._k_raw[rows] = self._encode(k, k_scale)
        self._v_raw[rows] = self._encode(v, v_scale)

    def read_rows(self, rows: torch.Tensor, dtype: torch.dtype, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of rows ``rows`` as ``[*rows.shape, D]`` in ``dtype``, dequantised (one gather each)."""
        return self._decode(self._k_raw[rows], dtype, k_scale), self._decode(self._v_raw[rows], dtype, v_scale)

    def read_keys(self, rows: torch.Tensor, dtype: torch.dtype, k_scale: float = 1.0) -> torch.Tensor:
        """K of rows ``rows`` as ``[*rows.shape, D]`` in ``dtype``, dequantised (one gather)."""
        return self._decode(self._k_raw[rows], dtype, k_scale)

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Rows ``src`` to rows ``dst`` as they are (no re-quantisation); the gather reads before writing."""
        self._k_raw[dst] = self._k_raw[src]
        self._v_raw[dst] = self._v_raw[src]

    def _encode(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.quantized:
            return x if x.dtype == self.dtype else x.to(self.dtype)
        return (x if scale == 1.0 else x / scale).to(self.dtype).view(torch.uint8)

    def _decode(self, raw: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
        if not self.quantized:
            return raw if raw.dtype == dtype else raw.to(dtype)
        x = raw.view(self.dtype).to(dtype)
        return x if scale == 1.0 else x * scale
