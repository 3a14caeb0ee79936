"""A paged, physically ragged KV pool: one segment per (request, layer, KV head).

Layout (device)
---------------
* ``k_rows`` / ``v_rows``: ``[num_pages * page_size, head_dim]`` -- one *row* is one token of one KV
  head of one layer; all layers share the row space, so per-layer and per-head budgets (AdaKV,
  PyramidKV, HeadKV) cost exactly what they keep.
* ``seg_pages``: int32 ``[max_reqs, num_layers, num_kv_heads, max_pages]`` -- the pages of each
  segment in order; ``seg_len``: int32 ``[max_reqs, num_layers, num_kv_heads]`` -- tokens in it;
  ``active``: bool, same shape -- which segments a request holds on this rank. Indexed by SGLang's
  ``req_pool_idx``: static tables, read in place by the decode kernel (and by a captured graph).
* Row of token ``t`` of segment ``(r, l, h)``: ``seg_pages[r, l, h, t // P] * P + t % P``.

Host-side bookkeeping, one upload per step
------------------------------------------
Every decision about pages is taken on the host, from host mirrors of the three tables
(``seg_len_host``, ``active_host``, ``seg_pages_host``; numpy) and a host free stack of page ids: a
decode step knows without asking the device which segments cross a page boundary (``len % P == 0``).
Table changes are queued as ``(flat index, value)`` writes and applied by :meth:`flush` -- one packed
host-to-device copy (from a pinned staging buffer on CUDA) and one scatter per table -- which the
backend calls once per forward. Decode then advances ``seg_len`` and computes the write rows on the
device (:meth:`append`), touching only the ``[b, L, H]`` entries of the batch, never whole
``[.., max_pages]`` rows. Nothing here reads a device tensor back.

Page granularity (``P``, default 16) and not token granularity: a token-granular segment needs a
``max_context`` row table; pages bound it to ``max_context / P`` entries and the slack to ``P - 1``
rows per segment. :meth:`table_bytes` is what the tables cost; the server takes it out of SGLang's
KV budget (:mod:`sglang_fairkv.kv.sizing`).

Row 0..P-1 (page 0) is never handed out: like SGLang's slot 0 it absorbs writes of padded tokens
and of segments this rank does not hold.

The dense prefix tier (:mod:`sglang_fairkv.kv.prefix_tier`, when enabled): blocks of ``P`` tier tokens,
each block one page per (layer, KV head) held here, from the same free stack (``tier_pages [blocks, L,
H]``, entries of heads a layer does not hold point at page 0). A tier token's row in layer ``l``, head
``h``: ``tier_pages[t // P, l, h] * P + t % P`` (:meth:`tier_rows`). Prefill writes a cached prompt's dense
KV there and fills the request's segments from it (:meth:`fill_from_tier`).

Row dtype: the model's, or fp8 (``--kv-cache-dtype fp8_*``): every row is written, read and copied
through the row codec (:mod:`~sglang_fairkv.kv.pool_rows`: quantised once on write, dequantised on read).

Ownership: under a FairKV plan a layer may hold fewer heads than ``num_kv_heads`` (the largest count
over layers), and a copied head's replica holds only the requests assigned to it; inactive segments
stay empty (zero length, no pages), give zero attention, and their decode writes land in page 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .page_stack import PageStackMixin, RaggedPoolFull  # noqa: F401  (re-exported)
# the device tables that pending writes target (_PAGES, _LEN, _ACTIVE; the tier's: _TIER)
from .pool_compact import _ACTIVE, _LEN, _PAGES, CompactMixin
from .pool_rows import RowCodecMixin
from .pool_staging import StagingMixin
from .pool_tier import _TIER, TierMixin


class RaggedKVPool(CompactMixin, RowCodecMixin, PageStackMixin, StagingMixin, TierMixin):
    """Paged per-(request, layer, KV head) segments; KV rows and tables on ``device``, bookkeeping
    on the host.

    Parameters
    ----------
    num_pages : pages of ``page_size`` rows (page 0 reserved).
    num_layers, num_kv_heads, head_dim : model geometry on this rank.
    max_reqs : rows of SGLang's ``req_to_token`` table (``req_pool_idx`` range).
    max_context : longest sequence a segment may hold (prompt + output), tokens.
    """

    def __init__(self, *, num_pages: int, page_size: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, max_reqs: int, max_context: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        if page_size < 1 or num_pages < 2:
            raise ValueError(f"need page_size >= 1 and >= 2 pages, got {page_size}, {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_reqs = max_reqs
        self.max_pages = self.pages_per_segment(max_context, page_size)
        self.max_context = (self.max_pages - 1) * page_size
        self.dtype = dtype
        self.device = torch.device(device)
        rows = num_pages * page_size
        shape = (max_reqs, num_layers, num_kv_heads)
        self.k_rows = torch.zeros(rows, head_dim, dtype=dtype, device=self.device)
        self.v_rows = torch.zeros(rows, head_dim, dtype=dtype, device=self.device)
        self._init_codec()
        self.seg_pages = torch.zeros(*shape, self.max_pages, dtype=torch.int32, device=self.device)
        self.seg_len = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.active = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.seg_pages_host = np.zeros((*shape, self.max_pages), dtype=np.int32)
        self.seg_len_host = np.zeros(shape, dtype=np.int64)
        self.active_host = np.zeros(shape, dtype=np.bool_)
        # flat index of segment (0, l, h): base[l, h]; of (r, l, h): r * L * H + base[l, h]
        self._seg_base = torch.arange(num_layers * num_kv_heads, dtype=torch.int64,
                                      device=self.device).view(num_layers, num_kv_heads)
        self._staging: list[torch.Tensor | None] = [None] * self.STAGING_RING
        self._staging_events: list[object | None] = [None] * self.STAGING_RING
        self._flip = 0
        self.staging_waits = 0  # uploads that waited for their staging buffer (CUDA)
        #: a decode step's device part in two Triton launches (CUDA; tests set it under the interpreter)
        self.fused_step = self.device.type == "cuda"
        #: the stream the last launched step runs on (CUDA; the overlap scheduler's forward stream)
        self._step_stream = None
        self.uploads = 0  # host-to-device copies made by flush (a test counts them)
        self.step_extra: torch.Tensor | None = None  # see append
        self.tier_pages: torch.Tensor | None = None  # see enable_tier
        self.tier_pages_host: np.ndarray | None = None
        self.clear()

    @staticmethod
    def pages_per_segment(max_context: int, page_size: int) -> int:
        """Page-table entries per segment for sequences up to ``max_context`` tokens (+1: a decode
        step at a page boundary takes the next page before the length check)."""
        return math.ceil(max_context / page_size) + 1

    @classmethod
    def table_bytes(cls, *, max_reqs: int, num_layers: int, num_kv_heads: int, max_context: int,
                    page_size: int) -> int:
        """Device bytes of ``seg_pages`` + ``seg_len`` + ``active`` (the metadata the KV budget pays)."""
        segs = max_reqs * num_layers * num_kv_heads
        return segs * (4 * cls.pages_per_segment(max_context, page_size) + 4 + 1)

    # ---- accounting -------------------------------------------------------------------------
    def clear(self) -> None:
        """Every page free, every segment empty and inactive (host and device)."""
        # a stack popped from the top: pages come out 1, 2, 3, ... on an empty pool
        self._free = np.arange(self.num_pages - 1, 0, -1, dtype=np.int32)
        self._n_free = self.num_pages - 1
        #: the most pages in use since the last :meth:`reset_peak` (the transient high-water mark)
        self.peak_used = 0
        #: freed pages a launched step may still read: ``(step, pages, CUDA event or None)``
        self._limbo: list[tuple[int, np.ndarray, object | None]] = []
        self._limbo_pages = 0
        #: forward steps launched (:meth:`begin_step`)
        self.step = 0
        self.seg_len_host[:] = 0
        self.active_host[:] = False
        self._pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[], [], [], []]
        self.seg_len.zero_()
        self.active.zero_()
        #: pages held by tier blocks (a part of :meth:`used_pages`)
        self.tier_used_pages = 0
        if self.tier_pages_host is not None:
            self.tier_pages_host[:] = 0

    def set_active(self, req_pool_idx: int, mask: np.ndarray | torch.Tensor | None = None) -> None:
        """Which segments request ``req_pool_idx`` holds here: bool ``[num_layers, num_kv_heads]``
        (None: all). Set once before its first :meth:`extend`; :meth:`free` clears it."""
        if self.seg_len_host[req_pool_idx].any():
            raise AssertionError("set_active on a request that already holds segments")
        if mask is None:
            m = np.ones((self.num_layers, self.num_kv_heads), dtype=np.bool_)
        else:
            m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.bool_)
        self.active_host[req_pool_idx] = m
        self._queue(_ACTIVE, self._seg_flat(req_pool_idx), m.reshape(-1))

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def free_pages(self) -> torch.Tensor:
        """int64 copy of the free page ids (tests; not for serving paths)."""
        return torch.from_numpy(self._free[:self._n_free].astype(np.int64))

    def free_page_count(self) -> int:
        """Free pages, those in limbo included (they come back before a pop could fail)."""
        return self._n_free + self._limbo_pages

    def used_pages(self) -> int:
        """Pages held by segments and tier blocks (pages in limbo are held by none: freed, awaiting
        reuse)."""
        return self.usable_pages - self._n_free - self._limbo_pages

    def segment_pages(self) -> int:
        """Pages held by segments (:meth:`used_pages` without the prefix tier's)."""
        return self.used_pages() - self.tier_used_pages

    def reset_peak(self) -> int:
        """Start a new high-water mark at the pages in use now; returns the previous mark."""
        prev, self.peak_used = self.peak_used, self.used_pages()
        return prev

    def used_tokens(self, req_pool_idx: int | None = None) -> int:
        """Sum of segment lengths (rows holding KV), for one request or all (host mirror)."""
        if req_pool_idx is None:
            return int(self.seg_len_host.sum())
        return int(self.seg_len_host[req_pool_idx].sum())

    def requests_holding(self) -> int:
        """Requests with at least one non-empty segment here."""
        return int((self.seg_len_host.reshape(self.max_reqs, -1).sum(axis=1) > 0).sum())

    def bytes_per_row(self) -> int:
        return 2 * self.head_dim * self.k_rows.element_size()

    # ---- queued table writes -------------------------------------------------------------------
    def _seg_flat(self, r: int) -> np.ndarray:
        """Flat indices (into ``seg_len`` / ``active``) of every segment of request ``r``, ``[L*H]``."""
        n = self.num_layers * self.num_kv_heads
        return np.arange(r * n, (r + 1) * n, dtype=np.int64)

    def _queue(self, table: int, flat: np.ndarray, values: np.ndarray) -> None:
        if flat.size:
            self._pending[table].append((flat.astype(np.int64, copy=False).reshape(-1),
                                         np.asarray(values, dtype=np.int64).reshape(-1)))

    def pending_writes(self) -> int:
        return sum(int(i.size) for t in self._pending for i, _ in t)

    def flush(self, tables: tuple[int, ...] = (_PAGES, _LEN, _ACTIVE, _TIER),
              extra: np.ndarray | None = None) -> torch.Tensor | None:
        """Apply the queued writes of ``tables`` (default all): one host-to-device copy of one packed
        int64 buffer, one scatter per table touched. A segment written twice keeps the later value.

        ``extra``: int64 host data the caller needs on the device this step (the backend's prefill
        metadata); it travels in the same copy and comes back as a device tensor (else None)."""
        parts, sizes = [], []
        for t in range(4):
            if t not in tables or not self._pending[t]:
                sizes.append(0)
                continue
            idx = np.concatenate([i for i, _ in self._pending[t]])
            val = np.concatenate([v for _, v in self._pending[t]])
            # last write wins: unique over the reversed list keeps each index's last occurrence
            _, first_rev = np.unique(idx[::-1], return_index=True)
            keep = idx.size - 1 - first_rev
            parts += [idx[keep], val[keep]]
            sizes.append(int(keep.size))
            self._pending[t] = []
        if extra is not None:
            parts.append(np.asarray(extra, dtype=np.int64).reshape(-1))
        if not parts:
            return None
        packed = self._upload(np.concatenate(parts))
        off = 2 * sum(sizes)
        tables_ = (self.seg_pages, self.seg_len, self.active, self.tier_pages)
        if self.fused_step and off:  # one launch for the three segment tables (+ one scatter for the tier's)
            from sglang_fairkv_kernels import apply_table_writes

            apply_table_writes(packed, *sizes[:3], self.seg_pages.view(-1), self.seg_len.view(-1), self.active.view(-1))
            if sizes[3]:
                o, n = 2 * sum(sizes[:3]), sizes[3]
                self.tier_pages.view(-1)[packed[o:o + n]] = packed[o + n:o + 2 * n].to(torch.int32)
        elif off:
            o = 0
            for t, n in enumerate(sizes):
                if not n:
                    continue
                idx, val = packed[o:o + n], packed[o + n:o + 2 * n]
                o += 2 * n
                table = tables_[t]
                table.view(-1)[idx] = val.to(table.dtype)
        return packed[off:] if extra is not None else None

    # ---- allocation (host decisions) -----------------------------------------------------------
    def extend(self, req_pool_idx, new_len) -> None:
        """Grow every active segment of each request to ``new_len`` tokens (a prefill chunk).

        ``req_pool_idx``, ``new_len``: host ints (sequences or CPU tensors) ``[b]``. Before compression
        all active segments of a request have the same length; the rows of the new positions are
        written layer by layer by the backend. Queues table writes (see :meth:`flush`).
        """
        for r, new in zip(_host_ints(req_pool_idx), _host_ints(new_len)):
            act = self.active_host[r]  # [L, H]
            l_i, h_i = np.nonzero(act)
            self._grow(np.full(l_i.size, r, dtype=np.int64), l_i, h_i, new)

    def extend_layer(self, req_pool_idx, layer: int, new_len) -> None:
        """Grow the active segments of one layer of each request to ``new_len`` tokens: the prompt's last
        chunk compressing as it goes allocates each layer's pages when that layer runs, so
        the dense prompt of only one layer exists at a time. Host ints ``[b]``; vectorised over the
        batch (no loop over requests); queues table writes (the caller flushes)."""
        idx = np.asarray(_host_ints(req_pool_idx), dtype=np.int64)
        new = np.asarray(_host_ints(new_len), dtype=np.int64)
        b_i, h_i = np.nonzero(self.active_host[idx, layer])
        self._grow(idx[b_i], np.full(b_i.size, layer, dtype=np.int64), h_i, new[b_i])

    def _grow(self, r: np.ndarray, l_i: np.ndarray, h_i: np.ndarray, new) -> None:
        """Grow segments ``(r, l_i, h_i)`` (``[n]`` each) from their length to ``new`` (scalar or ``[n]``):
        pages from the free stack, writes queued."""
        if l_i.size == 0:
            return
        P, MP = self.page_size, self.max_pages
        new = np.broadcast_to(np.asarray(new, dtype=np.int64), l_i.shape)
        if (new > self.max_context).any():
            raise ValueError(f"sequence of {int(new.max())} tokens exceeds the pool's max context {self.max_context}")
        old = self.seg_len_host[r, l_i, h_i]
        if (new < old).any():
            raise ValueError("extend cannot shrink a segment")
        a, b = -(-old // P), -(-new // P)
        seg = (r * self.num_layers + l_i) * self.num_kv_heads + h_i  # [n]
        grow = b - a
        total = int(grow.sum())
        if total:
            pages = self._pop(total)
            who = np.repeat(np.arange(l_i.size), grow)
            slot = a[who] + (np.arange(total) - np.repeat(np.cumsum(grow) - grow, grow))
            self.seg_pages_host[r[who], l_i[who], h_i[who], slot] = pages
            self._queue(_PAGES, seg[who] * MP + slot, pages)
        self.seg_len_host[r, l_i, h_i] = new
        self._queue(_LEN, seg, new)

    def decode_pages_needed(self, req_pool_idx) -> int:
        """Pages the next :meth:`append` of these requests will take (segments at a page boundary)."""
        idx = np.asarray(_host_ints(req_pool_idx), dtype=np.int64)
        return int(((self.seg_len_host[idx] % self.page_size == 0) & self.active_host[idx]).sum())

    def append(self, req_pool_idx_host, req_pool_idx: torch.Tensor,
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               extra: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one token to every active segment of each request (a decode step).

        ``req_pool_idx_host``: host ints ``[b]``; ``req_pool_idx``: the same on the device (int64).
        Host: pages for the segments at a page boundary from the free stack, queued and flushed (the
        step's one upload). Device: the write rows from the page table and ``seg_len`` advanced.

        Returns ``write_rows`` int64 ``[L, b, H]`` (the row of each new token's K/V; a row of the
        reserved page 0 for inactive segments) and ``lens`` int32 ``[b, L, H]`` (lengths after the
        step).

        ``out``: ``(rows [L, bs, H], lens [bs, L, H], idx [bs])`` buffers with ``bs >= b`` (a CUDA-graph
        runner's static buffers) written in place, slots past ``b`` zeroed (padding); returns views of
        them. ``extra``: int64 host data the caller needs on the device this step (the decode query ring's
        slots), in the same upload: :attr:`step_extra` is its device view afterwards (else None).
        With :attr:`fused_step` (CUDA) the device part is two launches
        (:func:`~sglang_fairkv_kernels.apply_table_writes`, :func:`~sglang_fairkv_kernels.decode_step`)
        after the one upload; else torch ops.
        """
        P, L, H, MP = self.page_size, self.num_layers, self.num_kv_heads, self.max_pages
        idx = np.asarray(_host_ints(req_pool_idx_host), dtype=np.int64)
        lens = self.seg_len_host[idx]  # [b, L, H]
        act = self.active_host[idx]
        if (lens[act] >= self.max_context).any():
            raise ValueError("a segment would exceed the pool's max context")
        need = (lens % P == 0) & act
        b_i, l_i, h_i = np.nonzero(need)
        if b_i.size:
            pages = self._pop(b_i.size)
            slot = lens[b_i, l_i, h_i] // P
            self.seg_pages_host[idx[b_i], l_i, h_i, slot] = pages
            self._queue(_PAGES, ((idx[b_i] * L + l_i) * H + h_i) * MP + slot, pages)
        self.seg_len_host[idx] = lens + act
        self.step_extra = self.flush(extra=extra)
        b = idx.size
        if self.fused_step:  # one launch: rows, lengths, seg_len and the step's metadata buffers
            from sglang_fairkv_kernels import decode_step

            if out is None:
                out = (torch.empty(L, b, H, dtype=torch.int64, device=self.device),
                       torch.empty(b, L, H, dtype=torch.int32, device=self.device),
                       torch.empty(b, dtype=torch.int64, device=self.device))
            rows_o, lens_o, idx_o = out
            decode_step(req_pool_idx, self.seg_pages, self.seg_len, self.active, P, rows_o, lens_o, idx_o, raw=b)
            return rows_o[:, :b], lens_o[:b]
        # device: rows from the (just updated) page table, then the lengths advance
        r = req_pool_idx.to(torch.int64)
        lens_d = self.seg_len[r]  # [b, L, H] int32
        act_d = self.active[r]
        seg = r[:, None, None] * (L * H) + self._seg_base  # [b, L, H]
        page = self.seg_pages.view(-1)[seg * MP + (lens_d // P).to(torch.int64)]
        rows = torch.where(act_d, page.to(torch.int64) * P + (lens_d % P).to(torch.int64), 0)
        new_lens = lens_d + act_d.to(lens_d.dtype)
        self.seg_len[r] = new_lens
        rows = rows.permute(1, 0, 2)
        if out is not None:
            rows_o, lens_o, idx_o = out
            rows_o[:, :b].copy_(rows)
            rows_o[:, b:].zero_()
            lens_o[:b].copy_(new_lens)
            lens_o[b:].zero_()
            idx_o[:b].copy_(r)
            idx_o[b:].zero_()
            return rows_o[:, :b], lens_o[:b]
        return rows, new_lens

    def free(self, req_pool_idx: int) -> int:
        """Return every page of one request (host); returns the number of pages freed."""
        r = int(req_pool_idx)
        lens = self.seg_len_host[r]  # [L, H]
        n_pages = -(-lens // self.page_size)
        had_active = bool(self.active_host[r].any())
        self.active_host[r] = False
        flat = self._seg_flat(r)
        if had_active:
            self._queue(_ACTIVE, flat, np.zeros(flat.size))
        total = int(n_pages.sum())
        if total == 0:
            return 0
        mask = np.arange(self.max_pages)[None, None, :] < n_pages[..., None]
        self._release(self.seg_pages_host[r][mask])
        self.seg_len_host[r] = 0
        self._queue(_LEN, flat, np.zeros(flat.size))
        return total

    # ---- addressing ---------------------------------------------------------------------------
    def _page_rows(self, seg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """int64 rows of positions ``pos`` in flat segments ``seg`` (int64, broadcastable to one shape):
        ``seg_pages[seg, pos // P] * P + pos % P``, one flat gather of the page table. The one place the
        device side computes a segment row from the table."""
        P = self.page_size
        page = self.seg_pages.view(-1)[seg * self.max_pages + pos // P]
        return page.to(torch.int64) * P + pos % P

    def rows_at(self, req_pool_idx: torch.Tensor, layer: int, num_heads: int,
                positions: torch.Tensor) -> torch.Tensor:
        """int64 ``[b, num_heads, T]``: rows of ``positions`` (int64 ``[b, T]`` or ``[T]``, device) in
        the segments ``(req_pool_idx[b], layer, h < num_heads)``. Reads only those page-table entries
        (a flat gather); positions past a segment's pages read stale entries: mask them."""
        r = req_pool_idx.to(torch.int64)
        seg = r[:, None] * (self.num_layers * self.num_kv_heads) + self._seg_base[layer, :num_heads]
        pos = positions if positions.dim() == 2 else positions[None, :]
        return self._page_rows(seg[:, :, None], pos[:, None, :])

    def rows_at_tokens(self, req_pool_idx: torch.Tensor, layer: int, num_heads: int,
                       positions: torch.Tensor) -> torch.Tensor:
        """int64 ``[n, num_heads]``: the row of token ``i`` -- position ``positions[i]`` of request
        ``req_pool_idx[i]`` (int64 ``[n]`` each, device) -- in segments ``(., layer, h < num_heads)``. The
        packed layout of a prefill batch (no padding); a flat gather of the page table, no host read."""
        seg = req_pool_idx[:, None] * (self.num_layers * self.num_kv_heads) + self._seg_base[layer, :num_heads]
        return self._page_rows(seg, positions[:, None])

    def rows_of(self, req_pool_idx: int, layer: int, head: int, positions: torch.Tensor) -> torch.Tensor:
        """Rows of ``positions`` (int64 ``[n]``, < segment length) in one segment (host tables)."""
        pos = positions.cpu().numpy().astype(np.int64)
        pages = self.seg_pages_host[req_pool_idx, layer, head, pos // self.page_size].astype(np.int64)
        return torch.from_numpy(pages * self.page_size + pos % self.page_size).to(self.device)


def _host_ints(x) -> list[int]:
    """A host sequence of ints from a list, numpy array or CPU tensor (never a device tensor)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError("host bookkeeping was given a device tensor (it would sync)")
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return [int(v) for v in x]
