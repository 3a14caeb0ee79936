"""Compaction of :class:`~sglang_fairkv.kv.ragged_pool.RaggedKVPool` segments: kept rows moved to each
segment's front, the tail pages back to the free stack at once (only the same step's stream-ordered work
can take them).

* :meth:`CompactMixin.compact`: one request's layer at the end of its prompt (the prefill compresses
  layer by layer inside the forward);
* :meth:`CompactMixin.compact_many`: any number of segments of one layer in one gather / scatter (decode
  time compression of every request that reached its interval in a step). Host work vectorised over the
  segments: destination rows from the host page table, freed pages, lengths; one upload.
"""

from __future__ import annotations

import numpy as np
import torch

_PAGES, _LEN, _ACTIVE = 0, 1, 2  # the device tables that pending writes target (the tier's: 3)


class CompactMixin:
    """Compaction of the pool (its attributes: ``page_size``, ``num_layers``, ``num_kv_heads``,
    ``max_pages``, the host mirrors, ``_queue``, ``_push``, ``_upload``, ``_page_rows``, ``copy_rows``)."""

    def compact(self, req_pool_idx: int, layer: int, kept: list[torch.Tensor],
                heads: list[int] | None = None) -> None:
        """Keep only ``kept[i]`` (sorted positions, a tensor on any device) of head ``heads[i]``'s
        segment (default: head ``i``), moved to the segment's front; the tail pages go back to the
        free stack. All heads move in one gather/scatter of K and of V; the destination rows and head
        ids come from the host tables (one small upload), the sources are read from the device page
        table (the positions stay on the device)."""
        r, P = int(req_pool_idx), self.page_size
        heads = list(range(len(kept))) if heads is None else list(heads)
        move_h, move_pos, dst = [], [], []
        for h, pos in zip(heads, kept):
            old, n = int(self.seg_len_host[r, layer, h]), int(pos.numel())
            if n == old:
                continue
            if n > old:
                raise ValueError(f"compact keeps {n} of {old} tokens")
            t = np.arange(n)
            dst.append(self.seg_pages_host[r, layer, h, t // P].astype(np.int64) * P + t % P)
            move_h.append(np.full(n, h, dtype=np.int64))
            move_pos.append(pos)
            keep_p, old_p = -(-n // P), -(-old // P)
            self._push(self.seg_pages_host[r, layer, h, keep_p:old_p].copy())
            self.seg_len_host[r, layer, h] = n
            seg = (r * self.num_layers + layer) * self.num_kv_heads + h
            self._queue(_LEN, np.array([seg]), np.array([n]))
        if not move_h:
            return
        n_tot = sum(x.size for x in move_h)
        if n_tot:
            self.flush((_PAGES,))  # no-op in the server (its step's pages are flushed already)
            host = self._upload(np.concatenate([*move_h, *dst]))
            hcol, dst_rows = host[:n_tot], host[n_tot:]
            pos = torch.cat([p.to(self.device, torch.int64) for p in move_pos])
            seg = (r * self.num_layers + layer) * self.num_kv_heads + hcol
            src = self._page_rows(seg, pos)
            self.copy_rows(dst_rows, src)

    def compact_many(self, req_pool_idx: np.ndarray, layer: int, heads: np.ndarray, kept: torch.Tensor,
                     counts: np.ndarray) -> int:
        """Segments ``(req_pool_idx[m], layer, heads[m])`` keep the rows ``kept[m, :counts[m]]`` (int64
        ``[m, k]`` device, ascending positions; entries past ``counts`` ignored), moved to their fronts.

        Host (vectorised over the segments): destination rows from the host page table, the pages past
        each new length pushed on the free stack, lengths queued; device: one upload (the valid entries'
        flat index into ``kept`` and their destination rows), one gather of the page table, one row copy of
        K and of V (the gather reads before the scatter writes: a row never moves backwards over an
        unread one). Segments keeping all their rows are skipped. Returns the rows evicted."""
        r = np.asarray(req_pool_idx, dtype=np.int64)
        h = np.asarray(heads, dtype=np.int64)
        n = np.asarray(counts, dtype=np.int64)
        P, L, H, MP = self.page_size, self.num_layers, self.num_kv_heads, self.max_pages
        old = self.seg_len_host[r, layer, h]
        if (n > old).any():
            raise ValueError("compact_many keeps more rows than a segment holds")
        move = n < old
        if not move.any():
            return 0
        r, h, n, old = r[move], h[move], n[move], old[move]
        which = np.nonzero(move)[0]
        # pages past each new length: [keep_p, old_p) of each segment, pushed back at once
        keep_p, old_p = -(-n // P), -(-old // P)
        slot = np.arange(MP)[None, :]
        tail = (slot >= keep_p[:, None]) & (slot < old_p[:, None])
        self._push(self.seg_pages_host[r, layer, h][tail])
        self.seg_len_host[r, layer, h] = n
        seg = (r * L + layer) * H + h
        self._queue(_LEN, seg, n)
        total = int(n.sum())
        if total:
            who = np.repeat(np.arange(n.size), n)
            t = np.arange(total) - np.repeat(np.cumsum(n) - n, n)  # position within its segment
            dst = self.seg_pages_host[r[who], layer, h[who], t // P].astype(np.int64) * P + t % P
            src_at = which[who] * kept.shape[1] + t  # flat index into kept
            up = self._upload(np.concatenate([src_at, dst, seg[who]]))
            pos = kept.reshape(-1)[up[:total]]
            self.copy_rows(up[total:2 * total], self._page_rows(up[2 * total:], pos))
        return int((old - n).sum())
