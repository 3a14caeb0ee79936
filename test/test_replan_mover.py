"""The migrate switch's data path on real process groups (gloo, TP 2 and 3), as SGLang's EPLB updater test
moves experts: KV segments (``kv/segment_mover.py``) and weight slices (``model/reslice.exchange_attention``)
between ranks, driven by the same :func:`~sglang_fairkv.serving.plan_switch.migrate_state` the server runs.

Each rank builds the real pool, ledger, request table and assigner, and a model of FairKVAttention layers
loaded from a random checkpoint. Per random pair of plans: requests admitted under A with ragged kept
lengths (the ledger's, the same on every rank), every row of every held segment a *canary* (its bytes
encode request, layer, global head and position, K and V apart); A -> B -> A while the requests stay.
After each switch, on every rank: every live segment is held by exactly its owner under the new plan,
with its rows' canaries in position order; the device tables equal their host mirrors; the ledger equals
the pool and is the same on every rank; the attention weights equal a fresh load under the new plan.
After release: no page used, every page once in the free stack. One pair also runs fp8 rows (bytes move).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

L, KV, Q, D, HID, P = 3, 4, 8, 8, 16, 4
PAIRS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_plan(rng: random.Random, tp: int, copies: bool = True):
    from sglang_fairkv.placement.schema import Plan

    layers = []
    for _ in range(L):
        layer = []
        for _ in range(KV):
            ranks = rng.sample(range(tp), rng.choice([1, 1, 2] if copies else [1]))
            w = [rng.random() + 0.1 for _ in ranks]
            reps = [(r, x / sum(w)) for r, x in zip(ranks, w)]
            if len(reps) > 1:
                reps[-1] = (reps[-1][0], 1.0 - sum(s for _, s in reps[:-1]))
            layer.append(reps)
        layers.append(layer)
    return Plan(model="mover", tp=tp, num_kv_heads=KV, strategy="fairkv", cost_model={"c_head": 0, "c_token": 1},
                layers=layers, num_q_heads=Q)


def _checkpoint():
    g = torch.Generator().manual_seed(7)
    return {l: {"q": torch.randn(Q * D, HID, generator=g), "k": torch.randn(KV * D, HID, generator=g),
                "v": torch.randn(KV * D, HID, generator=g), "o": torch.randn(HID, Q * D, generator=g),
                "qb": torch.randn(Q * D, generator=g), "kb": torch.randn(KV * D, generator=g),
                "vb": torch.randn(KV * D, generator=g), "ob": torch.randn(HID, generator=g)} for l in range(L)}


def _attention(l: int, heads: list[int], rank: int, ck):
    from sglang_fairkv.model.heads import AttentionFlavor, FairKVAttention

    a = FairKVAttention(hidden_size=HID, num_heads=Q, num_kv_heads=KV, head_dim=D, layer_id=l, heads=heads,
                        rank=rank, rotary_emb=torch.nn.Identity(), flavor=AttentionFlavor(qkv_bias=True, o_bias=True))
    c = ck[l]
    for s in "qkv":
        a.qkv_proj.load(a.qkv_proj.weight, c[s], s)
        a.qkv_proj.load(a.qkv_proj.bias, c[s + "b"], s)
    a.o_proj.load(a.o_proj.weight, c["o"])
    a.o_proj.load(a.o_proj.bias, c["ob"])
    return a


class _Model(torch.nn.Module):
    def __init__(self, heads_per_layer, rank, ck):
        super().__init__()
        inner = torch.nn.Module()
        inner.layers = torch.nn.ModuleList()
        for l, heads in enumerate(heads_per_layer):
            layer = torch.nn.Module()
            layer.self_attn = _attention(l, heads, rank, ck)
            inner.layers.append(layer)
        self.model = inner


def _segment_rows(pool, r: int, l: int, slot: int, n: int) -> np.ndarray:
    """int64 ``[n]``: rows of positions ``0..n-1`` of segment ``(r, l, slot)``, one position at a time from
    the host page table (the test's own addressing, not the mover's)."""
    return np.array([int(pool.seg_pages_host[r, l, slot, t // P]) * P + t % P for t in range(n)], dtype=np.int64)


def _canary(r: int, l: int, h: int, pos: np.ndarray, width: int, kind: int) -> torch.Tensor:
    """uint8 ``[n, width]``: request, layer, head, position (2 bytes), K/V marker, then a pattern."""
    n = pos.size
    out = np.zeros((n, width), dtype=np.uint8)
    out[:, 0], out[:, 1], out[:, 2] = r, l, h
    out[:, 3], out[:, 4] = pos & 255, pos >> 8
    out[:, 5] = kind
    out[:, 6:] = (np.arange(width - 6)[None, :] * 13 + pos[:, None] + 7 * kind) % 256
    return torch.from_numpy(out)


def _check(state, model, plan, rank, ck, tp):
    """Everything the module docstring promises after a switch to ``plan`` (this rank's share)."""
    import torch.distributed as dist

    from sglang_fairkv.kv.segment_mover import _raw
    from sglang_fairkv.placement.runtime import RankPlan

    pool, ledger, reqs = state.pool, state.ledger, state.requests
    rp = RankPlan(plan, rank, Q)
    assert state.rank_plan.local_heads == rp.local_heads
    width = _raw(pool.k_rows).shape[1]
    live = reqs.admitted_indices()
    for r in live.tolist():
        for l in range(L):
            heads = rp.local_heads[l]
            for h in range(KV):
                owner = int(ledger.owner[r, l, h])
                assert owner in {q for q, _ in plan.layers[l][h]}, (r, l, h, owner)  # a replica of h under plan
                if owner != rank:
                    continue
                s = heads.index(h)
                n = int(ledger.length[r, l, h])
                assert pool.active_host[r, l, s] and pool.seg_len_host[r, l, s] == n
                rows = torch.from_numpy(_segment_rows(pool, r, l, s, n))
                pos = np.arange(n)
                assert torch.equal(_raw(pool.k_rows)[rows], _canary(r, l, h, pos, width, 1)), (r, l, h)
                assert torch.equal(_raw(pool.v_rows)[rows], _canary(r, l, h, pos, width, 2)), (r, l, h)
            # a slot this rank holds no segment of for r: empty and inactive
            for s in range(pool.num_kv_heads):
                if s >= len(heads) or int(ledger.owner[r, l, heads[s]]) != rank:
                    assert not pool.active_host[r, l, s] and pool.seg_len_host[r, l, s] == 0
    # device tables = host mirrors (the decode kernel reads the device ones)
    assert torch.equal(pool.seg_len.to(torch.int64), torch.from_numpy(pool.seg_len_host))
    assert torch.equal(pool.active, torch.from_numpy(pool.active_host))
    n_pages = -(-pool.seg_len_host // P)
    mask = np.arange(pool.max_pages)[None, None, None, :] < n_pages[..., None]
    assert np.array_equal(pool.seg_pages.numpy()[mask], pool.seg_pages_host[mask])
    assert state.ledger_mismatch() is None
    digest = hashlib.sha256(ledger.owner.numpy().tobytes() + ledger.length.numpy().tobytes()
                            + reqs.charged.tobytes()).hexdigest()
    every = [None] * tp
    dist.all_gather_object(every, digest)
    assert len(set(every)) == 1
    # weights: equal a fresh load under the plan
    for l, layer in enumerate(model.model.layers):
        fresh = _attention(l, rp.local_heads[l], rank, ck)
        got = layer.self_attn
        assert got.heads == rp.local_heads[l]
        for x, y in ((got.qkv_proj.weight, fresh.qkv_proj.weight), (got.qkv_proj.bias, fresh.qkv_proj.bias),
                     (got.o_proj.weight, fresh.o_proj.weight), (got.o_proj.bias, fresh.o_proj.bias)):
            assert torch.equal(x, y), l


def _worker(rank: int, tp: int, port: int, seed: int) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=tp, timeout=datetime.timedelta(seconds=120))
    from sglang_fairkv.compress.policy import CompressConfig
    from sglang_fairkv.kv.segment_mover import _raw, p2p_exchange
    from sglang_fairkv.placement.runtime import RankPlan
    from sglang_fairkv.placement.transition import LiveSegments, plan_transition
    from sglang_fairkv.serving.plan_switch import migrate_state
    from sglang_fairkv.serving.state import build_state

    group, ranks = dist.group.WORLD, list(range(tp))

    def exchange(sends, recv_numel):
        return p2p_exchange(sends, recv_numel, dtype=torch.uint8, device=torch.device("cpu"), group=group,
                            ranks=ranks, chunk_bytes=64)  # tiny chunks: the chunking is exercised

    ck = _checkpoint()
    rng = random.Random(seed)  # the same draws on every rank
    moved_total = 0
    for pair in range(PAIRS):
        store = torch.float8_e5m2 if pair == PAIRS - 1 else None
        a, b = _random_plan(rng, tp), _random_plan(rng, tp, copies=rng.random() < 0.7)
        # every pool reserves a slot per KV head (--fairkv-replan-head-slots), so any plan fits its tables
        state = build_state(CompressConfig(), None, rank_plan=RankPlan(a, rank, Q), max_total_tokens=3000,
                            rows_per_token_budget=L * KV, page_size=P, head_dim=D, max_reqs=8, max_context=256,
                            dtype=torch.float32, store_dtype=store, device="cpu", metadata_in_budget=False,
                            head_slots=KV)
        assert state.pool.num_kv_heads == KV and state.pool_heads_of == [KV] * tp
        model = _Model(state.rank_plan.local_heads, rank, ck)
        pool, ledger, reqs = state.pool, state.ledger, state.requests
        width = _raw(pool.k_rows).shape[1]
        n_req = rng.randrange(2, 7)
        for i in range(n_req):
            r = rng.randrange(8)
            while r in reqs.admitted:
                r = rng.randrange(8)
            n = rng.randrange(1, 60)
            state.admit(r, f"req{i}", n)
            reqs.prompt_done[r] = True
            pool.extend([r], [n])
            ledger.extend([r], [n])
            for l in range(L):  # ragged kept lengths (compression), the ledger's on every rank
                kept = torch.tensor([rng.randrange(0, n + 1) for _ in range(KV)], dtype=torch.int64)
                ledger.set_kept(r, l, kept)
                heads = state.local_heads(l)
                for s, h in enumerate(heads):
                    if pool.active_host[r, l, s]:
                        pool.compact(r, l, [torch.arange(int(kept[h]))], heads=[s])
            pool.flush()
            for l in range(L):
                for s, h in enumerate(state.local_heads(l)):
                    k = int(pool.seg_len_host[r, l, s])
                    if k:
                        rows = torch.from_numpy(_segment_rows(pool, r, l, s, k))
                        _raw(pool.k_rows)[rows] = _canary(r, l, h, np.arange(k), width, 1)
                        _raw(pool.v_rows)[rows] = _canary(r, l, h, np.arange(k), width, 2)
        assert state.ledger_mismatch() is None
        for target in (b, a):
            idx = reqs.admitted_indices()
            live = LiveSegments([reqs.admitted[i] for i in idx.tolist()],
                                np.array([state.assigner.weight_of(reqs.admitted[i]) for i in idx.tolist()]),
                                ledger.owner[idx].numpy().copy(), ledger.length[idx].numpy().copy(),
                                np.array([rng.randrange(0, 8) for _ in idx], dtype=np.int64))
            t = plan_transition(state.rank_plan.plan, target, live, usable=ledger.usable.numpy(), page_size=P,
                                pool_heads=np.array(state.pool_heads_of))
            assert t.fits, t.why
            moved = migrate_state(state, t, live, idx, exchange, model=model)
            moved_total += moved["segments_received"]
            _check(state, model, t.plan, rank, ck, tp)
            assert np.array_equal(ledger.owner[idx].numpy(), t.owner)
            # decode on: one step of every request takes pages where B's owners are (tables on the device)
            ledger.append(idx)
            rows, lens = pool.append(idx, torch.from_numpy(idx))  # rows [L, b, H], lens [b, L, H]
            for j, r in enumerate(idx.tolist()):
                for l in range(L):
                    for s, h in enumerate(state.local_heads(l)):
                        if pool.active_host[r, l, s]:
                            pos = np.array([int(lens[j, l, s]) - 1])
                            _raw(pool.k_rows)[rows[l, j, s]] = _canary(r, l, h, pos, width, 1)[0]
                            _raw(pool.v_rows)[rows[l, j, s]] = _canary(r, l, h, pos, width, 2)[0]
            assert state.ledger_mismatch() is None
        for r in list(reqs.admitted):
            state.release(r)
        assert pool.used_pages() == 0 and state.ledger_mismatch() is None
        pool.begin_step()
        free = np.sort(pool._free[:pool._n_free])
        assert np.array_equal(free, np.arange(1, pool.num_pages)), "every page once in the free stack"
    every = [None] * tp
    dist.all_gather_object(every, moved_total)
    assert sum(every) > 0, "no segment moved in any pair: the test proved nothing"
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


@pytest.mark.parametrize("tp", [2, 3])
def test_segments_and_weights_survive_a_to_b_to_a(tp):
    mp.spawn(_worker, args=(tp, _free_port(), 1000 + tp), nprocs=tp, join=True)


def test_migrate_waits_for_a_step_boundary_without_open_prefills():
    """The migrate commits only when no chunked prefill is open and every admitted request is past its
    prompt (its window queries and tier tokens are per local head)."""
    from types import SimpleNamespace

    from sglang_fairkv.compress.policy import CompressConfig
    from sglang_fairkv.placement.runtime import RankPlan
    from sglang_fairkv.serving.plan_switch import migrate_boundary
    from sglang_fairkv.serving.state import build_state

    plan = _random_plan(random.Random(3), 2)
    state = build_state(CompressConfig(), None, rank_plan=RankPlan(plan, 0, Q), max_total_tokens=3000,
                        rows_per_token_budget=L * KV, page_size=P, head_dim=D, max_reqs=8, max_context=256,
                        dtype=torch.float32, device="cpu", metadata_in_budget=False, head_slots=KV)
    sched = SimpleNamespace(chunked_req=None)
    assert migrate_boundary(sched, state)  # idle
    state.admit(2, "a", 40)
    assert not migrate_boundary(sched, state)  # its prompt is being prefilled
    state.requests.prompt_done[2] = True
    assert migrate_boundary(sched, state)
    state.requests.tier_tok[2] = np.arange(3)  # its last chunk's result not processed yet (overlap)
    assert not migrate_boundary(sched, state)
    del state.requests.tier_tok[2]
    assert migrate_boundary(sched, state)
    sched.chunked_req = object()
    assert not migrate_boundary(sched, state)
