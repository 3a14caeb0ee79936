"""A running model's attention over another rank plan's heads (a plan switch at an empty pool).

For every layer whose heads on this rank change, a new :class:`~.heads.FairKVAttention` over the new heads
replaces the old one: its q/k/v rows and o_proj columns are read from the checkpoint's safetensors (only
those tensors, through the same loaders as at start-up, so the weights equal a fresh start with the new
plan), its q/k norms copied (one weight shared by every head). Parameters keep the old ones' device and
dtype. Layers whose heads do not change are not touched (their tensors, and graphs captured over them,
stay valid).
"""

from __future__ import annotations

import glob
import os
import re

import torch

from .heads import FairKVAttention

_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$")


def decoder_layers(model) -> list:
    """The decoder layers of one of our causal-LM classes (``model.model.layers``)."""
    return list(model.model.layers)


def reslice_attention(model, rank_plan, model_path: str) -> list[int]:
    """Rebuild the attention of every layer whose heads differ under ``rank_plan``; returns those layers."""
    layers = decoder_layers(model)
    changed = [l for l, layer in enumerate(layers) if list(layer.self_attn.heads) != list(rank_plan.local_heads[l])]
    if not changed:
        return []
    fresh: dict[int, FairKVAttention] = {}
    for l in changed:
        old = layers[l].self_attn
        ref = old.qkv_proj.weight
        with torch.device(ref.device):
            attn = FairKVAttention(heads=rank_plan.local_heads[l], rank=rank_plan.rank, **old.build_args)
        for mod in (attn.qkv_proj, attn.o_proj):
            mod.to(dtype=ref.dtype)
        if attn.q_norm is not None:
            attn.q_norm.load_state_dict(old.q_norm.state_dict())
            attn.k_norm.load_state_dict(old.k_norm.state_dict())
        fresh[l] = attn
    loaded = _load_slices(fresh, model_path)
    missing = [l for l in changed if (l, "weight") not in loaded]
    if missing:
        raise RuntimeError(f"fairkv: no q/k/v/o weights of layers {missing} in {model_path}")
    for l, attn in fresh.items():
        layers[l].self_attn = attn
    if hasattr(model.model, "rank_plan"):  # the Llama family's model keeps the plan it was built with
        model.model.rank_plan = rank_plan
    return changed


def _load_slices(fresh: dict[int, FairKVAttention], model_path: str) -> set:
    """q/k/v/o (weights, biases) of the layers in ``fresh`` from the checkpoint, into their loaders."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise RuntimeError(f"fairkv: a plan switch re-reads attention weights from safetensors; none in {model_path}")
    seen = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                m = _NAME.search(name)
                if m is None or int(m.group(1)) not in fresh:
                    continue
                l, proj, kind = int(m.group(1)), m.group(2), m.group(3)
                attn = fresh[l]
                tensor = f.get_tensor(name)
                if proj == "o_proj":
                    param = attn.o_proj.weight if kind == "weight" else attn.o_proj.bias
                    if param is not None:
                        attn.o_proj.load(param, tensor)
                else:
                    param = attn.qkv_proj.weight if kind == "weight" else attn.qkv_proj.bias
                    if param is not None:
                        attn.qkv_proj.load(param, tensor, proj[0])
                seen.add((l, kind))
    return seen
