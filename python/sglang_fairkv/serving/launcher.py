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


#: SGLang flags that cannot work with a compressed (ragged) KV cache: rejected when fairkv is on.
FAIRKV_REJECTED_FLAGS: tuple[str, ...] = (
    "--speculative-algorithm", "--enable-dp-attention", "--enable-mixed-chunk",
    "--enable-hierarchical-cache", "--disaggregation-mode", "--enable-torch-compile",
    "--enable-lora", "--enable-two-batch-overlap",
)
#: Added when fairkv is on (what the compressed cache needs), with the reason logged.
FAIRKV_FORCED: tuple[tuple[tuple[str, ...], str], ...] = (
    (("--disable-radix-cache",), "radix prefix sharing cannot share per-head compressed KV"),
    (("--cuda-graph-backend-prefill", "disabled"), "fairkv prefill takes page decisions per layer "
     "(compress as you go): eager; decode steps are graph-captured on CUDA"),
)
#: Added on a machine without CUDA (or with FAIRKV_DECODE_KERNEL=torch): decode runs eager there.
FAIRKV_FORCED_EAGER_DECODE = (("--cuda-graph-backend-decode", "disabled"),
                              "CUDA-graph decode needs CUDA and the Triton decode kernel")


#: Default ``--max-running-requests`` with fairkv (sizes the per-request segment page table).
FAIRKV_DEFAULT_MAX_RUNNING = 256


def add_fairkv_args(parser: argparse.ArgumentParser) -> None:
    """The project's own flags (KV compression through the fairkv backend)."""
    g = parser.add_argument_group("sglang-fairkv KV compression")
    from ..compress.policy import METHODS

    g.add_argument("--kv-compress", choices=METHODS,
                   help="per-head KV compression through the fairkv backend (none = ragged pool, no "
                        "compression)")
    g.add_argument("--kv-budget", type=int, help="mean kept prompt tokens per KV head")
    g.add_argument("--kv-compress-ratio", type=float,
                   help="fraction of the prompt removed (kvpress compression_ratio)")
    g.add_argument("--kv-window", type=int, default=64, help="SnapKV observation window (tokens)")
    g.add_argument("--kv-pool-kernel", type=int, default=5, help="SnapKV avg-pool kernel (odd)")
    g.add_argument("--kv-alpha", type=float, default=0.2, help="AdaKV safeguard fraction")
    g.add_argument("--kv-head-budgets", help="HeadKV static budgets JSON {\"head_budgets\": [[layers][kv_heads]]}")
    g.add_argument("--fairkv-plan", metavar="PATH|sha|assign|fairkv",
                   help="FairKV head placement across TP ranks: a fairkv-plan/1 file (python -m "
                        "sglang_fairkv.plan), sha (standard TP split), or assign / fairkv computed now "
                        "from --fairkv-stats (default at --tp-size > 1: sha)")
    g.add_argument("--fairkv-stats", metavar="FILE",
                   help="fairkv-stats/1 file (python -m sglang_fairkv.profiler): the plan of --fairkv-plan "
                        "assign|fairkv is computed from it; with sha or a plan file it is the reference the "
                        "plan-drift report compares the live traffic with")
    g.add_argument("--fairkv-max-copies-per-layer", type=int, default=1, metavar="K",
                   help="extra head replicas per layer for --fairkv-plan fairkv (default 1)")


