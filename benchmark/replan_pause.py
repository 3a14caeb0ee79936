"""The drain switch on a real TP 2 server (issue 34): how long the drain and the pause take.

    .venv/bin/python benchmark/replan_pause.py [--requests 8] [--new-tokens 64]

SmolLM2 (embedded), AdaKV 0.5, started on ``--fairkv-plan assign`` (heads 2 + 1 and 1 + 2 alternating:
every rank's pool has two head slots); ``--requests`` greedy requests decode when ``POST /fairkv/replan``
asks for sha (``"mode": "drain"``), then the switch back at an idle server. Prints the replies' drain and
pause (the commit: tier flush, state, the changed layers' weights re-read from the checkpoint) and checks
that every request finished with the tokens it gives without a switch.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import requests

from sglang_fairkv.placement.runtime import sha_plan
from sglang_fairkv.server_process import ServerProcess


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 20000, size=int(n)).tolist() for n in rng.integers(200, 600, size=a.requests)]
    args = ["--tp-size", "2", "--kv-compress", "adakv", "--fairkv-plan", "assign"]

    def gen(s, p, n):
        return requests.post(s.url + "/generate", json={"input_ids": p, "sampling_params": {
            "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}, timeout=1200).json()["output_ids"]

    with ServerProcess(args, startup_timeout=300) as s:
        want = [gen(s, p, a.new_tokens) for p in prompts]
        a_plan = requests.get(s.url + "/fairkv/plan", timeout=30).json()
        sha = sha_plan("smollm2", 30, 3, 9, 2).to_json()
        outs: list = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, gen(s, prompts[i], a.new_tokens)))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.time()
        r1 = requests.post(s.url + "/fairkv/replan", json={"plan": sha, "mode": "drain"}, timeout=1200).json()
        wall1 = time.time() - t0
        for t in threads:
            t.join()
        t0 = time.time()
        r2 = requests.post(s.url + "/fairkv/replan", json={"plan": a_plan["plan"], "mode": "drain"}, timeout=600).json()
        wall2 = time.time() - t0
        after = [gen(s, p, a.new_tokens) for p in prompts[:2]]
    same = outs == want and after == want[:2]
    print(json.dumps({"switch_under_load": {k: r1.get(k) for k in ("success", "epoch", "drain_ms", "pause_ms")}
                      | {"layers_resliced_on_rank_0": len(r1.get("layers_resliced_here") or []),
                         "wall_s": round(wall1, 3)},
                      "switch_idle": {k: r2.get(k) for k in ("success", "epoch", "drain_ms", "pause_ms")}
                      | {"wall_s": round(wall2, 3)}, "tokens_unchanged": same}))
    return 0 if same and r1.get("success") and r2.get("success") else 1


if __name__ == "__main__":
    sys.exit(main())
