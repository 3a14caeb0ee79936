"""What the ``fairkv`` attention backend does not implement, read from a model's config (pure).

The backend computes plain causal softmax attention over each head's kept tokens: no logit
soft-capping (``tanh(x / cap) * cap`` before the softmax, Gemma 2) and no sliding window (a layer that
attends only the last ``W`` tokens, Gemma 2/3 and other interleaved-window models). A model that needs
either would be served silently wrong, so such a model is refused at start-up. (SGLang 0.5.23's own
Llama / Mistral / Qwen2 classes pass neither to attention, so ``sliding_window`` in a Mistral or Qwen2
config is full attention in stock SGLang too and is not refused.)
"""

from __future__ import annotations


def unsupported_features(config: dict) -> list[str]:
    """Why the fairkv backend cannot serve a model with this ``config.json`` (empty: it can)."""
    out = []
    for cfg in (config, config.get("text_config") or {}):
        if cfg.get("attn_logit_softcapping"):
            out.append(f"attention logit soft-capping (attn_logit_softcapping={cfg['attn_logit_softcapping']})")
        types = cfg.get("layer_types") or []
        if any("sliding" in str(t) for t in types) or cfg.get("sliding_window_pattern"):
            out.append(f"sliding-window attention layers (sliding_window={cfg.get('sliding_window')})")
    return sorted(set(out))


def layer_problem(layer) -> str | None:
    """Why a RadixAttention ``layer`` SGLang built asks for what the backend does not do, or None."""
    cap = getattr(layer, "logit_cap", 0) or 0
    window = getattr(layer, "sliding_window_size", -1)
    if cap > 0:
        return f"layer {layer.layer_id} uses attention logit soft-capping ({cap})"
    if window is not None and window > -1:
        return f"layer {layer.layer_id} uses sliding-window attention ({window} tokens)"
    return None
