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


def greedy(model_path: str, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """argmax decoding for exactly ``max_new_tokens`` steps (eos does not stop it)."""
    import torch

    _, model = load(str(model_path))
    ids = torch.tensor([input_ids])
    out: list[int] = []
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out
