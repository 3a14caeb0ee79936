"""Admission arithmetic of the compressed pool: what a request costs each TP rank, in pages.

Pure functions over host numpy / CPU torch (no SGLang): :class:`~sglang_fairkv.serving.prefill_budget.
FairKVPrefillBudget` speaks SGLang's ``PrefillBudget`` protocol and asks these for every number.

A request is charged per rank (its segments there; with Fair-Copying that depends on which replicas
serve it) and by its compressed size:

* **now** (this step's peak): a chunk that does not end the prompt grows every segment dense; the
  last chunk compresses as it goes (the backend takes each layer's pages when that layer runs and
  returns the tail right after compressing it), so its peak is the kept layers before the running
  one, that layer dense and the prefix of the layers after it
  (:func:`~sglang_fairkv.compress.footprint.last_chunk_peak`) -- the *transient reserve*;
* **total** (what it holds afterwards): a completing request its kept rows plus its decode rows per
  segment (:func:`~sglang_fairkv.compress.footprint.kept_pages`: exact at TP 1, a per-rank bound for
  AdaKV under a plan); a request whose prompt continues in later chunks the peak of its last chunk
  when the next chunk ends the prompt, else its whole prompt dense (earlier chunks stay dense until
  the last one: SnapKV / AdaKV score with the final window).

Both are net of the pages the request already holds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..compress import footprint
from ..compress.policy import CompressConfig


class Charge(NamedTuple):
    """int64 ``[tp]`` each, net of what the request holds now (``held``)."""

    now: torch.Tensor      # this step's peak
    total: torch.Tensor    # what it holds once its prompt is done (with its decode), or the bound above
    after: torch.Tensor    # what it holds when this step's forward ends
    held: torch.Tensor     # pages it holds now
    last: bool             # the chunk ends the prompt


def chunk_charge(cfg: CompressConfig, head_budgets: torch.Tensor | None, *, prompt_len: int, held_len: int,
                 extend: int, decode: int, max_new_tokens: int, owner: np.ndarray, tp: int, page_size: int,
                 chunk_size: int | None) -> Charge:
    """The charge of one prefill chunk of a request (see the module docstring).

    ``prompt_len``: the whole prompt (tokens); ``held_len``: the prefix its segments hold now;
    ``extend``: this chunk (``held_len + extend >= prompt_len``: the last chunk); ``decode``: the decode
    tokens SGLang reserves with this chunk (0 for a chunk that does not end the prompt);
    ``max_new_tokens``: the request's own remaining decode, reserved from its first chunk so nothing
    admitted meanwhile takes it; ``owner``: int ``[L, KV]``, the rank holding each segment (-1: none);
    ``chunk_size``: tokens of a pass's chunk (the next chunk ends the prompt when the rest fits), or
    None when unknown.
    """
    n, s, P = prompt_len, held_len, page_size
    own = np.asarray(owner, dtype=np.int64)
    held = footprint.dense_pages(s, own, tp, P)  # [tp, L]
    held_sum = held.sum(axis=1)
    kept = lambda extra: footprint.kept_pages(cfg, n, extra, own, tp, P, head_budgets)  # noqa: E731
    if s + extend < n:  # not the last chunk: dense now, the whole prompt dense until the last
        nxt = s + extend
        after = footprint.dense_pages(nxt, own, tp, P).sum(axis=1)
        if chunk_size is not None and n - nxt <= chunk_size:
            # the next chunk ends the prompt (SGLang gives a continuation a whole chunk): its peak from
            # this chunk's end, compressing as it goes
            peak = footprint.last_chunk_peak(kept(0), footprint.dense_pages(n, own, tp, P),
                                             footprint.dense_pages(nxt, own, tp, P))
        else:  # later chunks stay dense until the last: bounded by the whole prompt dense
            peak = footprint.dense_pages(n, own, tp, P).sum(axis=1)
        total = np.maximum(peak, kept(max(decode, max_new_tokens)).sum(axis=1))
        now = after
    else:
        kept0 = kept(0)
        after = kept0.sum(axis=1)
        now = footprint.last_chunk_peak(kept0, footprint.dense_pages(n, own, tp, P), held)
        total = kept(decode).sum(axis=1)
    net = lambda x: torch.from_numpy(np.asarray(x - held_sum, dtype=np.int64))  # noqa: E731
    return Charge(net(now), net(total), net(after), torch.from_numpy(held_sum), s + extend >= n)


def tier_chunk_charge(cfg: CompressConfig, head_budgets: torch.Tensor | None, *, prompt_len: int, held_len: int,
                      extend: int, decode: int, max_new_tokens: int, owner: np.ndarray, tp: int, page_size: int,
                      tier_pages_per_block: torch.Tensor) -> Charge:
    """The charge of one prefill chunk of a request whose prefill uses the dense prefix tier.

    Its dense KV goes into tier blocks (a chunk starts a fresh block; ``tier_pages_per_block`` int64
    ``[tp]``: pages one block takes on each rank, every head a rank holds in the plan, copies
    included), its segments stay empty until the last chunk, which fills them with the kept rows
    straight from the tier. A matched prefix (``held_len`` includes it) is the tree's and costs
    nothing. **now** = the chunk's blocks (+ the kept rows, last chunk); **total** = what it holds
    afterwards: its kept rows plus decode once its prompt is done -- the tier blocks then belong to the
    radix tree, evictable, so they are no charge -- and before that a bound: this chunk's and the rest of
    the prompt's blocks (one block of slack per later chunk start is covered by the ``+ 1``) plus the
    kept rows and decode. ``held`` is 0: the request's own earlier blocks are counted in the ledger's
    tier pages already."""
    n, s, P = prompt_len, held_len, page_size
    own = np.asarray(owner, dtype=np.int64)
    ppb = torch.as_tensor(tier_pages_per_block, dtype=torch.int64)
    kept = lambda extra: torch.from_numpy(  # noqa: E731
        np.asarray(footprint.kept_pages(cfg, n, extra, own, tp, P, head_budgets).sum(axis=1), dtype=np.int64))
    new = -(-int(extend) // P) * ppb
    zero = torch.zeros(tp, dtype=torch.int64)
    if s + extend < n:
        rest = (-(-(n - s - extend) // P) + 1) * ppb
        return Charge(new, new + rest + kept(max(decode, max_new_tokens)), new, zero, False)
    k0 = kept(0)
    return Charge(new + k0, kept(decode), new + k0, zero, True)


def roomiest_replicas(room: torch.Tensor, copied_ranks: list[np.ndarray], per_segment: int) -> np.ndarray:
    """Replicas chosen for room instead of shares: each copied head (in order) on the replica whose rank
    has the most pages left (``room``, int64 ``[tp]``, after the request's other segments), that rank's
    room then lowered by ``per_segment`` pages. Deterministic (ties to the lower-listed replica), so
    every rank picks the same. Returns int64 ``[copied heads]``: the replica index of each."""
    room = room.clone()
    chosen = np.empty(len(copied_ranks), dtype=np.int64)
    for i, ranks in enumerate(copied_ranks):
        j = int(np.argmax(room[torch.as_tensor(ranks)].numpy()))
        chosen[i] = j
        room[int(ranks[j])] -= per_segment
    return chosen


def pages_as_tokens(pages: torch.Tensor, rows_per_token: torch.Tensor, page_size: int) -> float:
    """``pages`` (int ``[tp]``) in SGLang's scalar token units: the most prompt tokens they are worth on
    any rank that holds heads (``rows_per_token[q] > 0``); 0.0 when no rank does."""
    held = rows_per_token > 0
    if not bool(held.any()):
        return 0.0
    return float((pages[held].to(torch.float64) * page_size / rows_per_token[held]).max())


def chunk_that_fits(*, held_len: int, rest: int, chunk_limit: int, pages_left: torch.Tensor,
                    segments: torch.Tensor, page_size: int) -> int:
    """Tokens of a chunk (that does not end the prompt) every rank has pages for: each rank's
    ``pages_left`` (int ``[tp]``) shared by its ``segments`` of the request (``[tp]``), counted from a
    prefix of ``held_len`` tokens; at most ``chunk_limit``, and short of the ``rest`` of the prompt (its
    last token then comes in a last chunk, which compresses). A chunk must progress: when nothing fits,
    ``chunk_limit`` (as SGLang does)."""
    held = segments > 0
    if not bool(held.any()):
        return chunk_limit
    pages_each = int((pages_left[held] // segments[held]).min())
    fit = (-(-held_len // page_size) + pages_each) * page_size - held_len
    available = min(chunk_limit, fit, rest - 1) if rest > 1 else min(chunk_limit, fit)
    return available if available > 0 else chunk_limit


def decode_pages_to_come(charged: np.ndarray, held: np.ndarray, fixed_length: np.ndarray,
                         new_token_ratio: float) -> torch.Tensor:
    """int64 ``[tp]``: pages each rank still owes requests past their prompt: what each was charged for
    its life (``charged`` ``[b, tp]``, kept + decode) minus what it holds (``held`` ``[b, tp]``), scaled
    like SGLang's running-request reservation (``new_token_ratio`` clipped to [0, 1], or 1 for a request
    that decodes all its tokens, ``fixed_length`` bool ``[b]``)."""
    tp = charged.shape[1] if charged.ndim == 2 else 0
    if charged.shape[0] == 0:
        return torch.zeros(tp, dtype=torch.int64)
    left = np.maximum(0, charged - held)
    ratio = np.where(fixed_length, 1.0, min(1.0, max(0.0, new_token_ratio)))
    return torch.from_numpy(np.ceil((left * ratio[:, None]).sum(axis=0)).astype(np.int64))


def admissible_when_empty(charged: np.ndarray, usable: np.ndarray) -> int | None:
    """Requests the empty pool would admit at a mix: ``usable`` pages per rank (``[tp]``) over the mean
    pages per rank the requests were charged (``charged`` ``[n, tp]``), the fullest rank deciding; None
    with no request or no charge."""
    if charged.shape[0] == 0:
        return None
    mean = charged.mean(axis=0)
    held = mean > 0
    if not held.any():
        return None
    return int(np.floor(np.asarray(usable)[held] / mean[held]).min())
