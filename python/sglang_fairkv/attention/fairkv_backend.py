"""``--attention-backend fairkv``: SGLang attention over the ragged per-(request, layer, KV head) pool.

Per step, ``init_forward_metadata`` takes every page decision on the host (the pool's host mirror and
free stack) and sends the step's table writes and metadata in one host-to-device copy; the per-layer
calls then read only device tensors and host values of that metadata: no host sync, no
data-dependent host decision (``test/test_decode_path.py`` makes the sync entry points raise).

Prefill (extend): each chunk's K/V are written into the request's segments (the last chunk of a prompt
that is compressed takes each layer's pages only when that layer runs, and gives the tail back right
after compressing it: the dense prompt of one layer at a time), then each request's chunk attends
over its own rows gathered from the page table, one lower-right causal attention call per request
(``attention/causal.py``: the flash kernel on CUDA, GQA included; work and memory one request's
chunk x sequence, never the batch's padded product; before compression every segment of a request
holds every position). When the
chunk is the prompt's last, the layer is compressed right there: SnapKV scores from the window's
post-RoPE queries against all prompt keys, budgets per ``CompressConfig``, the kept rows are compacted
to the segment's front and the tail pages go back to the pool. Layer ``l``'s compression only changes
what later decode steps read, so compressing inside the forward equals kvpress's post-prefill hook.

Under a FairKV plan a rank holds, per layer, the KV heads the plan gives it (``layer.tp_k_head_num`` of
them, local head ``j`` = global head ``state.local_heads(l)[j]``), and for a copied head only the
requests assigned to its replica: the other requests' segments are inactive, and their query heads
produce zeros (the TP sum of the layer output adds the owner's result). After compressing a layer the
ranks exchange what the TP group's ledger needs (kept counts per head) and, for AdaKV, the scores
(the layer-wide top-k must see every head): one all-reduce each, on every rank, in the same order.

Decode: one new row per active segment (pages taken on the host for all layers once per step, write
rows computed on the device), then ragged attention of each GQA group over its own segment, read
through the page table (:mod:`sglang_fairkv_kernels`, one contract): on CUDA the static-bounded Triton
kernel ``paged_decode`` (``FAIRKV_DECODE_KERNEL=torch`` for the torch twin), on CPU its torch twin
``paged_decode_torch`` (padded to the layer's longest segment, a host value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_fairkv_kernels import paged_decode_torch

from .. import env
from ..compress.footprint import compresses
from ..compress.policy import kept_for_layer
from ..serving.kv_cache import FairKVCache
from .capabilities import layer_problem
from .causal import causal_attention
from ..serving.state import FairKVState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtendMetadata:
    """One prefill forward, built once per step (host lists + one upload shared with the pool's
    table writes).

    Host: per request ``req_pool_idx``, prefix / chunk / sequence lengths (tokens), whether the chunk
    completes the prompt (compress then), and where its tokens start in the packed batch.
    Device: ``idx`` int64 [b]; ``q_slot`` int64 [T], packed token -> ``b * max_ext + e`` (the padded
    layout of the batch's one K/V write); ``new_pos`` int64 [b, max_ext] the position of each padded
    token (0 for padding) and ``new_valid`` bool [b, max_ext]; ``key_pos`` int64 [max_seq] = ``arange``
    (the key positions a request's attention gathers); ``active`` bool [b, L, H], the segments each
    request holds on this rank. No mask tensor: each request's attention is lower-right causal by
    construction (``attention/causal.py``).
    ``grow_idx`` / ``grow_len`` (host int64 [g], or None): requests whose chunk ends a prompt that is
    compressed, and that prompt's length; their pages are taken layer by layer in the forward
    (compress as you go: one layer of the prompt dense at a time), not here.
    """

    req_pool_idx: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    is_last: list[bool]
    starts: list[int]
    max_ext: int
    max_seq: int
    idx: torch.Tensor
    q_slot: torch.Tensor
    new_pos: torch.Tensor
    new_valid: torch.Tensor
    key_pos: torch.Tensor
    active: torch.Tensor
    grow_idx: np.ndarray | None = None
    grow_len: np.ndarray | None = None
    #: the dense prefix tier: per request whose prefill uses it, the tier token of every position so far
    #: (int64 [seq], device; None for the others, and the whole list None when no request does);
    #: ``tier_new`` int64 [b, max_ext] the tier tokens of the chunk's positions (0 elsewhere) and
    #: ``tier_b`` bool [b]
    tier_tok: list[torch.Tensor | None] | None = None
    tier_new: torch.Tensor | None = None
    tier_b: torch.Tensor | None = None

    def tier_tokens(self, i: int) -> torch.Tensor | None:
        """Request ``i``'s tier tokens (int64 [seq], device), or None when its prefill does not use the tier."""
        return None if self.tier_tok is None else self.tier_tok[i]


@dataclass(frozen=True)
class DecodeMetadata:
    """One decode step, built once per step (no device read-back).

    ``req_pool_idx`` int64 [b] (device); ``write_rows``: per layer int64 [b, H], the row of each new
    token; ``lens`` int32 [b, L, H] lengths after the step; ``max_len`` (host, torch path only): the
    longest segment of each layer in the batch. The Triton kernel needs nothing more: each segment's
    split count comes from ``seg_len`` in the kernel. Per-layer entries are views made once per step
    (a list index per layer).
    """

    req_pool_idx: torch.Tensor
    write_rows: tuple[torch.Tensor, ...]
    lens: torch.Tensor
    max_len: list[int] | None


class FairKVAttnBackend(AttentionBackend):
    """Ragged per-head attention; needs the fairkv pool (``FairKVCache``) built by our pool hook."""

    def __init__(self, model_runner):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, FairKVCache):
            raise RuntimeError("the fairkv attention backend needs the fairkv KV pool (start the server "
                               "with python -m sglang_fairkv.launch_server)")
        self.state: FairKVState = pool.state
        self.pool = self.state.pool
        self.device = model_runner.device
        self.num_layers = self.pool.num_layers
        on_cuda = torch.device(self.device).type == "cuda"
        self.decode_kernel = env.decode_kernel() if on_cuda else "torch"
        self.workspace = self.state.workspace
        if self.decode_kernel == "triton":
            from sglang_fairkv_kernels import paged_decode

            if self.workspace is None:
                raise RuntimeError("fairkv: the Triton decode path needs the pool's static workspace")
            self._paged_decode = paged_decode
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

    # ---- metadata (once per step; host decisions, one upload) --------------------------------
    def init_forward_metadata(self, forward_batch):
        """Eager step (no CUDA graph): host bookkeeping, one upload, metadata of this batch."""
        mode = forward_batch.forward_mode
        self.pool.begin_step()
        if mode.is_idle():
            self.forward_metadata = None
        elif mode.is_decode():
            self.forward_metadata = self._decode_metadata(forward_batch)
        elif mode.is_extend():
            self.forward_metadata = self._extend_metadata(forward_batch)
        else:
            raise NotImplementedError(f"fairkv backend: forward mode {mode} is not supported")

    def _decode_step(self, idx_host: np.ndarray, idx_dev: torch.Tensor,
                     out: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's bookkeeping, eager or graph replay alike: one new row per segment of each
        request (host ``[b]`` and device ``[b]`` indices) in the pool and the ledger; returns the new
        rows ``[L, b, H]`` and lengths after the step ``[b, L, H]`` (device, one upload). ``out``: the
        graph runner's static buffers, written in place (padding slots zeroed)."""
        rows, lens = self.pool.append(idx_host, idx_dev, out=out)
        self.ledger.append(idx_host)
        self.state.sample_decode_balance(idx_host)  # host, from the ledger, every few steps
        return rows, lens

    def _decode_metadata(self, forward_batch) -> DecodeMetadata:
        idx_dev = forward_batch.req_pool_indices
        idx_host = self.state.host_req_pool_indices(forward_batch)
        write_rows, lens = self._decode_step(idx_host, idx_dev)
        write_rows = write_rows.unbind(0)
        if self.decode_kernel == "triton":
            return DecodeMetadata(idx_dev, write_rows, lens, None)
        lens_h = self.pool.seg_len_host[idx_host]  # [b, L, H] after the step (host mirror)
        max_len = lens_h.max(axis=(0, 2)).tolist() if lens_h.size else [0] * self.num_layers
        return DecodeMetadata(idx_dev, write_rows, lens, max_len)

    def _extend_metadata(self, forward_batch) -> ExtendMetadata:
        idx = self.state.host_req_pool_indices(forward_batch)
        prefix = np.asarray(forward_batch.extend_prefix_lens_cpu, dtype=np.int64)
        ext = np.asarray(forward_batch.extend_seq_lens_cpu, dtype=np.int64)
        seq = prefix + ext
        reqs = self.state.requests
        target = reqs.target_len[idx]
        last = (target < 0) | (seq >= target)
        cfg = self.state.cfg
        # prefills through the dense prefix tier: the chunk's dense KV goes to tier blocks (every head
        # this rank holds), the segments are filled from there when the prompt is compressed
        tier = np.array([int(r) in reqs.tier_tok for r in idx.tolist()], dtype=np.bool_)
        grow = last & ~tier & np.array([compresses(cfg, int(n)) for n in seq.tolist()], dtype=np.bool_)
        # a compressed prompt's last chunk: pages per layer in the forward (``_extend``), else all now
        dense = ~grow & ~tier
        self.pool.extend(idx[dense], seq[dense])
        # the ledger sees the step's end: the prompt dense (kept counts replace it layer by layer as it is
        # compressed, the same on every rank); a tier prefill's segments stay empty until its last chunk
        book = ~tier | last
        self.ledger.extend(idx[book].tolist(), seq[book].tolist())
        reqs.mark_prompt_done(idx[last])
        is_last = last.tolist()
        b, max_ext, max_seq = len(idx), int(ext.max()), int(seq.max())
        starts = np.concatenate([[0], np.cumsum(ext)[:-1]]).astype(np.int64)
        q_slot = np.concatenate([i * max_ext + np.arange(e) for i, e in enumerate(ext.tolist())])
        extra = [idx, prefix, ext, q_slot]
        tier_rows = []
        if tier.any():
            new_tok = np.zeros((b, max_ext), dtype=np.int64)
            for i in np.nonzero(tier)[0].tolist():  # host bookkeeping: the chunk's tier tokens
                tok = self.state.tier_alloc_chunk(int(idx[i]), int(prefix[i]), int(ext[i]))
                new_tok[i, :ext[i]] = tok[prefix[i]:seq[i]]
                tier_rows.append((i, tok[:seq[i]]))
            extra += [tier.astype(np.int64), new_tok.reshape(-1), *[t for _, t in tier_rows]]
        dev = self.pool.flush(extra=np.concatenate(extra))
        d_idx, d_pre, d_ext = dev[:b], dev[b:2 * b], dev[2 * b:3 * b]
        o = 3 * b + q_slot.size
        d_slot = dev[3 * b:o]
        t_tok = t_new = t_b = None
        if tier_rows:
            t_b = dev[o:o + b].bool()
            t_new = dev[o + b:o + b + b * max_ext].view(b, max_ext)
            o += b + b * max_ext
            t_tok = [None] * b
            for i, tok in tier_rows:  # views of the one upload
                t_tok[i] = dev[o:o + tok.size]
                o += tok.size
        e = torch.arange(max_ext, device=dev.device)
        new_pos = d_pre[:, None] + e  # [b, max_ext]
        new_valid = e < d_ext[:, None]
        grown = (idx[grow], seq[grow]) if grow.any() else (None, None)
        return ExtendMetadata(idx.tolist(), prefix.tolist(), ext.tolist(), seq.tolist(), is_last,
                              starts.tolist(), max_ext, max_seq, d_idx, d_slot,
                              torch.where(new_valid, new_pos, 0), new_valid,
                              torch.arange(max_seq, device=dev.device), self.pool.active[d_idx],
                              *grown, t_tok, t_new, t_b)

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
        self._g_meta: dict[int, DecodeMetadata] = {}

    def graph_buffers(self) -> tuple[torch.Tensor, ...]:
        """The static buffers (tests check they are never reallocated)."""
        return self._g_idx, self._g_rows, self._g_lens

    def _graph_metadata(self, bs: int) -> DecodeMetadata:
        """The decode metadata of a captured batch size: views of the static buffers (made once)."""
        md = self._g_meta.get(bs)
        if md is None:
            md = DecodeMetadata(self._g_idx[:bs], self._g_rows[:, :bs].unbind(0), self._g_lens[:bs], None)
            self._g_meta[bs] = md
        return md

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Outside the graph. Capture: the metadata of ``batch_size`` slots over the static buffers,
        all slots empty (writes to the sink page, no attention work). Replay (SGLang's padded view of
        the batch; ``num_padding`` slots past the real ones): the step's host bookkeeping and upload
        as in eager mode, the real slots' rows / lengths / indices written into the buffers by the step
        itself (on CUDA the fused ``decode_step`` launch), padding slots zeroed (they write the sink
        page and attend nothing). The kernel's launch configuration of
        ``bs`` is static (:meth:`DecodeWorkspace.splits_for`), so nothing else is rebuilt."""
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            return self.init_forward_metadata(forward_batch)
        bs = int(forward_batch.batch_size)
        if in_capture:
            self._g_idx[:bs].zero_()
            self._g_rows[:, :bs].zero_()
            self._g_lens[:bs].zero_()
            self.forward_metadata = self._graph_metadata(bs)
            return
        self.pool.begin_step()
        raw = bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        idx_dev = forward_batch.req_pool_indices[:raw]
        idx_host = self.state.host_req_pool_indices(forward_batch)[:raw]
        # rows, lengths and indices straight into the static buffers (on CUDA: one upload, two launches)
        self._decode_step(idx_host, idx_dev, out=(self._g_rows[:, :bs], self._g_lens[:bs], self._g_idx[:bs]))
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

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._check_layer(layer)
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q_ = q.view(-1, hq, d)
        k_ = k.view(-1, hkv, d) if k is not None else None
        v_ = v.view(-1, hkv, layer.v_head_dim) if v is not None else None
        o = self._extend(q_, k_, v_, layer.layer_id, layer.scaling, layer.v_head_dim, save_kv_cache)
        return o.reshape(-1, hq * layer.v_head_dim)  # one request: a transposed view (SDPA may be contiguous)

    def forward_empty_layer(self, layer_id: int, num_tokens: int, head_dim: int, dtype, device) -> None:
        """A layer where the plan gives this rank no KV head: nothing to attend, but in prefill the rank
        still takes part in the layer's exchanges (the model calls this instead of its attention)."""
        if isinstance(self.forward_metadata, ExtendMetadata) and self.state.cfg.enabled and self.tp > 1:
            q = torch.empty(num_tokens, 0, head_dim, dtype=dtype, device=device)
            self._extend(q, q, q, layer_id, 1.0, head_dim, False)

    def _pad(self, x: torch.Tensor, md: ExtendMetadata) -> torch.Tensor:
        """Packed ``[T, n, D]`` -> padded ``[b, n, max_ext, D]`` (one scatter; a view when b == 1)."""
        b, n = len(md.req_pool_idx), x.shape[1]
        if b == 1:
            return x.transpose(0, 1).unsqueeze(0)
        pad = x.new_zeros(b * md.max_ext, n, x.shape[2])
        pad[md.q_slot] = x
        return pad.view(b, md.max_ext, n, x.shape[2]).transpose(1, 2)

    def _extend(self, q_, k_, v_, lid: int, scaling: float, v_head_dim: int, save_kv_cache: bool):
        """Prefill attention of one layer. ``q_`` [T, Hq, D], ``k_``/``v_`` [T, H, D] (this rank's heads);
        returns [T, Hq, Dv], zeros for the query heads of segments this rank does not hold.

        The chunk's K/V are written into the segments for the whole batch at once (one scatter each).
        Attention is one call per request over that request's packed queries and its own rows gathered
        from the page table, lower-right causal (:func:`~.causal.causal_attention`: on CUDA the flash
        kernel, GQA included; never a mask tensor with ``enable_gqa``, which would force SDPA's math
        kernel). Work and temporary memory are one request's ``chunk x sequence`` at a time,
        never ``b x max_chunk x max_sequence``: the rows gathered ``[H, seq, D]`` (K and V) and SDPA's
        output. The loop is over the batch's requests on the host (lengths are host values: no sync);
        a prefill batch is a few requests (SGLang's chunked-prefill budget), as in SGLang's own
        torch-native backend. Requests holding no head of this layer here (a copied head's other
        replica) skip attention. Compression of a request's last chunk runs right after its attention,
        on the same gathered keys."""
        md: ExtendMetadata = self.forward_metadata
        if md.grow_idx is not None:  # this layer's pages of the prompts that end here (one upload)
            self.pool.extend_layer(md.grow_idx, lid, md.grow_len)
            self.pool.flush()
        hq, hkv = q_.shape[1], (k_.shape[1] if k_ is not None else 0)
        group = hq // hkv if hkv else 1
        b, pool = len(md.req_pool_idx), self.pool
        if not hkv:
            o = q_.new_zeros(q_.shape[0], hq, v_head_dim)
            if self.state.cfg.enabled:
                for i in range(b):
                    self._compress_request(i, md, q_, None, lid, hkv, group)
            return o
        act = md.active[:, lid, :hkv]  # [b, hkv] device
        if save_kv_cache and k_ is not None:
            wrows = pool.rows_at(md.idx, lid, hkv, md.new_pos)  # [b, hkv, max_ext]
            wrows = torch.where(act[:, :, None] & md.new_valid[:, None, :], wrows, 0)  # page 0: sink
            if md.tier_new is not None:  # tier prefills write every head held here into their blocks
                trows = torch.where(md.new_valid[:, None, :], pool.tier_rows(md.tier_new, lid, hkv), 0)
                wrows = torch.where(md.tier_b[:, None, None], trows, wrows)
            pool.k_rows[wrows] = self._pad(k_, md).to(pool.dtype)
            pool.v_rows[wrows] = self._pad(v_, md).to(pool.dtype)
        held = pool.active_host[md.req_pool_idx, lid, :hkv]  # [b, hkv] host mirror
        o = None if b == 1 else q_.new_zeros(q_.shape[0], hq, v_head_dim)
        for i in range(b):
            s, ext, sl = md.starts[i], md.extend_lens[i], md.seq_lens[i]
            if not held[i].any():  # nothing of this layer here for this request: zeros
                if b == 1:
                    o = q_.new_zeros(q_.shape[0], hq, v_head_dim)
                if self.state.cfg.enabled:
                    self._compress_request(i, md, q_, None, lid, hkv, group)
                continue
            tier_tok = md.tier_tokens(i)
            if tier_tok is not None:  # the dense prompt is in the tier
                rows = pool.tier_rows(tier_tok, lid, hkv)[0]  # [hkv, sl]
            else:
                rows = pool.rows_at(md.idx[i:i + 1], lid, hkv, md.key_pos[:sl])[0]  # [hkv, sl]
            kk = pool.k_rows[rows].to(q_.dtype)  # [hkv, sl, D]: this request's keys only
            vv = pool.v_rows[rows].to(q_.dtype)
            qi = q_[s:s + ext].transpose(0, 1)  # [Hq, ext, D] (a view of the packed queries)
            out = causal_attention(qi[None], kk[None], vv[None], scaling)[0]  # [Hq, ext, Dv]
            if not held[i].all():  # heads of a copy served by another replica: their queries give zeros
                keep = md.active[i, lid, :hkv].repeat_interleave(group)
                out = torch.where(keep[:, None, None], out, 0)
            if b == 1:
                o = out.transpose(0, 1)  # [ext, Hq, Dv] (a view; SDPA may return it contiguous)
            else:
                o[s:s + ext] = out.transpose(0, 1)
            if self.state.cfg.enabled or tier_tok is not None:
                # stash window queries, or compress on the keys just gathered (tier: fill the segments)
                self._compress_request(i, md, q_, kk, lid, hkv, group)
        return o

    def _compress_request(self, i: int, md: ExtendMetadata, q_: torch.Tensor, kk: torch.Tensor | None,
                          lid: int, hkv: int, group: int) -> None:
        """Window-query stash or compression of layer ``lid`` for request ``i`` of the batch. ``kk``
        [hkv, seq, D]: request ``i``'s keys of every local head (None: it holds none here). The heads it
        holds come from the pool's host mirror (no device read)."""
        r, s, ext, sl = md.req_pool_idx[i], md.starts[i], md.extend_lens[i], md.seq_lens[i]
        own_l = np.nonzero(self.pool.active_host[r, lid, :hkv])[0].tolist()
        if not md.is_last[i] or kk is None or not own_l:  # stash only, or nothing held here
            q_heads = slice(0, 0)
            k_own = q_.new_zeros(0, sl, q_.shape[2])
        elif len(own_l) == hkv:  # every local head (no plan, or a rank that holds them all): views
            q_heads, k_own = slice(None), kk
        else:
            own = self.pool.upload(np.asarray(own_l, dtype=np.int64))  # pinned, asynchronous
            q_heads = (own[:, None] * group + torch.arange(group, device=q_.device)).flatten()
            k_own = kk[own]
        self._compress(r, lid, q_[s:s + ext], k_own, own_l, q_heads, md.is_last[i], md.tier_tokens(i), sl)

    def _compress(self, r: int, lid: int, q_req: torch.Tensor, k_own: torch.Tensor, own: list[int],
                  q_heads: torch.Tensor | slice, last: bool, tier_tok: torch.Tensor | None = None,
                  seq_len: int | None = None) -> None:
        """Stash the window queries of a non-final chunk, or compress layer ``lid`` of request ``r``.

        ``q_req`` [ext, Hq, D] this chunk's queries (all local heads); ``k_own`` [n_own, sl, D] every
        prompt key so far of the local heads ``own`` this rank holds for ``r`` (query heads ``q_heads``).
        ``tier_tok`` (int64 [sl], device): the prefill used the dense prefix tier, whose tokens these
        are; the segments, empty so far, are filled from it with the kept rows (all rows when the prompt
        is not compressed).
        """
        w = self.state.cfg.window
        reqs = self.state.requests
        stash = reqs.q_stash.get(r)
        prev = stash[lid] if stash is not None else None
        q_tail = q_req[-w:] if prev is None or q_req.shape[0] >= w else torch.cat([prev, q_req])[-w:]
        if not last:
            if stash is None:
                stash = reqs.q_stash[r] = [None] * self.num_layers
            stash[lid] = q_tail.clone()
            return
        sl = k_own.shape[1] if seq_len is None else seq_len
        kept = None
        heads = self.state.local_heads(lid)
        head_ids = [heads[j] for j in own]
        if q_tail.shape[0] == w:
            gather = partial(self._gather_scores, r) if self.tp > 1 else None
            kept = kept_for_layer(self.state.cfg, lid, self.num_layers, q_tail[:, q_heads].transpose(0, 1),
                                  k_own, self.state.head_budgets, head_ids=head_ids, gather_scores=gather)
            if kept is not None:
                if tier_tok is None:
                    self.pool.compact(r, lid, kept, own)
                else:
                    self.pool.fill_from_tier(r, lid, kept, own, tier_tok)
                self._update_ledger(r, lid, head_ids, [int(x.numel()) for x in kept])
        if kept is None and tier_tok is not None and own:  # not compressed: the whole prompt, from the tier
            every = torch.arange(sl, device=tier_tok.device)
            self.pool.fill_from_tier(r, lid, [every] * len(own), own, tier_tok)
        if logger.isEnabledFor(logging.DEBUG):
            reqs.kept_log.setdefault(r, []).append(int(self.pool.seg_len_host[r, lid].sum()))
            if lid == self.num_layers - 1:
                logger.debug("fairkv req_pool_idx %d: %d prompt tokens, kept per layer (heads here) %s",
                             r, sl, reqs.kept_log.pop(r))
        if lid == self.num_layers - 1:
            reqs.q_stash.pop(r, None)
            self.state.record_prompt(r, sl)

    def _all_reduce_heads(self, head_idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Assemble a per-KV-head matrix of the whole layer from every rank's own heads.

        ``head_idx`` int64 [n] (device) the global heads of ``rows`` [n, X], this rank's values. Every
        head of the request's layer is held by exactly one rank, so a SUM all-reduce of zero-filled
        ``[KV, X + 1]`` matrices is exact (x + 0 = x); the last column counts the ranks that sent each
        head (:meth:`_update_ledger` checks it on the host). Returns ``[KV, X + 1]``; no host sync.
        """
        full = rows.new_zeros(self.num_kv_heads_total, rows.shape[1] + 1)
        full[head_idx, :-1] = rows
        full[head_idx, -1] = 1
        dist.all_reduce(full, group=self._group)
        return full

    def _gather_scores(self, r: int, scores: torch.Tensor, head_ids: list[int]) -> torch.Tensor:
        """AdaKV under TP: this rank's ``[n, S]`` scores -> the layer's ``[KV, S]`` (float64 carrier,
        exact for float32 scores). The head ids travel in one pinned upload; the ranks' agreement on who
        holds which head is checked by the same layer's ledger exchange right after (on the host)."""
        idx = self.pool.upload(np.asarray(head_ids, dtype=np.int64))
        return self._all_reduce_heads(idx, scores.to(torch.float64))[:, :-1].to(scores.dtype)

    def _update_ledger(self, r: int, lid: int, head_ids: list[int], counts: list[int]) -> None:
        """Kept tokens of every head of the layer into the group ledger (exchanged at TP > 1). At TP > 1
        the exchange's result is read on the host: the one host sync per layer that compression forces
        there (admission reads the ledger on the host); head ids and counts travel in one pinned upload,
        and the held-by check reads the same copy."""
        if self.tp > 1:
            n = len(head_ids)
            up = self.pool.upload(np.asarray([*head_ids, *counts], dtype=np.int64))
            full = self._all_reduce_heads(up[:n], up[n:].view(-1, 1)).cpu()  # [KV, 2] int64: counts, held by
            held = full[:, 1]
            if (held != 1).any():
                raise RuntimeError(f"fairkv: KV heads held by {held.tolist()} ranks (expected 1 each); "
                                   "the ranks disagree on the replica assignment")
            full = full[:, 0]
        else:
            full = torch.zeros(self.num_kv_heads_total, dtype=torch.int64)
            full[head_ids] = torch.tensor(counts, dtype=torch.int64)
        self.ledger.set_kept(r, lid, full)

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
        if save_kv_cache and k is not None:
            rows = md.write_rows[lid][:, :hkv] if hkv < pool.num_kv_heads else md.write_rows[lid]
            pool.k_rows[rows] = _as(k.reshape(b, hkv, d), pool.dtype)  # page-0 rows: segments not held here
            pool.v_rows[rows] = _as(v.reshape(b, hkv, dv), pool.dtype)
        qg = _as(q.reshape(b, hkv, hq // hkv, d), pool.dtype)
        if self.decode_kernel == "triton":
            out = self._paged_decode(qg, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len,
                                     md.req_pool_idx, lid, layer.scaling, self.workspace, pool.page_size)
        else:
            out = paged_decode_torch(qg, pool.k_rows, pool.v_rows, pool.seg_pages, pool.seg_len, md.req_pool_idx,
                                     lid, layer.scaling, pool.page_size, max_len=md.max_len[lid])
        return _as(out, q.dtype).reshape(b, hq * dv)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (no op when it already is)."""
    return x if x.dtype == dtype else x.to(dtype)


def create_fairkv_backend(model_runner) -> FairKVAttnBackend:
    """Factory for SGLang's attention registry (``register_attention_backend("fairkv")``)."""
    return FairKVAttnBackend(model_runner)
