"""Patch: no PyNccl communicator when SGLang runs tensor parallel on CPU (gloo).

Why: in SGLang 0.5.23 ``sglang/srt/distributed/parallel_state.py::init_model_parallel_group``
defaults ``use_pynccl`` to ``not (_is_npu or _is_xpu or backend == "mooncake")``, i.e. True on a
CPU-only machine. ``GroupCoordinator.__init__`` then builds a ``PyNcclCommunicator`` for every group
with world size > 1, which calls ``torch.cuda.device(cpu)`` and kills TP >= 2 at start-up. With
``use_pynccl=False`` the gloo process group does the all-reduce, which is correct on CPU.

What: a ``HookRegistry`` BEFORE hook on that function that forces ``use_pynccl=False``. It is
registered only in processes that run on CPU (``sglang_fairkv.serving.hooks.scheduler_hooks``).
"""

from __future__ import annotations

TARGET = "sglang.srt.distributed.parallel_state.init_model_parallel_group"
_USE_PYNCCL_POSITION = 3  # (group_ranks, local_rank, backend, use_pynccl, ...)


def force_no_pynccl(*args, **kwargs):
    """BEFORE hook: return the call's arguments with ``use_pynccl=False``."""
    if len(args) > _USE_PYNCCL_POSITION:
        args = args[:_USE_PYNCCL_POSITION] + (False,) + args[_USE_PYNCCL_POSITION + 1 :]
    else:
        kwargs["use_pynccl"] = False
    return args, kwargs
