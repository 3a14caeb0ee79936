"""End-to-end: the real server on CPU (embedded SmolLM2, float32), over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from helpers import hf_ref

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("smollm2")]  # one worker runs smollm2_server

PROMPTS = [
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "def fibonacci(n):\n    ",
]


def test_health_and_model_info(smollm2_server, smollm2_path):
    assert requests.get(smollm2_server.url + "/health", timeout=10).status_code == 200
    info = requests.get(smollm2_server.url + "/model_info", timeout=10).json()
    assert info["model_path"] == str(smollm2_path)


def test_generate_greedy_equals_hf_transformers(smollm2_server, smollm2_path):
    tok, _ = hf_ref.load(str(smollm2_path))
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        expected = hf_ref.greedy(str(smollm2_path), ids, 32)
        got = smollm2_server.greedy_ids(ids, 32)
        assert got == expected, f"prompt {prompt!r}: server {got} != HF {expected}"


def test_stock_long_prompt_equals_hf(smollm2_server, fairkv_prompts, fairkv_references):
    """The 1100-token prompt the fairkv ``none`` server is checked on (test_fairkv_methods): stock
    SGLang gives the same HF greedy tokens, so fairkv ``none`` == stock on it."""
    assert smollm2_server.greedy_ids(fairkv_prompts[1], 16) == fairkv_references["hf"][1]


def test_generate_text_prompt(smollm2_server):
    out = smollm2_server.generate({"text": "The capital of France is",
                                   "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert "Paris" in out["text"]


def test_openai_chat_completion(smollm2_server):
    from openai import OpenAI

    client = OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model="default", temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # stopped at <|im_end|>, the fixed eos


def test_frontend_language_program(smollm2_server):
    import sglang as sgl

    @sgl.function
    def quiz(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))
        s += sgl.user("Is Paris in France? Answer yes or no.")
        s += sgl.assistant(sgl.select("verdict", choices=["yes", "no"]))

    state = quiz.run(question="What is the capital of France?",
                     backend=sgl.RuntimeEndpoint(smollm2_server.url))
    assert "Paris" in state["answer"]
    assert state["verdict"] == "yes"


def test_frontend_chat_turn_ends_with_the_assistant_turn(smollm2_server, smollm2_path):
    """``sgl.user`` / ``sgl.assistant`` on the embedded model: SGLang's frontend picks ChatML for it (no
    flag), so the prompt is the model's own turn format and ``gen`` stops at the end of the assistant's
    turn, far short of ``max_tokens``; the text is HF's greedy answer to the same ChatML prompt."""
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(smollm2_server.url)
    assert backend.get_chat_template().name == "chatml"

    @sgl.function
    def ask(s):
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=200, temperature=0, stop=["\n\n"]))

    state = ask.run(backend=backend)
    meta = state.get_meta_info("answer")
    assert meta["finish_reason"]["type"] == "stop", meta
    assert meta["completion_tokens"] < 200
    tok, _ = hf_ref.load(str(smollm2_path))
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    want = hf_ref.greedy(str(smollm2_path), ids, meta["completion_tokens"])
    assert state["answer"].strip() == tok.decode(want, skip_special_tokens=True).strip()


def test_bench_serving_random_ids(smollm2_server, tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
           "--dataset-name", "random-ids", "--num-prompts", "16", "--max-concurrency", "8",
           "--random-input-len", "128", "--random-output-len", "16", "--seed", "1",
           "--host", "127.0.0.1", "--port", str(smollm2_server.port), "--output-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == 16, result
    assert result["total_output_tokens"] > 0


def test_malformed_requests_keep_the_plain_server_serving(smollm2_server):
    """The plain launcher (no compression, SGLang's own KV pool): every malformed request kind gets a
    4xx naming the problem; good requests interleaved with them get the answers they got alone."""
    from helpers.malformed import CASES, fuzz

    seen = fuzz(smollm2_server, seed=0)
    assert len(seen) == len(CASES)
    assert requests.get(smollm2_server.url + "/health", timeout=10).status_code == 200


def test_fairkv_control_plane_on_a_stock_server(smollm2_server):
    """Without the fairkv backend the control routes answer 404 saying so (the scheduler's handler runs
    on every server), and the server keeps serving."""
    import requests

    r = requests.get(smollm2_server.url + "/fairkv/plan", timeout=30)
    assert r.status_code == 404 and "without the fairkv backend" in r.json()["error"], r.text
    r = requests.post(smollm2_server.url + "/fairkv/replan", json={"plan_path": "/x", "dry_run": True}, timeout=30)
    assert r.status_code == 404, r.text
    r = requests.post(smollm2_server.url + "/fairkv/replan", data="[1, 2", timeout=30)
    assert r.status_code == 400 and "JSON object" in r.json()["error"], r.text
    assert smollm2_server.generate({"text": "Hello", "sampling_params": {"max_new_tokens": 2}})["text"] is not None
