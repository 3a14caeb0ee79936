"""``--kv-compress snapkv`` and ``none`` (with decode-time SnapKV) on a real CPU server (one server per test,
started after the references are computed; the adakv server of test_fairkv_server is gone by then)."""

from __future__ import annotations

import pytest
from helpers.fairkv_refs import N_NEW, RATIO
from helpers.server import STRICT, Server
from test_fairkv_server import wait_pool_empty

pytestmark = pytest.mark.server


def test_snapkv_greedy_equals_kvpress_and_prefill_decoding_press(fairkv_references, fairkv_prompts, decode_prompts,
                                                                  smollm2_path, kvpress_python, shared,
                                                                  tmp_path_factory):
    """SnapKV with prefix caching off (``--disable-radix-cache``: SGLang's radix cache disabled, no tier):
    the classic prefill, as before prefix caching existed. The server also compresses while decoding
    (``--kv-decode-compress adakv``, budget 48 every 16 steps), which the 16-token check never reaches: a
    64-token generation then equals kvpress's ``PrefillDecodingPress(SnapKVPress(0.5),
    DecodingPress(AdaKVPress(SnapKVPress(window_size=8)), 16, 48))``, tokens the decode press changes (vs
    the prefill press alone)."""
    from helpers.fairkv_refs import DECODE_K, DECODE_N, DECODE_W, prefill_decode_references

    assert fairkv_references["snapkv"] != fairkv_references["adakv"][1]  # the two methods keep different sets here
    prompt = decode_prompts[600]
    ref = shared("decode-ref-prefill-snapkv", lambda: prefill_decode_references(
        kvpress_python, smollm2_path, [prompt], tmp_path_factory.mktemp("kvp-pds"), prefill_method="snapkv"))
    with Server(["--kv-compress", "snapkv", "--kv-compress-ratio", str(RATIO), "--disable-radix-cache",
                 "--kv-decode-compress", "adakv", "--kv-decode-budget", "48", "--kv-decode-interval", str(DECODE_K),
                 "--kv-decode-window", str(DECODE_W)], env=STRICT) as s:
        assert s.greedy_ids(fairkv_prompts[1], N_NEW) == fairkv_references["snapkv"]
        st = wait_pool_empty(s)
        assert st["pages_used"] == 0 and st["prefix_tier"] is None
        got = s.greedy_ids(prompt, DECODE_N)
        st = wait_pool_empty(s)
    assert got == ref[0][0]
    assert got != ref[1][0], "the decode press did not change these tokens: pick another case"
    dc = st["decode_compress"]
    assert dc["request_compressions"] == 3 and dc["rows_evicted_total"] > 0 and st["pages_used"] == 0, dc


def test_none_equals_hf_transformers_and_snapkv_decoding_press_equals_kvpress(
        fairkv_references, fairkv_prompts, decode_prompts, smollm2_path, kvpress_python, shared, tmp_path_factory):
    """``--kv-compress none``: the ragged pool without prompt compression is the full cache. The server
    compresses while decoding (``--kv-decode-compress snapkv``, budget 64 every 16 steps), which the HF
    comparisons never reach (15 decode steps; the 24-token answer of the short prompt holds fewer rows than
    the budget): its query ring changes nothing. A 64-token generation then equals kvpress's
    ``DecodingPress(SnapKVPress(window_size=8), compression_interval=16, target_size=64)`` -- tokens the
    decode press changes (vs dense) -- and each request is compressed three times (after steps 16, 32, 48).
    (DecodingPress with AdaKV: test_decode_compress_server.)"""
    from helpers.fairkv_refs import DECODE_K, DECODE_N, DECODE_W, decode_press, decode_references

    prompt = decode_prompts[1100]
    ref = shared("decode-ref-snapkv", lambda: decode_references(
        kvpress_python, smollm2_path, [prompt], DECODE_N, [decode_press("snapkv", 64), None],
        tmp_path_factory.mktemp("kvp-snap")))
    args = ["--kv-compress", "none", "--kv-decode-compress", "snapkv", "--kv-decode-budget", "64",
            "--kv-decode-interval", str(DECODE_K), "--kv-decode-window", str(DECODE_W)]
    with Server(args, env=STRICT) as s:
        assert s.greedy_ids(fairkv_references["short"], 24) == fairkv_references["hf_short"]
        assert s.greedy_ids(fairkv_prompts[1], N_NEW) == fairkv_references["hf"][1]
        st = wait_pool_empty(s)
        assert st["kv_compress"] == "none" and st["pages_used"] == 0
        assert st["decode_compress"]["request_compressions"] == 0
        got = s.greedy_ids(prompt, DECODE_N)
        st = wait_pool_empty(s)
    assert got == ref[0][0]
    assert got != ref[1][0], "the decode press did not change these tokens: pick another case"
    dc = st["decode_compress"]
    assert dc["method"] == "snapkv" and dc["request_compressions"] == 3 and dc["rows_evicted_total"] > 0, dc
    assert st["pages_used"] == 0 and dc["running_rows_evicted"] == 0


def test_retraction_frees_and_recompresses_pyramidkv(fairkv_prompts):
    """SGLang's test switch retracts a running request every 3rd step: the retracted request's segments
    are freed, it is prefilled (and compressed) again later, every request still finishes with all its
    tokens, and the pool ends empty. Runs PyramidKV (per-layer budgets) end to end. 400-token prompts
    (over the 128-token budget: each re-prefill compresses again). With the dense prefix tier (default):
    prompts are cached and re-prefills reuse them, and a retracted request's tier tokens go back (the
    strict idle check)."""
    import threading

    import requests

    env = {**STRICT, "SGLANG_TEST_RETRACT": "1"}
    with Server(["--kv-compress", "pyramidkv", "--kv-budget", "128"], env=env) as s:
        outs = [None] * 3

        def run(i):
            outs[i] = requests.post(s.url + "/generate", timeout=600, json={
                "input_ids": fairkv_prompts[i % 2][:400], "sampling_params": {
                    "max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}}).json()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(len(o["output_ids"]) == 12 for o in outs), outs
        assert sum(o["meta_info"]["num_retractions"] for o in outs) > 0, [o["meta_info"] for o in outs]
        st = wait_pool_empty(s)
        assert st["pages_used"] == 0 and st["kv_compress"] == "pyramidkv", st
        # re-prefills after a retraction reuse the cached prompt (SGLang resets a retracted request's
        # cached_tokens, so the tier's own count says it)
        tier = st["prefix_tier"]
        assert tier["inserted_prompts"] > 0 and tier["hit_tokens"] >= 300 and tier["locked_tokens"] == 0, tier
