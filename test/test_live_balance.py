"""The served traffic vs the plan, without a server: the live profile, the sampled per-layer balance, the drift report and the
plan's ``source`` field, each against a direct computation (numpy over the same counts, the planner's own
metrics, every rank's pool)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sglang_fairkv.compress.policy import CompressConfig
from sglang_fairkv.telemetry.live_traffic import LiveTraffic
from sglang_fairkv.telemetry.report import fairkv_stats, live_profile
from sglang_fairkv.serving.state import build_state
from sglang_fairkv.offline_stats import stats_from_counts
from sglang_fairkv.placement import CostModel, PlanError, build_plan, load_plan, plan_from_json, synthetic_stats
from sglang_fairkv.placement.drift import drift_report, layer_shares, replan_gain, share_drift
from sglang_fairkv.placement.metrics import evaluate
from sglang_fairkv.placement.runtime import RankPlan, resolve_plan, sha_plan


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-shaped synthetic stats (30 layers x 3 KV heads, uneven heads per layer)."""
    return synthetic_stats("smollm2-135m", budget=256, concentration=1.0, seed=5)


def test_share_drift_equals_direct_total_variation():
    rng = np.random.default_rng(0)
    live, src = rng.uniform(1, 100, (7, 4)), rng.uniform(1, 100, (7, 4))
    mean, mx, per_layer = share_drift(live, src)
    direct = [0.5 * sum(abs(live[l, h] / live[l].sum() - src[l, h] / src[l].sum()) for h in range(4))
              for l in range(7)]
    assert per_layer.tolist() == pytest.approx(direct)
    assert mx == pytest.approx(max(direct))
    w = live.sum(axis=1)
    assert mean == pytest.approx(float((np.array(direct) * w).sum() / w.sum()))
    # scale-free (a longer prompt mix is not drift); disjoint heads are 1; an empty layer is an even split
    assert share_drift(live * 3.0, live)[0] == pytest.approx(0.0, abs=1e-12)
    assert share_drift(np.array([[5.0, 0.0]]), np.array([[0.0, 9.0]]))[0] == pytest.approx(1.0)
    assert layer_shares(np.zeros((1, 4))).tolist() == [[0.25] * 4]
    with pytest.raises(ValueError, match="live stats are"):
        share_drift(live, src[:3])


def test_replan_gain_is_one_on_the_plans_own_stats_and_large_when_shuffled(smol):
    q, hd = smol.num_q_heads, smol.head_dim
    plan, _ = build_plan(smol, 3, "fairkv", max_copies_per_layer=1)
    same = replan_gain(plan, smol.kv_len_mean, num_q_heads=q, head_dim=hd)
    assert same["gain"] == pytest.approx(1.0, abs=1e-9)
    assert same["running_attention_time"] == pytest.approx(plan.predicted["attention_time"])
    # the same heads' loads moved to other heads: the plan no longer fits, a fresh one gains
    rng = np.random.default_rng(1)
    shuffled = np.array([row[rng.permutation(3)] for row in smol.kv_len_mean])
    g = replan_gain(plan, shuffled, num_q_heads=q, head_dim=hd)
    fresh, _ = build_plan(type(smol)(**{**smol.__dict__, "kv_len_mean": shuffled}), 3, "fairkv",
                          cost=CostModel(c_head=plan.cost_model["c_head"]), max_copies_per_layer=1)
    assert g["fresh_attention_time"] == pytest.approx(fresh.predicted["attention_time"])
    assert g["gain"] > 1.05
    rep = drift_report(plan, shuffled, 12, num_q_heads=q, head_dim=hd)
    assert rep["share_drift"] > 0.1 and rep["samples"] == 12 and rep["replan_gain"] == pytest.approx(g["gain"], rel=1e-5)
    assert drift_report(plan, smol.kv_len_mean, 12, num_q_heads=q, head_dim=hd)["share_drift"] == pytest.approx(0, abs=1e-4)


def test_sha_plan_is_judged_with_the_calibrated_cost_model(smol):
    """A sha plan carries a placeholder cost model; its gain is fairkv's (one copy) under the default one."""
    sha = sha_plan("m", 30, 3, 9, 3)
    g = replan_gain(sha, smol.kv_len_mean, num_q_heads=9, head_dim=smol.head_dim)
    fair, _ = build_plan(smol, 3, "fairkv", max_copies_per_layer=1)
    sha_cost, _ = build_plan(smol, 3, "sha")
    assert g["fresh_strategy"] == "fairkv"
    assert g["running_attention_time"] == pytest.approx(sha_cost.predicted["attention_time"])
    assert g["gain"] == pytest.approx(sha_cost.predicted["attention_time"] / fair.predicted["attention_time"])
    assert drift_report(sha, smol.kv_len_mean, 3, num_q_heads=9, head_dim=smol.head_dim)["share_drift"] is None


