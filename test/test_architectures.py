"""Every architecture with a FairKV class, end to end on CPU: real servers, HTTP (the README's table).

Tiny random checkpoints built here (transformers configs, no hub), 3 KV heads each (no even TP 2
split, so stock SGLang refuses TP 2): Qwen3 (q/k norm weights drawn around 1), Qwen3-MoE (the same
attention, a 4-expert top-2 MoE in every layer), Qwen2 (q/k/v biases), Mistral. References,
independent of the servers: kvpress 0.5.5's AdaKV (float32, its own venv; for Qwen3-MoE with the q/k
norm it applies to Qwen3, see ``helpers/kvpress_generate.py``) and the HF model's greedy tokens
without compression. Served: TP 1 (SGLang's own class with the fairkv backend; Qwen3-MoE: the FairKV
class, ``model.OWN_CLASS_AT_TP1``) and TP 2 with a FairKV plan with copies, AdaKV, equal to kvpress,
each with a prompt served again from the prefix tier; for the Qwen3 classes also TP 2 ``sha`` with
AdaKV and TP 2 ``sha`` without compression (HF). The Llama family (SmolLM2, the tiny Llamas) is
covered by test_fairkv_server, test_tp_fairkv and test_prefix_tier.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from helpers.server import STRICT, Server, wait_ranks_empty

pytestmark = [pytest.mark.server, pytest.mark.slow]

RATIO = 0.5
N_NEW = 12
ARCHS = ("qwen3", "qwen3_moe", "qwen2", "mistral")
#: the layouts each architecture is served in (Qwen2 and Mistral: their layers are Llama's / Qwen2's
#: with another flavor, so the two plan paths suffice)
LAYOUTS = {"qwen3": ("tp1", "tp2-sha", "tp2-fairkv-copies", "tp2-sha-dense"),
           "qwen3_moe": ("tp1", "tp2-sha", "tp2-fairkv-copies", "tp2-sha-dense"),
           "qwen2": ("tp1", "tp2-fairkv-copies"), "mistral": ("tp1", "tp2-fairkv-copies")}


def _prompts(vocab: int) -> list[list[int]]:
    """Three prompts of 180-260 tokens (past kvpress's window of 64 / (1 - ratio)), with repeats."""
    rng = random.Random(7)
    out = []
    for n in (180, 220, 260):
        motif = [rng.randrange(3, vocab) for _ in range(12)]
        out.append([rng.randrange(3, vocab) if rng.random() < 0.6 else motif[i % 12] for i in range(n)])
    return out


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory):
    from conftest import shared_model

    shape = dict(num_layers=2, hidden=192, num_heads=6, num_kv_heads=3, head_dim=32)
    out = {arch: shared_model(tmp_path_factory, f"tiny-{arch}", arch=arch, intermediate=384, **shape)
           for arch in ("qwen3", "qwen2", "mistral")}
    out["qwen3_moe"] = shared_model(tmp_path_factory, "tiny-qwen3_moe", arch="qwen3_moe", intermediate=96,
                                    num_experts=4, experts_per_token=2, **shape)
    return out


@pytest.fixture(scope="session")
def arch_refs(arch_models, kvpress_python, shared, tmp_path_factory):
    """Per architecture: the prompts, kvpress AdaKV tokens, HF full-cache tokens (once per run)."""
    def compute():
        import json

        from helpers import hf_ref
        from helpers.fairkv_refs import kvpress_greedy

        out = {}
        for arch, path in arch_models.items():
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            prompts = _prompts(vocab)
            jobs = [{"method": "adakv", "ratio": RATIO, "n_new": N_NEW, "ids": p} for p in prompts]
            out[arch] = {"prompts": prompts,
                         "adakv": kvpress_greedy(kvpress_python, path, jobs, tmp_path_factory.mktemp("kvp")),
                         "hf": [hf_ref.greedy(path, p, N_NEW) for p in prompts]}
        return out

    return shared("architecture-references", compute)


def _copies_stats(path, arch: str):
    """Stats where one head per layer holds most KV: the fairkv plan copies it at TP 2."""
    from sglang_fairkv.placement.stats import KVStats

    p = path / f"{arch}-stats.json"
    KVStats(model=arch, num_layers=2, num_q_heads=6, num_kv_heads=3, head_dim=32,
            kv_len_mean=np.array([[300.0, 40, 30], [30, 300, 40]])).save(p)
    return p


def test_references_see_the_features(arch_refs):
    """The comparisons below can fail: AdaKV changes the tokens of every model on some prompt, and
    the architectures give different tokens (each one's own layers really run)."""
    for arch in ARCHS:
        r = arch_refs[arch]
        assert any(a != h for a, h in zip(r["adakv"], r["hf"])), arch
    assert len({str(arch_refs[a]["hf"]) for a in ARCHS}) == len(ARCHS)


@pytest.mark.parametrize("arch,layout", [(a, lay) for a in ARCHS for lay in LAYOUTS[a]])
def test_greedy_equals_references(arch, layout, arch_models, arch_refs, tmp_path):
    ref = arch_refs[arch]
    path = arch_models[arch]
    args = ["--model-path", str(path)]
    compressed = layout != "tp2-sha-dense"
    if not compressed:
        args += ["--tp-size", "2", "--kv-compress", "none"]
    else:
        args += ["--kv-compress", "adakv", "--kv-compress-ratio", str(RATIO)]
        if layout == "tp2-sha":
            args += ["--tp-size", "2"]  # sha: the default plan
        elif layout == "tp2-fairkv-copies":
            args += ["--tp-size", "2", "--fairkv-plan", "fairkv", "--fairkv-stats", str(_copies_stats(tmp_path, arch))]
    with Server(args, env=STRICT) as s:
        got = [s.greedy_ids(p, N_NEW) for p in ref["prompts"]]
        # the first prompt again: its dense prefix comes from the tier (every rank its own heads), only
        # the observation window runs; the tokens must not change
        again = s.greedy(ref["prompts"][0], N_NEW) if compressed else None
        info = wait_ranks_empty(s)[0]
    assert got == (ref["adakv"] if compressed else ref["hf"]), f"{arch} {layout}"
    if compressed:
        assert again["output_ids"] == got[0]
        assert again["meta_info"]["cached_tokens"] == len(ref["prompts"][0]) - 64, again["meta_info"]
    tp = 1 if layout == "tp1" else 2
    assert [r["pages_used"] for r in info["ranks"]] == [0] * tp, info["ranks"]
    assert info["ledger_matches_pool"]
    if layout == "tp2-fairkv-copies":
        assert min(info["plan_copies_per_layer"]) >= 1, info["plan_copies_per_layer"]
