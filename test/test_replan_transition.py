"""The pure transition of a live re-plan (``placement/transition.py``), property-tested on random plans
and random live segments (seeded: deterministic): owners under B, what moves, per-rank fit, rounds that
never run a rank out of pages."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sglang_fairkv.placement.schema import Plan, PlanError
from sglang_fairkv.placement.transition import (LiveSegments, plan_transition, plan_hash, rank_pages,
                                                schedule_rounds)

P = 16


def random_plan(rng: random.Random, tp: int, layers: int, kv: int, copies: bool = True) -> Plan:
    out = []
    for _ in range(layers):
        layer = []
        for _ in range(kv):
            n = rng.choice([1, 1, 2] if copies and tp > 1 else [1])
            ranks = rng.sample(range(tp), n)
            w = [rng.random() + 0.1 for _ in ranks]
            layer.append([(r, x / sum(w)) for r, x in zip(ranks, w)])
        out.append(layer)
    # the shares of a head sum to 1 up to rounding: renormalise the last one exactly
    for layer in out:
        for reps in layer:
            if len(reps) > 1:
                reps[-1] = (reps[-1][0], 1.0 - sum(s for _, s in reps[:-1]))
    return Plan(model="m", tp=tp, num_kv_heads=kv, strategy="fairkv", cost_model={}, layers=out)


def random_live(rng: random.Random, a: Plan, n_req: int) -> LiveSegments:
    L, KV = a.num_layers, a.num_kv_heads
    owner = np.zeros((n_req, L, KV), dtype=np.int64)
    rows = np.zeros((n_req, L, KV), dtype=np.int64)
    for i in range(n_req):
        for l in range(L):
            for h in range(KV):
                owner[i, l, h] = rng.choice([r for r, _ in a.layers[l][h]])
                rows[i, l, h] = rng.choice([0, rng.randrange(1, 300)])
    return LiveSegments([f"r{i}" for i in range(n_req)], np.array([rng.randrange(1, 500) for _ in range(n_req)], float),
                        owner, rows, np.array([rng.choice([0, rng.randrange(0, 64)]) for _ in range(n_req)],
                                              dtype=np.int64))


def replay_rounds(t, live) -> np.ndarray:
    """Run the rounds on per-rank page counts; assert no rank ever goes over its usable pages."""
    used = t.pages_now.copy()
    done = []
    for rnd in t.rounds:
        for i in rnd:  # the copy needs the destination's pages before the source frees its own
            used[t.moves[i].dst] += t.moves[i].pages
        assert (used <= t.usable).all(), (used, t.usable)
        for i in rnd:
            used[t.moves[i].src] -= t.moves[i].pages
        done += rnd
    assert sorted(done) == list(range(len(t.moves)))
    return used


def test_random_transitions_keep_their_promises():
    """200 random (A, B, live segments, pool) cases; every branch is reached: fits in one round, fits in
    several, refused for the promise, refused because no move can start."""
    outcomes = __import__("collections").Counter(check_one(seed) for seed in range(200))
    assert outcomes[(True, "", False)] and outcomes[(True, "", True)], outcomes
    assert any(not f and w.startswith("under plan B") for f, w, _ in outcomes), outcomes
    assert any(not f and w[:1].isdigit() for f, w, _ in outcomes), outcomes


def check_one(seed: int) -> tuple:
    rng = random.Random(seed)
    tp, kv, L = rng.choice([2, 3]), rng.choice([3, 6]), rng.randrange(2, 5)
    a, b = random_plan(rng, tp, L, kv), random_plan(rng, tp, L, kv)
    live = random_live(rng, a, rng.randrange(0, 9))
    # pools from just too small for B's promise to roomy: tight ones need several rounds or cannot start
    t0 = plan_transition(a, b, live, usable=np.full(tp, 10**9), page_size=P)
    floor = np.maximum(t0.pages_now, t0.pages_promised)  # per rank (tight: full ranks swapping deadlock)
    if rng.random() < 0.5:
        floor = np.full(tp, int(floor.max()))
    usable = np.maximum(floor + rng.choice([-1, 0, 0, 1, 2, 4, 40]), t0.pages_now).astype(np.int64)
    t = plan_transition(a, b, live, usable=usable, page_size=P)
    again = plan_transition(a, b, live, usable=usable, page_size=P)
    assert t.summary(64) == again.summary(64) and np.array_equal(t.owner, again.owner)  # deterministic
    for i in range(len(live.rids)):
        for l in range(L):
            for h in range(kv):
                holders = [r for r, _ in t.plan.layers[l][h]]
                assert t.owner[i, l, h] in holders  # exactly one owner, a replica under B
                if live.owner[i, l, h] in holders:
                    assert t.owner[i, l, h] == live.owner[i, l, h]  # kept where it can stay
    moved = {(m.req, m.layer, m.head) for m in t.moves}
    expect = {(i, l, h) for i, l, h in np.argwhere(t.owner != live.owner).tolist() if live.rows[i, l, h]}
    assert moved == expect
    assert np.array_equal(t.pages_after, rank_pages(t.owner, live.rows, tp, P) if live.rids else np.zeros(tp))
    # the relabeled plan is B up to rank labels per layer
    for l in range(L):
        for h in range(kv):
            assert sorted((t.relabel[l][r], round(s, 9)) for r, s in b.layers[l][h]) == \
                sorted((r, round(s, 9)) for r, s in t.plan.layers[l][h])
    assert plan_hash(t.plan) != plan_hash(a) or not t.moves
    if (t.pages_promised > usable).any():
        assert not t.fits and "remaining decode" in t.why
    elif t.fits:
        assert np.array_equal(replay_rounds(t, live), t.pages_after)
    else:
        assert "cannot start" in t.why
    return t.fits, (t.why or "")[:12], len(t.rounds) > 1


def test_b_equal_to_a_up_to_labels_moves_nothing():
    """Permuting a plan's rank labels per layer is free: relabeling finds A again, nothing moves, and
    without relabeling the same B would move KV."""
    rng = random.Random(3)
    a = random_plan(rng, 3, 3, 6)
    perms = [rng.sample(range(3), 3) for _ in range(3)]
    b = Plan(model="m", tp=3, num_kv_heads=6, strategy="fairkv", cost_model={},
             layers=[[[(perms[l][r], s) for r, s in reps] for reps in layer] for l, layer in enumerate(a.layers)])
    live = random_live(rng, a, 6)
    t = plan_transition(a, b, live, usable=np.full(3, 10**6), page_size=P)
    assert t.fits and not t.moves and plan_hash(t.plan) == plan_hash(a)
    raw = plan_transition(a, b, live, usable=np.full(3, 10**6), page_size=P, relabel=False)
    assert raw.moves and raw.fits


def test_relabeling_never_moves_more_without_copies():
    """Without copies the overlap matching minimises the rows that move (each head has one owner)."""
    for seed in range(30):
        rng = random.Random(100 + seed)
        a, b = random_plan(rng, 3, 3, 6, copies=False), random_plan(rng, 3, 3, 6, copies=False)
        live = random_live(rng, a, 5)
        big = np.full(3, 10**6)
        assert plan_transition(a, b, live, usable=big, page_size=P).rows_moved <= \
            plan_transition(a, b, live, usable=big, page_size=P, relabel=False).rows_moved


def test_refusals_name_the_problem():
    rng = random.Random(9)
    a = random_plan(rng, 2, 2, 3)
    with pytest.raises(PlanError, match="plan is for tp=3"):
        plan_transition(a, random_plan(rng, 3, 2, 3), LiveSegments.empty(2, 3), usable=np.full(2, 100), page_size=P)
    with pytest.raises(PlanError, match="plan has 4 KV heads"):
        plan_transition(a, random_plan(rng, 2, 2, 4), LiveSegments.empty(2, 4), usable=np.full(2, 100), page_size=P)
    # B needs more head slots than a rank's pool has
    b = Plan(model="m", tp=2, num_kv_heads=3, strategy="assign", cost_model={},
             layers=[[[(0, 1.0)], [(0, 1.0)], [(0, 1.0)]]] * 2)
    t = plan_transition(a, b, LiveSegments.empty(2, 3), usable=np.full(2, 100), page_size=P, pool_heads=np.array([2, 2]))
    assert not t.fits and not t.slots_fit and "head slots" in t.why
    # a swap between two full ranks cannot start: every destination is full until its source frees
    a = Plan(model="m", tp=2, num_kv_heads=2, strategy="sha", cost_model={}, layers=[[[(0, 1.0)], [(1, 1.0)]]])
    b = Plan(model="m", tp=2, num_kv_heads=2, strategy="sha", cost_model={}, layers=[[[(1, 1.0)], [(0, 1.0)]]])
    live = LiveSegments(["x"], np.array([10.0]), np.array([[[0, 1]]]), np.array([[[32, 32]]]), np.array([0]))
    t = plan_transition(a, b, live, usable=np.array([2, 2]), page_size=P, relabel=False)
    assert not t.fits and "cannot start" in t.why and not t.rounds
    assert plan_transition(a, b, live, usable=np.array([4, 4]), page_size=P, relabel=False).rounds == [[0, 1]]
    assert not plan_transition(a, b, live, usable=np.array([2, 2]), page_size=P).moves  # relabeled: a no-op


def test_schedule_rounds_frees_before_it_fills():
    """A chain 1 -> 2 then 0 -> 1 with one free page, on rank 2 only: the second move waits a round for
    rank 1 to free its page."""
    from sglang_fairkv.placement.transition import Move

    moves = [Move(0, 0, 0, 1, 2, 16, 1), Move(1, 0, 0, 0, 1, 16, 1)]
    rounds, why = schedule_rounds(moves, np.array([0, 0, 1]))
    assert why is None and rounds == [[0], [1]]
