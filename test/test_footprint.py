"""The kept size known before a request runs (``compress.footprint``) against what
``kept_for_layer`` really keeps on random queries and keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sglang_fairkv.compress import footprint
from sglang_fairkv.compress.policy import CompressConfig, kept_for_layer, load_config_head_budgets

L, KV, G, D = 6, 4, 2, 8


def real_kept(cfg: CompressConfig, n: int, gen: torch.Generator, head_budgets=None) -> np.ndarray:
    """int64 [L, KV]: rows kept per (layer, head) by the policy for random post-RoPE q / k."""
    out = np.zeros((L, KV), dtype=np.int64)
    for l in range(L):
        k = torch.randn(KV, n, D, generator=gen)
        q = torch.randn(KV * G, min(cfg.window, n), D, generator=gen)
        kept = kept_for_layer(cfg, l, L, q, k, head_budgets)
        out[l] = n if kept is None else [int(x.numel()) for x in kept]
    return out


@pytest.fixture
def headkv(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "hb.json"
    path.write_text(json.dumps({"head_budgets": rng.integers(1, 300, size=(L, KV)).tolist()}))
    cfg = CompressConfig(method="headkv", head_budgets=str(path), window=16)
    return cfg, load_config_head_budgets(cfg, L, KV)


@pytest.mark.parametrize("n", [1, 16, 17, 100, 777])
def test_kept_rows_are_exact_for_fixed_budget_methods(n, headkv):
    gen = torch.Generator().manual_seed(n)
    cfgs = [(CompressConfig(), None), (CompressConfig(method="snapkv", ratio=0.75, window=16), None),
            (CompressConfig(method="snapkv", budget=64, window=16), None),
            (CompressConfig(method="pyramidkv", ratio=0.5, window=16), None), headkv]
    for cfg, hb in cfgs:
        want = real_kept(cfg, n, gen, hb)
        got = footprint.kept_per_head(cfg, n, L, KV, hb)
        assert got.tolist() == want.tolist(), (cfg.method, n)
        assert footprint.compresses(cfg, n) == bool((want < n).any()) or cfg.method == "headkv"


@pytest.mark.parametrize("n,ratio,alpha", [(100, 0.75, 0.2), (777, 0.5, 0.0), (300, 0.9, 1.0), (17, 0.5, 0.2)])
def test_adakv_bound_holds_per_rank_and_is_exact_in_rows_at_tp1(n, ratio, alpha):
    cfg = CompressConfig(method="adakv", ratio=ratio, window=16, alpha=alpha)
    gen = torch.Generator().manual_seed(n)
    rng = np.random.default_rng(n)
    P = 4
    for _ in range(5):
        kept = real_kept(cfg, n, gen)
        if footprint.compresses(cfg, n):
            total, floor = footprint.adakv_layer_rule(cfg, n, KV)
            assert (kept.sum(axis=1) == total).all() and (kept >= floor).all()
        for tp in (1, 2, 3):
            owner = rng.integers(0, tp, size=(L, KV))
            owner[rng.random((L, KV)) < 0.1] = -1  # a head held by nobody (a rank without it)
            for extra in (0, 5, 40):
                bound = footprint.kept_pages(cfg, n, extra, owner, tp, P)
                real = np.zeros((tp, L), dtype=np.int64)
                for l in range(L):
                    for h in range(KV):
                        if owner[l, h] >= 0:
                            real[owner[l, h], l] += -(-(kept[l, h] + extra) // P)
                assert (real <= bound).all(), (tp, extra)
        whole = footprint.kept_pages(cfg, n, 0, np.zeros((L, KV), dtype=np.int64), 1, 1)
        assert whole[0].tolist() == kept.sum(axis=1).tolist()  # TP 1, page 1: rows exact


def test_last_chunk_peak_is_the_running_layer_dense_between_kept_and_prefix_layers():
    kept = np.array([[2, 2, 2]])
    dense_full = np.array([[10, 10, 10]])
    prefix = np.array([[4, 4, 4]])
    # layer 0 running: 10 + 4 + 4; layer 1: 2 + 10 + 4; layer 2: 2 + 2 + 10
    assert footprint.last_chunk_peak(kept, dense_full, prefix).tolist() == [18]
    assert footprint.last_chunk_peak(kept, dense_full, 0 * prefix).tolist() == [14]


def test_capacity_summary_counts_requests_at_once_as_pages_say():
    """The start-up line's arithmetic, against a hand count: SmolLM2's 30 layers x 3 KV heads at TP 1,
    pages of 16, SnapKV at ratio 0.5: a 1000 + 256 request keeps 500 + 256 rows per segment (48 pages)
    where stock keeps 1256 (79 pages); at TP 2 with heads split 2 + 1 the tighter rank decides."""
    import numpy as np

    from sglang_fairkv.compress.footprint import capacity_summary, describe
    from sglang_fairkv.compress.policy import CompressConfig

    cfg = CompressConfig(method="snapkv", ratio=0.5)
    own = np.zeros((30, 3), dtype=np.int64)
    cap = capacity_summary(cfg, own, np.array([100000]), 16)
    assert cap["pages_compressed"] == 90 * 48 and cap["pages_dense"] == 90 * 79
    assert cap["requests_compressed"] == 100000 // (90 * 48) and cap["requests_dense"] == 100000 // (90 * 79)
    assert cap["dense_tokens"] == 100000 * 16 // 90
    own[:, 2] = 1  # TP 2: rank 0 holds 60 segments, rank 1 holds 30
    cap = capacity_summary(cfg, own, np.array([50000, 50000]), 16)
    assert cap["requests_compressed"] == 50000 // (60 * 48) and cap["dense_tokens"] == 50000 * 16 // 60
    assert "each layer keeps 50% of each prompt's tokens" in describe(CompressConfig(method="adakv", ratio=0.5))
    assert describe(CompressConfig(method="none")).startswith("no compression")
