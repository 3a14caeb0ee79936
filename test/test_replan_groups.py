"""Re-planning beyond one hand-driven TP group: ``--fairkv-auto-replan`` and DP replicas.

``--fairkv-auto-replan GAIN``: the group re-plans by itself from the live profile (migrate), once. The tiny 6-KV-head model at TP 2 starts on ``sha`` with AdaKV; after ``--fairkv-auto-replan-min-samples``
compressed prompts rank 0 finds the gain of a fresh plan >= 1.0, plans and broadcasts it, and the group
migrates while those prompts decode; the interval (an hour) keeps it to one switch. Tokens equal TP 1's
(float32: any plan gives them) and a second round under the new plan; pages return to 0.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from helpers.server import STRICT, Server, fairkv_states, generate_in_background, wait_ranks_empty
from test_tp_fairkv import ADAKV, N_NEW, PROMPTS, edge_plan, tp1_reference, tp1_run  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.xdist_group("replan-groups")]


def _run(s, n):
    out, threads = generate_in_background(s, PROMPTS, n)
    for t in threads:
        t.join()
    return [o["output_ids"] for o in out]


def test_auto_replan_switches_once_while_requests_decode(tiny_kv6_path, tp1_reference):
    env = {**STRICT, "FAIRKV_AUTO_REPLAN_CHECK_STEPS": "4"}
    with Server(["--model-path", str(tiny_kv6_path), "--tp-size", "2", *ADAKV, "--fairkv-plan", "sha",
                 "--fairkv-auto-replan", "1.0", "--fairkv-auto-replan-interval", "3600",
                 "--fairkv-auto-replan-min-samples", str(len(PROMPTS))], env=env) as s:
        assert s.fairkv_info()["replan"]["switches"] == 0
        first = _run(s, 64)
        info = wait_ranks_empty(s)[0]
        second = _run(s, 64)
        after = wait_ranks_empty(s)[0]
        plan = requests.get(s.url + "/fairkv/plan", timeout=30).json()
        log = s.log_text()
    rp = info["replan"]
    assert rp["switches"] == rp["auto_switches"] == 1 and info["plan_epoch"] == 1, json.dumps(rp)
    assert rp["last"]["auto"] and rp["last"]["mode"] == "migrate" and rp["last"]["verified"], rp
    assert rp["last"]["moved"]["segments"] > 0, rp  # the switch ran while the first round decoded
    assert rp["last_auto_gain"] >= 1.0
    assert "automatic re-plan armed" in log and "plan switched (migrate, automatic)" in log
    assert [t[:N_NEW] for t in first] == tp1_reference and second == first
    assert after["replan"]["switches"] == 1 and plan["epoch"] == 1 and plan["plan"]["strategy"] != "sha"
    assert [r["pages_used"] for r in after["ranks"]] == [0, 0] and after["ledger_matches_pool"]


def test_dp2_each_replica_migrates_its_own_tp_group(tiny_kv6_path, tp1_reference, tmp_path):
    """``--dp-size 2 --tp-size 2`` (chunked prefill, 32 tokens): one ``POST /fairkv/replan`` reaches both
    replicas (each a TP group with its own pool, ledger and assigner). The edge plan puts all 6 heads of a
    layer on one rank: refused on both (400 naming ``--fairkv-replan-head-slots``; the pools reserve 4).
    A plan with 4 + 2 heads and a copy: each replica migrates its own running requests (the switch waits
    for open chunked prefills); one answer per replica, every request's tokens equal TP 1's, both groups'
    pages return to 0."""
    from sglang_fairkv.placement.schema import Plan, load_plan

    too_wide = load_plan(str(edge_plan(tmp_path / "edge.json"))).to_json()
    layer = [[(0, 0.5), (1, 0.5)], [(0, 1.0)], [(0, 1.0)], [(0, 1.0)], [(1, 1.0)], [(1, 1.0)]]  # 4 + 3 heads
    target = Plan(model="tiny-kv6", tp=2, num_kv_heads=6, strategy="fairkv", cost_model={"c_head": 0, "c_token": 1},
                  layers=[[list(h) for h in layer] for _ in range(3)], num_q_heads=12).to_json()
    with Server(["--model-path", str(tiny_kv6_path), "--tp-size", "2", "--dp-size", "2", *ADAKV,
                 "--fairkv-plan", "sha", "--fairkv-replan-head-slots", "4", "--chunked-prefill-size", "32"],
                env=STRICT) as s:
        wide = requests.post(s.url + "/fairkv/replan", json={"plan": too_wide, "mode": "migrate"}, timeout=120)
        out, threads = generate_in_background(s, PROMPTS, 64)
        deadline = time.time() + 60
        while time.time() < deadline and sum(st["requests_admitted"] for st in fairkv_states(s)) < len(PROMPTS):
            time.sleep(0.02)
        r = requests.post(s.url + "/fairkv/replan", json={"plan": target, "mode": "migrate"}, timeout=300)
        for t in threads:
            t.join()
        states = wait_ranks_empty(s)
        plans = requests.get(s.url + "/fairkv/plan", timeout=30).json()["replicas"]
    assert wide.status_code == 400, wide.text
    assert all("--fairkv-replan-head-slots" in x["error"] for x in wide.json()["replicas"]), wide.text
    assert r.status_code == 200, r.text
    replies = r.json()["replicas"]
    assert sorted(x["dp_rank"] for x in replies) == [0, 1]
    assert all(x["success"] and x["verified"] and x["epoch"] == 1 for x in replies), replies
    assert sum(x["running_requests"] for x in replies) >= 1  # requests decoding through the switch
    assert [o["output_ids"][:N_NEW] for o in out] == tp1_reference
    assert sorted({o["meta_info"]["dp_rank"] for o in out}) == [0, 1]
    assert sorted(p["dp_rank"] for p in plans) == [0, 1] and all(p["epoch"] == 1 for p in plans)
    assert all(q["pages_used"] == 0 for st in states for q in st["ranks"]) and all(st["ledger_matches_pool"]
                                                                                   for st in states)

