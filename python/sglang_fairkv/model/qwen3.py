"""Qwen3 (dense) served under a FairKV plan: SGLang's ``Qwen3Model`` with our decoder layer type.

Qwen3's attention is Qwen2's GQA without biases (``attention_bias``, false in the released
checkpoints) plus a per-head RMSNorm on q and k before RoPE (:class:`~.heads.AttentionFlavor`
``qk_norm``: one ``head_dim`` weight shared by every head, so a rank loads it whole whatever heads it
holds). MLP, norms, embeddings, LM head, the layer boundaries and the weight loading are SGLang's.
"""

from __future__ import annotations

from torch import nn

from sglang.srt.models import qwen2 as _qwen2
from sglang.srt.models import qwen3 as _qwen3

from .heads import (AttentionFlavor, build_decoder_layer, checkpoint_heads, dense_mlp, init_causal_lm, qwen_rope,
                    rank_layer_type)
from .plan_source import rank_plan as current_rank_plan


def qwen3_flavor(config) -> AttentionFlavor:
    """Qwen3 and Qwen3-MoE: ``attention_bias`` on q/k/v and o alike, q/k norm."""
    bias = bool(getattr(config, "attention_bias", False))
    return AttentionFlavor(qkv_bias=bias, o_bias=bias, qk_norm=True)


class FairKVQwen3DecoderLayer(_qwen3.Qwen3DecoderLayer):
    """``Qwen3DecoderLayer`` with the plan's heads (forward and stage facts inherited); the rank's plan
    is a class attribute (:func:`~.heads.rank_layer_type`)."""

    rank_plan = None

    def __init__(self, config, layer_id: int = 0, start_layer: int = 0, quant_config=None, prefix: str = "",
                 alt_stream=None):
        nn.Module.__init__(self)
        _, _, head_dim = checkpoint_heads(config)
        build_decoder_layer(self, config, layer_id, rank_plan=self.rank_plan,
                            rotary_emb=qwen_rope(config, head_dim, 32768), flavor=qwen3_flavor(config),
                            mlp=dense_mlp(_qwen3.Qwen3MLP, config, quant_config, prefix), prefix=prefix)


class FairKVQwen3Model(_qwen3.Qwen3Model):
    """``Qwen3Model`` (its forward) built by ``Qwen2Model.__init__`` with this rank's layer type."""

    def __init__(self, config, rank_plan, prefix: str = ""):
        _qwen2.Qwen2Model.__init__(self, config, quant_config=None, prefix=prefix,
                                   decoder_layer_type=rank_layer_type(FairKVQwen3DecoderLayer, rank_plan))


class Qwen3ForCausalLM(_qwen3.Qwen3ForCausalLM):
    """Registered under SGLang's ``Qwen3ForCausalLM`` when a FairKV plan is in effect."""

    fairkv = True

    def __init__(self, config, quant_config=None, prefix: str = ""):
        rank_plan = current_rank_plan(config)
        init_causal_lm(self, config, quant_config, prefix, tie=True,
                       build_model=lambda p: FairKVQwen3Model(config, rank_plan, prefix=p))


EntryClass = [Qwen3ForCausalLM]
