"""Every rank's KV pages, known on every rank without talking: the TP group's admission ledger.

SGLang runs one scheduler per TP rank and relies on all of them taking the same decisions (admit,
retract, evict) from their own state. Under a FairKV plan the ranks' pools fill differently (different
heads, different kept counts, replicas holding different requests), so each rank's own free space would
make them disagree. Instead every rank keeps this ledger: the length of **every** segment of the model
(all layers, all KV heads, ``[max_reqs, L, KV]``) and the rank that holds it. It changes only through
events every rank sees in the same order -- admission (owner per segment from the plan and
:class:`~sglang_fairkv.placement.replicas.ReplicaAssigner`), prefill chunks, the kept counts after
compression (exchanged per layer, see the backend), decode steps, release -- so the page counts it
derives per rank are identical everywhere and equal each rank's real pool (checked at idle).

Pages of a segment of ``n`` tokens: ``ceil(n / P)``, as in :class:`~sglang_fairkv.kv.ragged_pool.RaggedKVPool`.

Admission is per rank (:mod:`~sglang_fairkv.kv.admission`, asked by the prefill budget): a request is charged
on each rank exactly the pages of the segments it will hold there (:meth:`GroupLedger.request_pages`,
its replicas chosen before admission). The scalar SGLang also wants (``available_size``,
``max_total_num_tokens``) is in *expected* token equivalents: free pages over the rows a typical
request takes per token on that rank (a copied head counted at its share), the smallest over ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from ..placement.balance import busy_rate, layer_balance
from .prefix_tier import TierBlocks


class GroupLedger:
    """Segment lengths and holders of the whole TP group, identical on every rank (CPU tensors).

    ``length``: int64 ``[max_reqs, L, KV]`` tokens in each segment; ``owner``: int64 same shape, the
    rank holding it (-1: request not admitted). ``rows_per_token[q]``: float64, the rows rank ``q``
    takes per prompt token of a typical request (its heads summed over layers, a copied head at its
    share, :meth:`RankPlan.expected_rows_per_token`) -- the price of the scalar capacity.
    """

    def __init__(self, *, tp: int, max_reqs: int, num_layers: int, num_kv_heads: int, page_size: int,
                 usable_pages: int | list[int], rows_per_token: np.ndarray):
        self.tp = tp
        self.page_size = page_size
        #: int64 ``[tp]``: each rank's usable pages (they differ when the plan gives ranks different head
        #: counts: the page tables come out of the same KV bytes), identical on every rank
        self.usable = torch.as_tensor(usable_pages, dtype=torch.int64).expand(tp).clone()
        self.rows_per_token = torch.as_tensor(np.asarray(rows_per_token, dtype=np.float64))
        self.length = torch.zeros(max_reqs, num_layers, num_kv_heads, dtype=torch.int64)
        self.owner = torch.full((max_reqs, num_layers, num_kv_heads), -1, dtype=torch.int64)
        #: the dense prefix tier: int64 ``[tp]`` pages one tier block takes on each rank (0: no tier); the
        #: blocks alive are the tier's own count (the same ids on every rank, :meth:`attach_tier`)
        self.tier_pages_per_block = torch.zeros(tp, dtype=torch.int64)
        self._tier: TierBlocks | None = None

    def attach_tier(self, tier: TierBlocks, pages_per_block) -> None:
        """Price the dense prefix tier's blocks: ``pages_per_block`` int ``[tp]`` (every head each rank
        holds in the plan, copies included, summed over layers)."""
        self._tier = tier
        self.tier_pages_per_block = torch.as_tensor(pages_per_block, dtype=torch.int64).clone()

    @property
    def tier_blocks(self) -> int:
        """Tier blocks alive (0 without a tier)."""
        return 0 if self._tier is None else self._tier.blocks_used

    @property
    def usable_pages(self) -> int:
        """The smallest rank's usable pages (a scalar for callers that assume equal ranks)."""
        return int(self.usable.min())

    # ---- events (same order on every rank) ------------------------------------------------------
    def admit(self, req_pool_idx: int, owner: np.ndarray | torch.Tensor) -> None:
        """``owner``: int ``[L, KV]``, the rank holding each segment of this request."""
        self.owner[req_pool_idx] = torch.as_tensor(np.asarray(owner), dtype=torch.int64)
        self.length[req_pool_idx] = 0

    def extend(self, req_pool_idx: list[int], new_len: list[int]) -> None:
        for r, n in zip(req_pool_idx, new_len):
            self.length[r] = n

    def set_kept(self, req_pool_idx: int, layer: int, counts: torch.Tensor) -> None:
        """Kept tokens of every KV head of one layer after compression, host int ``[KV]`` (the ledger is
        host bookkeeping: a device tensor here would be a hidden sync)."""
        if counts.device.type != "cpu":
            raise TypeError("GroupLedger.set_kept takes host counts (read the exchange once, then pass it)")
        self.length[req_pool_idx, layer] = counts.to(torch.int64)

    def append(self, req_pool_idx) -> None:
        """A decode step of these requests (host ints ``[b]``: never a device tensor)."""
        idx = torch.from_numpy(np.asarray(req_pool_idx, dtype=np.int64))
        self.length[idx] += 1

    def release(self, req_pool_idx: int) -> None:
        self.length[req_pool_idx] = 0
        self.owner[req_pool_idx] = -1

    # ---- queries ----------------------------------------------------------------------------------
    def _by_key_and_rank(self, values: torch.Tensor, owner: torch.Tensor, key: torch.Tensor | int,
                         num_keys: int) -> torch.Tensor:
        """int64 ``[num_keys, tp]``: ``values`` of the held segments (``owner >= 0``) summed per ``key``
        (same shape as ``owner``, or a scalar) and holding rank -- one bincount."""
        held = owner >= 0
        slot = torch.as_tensor(key).expand_as(owner) * self.tp + owner.clamp_min(0)
        return torch.bincount(slot[held], weights=values[held].to(torch.float64),
                              minlength=num_keys * self.tp).to(torch.int64).view(num_keys, self.tp)

    def _by_rank(self, values: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        return self._by_key_and_rank(values, owner, 0, 1)[0]

    def rows_used(self) -> torch.Tensor:
        """int64 ``[tp]``: KV rows (tokens x heads) in use on each rank."""
        return self._by_rank(self.length, self.owner)

    def pages_used(self) -> torch.Tensor:
        """int64 ``[tp]``: pages in use on each rank (segments and prefix-tier blocks)."""
        return self.segment_pages_used() + self.tier_pages()

    def segment_pages_used(self) -> torch.Tensor:
        """int64 ``[tp]``: pages the requests' segments hold on each rank."""
        return self._by_rank((self.length + self.page_size - 1) // self.page_size, self.owner)

    def tier_pages(self, blocks: int | None = None) -> torch.Tensor:
        """int64 ``[tp]``: pages ``blocks`` tier blocks (default: those alive) take on each rank."""
        return self.tier_pages_per_block * (self.tier_blocks if blocks is None else int(blocks))

    def pages_free(self) -> torch.Tensor:
        return self.usable - self.pages_used()

    def tokens_for(self, pages: torch.Tensor) -> int:
        """Prompt tokens of typical requests that ``pages [tp]`` free pages per rank hold on every
        rank (min over ranks; a rank holding no head never limits)."""
        held = self.rows_per_token > 0
        if not bool(held.any()):
            return 0
        return int(torch.floor(pages[held].to(torch.float64) * self.page_size / self.rows_per_token[held]).min())

    def request_pages(self, owner: torch.Tensor | np.ndarray, start: torch.Tensor | int, tokens: int) -> torch.Tensor:
        """int64 ``[tp]``: pages each rank must add when every segment of one request (``owner``
        ``[L, KV]``, -1 entries ignored) grows from ``start`` tokens (``[L, KV]`` or a scalar) by
        ``tokens``."""
        own = torch.as_tensor(np.asarray(owner), dtype=torch.int64)
        start = torch.as_tensor(start, dtype=torch.int64).expand(own.shape)
        P = self.page_size
        grow = (start + tokens + P - 1) // P - (start + P - 1) // P
        return self._by_rank(grow, own)

    def pages_per_request(self, req_pool_idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """int64 ``[b, tp]``: pages each of these requests (host ints ``[b]``) holds on each rank."""
        idx = torch.as_tensor(np.asarray(req_pool_idx), dtype=torch.int64)
        own, pages = self.owner[idx], (self.length[idx] + self.page_size - 1) // self.page_size
        return self._by_key_and_rank(pages, own, torch.arange(idx.numel()).view(-1, 1, 1), idx.numel())

    def rows_where(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """int64 ``[tp]``: KV rows each rank holds for the requests selected by ``mask`` (bool ``[max_reqs]``)."""
        sel = torch.as_tensor(np.asarray(mask), dtype=torch.bool)[:, None, None]
        return self._by_rank(self.length * sel, self.owner)

    def segments_per_rank(self, owner: torch.Tensor | np.ndarray) -> torch.Tensor:
        """int64 ``[tp]``: segments of one request (``owner [L, KV]``) each rank holds."""
        own = torch.as_tensor(np.asarray(owner), dtype=torch.int64)
        return self._by_rank(torch.ones_like(own), own)

    def token_capacity_free(self) -> int:
        """Prompt tokens every rank can still take (the smallest over ranks, in token equivalents)."""
        return self.tokens_for(self.pages_free())

    def capacity_when_empty(self) -> int:
        """:meth:`token_capacity_free` of the empty group: SGLang's ``max_total_num_tokens`` under the plan."""
        return self.tokens_for(self.usable)

    def decode_pages_needed(self, req_pool_idx: list[int]) -> torch.Tensor:
        """int64 ``[tp]``: pages each rank's next decode step of these requests takes."""
        idx = torch.as_tensor(req_pool_idx, dtype=torch.int64)
        lens, own = self.length[idx], self.owner[idx]
        at_boundary = (lens % self.page_size == 0).to(torch.int64)
        return self._by_rank(at_boundary, own)

    def decode_fits(self, req_pool_idx: list[int]) -> bool:
        return bool((self.decode_pages_needed(req_pool_idx) <= self.pages_free()).all())

    def layer_loads(self, requests: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """int64 ``[tp, L]``: the KV rows each rank reads in each layer of a decode step of every
        admitted request (or of ``requests``: host indices ``[b]``, e.g. a decode batch -- only those
        rows are read), a copied head's segment counted on the replica rank that holds it for that
        request. Every layer ends in an all-reduce, so a step costs the sum over layers of the slowest
        rank: this is the load FairKV balances."""
        length, owner = self.length, self.owner
        if requests is not None:
            idx = torch.as_tensor(np.asarray(requests, dtype=np.int64))
            length, owner = length[idx], owner[idx]
        L = length.shape[1]
        return self._by_key_and_rank(length, owner, torch.arange(L).view(1, L, 1), L).T.contiguous()

    def layer_balance(self, loads: torch.Tensor | None = None) -> torch.Tensor:
        """float64 ``[L]``: per layer, mean over ranks / max over ranks of :meth:`layer_loads` (1.0 for
        a layer nobody reads); ``loads``: those loads when the caller has them already."""
        return torch.from_numpy(layer_balance(self.layer_loads() if loads is None else loads))

    def attention_busy_rate(self, loads: torch.Tensor | None = None) -> float:
        """The attention (time) balance of a decode step of the requests held
        (:func:`~sglang_fairkv.placement.balance.busy_rate` of :meth:`layer_loads`; 1.0 when empty)."""
        return busy_rate(self.layer_loads() if loads is None else loads)

    def memory_busy_rate(self) -> float:
        """The memory balance: :func:`~sglang_fairkv.placement.balance.busy_rate` of the KV rows each rank
        holds over all layers (1.0 when empty)."""
        return busy_rate(self.rows_used())
