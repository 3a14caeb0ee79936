"""The simulator against the measurements it is calibrated from (H200 devicelab, 2026-11-26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang_fairkv.placement import build_plan, synthetic_stats
from sglang_fairkv.simulator import (Calibration, emulation_rank_loads, max_batch, plan_calibrated,
                                     predict_step)

CAL = Path(__file__).resolve().parents[1] / "benchmark" / "calibration" / "h200-2026-11-26.json"


@pytest.fixture(scope="module")
def cal():
    return Calibration.load(CAL)


def test_reproduces_single_gpu_tp_emulation_within_15_percent(cal):
    """Fitted on the SHA and LPT rows only; the LPT+copy rows are held out."""
    rows = json.loads(CAL.read_text())["attention_tp_emulation"]["rows"]
    assert any(r["plan"] == "LPT+copy" for r in rows)
    for r in rows:
        pred = max(cal.attention(s, t) for s, t in emulation_rank_loads(r))
        assert abs(pred / r["max_us"] - 1) < 0.15, (r["B"], r["avg"], r["TP"], r["plan"], pred, r["max_us"])


def test_rebuilt_emulation_placements_conserve_work():
    rows = json.loads(CAL.read_text())["attention_tp_emulation"]["rows"]
    for r in rows:
        loads = emulation_rank_loads(r)
        assert sum(s for s, _ in loads) == pytest.approx(r["B"] * len(r["head_len"]))
        assert sum(t for _, t in loads) == pytest.approx(r["B"] * sum(r["head_len"]))


def test_gemm_interpolation_hits_measured_points(cal):
    rows = [r for r in json.loads(CAL.read_text())["decode_gemm"]["rows"]
            if r["model"] == "llama-3.3-70b" and r["tp"] == 4]
    for r in rows:
        assert cal.gemm_us("llama-3.3-70b", 4, r["batch"])["qkv"] == pytest.approx(r["qkv"])
    with pytest.raises(ValueError, match="no GEMM calibration for model='x' tp=4"):
        cal.gemm_us("x", 4, 16)


def test_balanced_plans_are_faster_and_fit_more(cal):
    stats = synthetic_stats("llama-3.3-70b", budget=2048, concentration=0.5, seed=1)
    sha, _ = build_plan(stats, 4, "sha")
    b = max_batch(sha, stats, "llama-3.3-70b", cal)
    assert 0 < b < 2048
    fair = plan_calibrated(stats, "llama-3.3-70b", 4, "fairkv", cal, b, max_copies_per_layer=2)
    assert predict_step(fair, stats, "llama-3.3-70b", b, cal).step_us < \
        predict_step(sha, stats, "llama-3.3-70b", b, cal).step_us
    assert max_batch(fair, stats, "llama-3.3-70b", cal) >= b
    # twice the budget: about half the batch
    big = synthetic_stats("llama-3.3-70b", budget=4096, concentration=0.5, seed=1)
    assert max_batch(build_plan(big, 4, "sha")[0], big, "llama-3.3-70b", cal) == pytest.approx(b / 2, rel=0.05)


def test_dp_replicas_add_up_and_a_plan_per_replica_beats_one_pooled_plan(cal):
    """Two DP replicas serving different traffic (their own per-head skews): the group's throughput is
    the sum of the replicas'; a plan made per replica from its own stats is at least as fast on each
    replica as the one plan made from the pooled stats (SIMULATED)."""
    import numpy as np
    from dataclasses import replace

    from sglang_fairkv.placement import build_plan, synthetic_stats
    from sglang_fairkv.simulator import predict_replicas, predict_throughput

    shape, tp = "llama-3.3-70b", 8
    a = synthetic_stats(shape, budget=1024, concentration=0.3, seed=1)
    b = synthetic_stats(shape, budget=1024, concentration=0.3, seed=2)
    pooled = replace(a, kv_len_mean=(np.asarray(a.kv_len_mean) + np.asarray(b.kv_len_mean)) / 2)
    own = [(build_plan(s, tp, "fairkv")[0], s) for s in (a, b)]
    one = build_plan(pooled, tp, "fairkv")[0]
    g_own = predict_replicas(own, shape, cal)
    g_one = predict_replicas([(one, a), (one, b)], shape, cal)
    assert g_own.tokens_per_s == pytest.approx(sum(predict_throughput(p, s, shape, cal).tokens_per_s
                                                   for p, s in own))
    assert len(g_own.per_replica_tokens_per_s) == 2
    for mine, shared in zip(g_own.per_replica_tokens_per_s, g_one.per_replica_tokens_per_s):
        assert mine >= shared * 0.98
    assert g_own.tokens_per_s > g_one.tokens_per_s
