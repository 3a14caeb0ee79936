"""fp8 KV rows with per-head compression (``--kv-cache-dtype fp8_e4m3 | fp8_e5m2``), end to end on CPU.

Stock SGLang 0.5.23 refuses fp8 KV on a CPU without AMX, so the references are HF transformers and
kvpress (its own venv) with a cache rounded through fp8 as the server reads its pool
(``helpers/fp8_cache.py``, scale 1.0): a prefill chunk attends and scores its own K/V unrounded and
earlier rows as stored (SGLang + FlashInfer's ragged + paged prefill), decode reads every row as stored.
Each comparison is one where fp8 changes the tokens (asserted), so a server that ignored the dtype, or
read its rows the other way (everything rounded, SGLang's torch_native), would fail.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers.server import STRICT, Server, generate_in_background, wait_ranks_empty

pytestmark = [pytest.mark.server, pytest.mark.slow]

N_NEW = 12
RATIO = 0.5
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _prompts(n_tokens=(150, 200, 260), seed=11, vocab=400) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in n_tokens]


@pytest.fixture(scope="session")
def fp8_refs(tiny_kv6_path, kvpress_python, shared, tmp_path_factory):
    """HF full-cache tokens (fp32, e4m3-rounded, e5m2-rounded) and kvpress AdaKV / SnapKV tokens with
    the e4m3-rounded cache and without, on the tiny 6-KV-head model (once per run)."""
    def compute():
        from helpers import hf_ref
        from helpers.fairkv_refs import kvpress_greedy

        prompts = _prompts()
        out = {"prompts": prompts, "hf": [hf_ref.greedy(tiny_kv6_path, p, N_NEW) for p in prompts]}
        for name, dt in FP8.items():
            out[f"hf_{name}"] = [hf_ref.greedy(tiny_kv6_path, p, N_NEW, kv_dtype=dt) for p in prompts]
        jobs = [{"method": m, "ratio": RATIO, "n_new": N_NEW, "ids": p, **({"kv_dtype": kd} if kd else {})}
                for m in ("adakv", "snapkv") for kd in ("fp8_e4m3", None) for p in prompts]
        # a prefix hit on prompt 1: all but its last 64 tokens (the observation window) read from the tier
        jobs += [{"method": m, "ratio": RATIO, "n_new": N_NEW, "ids": prompts[1], "kv_dtype": "fp8_e4m3",
                  "rounded_prefix": len(prompts[1]) - 64} for m in ("adakv", "snapkv")]
        got = kvpress_greedy(kvpress_python, tiny_kv6_path, jobs, tmp_path_factory.mktemp("kvp-fp8"))
        n = len(prompts)
        out.update(adakv_fp8=got[:n], adakv=got[n:2 * n], snapkv_fp8=got[2 * n:3 * n], snapkv=got[3 * n:4 * n],
                   adakv_fp8_hit=got[4 * n], snapkv_fp8_hit=got[4 * n + 1])
        return out

    return shared("fp8-references", compute)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_dense_fp8_equals_hf_with_a_rounded_cache(tiny_kv6_path, fp8_refs, kv_dtype):
    """``--kv-compress none --kv-cache-dtype fp8_*``: HF's greedy tokens over the cache rounded the same
    way; fp8 changes them (vs the fp32 cache) on some prompt; the pool holds fp8 rows, 4x the fp32
    rows in the same bytes; pages back to 0."""
    ref = fp8_refs[f"hf_{kv_dtype}"]
    assert ref != fp8_refs["hf"], "the rounding must change some tokens for the test to see it"
    with Server(["--model-path", str(tiny_kv6_path), "--kv-compress", "none", "--kv-cache-dtype", kv_dtype],
                env=STRICT) as s:
        got = [s.greedy_ids(p, N_NEW) for p in fp8_refs["prompts"]]
        info = wait_ranks_empty(s)[0]
    assert got == ref
    assert info["kv_dtype"] == str(FP8[kv_dtype]).removeprefix("torch.")
    assert info["pages_used"] == 0


@pytest.mark.parametrize("method,layout", [("adakv", "tp1"), ("snapkv", "tp1"), ("adakv", "tp2-fairkv-copies"),
                                           ("snapkv", "tp2-sha")])
def test_compressed_fp8_equals_kvpress_with_the_same_keys(tiny_kv6_path, fp8_refs, method, layout, tmp_path):
    """AdaKV / SnapKV 0.5 with e4m3 rows at TP 1, AdaKV at TP 2 through a FairKV plan with copies, SnapKV
    at TP 2 through sha:
    kvpress's tokens with the same rounded cache (its scores see the prompt's own keys unrounded, as
    the server's); they differ from kvpress without fp8 on some prompt. A prompt served again from the
    prefix tier reads its cached prefix as stored (fp8), as SGLang + FlashInfer read a prefix hit: its
    tokens are kvpress's with that prefix rounded (which may differ from the miss); pages back to 0."""
    from test_tp_fairkv import skewed_stats

    want = fp8_refs[f"{method}_fp8"]
    assert want != fp8_refs[method], "fp8 must change some compressed tokens for the test to see it"
    args = ["--model-path", str(tiny_kv6_path), "--kv-compress", method, "--kv-compress-ratio", str(RATIO),
            "--kv-cache-dtype", "fp8_e4m3"]
    if layout == "tp2-fairkv-copies":
        args += ["--tp-size", "2", "--fairkv-plan", "fairkv", "--fairkv-stats", str(skewed_stats(tmp_path / "s.json"))]
    elif layout == "tp2-sha":
        args += ["--tp-size", "2"]
    prompts = fp8_refs["prompts"]
    with Server(args, env=STRICT) as s:
        got = [s.greedy_ids(p, N_NEW) for p in prompts]
        again = s.greedy(prompts[1], N_NEW)
        info = wait_ranks_empty(s)[0]
    assert got == want, f"{method} {layout}"
    assert again["meta_info"]["cached_tokens"] == len(prompts[1]) - 64
    assert again["output_ids"] == fp8_refs[f"{method}_fp8_hit"]
    assert [r["pages_used"] for r in info["ranks"]] == [0] * (1 if layout == "tp1" else 2)
    assert info["ledger_matches_pool"]
    if layout == "tp2-fairkv-copies":
        assert min(info["plan_copies_per_layer"]) >= 1


