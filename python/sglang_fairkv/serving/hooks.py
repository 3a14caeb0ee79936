"""Every SGLang hook sglang-fairkv registers, which process registers it, and the check that it applied.

SGLang's ``HookRegistry`` patches functions by dotted path; ``apply_hooks`` only logs a target it
cannot find. Each process here registers its list and :func:`apply_hooks` raises instead, so a process
whose hook did not apply dies at start-up (and the server with it) rather than serving wrongly.

* **Launcher** (:func:`launcher_hooks`; the tokenizer manager and HTTP server run there): the request
  guards (malformed requests get HTTP 400), the fairkv control plane's communicator
  (:mod:`~sglang_fairkv.serving.control_plane`), and on CPU the fork of SGLang's children.
* **Scheduler** (:func:`scheduler_hooks`, run by :mod:`~sglang_fairkv.serving.worker` in every
  scheduler process): on CPU no PyNccl; the control plane's request handler; the request-intake and
  forward guards; the lost-TP-peer message
  (:mod:`~sglang_fairkv.serving.group_guard`); with ``--kv-compress``
  the ragged pool (:mod:`~sglang_fairkv.serving.pool_hooks`) and the scheduler path
  (:mod:`~sglang_fairkv.serving.scheduler_hooks`).

The ``fairkv`` attention backend goes into SGLang's attention registry (:func:`register_backend`, each
scheduler) and into its argument parser's choices (:func:`add_backend_choice`, the launcher).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

BACKEND_NAME = "fairkv"


class Hook(NamedTuple):
    """One ``HookRegistry`` registration: the dotted ``target``, the hook function, and the name of its
    ``HookType`` (``BEFORE`` / ``AFTER`` / ``AROUND``)."""

    target: str
    fn: Callable
    kind: str


def launcher_hooks(on_cpu: bool) -> list[Hook]:
    """The launcher process's hooks."""
    from sglang_fairkv_patches import fork_children

    from .. import env
    from . import control_plane as cp
    from . import request_guard as g

    hooks = [Hook(cp.T_INIT_COMMUNICATORS, cp.init_communicators_hook, "AFTER"),
             Hook(g.T_VALIDATE, g.validate_request_hook, "AROUND"),
             Hook(g.T_TOKENIZED_OBJECT, g.tokenized_object_hook, "AROUND"),
             Hook(g.T_SERVE_GENERATE, g.serve_generate_hook, "AROUND"),
             Hook(g.T_NORMALIZE, g.normalize_hook, "AROUND")]
    if on_cpu and env.cpu_start_method() == "fork":
        hooks.append(Hook(fork_children.TARGET, fork_children.fork_children_hook, "AFTER"))
    return hooks


def scheduler_hooks(on_cpu: bool) -> list[Hook]:
    """A scheduler process's hooks (the fairkv ones only when ``--kv-compress`` is on)."""
    from sglang_fairkv_patches import pynccl_cpu

    from . import control_plane as cp
    from . import group_guard as gg
    from . import pool_hooks as p
    from . import request_guard as g
    from . import scheduler_hooks as s
    from .server_plan import compress_config

    hooks = [Hook(pynccl_cpu.TARGET, pynccl_cpu.force_no_pynccl, "BEFORE")] if on_cpu else []
    hooks += [Hook(cp.T_INIT_DISPATCHER, cp.init_dispatcher_hook, "AFTER"),
              Hook(g.T_HANDLE_GENERATE, g.handle_generate_hook, "AROUND"),
              Hook(g.T_RUN_BATCH, g.run_batch_hook, "AROUND"),
              Hook(gg.T_EVENT_LOOP, gg.event_loop_hook, "AROUND")]
    if compress_config() is not None:
        hooks += [Hook(p.T_BUILD_POOL, p.build_pool_hook, "AROUND"),
                  Hook(p.T_BUILD_ALLOC, p.build_allocator_hook, "AROUND"),
                  Hook(p.T_CONFIGURE, p.configure_hook, "AROUND"),
                  Hook(s.T_ADD_ONE_REQ, s.adder_request_hook, "AROUND"),
                  Hook(s.T_ADD_CHUNKED_REQ, s.adder_request_hook, "AROUND"),
                  Hook(s.T_ADDER_INIT, s.adder_init_hook, "AFTER"),
                  Hook(s.T_PREPARE_EXTEND, s.prepare_for_extend_hook, "AFTER"),
                  Hook(s.T_FORWARD_BATCH, s.forward_batch_hook, "AFTER"),
                  Hook(s.T_REPLAY_VIEW, s.replay_view_hook, "AFTER"),
                  Hook(s.T_RELEASE, s.release_hook, "BEFORE"),
                  Hook(s.T_INTERNAL_STATE, s.internal_state_hook, "AFTER"),
                  Hook(s.T_METRICS, s.metrics_hook, "AFTER"),
                  Hook(s.T_INPUT_LENGTH, s.input_length_hook, "AFTER"),
                  Hook(s.T_MODEL_FORWARD, s.model_forward_hook, "AFTER"),  # decode-time compression
                  Hook(cp.T_INGEST, cp.ingest_hook, "AFTER"),  # a switch: deadline, migrate, auto re-plan
                  Hook(cp.T_ON_IDLE, cp.on_idle_hook, "BEFORE")]  # a drain switch commits at idle
    return hooks


def apply_hooks(hooks: list[Hook]) -> list[str]:
    """Register ``hooks`` with SGLang's ``HookRegistry`` (each once per process), apply them, and raise
    RuntimeError naming any target that did not apply. Returns the targets."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for h in hooks:
        if not any(fn is h.fn for _, fn, _ in HookRegistry._hooks.get(h.target, [])):
            HookRegistry.register(h.target, h.fn, HookType[h.kind])
    HookRegistry.apply_hooks()
    missing = [h.target for h in hooks if h.target not in HookRegistry._patched]
    if missing:
        raise RuntimeError(
            f"sglang-fairkv: SGLang hooks did not apply to {missing}; this SGLang version "
            "(expected 0.5.23) does not have the code these patches change. Refusing to start.")
    return [h.target for h in hooks]


def register_backend() -> None:
    """Put ``fairkv`` into SGLang's attention registry (each scheduler process)."""
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from ..attention.fairkv_backend import create_fairkv_backend

    register_attention_backend(BACKEND_NAME)(create_fairkv_backend)
    from .prefix_cache import register_radix_cache_backend

    register_radix_cache_backend()  # --radix-cache-backend fairkv: the dense prefix tier's tree


def add_backend_choice() -> None:
    """Let SGLang's argument parser accept ``--attention-backend fairkv`` (launcher, before parsing)."""
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    from .prefix_cache import register_radix_cache_backend

    register_radix_cache_backend()