def fairkv_parser() -> argparse.ArgumentParser:
    """Only the project's flags (``parse_known_args`` splits them from SGLang's)."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    add_fairkv_args(p)
    return p


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


def parse_launch(argv: list[str], on_cpu: bool) -> LaunchConfig:
    """Validate ``argv`` and add the defaults; raises :class:`UsageError` on bad input.

    Pure apart from reading the file system and probing the port; SGLang's parser must be importable.
    """
    parser = build_parser()
    probe = argv if _given(argv, "--model-path") else [*argv, "--model-path", "<embedded>"]
    ns, unknown = parser.parse_known_args(probe)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see {PROG} --help)")
    fk, out = fairkv_parser().parse_known_args(argv)
    if fk.fairkv_plan is not None and fk.kv_compress is None:
        fk.kv_compress = "none"  # a plan serves through the fairkv backend (ragged pool, no compression)
    if fk.kv_compress is None and ns.attention_backend != "fairkv":
        ours = [a.option_strings[0] for a in fairkv_parser()._actions if a.dest != "kv_compress"]
        orphan = [f for f in ours if _given(argv, f)]
        if orphan:
            raise UsageError(f"{', '.join(orphan)} need --kv-compress")
    if not _given(out, "--model-path"):
        from .. import embedded_model

        out += ["--model-path", str(embedded_model.prepare())]
    model_path = _value(out, "--model-path")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(model_path).is_dir():
        raise UsageError(
            f"--model-path {model_path}: no such model folder (hub downloads are off; "
            "give a local Hugging Face folder)"
        )
    cfg_json, notes, placement_json = None, (), None
    if fk.kv_compress is not None or ns.attention_backend == "fairkv":
        cfg_json, notes = _fairkv_setup(fk, ns, out, model_path, on_cpu)
        placement_json, plan_notes = _placement_setup(fk, ns, out, model_path)
        notes += plan_notes
    if on_cpu:
        for flag, value in CPU_DEFAULTS:
            if not _given(out, flag):
                out += [flag, value]
    host, port = ns.host, ns.port
    if port_in_use(host, port):
        raise UsageError(f"port {port} on {host} is already in use (choose another with --port)")
    return LaunchConfig(out, on_cpu, model_path, host, port, ns.tp_size, cfg_json, notes, placement_json)


def _fairkv_setup(fk: argparse.Namespace, ns: argparse.Namespace, out: list[str],
                  model_path: str, on_cpu: bool) -> tuple[str, tuple[str, ...]]:
    """Validate the compression flags, adjust SGLang's argv in place; returns (config JSON, notes)."""
    from ..compress.policy import CompressConfig, load_config_head_budgets

    try:
        cfg = CompressConfig(method=fk.kv_compress or "none", budget=fk.kv_budget,
                             ratio=fk.kv_compress_ratio, window=fk.kv_window, kernel=fk.kv_pool_kernel,
                             alpha=fk.kv_alpha, head_budgets=fk.kv_head_budgets)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if ns.attention_backend not in (None, "fairkv"):
        raise UsageError(f"--kv-compress needs --attention-backend fairkv, got {ns.attention_backend}")
    bad = [f for f in FAIRKV_REJECTED_FLAGS if _given(out, f)]
    if (ns.pp_size or 1) > 1:
        bad.append("--pp-size > 1")
    if (ns.dp_size or 1) > 1:
        bad.append("--dp-size > 1")
    if (ns.page_size or 1) > 1:
        bad.append("--page-size > 1 (the ragged pool pages itself: FAIRKV_KV_PAGE_SIZE)")
    flag = "--cuda-graph-backend-prefill"
    if _given(out, flag) and _value(out, flag) != "disabled":
        bad.append(f"{flag} {_value(out, flag)} (fairkv prefill runs eager; decode graphs are supported)")
    eager_decode = on_cpu or os.environ.get("FAIRKV_DECODE_KERNEL", "triton") == "torch"
    flag = "--cuda-graph-backend-decode"
    if eager_decode and _given(out, flag) and _value(out, flag) != "disabled":
        bad.append(f"{flag} {_value(out, flag)} (CUDA-graph decode needs CUDA and the Triton decode kernel)")
    kv_dtype = _value(out, "--kv-cache-dtype")
    if kv_dtype not in (None, "auto", "bf16", "bfloat16"):
        bad.append(f"--kv-cache-dtype {kv_dtype} (the ragged pool and its decode kernel hold fp16 / bf16 / "
                   "fp32 KV; quantized KV is not supported yet)")
    if _given(out, "--cuda-graph-config"):
        bad.append("--cuda-graph-config (fairkv: set decode graphs with --cuda-graph-backend-decode; "
                   "prefill runs eager)")
    if bad:
        raise UsageError(f"cannot be used with a compressed KV cache (--kv-compress): {', '.join(bad)}")
    if cfg.method == "headkv":
        import json

        try:
            mc = json.loads((Path(model_path) / "config.json").read_text())
            load_config_head_budgets(cfg, mc["num_hidden_layers"],
                                     mc.get("num_key_value_heads", mc["num_attention_heads"]))
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--kv-head-budgets {cfg.head_budgets}: {e}") from None
    notes = []
    if not _given(out, "--attention-backend"):
        out += ["--attention-backend", "fairkv"]
    if not _given(out, "--max-running-requests"):
        # the segment page table is [requests, layers, kv_heads, context / page]: SGLang's CPU default
        # of 2048 requests would make it hundreds of MB for SmolLM2
        out += ["--max-running-requests", str(FAIRKV_DEFAULT_MAX_RUNNING)]
        notes.append(f"--max-running-requests {FAIRKV_DEFAULT_MAX_RUNNING}: bounds the segment page "
                     "table (give the flag to change it)")
    forced = FAIRKV_FORCED + ((FAIRKV_FORCED_EAGER_DECODE,) if eager_decode else ())
    for flag_value, why in forced:
        if not _given(out, flag_value[0]):
            out += list(flag_value)
            notes.append(f"{' '.join(flag_value)}: {why}")
    return cfg.to_json(), tuple(notes)


