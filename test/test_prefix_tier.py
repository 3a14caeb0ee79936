"""Prefix reuse with compressed KV, end to end: the dense prefix tier behind SGLang's radix cache.

One CPU server (SmolLM2, AdaKV at ratio 0.5, strict idle memory check, metrics on). References: kvpress
(fp32, its own venv), which recomputes every prompt densely, and the same server with its cache
flushed before each prompt (no reuse). Reuse must not change a token: the cached prefix is the dense
KV a prefill of that prefix computes, and compression runs over the whole prompt with its own window.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
from helpers.server import STRICT, Server

pytestmark = [pytest.mark.server]

RATIO, N_NEW, WINDOW = 0.5, 16, 64
QUESTIONS = (" Question: what is the secret code of the harbor? Answer: the secret code is",
             " Question: which place is named right before the code? Answer:",
             " Question: write one sentence about the morning market. Answer:")
TURN2 = " Thanks. Question: repeat the code once more, then name the river. Answer:"


def _doc(smollm2_path) -> list[int]:
    from helpers.fairkv_refs import long_prompt_ids

    ids = long_prompt_ids(smollm2_path, 620, 5)
    return ids[:600]  # the document without its question tail (its prompts take two 512-token chunks)


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    doc = _doc(smollm2_path)
    return {"doc": doc, "tok": tok, "questions": [doc + tok(q)["input_ids"] for q in QUESTIONS],
            "turn2_tail": tok(TURN2)["input_ids"]}


@pytest.fixture(scope="module")
def references(smollm2_path, kvpress_python, prompts, tmp_path_factory):
    """kvpress AdaKV greedy tokens of the three questions, then of the second chat turn (the first
    question, kvpress's answer, a new message): computed before the server starts (2 cores)."""
    from helpers.fairkv_refs import kvpress_greedy

    jobs = [{"method": "adakv", "ratio": RATIO, "n_new": N_NEW, "ids": ids} for ids in prompts["questions"]]
    qs = kvpress_greedy(kvpress_python, smollm2_path, jobs, tmp_path_factory.mktemp("kvp-q"))
    turn2 = prompts["questions"][0] + qs[0] + prompts["turn2_tail"]
    (t2,) = kvpress_greedy(kvpress_python, smollm2_path,
                           [{"method": "adakv", "ratio": RATIO, "n_new": N_NEW, "ids": turn2}],
                           tmp_path_factory.mktemp("kvp-t"))
    return {"questions": qs, "turn2_ids": turn2, "turn2": t2}


@pytest.fixture(scope="module")
def tier_server(references):
    args = ["--kv-compress", "adakv", "--kv-compress-ratio", str(RATIO), "--kv-window", str(WINDOW),
            "--enable-metrics", "--chunked-prefill-size", "512"]
    with Server(args, env=STRICT) as s:
        yield s


def _gen(s, ids, n=N_NEW, **extra):
    r = requests.post(s.url + "/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **extra}}, timeout=600)
    r.raise_for_status()
    return r.json()


def _flush(s):
    assert requests.post(s.url + "/flush_cache", timeout=60).status_code == 200
    tier = s.fairkv_info()["prefix_tier"]
    assert tier["pages"] == 0 and tier["cached_tokens"] == 0, tier


def _idle(s, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    st = s.fairkv_info()
    while (st["pages_used"] or st["prefix_tier"]["locked_tokens"]) and time.time() < deadline:
        time.sleep(0.25)
        st = s.fairkv_info()
    return st


@pytest.mark.xdist_group("prefix-tier")
def test_three_questions_over_one_document_reuse_it_and_equal_kvpress(tier_server, prompts, references):
    s = tier_server
    _flush(s)
    doc = prompts["doc"]
    outs = [_gen(s, ids) for ids in prompts["questions"]]
    got = [o["output_ids"] for o in outs]
    cached = [o["meta_info"]["cached_tokens"] for o in outs]
    assert got == references["questions"]
    # the first prompt has nothing to reuse; the others reuse the document (never the last window)
    assert cached[0] == 0
    for ids, c in zip(prompts["questions"][1:], cached[1:]):
        assert min(len(doc), len(ids) - WINDOW) - 16 <= c <= len(ids) - WINDOW, (c, len(ids))
    st = _idle(s)
    assert st["pages_used"] == 0 and st["prefix_tier"]["pages"] > 0 and st["prefix_tier"]["locked_tokens"] == 0
    # the same prompts without reuse (cache flushed before each; the first one had nothing to reuse)
    for ids, want in zip(prompts["questions"][1:], references["questions"][1:]):
        _flush(s)
        o = _gen(s, ids)
        assert o["meta_info"]["cached_tokens"] == 0 and o["output_ids"] == want
    metrics = requests.get(s.url + "/metrics", timeout=30).text
    hits = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("sglang:cached_tokens_total") and 'cache_source="device"' in line]
    assert hits and sum(hits) >= sum(cached), hits
    _flush(s)
    assert _idle(s)["pages_used"] == 0


@pytest.mark.xdist_group("prefix-tier")
def test_second_chat_turn_reuses_the_first_prompt(tier_server, prompts, references):
    s = tier_server
    _flush(s)
    first = _gen(s, prompts["questions"][0])
    assert first["output_ids"] == references["questions"][0]
    ids = references["turn2_ids"]
    second = _gen(s, ids)
    # the first turn's prompt is reused; its answer was decoded over the compressed context, so it is
    # prefilled again with the new message (kvpress does the same)
    assert second["meta_info"]["cached_tokens"] == min(len(prompts["questions"][0]), len(ids) - WINDOW)
    assert second["output_ids"] == references["turn2"]
    _flush(s)
    assert _gen(s, ids)["output_ids"] == references["turn2"]  # and without reuse
    _flush(s)


@pytest.mark.xdist_group("prefix-tier")
def test_abort_during_a_cache_hit_prefill_frees_everything(tier_server, prompts):
    """A long prompt over the cached document, chunked (512-token chunks), aborted while its prefill
    runs: its segments and its own tier blocks go back, the document stays cached and unlocked, and
    the strict idle check (tier tokens = the tree's) holds -- the server keeps serving."""
    s = tier_server
    _flush(s)
    doc = prompts["doc"]
    _gen(s, prompts["questions"][0], n=1)
    before = _idle(s)["prefix_tier"]
    long_ids = doc + (prompts["questions"][1][len(doc):] * 60)[:1600]
    result = {}

    def run():
        result["r"] = requests.post(s.url + "/generate", json={"input_ids": long_ids, "rid": "abort-hit",
                                    "sampling_params": {"max_new_tokens": 64, "temperature": 0.0}}, timeout=600)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        st = s.fairkv_info()
        if st["requests_in_prefill"] and st["prefix_tier"]["locked_tokens"]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the long prompt never showed up in prefill")
    requests.post(s.url + "/abort_request", json={"rid": "abort-hit"}, timeout=30)
    t.join(timeout=300)
    out = result["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort", out["meta_info"]
    st = _idle(s)
    assert st["pages_used"] == 0 and st["requests_admitted"] == 0, st
    assert st["prefix_tier"]["locked_tokens"] == 0
    assert st["prefix_tier"]["cached_tokens"] >= before["cached_tokens"]
    assert _gen(s, prompts["questions"][1])["meta_info"]["cached_tokens"] > 0  # still serving, still cached
    _flush(s)
    assert _idle(s)["pages_used"] == 0


def test_flags_size_or_turn_off_the_tier(smollm2_path):
    """``--fairkv-prefix-tier F`` sizes the tier (FAIRKV_PREFIX_TIER for the schedulers); 0 and
    ``--disable-radix-cache`` turn prefix caching off (SGLang's radix cache disabled: the classic path);
    a value out of [0, 1] or another radix backend is refused."""
    from sglang_fairkv.serving.launcher import UsageError, parse_launch

    base = ["--model-path", str(smollm2_path), "--kv-compress", "adakv"]
    on = parse_launch([*base, "--fairkv-prefix-tier", "0.5"], on_cpu=True)
    assert on.prefix_tier == 0.5 and on.sglang_argv[on.sglang_argv.index("--radix-cache-backend") + 1] == "fairkv"
    for off in (["--fairkv-prefix-tier", "0"], ["--disable-radix-cache"]):
        cfg = parse_launch([*base, *off], on_cpu=True)
        assert cfg.prefix_tier == 0.0 and "--disable-radix-cache" in cfg.sglang_argv
        assert "--radix-cache-backend" not in cfg.sglang_argv
        assert any("prefix caching off" in n for n in cfg.notes)
    with pytest.raises(UsageError, match=r"--fairkv-prefix-tier must be in \[0, 1\]"):
        parse_launch([*base, "--fairkv-prefix-tier", "1.5"], on_cpu=True)
    with pytest.raises(UsageError, match="cannot hold a compressed server's prefixes"):
        parse_launch([*base, "--radix-cache-backend", "flexkv"], on_cpu=True)
