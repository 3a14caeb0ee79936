"""Decode-time compression end to end (``--kv-decode-compress``): real CPU servers against kvpress 0.5.5's
``DecodingPress`` / ``PrefillDecodingPress`` run live in its own venv (fp32, the three stated changes of a
server that frees pages: test/helpers/kvpress_decode.py), and the capacity it buys long generations.

kvpress's settings throughout: ``DecodingPress(base, compression_interval=16, target_size=64)`` with
``SnapKVPress(window_size=8)`` (``--kv-decode-interval 16 --kv-decode-window 8 --kv-decode-budget 64``), 64
new tokens (63 decode steps: compressions after steps 16, 32 and 48). Every case was chosen where the decode
press changes the tokens (vs dense, vs prefill-only): SmolLM2 often repeats itself, and a comparison that the
feature does not move proves nothing. Elsewhere, on servers whose own checks never reach a decode interval:
DecodingPress with SnapKV alone and PrefillDecodingPress (SnapKV 0.5 at prefill, DecodingPress(AdaKV) at
budget 48) at TP 1 in test_fairkv_methods; PrefillDecodingPress (AdaKV 0.5 + AdaKV 48) at TP 2 through a
plan with copies, with a prefix-cache hit, in test_tp_fairkv.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import requests
from helpers.fairkv_refs import DECODE_K, DECODE_N, DECODE_W, decode_press, decode_references
from helpers.server import STRICT, Server

pytestmark = [pytest.mark.server]

N, K, W = DECODE_N, DECODE_K, DECODE_W
DECODE = ["--kv-decode-interval", str(K), "--kv-decode-window", str(W)]
LAYERS, KV_HEADS = 30, 3  # SmolLM2-135M


def wait_empty(server, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        st = server.fairkv_info()
        if (st["pages_used"] == 0 and st["requests_admitted"] == 0) or time.time() > deadline:
            return st
        time.sleep(0.3)


def greedy_equals_and_changes(server, prompts, want, without) -> None:
    """Each prompt's 64 greedy tokens equal kvpress's ``want`` and differ from ``without`` (kvpress without the
    decode press): a case the feature does not move would prove nothing."""
    for ids, w, wo in zip(prompts, want, without):
        got = server.greedy_ids(ids, N)
        assert got == w
        assert got != wo, "the decode press did not change these tokens: pick another case"


def check_decode_stats(server, before: dict, requests_done: int) -> dict:
    """Each finished request was compressed after steps 16, 32 and 48, evicted rows, and left nothing."""
    st = wait_empty(server)
    dc = st["decode_compress"]
    assert st["pages_used"] == 0 and st["requests_admitted"] == 0, st
    assert dc["request_compressions"] - before["request_compressions"] == 3 * requests_done, dc
    assert dc["rows_evicted_total"] > before["rows_evicted_total"], dc
    assert dc["running_rows_evicted"] == 0 and dc["query_ring_bytes"] > 0, dc
    return dc


@pytest.fixture(scope="module")
def adakv_decode_server():
    """DecodingPress(AdaKV(SnapKV)) alone; a pool of 5000 tokens (two dense 200 + 2048-token requests)."""
    args = ["--kv-decode-compress", "adakv", "--kv-decode-budget", "64", *DECODE, "--max-total-tokens", "5000",
            "--max-running-requests", "64", "--context-length", "4096", "--decode-log-interval", "1"]
    with Server(args, env=STRICT) as s:
        yield s


@pytest.mark.xdist_group("decode-adakv")
def test_adakv_decoding_press_equals_kvpress(adakv_decode_server, decode_prompts, smollm2_path, kvpress_python,
                                             shared, tmp_path_factory):
    prompts = [decode_prompts[600]]
    ref = shared("decode-ref-adakv", lambda: decode_references(
        kvpress_python, smollm2_path, prompts, N, [decode_press("adakv", 64), None],
        tmp_path_factory.mktemp("kvp-dec")))
    s = adakv_decode_server
    info = s.fairkv_info()
    before, seen = info["decode_compress"], (info["live_profile"] or {}).get("seen", 0)
    greedy_equals_and_changes(s, prompts, ref[0], ref[1])
    dc = check_decode_stats(s, before, len(prompts))
    assert (dc["method"], dc["budget"], dc["interval"], dc["window"]) == ("adakv", 64, K, W)
    # the live profile (what a re-plan is made from) sampled every decode-time compression's kept sizes: the
    # prompts themselves were not compressed (no --kv-compress), each generation was three times
    profile = s.fairkv_info()["live_profile"]
    assert profile["seen"] - seen == 3 * len(prompts), profile
    assert profile["decode_method"] == "adakv" and profile["decode_budget"] == 64, profile


def running_at_once(server, prompts: list[list[int]], new: int, settle_steps: int, check=None) -> int:
    """Sends every prompt at once (greedy, ``ignore_eos``, ``new`` tokens), waits until no request is in
    its prefill and ``settle_steps`` decode batches ran at the most requests seen; returns that number
    (SGLang's own ``Decode batch, #running-req`` log line). ``check(info)`` is called on every poll. Then
    aborts everything and waits for an empty pool."""
    outs: list = [None] * len(prompts)

    def send(i):
        outs[i] = requests.post(server.url + "/generate", json={"input_ids": prompts[i], "sampling_params": {
            "max_new_tokens": new, "temperature": 0.0, "ignore_eos": True}}, timeout=900).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    start = len(server.log_text())
    deadline = time.time() + 300
    most = 0
    try:
        while time.time() < deadline:
            info = server.fairkv_info()
            if check is not None:
                check(info)
            runs = [int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", server.log_text()[start:])]
            if runs and info["requests_in_prefill"] == 0:
                most = max(runs)
                if sum(r == most for r in runs) >= settle_steps:
                    break
            time.sleep(0.3)
    finally:
        requests.post(server.url + "/abort_request", json={"rid": "", "abort_all": True}, timeout=30)
        for t in threads:
            t.join(timeout=120)
    assert all(o is not None and o["meta_info"]["finish_reason"]["type"] == "abort" for o in outs), outs
    st = wait_empty(server)
    assert st["pages_used"] == 0 and st["requests_admitted"] == 0, st
    return most


@pytest.mark.xdist_group("decode-adakv")
def test_long_generations_decode_many_times_more_at_once(adakv_decode_server):
    """200-token prompts generating 2048 tokens, at equal KV bytes (5000 tokens): a server without
    decode-time compression (the ragged pool, every token kept) decodes the dense rule's two at once; with
    it (budget 64, interval 16) each request is charged its bounded size and about ten times as many decode
    together. Once every running request was compressed, no layer of any holds more than KV x (budget +
    interval) rows (AdaKV's per-layer bound); SGLang retracts nothing; aborting returns every page."""
    from sglang_fairkv.compress.footprint import kept_pages
    from sglang_fairkv.compress.policy import CompressConfig

    rng = np.random.default_rng(5)
    prompt, new = 200, 2048
    prompts = [rng.integers(100, 20000, size=prompt).tolist() for _ in range(23)]
    dense_rule = 5000 // (prompt + new)
    with Server(["--kv-compress", "none", "--max-total-tokens", "5000", "--max-running-requests", "64",
                 "--context-length", "4096", "--decode-log-interval", "1"], env=STRICT) as base:
        without = running_at_once(base, prompts[:6], new, settle_steps=3)
    assert without == dense_rule == 2

    bounded: list[dict] = []

    def check(info):
        dc = info["decode_compress"]
        if info["requests_admitted"] and dc["running_compressed_requests"] == info["requests_admitted"]:
            # every running request compressed: rows per layer within KV x (budget + interval) each
            assert info["rows_in_segments"] <= info["requests_admitted"] * LAYERS * KV_HEADS * (64 + K), info
            bounded.append(info)

    s = adakv_decode_server
    with_dc = running_at_once(s, prompts, new, settle_steps=24, check=check)
    cfg = CompressConfig(decode_method="adakv", decode_budget=64, decode_interval=K, decode_window=W)
    owner = np.zeros((LAYERS, KV_HEADS), dtype=np.int64)
    per_request = int(kept_pages(cfg, prompt, new, owner, 1, 16).sum())  # what admission charges, in pages
    predicted = s.fairkv_info()["pages_total"] // per_request
    assert with_dc >= 5 * without and with_dc >= predicted - 2, (with_dc, without, predicted)
    assert bounded, "no poll saw every running request compressed"
    assert "#retracted_reqs" not in s.log_text()
