"""FairKV plans under tensor parallelism, end to end on CPU (gloo): real servers, HTTP.

Reference: the same model and compression at TP = 1 (every head on one rank). A plan only moves
heads between ranks and splits a copied head's requests between its replicas, and AdaKV's layer-wide
selection sees every head's scores (exchanged between ranks), so greedy tokens must equal TP = 1
exactly in float32. The compressed TP = 1 outputs differ from full-cache HF outputs, so a rank that
compressed differently (or attended a segment twice, or not at all) would show.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers.server import STRICT, Server, wait_ranks_empty

pytestmark = [pytest.mark.server, pytest.mark.slow]

ADAKV = ["--kv-compress", "adakv", "--kv-budget", "20", "--kv-window", "8"]
PROMPTS = [list(range(3, 120, 2)), [5] * 40 + list(range(90, 150)), [7, 9, 11] * 30, list(range(200, 330))]
N_NEW = 20
#: SmolLM2's kept tokens per (layer, KV head) measured by ``python -m sglang_fairkv.profiler`` (AdaKV)
REPO_STATS = Path(__file__).resolve().parents[1] / "benchmark" / "calibration" / "smollm2-adakv-r0.75.json"


def skewed_stats(path, layers=3, kv=6, q=12, head_dim=16):
    """Stats where one head per layer holds most KV: assign must unbalance, fairkv copies it."""
    from sglang_fairkv.placement.stats import KVStats

    mean = np.array([np.roll([400.0, 60, 50, 40, 30, 20], l) for l in range(layers)])
    KVStats(model="tiny-kv6", num_layers=layers, num_q_heads=q, num_kv_heads=kv, head_dim=head_dim,
            kv_len_mean=mean).save(path)
    return path


@pytest.fixture(scope="session")
def tp1_run(tiny_kv6_path, shared):
    """Greedy tokens of the same model and compression at TP = 1, and the kept-token stats of those
    prompts as ``python -m sglang_fairkv.profiler --from-server`` reads them off that server's live
    profile (computed once per run)."""
    def compute():
        from helpers import hf_ref

        from sglang_fairkv.profiler import stats_from_server

        with Server(["--model-path", str(tiny_kv6_path), *ADAKV], env=STRICT) as s:
            out = [s.greedy_ids(p, N_NEW) for p in PROMPTS]
            stats = stats_from_server(s.url, min_samples=len(PROMPTS)).to_json()
        full = [hf_ref.greedy(tiny_kv6_path, p, N_NEW) for p in PROMPTS]
        assert sum(a != b for a, b in zip(out, full)) >= 2, "compression must change outputs for the test to see it"
        return {"tokens": out, "stats": stats}

    return shared("tp1-kv6-adakv", compute)


@pytest.fixture(scope="session")
def tp1_reference(tp1_run):
    return tp1_run["tokens"]


# TP 3 runs in test_tp3_live_balance_and_plan_drift (sha, and a fairkv plan: assignment -- a per-layer
# permutation over 3 ranks -- and copies). A fairkv plan at TP 2 runs in
# test_smollm2_tp2_through_a_plan_equals_kvpress (computed from stats at start-up, copies) and in the
# edge-plan tests below (hand-made copies, a rank with no head in a layer).
@pytest.mark.parametrize("tp,plan", [(2, "sha"), (2, "assign")])
def test_plans_equal_tp1_with_adakv(tiny_kv6_path, tp1_reference, tp, plan, tmp_path):
    stats = skewed_stats(tmp_path / "stats.json")
    args = ["--model-path", str(tiny_kv6_path), "--tp-size", str(tp), *ADAKV]
    if plan != "sha":  # sha: the default plan at TP > 1
        args += ["--fairkv-plan", plan, "--fairkv-stats", str(stats)]
    with Server(args, env=STRICT) as s:
        got = [s.greedy_ids(p, N_NEW) for p in PROMPTS]
        info = s.fairkv_info()
    assert got == tp1_reference, f"tp={tp} plan={plan}"
    assert max(info["plan_copies_per_layer"]) == 0
    assert [r["pages_used"] for r in info["ranks"]] == [0] * tp


def metric_values(text: str, name: str) -> dict[tuple, float]:
    """``{labels: value}`` of one gauge in a Prometheus text exposition (labels as sorted tuples)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name:
                out[tuple(sorted((k, v) for k, v in smp.labels.items() if k in ("tp_rank", "layer")))] = smp.value
    return out