def test_plan_source_round_trip_validation_and_resolve(tmp_path, smol):
    plan, _ = build_plan(smol, 3, "assign")
    np.testing.assert_allclose(plan.source_kv_len_mean(), smol.kv_len_mean, atol=1e-3)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert load_plan(path).source == plan.source
    d = json.loads(path.read_text())
    d["source"]["kv_len_mean"].pop()
    with pytest.raises(PlanError, match=r"source.kv_len_mean must be \[num_layers=30\]\[num_kv_heads=3\]"):
        plan_from_json(d)
    d = json.loads(path.read_text())
    d["source"]["kv_len_mean"][2][1] = -1
    with pytest.raises(PlanError, match=r"source.kv_len_mean\[2\]\[1\] must be a finite number >= 0"):
        plan_from_json(d)
    # sha (or a plan file) with --fairkv-stats: the stats become the source the drift is measured from
    stats_path = tmp_path / "stats.json"
    smol.save(stats_path)
    kw = dict(model="m", num_layers=30, num_kv_heads=3, num_q_heads=9, tp=3)
    sha = resolve_plan("sha", stats_path=str(stats_path), **kw)
    assert sha.strategy == "sha"
    np.testing.assert_allclose(sha.source_kv_len_mean(), smol.kv_len_mean, atol=1e-3)
    assert resolve_plan("sha", **kw).source == {}
    with pytest.raises(PlanError, match="describes 30 layers x 3 KV heads"):
        resolve_plan("sha", stats_path=str(stats_path), **{**kw, "num_layers": 31})


def test_live_profile_equals_the_offline_statistics():
    """The ring over the last ``window`` prompts gives stats_from_counts' numbers on those prompts."""
    rng = np.random.default_rng(2)
    tr = LiveTraffic(3, 4, window=5)
    counts = rng.integers(0, 300, (8, 3, 4))
    for i, c in enumerate(counts):
        tr.record(c, 400 + i)
    prof = tr.profile()
    last = counts[3:].astype(np.float64)  # the window holds the last 5
    cfg = type("C", (), {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16, "hidden_size": 128})
    want = stats_from_counts(last, "m", cfg, "adakv", 100.0)
    assert prof["samples"] == 5 and prof["seen"] == 8 and prof["prompt_len_mean"] == pytest.approx(405)
    np.testing.assert_allclose(prof["kv_len_mean"], want.kv_len_mean, atol=1e-3)
    np.testing.assert_allclose(prof["kv_len_std"], want.kv_len_std, atol=1e-3)
    for k in ("kv_len_p10", "kv_len_p50", "kv_len_p90"):
        np.testing.assert_allclose(prof[k], want.extra[k], atol=1e-3)
    np.testing.assert_allclose(tr.live_mean(), last.mean(axis=0))


def test_busy_rate_since_start_sums_the_sampled_steps():
    tr = LiveTraffic(2, 2, sample_every=3)
    rng = np.random.default_rng(3)
    steps = [rng.integers(0, 50, (3, 2)) for _ in range(10)]
    it = iter(steps)
    for _ in steps:
        tr.decode_step(lambda: next(it))  # consumed on sampled steps only: 3, 6, 9
    sampled = [steps[0], steps[1], steps[2]]
    mean = sum(s.mean(axis=0) for s in sampled)
    mx = sum(s.max(axis=0) for s in sampled)
    assert tr.balance_samples == 3
    assert tr.attention_busy_rate_since_start() == pytest.approx(mean.sum() / mx.sum())
    assert tr.layer_balance_since_start() == pytest.approx((mean / mx).tolist(), abs=1e-4)


def test_state_records_compressed_prompts_and_samples_decoding_requests():
    """Through FairKVState as the backend drives it: a compressed prompt's ledger row goes to the live
    profile (an uncompressed one does not), and the sampled loads count only the decode batch's
    requests (not one still in prefill)."""
    plan = sha_plan("m", 2, 2, 4, 1)
    cfg = CompressConfig(method="snapkv", budget=8, window=4)
    st = build_state(cfg, None, rank_plan=RankPlan(plan, 0, 4), max_total_tokens=4000, rows_per_token_budget=4,
                     page_size=4, head_dim=8, max_reqs=4, max_context=128, dtype=torch.float32, device="cpu")
    st.traffic.sample_every = 1
    for r, n, kept in ((0, 40, [[8, 8], [8, 8]]), (1, 6, [[6, 6], [6, 6]])):
        st.admit(r, f"r{r}", n)
        st.ledger.extend([r], [n])
        for layer in range(2):
            st.ledger.set_kept(r, layer, torch.tensor(kept[layer]))
        st.record_prompt(r, n)
    assert st.traffic.seen == 1 and live_profile(st)["kv_len_mean"] == [[8.0, 8.0], [8.0, 8.0]]
    st.admit(2, "r2", 30)
    st.ledger.extend([2], [30])  # in prefill: not read by a decode step
    st.requests.mark_prompt_done(np.array([0, 1]))
    st.sample_decode_balance(np.array([0, 1]))
    # the batch's rows only, per rank and layer (TP 1: one rank), as the ledger holds them
    want = st.ledger.length[:2].sum(dim=(0, 2)).to(torch.float64)
    assert st.traffic.load_max_sum.tolist() == want.tolist()
    assert st.ledger.layer_loads(np.array([0, 1])).tolist() == [want.to(torch.int64).tolist()]
    assert fairkv_stats(st)["balance_samples"] == 1
    for r in (0, 1, 2):
        st.release(r)
    assert st.pool.used_pages() == 0


def test_plan_metrics_of_the_running_plan_match_evaluate(smol):
    """The running plan's attention time in the gain is :func:`evaluate`'s under the plan's cost model."""
    plan, _ = build_plan(smol, 3, "assign", CostModel(c_head=40.0))
    live = smol.kv_len_mean * np.linspace(0.5, 1.5, 3)[None, :]
    g = replan_gain(plan, live, num_q_heads=9, head_dim=smol.head_dim)
    live_stats = type(smol)(**{**smol.__dict__, "kv_len_mean": live})
    assert g["running_attention_time"] == pytest.approx(evaluate(plan, live_stats)["attention_time"])
    assert g["gain"] >= 1.0 - 1e-9
