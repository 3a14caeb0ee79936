"""Plans end to end: strategies, copy budgets, memory balance, schemas and the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from sglang_fairkv.placement import (CostModel, PlanError, StatsError, allocate_copies, build_plan,
                                     load_plan, load_stats, plan_from_json, stats_from_json,
                                     synthetic_stats)
from sglang_fairkv.placement.solver import solve_layer


@pytest.fixture(scope="module")
def stats24():
    return synthetic_stats("mistral-small-24b", budget=512, concentration=1.0, seed=3)


def test_strategies_order_and_optimality(stats24):
    cost = CostModel(c_head=100.0)
    sha, _ = build_plan(stats24, 4, "sha", cost)
    assign, lb_a = build_plan(stats24, 4, "assign", cost)
    fair, lb_f = build_plan(stats24, 4, "fairkv", cost, max_copies_per_layer=2)
    ps, pa, pf = sha.predicted, assign.predicted, fair.predicted
    assert pf["attention_time"] <= pa["attention_time"] <= ps["attention_time"]
    assert pa["optimality_gap"] == pytest.approx(0, abs=1e-9)
    assert pf["optimality_gap"] == pytest.approx(0, abs=1e-9)
    # per layer: assign equals the solver's copy-free optimum, and fairkv uses <= 2 copies
    for l in range(stats24.num_layers):
        assert pa["layer_max"][l] == pytest.approx(
            solve_layer(stats24.kv_len_mean[l], 4, 0, 100.0).max_time, rel=1e-6)
    assert max(fair.copies_per_layer()) <= 2 and pf["copies"] == sum(fair.copies_per_layer())
    assert pa["attention_busy_rate"] > ps["attention_busy_rate"]


def test_memory_balance_relabelling_keeps_time(stats24):
    cost = CostModel(c_head=50.0)
    a, _ = build_plan(stats24, 4, "assign", cost, balance_memory=True)
    b, _ = build_plan(stats24, 4, "assign", cost, balance_memory=False)
    assert a.predicted["layer_max"] == pytest.approx(b.predicted["layer_max"])
    assert a.predicted["memory_busy_rate"] >= b.predicted["memory_busy_rate"]
    assert a.predicted["memory_busy_rate"] > 0.99


def test_memory_objective(stats24):
    p, _ = build_plan(stats24, 4, "fairkv", CostModel(c_head=500.0), objective="memory")
    assert p.cost_model["objective"] == "memory"
    assert p.predicted["memory_busy_rate"] > 0.999


def test_allocate_copies_dp_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = np.sort(rng.uniform(1, 10, size=(4, 3)), axis=1)[:, ::-1]  # non-increasing in k
        budget = int(rng.integers(0, 9))
        ks = allocate_copies(costs, budget)
        best = min(sum(costs[l, k] for l, k in enumerate(c))
                   for c in itertools.product(range(3), repeat=4) if sum(c) <= budget)
        assert sum(ks) <= budget
        assert sum(costs[l, k] for l, k in enumerate(ks)) == pytest.approx(best)


def test_global_copy_budgets(stats24):
    cost = CostModel(c_head=100.0)
    full, _ = build_plan(stats24, 4, "fairkv", cost, max_copies_per_layer=2)
    few, _ = build_plan(stats24, 4, "fairkv", cost, max_copies_per_layer=2, max_copies_total=10)
    assert few.predicted["copies"] <= 10
    assert full.predicted["attention_time"] <= few.predicted["attention_time"]
    per_copy = few.predicted["extra_weight_bytes"] / max(few.predicted["copies"], 1)
    wb, _ = build_plan(stats24, 4, "fairkv", cost, max_copies_per_layer=2,
                       max_extra_weight_bytes=int(per_copy * 5.5))
    assert wb.predicted["copies"] <= 5


def test_uneven_heads_allowed_for_every_strategy():
    s = synthetic_stats("smollm2-135m", budget=256, concentration=1.0)
    sha, _ = build_plan(s, 2, "sha")  # 2 + 1 in every layer
    assert all([rep[0][0] for rep in layer] == [0, 0, 1] for layer in sha.layers)
    with pytest.raises(ValueError, match="more ranks than KV heads"):
        build_plan(s, 4, "sha")
    p, _ = build_plan(s, 2, "fairkv", max_copies_per_layer=1)
    assert p.predicted["attention_busy_rate"] > build_plan(s, 2, "assign")[0].predicted["attention_busy_rate"]


def test_plan_round_trip_and_validation(tmp_path, stats24):
    plan, _ = build_plan(stats24, 4, "fairkv", CostModel(c_head=100.0))
    path = tmp_path / "plan.json"
    plan.save(path)
    again = load_plan(path)
    assert again.layers == [[sorted(r) for r in layer] for layer in plan.layers] or \
        again.layers == plan.layers
    again.check_model(num_layers=40, num_kv_heads=8, tp=4, num_q_heads=32)
    with pytest.raises(PlanError, match="plan is for tp=4, server runs tp=2"):
        again.check_model(num_layers=40, num_kv_heads=8, tp=2)
    with pytest.raises(PlanError, match="plan has 40 layers, model has 30"):
        again.check_model(num_layers=30, num_kv_heads=8, tp=4)
    with pytest.raises(PlanError, match="plan has 32 query heads, model has 64"):
        again.check_model(num_layers=40, num_kv_heads=8, tp=4, num_q_heads=64)

    good = json.loads(path.read_text())

    def broken(mutate):
        d = json.loads(json.dumps(good))
        mutate(d)
        return d

    cases = [
        (lambda d: d.update(format="x"), "format must be 'fairkv-plan/1'"),
        (lambda d: d.update(tp=0), "tp must be an integer >= 1, got 0"),
        (lambda d: d["layers"].pop(), "layers must be a list of num_layers=40 entries, got 39"),
        (lambda d: d["layers"][3]["placement"].pop(), "layers[3]: placement must list num_kv_heads=8"),
        (lambda d: d["layers"][2]["placement"][1].update(replicas=[]), "kv_head 1 needs at least one replica"),
        (lambda d: d["layers"][0]["placement"][0]["replicas"][0].update(rank=4),
         "layers[0].placement[0]: replicas[0]: rank must be an integer in [0, tp=4), got 4"),
        (lambda d: d["layers"][0]["placement"][0].update(
            replicas=[{"rank": 0, "share": 0.5}, {"rank": 0, "share": 0.5}]), "two replicas on one rank"),
        (lambda d: d["layers"][5]["placement"][2].update(
            replicas=[{"rank": 1, "share": 0.5}, {"rank": 2, "share": 0.4}]), "shares of kv_head 2 sum to 0.9"),
        (lambda d: d["layers"][0]["placement"][0]["replicas"][0].update(share=-1), "share must be a number in (0, 1]"),
        (lambda d: d.update(strategy="magic"), "strategy must be one of"),
        (lambda d: d.update(cost_model=None), "cost_model must be an object"),
    ]
    for mutate, msg in cases:
        with pytest.raises(PlanError) as e:
            plan_from_json(broken(mutate))
        assert msg in str(e.value), (msg, str(e.value))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="is not valid JSON"):
        load_plan(tmp_path / "bad.json")


def test_stats_validation(tmp_path):
    s = synthetic_stats("smollm2-135m")
    d = s.to_json()
    assert stats_from_json(d).kv_len_mean.shape == (30, 3)
    cases = [
        ({"format": "nope"}, "format must be 'fairkv-stats/1'"),
        ({"num_layers": 0}, "num_layers must be an integer >= 1, got 0"),
        ({"num_q_heads": 10}, "num_q_heads=10 is not a multiple of num_kv_heads=3"),
        ({"kv_len_mean": d["kv_len_mean"][:29]}, "kv_len_mean must have num_layers=30 rows, got 29"),
        ({"kv_len_mean": [r[:2] for r in d["kv_len_mean"]]}, "kv_len_mean[0] must have num_kv_heads=3 entries, got 2"),
        ({"kv_len_mean": [[-1, 1, 1]] + d["kv_len_mean"][1:]}, "kv_len_mean[0][0] must be a finite number >= 0"),
    ]
    for patch, msg in cases:
        with pytest.raises(StatsError) as e:
            stats_from_json({**d, **patch})
        assert msg in str(e.value)
    p = tmp_path / "s.json"
    s.save(p)
    assert np.allclose(load_stats(p).kv_len_mean, s.kv_len_mean)
    assert load_stats(p).synthetic


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sglang_fairkv.plan", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_table_plan_and_plot(tmp_path):
    stats = tmp_path / "s.json"
    synthetic_stats("llama-3.3-70b", concentration=2.0).save(stats)
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    r = _cli("--stats", str(stats), "--tp", "4", "--max-copies-per-layer", "1", "--out", str(out),
             "--plot", str(png))
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()
            if line.split() and line.split()[0] in ("sha", "assign", "fairkv")}
    assert set(rows) == {"sha", "assign", "fairkv"}
    assert rows["sha"][-2] == "1.000x"
    assert float(rows["fairkv"][-2].rstrip("x")) >= float(rows["assign"][-2].rstrip("x")) > 1.0
    plan = load_plan(out)
    assert plan.strategy == "fairkv" and plan.tp == 4 and max(plan.copies_per_layer()) <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,msg", [
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--tp", "2", "--max-copies-per-layer", "-1"], "--max-copies-per-layer must be >= 0, got -1"),
    (["--tp", "4", "--strategy", "sha"], "3 KV heads over tp=4: more ranks than KV heads"),
    (["--tp", "x"], "argument --tp: invalid int value: 'x'"),
])
def test_cli_bad_input(tmp_path, args, msg):
    stats = tmp_path / "s.json"
    synthetic_stats("smollm2-135m").save(stats)
    r = _cli("--stats", str(stats), "--out", str(tmp_path / "p.json"), *args)
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_malformed_stats(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "fairkv-stats/1", "model": "m", "num_layers": 2, "num_q_heads": 4,'
                   ' "num_kv_heads": 2, "head_dim": 8, "kv_len_mean": [[1, 2]]}')
    r = _cli("--stats", str(bad), "--tp", "2", "--out", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "kv_len_mean must have num_layers=2 rows, got 1" in r.stderr
    bad.write_text("[1, 2")
    r = _cli("--stats", str(bad), "--tp", "2", "--out", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "is not valid JSON" in r.stderr
    assert not (tmp_path / "p.json").exists()
