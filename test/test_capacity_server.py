"""Admission by the compressed size, end to end: a real CPU server whose KV pool holds only a
few dense prompts, sent more requests at once than that.

The dense prefix tier is on (the default) and holds cached prompts when the burst arrives (short prompts
sent first, each cached): they are evicted as admission needs their pages, so the burst decodes as
many requests at once as without a tier.

The dense rule (stock SGLang: the whole prompt plus ``max_new_tokens`` per request) fits
``max_total_tokens // (prompt + new)`` requests; at AdaKV ratio 0.75 a request keeps a quarter of its
prompt, so about three times as many must decode at once, every request must complete with all its
tokens, nothing may be retracted, and the pool must empty afterwards (strict idle check on).
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import requests
from helpers.server import STRICT, Server

pytestmark = [pytest.mark.server]

MAX_TOTAL, PROMPT, NEW, CONCURRENCY = 1024, 256, 8, 12


def test_small_pool_decodes_three_times_the_dense_requests_at_once():
    dense = MAX_TOTAL // (PROMPT + NEW)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(100, 20000, size=PROMPT).tolist() for _ in range(CONCURRENCY)]
    args = ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75", "--max-total-tokens", str(MAX_TOTAL),
            "--max-running-requests", "32", "--context-length", "2048", "--decode-log-interval", "1"]
    with Server(args, env=STRICT) as s:
        for i in range(6):  # cached prompts in the tier (each 48 tokens: small enough to be cached)
            s.generate({"input_ids": rng.integers(100, 20000, size=48).tolist(),
                        "sampling_params": {"max_new_tokens": 1}})
        tier = s.fairkv_info()["prefix_tier"]
        assert tier["cached_tokens"] >= 6 * 48 and tier["pages"] >= 0.25 * s.fairkv_info()["pages_total"], tier
        outs: list[dict | None] = [None] * CONCURRENCY

        def send(i):
            outs[i] = requests.post(s.url + "/generate", json={"input_ids": prompts[i], "sampling_params": {
                "max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}}, timeout=900).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(CONCURRENCY)]
        for t in threads:
            t.start()
        seen = []
        while any(t.is_alive() for t in threads):
            seen.append(s.fairkv_info())
            time.sleep(0.2)
        for t in threads:
            t.join()
        assert all(o is not None and len(o["output_ids"]) == NEW for o in outs), outs
        log = s.log_text()
        running = max((int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", log)), default=0)
        assert running >= 3 * dense, (running, dense)
        assert "#retracted_reqs" not in log  # SGLang logs "KV cache pool is full. Retract requests."
        # the tier gave its pages to the burst (evicted before any request waited for them)
        assert seen[-1]["prefix_tier"]["evicted_blocks"] > 0, seen[-1]["prefix_tier"]
        busy = [x for x in seen if x["requests_admitted"] > dense]
        assert busy, "never more requests admitted than the dense rule holds"
        x = busy[-1]
        assert sum(x["kept_rows"]) > 0 and x["admissible_when_empty"] >= 3 * dense, x
        assert sum(x["kept_rows"]) + sum(x["transient_rows"]) == x["rows_in_segments"], x
        deadline = time.time() + 60
        while s.fairkv_info()["pages_used"] and time.time() < deadline:
            time.sleep(0.3)
        st = s.fairkv_info()
        assert st["pages_used"] == 0 and st["requests_admitted"] == 0, st
        assert st["peak_pages_used"] <= st["pages_total"]
        # a prompt longer than the pool holds dense is refused, and told why compression does not lift it
        r = requests.post(s.url + "/generate", json={"input_ids": [5] * 1900, "sampling_params": {
            "max_new_tokens": 4}}, timeout=120)
        assert r.status_code == 400, r.text
        assert "exceeds the maximum allowed length" in r.text and "With --kv-compress the limit is still the " \
            "dense size" in r.text, r.text
        assert s.generate({"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 2}})["output_ids"]
