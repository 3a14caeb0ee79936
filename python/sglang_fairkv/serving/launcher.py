"""What ``python -m sglang_fairkv.launch_server`` does: SGLang's server with sglang-fairkv inside.

Accepts every ``python -m sglang.launch_server`` argument, plus the project's own (see
``--help``). Differences from stock SGLang:
  * no ``--model-path``: serve the embedded SmolLM2-135M-Instruct (prepared on first use);
  * on a machine without CUDA: the CPU engine environment and CPU defaults (``--device cpu
    --attention-backend torch_native --dtype float32 --max-total-tokens 16384``); flags you pass win;
  * every scheduler process runs :mod:`sglang_fairkv.serving.worker` first (hooks, registrations);
  * ``--kv-compress none|snapkv|adakv|pyramidkv|headkv`` (with ``--kv-budget N`` or
    ``--kv-compress-ratio R``, ``--kv-window``, ``--kv-pool-kernel``, ``--kv-alpha``,
    ``--kv-head-budgets FILE``) serves through the ``fairkv`` attention backend over a ragged
    per-(request, layer, KV head) pool; it turns off what cannot work with a compressed cache (radix
    prefix sharing, prefill CUDA graphs; decode graphs on a machine without CUDA; logged) and rejects
    flags that cannot be turned off, naming them; overlap scheduling and CUDA-graph decode stay on;
  * bad input (unknown flag, missing model folder, port in use) stops with one clear line, exit 2;
  * malformed requests (empty prompts, token ids outside the vocabulary, ill-typed sampling
    parameters) get HTTP 400 instead of reaching a scheduler (:mod:`sglang_fairkv.serving.request_guard`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from . import machine
from .fairkv_flags import (PROG, UsageError, add_fairkv_args, decode_orphans, fairkv_parser, fairkv_setup,  # noqa: F401
                           given, model_config, placement_setup, replan_setup, value)


#: Defaults applied on CPU when the user did not give the flag: (flag, value; None for a switch).
CPU_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--dtype", "float32"),  # no AMX here: fp32 is as fast as bf16 and exact against references
    ("--max-total-tokens", "16384"),  # on CPU --mem-fraction-static is a fraction of system RAM
    # SGLang's idle scheduler polls in a busy loop: on a 2-core machine two idle servers take a core
    # each and every request on either is 5-25x slower (measured 2026-12-07); this blocks on the sockets
    ("--sleep-on-idle", None),
)

#: Ours, removed before SGLang parses: keep SGLang's busy-polling idle loop on CPU.
NO_SLEEP_ON_IDLE = "--no-sleep-on-idle"


#: The embedded SmolLM2's template has no tool section; asked for a tool it answers
#: ``{"name": ..., "arguments": ...}`` as plain JSON, the format of SGLang's ``llama3`` parser.
EMBEDDED_TOOL_CALL_PARSER = "llama3"


@dataclass(frozen=True)
class LaunchConfig:
    """What :func:`main` will run: SGLang's argv after defaults, where, and the fairkv settings the
    scheduler processes read back (``kv_compress_json``, ``placement_json``: the checked FairKV plan)."""

    sglang_argv: list[str]
    on_cpu: bool
    model_path: str
    host: str
    port: int
    tp_size: int
    kv_compress_json: str | None = None
    notes: tuple[str, ...] = ()
    placement_json: str | None = None
    #: the dense prefix tier's share of the KV pages (0: prefix caching off), for FAIRKV_PREFIX_TIER
    prefix_tier: float = 0.0
    #: what may not do what the user expects (printed as ``sglang-fairkv: warning: ...``)
    warnings: tuple[str, ...] = ()
    #: ``--kv-cache-dtype fp8_e4m3 | fp8_e5m2`` taken by the ragged pool (FAIRKV_KV_DTYPE), or None
    kv_store_dtype: str | None = None
    #: ``--fairkv-auto-replan`` (gain, interval s, min samples), or None (off)
    auto_replan: tuple[float, float, int] | None = None
    #: ``--fairkv-replan-head-slots`` (or its default with auto re-plan): FAIRKV_REPLAN_HEAD_SLOTS
    replan_head_slots: int | None = None


def build_parser() -> argparse.ArgumentParser:
    """SGLang's full argument parser under our program name (used for --help and validation)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .hooks import add_backend_choice

    add_backend_choice()
    ServerArgs.add_cli_args(parser)
    add_fairkv_args(parser)
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


