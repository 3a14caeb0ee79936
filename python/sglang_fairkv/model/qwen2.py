"""Qwen2 served under a FairKV plan: SGLang's ``Qwen2Model`` with our decoder layer type.

As for Llama (``model/llama.py``): each layer's attention covers the KV heads the plan gives this rank
(q/k/v with bias, o_proj without, as Qwen2 has them); MLP, norms, embeddings, LM head and the layer
boundaries are SGLang's.
"""

from __future__ import annotations

from torch import nn

from sglang.srt.models import qwen2 as _qwen2

from .heads import (AttentionFlavor, build_decoder_layer, checkpoint_heads, dense_mlp, init_causal_lm, qwen_rope,
                    rank_layer_type)
from .plan_source import rank_plan as current_rank_plan


class FairKVQwen2DecoderLayer(_qwen2.Qwen2DecoderLayer):
    """``Qwen2DecoderLayer`` with the plan's heads. ``Qwen2Model(decoder_layer_type=...)`` builds it with
    SGLang's arguments, so the rank's plan comes as a class attribute (:func:`rank_layer_type`)."""

    rank_plan = None

    def __init__(self, config, layer_id: int = 0, start_layer: int = 0, quant_config=None, prefix: str = "",
                 alt_stream=None):
        nn.Module.__init__(self)
        self.start_layer = start_layer
        _, _, head_dim = checkpoint_heads(config)
        build_decoder_layer(self, config, layer_id, rank_plan=self.rank_plan,
                            rotary_emb=qwen_rope(config, head_dim, 32768),
                            flavor=AttentionFlavor(qkv_bias=True, o_bias=False),
                            mlp=dense_mlp(_qwen2.Qwen2MLP, config, quant_config, prefix), prefix=prefix)


class Qwen2ForCausalLM(_qwen2.Qwen2ForCausalLM):
    """Registered under SGLang's ``Qwen2ForCausalLM`` when ``--fairkv-plan`` is in effect."""

    fairkv = True

    def __init__(self, config, quant_config=None, prefix: str = ""):
        layer_type = rank_layer_type(FairKVQwen2DecoderLayer, current_rank_plan(config))
        init_causal_lm(self, config, quant_config, prefix, tie=True, build_model=lambda p: _qwen2.Qwen2Model(
            config, quant_config=None, prefix=p, decoder_layer_type=layer_type))


EntryClass = [Qwen2ForCausalLM]
