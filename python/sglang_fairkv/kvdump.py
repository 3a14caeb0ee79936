"""``python -m sglang_fairkv.kvdump``: which prompt positions each (layer, KV head) keeps.

Runs the prompt through the model with Hugging Face transformers on CPU in float32, computes the
post-RoPE queries of the observation window and the keys of every layer, and applies this project's
compression (``sglang_fairkv.compress``). Output::

    {"method": ..., "seq_len": S, "layers": [{"layer": i, "heads": [{"kv_head": h, "kept": [...]}]}]}

``--ratio`` means what kvpress's ``compression_ratio`` means (fraction removed); ``--budget N`` keeps
``N`` tokens per head on average (prompts shorter than the budget are kept whole).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .compress.policy import CompressConfig, kept_for_layer

PROG = "python -m sglang_fairkv.kvdump"


def capture_qk(model, input_ids: list[int], window: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (post-RoPE queries of the last ``window`` tokens [Hq, W, D], keys [Hkv, S, D])."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def hook(module, args, kwargs, _i=i):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            b, s, _ = h.shape
            d = module.head_dim
            q = module.q_proj(h).view(b, s, -1, d).transpose(1, 2)
            k = module.k_proj(h).view(b, s, -1, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out[_i] = (q[0, :, -window:].detach(), k[0].detach())

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([input_ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [out[i] for i in range(len(model.model.layers))]


def kept_positions(qk: list[tuple[torch.Tensor, torch.Tensor]], method: str, *, ratio: float | None,
                   budget: int | None, window: int, kernel: int, alpha: float,
                   head_budgets: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
    """Kept positions per layer and KV head for the captured queries/keys (see module docstring)."""
    if ratio is None and budget is None and method != "headkv":
        raise ValueError("give --ratio or --budget")
    # the budgets arrive as a tensor here; CompressConfig only needs to know that headkv has some
    cfg = CompressConfig(method=method, ratio=ratio, budget=budget, window=window, kernel=kernel,
                         alpha=alpha, head_budgets="<tensor>" if method == "headkv" else None)
    result = []
    for li, (q, k) in enumerate(qk):
        kept = kept_for_layer(cfg, li, len(qk), q, k, head_budgets)
        result.append(kept if kept is not None else [torch.arange(k.shape[1]) for _ in range(k.shape[0])])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--method", choices=("snapkv", "adakv", "pyramidkv", "headkv"), required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, help="fraction of the prompt removed (kvpress compression_ratio)")
    g.add_argument("--budget", type=int, help="mean kept tokens per head")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.2, help="AdaKV safeguard fraction")
    p.add_argument("--head-budgets", type=Path, help="HeadKV static budgets JSON (method headkv)")
    p.add_argument("--prompt-ids", type=Path, required=True, help="JSON list of token ids")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        ids = json.loads(a.prompt_ids.read_text())
        if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
            raise ValueError(f"{a.prompt_ids} must hold a JSON list of token ids")
        if len(ids) <= a.window:
            raise ValueError(f"prompt of {len(ids)} tokens must be longer than --window {a.window}")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32).eval()
        hb = None
        if a.method == "headkv":
            from .compress import load_head_budgets

            if a.head_budgets is None:
                raise ValueError("--method headkv needs --head-budgets FILE")
            cfg = model.config
            hb = load_head_budgets(a.head_budgets, cfg.num_hidden_layers, cfg.num_key_value_heads)
        kept = kept_positions(capture_qk(model, ids, a.window), a.method, ratio=a.ratio,
                              budget=a.budget, window=a.window, kernel=a.kernel, alpha=a.alpha,
                              head_budgets=hb)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    a.out.write_text(json.dumps({
        "method": a.method, "seq_len": len(ids),
        "layers": [{"layer": li, "heads": [{"kv_head": h, "kept": t.tolist()} for h, t in enumerate(layer)]}
                   for li, layer in enumerate(kept)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
