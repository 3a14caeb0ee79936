"""``CompressConfig`` (what ``--kv-compress`` parses into) and ``kept_for_layer`` (the one selection the
server backend and kvdump share), checked against the budget functions they compose."""

from __future__ import annotations

import re

import pytest
import torch

from sglang_fairkv.compress import SnapKVScorer, pyramid_layer_budget
from sglang_fairkv.compress.policy import CompressConfig, kept_for_layer


def test_config_json_round_trip_and_errors():
    cfg = CompressConfig(method="adakv", ratio=0.25, window=32, kernel=7, alpha=0.1)
    assert CompressConfig.from_json(cfg.to_json()) == cfg
    assert cfg.n_kept(1000) == 750 and CompressConfig(method="snapkv", budget=64).n_kept(50) == 50
    for kwargs, msg in [({"method": "bogus"}, "must be one of"),
                        ({"method": "snapkv"}, "needs --kv-budget N or --kv-compress-ratio R"),
                        ({"method": "snapkv", "budget": 0}, ">= 1 token"),
                        ({"method": "snapkv", "ratio": 1.0}, "in [0, 1)"),
                        ({"method": "snapkv", "budget": 8, "window": 0}, "window must be >= 1"),
                        ({"method": "headkv"}, "needs --kv-head-budgets"),
                        ({"method": "adakv", "budget": 8, "head_budgets": "x.json"}, "only used with")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            CompressConfig(**kwargs)


def _qk(seed=0, hq=6, hkv=2, s=300, w=16, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hq, w, d, generator=g), torch.randn(hkv, s, d, generator=g)


def test_headkv_keeps_each_heads_budget_and_its_top_scores():
    q, k = _qk()
    budgets = torch.tensor([[40, 100], [7, 300]])
    cfg = CompressConfig(method="headkv", head_budgets="b.json", window=16)
    kept = kept_for_layer(cfg, 0, 2, q, k, budgets)
    assert [len(x) for x in kept] == [40, 100]
    scores = SnapKVScorer(window=16).score(q, k)
    for h, pos in enumerate(kept):
        assert set(pos.tolist()) == set(scores[h].topk(len(pos)).indices.tolist())
        assert set(range(300 - 16, 300)) <= set(pos.tolist())  # the window is always kept
    assert [len(x) for x in kept_for_layer(cfg, 1, 2, q, k, budgets)] == [7, 300]


def test_pyramidkv_layer_budgets_and_short_prompts_kept_whole():
    q, k = _qk(s=1000)
    cfg = CompressConfig(method="pyramidkv", budget=320, window=16)
    sizes = [len(kept_for_layer(cfg, li, 8, q, k)[0]) for li in range(8)]
    assert sizes == [pyramid_layer_budget(li, 8, 1000, 1 - 320 / 1000, 16) for li in range(8)]
    assert sizes[0] > sizes[-1]
    assert kept_for_layer(CompressConfig(method="snapkv", budget=1000, window=16), 0, 8, q, k) is None
    q2, k2 = _qk(s=16)  # no longer than the window
    assert kept_for_layer(CompressConfig(method="adakv", budget=4, window=16), 0, 8, q2, k2) is None
    assert kept_for_layer(CompressConfig(), 0, 8, q, k) is None  # none
