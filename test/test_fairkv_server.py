"""The ``fairkv`` backend end to end: a real CPU server with ``--kv-compress``, talked to over HTTP.

References: HF transformers greedy (``--kv-compress none`` must equal stock SGLang, which equals HF:
test_server_e2e) and NVIDIA kvpress 0.5.5 run live in its own venv (``snapkv`` / ``adakv``: same
kept sets, so the same greedy tokens). Every server runs with SGLang's strict idle memory check, and
our allocator's idle check demands an empty ragged pool, so a leaked segment kills the server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers.fairkv_refs import N_NEW, RATIO
from helpers.server import STRICT, Server

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("adakv")]  # one worker runs adakv_server

REPO = Path(__file__).resolve().parents[1]
LAYERS, KV_HEADS = 30, 3  # SmolLM2-135M


def wait_pool_empty(server, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        st = server.fairkv_info()
        if st["pages_used"] == 0 or time.time() > deadline:
            return st
        time.sleep(0.5)


@pytest.fixture(scope="module")
def adakv_server(fairkv_references):
    """Chunked prefill of 520 tokens: the 1100-token prompt arrives as 520 + 520 + 60, so its
    observation window (64) spans two chunks (the backend stashes the earlier queries)."""
    with Server(["--kv-compress", "adakv", "--kv-compress-ratio", str(RATIO),
                 "--chunked-prefill-size", "520"], env=STRICT) as s:
        yield s


def test_adakv_greedy_equals_kvpress(adakv_server, fairkv_references, fairkv_prompts):
    changed = 0
    for ids, want, full in zip(fairkv_prompts, fairkv_references["adakv"], fairkv_references["hf"]):
        assert adakv_server.greedy_ids(ids, N_NEW) == want
        changed += want != full
    assert changed, "compression changed no output: the comparison would not see a missing compression"
    assert wait_pool_empty(adakv_server)["pages_used"] == 0


def test_pool_holds_kept_plus_generated_then_empties_on_abort(adakv_server, fairkv_prompts):
    """While a request decodes, rows in segments = layers * kv_heads * (n_kept + generated); an abort
    mid-decode frees every segment."""
    ids = fairkv_prompts[0]
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
        st = adakv_server.fairkv_info()
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
    # every decode step found SGLang's host req_pool_indices (no read-back of the device tensor)
    assert seen["decode_host_index_readbacks"] == 0, seen
    requests.post(adakv_server.url + "/abort_request", json={"rid": rid}, timeout=30)
    t.join(timeout=120)
    assert not t.is_alive()
    out = result["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort", out["meta_info"]
    st = wait_pool_empty(adakv_server)
    assert st["pages_used"] == 0 and st["rows_in_segments"] == 0, st


def test_client_disconnect_frees_segments(adakv_server, fairkv_prompts):
    with requests.post(adakv_server.url + "/generate", stream=True, timeout=120, json={
            "input_ids": fairkv_prompts[1], "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "temperature": 0.0, "ignore_eos": True}}) as r:
        chunks, info = 0, None
        for line in r.iter_lines():
            if line:
                chunks += 1
            if chunks >= 3:
                # asked while the stream is still being read: leaving iter_lines early closes the
                # connection (urllib3 closes a chunked response on GeneratorExit), which is the
                # disconnect this test is about
                info = adakv_server.fairkv_info()
                break
        assert info is not None and info["requests_with_segments"] == 1, info
    # connection closed mid-stream: SGLang aborts the request, we free its segments
    st = wait_pool_empty(adakv_server, timeout=120)
    assert st["pages_used"] == 0, st


def test_bench_serving_long_prompts_with_compression(adakv_server, tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
           "--dataset-name", "random-ids", "--num-prompts", "4", "--max-concurrency", "4",
           "--random-input-len", "1000", "--random-output-len", "8", "--random-range-ratio", "1.0",
           "--seed", "1", "--host", "127.0.0.1", "--port", str(adakv_server.port),
           "--output-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 4, result
    assert wait_pool_empty(adakv_server)["pages_used"] == 0


def test_malformed_requests_keep_the_compressed_server_serving(adakv_server):
    """Every malformed request kind (helpers/malformed.py) gets a 4xx naming the problem, good requests
    of every endpoint interleaved with them get the answers they got alone, and the pool ends empty
    (the strict idle check would have killed the server otherwise)."""
    from helpers.malformed import CASES, fuzz

    seen = fuzz(adakv_server, seed=1)
    assert len(seen) == len(CASES)
    assert "input_ids[0] = 99999999 is outside the vocabulary" in seen["id past the vocab"][1]
    assert "the prompt is empty" in seen["empty text"][1]
    assert wait_pool_empty(adakv_server)["pages_used"] == 0


def test_json_schema_on_a_compressed_prompt_is_complete_json(adakv_server):
    """``response_format=json_schema`` on a compressed chat prompt (87 tokens, AdaKV): the server runs
    with --constrained-json-disable-any-whitespace by default (SGLang's grammar allows any amount of
    whitespace, and a small model on a compressed prompt can loop on it until max_tokens, returning
    truncated JSON with no error): no run of whitespace in the answer, which parses and ends on its own
    (finish_reason stop). The strings carry a ``maxLength`` and the third field is a boolean: this 135M
    model on this prompt otherwise repeats a phrase inside a string (or digits of a number) until
    max_tokens, which no grammar flag prevents."""
    info = requests.get(adakv_server.url + "/server_info", timeout=30).json()
    assert info["constrained_json_disable_any_whitespace"] is True
    short = {"type": "string", "maxLength": 40}
    schema = {"type": "object", "properties": {"city": short, "country": short,
                                                "is_capital": {"type": "boolean"}},
              "required": ["city", "country", "is_capital"], "additionalProperties": False}
    text = ("You are a careful assistant that answers in JSON. Paris is the capital and largest city of France, "
            "with about two million people in the city proper and over eleven million in its metropolitan area. "
            "It lies on the Seine. Give the city, its country and whether it is the capital.")
    r = requests.post(adakv_server.url + "/v1/chat/completions", timeout=300, json={
        "model": "default", "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 120,  # noqa: E501
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}})
    assert r.status_code == 200, r.text[:500]
    choice = r.json()["choices"][0]
    assert r.json()["usage"]["prompt_tokens"] > 64  # longer than the window: really compressed
    obj = json.loads(choice["message"]["content"])
    assert set(obj) == {"city", "country", "is_capital"} and choice["finish_reason"] == "stop"
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', choice["message"]["content"])  # whitespace outside strings
    assert not re.search(r"\s\s|\n", skeleton), choice["message"]["content"]
    assert wait_pool_empty(adakv_server)["pages_used"] == 0
