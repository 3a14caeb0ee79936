"""``python -m sglang_fairkv.offline_stats``: per-head KV statistics from real compression, offline.

Runs prompts through the model with Hugging Face transformers (CPU, float32), applies this project's
compression (the same code as ``kvdump``) and writes ``fairkv-stats/1``: per (layer, KV head) the
mean / std / quantiles of kept tokens per request. The engine profiler (``python -m
sglang_fairkv.profiler``) produces the same file from the serving engine's own pools; this offline path
needs no server, so plans and the simulator can use a real model's head skew from a script.

    python -m sglang_fairkv.offline_stats --model-path models/SmolLM2-135M-Instruct --method adakv \\
        --ratio 0.75 --synthetic long-context --num-prompts 8 --out smollm2-adakv.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from .placement.stats import QUANTILES, KVStats, summarize_counts

PROG = "python -m sglang_fairkv.offline_stats"
_WORDS = ("the river city stone north garden library window morning market bridge lantern harbor "
          "orchard valley winter summer letter story music").split()


def synthetic_long_context(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` needle-in-a-haystack prompts of about ``length`` tokens (generated locally)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        sents = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
                 for _ in range(length // 8)]
        key = rng.randint(1000, 9999)
        sents.insert(rng.randrange(len(sents)), f"The secret key of item {i} is {key}.")
        ids = tokenizer(" ".join(sents) + f" Question: what is the secret key of item {i}?")["input_ids"]
        prompts.append(ids[-length:])
    return prompts


def add_prompt_args(p: argparse.ArgumentParser, *, num_prompts: int, prompt_len: int):
    """``--prompts FILE | --synthetic long-context`` with ``--num-prompts`` / ``--prompt-len``; returns the
    (required, mutually exclusive) source group, for a caller with another source."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="JSON list of token-id lists")
    src.add_argument("--synthetic", choices=("long-context",))
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    return src


def load_prompts(a: argparse.Namespace, model_path: str) -> list[list[int]]:
    """The prompts :func:`add_prompt_args` describes; ValueError on a malformed ``--prompts`` file."""
    if a.prompts is None:
        from transformers import AutoTokenizer

        return synthetic_long_context(AutoTokenizer.from_pretrained(model_path), a.num_prompts, a.prompt_len)
    prompts = json.loads(a.prompts.read_text())
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, list) for x in prompts):
        raise ValueError(f"{a.prompts} must hold a non-empty JSON list of token-id lists")
    return prompts


def stats_from_counts(counts: np.ndarray, model: str, cfg, method: str, budget: float) -> KVStats:
    """``counts``: int [prompts, layers, kv_heads] kept tokens -> :class:`KVStats`."""
    sm = summarize_counts(counts)
    return KVStats(model=model, num_layers=counts.shape[1], num_q_heads=cfg.num_attention_heads,
                   num_kv_heads=cfg.num_key_value_heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                   hidden_size=cfg.hidden_size, kv_len_mean=sm["kv_len_mean"], kv_len_std=sm["kv_len_std"],
                   samples=int(counts.shape[0]), method=method, budget=budget,
                   extra={**{k: sm[k].tolist() for k in QUANTILES}, "source": "offline_stats"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--method", choices=("snapkv", "adakv", "pyramidkv"), default="adakv")
    p.add_argument("--ratio", type=float, required=True, help="kvpress compression_ratio")
    add_prompt_args(p, num_prompts=8, prompt_len=1024)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        import torch
        from tqdm import tqdm
        from transformers import AutoModelForCausalLM

        from .kvdump import capture_qk, kept_positions

        model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32).eval()
        prompts = load_prompts(a, a.model_path)
        counts = []
        for ids in tqdm(prompts, desc="prompts", file=sys.stderr):
            if len(ids) <= a.window:
                raise ValueError(f"a prompt of {len(ids)} tokens is not longer than --window {a.window}")
            kept = kept_positions(capture_qk(model, ids, a.window), a.method, ratio=a.ratio,
                                  budget=None, window=a.window, kernel=5, alpha=0.2)
            counts.append([[len(k) for k in layer] for layer in kept])
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    c = np.array(counts, dtype=np.float64)
    mean_len = float(np.mean([len(x) for x in prompts]))
    stats = stats_from_counts(c, str(a.model_path), model.config, a.method,
                              budget=mean_len * (1 - a.ratio))
    stats.extra["ratio"] = a.ratio  # the compression ratio the counts were measured at
    stats.save(a.out)
    print(f"wrote {a.out}: {c.shape[0]} prompts, {c.shape[1]} layers x {c.shape[2]} KV heads, "
          f"mean kept {c.mean():.1f} tokens per head")
    return 0


if __name__ == "__main__":
    sys.exit(main())
