"""Patch: SGLang's frontend language picks ChatML for SmolLM2-Instruct models.

Why: ``sglang.lang.backend.runtime_endpoint.RuntimeEndpoint`` chooses the chat template of
``sgl.user`` / ``sgl.assistant`` programs by matching the server's model path against SGLang 0.5.23's
list (``sglang/lang/chat_template.py``); no matcher knows SmolLM2, so the embedded model gets the
``default`` template (``USER:`` / ``ASSISTANT:``), the model never sees its own turn markers, and
``gen`` runs on to ``max_tokens``. SmolLM2-Instruct's own template is ChatML (``<|im_start|>`` /
``<|im_end|>``, ``<|im_end|>`` being its end of turn).

What: after ``sglang.lang.chat_template`` is first imported in a process of this venv, one more
matching function is registered through SGLang's own ``register_chat_template_matching_function``: a
model path naming SmolLM / SmolLM2 with "instruct" -> ``chatml``. It is appended, so SGLang's own
matchers still win for every model they know. Installed as a ``.pth`` import hook by ``make install``
(the frontend runs in the user's process, which nothing else of ours reaches). For other models give
the name yourself: ``RuntimeEndpoint(url, chat_template_name="chatml")``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import re
import sys

TARGET = "sglang.lang.chat_template"
_SMOLLM_INSTRUCT = re.compile(r"smollm.*instruct", re.IGNORECASE)


def match_smollm_instruct(model_path: str) -> str | None:
    """``chatml`` for a SmolLM / SmolLM2 instruct model path, else None (let other matchers decide)."""
    return "chatml" if _SMOLLM_INSTRUCT.search(model_path or "") else None


def register(module) -> None:
    """Append :func:`match_smollm_instruct` to ``module``'s matchers (once)."""
    if match_smollm_instruct not in module.matching_function_registry:
        module.register_chat_template_matching_function(match_smollm_instruct)


class _AfterImportHook(importlib.abc.MetaPathFinder):
    """Lets the regular finders load ``sglang.lang.chat_template``, then registers the matcher."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register(module)

        spec.loader.exec_module = exec_module
        return spec


def install_import_hook() -> None:
    """Register the matcher now if SGLang's frontend is already imported, else when it is."""
    if TARGET in sys.modules:
        register(sys.modules[TARGET])
        return
    if not any(isinstance(f, _AfterImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportHook())
