"""Move live KV segments between the ranks of a TP group (a migrate plan switch, issue 34).

A switch from plan A to plan B while requests decode changes, per layer, which KV heads a rank holds.
:func:`~sglang_fairkv.placement.transition.plan_transition` (pure, the same on every rank) says which
segment ``(request, layer, head)`` goes from which rank to which, in rounds that never run a rank out of
pages. This module does it on one rank's :class:`~.ragged_pool.RaggedKVPool`, called on every rank of
the group at the same step boundary (no forward in flight: the caller synchronised the device):

1. **Rounds.** Per round, each rank gathers the rows (K and V, as raw bytes: fp8 rows travel unchanged)
   of the segments it sends, one buffer per destination, in move order; one batched P2P exchange
   (:func:`p2p_exchange`: NCCL on GPU, gloo on CPU, chunked); receivers take pages from their free stack
   and scatter the rows in; senders give the segments' pages back. A round's pages on the destination
   are taken before its sources free theirs, as the schedule assumed.
2. **Columns.** A rank's page table columns are its local heads in sorted order; where a layer's heads
   change, the columns of the heads that stay are permuted to B's slots, received segments fill the
   slots of the heads gained, and ``active`` is rewritten from B's owners.
3. **One upload** of every table entry that changed (the pool's queued writes, one flush).

Rows are copied bit-exactly in position order, so a moved segment reads as it did. Everything on the host
is numpy over the transition's lists (a switch, not a step: no per-step path runs this).
"""

from __future__ import annotations

import numpy as np
import torch

from .ragged_pool import _ACTIVE, _LEN, _PAGES

#: bytes per P2P message at most (EPLB chunks its batches too: huge NCCL batches hang)
CHUNK_BYTES = 256 << 20