def metric_scalar(text: str, name: str) -> float:
    """The one sample of a group-wide fairkv gauge (exported by rank 0: ``tp_rank`` 0)."""
    got = metric_values(text, name)
    assert list(got) == [(("tp_rank", "0"),)], f"{name}: {got}"
    return got[(("tp_rank", "0"),)]


def test_tp3_live_balance_and_plan_drift(tiny_kv6_path, tp1_run, tmp_path):
    """Live balance and plan drift at TP 3, on the tiny model whose light heads sha puts on one rank in every layer. sha,
    measured against deliberately shuffled stats, then a fairkv plan made from stats profiled off the
    TP 1 server's live traffic on the same prompts. Both decode a batch of 8 (the per-layer attention
    busy rate sampled over every decode step of it must be clearly higher under fairkv: measured sha
    0.788, fairkv 0.910-0.915, while sha's memory busy rate is 1.000), then serve each prompt alone (tokens
    equal TP 1). The drift report is large against the shuffled stats (measured 0.329, a fresh plan
    would gain 1.24x), zero against the matched ones; the Prometheus gauges say what
    ``/server_info`` says. Then the sha server re-plans from its own live profile (``from_live``, migrate,
    while a request decodes; issue 34) and its next batch is clearly more balanced than under sha."""
    matched = np.asarray(tp1_run["stats"]["kv_len_mean"])
    assert matched.min() < 0.6 * matched.max(), f"the model's heads must keep unequal counts: {matched}"
    stats = {"matched": tmp_path / "matched.json", "shuffled": tmp_path / "shuffled.json"}
    stats["matched"].write_text(json.dumps(tp1_run["stats"]))
    stats["shuffled"].write_text(json.dumps({**tp1_run["stats"], "kv_len_mean": np.roll(matched, 3, axis=1).tolist()}))
    env = {**STRICT, "FAIRKV_BALANCE_SAMPLE_STEPS": "1", "FAIRKV_DRIFT_INTERVAL_S": "0"}
    # every decode step logs its stats, so the gauges are those of the last step when the test reads them
    base = ["--model-path", str(tiny_kv6_path), "--tp-size", "3", *ADAKV, "--enable-metrics",
            "--decode-log-interval", "1"]
    runs = {}
    for name, extra in (("sha", ["--fairkv-plan", "sha", "--fairkv-stats", str(stats["shuffled"]),
                                 "--fairkv-replan-head-slots", "4"]),  # room for the live re-plan below
                        ("fairkv", ["--fairkv-plan", "fairkv", "--fairkv-stats", str(stats["matched"]),
                                    "--chunked-prefill-size", "48"])):  # window queries cross chunks
        with Server([*base, *extra], env=env) as s:
            # a batch decoding together (copies split requests between their replicas), then each
            # prompt alone for the exact comparison with TP 1
            with ThreadPoolExecutor(2 * len(PROMPTS)) as ex:
                list(ex.map(lambda p: s.greedy_ids(p, 6), PROMPTS * 2))  # short: kept rows dominate
            busy = s.fairkv_info()["attention_busy_rate_since_start"]
            got = [s.greedy_ids(p, N_NEW) for p in PROMPTS]
            info = s.fairkv_info()
            metrics = requests.get(s.url + "/metrics", timeout=30).text
            if name == "sha":
                live = _migrate_from_live(s, tp1_run["tokens"])
        assert got == tp1_run["tokens"], name
        info["busy_batch"] = busy
        assert [r["pages_used"] for r in info["ranks"]] == [0, 0, 0]
        assert info["balance_samples"] >= len(PROMPTS) * (N_NEW - 1), info["balance_samples"]
        drift = info["plan_drift"]
        assert drift["samples"] == info["live_profile"]["samples"] >= len(PROMPTS)
        # the gauges (rank 0 exports the whole group) agree with /server_info
        assert metric_scalar(metrics, "sglang:fairkv_attention_busy_rate_since_start") == pytest.approx(
            info["attention_busy_rate_since_start"], rel=1e-6)
        assert metric_scalar(metrics, "sglang:fairkv_replan_gain") == pytest.approx(drift["replan_gain"], rel=1e-6)
        assert metric_scalar(metrics, "sglang:fairkv_plan_epoch") == info["plan_epoch"] == 0
        assert metric_values(metrics, "sglang:fairkv_pages_total") == {
            (("tp_rank", str(q)),): float(r["pages_total"]) for q, r in enumerate(info["ranks"])}
        assert len(metric_values(metrics, "sglang:fairkv_layer_rows")) == 3 * 3
        runs[name] = (info, drift, metric_scalar(metrics, "sglang:fairkv_plan_share_drift"))
    (sha, sha_drift, sha_gauge), (fair, fair_drift, fair_gauge) = runs["sha"], runs["fairkv"]
    print(f"attention busy rate of the batch: sha {sha['busy_batch']:.3f}, fairkv {fair['busy_batch']:.3f}; "
          f"since start: sha {sha['attention_busy_rate_since_start']:.3f}, fairkv "
          f"{fair['attention_busy_rate_since_start']:.3f}; memory: sha {sha['memory_busy_rate']:.3f}; share "
          f"drift sha-vs-shuffled {sha_drift['share_drift']:.3f} (gain {sha_drift['replan_gain']:.3f}), fairkv-"
          f"vs-matched {fair_drift['share_drift']:.4f} (gain {fair_drift['replan_gain']:.4f})")
    assert min(fair["plan_copies_per_layer"]) >= 1
    assert fair["busy_batch"] >= sha["busy_batch"] + 0.08
    # the sha server re-planned from its own live profile while a request decoded: the batch after the switch
    # is clearly more balanced (measured 0.788 -> 0.858; the fairkv server's plan, from TP 1's stats of each
    # prompt once, 0.91)
    print(f"live re-plan at TP 3 (migrate, from_live): busy rate of the batch {sha['busy_batch']:.3f} -> "
          f"{live['busy_after']:.3f}; pause {live['reply']['pause_ms']:.1f} ms, moved {live['reply']['moved']}")
    assert live["busy_after"] >= sha["busy_batch"] + 0.05
    assert sha_drift["share_drift"] > 0.2 and sha_drift["replan_gain"] > 1.1
    assert sha_gauge == pytest.approx(sha_drift["share_drift"], rel=1e-6)
    assert fair_drift["share_drift"] < 0.01 and fair_drift["replan_gain"] < 1.01
    assert fair_gauge == pytest.approx(fair_drift["share_drift"], rel=1e-6, abs=1e-9)


