"""Kept token sets per (layer, KV head) equal NVIDIA kvpress 0.5.5, run live in its own venv.

kvpress needs transformers < 5.3 (SGLang pins 5.19): ``scripts/kvpress_venv.sh`` builds
``.venv-kvpress`` once; the oracle runs there as a subprocess on the same SmolLM2 folder and prompt.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_fairkv.compress import (SnapKVScorer, n_kept_for_ratio, pyramid_layer_budget,
                                    select_adakv, select_uniform)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prompts(smollm2_path, tmp_path_factory):
    """A long natural-looking prompt with a needle, cut to 320 and 2000 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    rng = random.Random(0)
    words = ("the river city stone north garden library window morning market bridge lantern "
             "harbor orchard valley").split()
    sents = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(300)]
    ids = tok(" ".join(sents[:40]) + " The secret key is 7421. " + " ".join(sents[40:]))["input_ids"]
    out = {}
    for n in (320, 2000):
        p = tmp_path_factory.mktemp("prompts") / f"ids{n}.json"
        p.write_text(json.dumps(ids[:n]))
        out[n] = p
    return out


def _kept(path):
    d = json.loads(Path(path).read_text())
    return [[h["kept"] for h in layer["heads"]] for layer in d["layers"]]


@pytest.mark.slow
@pytest.mark.parametrize("method,ratio,n", [
    ("snapkv", 0.5, 320), ("adakv", 0.75, 2000), ("pyramidkv", 0.5, 2000),
])
def test_kept_sets_equal_kvpress(kvpress_python, smollm2_path, prompts, tmp_path, method, ratio, n):
    ours, theirs = tmp_path / "ours.json", tmp_path / "kvpress.json"
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.kvdump", "--model-path", str(smollm2_path),
                        "--method", method, "--ratio", str(ratio), "--prompt-ids", str(prompts[n]),
                        "--out", str(ours)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(kvpress_python), str(REPO / "test" / "helpers" / "kvpress_oracle.py"),
                        str(smollm2_path), method, str(ratio), "64", "5", "0.2", str(prompts[n]),
                        str(theirs)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _kept(ours), _kept(theirs)
    assert len(a) == len(b) == 30
    mismatches = [(l, h) for l in range(30) for h in range(3) if a[l][h] != b[l][h]]
    assert not mismatches, f"{len(mismatches)} (layer, head) differ, first {mismatches[:5]}"
    sizes = [len(k) for layer in a for k in layer]
    if method == "adakv":
        assert len(set(sizes)) > 1  # budgets really moved between heads
        for layer in a:
            assert sum(len(k) for k in layer) == 3 * n_kept_for_ratio(n, ratio)


def test_window_always_kept_and_shapes():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    s = SnapKVScorer(window=8, kernel=3).score(q, k)
    assert s.shape == (2, 40)
    kept = select_uniform(s, 10)
    assert all(set(range(32, 40)) <= set(x.tolist()) for x in kept)
    ada = select_adakv(s, 10, alpha=0.2)
    assert sum(len(x) for x in ada) == 20
    with pytest.raises(ValueError, match="prompt of 8 tokens must be longer than the window 8"):
        SnapKVScorer(window=8).score(q, k[:, :8])
    with pytest.raises(ValueError, match="kernel must be a positive odd number, got 4"):
        SnapKVScorer(kernel=4)
    with pytest.raises(ValueError, match=r"compression ratio must be in \[0, 1\), got 1.0"):
        n_kept_for_ratio(100, 1.0)


def test_pyramid_budgets_decrease_and_average_to_ratio():
    b = [pyramid_layer_budget(l, 30, 2000, 0.5) for l in range(30)]
    assert b == sorted(b, reverse=True) and b[0] > b[-1]
    assert abs(sum(b) / 30 - 2000 * 0.5) < 2  # the layer budgets average to the ratio's budget
    # too short for a pyramid: kvpress falls back to the uniform budget
    assert pyramid_layer_budget(3, 30, 100, 0.5) == 50
