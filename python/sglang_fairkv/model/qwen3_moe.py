"""Qwen3-MoE served under a FairKV plan: SGLang's ``Qwen3MoeModel`` with our decoder layer type.

The attention is Qwen3's (:func:`~.qwen3.qwen3_flavor`: q/k norm), sliced by the plan; every layer's
feed-forward is SGLang's ``Qwen3MoeSparseMoeBlock`` under its own MoE TP / EP split (``--tp-size``,
``--ep-size``), untouched: a plan moves attention heads only, the experts and their router stay where
SGLang puts them. Weight loading (stacked q/k/v, the expert mapping) is SGLang's.
"""

from __future__ import annotations

from torch import nn

from sglang.srt.models import qwen3_moe as _qwen3_moe
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import LazyValue, add_prefix

from .heads import build_decoder_layer, checkpoint_heads, init_causal_lm, qwen_rope, rank_layer_type
from .plan_source import rank_plan as current_rank_plan
from .qwen3 import qwen3_flavor


class FairKVQwen3MoeDecoderLayer(_qwen3_moe.Qwen3MoeDecoderLayer):
    """``Qwen3MoeDecoderLayer`` with the plan's heads and SGLang's sparse MoE block (forward and stage
    facts inherited: every layer sparse)."""

    rank_plan = None

    def __init__(self, config, layer_id: int, start_layer: int = 0, quant_config=None, prefix: str = "",
                 alt_stream=None):
        nn.Module.__init__(self)
        self.config = config
        self.layer_id = layer_id
        _, ffn = self.stage_facts(config, layer_id)
        self.is_layer_sparse = ffn.sparse
        mlp = _qwen3_moe.Qwen3MoeSparseMoeBlock(layer_id=layer_id, config=config, quant_config=None,
                                                prefix=add_prefix("mlp", prefix))
        _, _, head_dim = checkpoint_heads(config)
        build_decoder_layer(self, config, layer_id, rank_plan=self.rank_plan,
                            rotary_emb=qwen_rope(config, head_dim, 8192), flavor=qwen3_flavor(config), mlp=mlp,
                            prefix=prefix)


class Qwen3MoeForCausalLM(_qwen3_moe.Qwen3MoeForCausalLM):
    """Registered under SGLang's ``Qwen3MoeForCausalLM`` when a FairKV plan is in effect."""

    fairkv = True

    def __init__(self, config, quant_config=None, prefix: str = ""):
        layer_type = rank_layer_type(FairKVQwen3MoeDecoderLayer, current_rank_plan(config))
        init_causal_lm(self, config, quant_config, prefix, tie=False,  # SGLang's class never ties them
                       build_model=lambda p: _qwen3_moe.Qwen3MoeModel(config, None, prefix=p,
                                                                      decoder_layer_type=layer_type))
        # EPLB's view of the routed experts, as SGLang's class sets it up
        self.routed_experts_weights_of_layer = LazyValue(lambda: {
            i: self.model.layers[i].mlp.get_moe_weights() for i in range(self.start_layer, self.end_layer)})
        self.attn_cp_size = get_parallel().attn_cp_size
        self.moe_dp_size = get_parallel().moe_dp_size


EntryClass = [Qwen3MoeForCausalLM]
