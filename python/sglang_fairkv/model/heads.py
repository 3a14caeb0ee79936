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


class FairKVAttention(nn.Module):
    """Self-attention over the KV heads ``heads`` (global ids, sorted) of one layer on this rank."""

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 layer_id: int, heads: list[int], rank: int, rotary_emb: nn.Module, qkv_bias: bool,
                 o_bias: bool, prefix: str = ""):
        super().__init__()
        from sglang.srt.layers.radix_attention import RadixAttention

        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.group = num_heads // num_kv_heads
        self.heads = list(heads)
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        n = len(self.heads)
        self.qkv_proj = HeadSlicedQKV(hidden_size, head_dim, self.group, self.heads, qkv_bias)
        self.o_proj = HeadSlicedO(hidden_size, head_dim, self.group, self.heads, o_bias, rank)
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
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, forward_batch))


def check_supported(quant_config) -> None:
    """What the FairKV model classes cannot serve yet: quantized checkpoints, pipeline parallelism."""
    from sglang.srt.runtime_context import get_parallel

    if quant_config is not None:
        raise ValueError("FairKV plans do not support quantized checkpoints yet")
    if get_parallel().pp_group.world_size != 1:
        raise ValueError("FairKV plans do not support pipeline parallelism")


def build_decoder_layer(layer: nn.Module, config, layer_id: int, *, heads: list[int], rank: int,
                        rotary_emb: nn.Module, qkv_bias: bool, o_bias: bool, mlp_cls, quant_config,
                        prefix: str) -> None:
    """Fill a decoder layer (SGLang's Llama / Qwen2 layer class, ``nn.Module.__init__`` done) with
    :class:`FairKVAttention` over ``heads``, the model's own MLP class (partial sums, reduced by the
    boundary), the two RMSNorms and the layer boundaries its class declares."""
    from sglang.srt.layers.layer_boundary import append_stages
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.utils import add_prefix

    num_q, num_kv, head_dim = checkpoint_heads(config)
    layer.hidden_size = config.hidden_size
    layer.self_attn = FairKVAttention(
        hidden_size=config.hidden_size, num_heads=num_q, num_kv_heads=num_kv, head_dim=head_dim,
        layer_id=layer_id, heads=heads, rank=rank, rotary_emb=rotary_emb, qkv_bias=qkv_bias, o_bias=o_bias,
        prefix=add_prefix("self_attn", prefix))
    layer.mlp = mlp_cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                        hidden_act=config.hidden_act, quant_config=quant_config,
                        prefix=add_prefix("mlp", prefix), reduce_results=False)
    layer.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    layer.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    attn, ffn = layer.stage_facts(config, layer_id)
    layer.attn_boundary, layer.ffn_boundary = append_stages(
        (attn, layer.input_layernorm), (ffn, layer.post_attention_layernorm))


def checkpoint_heads(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of the checkpoint. On CPU SGLang pads the head counts of a
    config to a multiple of the TP size (``adjust_config_with_unaligned_cpu_tp``) and keeps the real
    ones in ``original_*``; a plan places the real heads."""
    q = getattr(config, "original_num_attention_heads", None) or config.num_attention_heads
    kv = (getattr(config, "original_total_num_kv_heads", None) or getattr(config, "num_key_value_heads", None)
          or q)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q
    return q, kv, head_dim
