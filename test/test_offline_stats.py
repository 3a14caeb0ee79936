"""Offline stats from real compression, and mapping a measured skew onto other shapes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sglang_fairkv.placement import load_stats, synthetic_stats
from sglang_fairkv.placement.stats import map_to_shape


def test_offline_stats_cli_counts_match_kvdump(smollm2_path, tmp_path):
    """One prompt: the stats' means are exactly the kept counts kvdump reports."""
    import json

    from transformers import AutoTokenizer

    from sglang_fairkv.offline_stats import synthetic_long_context

    ids = synthetic_long_context(AutoTokenizer.from_pretrained(str(smollm2_path)), 1, 300)
    (tmp_path / "p.json").write_text(json.dumps(ids))
    (tmp_path / "ids.json").write_text(json.dumps(ids[0]))
    out, kept = tmp_path / "s.json", tmp_path / "k.json"
    common = ["--model-path", str(smollm2_path), "--method", "adakv", "--ratio", "0.6"]
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.offline_stats", *common, "--prompts",
                        str(tmp_path / "p.json"), "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.kvdump", *common, "--prompt-ids",
                        str(tmp_path / "ids.json"), "--out", str(kept)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = load_stats(out)
    counts = [[len(h["kept"]) for h in layer["heads"]] for layer in json.loads(kept.read_text())["layers"]]
    assert s.samples == 1 and s.method == "adakv" and s.num_kv_heads == 3
    assert np.array_equal(s.kv_len_mean, np.array(counts, dtype=float))
    assert (s.kv_len_mean.sum(axis=1) == 3 * int(300 * 0.4)).all()  # AdaKV keeps the layer total


def test_map_to_shape_keeps_budget_and_draws_from_source():
    src = synthetic_stats("smollm2-135m", budget=300, concentration=0.7, seed=4)
    t = map_to_shape(src, "llama-3.3-70b", 1024, seed=1)
    assert t.kv_len_mean.shape == (80, 8) and t.synthetic
    np.testing.assert_allclose(t.kv_len_mean.mean(axis=1), 1024)
    rel_src = src.kv_len_mean / src.kv_len_mean.mean(axis=1, keepdims=True)
    # renormalising keeps ratios: inside a target layer no two heads differ more than the pool allows
    row_spread = t.kv_len_mean.max(axis=1) / t.kv_len_mean.min(axis=1)
    assert (row_spread <= rel_src.max() / rel_src.min() * (1 + 1e-9)).all()
    assert row_spread.max() > 1.5  # the skew came along
    with pytest.raises(ValueError, match="unknown shape 'x'"):
        map_to_shape(src, "x", 10)
