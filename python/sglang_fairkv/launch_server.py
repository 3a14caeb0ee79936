"""``python -m sglang_fairkv.launch_server``: SGLang's server with sglang-fairkv inside.

Accepts every ``python -m sglang.launch_server`` argument, plus the project's own (see
``--help``). Differences from stock SGLang:
  * no ``--model-path``: serve the embedded SmolLM2-135M-Instruct (prepared on first use);
  * on a machine without CUDA: the CPU engine environment and CPU defaults (``--device cpu
    --attention-backend torch_native --dtype float32 --max-total-tokens 16384``); flags you pass win;
  * every scheduler process runs :mod:`sglang_fairkv.worker` first (patches, registrations);
  * bad input (unknown flag, missing model folder, port in use) stops with one clear line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from . import platform

PROG = "python -m sglang_fairkv.launch_server"

#: Defaults applied on CPU when the user did not give the flag: (flag, value).
CPU_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--dtype", "float32"),  # no AMX here: fp32 is as fast as bf16 and exact against references
    ("--max-total-tokens", "16384"),  # on CPU --mem-fraction-static is a fraction of system RAM
)


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


@dataclass(frozen=True)
class LaunchPlan:
    """What :func:`main` will run: SGLang's argv after defaults, and where."""

    sglang_argv: list[str]
    on_cpu: bool
    model_path: str
    host: str
    port: int
    tp_size: int


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def build_parser() -> argparse.ArgumentParser:
    """SGLang's full argument parser under our program name (used for --help and validation)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ServerArgs.add_cli_args(parser)
    return parser


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def plan_launch(argv: list[str], on_cpu: bool) -> LaunchPlan:
    """Validate ``argv`` and add the defaults; raises :class:`UsageError` on bad input.

    Pure apart from reading the file system and probing the port; SGLang's parser must be importable.
    """
    parser = build_parser()
    probe = argv if _given(argv, "--model-path") else [*argv, "--model-path", "<embedded>"]
    ns, unknown = parser.parse_known_args(probe)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see {PROG} --help)")
    out = list(argv)
    if not _given(out, "--model-path"):
        from . import embedded_model

        out += ["--model-path", str(embedded_model.prepare())]
    model_path = _value(out, "--model-path")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(model_path).is_dir():
        raise UsageError(
            f"--model-path {model_path}: no such model folder (hub downloads are off; "
            "give a local Hugging Face folder)"
        )
    if on_cpu:
        for flag, value in CPU_DEFAULTS:
            if not _given(out, flag):
                out += [flag, value]
    host, port = ns.host, ns.port
    if port_in_use(host, port):
        raise UsageError(f"port {port} on {host} is already in use (choose another with --port)")
    return LaunchPlan(out, on_cpu, model_path, host, port, ns.tp_size)


def run(plan: LaunchPlan) -> None:
    """Start SGLang's HTTP server with our scheduler entry; blocks until it exits."""
    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.server_args import prepare_server_args

    from .worker import run_scheduler_process

    server_args = prepare_server_args(plan.sglang_argv)
    server_args.resolve_once()
    launch_server(server_args, run_scheduler_process_func=run_scheduler_process)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    on_cpu = not platform.has_cuda()
    if on_cpu:
        tp = _value(argv, "--tp-size") or _value(argv, "--tp") or "1"
        platform.configure_cpu_environment(int(tp) if tp.isdigit() else 1)
    try:
        plan = plan_launch(argv, on_cpu)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from sglang.srt.utils import kill_process_tree

    try:
        run(plan)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
