"""Run by the kvpress venv's python: greedy tokens with kvpress 0.5.5 ``DecodingPress`` (decode-time
compression), alone or inside ``PrefillDecodingPress``, as a server that frees pages must do it.

    .venv-kvpress/bin/python test/helpers/kvpress_decode.py MODEL JOBS OUT

``JOBS``: JSON list of ``{"ids": [...], "n_new": N, "decode": {"method": "snapkv"|"adakv", "interval": K,
"target": T, "window": W}, "prefill": null | {"method": "snapkv"|"adakv", "ratio": R}}``; ``"decode":
null`` runs the prefill press alone (or nothing). Writes a JSON list of output id lists; with ``"trace":
true`` a job's entry is ``{"tokens": [...], "kept": [[layer][head] -> rows kept after each compression]}``.

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
   next interval's pooling neighbours; here the kept rows stay in position order.

The prompt is prefilled with the prefill press (kvpress's own, unchanged), the first token is the argmax
of the last prompt position, then ``N - 1`` greedy decode steps at positions ``S, S + 1, ...``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kvpress import AdaKVPress, DecodingPress, PrefillDecodingPress, SnapKVPress
from kvpress.utils import get_prerope_query_states
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


def make_press(job: dict, trace: dict | None):
    dec, pre = job.get("decode"), job.get("prefill")
    decoding = None
    if dec is not None:
        snap = SnapKVPress(window_size=int(dec["window"]))
        base = AdaKVPress(snap) if dec["method"] == "adakv" else snap
        decoding = EvictingDecodingPress(base_press=base, compression_interval=int(dec["interval"]),
                                         target_size=int(dec["target"]), trace=trace)
    prefilling = None
    if pre is not None:
        snap = SnapKVPress(compression_ratio=float(pre["ratio"]))
        prefilling = AdaKVPress(snap) if pre["method"] == "adakv" else snap
    if decoding is not None and prefilling is not None:
        return PrefillDecodingPress(prefilling_press=prefilling, decoding_press=decoding)
    return decoding or prefilling


def generate(model, job: dict):
    ids, n_new = job["ids"], int(job["n_new"])
    trace = {} if job.get("trace") else None
    press = make_press(job, trace)
    cache = DynamicCache()
    with torch.no_grad():
        ctx = press(model) if press is not None else _null()
        with ctx:
            out = model(input_ids=torch.tensor([ids]), past_key_values=cache)
            gen = [int(out.logits[0, -1].argmax())]
            for i in range(n_new - 1):
                out = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=cache,
                            position_ids=torch.tensor([[len(ids) + i]]))
                gen.append(int(out.logits[0, -1].argmax()))
    for layer in model.model.layers:  # the next job starts without this one's mask
        layer.self_attn.masked_key_indices = None
    if trace is None:
        return gen
    return {"tokens": gen, "kept": [trace[l] for l in sorted(trace)]}


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
    json.dump([generate(model, j) for j in jobs], open(out_path, "w"))


if __name__ == "__main__":
    main()
