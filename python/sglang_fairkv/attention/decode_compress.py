"""Decode-time compression in the ``fairkv`` backend (``--kv-decode-compress``): kvpress ``DecodingPress``.

* **Queries.** Every decode step each layer writes its post-RoPE queries (this rank's query heads) into
  a static ring on the device, ``[max_reqs, L, W, Hq, D]`` (``W`` = ``--kv-decode-window``), at the slot
  of the request's step count (host-known, in the step's one upload): one ``index_put`` per layer, inside
  the CUDA graph, padding slots on SGLang's padding row 0. The ring's bytes come out of the KV budget.
* **When.** The host counts each request's decode steps since its prompt (or its last decode
  compression); the step in which a request reaches ``K`` (``--kv-decode-interval``) marks it, and right
  after that step's forward (``ModelRunner.forward`` AFTER hook; outside the graph, which stays as
  captured) :meth:`DecodeCompressor.run_pending` compresses every marked request together: per layer one
  gather of their keys through the page table (padded to the layer's longest segment), SnapKV scores of
  the ring's last ``W`` queries (:func:`~sglang_fairkv.compress.decode_press.window_scores`), the kept
  rows (SnapKV: top ``T`` per head, counts known on the host; AdaKV: the layer-wide top ``KV x T`` -- under
  TP after one all-reduce of every rank's scores, the one exchange per layer, and one read of the counts),
  and one compaction of all their segments (:meth:`~sglang_fairkv.kv.pool_compact.CompactMixin.
  compact_many`): tail pages back to the free stack at once. The ledger's lengths follow on every rank
  without an exchange (SnapKV: ``min(len, T)`` of every head; AdaKV: every rank selects from the same
  gathered scores).
* As kvpress, the step that reaches the interval attends the uncompressed cache; the next one reads the
  compressed segments. Requests released meanwhile are skipped; a retracted request counts afresh after
  its re-prefill. Every rank runs the same batches, so the marked sets and the exchanges agree.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from ..compress.decode_press import select_adakv, select_uniform, window_scores

logger = logging.getLogger(__name__)

#: the most score elements (requests x query heads x window x padded rows) one pass scores at once:
#: requests that reach their interval together are compressed in chunks of this size (float32 logits and
#: probabilities: 64 MB each, transient, outside the KV budget like the prefill's scoring)
SCORE_ELEMENTS = 1 << 24


def ring_bytes(*, max_reqs: int, num_layers: int, window: int, q_heads: int, head_dim: int, dtype) -> int:
    """Device bytes of the decode query ring (taken out of the KV budget)."""
    return max_reqs * num_layers * window * q_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class DecodeCompressor:
    """The decode-time compression of one backend (see the module docstring). ``backend``: the
    :class:`~.fairkv_backend.FairKVAttnBackend` (its state, pool, ledger, TP group)."""

    def __init__(self, backend) -> None:
        st = backend.state
        self.state, self.pool, self.ledger = st, st.pool, st.ledger
        self.cfg = st.cfg
        self.tp, self.group = backend.tp, backend._group
        self.num_layers = backend.num_layers
        self.ring: torch.Tensor = st.decode_ring  # [max_reqs, L, W, Hq, D]
        self.window = self.ring.shape[2]
        #: per layer, the attention's softmax scale and K cache scale (host floats, set by the first forward)
        self.scaling: dict[int, tuple[float, float]] = {}
        #: requests that reached their interval in the step just launched (host), compressed after it
        self.pending: np.ndarray | None = None

    # ---- per step (host) and per layer (device) ----------------------------------------------------
    def step_slots(self, req_pool_idx: np.ndarray) -> np.ndarray:
        """A decode step of these requests (host ``[b]``) is launched: count it, remember those that reach
        their interval, and return each one's ring slot for this step's queries (host int64 ``[b]``)."""
        due, steps = self.state.requests.count_decode_step(req_pool_idx, self.cfg.decode_interval)
        if due.size:
            self.pending = due if self.pending is None else np.concatenate([self.pending, due])
        return (steps - 1) % self.window

    def write(self, q: torch.Tensor, layer: int, req_pool_idx: torch.Tensor, slot: torch.Tensor) -> None:
        """This layer's decode queries ``q`` [b, hq, D] (post-RoPE) into the ring at ``slot`` [b] (device)."""
        self.ring[:, layer][req_pool_idx, slot, :q.shape[1]] = q.to(self.ring.dtype)

    # ---- the compression pass (after the step's forward) -----------------------------------------
    def run_pending(self) -> None:
        """Compress every request marked by the launched step that is still admitted (same on every rank)."""
        due, self.pending = self.pending, None
        if due is None:
            return
        reqs = self.state.requests
        # still admitted and past its prompt (a slot released and taken by a new prompt meanwhile is not it)
        due = np.asarray([r for r in dict.fromkeys(due.tolist()) if r in reqs.admitted and reqs.prompt_done[r]],
                         dtype=np.int64)
        if not due.size:
            return
        self.state.decode_stats["passes"] += 1
        hq = self.ring.shape[3]
        longest = self.ledger.length[torch.from_numpy(due)].amax(dim=(1, 2)).numpy()  # [n] group-wide
        per_req = np.maximum(1, longest) * hq * self.window
        start = 0
        while start < due.size:  # chunks of at most SCORE_ELEMENTS (at least one request)
            stop = start + max(1, int(np.searchsorted(np.cumsum(per_req[start:]), SCORE_ELEMENTS, side="right")))
            self._compress(due[start:stop])
            start = stop
        self.pool.flush()

    def _compress(self, due: np.ndarray) -> None:
        """Every layer of requests ``due`` (host int64 ``[n]``)."""
        st, pool, cfg = self.state, self.pool, self.cfg
        n, W, K = due.size, self.window, cfg.decode_interval
        before = self.ledger.length[torch.from_numpy(due)].sum(dim=(1, 2)).numpy()
        idx = pool.upload(due)
        order = (np.arange(W) + K - W) % W  # ring slots of the last W steps, oldest first
        for lid in range(self.num_layers):
            heads = st.local_heads(lid)
            hkv = len(heads)
            lens_full = self.ledger.length[torch.from_numpy(due), lid].numpy()  # [n, KV] every rank's heads
            s = int(lens_full.max())
            snapkv = cfg.decode_method == "snapkv"
            if (s if snapkv else int(lens_full.sum(axis=1).max()) / lens_full.shape[1]) <= cfg.decode_budget:
                continue  # no head (SnapKV) / no request's layer (AdaKV) over its budget: the same on every rank
            active = pool.active_host[due, lid, :hkv]  # [n, hkv]
            lens = pool.seg_len_host[due, lid, :hkv]
            scores = None
            if hkv and active.any():
                scores = self._scores(idx, lid, hkv, lens, order, s)  # [n, hkv, s]
            if snapkv:
                counts_full = np.minimum(lens_full, cfg.decode_budget)
                if scores is None:  # nothing of this layer here for these requests: the ledger only
                    self.ledger.length[torch.from_numpy(due), lid] = torch.from_numpy(counts_full)
                    continue
                kept, counts = select_uniform(scores, lens, cfg.decode_budget)
            else:
                full = self._all_heads(scores, heads, active, n, lens_full.shape[1], s)
                kept_full, counts_full = select_adakv(full, lens_full, cfg.decode_budget, cfg.alpha)
                h_idx = torch.as_tensor(heads, dtype=torch.int64, device=kept_full.device)
                kept, counts = kept_full[:, h_idx], counts_full[:, heads]
            if hkv:
                i, j = np.nonzero(active & (counts < lens))
                if i.size:
                    sel = pool.upload(i * hkv + j)
                    pool.compact_many(due[i], lid, j, kept.reshape(n * hkv, -1)[sel], counts[i, j])
            self.ledger.length[torch.from_numpy(due), lid] = torch.from_numpy(counts_full.astype(np.int64))
        after = self.ledger.length[torch.from_numpy(due)]
        evicted = before - after.sum(dim=(1, 2)).numpy()
        reqs = st.requests
        cut = evicted > 0  # a request at or under its budget everywhere kept all: not a compression
        reqs.decode_evicted[due] += evicted
        reqs.decode_compressions[due] += cut
        stats = st.decode_stats
        stats["request_compressions"] += int(cut.sum())
        stats["rows_evicted_total"] += int(evicted.sum())
        for r, kept_lk in zip(due[cut].tolist(), after.numpy()[cut]):
            st.traffic.record(kept_lk, int(reqs.decode_context[r]))  # the live profile sees decode-time sizes
        if logger.isEnabledFor(logging.DEBUG):
            for r, e in zip(due.tolist(), evicted.tolist()):
                logger.debug("fairkv req_pool_idx %d: decode-time compression evicted %d rows (%d in all, %d "
                             "passes), holds %d", r, e, int(reqs.decode_evicted[r]), int(reqs.decode_compressions[r]),
                             int(self.ledger.length[r].sum()))

    def _scores(self, idx: torch.Tensor, lid: int, hkv: int, lens: np.ndarray, order: np.ndarray,
                s: int) -> torch.Tensor:
        """SnapKV scores ``[n, hkv, s]`` of this rank's segments of layer ``lid`` (inactive ones: ``-inf``)."""
        pool = self.pool
        scale, k_scale = self.scaling.get(lid, (None, 1.0))
        lens_d = pool.upload(lens.reshape(-1)).view(lens.shape)
        pos = torch.arange(s, device=idx.device)
        rows = pool.rows_at(idx, lid, hkv, pos)  # [n, hkv, s]
        rows = torch.where(pos < lens_d[..., None], rows, 0)  # past a segment: the sink page
        k = pool.read_keys(rows, self.ring.dtype, k_scale)  # [n, hkv, s, D]
        g = self.ring.shape[3] // pool.num_kv_heads
        q = self.ring[idx, lid][:, torch.as_tensor(order, device=idx.device), :hkv * g]  # [n, W, hkv*g, D]
        sc = window_scores(q.transpose(1, 2), k, lens_d.clamp(min=self.window + 1), self.cfg.kernel, scale)
        return sc.masked_fill_((lens_d == 0)[..., None], float("-inf"))

    def _all_heads(self, scores: torch.Tensor | None, heads: list[int], active: np.ndarray, n: int, kv: int,
                   s: int) -> torch.Tensor:
        """AdaKV: the layer's scores ``[n, KV, s]`` of every head. Under TP each rank puts the heads it holds
        for each request into a zero matrix and one SUM all-reduce assembles them (every head is held by
        exactly one rank per request; float64 carries float32 exactly)."""
        dev = self.pool.device
        if self.tp == 1:
            full = torch.full((n, kv, s), float("-inf"), dtype=torch.float32, device=dev)
            if scores is not None:
                full[:, torch.as_tensor(heads, device=dev)] = scores
            return full
        full = torch.zeros(n, kv, s, dtype=torch.float64, device=dev)
        if scores is not None:
            mask = torch.as_tensor(active, device=dev)[..., None]
            full[:, torch.as_tensor(heads, device=dev)] = torch.where(mask, scores.double(), 0.0)
        dist.all_reduce(full, group=self.group)
        return full.float()
