"""Tensor parallelism on CPU (gloo): TP=2 greedy tokens equal TP=1 in float32 (tiny local Llama).

FairKV plans with compression at TP 2 and 3: test_tp_fairkv."""

from __future__ import annotations

import pytest

from helpers.server import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_tp2_equals_tp1(tiny_llama_path):
    """Stock SGLang TP=2 == TP=1, and a FairKV ``sha`` plan without compression (our model classes,
    weights sliced per head, the ragged pool and the fairkv backend) == stock TP=2."""
    prompts = [[1, 17, 45, 99, 23, 250, 7], list(range(3, 80, 3)), [5] * 40 + [88, 101]]
    results = {}
    for name, args in (("tp1", ["--tp-size", "1"]), ("tp2", ["--tp-size", "2"]),
                       ("sha", ["--tp-size", "2", "--fairkv-plan", "sha"])):
        with Server(["--model-path", str(tiny_llama_path), *args],
                    env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}) as server:
            results[name] = [server.greedy_ids(p, 24) for p in prompts]
    assert results["tp2"] == results["tp1"]
    assert results["sha"] == results["tp2"]
    assert len({tuple(r) for r in results["tp1"]}) == len(prompts)  # not a degenerate model
