"""Fair-Copying replica assignment (placement/replicas.py): deterministic, sticky, balanced to plan."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sglang_fairkv.placement.replicas import ReplicaAssigner
from sglang_fairkv.placement.schema import Plan


def make_plan() -> Plan:
    layers = [
        [[(0, 0.5), (1, 0.5)], [(1, 1.0)], [(2, 0.2), (0, 0.3), (1, 0.5)]],
        [[(2, 1.0)], [(0, 0.7), (2, 0.3)], [(1, 1.0)]],
    ]
    return Plan(model="m", tp=3, num_kv_heads=3, strategy="fairkv", cost_model={}, layers=layers)


def drive(assigner, events):
    out = []
    for kind, rid, w in events:
        if kind == "admit":
            out.append((rid, tuple(assigner.admit(rid, w))))
        else:
            assigner.release(rid)
    return out


def random_events(seed, n=2000):
    rng = random.Random(seed)
    live, events = [], []
    for i in range(n):
        if live and rng.random() < 0.45:
            events.append(("release", live.pop(rng.randrange(len(live))), 0))
        else:
            rid = f"r{i}"
            live.append(rid)
            events.append(("admit", rid, rng.choice([50, 300, 1000, 4000])))
    return events


def test_every_rank_computes_the_same_assignment():
    events = random_events(0)
    a, b = ReplicaAssigner(make_plan()), ReplicaAssigner(make_plan())
    assert drive(a, events) == drive(b, events)


def test_live_loads_track_planned_shares():
    """Arrivals only: each replica within one request weight of its share (deficit round-robin).
    With random departures: the relative error stays small on average (loads are pulled back)."""
    max_w = 4000
    b = ReplicaAssigner(make_plan())
    for i in range(500):
        b.admit(f"x{i}", [50, 300, 1000, 4000][i % 4])
        for _, _, shares, load in b.replica_loads():
            assert np.abs(load - shares * load.sum()).max() <= max_w + 1e-9
    for seed in (1, 2):
        a = ReplicaAssigner(make_plan())
        errs = []
        for kind, rid, w in random_events(seed, 4000):
            (a.admit(rid, w) if kind == "admit" else a.release(rid))
            for _, _, shares, load in a.replica_loads():
                if load.sum() > 0:
                    errs.append(np.abs(load - shares * load.sum()).max() / load.sum())
        assert np.mean(errs) < 0.03 and np.percentile(errs, 95) < 0.10, (np.mean(errs), np.percentile(errs, 95))


def test_sticky_release_and_masks():
    plan = make_plan()
    a = ReplicaAssigner(plan)
    first = a.admit("q", 100).copy()
    a.admit("other", 500)
    assert (a.admit("q", 100) == first).all()  # sticky
    masks = [a.owned_mask("q", r) for r in range(plan.tp)]
    assert (sum(m.astype(int) for m in masks) == 1).all()  # every (layer, head) on exactly one rank
    for l in range(2):
        for h in range(3):
            assert masks[a.owner("q", l, h)][l, h]
    a.release("q")
    a.release("q")  # idempotent
    a.release("other")
    for _, _, _, load in a.replica_loads():
        assert np.allclose(load, 0)
    with pytest.raises(ValueError, match="weight must be > 0"):
        a.admit("z", 0)


def test_realised_request_shares_follow_plan_for_equal_weights():
    a = ReplicaAssigner(make_plan())
    counts = {}
    for i in range(1000):
        for (l, h, shares, _), j in zip(a.replica_loads(), a.admit(f"r{i}", 1.0)):
            counts.setdefault((l, h), np.zeros(len(shares)))[j] += 1
    for l, h, shares, _ in a.replica_loads():
        np.testing.assert_allclose(counts[(l, h)] / 1000, shares, atol=0.002)


def test_a_pass_of_previews_equals_admitting_one_by_one():
    """Admission control previews a pass of requests (``choose`` with this pass's pending load) before
    any is admitted; the choices must be those that admitting them one by one would make, through
    live load, releases and the cumulative fallback of an idle head."""
    rng = random.Random(3)
    a, b = ReplicaAssigner(make_plan()), ReplicaAssigner(make_plan())
    live: list[str] = []
    for step in range(40):
        pending = a.new_pending()
        previews = []
        for k in range(rng.randrange(1, 6)):
            rid, w = f"s{step}-{k}", rng.randrange(1, 500)
            chosen = a.choose(w, pending)
            for i, j in enumerate(chosen):
                pending[i][j] += w
            previews.append((rid, w, chosen))
        for rid, w, chosen in previews:
            assert tuple(b.admit(rid, w)) == tuple(chosen)
            assert tuple(a.admit(rid, w, chosen)) == tuple(chosen)
            live.append(rid)
        rng.shuffle(live)
        for rid in live[:rng.randrange(0, len(live) + 1)]:  # sometimes all: heads go idle
            a.release(rid)
            b.release(rid)
            live.remove(rid)
    with pytest.raises(ValueError, match="copied heads"):
        a.admit("bad", 10, np.zeros(1, dtype=np.int64))
