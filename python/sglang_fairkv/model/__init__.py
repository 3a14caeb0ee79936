"""SGLang model classes that serve a FairKV plan (``SGLANG_EXTERNAL_MODEL_PACKAGE=sglang_fairkv.model``).

SGLang imports every module here and registers each ``EntryClass`` under its class name, in place of
its own class of that name; ``launch_server`` sets the variable only when ``--fairkv-plan`` is in
effect (TP > 1 with the fairkv backend) and checks at start-up that the class SGLang resolved is ours.
Shared pieces (head-sliced projections, the attention module) live in ``heads``; no ``EntryClass``.
"""
