"""Patch: let a CUDA-built PyPI ``torchvision`` import beside a CPU-only torch.

Why: the slim CPU install uses the machine's torch 2.13.0 CPU wheel; PyPI only serves CUDA builds of
torchvision, whose ``_C`` extension cannot load against a CPU torch. ``torchvision/__init__.py``
then imports ``torchvision/_meta_registrations.py``, whose ``@torch.library.register_fake(
"torchvision::nms")`` (and ``qnms``) raise ``RuntimeError: operator torchvision::nms does not exist``.
SGLang 0.5.23 imports torchvision unconditionally (``sglang/srt/multimodal/internvl_utils.py`` via
``sglang/srt/configs/__init__.py``), so no SGLang process starts.

What: before the first ``import torchvision`` we check whether its ``_C`` extension loads. Only if it
does not, we define the two operator *schemas* (no kernels) so the fake registrations succeed. Any
real call of ``torchvision.ops.nms`` still fails (no kernel), which no text-model path does.
Installed as a lazy import hook so that processes that never import torchvision pay nothing.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_state: dict = {"applied": None, "lib": None}


def torchvision_ops_loadable() -> bool:
    """True when torchvision's compiled ``_C`` extension loads into this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    import torch

    for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def define_missing_schemas() -> bool:
    """Define ``torchvision::nms``/``qnms`` schemas if torchvision's ops cannot load.

    Returns True when the schemas were defined by this call (the patch was needed).
    """
    if _state["applied"] is not None:
        return _state["applied"]
    if torchvision_ops_loadable():
        _state["applied"] = False
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _state["lib"] = lib  # the Library must stay alive for its definitions to persist
    _state["applied"] = True
    return True


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`define_missing_schemas` right before ``torchvision`` is first imported."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_schemas()
        return None  # let the regular finders import it


def install_import_hook() -> None:
    """Arrange for the patch to run before the first ``import torchvision`` in this process."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())
