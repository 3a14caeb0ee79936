"""Qwen2 served under a FairKV plan: SGLang's ``Qwen2Model`` with our decoder layer type.

As for Llama (``model/llama.py``): each layer's attention covers the KV heads the plan gives this rank
(q/k/v with bias, o_proj without, as Qwen2 has them); MLP, norms, embeddings, LM head and the layer
boundaries are SGLang's.
"""

from __future__ import annotations

from torch import nn

from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.pooler import Pooler, PoolingType
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
from sglang.srt.models import qwen2 as _qwen2
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix
from sglang.srt.utils.hf_transformers_utils import get_rope_config

from ..serving.server_plan import server_rank_plan
from .heads import build_decoder_layer, check_supported, checkpoint_heads


class FairKVQwen2DecoderLayer(_qwen2.Qwen2DecoderLayer):
    """``Qwen2DecoderLayer`` with the plan's heads. ``Qwen2Model(decoder_layer_type=...)`` builds it with
    SGLang's arguments, so the rank's plan comes as a class attribute of a per-model subclass."""

    rank_plan = None

    def __init__(self, config, layer_id: int = 0, start_layer: int = 0, quant_config=None, prefix: str = "",
                 alt_stream=None):
        nn.Module.__init__(self)
        if getattr(config, "dual_chunk_attention_config", None):
            raise ValueError("FairKV plans do not support Qwen2 dual-chunk attention")
        self.start_layer = start_layer
        _, _, head_dim = checkpoint_heads(config)
        theta, scaling = get_rope_config(config)
        rotary = get_rope(head_dim, rotary_dim=head_dim,
                          max_position=getattr(config, "max_position_embeddings", 32768), base=theta,
                          rope_scaling=scaling)
        build_decoder_layer(self, config, layer_id, heads=self.rank_plan.local_heads[layer_id],
                            rank=self.rank_plan.rank, rotary_emb=rotary, qkv_bias=True, o_bias=False,
                            mlp_cls=_qwen2.Qwen2MLP, quant_config=quant_config, prefix=prefix)


class Qwen2ForCausalLM(_qwen2.Qwen2ForCausalLM):
    """Registered under SGLang's ``Qwen2ForCausalLM`` when ``--fairkv-plan`` is in effect."""

    fairkv = True

    def __init__(self, config, quant_config=None, prefix: str = ""):
        nn.Module.__init__(self)
        check_supported(quant_config)
        self.pp_group = get_parallel().pp_group
        self.config = config
        self.quant_config = None
        layer_type = type("FairKVQwen2DecoderLayerForRank", (FairKVQwen2DecoderLayer,),
                          {"rank_plan": server_rank_plan(config)})
        self.model = _qwen2.Qwen2Model(config, quant_config=None, prefix=add_prefix("model", prefix),
                                       decoder_layer_type=layer_type)
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          prefix=add_prefix("lm_head", prefix))
        self.logits_processor = LogitsProcessor(config)
        self.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=True)
        self.capture_aux_hidden_states = False


EntryClass = [Qwen2ForCausalLM]
