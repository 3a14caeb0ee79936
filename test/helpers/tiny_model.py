"""Tiny random Llama-family checkpoints built locally (no hub), with a locally trained BPE tokenizer.

Weights are drawn with std ``init_std`` (default 0.1): at HF's 0.02 attention is nearly uniform and
scores tie, which makes kept-token and greedy comparisons meaningless.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("alpha beta gamma delta river stone cloud paris france capital seven eleven green blue "
         "the a of and is to in key value needle haystack city north south east west").split()


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) * (rng.random() < 0.2)
                       for _ in range(40)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


def build_llama(dest: Path, *, num_layers: int = 2, hidden: int = 128, num_heads: int = 4,
                num_kv_heads: int = 2, head_dim: int = 32, intermediate: int = 256,
                init_std: float = 0.1, seed: int = 0, arch: str = "llama",
                q_head_scales: list[list[float]] | None = None, num_experts: int = 4,
                experts_per_token: int = 2) -> Path:
    """Write a float32 checkpoint + tokenizer to ``dest`` (idempotent) and return it.

    ``arch``: llama, mistral, qwen2, qwen3 (per-head RMSNorm on q and k, drawn around 1 so that a
    missing or misplaced norm changes the outputs) or qwen3_moe (the same attention, every layer a
    sparse MoE block of ``num_experts`` experts of ``intermediate`` width, ``experts_per_token`` each).

    ``q_head_scales[l][h]``: multiplies the query rows of KV head ``h``'s query group in layer ``l``
    (sharper or flatter attention per head: per-head compression then keeps unequal counts)."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    tok = build_tokenizer(seed=seed)
    cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                          "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}[arch]
    extra = {}
    if arch == "qwen3_moe":
        extra = dict(num_experts=num_experts, num_experts_per_tok=experts_per_token,
                     moe_intermediate_size=intermediate, decoder_sparse_step=1, mlp_only_layers=[],
                     norm_topk_prob=True)
    cfg = cls_cfg(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, head_dim=head_dim,
                  max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, dtype="float32", **extra)
    torch.manual_seed(seed)
    model = cls_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("proj.bias"):  # Qwen2's q/k/v biases too
                p.normal_(0.0, init_std)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's per-head norms
                p.uniform_(0.5, 1.5)
        for l, scales in enumerate(q_head_scales or []):
            w = model.model.layers[l].self_attn.q_proj.weight  # [q_heads * head_dim, hidden]
            w.view(num_kv_heads, -1, w.shape[1]).mul_(torch.tensor(scales, dtype=w.dtype)[:, None, None])
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
