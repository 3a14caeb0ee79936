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


def model_problem(model, device_type: str) -> str | None:
    """Why SGLang's model class ``model`` would bypass the backend on ``device_type``, or None.

    Some of SGLang 0.5.23's classes (Qwen3-MoE, GPT-OSS, Bailing-MoE, ...) fuse RoPE with the K/V
    cache write on CUDA / ROCm (``sglang.srt.models.utils.enable_fused_set_kv_buffer``) and then call
    attention with ``save_kv_cache=False``: the write goes to a dense per-layer buffer the ragged pool
    does not have. Our FairKV classes never do (``fairkv`` attribute); Qwen3-MoE is served by ours at
    TP 1 too (``model.OWN_CLASS_AT_TP1``)."""
    import sys

    if getattr(model, "fairkv", False) or device_type not in ("cuda", "hip"):
        return None
    module = sys.modules.get(type(model).__module__)
    if module is not None and hasattr(module, "enable_fused_set_kv_buffer"):
        return (f"SGLang's {type(model).__name__} writes K/V into a dense cache itself on {device_type} "
                "(RoPE fused with the cache write), which the fairkv ragged pool does not have")
    return None
