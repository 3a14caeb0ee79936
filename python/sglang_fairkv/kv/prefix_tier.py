"""The dense prefix tier's token ids: host bookkeeping, identical on every TP rank (pure numpy).

A prompt's *dense* KV (every layer and KV head, before compression) can be shared exactly by every
later prompt with the same prefix (it does not depend on what follows); its compressed KV cannot
(SnapKV-family scores use the prompt's last window). The tier holds dense KV per **tier token**: token
``t`` lives in block ``t // P`` at offset ``t % P``, and a block owns one page of the ragged pool per
(layer, KV head) this rank holds (:meth:`RaggedKVPool.tier_alloc`): the same pages as the segments, so
the tier is memory the admission can take back (LRU eviction) rather than a fixed split.

Each tier token has exactly one owner at a time: the request whose prefill computed it (until its
prompt is inserted into the radix tree) or one radix-tree node. A block is shared by the tokens of one
prefill chunk (a chunk starts a fresh block; its last block's unused offsets stay unused) and is
freed -- all its pages -- when its last live token is released. Decisions are taken from host values
that every rank sees in the same order, so the block ids (not the pages behind them) agree across
ranks and the TP group's ledger can price the tier on every rank.
"""

from __future__ import annotations

import numpy as np


class TierBlocks:
    """Block ids of the dense prefix tier and how many live tokens each holds.

    ``num_blocks``: the most blocks that can exist (the pool's pages over the pages one block takes on
    the tightest rank); ``page_size``: tokens per block (the pool's page size).
    """

    def __init__(self, num_blocks: int, page_size: int):
        if num_blocks < 1 or page_size < 1:
            raise ValueError(f"need >= 1 block and page size, got {num_blocks}, {page_size}")
        self.num_blocks = num_blocks
        self.page_size = page_size
        self.clear()

    def clear(self) -> None:
        """Every block free (the pool's pages are cleared by its owner)."""
        self._free = np.arange(self.num_blocks - 1, -1, -1, dtype=np.int64)  # a stack: 0, 1, 2 ... first
        self._n_free = self.num_blocks
        #: int64 [num_blocks]: live tokens in each block (0: free)
        self.live = np.zeros(self.num_blocks, dtype=np.int64)
        #: live tokens in all blocks (``live.sum()``, kept: the allocator reads it every scheduling pass)
        self.live_tokens = 0

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - self._n_free

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks a chunk of ``n_tokens`` new tokens takes (a chunk starts a fresh block)."""
        return -(-int(n_tokens) // self.page_size)

    def alloc(self, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Tier tokens for one chunk of ``n_tokens`` positions: returns ``(tokens int64 [n], new blocks
        int64 [k])`` (the caller gives each new block its pages). Raises when the blocks run out (the
        admission never lets that happen: the ledger prices every block)."""
        k = self.blocks_for(n_tokens)
        if k > self._n_free:
            raise RuntimeError(f"fairkv prefix tier: need {k} blocks, {self._n_free} free")
        blocks = self._free[self._n_free - k:self._n_free][::-1].copy()
        self._n_free -= k
        P = self.page_size
        tokens = (np.repeat(blocks, P) * P + np.tile(np.arange(P, dtype=np.int64), k))[:n_tokens]
        self.live[blocks] = 0
        np.add.at(self.live, tokens // P, 1)
        self.live_tokens += int(tokens.size)
        return tokens, blocks

    def release(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens whose owner drops them (an evicted node, a duplicate of the tree, an aborted prefill):
        returns the blocks that became free (int64 ``[k]``; the caller frees their pages)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not tokens.size:
            return tokens
        blocks = tokens // self.page_size
        np.subtract.at(self.live, blocks, 1)
        touched = np.unique(blocks)
        if (self.live[touched] < 0).any():
            raise RuntimeError("fairkv prefix tier: a tier token released twice")
        self.live_tokens -= int(tokens.size)
        freed = touched[self.live[touched] == 0]
        self._free[self._n_free:self._n_free + freed.size] = freed
        self._n_free += freed.size
        return freed