MAX_TOTAL, PROMPT, NEW = 512, 256, 8


def _most_running(args: list[str], prompts: list[list[int]]) -> int:
    """Send every prompt at once; the most requests SGLang's scheduler logged decoding together."""
    with Server(args + ["--max-total-tokens", str(MAX_TOTAL), "--max-running-requests", "64",
                        "--context-length", "1024", "--decode-log-interval", "1", "--disable-radix-cache"],
                env=STRICT) as s:
        outs, threads = generate_in_background(s, prompts, NEW, timeout=900)
        for t in threads:
            t.join()
        assert all(o is not None and len(o.get("output_ids", [])) == NEW for o in outs), outs[:2]
        log = s.log_text()
        info = wait_ranks_empty(s)[0] if "--kv-compress" in args else None
    assert "#retracted_reqs" not in log
    if info is not None:
        assert info["pages_used"] == 0
    return max((int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", log)), default=0)


def test_fp8_multiplies_the_requests_decoding_at_once(tiny_kv6_path):
    """At equal KV bytes (the same ``--max-total-tokens`` of the fp32 model): AdaKV 0.75 with fp8 rows
    decodes at least 3x the requests at once of AdaKV 0.75 in fp32 (the byte ratio is 4), and both
    beat stock SGLang's dense pool; every request completes, nothing is retracted."""
    prompts = _prompts(n_tokens=(PROMPT,) * 48, seed=5)
    base = ["--model-path", str(tiny_kv6_path)]
    stock = _most_running(base, prompts[:8])
    ada = _most_running(base + ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75"], prompts[:24])
    ada8 = _most_running(base + ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75", "--kv-cache-dtype",
                                 "fp8_e4m3"], prompts)
    print(f"requests decoding at once, {MAX_TOTAL} fp32 tokens of KV: stock {stock}, AdaKV 0.75 {ada}, "
          f"AdaKV 0.75 + fp8 {ada8}")
    assert stock <= MAX_TOTAL // (PROMPT + NEW) + 1
    assert ada >= 2 * max(1, stock)
    assert ada8 >= 3 * ada, (ada8, ada)
