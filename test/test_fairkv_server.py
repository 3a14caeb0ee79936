"""The ``fairkv`` backend end to end: a real CPU server with ``--kv-compress``, talked to over HTTP.

References: HF transformers greedy (``--kv-compress none`` must equal stock SGLang, which equals HF:
test_server_e2e) and NVIDIA kvpress 0.5.5 run live in its own venv (``snapkv`` / ``adakv``: same
kept sets, so the same greedy tokens). Every server runs with SGLang's strict idle memory check, and
our allocator's idle check demands an empty ragged pool, so a leaked segment kills the server.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import hf_ref
from helpers.server import Server

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
LAYERS, KV_HEADS = 30, 3  # SmolLM2-135M
RATIO = 0.5


def long_prompt_ids(smollm2_path, n_tokens: int, seed: int) -> list[int]:
    """A retrieval-style prompt of exactly ``n_tokens`` tokens with a key-value fact inside."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    rng = random.Random(seed)
    words = ("the river city stone north garden library window morning market bridge lantern "
             "harbor orchard valley").split()
    sents = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(400)]
    key = rng.randrange(1000, 9999)
    fact = f" Remember: the secret code of the harbor is {key}. "
    body = tok(" ".join(sents[:30]) + fact + " ".join(sents[30:]))["input_ids"]
    tail = tok(" Question: what is the secret code of the harbor? Answer: the secret code is")["input_ids"]
    return body[: n_tokens - len(tail)] + tail


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    return [long_prompt_ids(smollm2_path, 600, 1), long_prompt_ids(smollm2_path, 1100, 2)]


def kvpress_greedy(kvpress_python, model, method, ids, n_new, tmp_path) -> list[int]:
    src, out = tmp_path / "ids.json", tmp_path / "out.json"
    src.write_text(json.dumps(ids))
    r = subprocess.run([str(kvpress_python), str(REPO / "test" / "helpers" / "kvpress_generate.py"),
                        str(model), method, str(RATIO), str(n_new), str(src), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())["output_ids"]


def fairkv_stats(server) -> dict:
    info = requests.get(server.url + "/server_info", timeout=30).json()
    return info["internal_states"][0]["fairkv"]


def wait_pool_empty(server, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        st = fairkv_stats(server)
        if st["pages_used"] == 0 or time.time() > deadline:
            return st
        time.sleep(0.5)


@pytest.fixture(scope="module")
def adakv_server():
    with Server(["--kv-compress", "adakv", "--kv-compress-ratio", str(RATIO)], env=STRICT) as s:
        yield s


def test_adakv_greedy_equals_kvpress(adakv_server, smollm2_path, kvpress_python, prompts, tmp_path):
    for ids in prompts:
        want = kvpress_greedy(kvpress_python, smollm2_path, "adakv", ids, 16, tmp_path)
        assert adakv_server.greedy_ids(ids, 16) == want
    # compression really changed the model's view: full-cache greedy differs on at least one prompt
    # is not guaranteed, so instead check the pool held the compressed size (test below).
    assert wait_pool_empty(adakv_server)["pages_used"] == 0


def test_pool_holds_kept_plus_generated_then_empties_on_abort(adakv_server, prompts):
    """While a request decodes, rows in segments = layers * kv_heads * (n_kept + generated); an abort
    mid-decode frees every segment."""
    ids = prompts[0]
    n_kept = int(len(ids) * (1 - RATIO))
    rid = "fairkv-abort-me"
    result = {}

    def run():
        result["r"] = requests.post(adakv_server.url + "/generate", json={
            "input_ids": ids, "rid": rid,
            "sampling_params": {"max_new_tokens": 2000, "temperature": 0.0, "ignore_eos": True}},
            timeout=600)

    t = threading.Thread(target=run)
    t.start()
    seen = None
    deadline = time.time() + 120
    while time.time() < deadline:
        st = fairkv_stats(adakv_server)
        if st["rows_in_segments"] > LAYERS * KV_HEADS * (n_kept + 2):
            seen = st
            break
        time.sleep(0.3)
    assert seen is not None, "the request never showed up in the pool"
    assert seen["requests_with_segments"] == 1
    extra = seen["rows_in_segments"] - LAYERS * KV_HEADS * n_kept
    assert extra % (LAYERS * KV_HEADS) == 0, seen  # every segment grew by the same generated count
    assert 0 < extra // (LAYERS * KV_HEADS) < 2000
    assert seen["rows_in_segments"] < LAYERS * KV_HEADS * len(ids)  # really compressed
    requests.post(adakv_server.url + "/abort_request", json={"rid": rid}, timeout=30)
    t.join(timeout=120)
    assert not t.is_alive()
    out = result["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort", out["meta_info"]
    st = wait_pool_empty(adakv_server)
    assert st["pages_used"] == 0 and st["rows_in_segments"] == 0, st


def test_client_disconnect_frees_segments(adakv_server, prompts):
    with requests.post(adakv_server.url + "/generate", stream=True, timeout=120, json={
            "input_ids": prompts[1], "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "temperature": 0.0, "ignore_eos": True}}) as r:
        chunks = 0
        for line in r.iter_lines():
            if line:
                chunks += 1
            if chunks >= 3:
                break
        assert fairkv_stats(adakv_server)["requests_with_segments"] == 1
    # connection closed mid-stream: SGLang aborts the request, we free its segments
    st = wait_pool_empty(adakv_server, timeout=120)
    assert st["pages_used"] == 0, st


def test_bench_serving_long_prompts_with_compression(adakv_server, tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
           "--dataset-name", "random-ids", "--num-prompts", "12", "--max-concurrency", "6",
           "--random-input-len", "1000", "--random-output-len", "8", "--random-range-ratio", "1.0",
           "--seed", "1", "--host", "127.0.0.1", "--port", str(adakv_server.port),
           "--output-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 12, result
    assert wait_pool_empty(adakv_server)["pages_used"] == 0


def test_snapkv_greedy_equals_kvpress(smollm2_path, kvpress_python, prompts, tmp_path):
    with Server(["--kv-compress", "snapkv", "--kv-compress-ratio", str(RATIO)], env=STRICT) as s:
        ids = prompts[1]
        assert s.greedy_ids(ids, 16) == kvpress_greedy(kvpress_python, smollm2_path, "snapkv", ids, 16,
                                                       tmp_path)
        assert wait_pool_empty(s)["pages_used"] == 0


def test_none_equals_hf_transformers(smollm2_path, prompts):
    """``--kv-compress none``: the ragged pool without compression is the full cache."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    short = tok("The capital of France is")["input_ids"]
    with Server(["--kv-compress", "none"], env=STRICT) as s:
        for ids, n in ((short, 24), (prompts[0], 12)):
            assert s.greedy_ids(ids, n) == hf_ref.greedy(smollm2_path, ids, n)
        st = wait_pool_empty(s)
        assert st["kv_compress"] == "none" and st["pages_used"] == 0
