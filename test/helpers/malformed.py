"""Malformed requests for the fuzz tests: every kind found by sweeping ``/generate``, ``/v1/completions``
and ``/v1/chat/completions`` (the frontend language talks to ``/generate``) with bad fields.

Stock SGLang 0.5.23 on CPU: the empty prompts and out-of-vocabulary ids stopped the server,
and the sweep found ``top_logprobs_num`` / ``logprobs`` / ``top_logprobs`` past the vocabulary (server
stopped), ``sampling_params`` lists that do not match the prompts and an empty ``input_embeds`` (500),
and ``n = 0``, ``logprob_start_len < -1``, ``stop_token_ids`` past the vocabulary (accepted as 200).
All of them but the last now get a 400 from ``sglang_fairkv.serving.request_guard``; the rest SGLang
already refused. ``stop_token_ids`` past the vocabulary are accepted as stock accepts them (such a token
can never be produced; a client sending one stop list to several models must not break):
:data:`ACCEPTED` holds them, and the fuzz asserts a 200 with every token.

Each case is ``(name, path, body)``; the server must answer 4xx, name the problem, and keep serving.
``{model}`` in a body is replaced by the served model name, ``{vocab}`` by the vocabulary size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

SP = {"max_new_tokens": 2}

#: (name, path, body): each must get a 4xx and leave the server healthy.
CASES: list[tuple[str, str, Any]] = [
    # empty prompts, every form
    ("empty text", "/generate", {"text": "", "sampling_params": SP}),
    ("empty input_ids", "/generate", {"input_ids": [], "sampling_params": SP}),
    ("empty item in a text batch", "/generate", {"text": ["Hello", ""], "sampling_params": SP}),
    ("empty item in an ids batch", "/generate", {"input_ids": [[5, 6], []], "sampling_params": SP}),
    ("no prompt at all", "/generate", {"sampling_params": SP}),
    ("completions empty prompt", "/v1/completions", {"model": "{model}", "prompt": "", "max_tokens": 2}),
    ("completions empty id prompt", "/v1/completions", {"model": "{model}", "prompt": [], "max_tokens": 2}),
    ("completions batch with an empty prompt", "/v1/completions",
     {"model": "{model}", "prompt": ["Hi", ""], "max_tokens": 2}),
    ("streamed empty text", "/generate", {"text": "", "stream": True, "sampling_params": SP}),
    ("completions streamed empty prompt", "/v1/completions",
     {"model": "{model}", "prompt": "", "max_tokens": 2, "stream": True}),
    ("chat without messages", "/v1/chat/completions", {"model": "{model}", "messages": [], "max_tokens": 2}),
    # token ids outside the vocabulary
    ("id past the vocab", "/generate", {"input_ids": [99999999], "sampling_params": SP}),
    ("id = vocab", "/generate", {"input_ids": [5, "{vocab}"], "sampling_params": SP}),
    ("streamed id past the vocab", "/generate",
     {"input_ids": [5, 99999999], "stream": True, "sampling_params": SP}),
    ("negative id", "/generate", {"input_ids": [-1, 5], "sampling_params": SP}),
    ("bad id in an ids batch", "/generate", {"input_ids": [[5, 6], [7, 99999999]], "sampling_params": SP}),
    ("completions id past the vocab", "/v1/completions",
     {"model": "{model}", "prompt": [5, 99999999], "max_tokens": 2}),
    ("completions batch of ids, one bad", "/v1/completions",
     {"model": "{model}", "prompt": [[5, 6], [-3]], "max_tokens": 2}),
    ("float ids", "/generate", {"input_ids": [1.5, 2.5], "sampling_params": SP}),
    ("string ids", "/generate", {"input_ids": ["a", "b"], "sampling_params": SP}),
    # sampling parameters: types and ranges
    ("temperature is a string", "/generate", {"text": "Hi", "sampling_params": {"temperature": "hot"}}),
    ("negative temperature", "/generate", {"text": "Hi", "sampling_params": {"temperature": -1}}),
    ("max_new_tokens is a string", "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": "ten"}}),
    ("negative max_new_tokens", "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": -1}}),
    ("max_new_tokens past the context", "/generate",
     {"text": "Hi", "sampling_params": {"max_new_tokens": 10 ** 9}}),
    ("top_k 0", "/generate", {"text": "Hi", "sampling_params": {"top_k": 0, "max_new_tokens": 2}}),
    ("top_p 0", "/generate", {"text": "Hi", "sampling_params": {"top_p": 0, "max_new_tokens": 2}}),
    ("min_new_tokens > max", "/generate",
     {"text": "Hi", "sampling_params": {"min_new_tokens": 5, "max_new_tokens": 2}}),
    ("frequency_penalty 5", "/generate", {"text": "Hi", "sampling_params": {"frequency_penalty": 5}}),
    ("logit_bias past the vocab", "/generate",
     {"text": "Hi", "sampling_params": {"logit_bias": {"99999999": 1.0}, "max_new_tokens": 2}}),
    ("logit_bias key not a number", "/generate",
     {"text": "Hi", "sampling_params": {"logit_bias": {"abc": 1.0}, "max_new_tokens": 2}}),
    ("stop is a number", "/generate", {"text": "Hi", "sampling_params": {"stop": 5, "max_new_tokens": 2}}),
    ("stop_token_ids not a list", "/generate",
     {"text": "Hi", "sampling_params": {"stop_token_ids": 5, "max_new_tokens": 2}}),
    ("stop_token_ids past the vocab with min_new_tokens", "/generate",
     {"text": "Hi", "sampling_params": {"stop_token_ids": [99999999], "min_new_tokens": 1, "max_new_tokens": 2}}),
    ("sampling_params is a list for one prompt", "/generate",
     {"text": "Hi", "sampling_params": [SP, SP]}),
    ("sampling_params list shorter than the batch", "/generate",
     {"text": ["Hi", "Yo", "Ok"], "sampling_params": [SP]}),
    ("n = 0", "/generate", {"text": "Hi", "sampling_params": {"n": 0, "max_new_tokens": 2}}),
    ("unknown sampling field", "/generate", {"text": "Hi", "sampling_params": {"temprature": 0.5}}),
    # logprob options
    ("top_logprobs_num negative", "/generate",
     {"text": "Hi", "return_logprob": True, "top_logprobs_num": -1, "sampling_params": SP}),
    ("top_logprobs_num past the vocab", "/generate",
     {"text": "Hi", "return_logprob": True, "top_logprobs_num": 10 ** 7, "sampling_params": SP}),
    ("logprob_start_len past the prompt", "/generate",
     {"text": "Hi", "return_logprob": True, "logprob_start_len": 1000, "sampling_params": SP}),
    ("logprob_start_len below -1", "/generate",
     {"text": "Hi", "return_logprob": True, "logprob_start_len": -5, "sampling_params": SP}),
    ("token_ids_logprob past the vocab", "/generate",
     {"text": "Hi", "return_logprob": True, "token_ids_logprob": [99999999], "sampling_params": SP}),
    ("completions logprobs past the vocab", "/v1/completions",
     {"model": "{model}", "prompt": "Hi", "max_tokens": 2, "logprobs": 10 ** 7}),
    ("chat top_logprobs past the vocab", "/v1/chat/completions",
     {"model": "{model}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
      "logprobs": True, "top_logprobs": 10 ** 7}),
    # grammars
    ("broken regex", "/generate", {"text": "Hi", "sampling_params": {"regex": "(", "max_new_tokens": 2}}),
    ("broken json_schema", "/generate",
     {"text": "Hi", "sampling_params": {"json_schema": "{not json", "max_new_tokens": 2}}),
    ("broken ebnf", "/generate", {"text": "Hi", "sampling_params": {"ebnf": "root ::= (", "max_new_tokens": 2}}),
    ("two grammars", "/generate",
     {"text": "Hi", "sampling_params": {"regex": "a+", "ebnf": "root ::= \"a\"", "max_new_tokens": 2}}),
    ("chat response_format schema not an object", "/v1/chat/completions",
     {"model": "{model}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "bad"}}}),
    # other request fields
    ("input_embeds of the wrong width", "/generate",
     {"input_embeds": [[0.1, 0.2, 0.3]], "sampling_params": SP}),
    ("empty input_embeds", "/generate", {"input_embeds": [], "sampling_params": SP}),
    ("text is a number", "/generate", {"text": 5, "sampling_params": SP}),
    ("lora_path without LoRA", "/generate", {"text": "Hi", "lora_path": "nope", "sampling_params": SP}),
    ("custom_logit_processor not enabled", "/generate",
     {"text": "Hi", "custom_logit_processor": "x", "sampling_params": SP}),
    ("return_logprob is a string", "/generate", {"text": "Hi", "return_logprob": "yes", "sampling_params": SP}),
    ("rid is a dict", "/generate", {"text": "Hi", "rid": {"a": 1}, "sampling_params": SP}),
    ("chat role unknown", "/v1/chat/completions",
     {"model": "{model}", "messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 2}),
    ("chat negative max_tokens", "/v1/chat/completions",
     {"model": "{model}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": -3}),
    ("completions n = 0", "/v1/completions", {"model": "{model}", "prompt": "Hi", "max_tokens": 2, "n": 0}),
    ("broken JSON body", "/generate", "{not json"),
    ("body is a list", "/generate", [1, 2, 3]),
]


#: requests stock SGLang accepts that an earlier guard refused: answered 200, all their tokens
ACCEPTED: list[tuple[str, str, dict]] = [
    ("stop_token_ids past the vocab", "/generate",
     {"text": "Hi", "sampling_params": {"stop_token_ids": [99999999, 2], "max_new_tokens": 3, "temperature": 0,
                                        "ignore_eos": True}}),
    ("stop_token_ids past the vocab (chat)", "/v1/chat/completions",
     {"model": "{model}", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
      "stop_token_ids": [99999999], "ignore_eos": True}),
]


def render(body: Any, model: str, vocab: int) -> Any:
    """Fill ``{model}`` / ``{vocab}`` placeholders (a string body is sent as raw bytes)."""
    if isinstance(body, str):
        return body
    text = json.dumps(body).replace('"{model}"', json.dumps(model)).replace('"{vocab}"', str(vocab))
    return json.loads(text)


def good_requests(rng: random.Random, n: int, vocab: int, chat: bool = True) -> list[tuple[str, dict]]:
    """Well-formed requests of each endpoint, greedy, to interleave with the bad ones (``chat=False``:
    no chat requests, for a model without a chat template)."""
    out = []
    for i in range(n):
        kind = i % (3 if chat else 2)
        if kind == 0:
            ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))]
            out.append(("/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}}))
        elif kind == 1:
            out.append(("/v1/completions", {"model": "{model}", "prompt": f"Count to {i}:", "max_tokens": 4,
                                            "temperature": 0}))
        else:
            out.append(("/v1/chat/completions", {"model": "{model}", "max_tokens": 4, "temperature": 0,
                                                 "messages": [{"role": "user", "content": f"Say {i}"}]}))
    return out


def post(url: str, path: str, body: Any, timeout: float = 120.0):
    """POST ``body`` (raw when a string) and return the ``requests`` response."""
    import requests

    if isinstance(body, str):
        return requests.post(url + path, data=body, headers={"Content-Type": "application/json"},
                             timeout=timeout)
    return requests.post(url + path, json=body, timeout=timeout)


def answer_of(path: str, resp: dict):
    """The part of a good response that must not change: generated ids or text."""
    if path == "/generate":
        return resp["output_ids"]
    if path == "/v1/completions":
        return resp["choices"][0]["text"]
    return resp["choices"][0]["message"]["content"]


def fuzz(server, seed: int = 0, n_good: int = 6, chat: bool = True) -> dict:
    """Send every malformed case, in a random order interleaved with ``n_good`` good requests, one at a
    time. Asserts each bad one gets a 4xx with a message, each good one the answer it got alone before
    the fuzz, and the server stays healthy. Returns ``{case name: (status, message)}``."""
    import requests

    info = requests.get(server.url + "/model_info", timeout=30).json()
    model = info["model_path"]
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    goods = [(p, render(b, model, vocab)) for p, b in good_requests(rng, n_good, vocab, chat)]
    want = []
    for path, body in goods:
        r = post(server.url, path, body)
        assert r.status_code == 200, (path, body, r.text[:500])
        want.append(answer_of(path, r.json()))
    schedule = [("bad", i) for i in range(len(CASES))] + [("good", i) for i in range(len(goods))]
    rng.shuffle(schedule)
    seen = {}
    for kind, i in schedule:
        if kind == "good":
            path, body = goods[i]
            r = post(server.url, path, body)
            assert r.status_code == 200, (path, r.text[:500])
            assert answer_of(path, r.json()) == want[i], (path, body)
            continue
        name, path, body = CASES[i]
        r = post(server.url, path, render(body, model, vocab))
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:500])
        assert len(r.text) > 10, (name, r.text)
        seen[name] = (r.status_code, r.text[:300])
        # a scheduler that died takes the launcher with it (SIGQUIT): the process check names the
        # request that did it; /health (a real generation) every 10 bad requests and at the end
        assert server.proc.poll() is None, (name, server.log_tail())
        if len(seen) % 10 == 0:
            assert requests.get(server.url + "/health", timeout=60).status_code == 200, name
    for name, path, body in ACCEPTED:  # as stock SGLang: 200 and every token
        if path.startswith("/v1/chat") and not chat:  # a model without a chat template
            continue
        r = post(server.url, path, render(body, model, vocab))
        assert r.status_code == 200, (name, r.status_code, r.text[:500])
        j = r.json()
        n = j["meta_info"]["completion_tokens"] if path == "/generate" else j["usage"]["completion_tokens"]
        assert n == 3, (name, j)
    assert requests.get(server.url + "/health", timeout=60).status_code == 200
    return seen