def scale_out_setup(ns, out: list[str]) -> tuple[str, ...]:
    """Multi-node TP (``--nnodes > 1``): bound how long a rank waits on a stuck peer (``--dist-timeout``,
    unless given; torch's default is 30 minutes) -- a dead peer is reported at once
    (:mod:`~sglang_fairkv.serving.group_guard`). Returns the notes to print."""
    from .group_guard import DIST_TIMEOUT_S

    if (ns.nnodes or 1) > 1 and not given(out, "--dist-timeout"):
        out += ["--dist-timeout", str(DIST_TIMEOUT_S)]
        return (f"--dist-timeout {DIST_TIMEOUT_S}: a TP rank on another node that stops answering stops the "
                f"group after {DIST_TIMEOUT_S} s (a dead one at once)",)
    return ()


def parse_launch(argv: list[str], on_cpu: bool) -> LaunchConfig:
    """Validate ``argv`` and add the defaults; raises :class:`UsageError` on bad input.

    Pure apart from reading the file system and probing the port; SGLang's parser must be importable.
    """
    busy_poll = NO_SLEEP_ON_IDLE in argv
    argv = [a for a in argv if a != NO_SLEEP_ON_IDLE]
    if busy_poll and "--sleep-on-idle" in argv:
        raise UsageError(f"--sleep-on-idle and {NO_SLEEP_ON_IDLE} contradict each other")
    parser = build_parser()
    probe = argv if given(argv, "--model-path") else [*argv, "--model-path", "<embedded>"]
    ns, unknown = parser.parse_known_args(probe)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see {PROG} --help)")
    fk, out = fairkv_parser().parse_known_args(argv)
    decode_orphans(argv, fk)
    if (fk.fairkv_plan is not None or fk.kv_decode_compress is not None) and fk.kv_compress is None:
        # a plan, or decode-time compression alone, serves through the fairkv backend (ragged pool)
        fk.kv_compress = "none"
    if fk.kv_compress is None and ns.attention_backend != "fairkv":
        ours = [a.option_strings[0] for a in fairkv_parser()._actions if a.dest != "kv_compress"]
        orphan = [f for f in ours if given(argv, f)]
        if orphan:
            raise UsageError(f"{', '.join(orphan)} need --kv-compress")
    embedded_notes = ()
    if not given(out, "--model-path"):
        from .. import embedded_model

        out += ["--model-path", str(embedded_model.prepare())]
        if not given(out, "--tool-call-parser"):
            out += ["--tool-call-parser", EMBEDDED_TOOL_CALL_PARSER]
            embedded_notes = (f"--tool-call-parser {EMBEDDED_TOOL_CALL_PARSER}: the embedded SmolLM2 answers a "
                              "tool request with a bare JSON call, which this parser turns into tool_calls",)
    model_path = value(out, "--model-path")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(model_path).is_dir():
        raise UsageError(
            f"--model-path {model_path}: no such model folder (hub downloads are off; "
            "give a local Hugging Face folder)"
        )
    cfg_json, notes, placement_json, warnings, cfg = None, (), None, (), None
    if fk.kv_compress is not None or ns.attention_backend == "fairkv":
        mc = model_config(model_path)  # config.json, read once for both
        cfg, notes, warnings = fairkv_setup(fk, ns, out, model_path, mc, on_cpu)
        placement_json, plan_notes, plan_warnings = placement_setup(fk, ns, out, model_path, mc, cfg)
        cfg_json, notes, warnings = cfg.to_json(), notes + plan_notes, warnings + plan_warnings
    auto_replan, head_slots, replan_notes = replan_setup(fk, ns, cfg, placement_json)
    notes += replan_notes
    notes = embedded_notes + notes + scale_out_setup(ns, out)
    if on_cpu:
        applied = []
        for flag, v in CPU_DEFAULTS:
            if given(out, flag) or (flag == "--sleep-on-idle" and busy_poll):
                continue
            out += [flag] if v is None else [flag, v]
            applied.append(flag if v is None else f"{flag} {v}")
        if applied:
            notes = (f"CPU defaults: {' '.join(applied)} (flags you pass win; {NO_SLEEP_ON_IDLE} "
                     "keeps SGLang's busy-polling idle loop)",) + notes
    host, port = ns.host, ns.port
    if port_in_use(host, port):
        raise UsageError(f"port {port} on {host} is already in use (choose another with --port)")
    return LaunchConfig(out, on_cpu, model_path, host, port, ns.tp_size, cfg_json, notes, placement_json,
                        warnings=warnings, prefix_tier=float(getattr(fk, "prefix_tier_effective", 0.0)),
                        kv_store_dtype=getattr(fk, "kv_store_dtype", None), auto_replan=auto_replan,
                        replan_head_slots=head_slots)


