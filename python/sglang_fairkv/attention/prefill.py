"""The prefill (extend) half of the ``fairkv`` backend: the step's metadata, the packed K/V write, the
attention, and compression inside the forward.

Per step (:meth:`PrefillMixin._extend_metadata`, host lists and one upload shared with the pool's table
writes) the batch is described token by token: each packed query token's request and position, and --
for the one-call path -- each request's keys packed after each other with ``cu_seqlens``. Per layer:

* **K/V write**: the chunk's packed ``[T, H]`` rows, one scatter of K and one of V, no padding (a
  token of a segment this rank does not hold writes the sink page 0; a prefill through the dense prefix
  tier writes every head held here into its tier rows).
* **Attention, one call per layer** where a varlen kernel exists (CUDA, fp16 / bf16): every request's
  keys gathered once from the page table (or the tier) into one packed ``[K, H, D]`` buffer, one
  ``flash_varlen`` call with ``cu_seqlens`` (GQA native, bottom-right causal), like SGLang's FlashInfer /
  FA3 backends. Its tensor ops per layer do not depend on the number of requests
  (``test/test_prefill_path.py`` counts them with ``torch.profiler``).
* Elsewhere (the CPU, fp32 on CUDA): one lower-right causal call per request over its own gathered rows
  (:func:`~.causal.causal_attention`), a host loop over the batch (lengths are host values: no sync).
* **Compression** of a prompt's last chunk runs per finishing request on the keys just gathered
  (SnapKV scores per KV head, budgets per ``CompressConfig``): the kept rows are compacted to the
  segment's front (or filled from the tier) and the tail pages go back.

Under a FairKV plan a rank holds, per layer, the KV heads the plan gives it, and for a copied head only
the requests assigned to its replica: the other requests' query heads produce zeros (the TP sum of the
layer output adds the owner's result). After compressing a layer the ranks exchange what the TP group's
ledger needs (kept counts per head) and, for AdaKV, the scores: one all-reduce each, in the same order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from ..compress.footprint import compresses
from ..compress.policy import kept_for_layer
from . import causal
from .causal import causal_attention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtendMetadata:
    """One prefill forward, built once per step (host lists + one upload shared with the pool's table
    writes).

    Host: per request ``req_pool_idx``, prefix / chunk / sequence lengths (tokens), whether the chunk
    completes the prompt (compress then), where its tokens start in the packed batch (``starts``) and
    where its keys start in the packed keys (``key_starts``, the varlen path).
    Device, per packed query token (``T`` = the batch's new tokens): ``tok_req`` int64 [T] its
    ``req_pool_idx``, ``tok_pos`` int64 [T] its position, ``tok_active`` bool [T, L, H] the segments its
    request holds here (one gather per step: per layer a view); ``tok_tier`` int64 [T] its tier token
    and ``tok_tier_b`` bool [T] (None when no request of the batch uses the tier).
    ``idx`` int64 [b]; ``key_pos`` int64 [max_seq] = ``arange`` (the per-request path's key positions).
    The one-call path (``varlen``): per packed key (``K`` = the sum of the sequence lengths)
    ``key_req`` / ``key_at`` int64 [K] (request and position), ``key_tier`` / ``key_tier_b`` [K] (None
    without the tier), ``cu_q`` / ``cu_k`` int32 [b + 1]; with fp8 rows ``tok_key`` int64 [T], where each
    query token's own key sits among the packed keys (its chunk's K/V are attended unrounded).
    ``grow_idx`` / ``grow_len`` (host int64 [g], or None): requests whose chunk ends a prompt that is
    compressed, and that prompt's length; their pages are taken layer by layer in the forward.
    ``tier_tok`` per request whose prefill uses the dense prefix tier, the tier token of every position
    so far (int64 [seq], device; None for the others, the whole list None when no request does).
    """

    req_pool_idx: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    is_last: list[bool]
    starts: list[int]
    key_starts: list[int]
    max_ext: int
    max_seq: int
    idx: torch.Tensor
    tok_req: torch.Tensor
    tok_pos: torch.Tensor
    tok_active: torch.Tensor
    key_pos: torch.Tensor
    tok_tier: torch.Tensor | None = None
    tok_tier_b: torch.Tensor | None = None
    grow_idx: np.ndarray | None = None
    grow_len: np.ndarray | None = None
    tier_tok: list[torch.Tensor | None] | None = None
    varlen: bool = False
    key_req: torch.Tensor | None = None
    key_at: torch.Tensor | None = None
    key_tier: torch.Tensor | None = None
    key_tier_b: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    tok_key: torch.Tensor | None = None

    def tier_tokens(self, i: int) -> torch.Tensor | None:
        """Request ``i``'s tier tokens (int64 [seq], device), or None when its prefill does not use the tier."""
        return None if self.tier_tok is None else self.tier_tok[i]


class _Packer:
    """Host int64 arrays gathered for one upload, handed back as device views in order."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def add(self, a) -> int:
        self.parts.append(np.asarray(a, dtype=np.int64).reshape(-1))
        return len(self.parts) - 1

    def host(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)

    def views(self, dev: torch.Tensor) -> list[torch.Tensor]:
        out, o = [], 0
        for p in self.parts:
            out.append(dev[o:o + p.size])
            o += p.size
        return out


class PrefillMixin:
    """Prefill of :class:`~.fairkv_backend.FairKVAttnBackend` (its attributes: ``state``, ``pool``,
    ``ledger``, ``tp``, ``num_layers``, ``num_kv_heads_total``, ``_group``, ``forward_metadata``).

    ``prefill_varlen``: attention as one varlen call per layer (set on CUDA where the flash kernel takes
    the pool's dtype and head dim; tests set it on a CPU with a stand-in for the kernel)."""

    prefill_varlen: bool = False
    _kv_scales: tuple[float, float] = (1.0, 1.0)  # the running layer's (k_scale, v_scale)

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
        reqs.mark_prompt_done(idx[last], seq[last])
        b, max_ext, max_seq = len(idx), int(ext.max()), int(seq.max())
        starts = np.concatenate([[0], np.cumsum(ext)[:-1]]).astype(np.int64)
        key_starts = np.concatenate([[0], np.cumsum(seq)[:-1]]).astype(np.int64)
        # packed query tokens: request and position of each (vectorised over the batch)
        tok_b = np.repeat(np.arange(b), ext)
        tok_pos = prefix[tok_b] + np.arange(int(ext.sum())) - starts[tok_b]
        pk = _Packer()
        i_idx, i_req, i_pos = pk.add(idx), pk.add(idx[tok_b]), pk.add(tok_pos)
        tier_toks: list[np.ndarray | None] = [None] * b
        if tier.any():
            for i in np.nonzero(tier)[0].tolist():  # host bookkeeping: the chunk's tier tokens
                tier_toks[i] = self.state.tier_alloc_chunk(int(idx[i]), int(prefix[i]), int(ext[i]))[:seq[i]]
            tok_tier = np.concatenate([t[prefix[i]:] if t is not None else np.zeros(ext[i], np.int64)
                                       for i, t in enumerate(tier_toks)])
            i_tt, i_ttb = pk.add(tok_tier), pk.add(tier[tok_b])
            i_tier = {i: pk.add(t) for i, t in enumerate(tier_toks) if t is not None}
        varlen = self.prefill_varlen
        if varlen:  # packed keys: request i's positions [0, seq_i) after each other
            key_b = np.repeat(np.arange(b), seq)
            key_at = np.arange(int(seq.sum())) - key_starts[key_b]
            i_kreq, i_kat = pk.add(idx[key_b]), pk.add(key_at)
            i_cu = pk.add(np.concatenate([[0], np.cumsum(ext), [0], np.cumsum(seq)]))
            if self.pool.quantized:
                i_tk = pk.add(key_starts[tok_b] + tok_pos)
            if tier.any():
                key_tier = np.concatenate([t if t is not None else np.zeros(seq[i], np.int64)
                                           for i, t in enumerate(tier_toks)])
                i_kt, i_ktb = pk.add(key_tier), pk.add(tier[key_b])
        v = pk.views(self.pool.flush(extra=pk.host()))
        d_idx = v[i_idx]
        kw = {}
        if tier.any():
            kw.update(tok_tier=v[i_tt], tok_tier_b=v[i_ttb].bool(),
                      tier_tok=[v[i_tier[i]] if i in i_tier else None for i in range(b)])
        if varlen:
            cu = v[i_cu].to(torch.int32)
            kw.update(varlen=True, key_req=v[i_kreq], key_at=v[i_kat], cu_q=cu[:b + 1], cu_k=cu[b + 1:])
            if self.pool.quantized:
                kw.update(tok_key=v[i_tk])
            if tier.any():
                kw.update(key_tier=v[i_kt], key_tier_b=v[i_ktb].bool())
        if grow.any():
            kw.update(grow_idx=idx[grow], grow_len=seq[grow])
        return ExtendMetadata(idx.tolist(), prefix.tolist(), ext.tolist(), seq.tolist(), last.tolist(),
                              starts.tolist(), key_starts.tolist(), max_ext, max_seq, d_idx, v[i_req], v[i_pos],
                              self.pool.active[v[i_req]], torch.arange(max_seq, device=d_idx.device), **kw)

    # ---- the layer's forward ------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._check_layer(layer)
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q_ = q.view(-1, hq, d)
        k_ = k.view(-1, hkv, d) if k is not None else None
        v_ = v.view(-1, hkv, layer.v_head_dim) if v is not None else None
        self._kv_scales = kv_scales(layer)
        o = self._extend(q_, k_, v_, layer.layer_id, layer.scaling, layer.v_head_dim, save_kv_cache)
        return o.reshape(-1, hq * layer.v_head_dim)  # one request: a transposed view (SDPA may be contiguous)

    def forward_empty_layer(self, layer_id: int, num_tokens: int, head_dim: int, dtype, device) -> None:
        """A layer where the plan gives this rank no KV head: nothing to attend, but in prefill the rank
        still takes part in the layer's exchanges (the model calls this instead of its attention)."""
        if isinstance(self.forward_metadata, ExtendMetadata) and self.state.cfg.enabled and self.tp > 1:
            q = torch.empty(num_tokens, 0, head_dim, dtype=dtype, device=device)
            self._extend(q, q, q, layer_id, 1.0, head_dim, False)

    def _write_chunk(self, md: ExtendMetadata, k_: torch.Tensor, v_: torch.Tensor, lid: int, hkv: int) -> None:
        """The chunk's packed K/V ``[T, hkv, D]`` into the segments (or tier rows): rows ``[T, hkv]``, one
        scatter of each, no padding. A token of a segment not held here writes the sink page 0."""
        pool = self.pool
        rows = pool.rows_at_tokens(md.tok_req, lid, hkv, md.tok_pos)  # [T, hkv]
        rows = torch.where(md.tok_active[:, lid, :hkv], rows, 0)
        if md.tok_tier is not None:  # tier prefills write every head held here into their blocks
            rows = torch.where(md.tok_tier_b[:, None], pool.tier_rows_tokens(md.tok_tier, lid, hkv), rows)
        pool.write_rows(rows, k_, v_, *self._kv_scales)

    def _extend(self, q_, k_, v_, lid: int, scaling: float, v_head_dim: int, save_kv_cache: bool):
        """Prefill attention of one layer. ``q_`` [T, Hq, D], ``k_``/``v_`` [T, H, D] (this rank's heads);
        returns [T, Hq, Dv], zeros for the query heads of segments this rank does not hold."""
        md: ExtendMetadata = self.forward_metadata
        if md.grow_idx is not None:  # this layer's pages of the prompts that end here (one upload)
            self.pool.extend_layer(md.grow_idx, lid, md.grow_len)
            self.pool.flush()
        hq, hkv = q_.shape[1], (k_.shape[1] if k_ is not None else 0)
        group = hq // hkv if hkv else 1
        b = len(md.req_pool_idx)
        if not hkv:
            o = q_.new_zeros(q_.shape[0], hq, v_head_dim)
            if self.state.cfg.enabled:
                for i in range(b):
                    self._compress_request(i, md, q_, None, lid, hkv, group)
            return o
        if save_kv_cache and k_ is not None:
            self._write_chunk(md, k_, v_, lid, hkv)
        held = self.pool.active_host[md.req_pool_idx, lid, :hkv]  # [b, hkv] host mirror
        # fp8 rows: the chunk's own K/V are attended (and scored) as the model computed them, the earlier
        # chunks' and the prefix's as the pool holds them (FlashInfer's ragged + paged prefill in SGLang)
        own = (k_, v_) if self.pool.quantized and k_ is not None else None
        if md.varlen:
            return self._extend_varlen(md, q_, lid, hkv, group, scaling, held, own)
        return self._extend_per_request(md, q_, lid, hkv, group, scaling, v_head_dim, held, own)

    def _compresses_here(self, md: ExtendMetadata, i: int) -> bool:
        """Whether request ``i`` stashes window queries or compresses in this layer (compression on), or
        fills its segments from the tier (its prompt's last chunk through the tier)."""
        return self.state.cfg.enabled or (md.is_last[i] and md.tier_tokens(i) is not None)

    def _extend_varlen(self, md: ExtendMetadata, q_, lid: int, hkv: int, group: int, scaling: float,
                       held: np.ndarray, own: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Every request's keys gathered once into one packed ``[K, hkv, D]`` buffer, one varlen causal
        call for the batch. The tensor ops do not depend on the number of requests; the host loop that
        follows runs only for requests that compress (or fill from the tier) in this layer."""
        pool = self.pool
        rows = pool.rows_at_tokens(md.key_req, lid, hkv, md.key_at)  # [K, hkv]
        if md.key_tier is not None:
            rows = torch.where(md.key_tier_b[:, None], pool.tier_rows_tokens(md.key_tier, lid, hkv), rows)
        kk, vv = pool.read_rows(rows, q_.dtype, *self._kv_scales)  # [K, hkv, D]
        if own is not None:  # the chunk's keys unrounded (one scatter each)
            kk[md.tok_key] = own[0].to(kk.dtype)
            vv[md.tok_key] = own[1].to(vv.dtype)
        o = causal.flash_varlen(q_, kk, vv, md.cu_q, md.cu_k, md.max_ext, md.max_seq, scaling)  # [T, Hq, Dv]
        if not held.all():  # heads served by another replica (or not held): their queries give zeros
            keep = md.tok_active[:, lid, :hkv].repeat_interleave(group, dim=1)  # [T, Hq]
            o = torch.where(keep[:, :, None], o, 0)
        if self.state.cfg.enabled or md.tier_tok is not None:
            for i in range(len(md.req_pool_idx)):
                if not held[i].any():  # nothing of this layer here: the TP exchanges only (as per request)
                    if self.state.cfg.enabled:
                        self._compress_request(i, md, q_, None, lid, hkv, group)
                elif self._compresses_here(md, i):
                    ks, sl = md.key_starts[i], md.seq_lens[i]  # its keys: a [hkv, sl, D] view of the packed ones
                    self._compress_request(i, md, q_, kk[ks:ks + sl].transpose(0, 1), lid, hkv, group)
        return o

    def _extend_per_request(self, md: ExtendMetadata, q_, lid: int, hkv: int, group: int, scaling: float,
                            v_head_dim: int, held: np.ndarray,
                            own: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One lower-right causal call per request over that request's rows gathered from the page table
        (:func:`~.causal.causal_attention`; never a mask tensor with ``enable_gqa``, which would force
        SDPA's math kernel). Work and temporary memory are one request's ``chunk x sequence`` at a time.
        Requests holding no head of this layer here (a copied head's other replica) skip attention."""
        pool, b = self.pool, len(md.req_pool_idx)
        o = None if b == 1 else q_.new_zeros(q_.shape[0], q_.shape[1], v_head_dim)
        for i in range(b):
            s, ext, sl = md.starts[i], md.extend_lens[i], md.seq_lens[i]
            if not held[i].any():  # nothing of this layer here for this request: zeros
                if b == 1:
                    o = q_.new_zeros(q_.shape[0], q_.shape[1], v_head_dim)
                if self.state.cfg.enabled:
                    self._compress_request(i, md, q_, None, lid, hkv, group)
                continue
            tier_tok = md.tier_tokens(i)
            if tier_tok is not None:  # the dense prompt is in the tier
                rows = pool.tier_rows(tier_tok, lid, hkv)[0]  # [hkv, sl]
            else:
                rows = pool.rows_at(md.idx[i:i + 1], lid, hkv, md.key_pos[:sl])[0]  # [hkv, sl]
            kk, vv = pool.read_rows(rows, q_.dtype, *self._kv_scales)  # [hkv, sl, D]: this request's only
            if own is not None:  # its chunk's keys unrounded: the last ``ext`` positions
                kk[:, sl - ext:] = own[0][s:s + ext].transpose(0, 1)
                vv[:, sl - ext:] = own[1][s:s + ext].transpose(0, 1)
            qi = q_[s:s + ext].transpose(0, 1)  # [Hq, ext, D] (a view of the packed queries)
            out = causal_attention(qi[None], kk[None], vv[None], scaling)[0]  # [Hq, ext, Dv]
            if not held[i].all():  # heads of a copy served by another replica: their queries give zeros
                keep = md.tok_active[s, lid, :hkv].repeat_interleave(group)  # its first token's row
                out = torch.where(keep[:, None, None], out, 0)
            if b == 1:
                o = out.transpose(0, 1)  # [ext, Hq, Dv] (a view; SDPA may return it contiguous)
            else:
                o[s:s + ext] = out.transpose(0, 1)
            if self._compresses_here(md, i):
                # stash window queries, or compress on the keys just gathered (tier: fill the segments)
                self._compress_request(i, md, q_, kk, lid, hkv, group)
        return o

    # ---- compression inside the forward ---------------------------------------------------------
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


def kv_scales(layer) -> tuple[float, float]:
    """The layer's K and V cache scales (SGLang's host floats, set from checkpoint scales by its KV-cache
    quant method), 1.0 without them: fp8 rows hold ``K / k_scale``, ``V / v_scale``."""
    return float(getattr(layer, "k_scale_float", None) or 1.0), float(getattr(layer, "v_scale_float", None) or 1.0)
