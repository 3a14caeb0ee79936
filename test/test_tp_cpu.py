"""Tensor parallelism on CPU (gloo): TP=2 greedy tokens equal TP=1 (HF transformers) in float32 (tiny
local Llama).

FairKV plans with compression at TP 2 and 3: test_tp_fairkv."""

from __future__ import annotations

import pytest

from helpers.server import STRICT, Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = [[1, 17, 45, 99, 23, 250, 7], list(range(3, 80, 3)), [5] * 40 + [88, 101]]


def _greedy(model_path, args) -> list[list[int]]:
    with Server(["--model-path", str(model_path), *args], env=STRICT) as server:
        return [server.greedy_ids(p, 24) for p in PROMPTS]


@pytest.fixture(scope="session")
def hf_tokens(tiny_llama_path):
    """The independent reference: HF transformers greedy in float32 (stock SGLang at TP = 1 gives the
    same tokens: test_server_e2e checks that on SmolLM2)."""
    from helpers import hf_ref

    out = [hf_ref.greedy(tiny_llama_path, p, 24) for p in PROMPTS]
    assert len({tuple(r) for r in out}) == len(PROMPTS)  # not a degenerate model
    return out


@pytest.mark.parametrize("name,args", [
    ("stock tp2", ["--tp-size", "2"]),
    # a FairKV sha plan without compression: our model classes, weights sliced per head, the ragged
    # pool and the fairkv backend
    ("fairkv sha tp2", ["--tp-size", "2", "--fairkv-plan", "sha"]),
])
def test_tp2_equals_tp1(tiny_llama_path, hf_tokens, name, args):
    """Stock SGLang TP=2 and a FairKV ``sha`` plan at TP=2 give HF's (= TP = 1's) greedy tokens."""
    assert _greedy(tiny_llama_path, args) == hf_tokens, name