def p2p_exchange(sends: dict[int, torch.Tensor], recv_numel: dict[int, int], *, dtype: torch.dtype,
                 device: torch.device, group, ranks: list[int], chunk_bytes: int = CHUNK_BYTES
                 ) -> dict[int, torch.Tensor]:
    """Send ``sends[q]`` (1-D, ``dtype``) to group rank ``q`` and receive ``recv_numel[p]`` elements from
    each ``p``, in one ``batch_isend_irecv`` per chunk of at most ``chunk_bytes`` (every pair's messages
    chunked alike on both sides: the sizes are known to both). ``ranks``: the group's global ranks."""
    import torch.distributed as dist

    esize = torch.empty(0, dtype=dtype).element_size()
    step = max(1, chunk_bytes // esize)
    out = {p: torch.empty(int(n), dtype=dtype, device=device) for p, n in recv_numel.items() if n}
    ops_by_chunk: list[list] = []
    for q, buf in sorted(sends.items()):
        for c, s in enumerate(range(0, buf.numel(), step)):
            while len(ops_by_chunk) <= c:
                ops_by_chunk.append([])
            ops_by_chunk[c].append(dist.P2POp(dist.isend, buf[s:s + step].contiguous(), ranks[q], group))
    for p, buf in sorted(out.items()):
        for c, s in enumerate(range(0, buf.numel(), step)):
            while len(ops_by_chunk) <= c:
                ops_by_chunk.append([])
            ops_by_chunk[c].append(dist.P2POp(dist.irecv, buf[s:s + step], ranks[p], group))
    for ops in ops_by_chunk:
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
    return out


def _raw(rows: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` rows as bytes ``[N, D * element_size]`` (uint8: fp8 and bf16 rows travel alike)."""
    return rows.view(torch.uint8).view(rows.shape[0], -1)


def _positions(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of ``n`` rows (int64 ``[k]``), laid end to end: the segment of each row and its position
    in it (int64 ``[sum(n)]`` each)."""
    seg = np.repeat(np.arange(n.size), n)
    return seg, np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)


def _moves_array(ms, req_idx: np.ndarray, slot) -> tuple[np.ndarray, ...]:
    """Moves as arrays: ``req_pool_idx``, layer, global head, the head's table slot (``slot[l][h]``), rows."""
    r = np.array([req_idx[m.req] for m in ms], dtype=np.int64)
    l = np.array([m.layer for m in ms], dtype=np.int64)
    h = np.array([m.head for m in ms], dtype=np.int64)
    s = np.array([slot[m.layer][m.head] for m in ms], dtype=np.int64)
    return r, l, h, s, np.array([m.rows for m in ms], dtype=np.int64)


def move_segments(pool, *, moves, rounds, req_idx: np.ndarray, owner_b: np.ndarray, rank: int,
                  heads_a: list[list[int]], heads_b: list[list[int]], exchange) -> dict:
    """Carry out a transition's segment moves on this rank's ``pool`` and re-lay its tables for plan B.

    ``moves`` / ``rounds``: the transition's (:class:`~sglang_fairkv.placement.transition.Move`, indices per
    round); ``req_idx`` int64 ``[R]``: the ``req_pool_idx`` of the transition's request ``i``; ``owner_b``
    int64 ``[R, L, KV]``: every live segment's rank under B; ``heads_a`` / ``heads_b``: this rank's global KV
    heads per layer (sorted: the table columns) under A and B; ``exchange(sends, recv_numel)``: the P2P
    exchange of uint8 buffers (:func:`p2p_exchange` bound to the group). Host work is vectorised over the
    moves of a round (no per-segment device call: one gather per destination, one scatter per source).
    Returns counts (segments and rows sent and received here, bytes)."""
    P, L, H, MP = pool.page_size, pool.num_layers, pool.num_kv_heads, pool.max_pages
    if any(len(h) > H for h in heads_b):
        raise ValueError(f"plan B puts {max(len(h) for h in heads_b)} KV heads of a layer here; the pool has {H} slots")
    slot_a = [{h: i for i, h in enumerate(hs)} for hs in heads_a]
    slot_b = [{h: i for i, h in enumerate(hs)} for hs in heads_b]
    pool.flush()  # nothing pending may be applied after the tables are re-laid
    pool._reclaim(before_step=pool.step + 1, wait=True)  # the device is synchronised: limbo pages are free
    k_raw, v_raw = _raw(pool.k_rows), _raw(pool.v_rows)
    width = k_raw.shape[1]
    incoming: list[tuple[np.ndarray, ...]] = []  # per source and round: (r, l, h, rows, pages, first page)
    stats = {"segments_sent": 0, "segments_received": 0, "rows_sent": 0, "rows_received": 0, "bytes_sent": 0,
             "bytes_received": 0}
    for rnd in rounds:
        mine_out: dict[int, list] = {}
        mine_in: dict[int, list] = {}
        for i in rnd:  # move order: the same on both ends of every pair
            m = moves[i]
            if m.src == rank:
                mine_out.setdefault(m.dst, []).append(m)
            if m.dst == rank:
                mine_in.setdefault(m.src, []).append(m)
        sends, out_arrays = {}, []
        for dst, ms in mine_out.items():
            r, l, _, s, n = _moves_array(ms, req_idx, slot_a)
            seg, pos = _positions(n)
            rows = pool.seg_pages_host[r[seg], l[seg], s[seg], pos // P].astype(np.int64) * P + pos % P
            idx = torch.from_numpy(rows).to(pool.device)
            sends[dst] = torch.cat([k_raw.index_select(0, idx), v_raw.index_select(0, idx)], dim=1).reshape(-1)
            stats["bytes_sent"] += int(sends[dst].numel())
            out_arrays.append((r, l, s, n))
        recv_numel = {src: sum(m.rows for m in ms) * 2 * width for src, ms in mine_in.items()}
        got = exchange(sends, recv_numel)
        stats["bytes_received"] += int(sum(recv_numel.values()))
        for src, ms in sorted(mine_in.items()):  # pages for every incoming segment before any source frees
            r, l, h, _, n = _moves_array(ms, req_idx, slot_b)
            n_pages = -(-n // P)
            pages = pool._pop(int(n_pages.sum()))
            first = np.cumsum(n_pages) - n_pages
            seg, pos = _positions(n)
            rows = torch.from_numpy(pages[first[seg] + pos // P].astype(np.int64) * P + pos % P).to(pool.device)
            data = got[src].view(-1, 2 * width)
            k_raw.index_copy_(0, rows, data[:, :width])
            v_raw.index_copy_(0, rows, data[:, width:])
            incoming.append((r, l, h, n, pages, first))
            stats["segments_received"] += len(ms)
            stats["rows_received"] += int(n.sum())
        for r, l, s, n in out_arrays:
            n_pages = -(-pool.seg_len_host[r, l, s] // P)
            seg, j = _positions(n_pages)
            pool._push(pool.seg_pages_host[r[seg], l[seg], s[seg], j])
            pool.seg_len_host[r, l, s] = 0
            pool.active_host[r, l, s] = False
            stats["segments_sent"] += int(r.size)
            stats["rows_sent"] += int(n.sum())
    # the columns of the layers whose heads change here: heads that stay move to B's slots (the live
    # requests' rows only: every other row holds no segment)
    live = np.asarray(req_idx, dtype=np.int64)
    changed = [l for l in range(L) if list(heads_a[l]) != list(heads_b[l])]
    for l in changed:
        keep = [(sb, slot_a[l][h]) for h, sb in slot_b[l].items() if h in slot_a[l]]
        src = np.array([sa for _, sa in keep], dtype=np.int64)
        dst = np.array([sb for sb, _ in keep], dtype=np.int64)
        pages = pool.seg_pages_host[live, l][:, src]  # [R, kept, MP] (a copy: fancy indexing)
        lens = pool.seg_len_host[live, l][:, src]
        pool.seg_pages_host[live, l] = 0
        pool.seg_len_host[live, l] = 0
        if keep:
            pool.seg_pages_host[live[:, None], l, dst[None, :]] = pages
            pool.seg_len_host[live[:, None], l, dst[None, :]] = lens
    for r, l, h, n, pages, first in incoming:
        s = np.array([slot_b[a][b] for a, b in zip(l.tolist(), h.tolist())], dtype=np.int64)
        if pool.seg_len_host[r, l, s].any():
            raise AssertionError("fairkv migrate: a segment received into a non-empty slot")
        n_pages = -(-n // P)
        seg, j = _positions(n_pages)
        pool.seg_pages_host[r[seg], l[seg], s[seg], j] = pages[first[seg] + j]
        pool.seg_len_host[r, l, s] = n
    # active: what B's owners give this rank (every segment of every live request, as admission sets it)
    act = np.zeros((live.size, L, H), dtype=np.bool_)
    for l in range(L):
        hs = heads_b[l]
        if hs:
            act[:, l, :len(hs)] = owner_b[:, l, hs] == rank
    held_wrong = (pool.seg_len_host[live] > 0) & ~act
    if held_wrong.any():
        raise AssertionError(f"fairkv migrate: {int(held_wrong.sum())} segments left on a rank B does not give them")
    pool.active_host[live] = act
    # one upload: every entry of the re-laid layers for the live requests, and the received segments
    touched_l = sorted(set(changed).union(*(set(x[1].tolist()) for x in incoming)))
    if live.size and touched_l:
        lt = np.asarray(touched_l, dtype=np.int64)
        rr, ll, hh = np.meshgrid(live, lt, np.arange(H), indexing="ij")
        seg = ((rr * L + ll) * H + hh).reshape(-1)
        pool._queue(_LEN, seg, pool.seg_len_host[rr, ll, hh].reshape(-1))
        n_pages = -(-pool.seg_len_host[rr, ll, hh].reshape(-1) // P)
        who = np.repeat(np.arange(seg.size), n_pages)
        slot = np.arange(int(n_pages.sum())) - np.repeat(np.cumsum(n_pages) - n_pages, n_pages)
        pool._queue(_PAGES, seg[who] * MP + slot,
                    pool.seg_pages_host.reshape(-1, MP)[seg[who], slot])
    if live.size:  # every live segment's flag (B's owners), whatever layer
        seg = (live[:, None] * (L * H) + np.arange(L * H)).reshape(-1)
        pool._queue(_ACTIVE, seg, act.reshape(-1))
    pool.flush()
    return stats


__all__ = ["CHUNK_BYTES", "move_segments", "p2p_exchange"]
