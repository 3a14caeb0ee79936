"""Independent reference: greedy decoding with Hugging Face transformers in float32."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4)
def load(model_path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return tok, model


def greedy(model_path: str, input_ids: list[int], max_new_tokens: int, kv_dtype=None) -> list[int]:
    """argmax decoding for exactly ``max_new_tokens`` steps (eos does not stop it). ``kv_dtype`` (an fp8
    torch dtype): the cache rounded as the server's fp8 pool is read (``helpers/fp8_cache.py``)."""
    import torch

    _, model = load(str(model_path))
    ids = torch.tensor([input_ids])
    out: list[int] = []
    past = None
    if kv_dtype is not None:
        from helpers.fp8_cache import fp8_cache

        past = fp8_cache(kv_dtype)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out
