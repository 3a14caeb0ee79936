"""A paged, physically ragged KV pool: one segment per (request, layer, KV head).

Layout
------
* ``k_rows`` / ``v_rows``: ``[num_pages * page_size, head_dim]`` -- one *row* is one token of one KV
  head of one layer; all layers share the row space, so per-layer and per-head budgets (AdaKV,
  PyramidKV, HeadKV) cost exactly what they keep.
* ``seg_pages``: int32 ``[max_reqs, num_layers, num_kv_heads, max_pages]`` -- the pages of each
  segment in order; ``seg_len``: int64 ``[max_reqs, num_layers, num_kv_heads]`` -- tokens in it.
  Both are indexed by SGLang's ``req_pool_idx`` (tables, not per-request objects: they survive
  CUDA-graph replay and are shared by every layer).
* Row of token ``t`` of segment ``(r, l, h)``: ``seg_pages[r, l, h, t // P] * P + t % P``.

Page granularity (``P``, default 16) and not token granularity: a token-granular segment needs a
``max_context`` row table (GBs for a 70B model at long context); pages bound the table to
``max_context / P`` entries and the slack to ``P - 1`` rows per segment.

Row 0..P-1 (page 0) is never handed out: like SGLang's slot 0 it absorbs writes of padded tokens
and of segments this rank does not hold.

Ownership: ``active[r, l, h]`` (bool) says which segments request ``r`` has on this rank. Under a
FairKV plan a layer may hold fewer heads than ``num_kv_heads`` (the largest count over layers), and a
copied head's replica holds only the requests assigned to it; inactive segments stay empty (zero
length, no pages), give zero attention, and their decode writes land in page 0.
"""

from __future__ import annotations

import math

import torch


class RaggedPoolFull(RuntimeError):
    """Raised when an allocation finds no free page (admission should have prevented it)."""


