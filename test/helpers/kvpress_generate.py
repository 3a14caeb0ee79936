"""Run by the kvpress venv's python: greedy tokens with a kvpress press on the whole prompt.

    .venv-kvpress/bin/python test/helpers/kvpress_generate.py MODEL JOBS OUT

``JOBS``: JSON list of ``{"method": none|snapkv|adakv, "ratio": R, "n_new": N, "ids": [...]}`` (one
model load for all of them), optionally ``"kv_dtype": "fp8_e4m3" | "fp8_e5m2"``: the cache rounded
through fp8 as the server's fp8 pool is read (``fp8_cache.py``: the press scores the prompt's own keys
unrounded, the kept rows are then stored rounded); ``"rounded_prefix": n``: the prompt's first ``n``
tokens' K/V as a prefix hit on the server reads them (from an earlier prefill, stored in fp8).

Mirrors what the fairkv server does: the prompt is prefilled *with* the press (full attention for
the prompt's own logits, compression in kvpress's post-attention hook), the first token is the argmax
of the last prompt position, then ``N_NEW - 1`` greedy steps at positions ``S, S+1, ...`` (the
positions kvpress's own pipeline uses after compression). ``METHOD`` none runs without a press.
eos does not stop decoding. Writes a JSON list of output id lists, one per job.
"""

import json
import sys

import torch
from kvpress import AdaKVPress, SnapKVPress
from transformers import AutoModelForCausalLM


def generate(model, method: str, ratio: float, ids: list[int], n_new: int, kv_dtype: str | None = None,
             rounded_prefix: int = 0) -> list[int]:
    from transformers import DynamicCache

    press = {"snapkv": lambda: SnapKVPress(compression_ratio=ratio),
             "adakv": lambda: AdaKVPress(SnapKVPress(compression_ratio=ratio)),
             "none": lambda: None}[method]()
    if kv_dtype is None:
        cache = DynamicCache()
    else:
        from fp8_cache import cached_prefix_kv, fp8_cache

        dt = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_dtype]
        cache = fp8_cache(dt, cached_prefix_kv(model, ids[:rounded_prefix], dt) if rounded_prefix else None)
    with torch.no_grad():
        if press is not None:
            with press(model):
                out = model(input_ids=torch.tensor([ids]), past_key_values=cache)
        else:
            out = model(input_ids=torch.tensor([ids]), past_key_values=cache)
        gen = [int(out.logits[0, -1].argmax())]
        for i in range(n_new - 1):
            out = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[len(ids) + i]]))
            gen.append(int(out.logits[0, -1].argmax()))
    return gen


def qk_norm_for_qwen3_moe() -> None:
    """kvpress 0.5.5 applies Qwen3's q_norm to SnapKV's window queries only for ``Qwen3Attention``
    (``kvpress.utils.get_prerope_query_states``); transformers' ``Qwen3MoeAttention`` is a separate
    class with the same q_norm, which kvpress lists as untested and scores without it. The model
    normalises its queries, so the reference does too: the check is widened to both classes."""
    import kvpress.utils as ku
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

    ku.Qwen3Attention = (Qwen3Attention, Qwen3MoeAttention)


def main():
    model_path, jobs_path, out_path = sys.argv[1:4]
    qk_norm_for_qwen3_moe()
    jobs = json.load(open(jobs_path))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    json.dump([generate(model, j["method"], float(j["ratio"]), j["ids"], int(j["n_new"]), j.get("kv_dtype"),
                        int(j.get("rounded_prefix", 0))) for j in jobs],
              open(out_path, "w"))


if __name__ == "__main__":
    main()
