"""The dense prefix tier's part of :class:`~sglang_fairkv.kv.ragged_pool.RaggedKVPool`: block table, tier
rows, and filling a request's segments from the tier.

Blocks of ``P`` tier tokens, each block one page per (layer, KV head) held here, from the pool's free
stack (``tier_pages [blocks, L, H]``, entries of heads a layer does not hold point at page 0). A tier
token's row in layer ``l``, head ``h``: ``tier_pages[t // P, l, h] * P + t % P``.
"""

from __future__ import annotations

import numpy as np
import torch

_TIER = 3  # the tier table's index among RaggedKVPool's pending writes


class TierMixin:
    """Tier methods of the pool (its attributes: tables, host mirrors, free stack, ``_queue`` / ``_upload``)."""

    def enable_tier(self, num_blocks: int, layer_heads: list[int]) -> None:
        """Allocate the tier's block table ``[num_blocks, L, H]`` (int32, device + host mirror; its bytes
        are counted in the KV budget by the caller). ``layer_heads[l]``: KV heads this rank holds in
        layer ``l`` (a block takes one page per held (layer, head): :attr:`tier_pages_per_block`)."""
        shape = (num_blocks, self.num_layers, self.num_kv_heads)
        self.tier_pages = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.tier_pages_host = np.zeros(shape, dtype=np.int32)
        held = np.zeros((self.num_layers, self.num_kv_heads), dtype=np.bool_)
        for l, h in enumerate(layer_heads):
            held[l, :int(h)] = True
        self._tier_held = held
        self.tier_pages_per_block = int(held.sum())

    @staticmethod
    def tier_table_bytes(num_blocks: int, num_layers: int, num_kv_heads: int) -> int:
        return num_blocks * num_layers * num_kv_heads * 4

    def tier_alloc(self, blocks: np.ndarray) -> None:
        """Pages for new tier blocks (host ints ``[k]``): one per held (layer, head) of each; the table
        writes are queued (the step's :meth:`flush` sends them)."""
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if not blocks.size:
            return
        n = self.tier_pages_per_block
        pages = self._pop(n * blocks.size).reshape(blocks.size, n)
        l_i, h_i = np.nonzero(self._tier_held)
        self.tier_pages_host[blocks[:, None], l_i[None, :], h_i[None, :]] = pages
        L, H = self.num_layers, self.num_kv_heads
        flat = (blocks[:, None] * L + l_i[None, :]) * H + h_i[None, :]
        self._queue(_TIER, flat, pages)
        self.tier_used_pages += int(pages.size)

    def tier_free(self, blocks: np.ndarray) -> None:
        """Return the pages of freed tier blocks (host ints ``[k]``) through the limbo (a launched step may
        still read them). Their device table entries go stale; nothing reads a block nobody owns."""
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if not blocks.size:
            return
        l_i, h_i = np.nonzero(self._tier_held)
        pages = self.tier_pages_host[blocks[:, None], l_i[None, :], h_i[None, :]]
        self._release(pages)
        self.tier_pages_host[blocks] = 0
        self.tier_used_pages -= int(pages.size)

    def _tier_page_rows(self, tok: torch.Tensor, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """int64 rows of tier tokens ``tok`` in ``layer`` for KV heads ``heads`` (int64, broadcastable to one
        shape): ``tier_pages[tok // P, layer, head] * P + tok % P``, one flat gather of the tier table."""
        P = self.page_size
        page = self.tier_pages.view(-1)[((tok // P) * self.num_layers + layer) * self.num_kv_heads + heads]
        return page.to(torch.int64) * P + tok % P

    def tier_rows(self, tokens: torch.Tensor, layer: int, num_heads: int) -> torch.Tensor:
        """int64 ``[b, num_heads, T]``: rows of tier ``tokens`` (int64 ``[b, T]`` or ``[T]``, device) in
        ``layer`` for heads ``h < num_heads`` (a flat gather of the tier table, no host read)."""
        tok = tokens if tokens.dim() == 2 else tokens[None, :]
        return self._tier_page_rows(tok[:, None, :], layer, torch.arange(num_heads, device=tok.device)[None, :, None])

    def tier_rows_tokens(self, tokens: torch.Tensor, layer: int, num_heads: int) -> torch.Tensor:
        """int64 ``[n, num_heads]``: rows of tier ``tokens`` (int64 ``[n]``, device) in ``layer``, token-major
        (the packed prefill layout)."""
        return self._tier_page_rows(tokens[:, None], layer, torch.arange(num_heads, device=tokens.device)[None, :])

    def fill_from_tier(self, req_pool_idx: int, layer: int, kept: list[torch.Tensor], heads: list[int],
                       tokens: torch.Tensor) -> None:
        """Fill the empty segments ``(req_pool_idx, layer, heads[i])`` with the rows of ``kept[i]`` (sorted
        prompt positions, device) read from the tier, where position ``p`` is tier token ``tokens[p]``
        (int64 ``[seq]``, device): a prefill that used the tier compresses straight into the segments.
        Pages from the free stack (host); one gather/scatter of K and of V for all heads; destination
        rows and head ids in one small upload (as :meth:`compact`)."""
        r, P = int(req_pool_idx), self.page_size
        counts = np.asarray([int(k.numel()) for k in kept], dtype=np.int64)
        h_arr = np.asarray(heads, dtype=np.int64)
        if (self.seg_len_host[r, layer, h_arr] != 0).any():
            raise AssertionError("fill_from_tier on a segment that already holds rows")
        self._grow(np.full(h_arr.size, r, dtype=np.int64), np.full(h_arr.size, layer, dtype=np.int64), h_arr, counts)
        n_tot = int(counts.sum())
        if not n_tot:
            return
        t = np.concatenate([np.arange(n) for n in counts])
        hh = np.repeat(h_arr, counts)
        dst = self.seg_pages_host[r, layer, hh, t // P].astype(np.int64) * P + t % P
        host = self._upload(np.concatenate([hh, dst]))
        hcol, dst_rows = host[:n_tot], host[n_tot:]
        pos = torch.cat([k.to(self.device, torch.int64) for k in kept])
        tok = tokens[pos]
        src = self._tier_page_rows(tok, layer, hcol)
        self.copy_rows(dst_rows, src)