class RaggedKVPool:
    """Paged per-(request, layer, KV head) segments; all tensors on ``device``.

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
        self.max_pages = math.ceil(max_context / page_size) + 1
        self.dtype = dtype
        self.device = torch.device(device)
        rows = num_pages * page_size
        self.k_rows = torch.zeros(rows, head_dim, dtype=dtype, device=self.device)
        self.v_rows = torch.zeros(rows, head_dim, dtype=dtype, device=self.device)
        self.seg_pages = torch.zeros(max_reqs, num_layers, num_kv_heads, self.max_pages,
                                     dtype=torch.int32, device=self.device)
        self.seg_len = torch.zeros(max_reqs, num_layers, num_kv_heads, dtype=torch.int64,
                                   device=self.device)
        self.active = torch.zeros(max_reqs, num_layers, num_kv_heads, dtype=torch.bool, device=self.device)
        self.clear()

    # ---- accounting -------------------------------------------------------------------------
    def clear(self) -> None:
        self.free_pages = torch.arange(1, self.num_pages, dtype=torch.int64, device=self.device)
        self.seg_len.zero_()
        self.active.zero_()

    def set_active(self, req_pool_idx: int, mask: torch.Tensor | None = None) -> None:
        """Which segments request ``req_pool_idx`` holds here: bool ``[num_layers, num_kv_heads]``
        (None: all). Set once before its first :meth:`extend`; :meth:`free` clears it."""
        if bool(self.seg_len[req_pool_idx].any()):
            raise AssertionError("set_active on a request that already holds segments")
        if mask is None:
            self.active[req_pool_idx] = True
        else:
            self.active[req_pool_idx] = mask.to(self.device, torch.bool)

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    def free_page_count(self) -> int:
        return int(self.free_pages.numel())

    def used_pages(self) -> int:
        return self.usable_pages - self.free_page_count()

    def used_tokens(self, req_pool_idx: int | None = None) -> int:
        """Sum of segment lengths (rows holding KV), for one request or all."""
        if req_pool_idx is None:
            return int(self.seg_len.sum())
        return int(self.seg_len[req_pool_idx].sum())

    def bytes_per_row(self) -> int:
        return 2 * self.head_dim * self.k_rows.element_size()

    # ---- allocation ---------------------------------------------------------------------------
    def _pop(self, n: int) -> torch.Tensor:
        if n > self.free_pages.numel():
            raise RaggedPoolFull(f"ragged KV pool: need {n} pages, {self.free_pages.numel()} free")
        out, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        return out

    def _push(self, pages: torch.Tensor) -> None:
        if pages.numel():
            self.free_pages = torch.cat([self.free_pages, pages.to(torch.int64)])

    def _pages_for(self, length: torch.Tensor) -> torch.Tensor:
        return (length + self.page_size - 1) // self.page_size

    def extend(self, req_pool_idx: torch.Tensor, new_len: torch.Tensor) -> None:
        """Grow every active segment of each request to ``new_len`` tokens (prefill chunk).

        ``req_pool_idx``, ``new_len``: int64 ``[b]``. Before compression all active segments of a
        request have the same length; the rows of the new positions are then written layer by layer.
        """
        if bool((new_len > (self.max_pages - 1) * self.page_size).any()):
            raise ValueError(f"sequence of {int(new_len.max())} tokens exceeds the pool's max context")
        for i, r in enumerate(req_pool_idx.tolist()):
            act = self.active[r]  # [L, H]
            n_act = int(act.sum())
            if n_act == 0:
                continue
            lens = self.seg_len[r][act]
            old = int(lens[0])
            if bool((lens != old).any()):
                raise AssertionError("extend on a request whose segments were already compressed")
            new = int(new_len[i])
            if new < old:
                raise ValueError("extend cannot shrink a segment")
            a, b = -(-old // self.page_size), -(-new // self.page_size)
            if b > a:
                pages = self._pop(n_act * (b - a)).view(n_act, b - a).to(torch.int32)
                sp = self.seg_pages[r]
                sp[act, a:b] = pages
            self.seg_len[r][act] = new

    def decode_pages_needed(self, req_pool_idx: torch.Tensor) -> int:
        """Pages the next :meth:`append` of these requests will take (segments at a page boundary)."""
        return int(((self.seg_len[req_pool_idx] % self.page_size == 0) & self.active[req_pool_idx]).sum())

    def append(self, req_pool_idx: torch.Tensor) -> torch.Tensor:
        """Add one token to every active segment of each request (a decode step).

        Returns int64 ``[b, num_layers, num_kv_heads]``: the row each new token's K/V goes to (a row
        of the reserved page 0 for inactive segments).
        """
        lens = self.seg_len[req_pool_idx]  # [b, L, H]
        act = self.active[req_pool_idx]
        if bool((lens // self.page_size >= self.max_pages).any()):
            raise ValueError("a segment would exceed the pool's max context")
        need = (lens % self.page_size == 0) & act
        n = int(need.sum())
        if n:
            pages = self._pop(n)
            b_i, l_i, h_i = need.nonzero(as_tuple=True)
            self.seg_pages[req_pool_idx[b_i], l_i, h_i, lens[b_i, l_i, h_i] // self.page_size] = \
                pages.to(torch.int32)
        page = self.seg_pages[req_pool_idx].gather(-1, (lens // self.page_size).unsqueeze(-1)).squeeze(-1)
        rows = torch.where(act, page.to(torch.int64) * self.page_size + lens % self.page_size, 0)
        self.seg_len[req_pool_idx] = lens + act.to(lens.dtype)
        return rows

    def free(self, req_pool_idx: int) -> int:
        """Return every page of one request; returns the number of pages freed."""
        lens = self.seg_len[req_pool_idx]  # [L, H]
        n_pages = self._pages_for(lens)
        self.active[req_pool_idx] = False
        if int(n_pages.sum()) == 0:
            return 0
        mask = torch.arange(self.max_pages, device=self.device) < n_pages.unsqueeze(-1)
        pages = self.seg_pages[req_pool_idx][mask]
        self._push(pages)
        self.seg_len[req_pool_idx] = 0
        return int(pages.numel())

    # ---- addressing ---------------------------------------------------------------------------
    def rows_of(self, req_pool_idx: int, layer: int, head: int, positions: torch.Tensor) -> torch.Tensor:
        """Rows of ``positions`` (int64 ``[n]``, < segment length) in one segment."""
        pages = self.seg_pages[req_pool_idx, layer, head].to(torch.int64)
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size

    def prefix_rows(self, req_pool_idx: int, layer: int, length: int) -> torch.Tensor:
        """Rows of positions ``[0, length)`` of every head of one (request, layer): ``[H, length]``."""
        t = torch.arange(length, device=self.device)
        pages = self.seg_pages[req_pool_idx, layer].to(torch.int64)  # [H, max_pages]
        return pages[:, t // self.page_size] * self.page_size + t % self.page_size

    def flat_segments(self, req_pool_idx: torch.Tensor, layer: int,
                      num_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR view of one layer's segments of a batch (first ``num_heads`` heads, default all),
        segment ``s = b * H + h``.

        Returns ``seg_indptr`` int32 ``[b*H + 1]`` and ``seg_rows`` int64 ``[nnz]`` (rows in order).
        """
        H = self.num_kv_heads if num_heads is None else num_heads
        lens = self.seg_len[req_pool_idx, layer, :H].reshape(-1)  # [S]
        pages = self.seg_pages[req_pool_idx, layer, :H].reshape(lens.numel(), -1).to(torch.int64)
        indptr = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(lens, 0, out=indptr[1:])
        nnz = int(indptr[-1])
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=self.device), lens,
                                      output_size=nnz)
        t = torch.arange(nnz, device=self.device) - indptr[seg]
        rows = pages[seg, t // self.page_size] * self.page_size + t % self.page_size
        return indptr.to(torch.int32), rows

    def compact(self, req_pool_idx: int, layer: int, kept: list[torch.Tensor],
                heads: list[int] | None = None) -> None:
        """Keep only ``kept[i]`` (sorted positions) of head ``heads[i]``'s segment (default: head
        ``i``); free the tail pages."""
        for h, pos in zip(range(len(kept)) if heads is None else heads, kept):
            old = int(self.seg_len[req_pool_idx, layer, h])
            n = int(pos.numel())
            if n == old:
                continue
            src = self.rows_of(req_pool_idx, layer, h, pos.to(self.device, torch.int64))
            dst = self.rows_of(req_pool_idx, layer, h, torch.arange(n, device=self.device))
            self.k_rows[dst] = self.k_rows[src]  # advanced indexing copies src before writing
            self.v_rows[dst] = self.v_rows[src]
            keep_p = math.ceil(n / self.page_size)
            old_p = math.ceil(old / self.page_size)
            self._push(self.seg_pages[req_pool_idx, layer, h, keep_p:old_p].clone())
            self.seg_len[req_pool_idx, layer, h] = n
