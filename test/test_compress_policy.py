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


def test_snapkv_scores_per_kv_head_without_expanding_k():
    """SnapKV scoring reshapes the window queries per KV head (``[H, group x w, D]``) instead of copying
    K to every query head: the scores equal the expanded formula (fp64, kvpress's order of operations),
    and the peak temporaries of one call stay within the logits and their fp32 softmax (2 x Hq x w x S x
    4 B, x 1.25), below the expanded K alone plus those (Llama-8B's GQA 4, S = 4096, D = 128)."""
    import math

    import torch.nn.functional as F
    from test_prefill_path import peak_bytes

    from sglang_fairkv.compress.snapkv import SnapKVScorer

    hq, hkv, w, s, d = 32, 8, 64, 4096, 128
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(hq, w, d, generator=gen)
    k = torch.randn(hkv, s, d, generator=gen)
    sc = SnapKVScorer(window=w, kernel=5)
    got = sc.score(q, k)
    # the expanded reference in fp64
    kk = k.double().repeat_interleave(hq // hkv, dim=0)
    logits = q.double() @ kk.transpose(1, 2) / math.sqrt(d)
    mask = torch.triu(torch.full((w, s), float("-inf"), dtype=torch.float64), diagonal=s - w + 1)
    probs = torch.softmax(logits + mask, -1)[..., :s - w].mean(-2)
    ref = F.avg_pool1d(probs, 5, padding=2, stride=1).view(hkv, hq // hkv, s - w).mean(1)
    assert torch.allclose(got[:, :s - w].double(), ref, rtol=1e-4, atol=1e-9)
    assert torch.equal(got[:, s - w:], (got[:, :s - w].max() + 1).expand(hkv, w))
    def expanded():  # the scorer before (K copied to the query heads, the mask over every column)
        lg = torch.matmul(q, k.repeat_interleave(hq // hkv, dim=0).transpose(1, 2)) / math.sqrt(d)
        m = torch.triu(torch.full((w, s), float("-inf")), diagonal=s - w + 1)
        return torch.softmax(lg + m, dim=-1, dtype=torch.float32)[..., :s - w].mean(-2)

    peak, before = peak_bytes(lambda: sc.score(q, k)), peak_bytes(expanded)
    bound = 1.25 * 2 * hq * w * s * 4
    print(f"snapkv scoring peak {peak / 2**20:.1f} MiB (bound {bound / 2**20:.1f}), K expanded {before / 2**20:.1f} MiB")
    assert peak <= bound < before
