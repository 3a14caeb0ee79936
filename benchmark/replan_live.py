"""The plan follows the traffic (issue 34): a TP 3 server re-plans from its live profile while requests decode.

    .venv/bin/python benchmark/replan_live.py [--seconds 60] [--clients 6] [--new-tokens 48]

SmolLM2 (embedded) at TP 3, AdaKV 0.75, started on ``sha`` (one KV head per rank per layer: the plan made
from the shape alone, which the per-head kept lengths of AdaKV unbalance), ``--fairkv-replan-head-slots 3``.
``--clients`` closed-loop clients send greedy requests (random prompt ids, 300-900 tokens, ``--new-tokens``
each, ignore_eos): ``--seconds`` / 2 of warm-up, ``--seconds`` measured, then, with the clients still running,
``POST /fairkv/replan {"from_live": true, "strategy": "fairkv", "mode": "migrate"}``, ``--seconds`` measured,
and the switch back to sha (the copies' segments move back). Prints, before and after the first switch:
requests/s completed, the attention busy rate sampled over the decode steps served (the live-balance figure
since start; a switch restarts it), the cost-model gain the drift report saw; and each switch's reply (pause,
time waiting for a step boundary, KV and weight bytes moved, the live KV then).
Also: greedy tokens of 3 fixed prompts before and after the switch (bf16 on this CPU: regrouping the
per-layer TP sums may flip a near tie, as a restart with the new plan would).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import requests

from sglang_fairkv.server_process import ServerProcess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()
    args = ["--tp-size", "3", "--kv-compress", "adakv", "--kv-compress-ratio", "0.75", "--fairkv-plan", "sha",
            "--fairkv-replan-head-slots", "3"]
    fixed = [np.random.default_rng(i).integers(100, 20000, size=500).tolist() for i in range(3)]

    def gen(s, p, n):
        return requests.post(s.url + "/generate", json={"input_ids": p, "sampling_params": {
            "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}, timeout=1200).json()["output_ids"]

    done: list[float] = []  # completion times
    stop = threading.Event()

    def client(s, seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            p = rng.integers(100, 20000, size=int(rng.integers(300, 900))).tolist()
            gen(s, p, a.new_tokens)
            done.append(time.time())

    def switch(s, body):
        t0 = time.time()
        reply = requests.post(s.url + "/fairkv/replan", json={**body, "mode": "migrate"}, timeout=600).json()
        tr = reply.get("transition") or {}
        row_bytes = tr["kv_bytes_moved"] / tr["rows_moved"] if tr.get("rows_moved") else 0
        return {k: reply.get(k) for k in ("success", "verified", "epoch", "drain_ms", "pause_ms", "kv_ms_here",
                                          "weights_ms_here", "moved", "graphs_recaptured", "running_requests")} | {
            "wall_s": round(time.time() - t0, 3), "segments_moved": tr.get("segments_moved"),
            "rows_moved": tr.get("rows_moved"), "rows_live": tr.get("rows_live"), "rounds": tr.get("rounds"),
            "kv_fraction_moved": round(tr["rows_moved"] / tr["rows_live"], 4) if tr.get("rows_live") else None,
            "kv_bytes_live": int(tr.get("rows_live", 0) * row_bytes) if row_bytes else None}

    with ServerProcess(args, startup_timeout=600) as s:
        sha = requests.get(s.url + "/fairkv/plan", timeout=30).json()["plan"]
        tokens_before = [gen(s, p, 24) for p in fixed]
        clients = [threading.Thread(target=client, args=(s, i)) for i in range(a.clients)]
        for t in clients:
            t.start()
        time.sleep(a.seconds / 2)  # warm-up: the closed loop reaches its steady state (not counted)
        t0 = time.time()
        s.fairkv_info()
        time.sleep(a.seconds)
        before = s.fairkv_info()
        t1 = time.time()
        to_live = switch(s, {"from_live": True, "strategy": "fairkv", "max_copies_per_layer": 1})
        t2 = time.time()
        time.sleep(a.seconds)
        after = s.fairkv_info()
        t3 = time.time()
        back = switch(s, {"plan": sha})  # the copies' segments go back to the heads' single ranks
        stop.set()
        for t in clients:
            t.join()
        tokens_after = [gen(s, p, 24) for p in fixed]

    def rate(t0, t1):
        return round(sum(t0 <= x < t1 for x in done) / (t1 - t0), 4)

    out = {
        "machine": "CPU (2-core dev machine)", "args": args, "clients": a.clients, "seconds": a.seconds,
        "before (sha)": {"requests_per_s": rate(t0, t1),
                         "attention_busy_rate_sampled": before["attention_busy_rate_since_start"],
                         "replan_gain_seen": (before.get("plan_drift") or {}).get("replan_gain")},
        "switch to from_live fairkv": to_live,
        "after (fairkv from live)": {"requests_per_s": rate(t2, t3),
                                     "attention_busy_rate_sampled": after["attention_busy_rate_since_start"],
                                     "copies_per_layer": sorted(set(after.get("plan_copies_per_layer") or []))},
        "switch back to sha": back,
        "fixed_prompt_tokens_equal": [x == y for x, y in zip(tokens_before, tokens_after)],
    }
    print(json.dumps(out, indent=1))
    return 0 if to_live.get("success") and back.get("success") else 1


if __name__ == "__main__":
    sys.exit(main())
