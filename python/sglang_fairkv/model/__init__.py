"""SGLang model classes that serve a FairKV plan (``SGLANG_EXTERNAL_MODEL_PACKAGE=sglang_fairkv.model``).

SGLang imports every module here and registers each ``EntryClass`` under its class name, in place of
its own class of that name; ``launch_server`` sets the variable only when a FairKV plan is in effect
(``--fairkv-plan``, or the fairkv backend at TP > 1, where ``sha`` is the default) and checks at start-up that the class SGLang resolved is ours.
Shared pieces (head-sliced projections, the attention module and its per-family flavor, the one
decoder-layer builder) live in ``heads``; no ``EntryClass``. A family file states its flavor, RoPE and MLP.
The rank plan comes from ``plan_source`` (a provider the serving floor installs); ``reslice`` rebuilds the
attention of layers whose heads change at a plan switch.
"""

#: The architectures (``config.json`` ``architectures[0]``) with a FairKV class here; the launcher
#: refuses a plan for others, each scheduler checks SGLang resolves every one of them to ours.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Qwen3MoeForCausalLM")

#: Architectures served by the FairKV class at TP 1 too (a one-rank plan, every head on rank 0):
#: SGLang 0.5.23's own Qwen3-MoE class writes K/V into the pool itself on CUDA (RoPE fused with the
#: cache write, ``enable_fused_set_kv_buffer``) and skips the backend's write, which the ragged pool
#: cannot take; the FairKV class always hands K/V to the backend.
OWN_CLASS_AT_TP1 = ("Qwen3MoeForCausalLM",)