def _placement_setup(fk: argparse.Namespace, ns: argparse.Namespace, out: list[str],
                model_path: str) -> tuple[str | None, tuple[str, ...]]:
    """Resolve ``--fairkv-plan`` (default ``sha`` at TP > 1) against the model's shape and ``--tp-size``;
    returns (plan JSON or None at TP = 1 without a plan, notes)."""
    import json

    from ..placement.schema import PlanError

    spec = fk.fairkv_plan
    if spec is None and ns.tp_size == 1:
        if fk.fairkv_stats is not None:
            raise UsageError("--fairkv-stats needs a placement (--fairkv-plan, or --tp-size > 1): at TP 1 "
                             "there is nothing to balance")
        return None, ()
    spec = spec or "sha"
    try:
        mc = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--fairkv-plan: cannot read {model_path}/config.json: {e}") from None
    from ..model import ARCHITECTURES

    arch = (mc.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise UsageError(f"--fairkv-plan: {arch} has no FairKV model class (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    if _given(out, "--quantization"):
        raise UsageError("--fairkv-plan cannot be used with --quantization (weights are sliced per head)")
    from ..placement.runtime import resolve_plan

    q = mc["num_attention_heads"]
    try:
        plan = resolve_plan(spec, model=model_path, num_layers=mc["num_hidden_layers"],
                            num_kv_heads=mc.get("num_key_value_heads") or q, num_q_heads=q, tp=ns.tp_size,
                            stats_path=fk.fairkv_stats, max_copies_per_layer=fk.fairkv_max_copies_per_layer)
    except PlanError as e:
        raise UsageError(f"--fairkv-plan {spec}: {e}") from None
    copies = sum(plan.copies_per_layer())
    return json.dumps(plan.to_json()), (f"--fairkv-plan {spec}: {plan.strategy} plan, tp={plan.tp}, "
                                        f"{copies} head copies over {plan.num_layers} layers",)


def run(launch: LaunchConfig) -> None:
    """Start SGLang's HTTP server with our scheduler entry; blocks until it exits."""
    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.server_args import prepare_server_args

    from .. import env
    from .hooks import add_backend_choice, apply_hooks, launcher_hooks
    from .worker import run_scheduler_process

    if launch.kv_compress_json is not None:
        env.set_kv_compress_json(launch.kv_compress_json)
        for note in launch.notes:
            print(f"sglang-fairkv: {note}", file=sys.stderr)
    if launch.placement_json is not None:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="fairkv-plan-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(launch.placement_json)
        env.set_plan_path(path)
        # SGLang resolves the architecture from this package first (checked in each scheduler)
        os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "sglang_fairkv.model"
    add_backend_choice()
    # the tokenizer manager runs in this process: bad requests get HTTP 400 before any scheduler
    apply_hooks(launcher_hooks(launch.on_cpu))
    server_args = prepare_server_args(launch.sglang_argv)
    server_args.resolve_once()
    try:
        launch_server(server_args, run_scheduler_process_func=run_scheduler_process)
    finally:
        if launch.placement_json is not None and env.plan_path():
            Path(env.plan_path()).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    on_cpu = not machine.has_cuda()
    if on_cpu:
        tp = _value(argv, "--tp-size") or _value(argv, "--tp") or "1"
        machine.configure_cpu_environment(int(tp) if tp.isdigit() else 1)
    try:
        launch = parse_launch(argv, on_cpu)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from sglang.srt.utils import kill_process_tree

    try:
        run(launch)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
    return 0
