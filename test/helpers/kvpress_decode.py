"""Run by the kvpress venv's python: greedy tokens with kvpress 0.5.5 ``DecodingPress`` (decode-time
compression), alone or inside ``PrefillDecodingPress``, as a server that frees pages must do it.

    .venv-kvpress/bin/python test/helpers/kvpress_decode.py MODEL JOBS OUT

``JOBS``: JSON list of ``{"ids": [...], "n_new": N, "prefill": null | {"method": "snapkv"|"adakv", "ratio":
R}, "decodes": [{"method": "snapkv"|"adakv", "interval": K, "target": T, "window": W} | null, ...]}``: the
prompt is prefilled once (with the prefill press), then decoded once per entry of ``decodes`` from a copy
of that cache (null: the prefill press alone, or no press). Writes, per job, the list of output id lists;
with ``"trace": true`` each entry is ``{"tokens": [...], "kept": [layer][compression] -> rows per head}``.

kvpress's ``DecodingPress(base_press, compression_interval=K, target_size=T)`` is used as it is -- its
hook buffers each layer's decode hidden states and every ``K`` decode steps (after that step's attention)
calls ``compress`` with them -- and so is the scorer's arithmetic (SnapKV's window attention, mean over
the window, ``avg_pool1d``, mean over the GQA group, the window's rows above everything; AdaKV's floor of
``int(T * alpha)`` per head and the layer-wide top-k). Three points are changed, because kvpress's
behaviour there cannot be a server's that gives pages back (docs/DESIGN.md, decode-time compression):

1. **Eviction.** kvpress's AdaKV only masks (``masked_key_indices``) and re-scores the masked rows at the
   next interval (an evicted token can return); here rows not kept are gone: each compression scores a
   head's *live* rows only (after a prefill AdaKV, the rows its mask left), and AdaKV keeps ``KV x T`` of
   the layer's live rows. The cache stays rectangular for HF: each head's live rows sit at the end of the
   layer's tensor, the padding in front masked with kvpress's own fake-key attention patch.
2. **Each window query at its own position.** kvpress rotates the buffered hidden states' queries with
   the current step's RoPE (``position_embeddings`` of a one-token forward); here each buffered step keeps
   its own ``(cos, sin)`` (the queries the model computed at that step).
3. **Kept rows in position order.** kvpress's ``ScorerPress`` gathers in top-k order, which changes the
   next interval's pooling neighbours; here the kept rows stay in position order -- at decode time and
   after a prefill ``SnapKVPress`` (:class:`PositionOrderSnapKVPress`; a prefill AdaKV masks in place).

The prompt is prefilled with the prefill press (kvpress's own, unchanged), the first token is the argmax
of the last prompt position, then ``N - 1`` greedy decode steps at positions ``S, S + 1, ...``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kvpress import AdaKVPress, DecodingPress, PrefillDecodingPress, SnapKVPress
from kvpress.utils import compute_n_kept, get_prerope_query_states
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import rotate_half


@dataclass
class EvictingDecodingPress(DecodingPress):
    """``DecodingPress`` with the three changes of the module docstring (``base_press``: ``SnapKVPress`` or
    ``AdaKVPress(SnapKVPress)``)."""

    trace: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        self.cos_sin: dict[int, list] = {}

    def reset(self):
        super().reset()
        self.cos_sin = {}

    def forward_hook(self, module, input, kwargs, output):
        hs = kwargs["hidden_states"]
        layer = module.layer_idx
        if hs.shape[1] == 1:  # a decode step: this step's own RoPE, beside the hidden state kvpress buffers
            cos, sin = kwargs["position_embeddings"]
            self.cos_sin.setdefault(layer, []).append((cos.clone(), sin.clone()))
            self.cos_sin[layer] = self.cos_sin[layer][-self.compression_interval:]
        return super().forward_hook(module, input, kwargs, output)

    @property
    def _scorer(self) -> SnapKVPress:
        return self.base_press.press if isinstance(self.base_press, AdaKVPress) else self.base_press

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        layer = module.layer_idx
        sn = self._scorer
        w, kernel = sn.window_size, sn.kernel_size
        _, kv, s, d = keys.shape
        group = module.config.num_attention_heads // kv
        live = torch.ones(kv, s, dtype=torch.bool)
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:  # padding of an earlier compression, or a prefill AdaKV's mask
            live[masked[1], masked[2]] = False
        # change 2: the last W buffered steps' queries, each rotated with its own step's (cos, sin)
        q = get_prerope_query_states(module, hidden_states[:, -w:])[0]  # [Hq, W, D]
        cos = torch.cat([c for c, _ in self.cos_sin[layer][-w:]], dim=1)[0]  # [W, D]
        sin = torch.cat([x for _, x in self.cos_sin[layer][-w:]], dim=1)[0]
        q = q * cos + rotate_half(q) * sin
        rows = [torch.nonzero(live[h]).flatten() for h in range(kv)]  # each head's live rows, in order
        scores = []
        for h in range(kv):
            k = keys[0, h, rows[h]]  # [n, D]
            n = k.shape[0]
            logits = q[h * group:(h + 1) * group] @ k.T / math.sqrt(d)  # [G, W, n]
            logits = logits + torch.triu(torch.full((w, n), float("-inf")), diagonal=n - w + 1)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)[..., :n - w]
            sc = F.avg_pool1d(probs.mean(dim=-2), kernel_size=kernel, padding=kernel // 2, stride=1).mean(0)
            scores.append(sc)
        top = max(float(sc.max()) for sc in scores if sc.numel()) + 1
        scores = [torch.cat([sc, torch.full((w,), top)]) for sc in scores]
        T = self.target_size
        if isinstance(self.base_press, AdaKVPress):
            kept = adakv_keep(scores, T, self.base_press.alpha_safeguard)
        else:
            kept = [sc.topk(min(T, sc.numel())).indices for sc in scores]
        kept = [rows[h][kept[h].sort().values] for h in range(kv)]  # change 3: position order
        if self.trace is not None:
            self.trace.setdefault(layer, []).append([int(k.numel()) for k in kept])
        # change 1: a rectangular cache of the live rows only, each head's at the end, padding masked
        m = max(k.numel() for k in kept)
        new_k = keys.new_zeros(1, kv, m, d)
        new_v = values.new_zeros(1, kv, m, values.shape[-1])
        pad_h, pad_s = [], []
        for h, k in enumerate(kept):
            new_k[0, h, m - k.numel():] = keys[0, h, k]
            new_v[0, h, m - k.numel():] = values[0, h, k]
            pad_h += [h] * (m - k.numel())
            pad_s += list(range(m - k.numel()))
        module.masked_key_indices = ((torch.zeros(len(pad_h), dtype=torch.long), torch.tensor(pad_h, dtype=torch.long),
                                      torch.tensor(pad_s, dtype=torch.long)) if pad_h else None)
        return new_k, new_v


def adakv_keep(scores: list[torch.Tensor], T: int, alpha: float) -> list[torch.Tensor]:
    """AdaKV over heads of unequal live rows (kvpress ``AdaKVPress.compress``'s floor and global top-k): a
    layer with more than ``KV x T`` live rows keeps that many, each head first its top
    ``min(int(T alpha), n)``; otherwise everything."""
    kv = len(scores)
    if sum(sc.numel() for sc in scores) <= kv * T:
        return [torch.arange(sc.numel()) for sc in scores]
    n_safe = int(T * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe)
    sc = [x.clone() for x in scores]
    for x in sc:
        x[x.topk(min(n_safe, x.numel())).indices] = torch.finfo(x.dtype).max
    flat = torch.cat(sc)
    owner = torch.cat([torch.full((x.numel(),), h) for h, x in enumerate(sc)])
    offset = torch.cumsum(torch.tensor([0] + [x.numel() for x in sc]), 0)
    keep = flat.topk(kv * T).indices
    return [keep[owner[keep] == h] - offset[h] for h in range(kv)]


def decoding_press(dec: dict | None, trace: dict | None) -> EvictingDecodingPress | None:
    if dec is None:
        return None
    snap = SnapKVPress(window_size=int(dec["window"]))
    base = AdaKVPress(snap) if dec["method"] == "adakv" else snap
    return EvictingDecodingPress(base_press=base, compression_interval=int(dec["interval"]),
                                 target_size=int(dec["target"]), trace=trace)


@dataclass
class PositionOrderSnapKVPress(SnapKVPress):
    """kvpress's ``SnapKVPress`` at prefill with change 3: the kept rows gathered in position order (kvpress's
    ``ScorerPress.compress`` gathers in top-k order; attention does not care, the next decode-time scoring's
    pooling does)."""

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        idx = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        idx = idx.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
        return keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous()


def prefill_press(pre: dict | None):
    if pre is None:
        return None
    if pre["method"] == "adakv":  # masks in place: rows stay in position order
        return AdaKVPress(SnapKVPress(compression_ratio=float(pre["ratio"])))
    return PositionOrderSnapKVPress(compression_ratio=float(pre["ratio"]))


def generate(model, ids: list[int], n_new: int, prefill: dict | None, decodes: list[dict | None],
             trace: bool = False) -> list:
    """The prompt prefilled once with the prefill press (kvpress's own), then each decoding press of
    ``decodes`` (None: none) from its own copy of that cache -- as ``PrefillDecodingPress(prefill, decoding)``
    does, whose prefill half does not depend on the decoding press."""
    pre = prefill_press(prefill)
    cache = DynamicCache()
    attn = [layer.self_attn for layer in model.model.layers]
    with torch.no_grad():
        with (pre(model) if pre is not None else _null()):
            out = model(input_ids=torch.tensor([ids]), past_key_values=cache)
        first = int(out.logits[0, -1].argmax())
        masks = [getattr(m, "masked_key_indices", None) for m in attn]
        results = []
        for dec in decodes:
            for m, mask in zip(attn, masks):  # the prefill's masks (a decoding press replaces them)
                m.masked_key_indices = mask
            kept = {} if trace else None
            press = decoding_press(dec, kept)
            c = copy.deepcopy(cache)  # kvpress's attention patch writes fake keys into the cache in place
            gen = [first]
            with (press(model) if press is not None else _null()):
                for i in range(n_new - 1):
                    out = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=c,
                                position_ids=torch.tensor([[len(ids) + i]]))
                    gen.append(int(out.logits[0, -1].argmax()))
            results.append({"tokens": gen, "kept": [kept[l] for l in sorted(kept)]} if trace else gen)
    for m in attn:  # the next prompt starts without this one's masks
        m.masked_key_indices = None
    return results


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main():
    model_path, jobs_path, out_path = sys.argv[1:4]
    jobs = json.load(open(jobs_path))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    json.dump([generate(model, j["ids"], int(j["n_new"]), j.get("prefill"), j["decodes"], bool(j.get("trace")))
               for j in jobs], open(out_path, "w"))


if __name__ == "__main__":
    main()
