"""``--attention-backend fairkv``: SGLang attention over the ragged per-(request, layer, KV head) pool.

Per step, ``init_forward_metadata`` takes every page decision on the host (the pool's host mirror and
free stack) and sends the step's table writes and metadata in one host-to-device copy; the per-layer
calls then read only device tensors and host values of that metadata: no host sync, no
data-dependent host decision (``test/test_decode_path.py`` makes the sync entry points raise).

Prefill (extend): :mod:`.prefill` (the packed K/V write, one varlen attention call per layer on CUDA,
compression inside the forward, the TP exchanges of kept counts and AdaKV scores).

Decode: one new row per active segment (pages taken on the host for all layers once per step, write
rows computed on the device), then ragged attention of each GQA group over its own segment, read
through the page table (:mod:`sglang_fairkv_kernels`, one contract): on CUDA the static-bounded Triton
kernel ``paged_decode`` (``FAIRKV_DECODE_KERNEL=torch`` for the torch twin), on CPU its torch twin
``paged_decode_torch`` (padded to the layer's longest segment, a host value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_fairkv_kernels import paged_decode_torch

from .. import env
from ..serving.kv_cache import FairKVCache
from ..serving.state import FairKVState
from .capabilities import layer_problem, model_problem
from .causal import varlen_usable
from .decode_compress import DecodeCompressor
from .prefill import ExtendMetadata, PrefillMixin, kv_scales

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeMetadata:
    """One decode step, built once per step (no device read-back).

    ``req_pool_idx`` int64 [b] (device); ``write_rows``: per layer int64 [b, H], the row of each new
    token; ``lens`` int32 [b, L, H] lengths after the step; ``max_len`` (host, torch path only): the
    longest segment of each layer in the batch. The Triton kernel needs nothing more: each segment's
    split count comes from ``seg_len`` in the kernel. Per-layer entries are views made once per step
    (a list index per layer). ``ring_slot`` int64 [b] (device, decode-time compression only): where each
    request's queries of this step go in the decode query ring.
    """

    req_pool_idx: torch.Tensor
    write_rows: tuple[torch.Tensor, ...]
    lens: torch.Tensor
    max_len: list[int] | None
    ring_slot: torch.Tensor | None = None


class FairKVAttnBackend(PrefillMixin, AttentionBackend):
    """Ragged per-head attention; needs the fairkv pool (``FairKVCache``) built by our pool hook."""

    def __init__(self, model_runner):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, FairKVCache):
            raise RuntimeError("the fairkv attention backend needs the fairkv KV pool (start the server "
                               "with python -m sglang_fairkv.launch_server)")
        why = model_problem(model_runner.model, torch.device(model_runner.device).type)
        if why:
            raise RuntimeError(f"fairkv backend: {why}; serve this model without --kv-compress")
        self.token_to_kv_pool = pool  # what SGLang's get_token_to_kv_pool() reads off the backend
        self.state: FairKVState = pool.state
        self.pool = self.state.pool
        self.device = model_runner.device
        self.num_layers = self.pool.num_layers
        on_cuda = torch.device(self.device).type == "cuda"
        self.decode_kernel = env.decode_kernel() if on_cuda else "torch"
        # prefill attention as one varlen flash call per layer where the kernel takes the pool's dtype
        attn_dtype = model_runner.dtype if self.pool.quantized else self.pool.dtype  # fp8 rows: read widened
        self.prefill_varlen = on_cuda and varlen_usable(attn_dtype, self.pool.head_dim, self.device)
        self.workspace = self.state.workspace
        if (self.decode_kernel == "triton" and self.pool.dtype == torch.float8_e4m3fn
                and torch.cuda.get_device_capability(self.device) < (8, 9)):
            raise RuntimeError("fairkv: --kv-cache-dtype fp8_e4m3 needs sm_89 or newer for the Triton decode "
                               "kernel (Triton has no e4m3 conversion before Ada): use fp8_e5m2 here, or "
                               "FAIRKV_DECODE_KERNEL=torch (eager decode, no CUDA graphs)")
        if self.decode_kernel == "triton":
            from sglang_fairkv_kernels import paged_decode, plan_decode

            if self.workspace is None:
                raise RuntimeError("fairkv: the Triton decode path needs the pool's static workspace")
            self._paged_decode = paged_decode
            self._plan_decode = plan_decode
        self.forward_metadata: ExtendMetadata | DecodeMetadata | None = None
        self.ledger = self.state.ledger
        self.tp = self.state.rank_plan.tp
        self.num_kv_heads_total = self.state.rank_plan.plan.num_kv_heads
        self._group = None
        self._checked_layers: set[int] = set()
        if self.tp > 1 and not getattr(model_runner.model, "fairkv", False):
            raise RuntimeError("fairkv backend at TP > 1: the model is not a FairKV class "
                               f"({type(model_runner.model).__name__}); launch with --fairkv-plan")
        if self.tp > 1:
            from sglang.srt.runtime_context import get_parallel

            self._group = get_parallel().tp_group.device_group
        #: decode-time compression (``--kv-decode-compress``), else None
        self.decode_press = DecodeCompressor(self) if self.state.cfg.decode_enabled else None

    # ---- metadata (once per step; host decisions, one upload) --------------------------------
    def init_forward_metadata(self, forward_batch):
        """Eager step (no CUDA graph): host bookkeeping, one upload, metadata of this batch."""
        mode = forward_batch.forward_mode
        self.run_pending_compression()
        self.pool.begin_step()
        if mode.is_idle():
            self.forward_metadata = None
        elif mode.is_decode():
            self.forward_metadata = self._decode_metadata(forward_batch)
        elif mode.is_extend():
            self.forward_metadata = self._extend_metadata(forward_batch)
        else:
            raise NotImplementedError(f"fairkv backend: forward mode {mode} is not supported")

    def run_pending_compression(self) -> None:
        """Decode-time compression of the requests the last decode step brought to their interval (the
        ``ModelRunner.forward`` AFTER hook runs it right after that step; a step that finds it still
        pending -- a caller without the hook -- runs it first)."""
        if self.decode_press is not None:
            self.decode_press.run_pending()

    def _decode_step(self, idx_host: np.ndarray, idx_dev: torch.Tensor,
                     out: tuple[torch.Tensor, ...] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A decode step's bookkeeping, eager or graph replay alike: one new row per segment of each
        request (host ``[b]`` and device ``[b]`` indices) in the pool and the ledger; returns the new
        rows ``[L, b, H]``, lengths after the step ``[b, L, H]`` and (decode-time compression) the query
        ring's slots ``[b]`` (device, one upload). ``out``: the graph runner's static buffers, written in
        place (padding slots zeroed)."""
        slots = self.decode_press.step_slots(idx_host) if self.decode_press is not None else None
        rows, lens = self.pool.append(idx_host, idx_dev, out=out, extra=slots)
        self.ledger.append(idx_host)
        self.state.sample_decode_balance(idx_host)  # host, from the ledger, every few steps
        return rows, lens, self.pool.step_extra if slots is not None else None

    def _plan_step(self, idx_dev: torch.Tensor) -> None:
        """The step's decode work plan for every layer (Triton path; one launch into the workspace's
        static buffers, after the step's lengths are on the device): pieces of at most a layer's even
        share over every (slot, head) segment (:func:`~sglang_fairkv_kernels.plan_decode`)."""
        self._plan_decode(self.pool.seg_len, idx_dev, self.workspace)

    def _decode_metadata(self, forward_batch) -> DecodeMetadata:
        idx_dev = forward_batch.req_pool_indices
        idx_host = self.state.host_req_pool_indices(forward_batch)
        write_rows, lens, slots = self._decode_step(idx_host, idx_dev)
        write_rows = write_rows.unbind(0)
        if self.decode_kernel == "triton":
            self._plan_step(idx_dev)
            return DecodeMetadata(idx_dev, write_rows, lens, None, slots)
        lens_h = self.pool.seg_len_host[idx_host]  # [b, L, H] after the step (host mirror)
        max_len = lens_h.max(axis=(0, 2)).tolist() if lens_h.size else [0] * self.num_layers
        return DecodeMetadata(idx_dev, write_rows, lens, max_len, slots)

    # ---- CUDA graphs (decode) ----------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Static buffers for every decode batch size SGLang captures (up to ``max_bs``): the request
        indices ``[max_bs]``, the new tokens' rows ``[L, max_bs, H]`` and lengths ``[max_bs, L, H]``.
        Captured graphs read only these (and the pool's tables in
        place); each replay's out-of-graph part (:meth:`init_forward_metadata_out_graph`) refills them.
        Allocated once: never reallocated."""
        if self.decode_kernel != "triton":
            raise NotImplementedError("fairkv backend: CUDA graphs need the Triton decode kernel "
                                      "(FAIRKV_DECODE_KERNEL=torch runs eager only)")
        L, H, dev = self.num_layers, self.pool.num_kv_heads, self.pool.device
        self._g_idx = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self._g_rows = torch.zeros(L, max_bs, H, dtype=torch.int64, device=dev)
        self._g_lens = torch.zeros(max_bs, L, H, dtype=torch.int32, device=dev)
        self._g_slot = torch.zeros(max_bs, dtype=torch.int64, device=dev)  # decode query ring slots
        self._g_meta: dict[int, DecodeMetadata] = {}

    def graph_buffers(self) -> tuple[torch.Tensor, ...]:
        """The static buffers (tests check they are never reallocated)."""
        return self._g_idx, self._g_rows, self._g_lens, self._g_slot

    def _graph_metadata(self, bs: int) -> DecodeMetadata:
        """The decode metadata of a captured batch size: views of the static buffers (made once)."""
        md = self._g_meta.get(bs)
        if md is None:
            md = DecodeMetadata(self._g_idx[:bs], self._g_rows[:, :bs].unbind(0), self._g_lens[:bs], None,
                                self._g_slot[:bs])
            self._g_meta[bs] = md
        return md

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Outside the graph. Capture: the metadata of ``batch_size`` slots over the static buffers,
        all slots empty (writes to the sink page, no attention work). Replay (SGLang's padded view of
        the batch; ``num_padding`` slots past the real ones): the step's host bookkeeping and upload
        as in eager mode, the real slots' rows / lengths / indices written into the buffers by the step
        itself (on CUDA the fused ``decode_step`` launch), padding slots zeroed (they write the sink
        page and attend nothing), then the step's work plan into the workspace's static buffers. The
        kernel's launch configuration of ``bs`` is static (:meth:`DecodeWorkspace.programs_for`), so nothing
        else is rebuilt."""
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            return self.init_forward_metadata(forward_batch)
        bs = int(forward_batch.batch_size)
        if in_capture:
            self._g_idx[:bs].zero_()
            self._g_rows[:, :bs].zero_()
            self._g_lens[:bs].zero_()
            self._g_slot[:bs].zero_()
            self._plan_step(self._g_idx[:bs])  # every slot empty: no piece
            self.forward_metadata = self._graph_metadata(bs)
            return
        self.run_pending_compression()
        self.pool.begin_step()
        raw = bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        idx_dev = forward_batch.req_pool_indices[:raw]
        idx_host = self.state.host_req_pool_indices(forward_batch)[:raw]
        # rows, lengths and indices straight into the static buffers (on CUDA: one upload, two launches)
        _, _, slots = self._decode_step(idx_host, idx_dev,
                                        out=(self._g_rows[:, :bs], self._g_lens[:bs], self._g_idx[:bs]))
        if slots is not None:  # the query ring's slots (padding slots: slot 0 of the padding row 0)
            self._g_slot[:raw].copy_(slots)
            self._g_slot[raw:bs].zero_()
        self._plan_step(self._g_idx[:bs])  # padding slots: request 0, no piece
        self.forward_metadata = self._graph_metadata(bs)

    def init_forward_metadata_in_graph(self, forward_batch):
        """Nothing: the captured part is each layer's writes and kernel launch on the static buffers."""

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def support_triton(self):
        return False

    # ---- prefill ---------------------------------------------------------------------------
    def _check_layer(self, layer) -> None:
        """Refuse, once per layer, what this backend does not compute (soft-capping, sliding windows):
        SGLang's warm-up request reaches every layer, so a model that needs either stops at start-up."""
        if layer.layer_id in self._checked_layers:
            return
        problem = layer_problem(layer)
        if problem is not None:
            raise NotImplementedError(f"the fairkv attention backend cannot serve this model: {problem}")
        self._checked_layers.add(layer.layer_id)
        if self.decode_press is not None:  # what decode-time scoring of this layer needs (host floats)
            self.decode_press.scaling[layer.layer_id] = (layer.scaling, kv_scales(layer)[0])

    # ---- decode ----------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        """One layer of a decode step: write the new K/V rows, attend. Reads only the step's
        metadata and the pool's device tables: no host sync, no data-dependent host decision, no
        per-token row list (the kernel reads the page table). CUDA path: 8 tensor ops (2 writes, 2
        kernel launches, 4 views) when q / k / v are in the pool's dtype."""
        self._check_layer(layer)
        md: DecodeMetadata = self.forward_metadata
        lid = layer.layer_id
        hq, hkv, d, dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
        b, pool = md.req_pool_idx.shape[0], self.pool
        k_scale, v_scale = kv_scales(layer)
        if save_kv_cache and k is not None:
            rows = md.write_rows[lid][:, :hkv] if hkv < pool.num_kv_heads else md.write_rows[lid]
            # page-0 rows: segments not held here; fp8 rows quantised here, the new token's included
            pool.write_rows(rows, k.reshape(b, hkv, d), v.reshape(b, hkv, dv), k_scale, v_scale)
        if self.decode_press is not None:  # the step's queries, for the next decode-time compression
            self.decode_press.write(q.reshape(b, hq, d), lid, md.req_pool_idx, md.ring_slot)
        # q in the rows' dtype (fp8 rows: q's own, the kernel widens the rows in registers)
        qg = _as(q.reshape(b, hkv, hq // hkv, d), q.dtype if pool.quantized else pool.dtype)
        if self.decode_kernel == "triton":
            out = self._paged_decode(qg, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len,
                                     md.req_pool_idx, lid, layer.scaling, self.workspace, pool.page_size,
                                     planned=True, k_scale=k_scale, v_scale=v_scale)
        else:
            out = paged_decode_torch(qg, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len, md.req_pool_idx,
                                     lid, layer.scaling, pool.page_size, max_len=md.max_len[lid],
                                     k_scale=k_scale, v_scale=v_scale)
        return _as(out, q.dtype).reshape(b, hq * dv)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (no op when it already is)."""
    return x if x.dtype == dtype else x.to(dtype)


def create_fairkv_backend(model_runner) -> FairKVAttnBackend:
    """Factory for SGLang's attention registry (``register_attention_backend("fairkv")``)."""
    return FairKVAttnBackend(model_runner)
