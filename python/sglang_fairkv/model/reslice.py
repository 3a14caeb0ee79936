"""A running model's attention over another rank plan's heads (a plan switch).

Two ways, both leaving the weights equal to a fresh start with the new plan; layers whose heads do not
change on this rank are not touched (their tensors, and graphs captured over them, stay valid):

* :func:`reslice_attention` (the drain switch, at an empty pool): for every layer whose heads change, a new
  :class:`~.heads.FairKVAttention` over the new heads replaces the old one, its q/k/v rows and o_proj columns
  read from the checkpoint's safetensors (only those tensors, through the start-up loaders), its q/k norms
  copied (one weight shared by every head). Parameters keep the old ones' device and dtype.
* :func:`exchange_attention` (the migrate switch, every rank of the group at once): no checkpoint read; the
  slices of a head a rank gains come by P2P from the lowest rank that holds it, the rest are its own; a layer
  whose head count is unchanged is rewritten in place (tensor addresses kept, as SGLang's EPLB moves experts).
"""

from __future__ import annotations

import glob
import os
import re

import torch

from .heads import FairKVAttention, _head_rows

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
    fresh = {l: _rebuilt(layers[l].self_attn, rank_plan.local_heads[l], rank_plan.rank) for l in changed}
    loaded = _load_slices(fresh, model_path)
    missing = [l for l in changed if (l, "weight") not in loaded]
    if missing:
        raise RuntimeError(f"fairkv: no q/k/v/o weights of layers {missing} in {model_path}")
    for l, attn in fresh.items():
        layers[l].self_attn = attn
    if hasattr(model.model, "rank_plan"):  # the Llama family's model keeps the plan it was built with
        model.model.rank_plan = rank_plan
    return changed


def _rebuilt(old: FairKVAttention, heads: list[int], rank: int) -> FairKVAttention:
    """A new attention over ``heads`` like ``old`` (its device, dtype and build arguments), the weights that
    are not sliced per head copied (q/k norms, the o_proj bias); the sliced ones left for the caller."""
    ref = old.qkv_proj.weight
    with torch.device(ref.device):
        attn = FairKVAttention(heads=heads, rank=rank, **old.build_args)
    for mod in (attn.qkv_proj, attn.o_proj):
        mod.to(dtype=ref.dtype)
    if attn.q_norm is not None:
        attn.q_norm.load_state_dict(old.q_norm.state_dict())
        attn.k_norm.load_state_dict(old.k_norm.state_dict())
    if old.o_proj.bias is not None:
        attn.o_proj.bias.data.copy_(old.o_proj.bias.data)
    return attn


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


# ---- a migrate switch: the slices a rank gains come from a rank that holds them (P2P), not from disk ----


def weight_sources(a, b) -> list[tuple[int, int, int, int]]:
    """``(layer, head, src, dst)`` for every head instance rank ``dst`` holds under plan ``b`` and not under
    ``a``; ``src`` the lowest rank holding the head under ``a`` (every head has one). Sorted; the same list
    on every rank (both plans are)."""
    out = []
    for l in range(b.num_layers):
        for h in range(b.num_kv_heads):
            in_a = sorted(r for r, _ in a.layers[l][h])
            for r in sorted({r for r, _ in b.layers[l][h]} - set(in_a)):
                out.append((l, h, in_a[0], r))
    return out


def _head_pieces(attn: FairKVAttention, i: int) -> list[torch.Tensor]:
    """Local head ``i``'s slices of ``attn``: q, k, v rows, o_proj columns, and the q/k/v bias rows."""
    G, D = attn.group, attn.head_dim
    s0, s1, _ = attn.qkv_proj.sizes
    w, o = attn.qkv_proj.weight, attn.o_proj.weight
    spans = [(i * G * D, (i + 1) * G * D), (s0 + i * D, s0 + (i + 1) * D), (s0 + s1 + i * D, s0 + s1 + (i + 1) * D)]
    out = [w[a:b] for a, b in spans] + [o[:, i * G * D:(i + 1) * G * D]]
    if attn.qkv_proj.bias is not None:
        out += [attn.qkv_proj.bias[a:b] for a, b in spans]
    return out


def _piece_shapes(attn: FairKVAttention) -> list[tuple[int, ...]]:
    G, D, hid = attn.group, attn.head_dim, attn.hidden_size
    shapes = [(G * D, hid), (D, hid), (D, hid), (hid, G * D)]
    if attn.qkv_proj.bias is not None:
        shapes += [(G * D,), (D,), (D,)]
    return shapes


def exchange_attention(model, a, b, rank_plan_b, exchange) -> tuple[list[int], int]:
    """Re-slice this rank's attention from plan ``a`` to plan ``b`` (``rank_plan_b``: this rank's under
    ``b``) without reading the checkpoint: slices of heads it keeps are its own, those it gains arrive from
    the lowest rank that holds them under ``a`` (:func:`weight_sources`), one P2P exchange of raw bytes for
    every layer (``exchange(sends, recv_numel)`` over uint8 buffers, on every rank of the group at once).
    A layer whose head count here is unchanged is rewritten in place (its tensors, and graphs captured over
    them, stay valid); one whose count changes gets a new module. Returns the layers changed here and the
    bytes received."""
    layers = decoder_layers(model)
    me = rank_plan_b.rank
    sources = weight_sources(a, b)
    sends: dict[int, list[torch.Tensor]] = {}
    recv: dict[int, list[tuple[int, int]]] = {}
    for l, h, src, dst in sources:
        if src == me:
            old = layers[l].self_attn
            pieces = _head_pieces(old, old.heads.index(h))
            sends.setdefault(dst, []).extend(p.reshape(-1).view(torch.uint8) for p in pieces)
        if dst == me:
            recv.setdefault(src, []).append((l, h))
    ref = layers[0].self_attn
    esize = ref.qkv_proj.weight.element_size()
    per_head = sum(int(torch.Size(s).numel()) for s in _piece_shapes(ref)) * esize
    got = exchange({q: torch.cat(v) for q, v in sends.items()}, {p: len(v) * per_head for p, v in recv.items()})
    received: dict[tuple[int, int], list[torch.Tensor]] = {}
    for p, lh in recv.items():
        off = 0
        for key in lh:
            attn = layers[key[0]].self_attn
            parts = []
            for shape in _piece_shapes(attn):
                n = int(torch.Size(shape).numel()) * esize
                parts.append(got[p][off:off + n].view(attn.qkv_proj.weight.dtype).view(shape))
                off += n
            received[key] = parts
    changed = []
    for l, layer in enumerate(layers):
        old = layer.self_attn
        heads = list(rank_plan_b.local_heads[l])
        if list(old.heads) == heads:
            continue
        pieces = [received[(l, h)] if (l, h) in received else [t.clone() for t in _head_pieces(old, old.heads.index(h))]
                  for h in heads]
        if len(heads) == len(old.heads):
            attn = old
            attn.heads = heads
            attn.qkv_proj.q_rows = _head_rows(heads, attn.group * attn.head_dim)
            attn.qkv_proj.kv_rows = _head_rows(heads, attn.head_dim)
            attn.o_proj.cols = _head_rows(heads, attn.group * attn.head_dim)
        else:
            attn = _rebuilt(old, heads, me)
        with torch.no_grad():
            for i, parts in enumerate(pieces):
                for dst, src in zip(_head_pieces(attn, i), parts):
                    dst.copy_(src)
        layer.self_attn = attn
        changed.append(l)
    if hasattr(model.model, "rank_plan"):
        model.model.rank_plan = rank_plan_b
    return changed, int(sum(v.numel() for v in got.values()))