def _migrate_from_live(s, tp1_tokens) -> dict:
    """``POST /fairkv/replan {"from_live": true, "mode": "migrate"}`` while a request decodes (it finishes with
    TP 1's tokens), then the batch again under the new plan: its busy rate (the since-start figures restart
    at the switch), and every prompt alone equals TP 1."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(ids=s.greedy_ids(PROMPTS[0], 3 * N_NEW)))
    t.start()
    deadline = time.time() + 60
    while s.fairkv_info()["requests_admitted"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    r = requests.post(s.url + "/fairkv/replan", json={"from_live": True, "strategy": "fairkv", "mode": "migrate"},
                      timeout=300)
    t.join()
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["success"] and reply["verified"] and reply["epoch"] == 1 and reply["running_requests"] == 1, reply
    assert out["ids"][:N_NEW] == tp1_tokens[0]
    with ThreadPoolExecutor(2 * len(PROMPTS)) as ex:
        list(ex.map(lambda p: s.greedy_ids(p, 6), PROMPTS * 2))
    busy_after = s.fairkv_info()["attention_busy_rate_since_start"]
    assert [s.greedy_ids(p, N_NEW) for p in PROMPTS] == tp1_tokens
    info = s.fairkv_info()
    assert info["plan_epoch"] == 1 and min(info["plan_copies_per_layer"]) >= 1
    assert [q["pages_used"] for q in info["ranks"]] == [0, 0, 0]
    assert info["replan"]["switches"] == 1 and info["replan"]["last"]["pause_ms"] == reply["pause_ms"]
    metrics = requests.get(s.url + "/metrics", timeout=30).text  # exported at the batch's decode logs
    assert metric_scalar(metrics, "sglang:fairkv_plan_epoch") == 1
    assert metric_scalar(metrics, "sglang:fairkv_replan_last_pause_seconds") == pytest.approx(reply["pause_ms"] / 1e3)
    assert metric_scalar(metrics, "sglang:fairkv_replan_kv_bytes_moved") == info["replan"]["kv_bytes_moved_total"]
    return {"reply": reply, "busy_after": busy_after}


def test_smollm2_tp2_through_a_plan_equals_kvpress(smollm2_path, fairkv_references, fairkv_prompts, tmp_path,
                                                   decode_prompts, kvpress_python, shared, tmp_path_factory):
    """SmolLM2 has 3 KV heads: no even TP=2 split. A fairkv plan computed at start-up from SmolLM2's
    measured AdaKV stats serves it at TP=2 with AdaKV, and gives kvpress's AdaKV tokens. The same server
    compresses while decoding too (``--kv-decode-compress adakv``, budget 48 every 16 steps: the 16-token
    requests never reach a decode compression): a 64-token generation equals kvpress's
    ``PrefillDecodingPress`` (AdaKV at prefill, ``DecodingPress(AdaKV)``) -- the layer-wide top-k over both
    ranks' heads, copies served by their replica -- and a prefix-cache hit of that prompt afterwards gives the
    same tokens (decode-time compression touches the request's own segments, never the cached dense prefix)."""
    from helpers.fairkv_refs import DECODE_K, DECODE_N, DECODE_W, N_NEW as N, RATIO, prefill_decode_references

    from sglang_fairkv.placement.stats import load_stats

    stats = tmp_path / "smollm2.json"
    measured = load_stats(REPO_STATS)
    measured.save(stats)
    long_prompts = [decode_prompts[600]]
    dec_ref = shared("decode-ref-prefill", lambda: prefill_decode_references(
        kvpress_python, smollm2_path, long_prompts, tmp_path_factory.mktemp("kvp-pd")))
    # a 32k-token pool: the 1100-token prompt is within the prefix tier's write share (1/16), so it is cached
    args = ["--tp-size", "2", "--kv-compress", "adakv", "--kv-compress-ratio", str(RATIO),
            "--fairkv-plan", "fairkv", "--fairkv-stats", str(stats), "--max-total-tokens", "32768",
            "--kv-decode-compress", "adakv", "--kv-decode-budget", "48", "--kv-decode-interval", str(DECODE_K),
            "--kv-decode-window", str(DECODE_W)]
    with Server(args, env=STRICT) as s:
        first = s.greedy(fairkv_prompts[1], N)
        got = first["output_ids"]
        info = s.fairkv_info()
        # the prompt again: it reuses its dense prefix from the tier on both ranks (each rank cached its own
        # heads, copies included, whichever replica served the first request); only the window runs
        again = s.greedy(fairkv_prompts[1], N)
        states = wait_ranks_empty(s)
        long_first = s.greedy(long_prompts[0], DECODE_N)
        long_again = s.greedy(long_prompts[0], DECODE_N)
        after = wait_ranks_empty(s)
    assert got == fairkv_references["adakv"][1]
    assert got != fairkv_references["hf"][1]
    assert sum(info["plan_copies_per_layer"]) >= 1
    assert again["output_ids"] == got
    assert first["meta_info"]["cached_tokens"] == 0
    assert again["meta_info"]["cached_tokens"] == len(fairkv_prompts[1]) - 64
    ranks = states[0]["ranks"]
    assert [r["pages_used"] for r in ranks] == [0, 0] and all(r["prefix_tier_pages"] > 0 for r in ranks), ranks
    assert states[0]["decode_compress"]["request_compressions"] == 0  # 15 decode steps each: none reached 16
    assert long_first["output_ids"] == dec_ref[0][0] != dec_ref[1][0]
    assert long_again["output_ids"] == long_first["output_ids"]
    assert long_again["meta_info"]["cached_tokens"] == len(long_prompts[0]) - 64
    dc = after[0]["decode_compress"]  # three compressions per 64-token request, every rank's pages back
    assert dc["request_compressions"] == 6 and dc["rows_evicted_total"] > 0, dc
    assert [r["pages_used"] for r in after[0]["ranks"]] == [0, 0]


def test_smollm2_tp2_with_defaults_only_equals_tp1(smollm2_path, fairkv_references, fairkv_prompts):
    """``--tp-size 2 --kv-compress adakv`` and nothing else on the embedded model: it starts (sha splits
    the 3 KV heads 2 + 1, AdaKV at the default ratio), its log names the plan and the heads per rank, and
    it gives the TP 1 tokens (kvpress's AdaKV at that ratio, which the TP 1 server equals:
    test_fairkv_server)."""
    from helpers.fairkv_refs import N_NEW as N, RATIO

    from sglang_fairkv.compress.policy import DEFAULT_RATIO

    assert DEFAULT_RATIO == RATIO  # the references were made at the default
    with Server(["--tp-size", "2", "--kv-compress", "adakv"], env=STRICT) as s:
        got = s.greedy_ids(fairkv_prompts[1], N)
        info = s.fairkv_info()
        log = s.log_text()
        assert [r["pages_used"] for r in wait_ranks_empty(s)[0]["ranks"]] == [0, 0]
    assert got == fairkv_references["adakv"][1]
    assert info["plan"] == "sha" and len(info["ranks"]) == 2
    assert "--fairkv-plan sha: sha plan, tp=2, 0 head copies over 30 layers; KV heads per rank in every " \
           "layer [2, 1] (the default at --tp-size > 1)" in log


def edge_plan(path) -> Path:
    """A hand-made TP=2 plan with the corners a planner can produce: layer 0 gives rank 1 only a
    replica (some requests leave it nothing to hold in that layer), layer 1 gives rank 0 no head at
    all, layer 2 copies two heads with uneven shares."""
    from sglang_fairkv.placement.schema import Plan

    layers = [[[(0, 0.5), (1, 0.5)], *[[(0, 1.0)]] * 5],
              [[(1, 1.0)]] * 6,
              [[(0, 0.3), (1, 0.7)], [(0, 1.0)], [(1, 1.0)], [(0, 0.6), (1, 0.4)], [(0, 1.0)], [(1, 1.0)]]]
    Plan(model="tiny-kv6", tp=2, num_kv_heads=6, strategy="fairkv", cost_model={"c_head": 0.0, "c_token": 1.0},
         layers=[list(l) for l in layers], num_q_heads=12).save(path)
    return path


@pytest.fixture(scope="module")
def edge_server(tiny_kv6_path, tp1_reference, tmp_path_factory):
    """TP 2 through :func:`edge_plan` (copies, a rank with no head in a layer), AdaKV, a KV pool too
    small for all the traffic below at once; strict idle memory check on every rank. Requests and
    context bounded as a small server would be: the segment page table (requests x layers x heads x
    context / page) is paid from the same 1200-token KV budget."""
    plan = edge_plan(tmp_path_factory.mktemp("edge") / "plan.json")
    args = ["--model-path", str(tiny_kv6_path), "--tp-size", "2", *ADAKV, "--max-total-tokens", "1200",
            "--max-running-requests", "24", "--context-length", "2048", "--fairkv-plan", str(plan)]
    with Server(args, env=STRICT) as s:
        yield s


@pytest.mark.xdist_group("tp2-edge")
def test_control_plane_reports_the_plan_and_dry_runs_a_replan(edge_server, tp1_reference, tmp_path):
    """``GET /fairkv/plan``: the running plan, epoch 0, its hash (the same as the plan file's). ``POST
    /fairkv/replan`` with ``dry_run`` while requests decode: what sha would move from the live segments
    (the rows of the segments whose owner changes, their bytes, pages per rank, rounds), and nothing
    changes: the requests finish with TP 1's tokens, the plan and its hash stay. Bad bodies get 400 naming
    the problem and plan A keeps serving (the switches themselves: test_live_replan)."""
    from sglang_fairkv.placement.runtime import sha_plan
    from sglang_fairkv.placement.schema import load_plan
    from sglang_fairkv.placement.transition import plan_hash

    s = edge_server
    got = requests.get(s.url + "/fairkv/plan", timeout=30)
    assert got.status_code == 200, got.text
    a = got.json()
    edge = load_plan(edge_plan(tmp_path / "edge.json"))
    assert a["epoch"] == 0 and a["tp"] == 2 and a["plan_hash"] == plan_hash(edge)
    assert a["plan"]["layers"] == edge.to_json()["layers"]
    sha = sha_plan("tiny-kv6", 3, 6, 12, 2).to_json()
    outs: list = [None] * len(PROMPTS)

    def send(i):
        outs[i] = requests.post(s.url + "/generate", json={"input_ids": PROMPTS[i], "sampling_params": {
            "max_new_tokens": 160, "temperature": 0.0, "ignore_eos": True}}, timeout=600).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while s.fairkv_info()["requests_admitted"] < len(PROMPTS) and time.time() < deadline:
        time.sleep(0.05)
    dry = requests.post(s.url + "/fairkv/replan", json={"plan": sha, "dry_run": True, "mode": "migrate"}, timeout=60)
    for t in threads:
        t.join()
    assert dry.status_code == 200, dry.text
    d = dry.json()
    tr = d["transition"]
    assert d["dry_run"] and d["running_requests"] >= 1, d
    assert tr["segments_moved"] >= 1 and tr["kv_bytes_moved"] == tr["rows_moved"] * 2 * 16 * 4, tr
    assert d["success"] == tr["fits"] and len(tr["pages_after"]) == 2 and tr["plan_hash"] != a["plan_hash"]
    assert [o["output_ids"][:N_NEW] for o in outs] == tp1_reference  # nothing changed under the requests
    after = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    assert after["plan_hash"] == a["plan_hash"] and after["epoch"] == 0
    for body, needle in (({"plan": sha_plan("tiny-kv6", 3, 6, 12, 3).to_json(), "dry_run": True}, "plan is for tp=3"),
                         ({"plan": sha, "plan_path": "/x.json", "dry_run": True}, "exactly one of"),
                         ({"plan_path": str(tmp_path / "none.json"), "dry_run": True}, "no such file"),
                         ({"plan": sha, "mode": "swap"}, "mode must be one of drain, migrate"),
                         ({"plan": {"format": "fairkv-plan/1"}, "dry_run": True}, "")):
        r = requests.post(s.url + "/fairkv/replan", json=body, timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"], (body, r.text)
    # the CLI: a plan file, dry run (an idle server: nothing would move), and the live-profile plan
    import subprocess
    import sys

    sha_plan("tiny-kv6", 3, 6, 12, 2).save(tmp_path / "sha.json")
    cli = [sys.executable, "-m", "sglang_fairkv.plan", "--from-server", s.url, "--apply", "--dry-run"]
    out = subprocess.run([*cli, "--plan-file", str(tmp_path / "sha.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"segments_moved": 0' in out.stdout and '"fits": true' in out.stdout
    out = subprocess.run([*cli, "--strategy", "assign"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and '"dry_run": true' in out.stdout, out.stdout + out.stderr
    assert requests.get(s.url + "/fairkv/plan", timeout=30).json()["plan_hash"] == a["plan_hash"]
    assert s.greedy_ids(PROMPTS[2], N_NEW) == tp1_reference[2]
    assert [r["pages_used"] for r in wait_ranks_empty(s)[0]["ranks"]] == [0, 0]


@pytest.mark.xdist_group("tp2-edge")
def test_replica_shares_and_abort_free_every_rank(edge_server, tp1_reference):
    """A plan with a rank that holds no head in a layer and copied heads: tokens equal TP=1; under
    concurrent traffic that the KV pool cannot hold at once (per-rank admission with replicas chosen
    before admission: a pool that ran out would kill the server) each copied head's replicas serve
    shares of the admitted prompt tokens close to the plan's; mid-decode every rank holds KV and rank
    0's pool matches the ledger; an aborted request leaves no segment on any rank (the ledger shows
    each rank's pages, and each rank's strict idle check compares its own pool)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 400, size=int(n)).tolist() for n in rng.integers(40, 160, size=40)]
    s = edge_server
    assert [s.greedy_ids(p, N_NEW) for p in PROMPTS] == tp1_reference

    def send(p, n):
        requests.post(s.url + "/generate", json={"input_ids": p, "sampling_params": {
            "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}, timeout=600)

    threads = [threading.Thread(target=send, args=(p, 8)) for p in prompts]
    for t in threads:
        t.start()
    admitted = []
    while any(t.is_alive() for t in threads):
        admitted.append(s.fairkv_info()["requests_admitted"])
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert 1 < max(admitted) < len(prompts), admitted  # the pool bound how many ran at once
    info = s.fairkv_info()
    assert len(info["replicas"]) == 3
    assert 0 <= info["roomiest_admissions"] < len(prompts)
    for rep in info["replicas"]:
        err = np.abs(np.array(rep["served"]) - np.array(rep["planned"]))
        assert err.max() < 0.12, rep
    # abort mid-decode
    rid = "tp-abort-me"
    t = threading.Thread(target=lambda: requests.post(s.url + "/generate", json={
        "input_ids": PROMPTS[3], "rid": rid,
        "sampling_params": {"max_new_tokens": 600, "temperature": 0.0, "ignore_eos": True}}, timeout=600))
    t.start()
    deadline, during = time.time() + 60, None
    while time.time() < deadline:
        during = s.fairkv_info()
        if all(r["pages_used"] > 0 for r in during["ranks"]):
            break
        time.sleep(0.2)
    assert all(r["rows_in_use"] > 0 for r in during["ranks"]), during["ranks"]
    assert 0 < during["memory_busy_rate"] <= 1 and during["busy_rate"] == during["memory_busy_rate"]  # alias
    assert during["ledger_matches_pool"]  # rank 0's own pool vs the ledger's count for rank 0
    requests.post(s.url + "/abort_request", json={"rid": rid}, timeout=30)
    t.join(timeout=120)
    assert [r["pages_used"] for r in wait_ranks_empty(s)[0]["ranks"]] == [0, 0]
    assert s.greedy_ids(PROMPTS[0], 4)  # still serving: no rank's idle check failed
    assert s.proc.poll() is None


@pytest.mark.xdist_group("tp2-edge")
def test_prefix_reuse_under_the_edge_plan_changes_no_token(edge_server):
    """The dense prefix tier under a plan whose ranks hold different heads per layer (rank 0 none in
    layer 1, copies in layers 0 and 2): a prompt sent again reuses its cached prefix (all but the window)
    on both ranks, and a third time after a flush (no reuse): the same tokens each time."""
    s = edge_server
    requests.post(s.url + "/flush_cache", timeout=60)
    p = list(range(401, 431))  # 30 tokens: small enough for this small pool to cache
    first = s.greedy(p, N_NEW)
    again = s.greedy(p, N_NEW)
    assert first["meta_info"]["cached_tokens"] == 0 and again["meta_info"]["cached_tokens"] == len(p) - 8
    ranks = wait_ranks_empty(s)[0]["ranks"]
    assert [r["pages_used"] for r in ranks] == [0, 0] and all(r["prefix_tier_pages"] for r in ranks), ranks
    assert requests.post(s.url + "/flush_cache", timeout=60).status_code == 200
    assert [r["prefix_tier_pages"] for r in s.fairkv_info()["ranks"]] == [0, 0]
    third = s.greedy(p, N_NEW)
    assert first["output_ids"] == again["output_ids"] == third["output_ids"]
    assert third["meta_info"]["cached_tokens"] == 0


@pytest.mark.xdist_group("tp2-edge")
def test_malformed_requests_keep_the_tp2_plan_server_serving(edge_server, tp1_reference):
    """Every malformed request kind (helpers/malformed.py) gets a 4xx naming the problem, good requests
    interleaved with them get the answers they got alone, both ranks stay up, and every rank's pool and
    the ledger end empty."""
    from helpers.malformed import CASES, fuzz

    seen = fuzz(edge_server, seed=2, chat=False)
    assert len(seen) == len(CASES)
    info = wait_ranks_empty(edge_server)[0]
    assert [r["pages_used"] for r in info["ranks"]] == [0, 0] and info["ledger_matches_pool"], info
    assert edge_server.greedy_ids(PROMPTS[1], N_NEW) == tp1_reference[1]


@pytest.mark.xdist_group("tp2-edge")
def test_soak_with_aborts_and_disconnects_returns_every_page(edge_server, tp1_reference):
    """A bounded soak at TP 2 with copies: 48 requests from 8 concurrent clients, random prompt lengths
    and output lengths, a third aborted at a random moment (``/abort_request``), a sixth streamed and
    dropped by the client. Throughout, rank 0's pool matches the ledger; at the end every rank's pages
    are back, replica shares stay near the plan, and the server still gives TP = 1's tokens."""
    import queue
    import random

    rng = random.Random(7)
    jobs: queue.Queue = queue.Queue()
    for i in range(48):
        kind = rng.choices(["normal", "abort", "disconnect"], weights=[3, 2, 1])[0]
        ids = [rng.randrange(3, 400) for _ in range(rng.randrange(5, 300))]
        jobs.put((i, kind, ids, rng.randrange(4, 64), rng.random()))
    errors: list[str] = []
    mismatches: list[dict] = []
    done = threading.Event()

    def generate(body):
        return requests.post(edge_server.url + "/generate", json=body, timeout=600)

    def client():
        while True:
            try:
                i, kind, ids, n_new, u = jobs.get_nowait()
            except queue.Empty:
                return
            body = {"input_ids": ids, "rid": f"soak-{i}",
                    "sampling_params": {"max_new_tokens": n_new, "temperature": 0.0, "ignore_eos": True}}
            if kind == "normal":
                r = generate(body)
                if r.status_code != 200 or len(r.json()["output_ids"]) != n_new:
                    errors.append(f"{i}: {r.status_code} {r.text[:200]}")
            elif kind == "abort":
                t = threading.Thread(target=generate, args=(body,))
                t.start()
                t.join(timeout=u)  # abort at a random moment: queued, prefilling, decoding or done
                requests.post(edge_server.url + "/abort_request", json={"rid": f"soak-{i}"}, timeout=30)
                t.join(timeout=300)
            else:
                with requests.post(edge_server.url + "/generate", json={**body, "stream": True}, stream=True,
                                   timeout=600) as r:
                    for k, line in enumerate(r.iter_lines()):
                        if k >= int(u * 4):
                            break  # the client goes away mid-stream

    def monitor():
        while not done.is_set():
            info = edge_server.fairkv_info()
            if not info["ledger_matches_pool"]:
                mismatches.append(info)
            done.wait(0.2)

    mon = threading.Thread(target=monitor)
    mon.start()
    clients = [threading.Thread(target=client) for _ in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=600)
    done.set()
    mon.join()
    assert not errors, errors
    assert not mismatches, mismatches[:2]
    info = wait_ranks_empty(edge_server)[0]
    assert [r["pages_used"] for r in info["ranks"]] == [0, 0], info["ranks"]
    assert [r["rows_in_use"] for r in info["ranks"]] == [0, 0], info["ranks"]
    assert info["ledger_matches_pool"]
    for rep in info["replicas"]:
        err = np.abs(np.array(rep["served"]) - np.array(rep["planned"]))
        assert err.max() < 0.15, rep
    assert edge_server.greedy_ids(PROMPTS[2], N_NEW) == tp1_reference[2]
    assert edge_server.proc.poll() is None
