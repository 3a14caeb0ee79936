"""SGLang model classes that serve a FairKV plan (``SGLANG_EXTERNAL_MODEL_PACKAGE=sglang_fairkv.model``).

SGLang imports every module here and registers each ``EntryClass`` under its class name, in place of
its own class of that name; ``launch_server`` sets the variable only when a FairKV plan is in effect
(``--fairkv-plan``, or the fairkv backend at TP > 1, where ``sha`` is the default) and checks at start-up that the class SGLang resolved is ours.
Shared pieces (head-sliced projections, the attention module) live in ``heads``; no ``EntryClass``.
"""

#: The architectures (``config.json`` ``architectures[0]``) with a FairKV class here; the launcher
#: refuses a plan for others, each scheduler checks SGLang resolves every one of them to ours.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
