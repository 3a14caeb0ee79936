"""What runs first in every SGLang scheduler process that sglang-fairkv launches.

SGLang spawns its schedulers (one per TP rank): monkeypatches made in the launcher never reach them.
``http_server.launch_server(..., run_scheduler_process_func=run_scheduler_process)`` makes this
module-level function the process target instead; it applies and verifies this project's hooks, then
hands over to SGLang's own ``run_scheduler_process`` with the same arguments.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def prepare_scheduler_process(server_args) -> list[str]:
    """Register and verify the project's SGLang hooks in this process; returns the hook targets."""
    from ..model import plan_source
    from .hooks import apply_hooks, register_backend, scheduler_hooks
    from .server_plan import check_model_package, server_rank_plan

    on_cpu = str(getattr(server_args, "device", "")) == "cpu"
    plan_source.set_provider(server_rank_plan)  # the model classes' plan: this process's current one
    register_backend()
    targets = apply_hooks(scheduler_hooks(on_cpu))
    check_model_package()
    return targets


def run_scheduler_process(server_args, port_args, gpu_id, tp_rank, pp_rank, dp_rank, pipe_writer,
                          *args, **kwargs):
    """Drop-in for ``sglang.srt.managers.scheduler.run_scheduler_process`` (same signature)."""
    targets = prepare_scheduler_process(server_args)
    logger.info("sglang-fairkv: tp_rank %s hooks applied: %s", tp_rank, targets)
    from sglang.srt.managers.scheduler import run_scheduler_process as sglang_run_scheduler_process

    return sglang_run_scheduler_process(
        server_args, port_args, gpu_id, tp_rank, pp_rank, dp_rank, pipe_writer, *args, **kwargs
    )
