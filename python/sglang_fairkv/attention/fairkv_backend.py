"""``--attention-backend fairkv``: SGLang attention over the ragged per-(request, layer, KV head) pool.

Prefill (extend): each chunk's K/V are written into the request's segments, attention runs over the
whole prefix (dense: before compression every segment of a request holds every position). When the
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

Decode: one new row per active segment (pages reserved for all layers once per step in
``init_forward_metadata``), then ragged attention of each GQA group over its own segment:
``attention.ragged_torch`` on CPU; on CUDA the Triton kernel of ``kernels/ragged_decode.py`` (default)
or FlashInfer on the flattened segments (``FAIRKV_DECODE_KERNEL=flashinfer``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from torch.nn.functional import scaled_dot_product_attention

from .. import env
from ..compress.policy import kept_for_layer
from ..kv.sglang_pool import FairKVCache, FairKVState
from .ragged_torch import ragged_decode_torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtendMetadata:
    """One prefill forward: per request ``req_pool_idx``, prefix and chunk lengths (tokens), and
    whether the chunk completes the prompt (compress then)."""

    req_pool_idx: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    is_last: list[bool]


@dataclass(frozen=True)
class DecodeMetadata:
    """One decode step: ``req_pool_idx`` int64 [b] and the row of each new token, int64 [b, L, H]."""

    req_pool_idx: torch.Tensor
    write_rows: torch.Tensor


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
        # one callable (q[S, G, D], k_rows, v_rows, seg_indptr, seg_rows, sm_scale) -> [S, G, D],
        # resolved once here rather than per layer call
        if self.decode_kernel == "triton":
            from ..kernels.ragged_decode import ragged_decode

            self._ragged_decode = ragged_decode
        elif self.decode_kernel == "flashinfer":
            from .flashinfer_decode import FlashInferRaggedDecode

            self._ragged_decode = FlashInferRaggedDecode(self.device).run
        else:
            self._ragged_decode = ragged_decode_torch
        self.forward_metadata: ExtendMetadata | DecodeMetadata | None = None
        self.ledger = self.state.ledger
        self.tp = self.state.rank_plan.tp
        self.num_kv_heads_total = self.state.rank_plan.plan.num_kv_heads
        self._group = None
        if self.tp > 1 and not getattr(model_runner.model, "fairkv", False):
            raise RuntimeError("fairkv backend at TP > 1: the model is not a FairKV class "
                               f"({type(model_runner.model).__name__}); launch with --fairkv-plan")
        if self.tp > 1:
            from sglang.srt.runtime_context import get_parallel

            self._group = get_parallel().tp_group.device_group

    # ---- metadata --------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
        elif mode.is_decode():
            idx = forward_batch.req_pool_indices.to(self.pool.device, torch.int64)
            self.forward_metadata = DecodeMetadata(idx, self.pool.append(idx))
            self.ledger.append(idx)
        elif mode.is_extend():
            idx = forward_batch.req_pool_indices.tolist()
            prefix = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
            ext = [int(x) for x in forward_batch.extend_seq_lens_cpu]
            seq = [p + e for p, e in zip(prefix, ext)]
            target = self.state.target_len[idx].tolist()
            is_last = [t < 0 or s >= t for s, t in zip(seq, target)]
            self.pool.extend(torch.tensor(idx, device=self.pool.device),
                             torch.tensor(seq, device=self.pool.device))
            self.ledger.extend(idx, seq)
            self.forward_metadata = ExtendMetadata(idx, prefix, ext, seq, is_last)
        else:
            raise NotImplementedError(f"fairkv backend: forward mode {mode} is not supported")

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise NotImplementedError("fairkv backend: CUDA graphs are not supported yet (launch_server "
                                  "passes --cuda-graph-backend-decode disabled)")

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def support_triton(self):
        return False

    # ---- prefill ---------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q_ = q.view(-1, hq, d)
        k_ = k.view(-1, hkv, d) if k is not None else None
        v_ = v.view(-1, hkv, layer.v_head_dim) if v is not None else None
        o = self._extend(q_, k_, v_, layer.layer_id, layer.scaling, layer.v_head_dim, save_kv_cache)
        return o.view(-1, hq * layer.v_head_dim)

    def forward_empty_layer(self, layer_id: int, num_tokens: int, head_dim: int, dtype, device) -> None:
        """A layer where the plan gives this rank no KV head: nothing to attend, but in prefill the rank
        still takes part in the layer's exchanges (the model calls this instead of its attention)."""
        if isinstance(self.forward_metadata, ExtendMetadata) and self.state.cfg.enabled and self.tp > 1:
            q = torch.empty(num_tokens, 0, head_dim, dtype=dtype, device=device)
            self._extend(q, q, q, layer_id, 1.0, head_dim, False)

    def _extend(self, q_, k_, v_, lid: int, scaling: float, v_head_dim: int, save_kv_cache: bool):
        """Prefill attention of one layer. ``q_`` [T, Hq, D], ``k_``/``v_`` [T, H, D] (this rank's
        heads); returns [T, Hq, Dv], zeros for the query heads of segments this rank does not hold."""
        md: ExtendMetadata = self.forward_metadata
        hq, hkv, d = q_.shape[1], (k_.shape[1] if k_ is not None else 0), q_.shape[2]
        group = hq // hkv if hkv else 1
        o = torch.zeros(q_.shape[0], hq, v_head_dim, dtype=q_.dtype, device=q_.device)
        start = 0
        for i, r in enumerate(md.req_pool_idx):
            pre, ext, sl = md.prefix_lens[i], md.extend_lens[i], md.seq_lens[i]
            own = self.pool.active[r, lid, :hkv].nonzero().flatten()  # local heads held for r
            q_heads = (own[:, None] * group + torch.arange(group, device=own.device)).flatten()
            rows = self.pool.prefix_rows(r, lid, sl)[own]  # [n_own, sl]
            if save_kv_cache and k_ is not None and own.numel():
                new = rows[:, pre:sl]
                self.pool.k_rows[new] = k_[start:start + ext, own].transpose(0, 1).to(self.pool.dtype)
                self.pool.v_rows[new] = v_[start:start + ext, own].transpose(0, 1).to(self.pool.dtype)
            kk = self.pool.k_rows[rows]  # [n_own, sl, D]
            vv = self.pool.v_rows[rows]
            q_req = q_[start:start + ext]  # [ext, Hq, D]
            if own.numel():
                # SGLang torch_native's layout: queries padded to the full sequence, causal SDPA
                q_full = q_req.new_empty(q_heads.numel(), sl, d)
                q_full[:, pre:, :] = q_req[:, q_heads].transpose(0, 1)
                out = scaled_dot_product_attention(
                    q_full.unsqueeze(0), kk.unsqueeze(0).to(q_.dtype), vv.unsqueeze(0).to(q_.dtype),
                    is_causal=True, scale=scaling, enable_gqa=group > 1).squeeze(0)
                o[start:start + ext, q_heads] = out[:, pre:, :].transpose(0, 1)
            if self.state.cfg.enabled:
                self._compress(r, lid, q_req, kk, own, q_heads, md.is_last[i])
            start += ext
        return o

    def _compress(self, r: int, lid: int, q_req: torch.Tensor, k_own: torch.Tensor, own: torch.Tensor,
                  q_heads: torch.Tensor, last: bool) -> None:
        """Stash the window queries of a non-final chunk, or compress layer ``lid`` of request ``r``.

        ``q_req`` [ext, Hq, D] this chunk's queries (all local heads); ``k_own`` [n_own, sl, D] every
        prompt key so far of the local heads ``own`` this rank holds for ``r`` (query heads ``q_heads``).
        """
        w = self.state.cfg.window
        stash = self.state.q_stash.get(r)
        prev = stash[lid] if stash is not None else None
        q_tail = q_req[-w:] if prev is None or q_req.shape[0] >= w else torch.cat([prev, q_req])[-w:]
        if not last:
            if stash is None:
                stash = self.state.q_stash[r] = [None] * self.num_layers
            stash[lid] = q_tail.clone()
            return
        sl = k_own.shape[1]
        if q_tail.shape[0] == w:
            heads = self.state.local_heads(lid)
            head_ids = [heads[j] for j in own.tolist()]
            gather = partial(self._gather_scores, r) if self.tp > 1 else None
            kept = kept_for_layer(self.state.cfg, lid, self.num_layers, q_tail[:, q_heads].transpose(0, 1),
                                  k_own, self.state.head_budgets, head_ids=head_ids, gather_scores=gather)
            if kept is not None:
                self.pool.compact(r, lid, kept, own.tolist())
                self._update_ledger(r, lid, head_ids, [int(x.numel()) for x in kept])
        if logger.isEnabledFor(logging.DEBUG):
            self.state.kept_log.setdefault(r, []).append(int(self.pool.seg_len[r, lid].sum()))
            if lid == self.num_layers - 1:
                logger.debug("fairkv req_pool_idx %d: %d prompt tokens, kept per layer (heads here) %s",
                             r, sl, self.state.kept_log.pop(r))
        if lid == self.num_layers - 1:
            self.state.q_stash.pop(r, None)
            self.state.record_prompt(r, sl)

    def _all_reduce_heads(self, head_ids: list[int], rows: torch.Tensor) -> torch.Tensor:
        """Assemble a per-KV-head matrix of the whole layer from every rank's own heads.

        ``rows`` [n, X]: this rank's values for ``head_ids``. Every head of the request's layer is held by
        exactly one rank, so a SUM all-reduce of zero-filled ``[KV, X]`` matrices is exact (x + 0 = x).
        Returns ``[KV, X]``; checks that every head arrived exactly once.
        """
        kv = self.num_kv_heads_total
        full = rows.new_zeros(kv, rows.shape[1] + 1)
        idx = torch.as_tensor(head_ids, dtype=torch.int64, device=rows.device)
        full[idx, :-1] = rows
        full[idx, -1] = 1
        dist.all_reduce(full, group=self._group)
        if bool((full[:, -1] != 1).any()):
            raise RuntimeError(f"fairkv: KV heads held by {full[:, -1].tolist()} ranks (expected 1 each); "
                               "the ranks disagree on the replica assignment")
        return full[:, :-1]

    def _gather_scores(self, r: int, scores: torch.Tensor, head_ids: list[int]) -> torch.Tensor:
        """AdaKV under TP: this rank's ``[n, S]`` scores -> the layer's ``[KV, S]`` (float64 carrier,
        exact for float32 scores)."""
        return self._all_reduce_heads(head_ids, scores.to(torch.float64)).to(scores.dtype)

    def _update_ledger(self, r: int, lid: int, head_ids: list[int], counts: list[int]) -> None:
        """Kept tokens of every head of the layer into the group ledger (exchanged at TP > 1)."""
        c = torch.tensor(counts, dtype=torch.float64, device=self.pool.device).view(-1, 1)
        if self.tp > 1:
            full = self._all_reduce_heads(head_ids, c)[:, 0]
        else:
            full = torch.zeros(self.num_kv_heads_total, dtype=torch.float64)
            full[head_ids] = c[:, 0].cpu()
        self.ledger.set_kept(r, lid, full.round().to(torch.int64))

    # ---- decode ----------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        md: DecodeMetadata = self.forward_metadata
        lid = layer.layer_id
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        b = md.req_pool_idx.numel()
        if save_kv_cache and k is not None:
            rows = md.write_rows[:, lid, :hkv].reshape(-1)  # page-0 rows for segments not held here
            self.pool.k_rows[rows] = k.reshape(b * hkv, d).to(self.pool.dtype)
            self.pool.v_rows[rows] = v.reshape(b * hkv, layer.v_head_dim).to(self.pool.dtype)
        indptr, seg_rows = self.pool.flat_segments(md.req_pool_idx, lid, hkv)
        qg = q.reshape(b * hkv, hq // hkv, d)
        out = self._ragged_decode(qg.to(self.pool.dtype), self.pool.k_rows, self.pool.v_rows, indptr,
                                  seg_rows, layer.scaling).to(q.dtype)
        return out.reshape(b, hq * layer.v_head_dim)


def create_fairkv_backend(model_runner) -> FairKVAttnBackend:
    """Factory for SGLang's attention registry (``register_attention_backend("fairkv")``)."""
    return FairKVAttnBackend(model_runner)
