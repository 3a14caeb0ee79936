"""Run by the kvpress venv's python (transformers < 5.3): kvpress's own kept sets, same JSON schema
as ``python -m sglang_fairkv.kvdump``.

    .venv-kvpress/bin/python test/helpers/kvpress_oracle.py MODEL METHOD RATIO WINDOW KERNEL ALPHA IDS OUT

SnapKV / PyramidKV physically gather the kept keys: positions are recovered by matching the kept key
rows against the layer's keys (exact copies). AdaKV only masks: positions are the complement of
``module.masked_key_indices`` that kvpress sets.
"""

import json
import sys

import torch
from kvpress import AdaKVPress, PyramidKVPress, SnapKVPress
from transformers import AutoModelForCausalLM


def main():
    model_path, method, ratio, window, kernel, alpha, ids_path, out_path = sys.argv[1:9]
    ratio, window, kernel, alpha = float(ratio), int(window), int(kernel), float(alpha)
    ids = json.load(open(ids_path))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    if method == "snapkv":
        press = SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    elif method == "pyramidkv":
        press = PyramidKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    elif method == "adakv":
        press = AdaKVPress(SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel),
                           alpha_safeguard=alpha)
    else:
        raise SystemExit(f"unknown method {method}")
    kept = {}
    original = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        new_k, new_v = original(module, hidden_states, keys, values, attentions, kwargs)
        H, S = keys.shape[1], keys.shape[2]
        if method == "adakv":
            _, heads, seqs = module.masked_key_indices
            keep = torch.ones(H, S, dtype=torch.bool)
            keep[heads, seqs] = False
            kept[module.layer_idx] = [torch.nonzero(keep[h]).flatten().tolist() for h in range(H)]
        else:
            rows = []
            for h in range(H):
                pos = {keys[0, h, i].numpy().tobytes(): i for i in range(S)}
                rows.append(sorted(pos[new_k[0, h, j].numpy().tobytes()] for j in range(new_k.shape[2])))
            kept[module.layer_idx] = rows
        return new_k, new_v

    press.compress = compress
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]))
    json.dump({"method": method, "seq_len": len(ids), "layers": [
        {"layer": l, "heads": [{"kv_head": h, "kept": k} for h, k in enumerate(kept[l])]}
        for l in sorted(kept)]}, open(out_path, "w"))


if __name__ == "__main__":
    main()
