"""Beyond one server process, end to end on CPU: SGLang's data-parallel replicas (``--dp-size 2``),
tensor parallelism across two node processes (``--nnodes 2``, gloo) with a FairKV plan with copies, and
sglang-router over two compressed servers.

Reference: kvpress's AdaKV greedy tokens (its own venv, fp32, TP 1) for SmolLM2 -- which the TP 1 server
equals (test_fairkv_server) -- so every replica, every rank layout and every route must give them
exactly. Every test ends with every process's pool empty (the ledger's view of each rank, and SGLang's
strict idle check on every rank: a leaked page would stop the server).
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
from helpers.server import REPO, STRICT, Server, free_port, group_alive, server_env, wait_ranks_empty

pytestmark = [pytest.mark.server, pytest.mark.slow]

#: SmolLM2's kept tokens per (layer, KV head) measured with AdaKV: the fairkv plan copies heads from it
REPO_STATS = REPO / "benchmark" / "calibration" / "smollm2-adakv-r0.75.json"


def adakv_args():
    from helpers.fairkv_refs import RATIO

    return ["--kv-compress", "adakv", "--kv-compress-ratio", str(RATIO)]


def test_dp2_replicas_equal_kvpress_on_both_and_report_per_replica(smollm2_path, fairkv_references,
                                                                   fairkv_prompts):
    """``--dp-size 2 --kv-compress adakv``: SGLang's DP controller starts two schedulers, our hooks reach
    both (each its own ragged pool, ledger and assigner); requests routed to either replica
    (``meta_info.dp_rank``) give kvpress's tokens; ``/server_info`` and the Prometheus gauges carry a
    ``dp_rank`` per replica; both pools are empty afterwards."""
    from helpers.fairkv_refs import N_NEW

    with Server(["--dp-size", "2", *adakv_args(), "--enable-metrics"], env=STRICT) as s:
        seen = {}
        for i, ids in enumerate(fairkv_prompts):  # round robin: one prompt on each replica
            out = s.greedy(ids, N_NEW)
            seen.setdefault(out["meta_info"]["dp_rank"], []).append((i, out["output_ids"]))
        states = wait_ranks_empty(s)
        metrics = requests.get(s.url + "/metrics", timeout=30).text
        # the control plane reaches every replica (each its own group); at TP 1 there is nothing to switch
        plans = requests.get(s.url + "/fairkv/plan", timeout=30).json()["replicas"]
        switch = requests.post(s.url + "/fairkv/replan", json={"plan": plans[0]["plan"], "mode": "migrate"},
                               timeout=120)
        after_switch = s.greedy_ids(fairkv_prompts[0], N_NEW)
        log = s.log_text()
    assert sorted(p["dp_rank"] for p in plans) == [0, 1] and all(p["epoch"] == 0 for p in plans)
    assert switch.status_code == 400 and all("TP 1" in r["error"] for r in switch.json()["replicas"]), switch.text
    assert after_switch == fairkv_references["adakv"][0]
    assert sorted(seen) == [0, 1], f"requests reached DP ranks {sorted(seen)}"
    for dp, outs in seen.items():
        for i, got in outs:
            assert got == fairkv_references["adakv"][i], f"DP rank {dp}, prompt {i}"
    assert sorted(st["dp_rank"] for st in states) == [0, 1]
    assert all(r["pages_used"] == 0 for st in states for r in st["ranks"])
    assert all(st["requests_admitted"] == 0 and st["ledger_matches_pool"] for st in states)
    for dp in (0, 1):
        assert f'dp_rank="{dp}"' in metrics and "sglang:fairkv_pages_used" in metrics
    assert "DP replica 0, rank 0/1 ragged KV pool" in log and "DP replica 1, rank 0/1 ragged KV pool" in log


def test_two_node_tp2_with_copies_equals_tp1_and_a_dead_node_stops_the_group(
        smollm2_path, fairkv_references, fairkv_prompts, tmp_path):
    """TP 2 over two node processes on this machine (``--nnodes 2 --node-rank 0/1``, gloo) serving a
    FairKV plan with copies: kvpress's (TP 1) tokens; a client that disconnects mid-request frees its
    pages on both nodes (the ledger mirrors both ranks; node 1's strict idle check would stop the
    group on a leak). Killing node 1 stops node 0 within 60 s with our message, not a hang."""
    from helpers.fairkv_refs import N_NEW

    from sglang_fairkv.placement.runtime import sha_plan
    from sglang_fairkv.placement.stats import load_stats

    stats = tmp_path / "smollm2.json"
    load_stats(REPO_STATS).save(stats)
    dist = f"127.0.0.1:{free_port()}"
    common = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", dist, *adakv_args(),
              "--fairkv-plan", "fairkv", "--fairkv-stats", str(stats)]
    node1 = Server([*common, "--node-rank", "1"], env=STRICT).launch()  # healthy only once node 0 joins
    try:
        with Server([*common, "--node-rank", "0"], env=STRICT) as s:
            got = [s.greedy_ids(ids, N_NEW) for ids in fairkv_prompts]
            info = s.fairkv_info()
            # a migrate across the node boundary while a request decodes (the copies' segments go back to
            # their heads' single ranks under sha): tokens unchanged
            ref_long = s.greedy_ids(fairkv_prompts[1], 2 * N_NEW)
            out: dict = {}
            t = threading.Thread(target=lambda: out.update(ids=s.greedy_ids(fairkv_prompts[1], 2 * N_NEW)))
            t.start()
            while s.fairkv_info()["requests_admitted"] == 0 and t.is_alive():
                time.sleep(0.05)
            mig = requests.post(s.url + "/fairkv/replan", json={"plan": sha_plan("smollm2", 30, 3, 9, 2).to_json(),
                                                                  "mode": "migrate"}, timeout=300)
            t.join()
            assert mig.status_code == 200 and mig.json()["verified"], mig.text
            assert out["ids"] == ref_long
            moved = mig.json()["moved"]
            try:  # a client that gives up mid-decode: its pages come back on both ranks
                s.greedy(fairkv_prompts[1], 400, timeout=3)
            except OSError:  # the client's timeout (urllib: TimeoutError or URLError)
                pass
            after = wait_ranks_empty(s)[0]
            assert s.greedy_ids(fairkv_prompts[0], N_NEW) == got[0]  # still serving
            log = s.log_text()
            assert "--dist-timeout 300" in log
            node1.stop()  # SIGKILL of node 1's whole process group
            t0 = time.time()
            while time.time() - t0 < 60 and s.proc.poll() is None:
                time.sleep(0.5)
            stopped_s = time.time() - t0
            log = s.log_text()
            pgid = s.proc.pid
            deadline = time.time() + 20
            while time.time() < deadline and group_alive(pgid):
                time.sleep(0.25)
            node0_gone = not group_alive(pgid)
    finally:
        node1.stop()
    assert got == [fairkv_references["adakv"][i] for i in range(len(fairkv_prompts))]
    assert sum(info["plan_copies_per_layer"]) >= 1 and len(info["ranks"]) == 2
    assert moved["segments"] > 0 and moved["kv_bytes"] > 0, moved
    assert [r["pages_used"] for r in after["ranks"]] == [0, 0] and after["requests_admitted"] == 0
    assert stopped_s < 60, f"node 0 still up {stopped_s:.0f} s after node 1 died"
    assert node0_gone, "processes of node 0 survived"
    assert "lost a member of its TP group" in log, log[-3000:]


def test_router_spreads_over_two_compressed_servers_with_equal_tokens(smollm2_path, fairkv_references,
                                                                      fairkv_prompts, tmp_path):
    """``serve_router``'s group: two fairkv servers (AdaKV) behind sglang-router 0.3.2 (round robin):
    each replica serves one of the two requests (besides its own warm-up), both answers are kvpress's,
    both pools end empty."""
    from helpers.fairkv_refs import N_NEW

    from sglang_fairkv.serving.router_group import RouterGroup

    with RouterGroup([*adakv_args(), "--model-path", str(smollm2_path)], replicas=2, env=server_env(STRICT),
                     log_dir=tmp_path, on_cpu=True, policy="round_robin") as g:
        outs = [g.router.greedy_ids(fairkv_prompts[0], N_NEW) for _ in range(2)]
        served = [s.log_text().count('"POST /generate HTTP/1.1" 200') for s in g.servers]
        states = [wait_ranks_empty(s)[0] for s in g.servers]
    assert outs == [fairkv_references["adakv"][0]] * 2
    assert all(n >= 2 for n in served), f"generate requests per replica {served} (warm-up included)"
    assert all(r["pages_used"] == 0 for st in states for r in st["ranks"])
