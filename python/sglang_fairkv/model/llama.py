"""Llama-family (SmolLM2, LLaMA-3.x) and Mistral served under a FairKV plan.

SGLang's own classes with one change: each decoder layer's attention is
:class:`~sglang_fairkv.model.heads.FairKVAttention` over the KV heads the plan gives this rank in that
layer (replicas included), instead of the contiguous ``num_kv_heads / tp`` split -- so head counts
that stock TP refuses (SmolLM2's 3 KV heads at TP = 2) work, and every layer can differ. The MLP,
norms, embeddings, LM head and the layer boundaries (which add the attention's partial sums over the
TP group) are SGLang's.
"""

from __future__ import annotations

from torch import nn

from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.models import llama as _llama
from sglang.srt.models import mistral as _mistral
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix, make_pp_layers

from .heads import AttentionFlavor, build_decoder_layer, check_supported, checkpoint_heads, dense_mlp
from .plan_source import rank_plan as current_rank_plan


def _rope_args(config) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) read as SGLang's ``LlamaDecoderLayer`` reads them."""
    params = getattr(config, "rope_parameters", None)
    if params is not None:
        theta, scaling = params.get("rope_theta", 10000), params
    else:
        theta, scaling = getattr(config, "rope_theta", 10000), getattr(config, "rope_scaling", None)
    if scaling is not None and getattr(config, "original_max_position_embeddings", None):
        scaling["original_max_position_embeddings"] = config.original_max_position_embeddings
    return theta, scaling


class FairKVLlamaDecoderLayer(_llama.LlamaDecoderLayer):
    """``LlamaDecoderLayer`` with the plan's heads; forward, stage facts and boundaries inherited."""

    def __init__(self, config, layer_id: int, rank_plan, quant_config=None, prefix: str = ""):
        nn.Module.__init__(self)
        _, _, head_dim = checkpoint_heads(config)
        theta, scaling = _rope_args(config)
        rotary = get_rope(head_dim, rotary_dim=int(getattr(config, "partial_rotary_factor", 1) * head_dim),
                          max_position=getattr(config, "max_position_embeddings", 8192), base=theta,
                          rope_scaling=scaling, is_neox_style=getattr(config, "rope_is_neox_style", True))
        bias = bool(getattr(config, "attention_bias", False) or getattr(config, "bias", False))
        build_decoder_layer(self, config, layer_id, rank_plan=rank_plan, rotary_emb=rotary,
                            flavor=AttentionFlavor(qkv_bias=bias, o_bias=bias),
                            mlp=dense_mlp(_llama.LlamaMLP, config, quant_config, prefix), prefix=prefix)


class FairKVLlamaModel(_llama.LlamaModel):
    """``LlamaModel`` whose layers take their heads from this rank's plan."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        nn.Module.__init__(self)
        self.config = config
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.pp_group = get_parallel().pp_group
        self._kv_cache_parallel_layout = _llama.resolve_linear_parallel_group("tp")
        self.rank_plan = current_rank_plan(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=quant_config,
                                                   prefix=add_prefix("embed_tokens", prefix))
        self.layers, self.start_layer, self.end_layer = make_pp_layers(
            config.num_hidden_layers,
            lambda idx, prefix: FairKVLlamaDecoderLayer(config, idx, self.rank_plan, quant_config=quant_config,
                                                        prefix=prefix),
            prefix="model.layers",
            stage_facts=lambda idx: FairKVLlamaDecoderLayer.stage_facts(config, idx),
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers_to_capture = []


class _FairKVLlamaFamily:
    """``_init_model`` of SGLang's Llama-family causal LMs, with the plan's layers."""

    fairkv = True

    def _init_model(self, config, quant_config=None, prefix: str = ""):
        check_supported(quant_config)
        return FairKVLlamaModel(config, quant_config=None, prefix=prefix)


class LlamaForCausalLM(_FairKVLlamaFamily, _llama.LlamaForCausalLM):
    """Registered under SGLang's ``LlamaForCausalLM`` when ``--fairkv-plan`` is in effect."""


class MistralForCausalLM(_FairKVLlamaFamily, _mistral.MistralForCausalLM):
    """Mistral (same layers as Llama in SGLang) under a FairKV plan."""


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