def export_settings(launch: LaunchConfig) -> str | None:
    """Hand the checked fairkv settings to SGLang's processes (environment; the plan as a temporary
    file) and print the notes and warnings; returns the plan file's path (the caller removes it)."""
    from .. import env

    for w in launch.warnings:
        print(f"sglang-fairkv: warning: {w}", file=sys.stderr)
    for note in launch.notes:
        print(f"sglang-fairkv: {note}", file=sys.stderr)
    if launch.kv_compress_json is not None:
        env.set_kv_compress_json(launch.kv_compress_json)
    env.set_prefix_tier_fraction(launch.prefix_tier)
    env.set_kv_store_dtype(launch.kv_store_dtype)
    if launch.auto_replan is not None:
        env.set_auto_replan(*launch.auto_replan)
    env.set_replan_head_slots(launch.replan_head_slots)
    if launch.placement_json is None:
        return None
    import tempfile

    fd, path = tempfile.mkstemp(prefix="fairkv-plan-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(launch.placement_json)
    env.set_plan_path(path)
    # SGLang resolves the architecture from this package first (checked in each scheduler)
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "sglang_fairkv.model"
    return path


def resolve_server_args(argv: list[str]):
    """SGLang's ``ServerArgs`` of ``argv``, resolved as ``launch_server`` would (model config, context
    length, backends); every check SGLang makes there becomes a :class:`UsageError` (one line, exit 2)
    instead of a traceback."""
    from sglang.srt.server_args import prepare_server_args

    from .hooks import add_backend_choice

    add_backend_choice()
    try:
        server_args = prepare_server_args(argv)
        server_args.resolve_once()
    except (ValueError, AssertionError, NotImplementedError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(text[len("Warning: "):] if text.startswith("Warning: ") else text) from None
    return server_args


def run(server_args, on_cpu: bool) -> None:
    """Start SGLang's HTTP server with our scheduler entry; blocks until it exits."""
    from sglang.srt.entrypoints.http_server import launch_server

    from sglang.srt.entrypoints.http_server import app

    from .control_plane import add_routes
    from .hooks import apply_hooks, launcher_hooks
    from .worker import run_scheduler_process

    # the tokenizer manager runs in this process: bad requests get HTTP 400 before any scheduler
    apply_hooks(launcher_hooks(on_cpu))
    add_routes(app)  # GET /fairkv/plan, POST /fairkv/replan
    launch_server(server_args, run_scheduler_process_func=run_scheduler_process)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    on_cpu = not machine.has_cuda()
    if on_cpu:  # every scheduler rank of this process (DP replicas x TP ranks) gets its own cores
        tp = value(argv, "--tp-size") or value(argv, "--tp") or "1"
        dp = value(argv, "--dp-size") or value(argv, "--dp") or "1"
        machine.configure_cpu_environment((int(tp) if tp.isdigit() else 1) * (int(dp) if dp.isdigit() else 1))
    plan_file = None
    try:
        launch = parse_launch(argv, on_cpu)
        plan_file = export_settings(launch)
        server_args = resolve_server_args(launch.sglang_argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        if plan_file:
            Path(plan_file).unlink(missing_ok=True)
        return 2
    from sglang.srt.utils import kill_process_tree

    try:
        run(server_args, launch.on_cpu)
    finally:
        if plan_file:
            Path(plan_file).unlink(missing_ok=True)
        kill_process_tree(os.getpid(), include_parent=False)
    return 0
