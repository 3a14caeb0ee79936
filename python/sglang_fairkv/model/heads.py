"""Attention whose heads are the ones a FairKV plan gives this TP rank in this layer.

A plan places, per layer, each KV head (with its ``G`` query heads) on one rank or, for a copied
head, on several (each replica serving the requests assigned to it). This rank computes attention
for its heads only; its o_proj takes the matching input columns and returns a **partial** sum, which
the decoder layer's boundary adds up over the TP group like the stock row-parallel o_proj's. Query
heads of segments this rank does not hold for a request come out of the backend as zeros, so a
copied head is counted exactly once.

Weights are plain parameters loaded by slicing the checkpoint's full q/k/v/o tensors (``weight_loader``
attributes, as SGLang's loader expects), never the stock contiguous TP split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _head_rows(heads: list[int], width: int) -> torch.Tensor:
    """Row indices of blocks ``heads`` of ``width`` rows each, in order: int64 ``[len(heads) * width]``."""
    if not heads:
        return torch.zeros(0, dtype=torch.int64)
    h = torch.as_tensor(heads, dtype=torch.int64)
    return (h[:, None] * width + torch.arange(width)).flatten()


class HeadSlicedQKV(nn.Module):
    """Fused q/k/v projection of KV heads ``heads``: output ``[T, (n*G + 2n) * D]`` laid out as
    q (the ``G`` query heads of each head in order), then k, then v."""

    def __init__(self, hidden: int, head_dim: int, group: int, heads: list[int], bias: bool):
        super().__init__()
        n = len(heads)
        self.q_rows = _head_rows(heads, group * head_dim)
        self.kv_rows = _head_rows(heads, head_dim)
        self.sizes = (n * group * head_dim, n * head_dim, n * head_dim)
        out = sum(self.sizes)
        self.weight = nn.Parameter(torch.empty(out, hidden), requires_grad=False)
        self.weight.weight_loader = self.load
        if bias:
            self.bias = nn.Parameter(torch.zeros(out), requires_grad=False)
            self.bias.weight_loader = self.load
        else:
            self.bias = None

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        """``loaded``: the checkpoint's whole ``q_proj`` / ``k_proj`` / ``v_proj`` weight or bias."""
        rows = self.q_rows if shard_id == "q" else self.kv_rows
        offset = {"q": 0, "k": self.sizes[0], "v": self.sizes[0] + self.sizes[1]}[shard_id]
        part = loaded.index_select(0, rows.to(loaded.device))
        param.data[offset:offset + part.shape[0]].copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class HeadSlicedO(nn.Module):
    """o_proj restricted to the input columns of this rank's query heads: ``[T, n*G*D] -> [T, hidden]``
    partial sums. A bias is added on TP rank 0 only (the TP sum adds it once)."""

    def __init__(self, hidden: int, head_dim: int, group: int, heads: list[int], bias: bool, rank: int):
        super().__init__()
        self.cols = _head_rows(heads, group * head_dim)
        self.weight = nn.Parameter(torch.empty(hidden, self.cols.numel()), requires_grad=False)
        self.weight.weight_loader = self.load
        self.add_bias = bias and rank == 0
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden), requires_grad=False)
            self.bias.weight_loader = self.load
        else:
            self.bias = None

    def load(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # bias: whole
            param.data.copy_(loaded)
        else:
            param.data.copy_(loaded.index_select(1, self.cols.to(loaded.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if self.add_bias else None)


@dataclass(frozen=True)
class AttentionFlavor:
    """How a family's attention differs from plain GQA, which is all a family file states about it.

    ``qkv_bias`` / ``o_bias``: biases of the q/k/v and o projections (Qwen2: q/k/v only; Llama and
    Qwen3: ``attention_bias`` on both). ``qk_norm``: Qwen3's RMSNorm over each head's ``head_dim``
    on q and on k, before RoPE, one weight shared by every head (so nothing of it is sliced)."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False


class FairKVAttention(nn.Module):
    """Self-attention over the KV heads ``heads`` (global ids, sorted) of one layer on this rank."""

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 layer_id: int, heads: list[int], rank: int, rotary_emb: nn.Module, flavor: AttentionFlavor,
                 rms_norm_eps: float = 1e-6, prefix: str = ""):
        super().__init__()
        from sglang.srt.layers.layernorm import RMSNorm
        from sglang.srt.layers.radix_attention import RadixAttention

        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.group = num_heads // num_kv_heads
        self.heads = list(heads)
        self.layer_id = layer_id
        # what a rebuild over other heads needs (a plan switch: :mod:`~sglang_fairkv.model.reslice`)
        self.build_args = dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, layer_id=layer_id, rotary_emb=rotary_emb, flavor=flavor,
                               rms_norm_eps=rms_norm_eps, prefix=prefix)
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        n = len(self.heads)
        self.qkv_proj = HeadSlicedQKV(hidden_size, head_dim, self.group, self.heads, flavor.qkv_bias)
        self.o_proj = HeadSlicedO(hidden_size, head_dim, self.group, self.heads, flavor.o_bias, rank)
        if flavor.qk_norm:  # the checkpoint's q_norm / k_norm, loaded whole
            self.q_norm = RMSNorm(head_dim, eps=rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(n * self.group, head_dim, head_dim ** -0.5, num_kv_heads=n,
                                   layer_id=layer_id, prefix=f"{prefix}.attn") if n else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch) -> torch.Tensor:
        if self.attn is None:  # no head of this layer on this rank
            from sglang.srt.layers.radix_attention import get_attn_backend

            get_attn_backend().forward_empty_layer(self.layer_id, hidden_states.shape[0], self.head_dim,
                                        hidden_states.dtype, hidden_states.device)
            return self.o_proj(hidden_states.new_zeros(hidden_states.shape[0], 0))
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split(list(self.qkv_proj.sizes), dim=-1)
        if self.q_norm is not None:  # SGLang's own routine (fused in place on CUDA), as its Qwen3 class
            from sglang.srt.models.utils import apply_qk_norm

            q, k = apply_qk_norm(q=q, k=k, q_norm=self.q_norm, k_norm=self.k_norm, head_dim=self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, forward_batch))


def check_supported(quant_config) -> None:
    """What the FairKV model classes cannot serve yet: quantized checkpoints, pipeline parallelism."""
    from sglang.srt.runtime_context import get_parallel

    if quant_config is not None:
        raise ValueError("FairKV plans do not support quantized checkpoints yet")
    if get_parallel().pp_group.world_size != 1:
        raise ValueError("FairKV plans do not support pipeline parallelism")


def build_decoder_layer(layer: nn.Module, config, layer_id: int, *, rank_plan, flavor: AttentionFlavor,
                        rotary_emb: nn.Module, mlp: nn.Module, prefix: str) -> None:
    """Fill a decoder layer (SGLang's layer class of the family, ``nn.Module.__init__`` done) with
    :class:`FairKVAttention` over the KV heads ``rank_plan`` gives this rank in ``layer_id``, the
    family's ``mlp`` (built by the caller: a dense MLP or SGLang's MoE block, partial sums either way,
    reduced by the boundary), the two RMSNorms and the layer boundaries its class declares. The one
    place that knows how a FairKV decoder layer is put together; a family states its flavor, its RoPE
    and its MLP."""
    from sglang.srt.layers.layer_boundary import append_stages
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.utils import add_prefix

    num_q, num_kv, head_dim = checkpoint_heads(config)
    layer.hidden_size = config.hidden_size
    layer.self_attn = FairKVAttention(
        hidden_size=config.hidden_size, num_heads=num_q, num_kv_heads=num_kv, head_dim=head_dim,
        layer_id=layer_id, heads=rank_plan.local_heads[layer_id], rank=rank_plan.rank, rotary_emb=rotary_emb,
        flavor=flavor, rms_norm_eps=config.rms_norm_eps, prefix=add_prefix("self_attn", prefix))
    layer.mlp = mlp
    layer.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    layer.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    attn, ffn = layer.stage_facts(config, layer_id)
    layer.attn_boundary, layer.ffn_boundary = append_stages(
        (attn, layer.input_layernorm), (ffn, layer.post_attention_layernorm))


def dense_mlp(mlp_cls, config, quant_config, prefix: str) -> nn.Module:
    """The family's dense MLP class (``LlamaMLP``, ``Qwen2MLP``) as its decoder layer builds it, with
    partial sums (``reduce_results=False``: the layer boundary reduces)."""
    from sglang.srt.utils import add_prefix

    return mlp_cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   hidden_act=config.hidden_act, quant_config=quant_config, prefix=add_prefix("mlp", prefix),
                   reduce_results=False)


def qwen_rope(config, head_dim: int, default_max_position: int) -> nn.Module:
    """RoPE as SGLang's Qwen2 / Qwen3 / Qwen3-MoE layers build it (``get_rope_config``: v4 and v5
    configs), full rotary dimension."""
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang.srt.utils.hf_transformers_utils import get_rope_config

    if getattr(config, "dual_chunk_attention_config", None):
        raise ValueError("FairKV plans do not support dual-chunk attention")
    theta, scaling = get_rope_config(config)
    return get_rope(head_dim, rotary_dim=head_dim,
                    max_position=getattr(config, "max_position_embeddings", default_max_position), base=theta,
                    rope_scaling=scaling)


def rank_layer_type(base: type, rank_plan) -> type:
    """A subclass of a FairKV decoder layer class carrying this rank's plan as a class attribute: the
    Qwen model classes (``Qwen2Model(decoder_layer_type=...)``) build their layers with SGLang's
    arguments only."""
    return type(f"{base.__name__}ForRank{rank_plan.rank}", (base,), {"rank_plan": rank_plan})


def init_causal_lm(lm: nn.Module, config, quant_config, prefix: str, build_model, *, tie: bool) -> None:
    """What SGLang's causal-LM classes set up around their model, at PP size 1 and without quantization
    (both refused here): ``lm.model = build_model(model_prefix)``, then the LM head (the embedding when
    ``tie`` and the config ties them), logits processor, pooler, no EAGLE capture."""
    from sglang.srt.layers.logits_processor import LogitsProcessor
    from sglang.srt.layers.pooler import Pooler, PoolingType
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.utils import add_prefix

    nn.Module.__init__(lm)
    check_supported(quant_config)
    lm.pp_group = get_parallel().pp_group
    lm.config = config
    lm.quant_config = None
    lm.model = build_model(add_prefix("model", prefix))
    if tie and config.tie_word_embeddings:
        lm.lm_head = lm.model.embed_tokens
    else:
        lm.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=add_prefix("lm_head", prefix))
    lm.logits_processor = LogitsProcessor(config)
    lm.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=True)
    lm.capture_aux_hidden_states = False


def checkpoint_heads(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of the checkpoint. On CPU SGLang pads the head counts of a
    config to a multiple of the TP size (``adjust_config_with_unaligned_cpu_tp``) and keeps the real
    ones in ``original_*``; a plan places the real heads."""
    q = getattr(config, "original_num_attention_heads", None) or config.num_attention_heads
    kv = (getattr(config, "original_total_num_kv_heads", None) or getattr(config, "num_key_value_heads", None)
          or q)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q
    return q, kv, head_dim
