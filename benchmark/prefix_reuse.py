"""Prefix reuse with compressed KV: TTFT and request throughput with the dense prefix tier on and off.

Two workloads, each run against a server with the tier (``--fairkv-prefix-tier 1``, the default) and
one without (``--fairkv-prefix-tier 0``), one after the other in this one script (same machine, same
model, same compression):

* **doc**: 32 requests over one shared document of ``--doc-tokens`` tokens (3000), each with its own
  question, ``--concurrency`` in flight;
* **chat**: 8 chats of 4 turns, all chats at once, each turn = the previous turn's prompt + its answer +
  a new message.

TTFT is the time to the first streamed token; throughput is requests per second over the workload's
wall time. The greedy tokens of the two servers are compared (reuse must not change them).

    .venv/bin/python benchmark/prefix_reuse.py            # SmolLM2 on this machine's CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang_fairkv.server_process import ServerProcess  # noqa: E402


def stream_one(url: str, ids: list[int], n: int) -> tuple[float, float, list[int], int]:
    """(ttft s, latency s, output ids, cached tokens) of one streamed greedy request."""
    t0 = time.perf_counter()
    ttft, out, meta = None, [], {}
    with requests.post(url + "/generate", stream=True, timeout=3600, json={
            "input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            msg = json.loads(line[5:])
            if ttft is None:
                ttft = time.perf_counter() - t0
            out, meta = msg.get("output_ids", out), msg.get("meta_info", meta)
    return ttft, time.perf_counter() - t0, out, int(meta.get("cached_tokens", 0))


def doc_workload(url, tok, rng, doc_tokens, n_req, concurrency, n_new):
    words = "river city stone garden library window market bridge lantern harbor orchard valley".split()
    doc = tok(" ".join(rng.choice(words) for _ in range(doc_tokens * 2)))["input_ids"][:doc_tokens]
    prompts = [doc + tok(f" Question {i}: what does the text say about the {rng.choice(words)} "
                         f"number {i}? Answer:")["input_ids"] for i in range(n_req)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(lambda p: stream_one(url, p, n_new), prompts))
    return time.perf_counter() - t0, res


def chat_workload(url, tok, rng, n_chats, n_turns, n_new):
    words = "please tell me about the weather plans for the trip and the food there".split()
    system = tok(" ".join(rng.choice(words) for _ in range(300)))["input_ids"][:300]
    results, lock = [], threading.Lock()

    def chat(c):
        ids = system + tok(f" User {c}: hello, tell me a story about number {c}.")["input_ids"]
        for turn in range(n_turns):
            r = stream_one(url, ids, n_new)
            with lock:
                results.append((c, turn, *r))
            ids = ids + r[2] + tok(f" User: and then what happened in part {turn + 2}?")["input_ids"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=chat, args=(c,)) for c in range(n_chats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.sort()
    return time.perf_counter() - t0, [r[2:] for r in results]


def run(tier: float, args, tok) -> dict:
    server_args = ["--kv-compress", args.method, "--kv-compress-ratio", str(args.ratio),
                   "--fairkv-prefix-tier", str(tier), "--max-total-tokens", str(args.max_total_tokens),
                   "--context-length", "8192"]
    out = {}
    with ServerProcess(server_args, startup_timeout=600) as s:
        for name in args.workloads:
            rng = np.random.default_rng(0)
            if name == "doc":
                wall, res = doc_workload(s.url, tok, rng, args.doc_tokens, args.doc_requests, args.concurrency,
                                         args.new_tokens)
            else:
                wall, res = chat_workload(s.url, tok, rng, args.chats, args.turns, args.new_tokens)
            ttft = [r[0] for r in res]
            out[name] = {"wall_s": wall, "req_per_s": len(res) / wall, "ttft_mean_s": statistics.mean(ttft),
                         "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": float(np.percentile(ttft, 90)),
                         "cached_tokens": sum(r[3] for r in res), "tokens": [r[2] for r in res]}
            requests.post(s.url + "/flush_cache", timeout=60)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="adakv")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--doc-tokens", type=int, default=3000)
    p.add_argument("--doc-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--chats", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-total-tokens", type=int, default=60000)
    p.add_argument("--workloads", nargs="+", default=["doc", "chat"], choices=["doc", "chat"])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from sglang_fairkv.embedded_model import prepare

    tok = AutoTokenizer.from_pretrained(str(prepare()))
    on, off = run(1.0, args, tok), run(0.0, args, tok)
    print("| workload | tier | req/s | TTFT mean s | TTFT p50 s | TTFT p90 s | cached tokens | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.workloads:
        for label, r in (("on", on[name]), ("off", off[name])):
            print(f"| {name} | {label} | {r['req_per_s']:.3f} | {r['ttft_mean_s']:.2f} | {r['ttft_p50_s']:.2f} | "
                  f"{r['ttft_p90_s']:.2f} | {r['cached_tokens']} | {r['wall_s']:.1f} |")
        same = on[name]["tokens"] == off[name]["tokens"]
        print(f"{name}: throughput x{on[name]['req_per_s'] / off[name]['req_per_s']:.2f}, TTFT mean "
              f"x{off[name]['ttft_mean_s'] / on[name]['ttft_mean_s']:.2f} lower with the tier; "
              f"greedy tokens identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"on": on, "off": off}, indent=1))


if __name__ == "__main__":
    main()
