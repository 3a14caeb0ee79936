"""Tensor parallelism on CPU (gloo): TP=2 greedy tokens equal TP=1 in float32 (tiny local Llama)."""

from __future__ import annotations

import pytest

from helpers.server import Server

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_tp2_equals_tp1(tiny_llama_path):
    prompts = [[1, 17, 45, 99, 23, 250, 7], list(range(3, 80, 3)), [5] * 40 + [88, 101]]
    results = {}
    for tp in (1, 2):
        with Server(["--model-path", str(tiny_llama_path), "--tp-size", str(tp)]) as server:
            results[tp] = [server.greedy_ids(p, 24) for p in prompts]
    assert results[2] == results[1]
    assert len({tuple(r) for r in results[1]}) == len(prompts)  # not a degenerate model


def test_tp2_snapkv_equals_tp1(tiny_llama_path):
    """SnapKV keeps a set per KV head, so a rank holding half of the heads compresses them exactly as
    TP=1 does: the ragged pool and the fairkv backend at TP=2 give TP=1's tokens."""
    from helpers import hf_ref

    prompts = [list(range(3, 120, 2)), [5] * 40 + list(range(90, 150))]
    args = ["--kv-compress", "snapkv", "--kv-budget", "20", "--kv-window", "8"]
    results = {}
    for tp in (1, 2):
        with Server(["--model-path", str(tiny_llama_path), "--tp-size", str(tp), *args],
                    env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}) as server:
            results[tp] = [server.greedy_ids(p, 24) for p in prompts]
    assert results[2] == results[1]
    full = [hf_ref.greedy(tiny_llama_path, p, 24) for p in prompts]
    assert results[1] != full  # compression changed the outputs: the comparison can see it
