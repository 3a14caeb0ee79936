"""The fairkv flags of ``launch_server``: parsing, the rules they obey, and what they add to SGLang's argv.

Pure apart from reading the model's ``config.json`` and the files the flags name: everything here runs
before SGLang starts, so a bad combination is one line and exit 2, never a traceback from a scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import env

PROG = "python -m sglang_fairkv.launch_server"


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
    g.add_argument("--kv-decode-compress", choices=("snapkv", "adakv"),
                   help="decode-time compression (kvpress DecodingPress): every --kv-decode-interval decode steps "
                        "a request's KV is re-scored with its last --kv-decode-window queries and cut to "
                        "--kv-decode-budget tokens per head (adakv: per layer on average, split by score); with "
                        "or without --kv-compress (which compresses the prompt first)")
    g.add_argument("--kv-decode-budget", type=int, metavar="N",
                   help="tokens kept per KV head at each decode-time compression (kvpress target_size; default 2048)")
    g.add_argument("--kv-decode-interval", type=int, metavar="K",
                   help="decode steps between decode-time compressions (kvpress compression_interval; default 512)")
    g.add_argument("--kv-decode-window", type=int, metavar="W",
                   help="decode queries that score the cache at each decode-time compression (SnapKV window, < K; "
                        "default 32): kept per request on the device, their bytes out of the KV budget")
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
    g.add_argument("--fairkv-auto-replan", type=float, metavar="GAIN",
                   help="re-plan while serving (off by default): when the cost-model gain of a plan made from the "
                        "live profile is at least GAIN (>= 1), the TP group migrates to it by itself (POST "
                        "/fairkv/replan mode migrate), never more often than --fairkv-auto-replan-interval")
    g.add_argument("--fairkv-auto-replan-interval", type=float, default=600.0, metavar="S",
                   help="seconds between automatic re-plans at least (from the start or the last switch; default 600)")
    g.add_argument("--fairkv-auto-replan-min-samples", type=int, default=64, metavar="N",
                   help="compressed prompts profiled before an automatic re-plan is considered (default 64)")
    g.add_argument("--fairkv-replan-head-slots", type=int, metavar="N",
                   help="KV head slots per layer each rank's pool reserves for plans switched to later (POST "
                        "/fairkv/replan): the page table's width, fixed at start (default: the start plan's most "
                        "heads on a rank; with --fairkv-auto-replan twice that, at most the model's KV heads)")
    g.add_argument("--fairkv-prefix-tier", type=float, default=1.0, metavar="F",
                   help="the dense prefix tier (prefix caching with --kv-compress): the most of each rank's KV "
                        "pages cached prompts' dense KV may keep, in [0, 1]; evicted (LRU) before any request "
                        "waits; 0 turns prefix caching off (as does --disable-radix-cache). Default 1")
    g.add_argument("--constrained-json-any-whitespace", action="store_true",
                   help="keep SGLang's JSON grammar that allows any whitespace (with --kv-compress the default "
                        "is --constrained-json-disable-any-whitespace: on a compressed prompt a small model can "
                        "loop on whitespace until max_tokens)")


def fairkv_parser() -> argparse.ArgumentParser:
    """Only the project's flags (``parse_known_args`` splits them from SGLang's)."""
    p = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    add_fairkv_args(p)
    return p


def given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def drop(argv: list[str], flag: str) -> None:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``argv`` in place (a flag of ours, not SGLang's)."""
    for i, a in enumerate(argv):
        if a == flag:
            del argv[i:i + 2]
            return
        if a.startswith(flag + "="):
            del argv[i]
            return


def model_config(model_path: str) -> dict:
    """The model folder's ``config.json`` (UsageError when it cannot be read)."""
    try:
        return json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {model_path}/config.json: {e}") from None


def decode_orphans(argv: list[str], fk: argparse.Namespace) -> None:
    """The decode-time sizes need ``--kv-decode-compress`` (one line, exit 2)."""
    orphan = [f for f in ("--kv-decode-budget", "--kv-decode-interval", "--kv-decode-window") if given(argv, f)]
    if orphan and fk.kv_decode_compress is None:
        raise UsageError(f"{', '.join(orphan)} need --kv-decode-compress snapkv|adakv")


def decode_note(cfg) -> str:
    """What decode-time compression does with these settings, and how it meets the prompt's compression."""
    first = (f"the prompt is compressed first (--kv-compress {cfg.method}: what each head keeps of it), then "
             if cfg.enabled else "the prompt is kept whole (no --kv-compress), then ")
    split = " on average (AdaKV split per layer)" if cfg.decode_method == "adakv" else ""
    return (f"--kv-decode-compress {cfg.decode_method}: {first}every {cfg.decode_interval} decode steps prompt + "
            f"answer so far are re-scored with the last {cfg.decode_window} decode queries and cut to "
            f"{cfg.decode_budget} tokens per head{split}; "
            f"a request is charged at most about {cfg.decode_budget} + {cfg.decode_interval} rows per head, not "
            "prompt + max_new_tokens")


def fairkv_setup(fk: argparse.Namespace, ns: argparse.Namespace, out: list[str], model_path: str, mc: dict,
                 on_cpu: bool) -> tuple[object, tuple[str, ...], tuple[str, ...]]:
    """Validate the compression flags, adjust SGLang's argv in place; returns (``CompressConfig``, notes,
    warnings). A method that needs a budget and got none runs at ``DEFAULT_RATIO`` (noted)."""
    from ..compress.policy import DEFAULT_RATIO, CompressConfig, check_against_context, load_config_head_budgets

    notes = []
    ratio = fk.kv_compress_ratio
    if fk.kv_compress in ("snapkv", "adakv", "pyramidkv") and fk.kv_budget is None and ratio is None:
        ratio = DEFAULT_RATIO
        notes.append(f"--kv-compress-ratio {DEFAULT_RATIO}: the default for --kv-compress {fk.kv_compress} "
                     "(give --kv-budget N or --kv-compress-ratio R to change it)")
    decode = {}
    if fk.kv_decode_compress is not None:
        decode = {"decode_method": fk.kv_decode_compress}
        for key in ("budget", "interval", "window"):
            if getattr(fk, f"kv_decode_{key}") is not None:
                decode[f"decode_{key}"] = getattr(fk, f"kv_decode_{key}")
    try:
        cfg = CompressConfig(method=fk.kv_compress or "none", budget=fk.kv_budget,
                             ratio=ratio, window=fk.kv_window, kernel=fk.kv_pool_kernel,
                             alpha=fk.kv_alpha, head_budgets=fk.kv_head_budgets, **decode)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.decode_enabled:
        notes.append(decode_note(cfg))
    from ..attention.capabilities import unsupported_features

    missing = unsupported_features(mc)
    if missing:
        raise UsageError(f"--kv-compress: the fairkv attention backend does not implement {', '.join(missing)} "
                         f"of {Path(model_path).name}; serve it without --kv-compress")
    if os.environ.get("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "0").lower() in ("1", "true", "yes"):
        raise UsageError("--kv-compress cannot be used with SGLANG_ENABLE_METADATA_GLUE_GRAPH=1: that graph would "
                         "capture the backend's host-side page bookkeeping, and host and device page tables "
                         "would drift apart; unset it")
    ctx = value(out, "--context-length")
    context_len = int(ctx) if ctx and ctx.isdigit() else int(mc.get("max_position_embeddings") or 0)
    try:
        warnings = tuple(check_against_context(cfg, context_len)) if context_len else ()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if ns.attention_backend not in (None, "fairkv"):
        raise UsageError(f"--kv-compress needs --attention-backend fairkv, got {ns.attention_backend}")
    bad = [f for f in FAIRKV_REJECTED_FLAGS if given(out, f)]
    if (ns.pp_size or 1) > 1:
        bad.append("--pp-size > 1")
    if (ns.page_size or 1) > 1:
        bad.append("--page-size > 1 (the ragged pool pages itself: FAIRKV_KV_PAGE_SIZE)")
    flag = "--cuda-graph-backend-prefill"
    if given(out, flag) and value(out, flag) != "disabled":
        bad.append(f"{flag} {value(out, flag)} (fairkv prefill runs eager; decode graphs are supported)")
    eager_decode = on_cpu or os.environ.get("FAIRKV_DECODE_KERNEL", "triton") == "torch"
    flag = "--cuda-graph-backend-decode"
    if eager_decode and given(out, flag) and value(out, flag) != "disabled":
        bad.append(f"{flag} {value(out, flag)} (CUDA-graph decode needs CUDA and the Triton decode kernel)")
    kv_dtype = value(out, "--kv-cache-dtype")
    fk.kv_store_dtype = None
    if kv_dtype in env.KV_STORE_DTYPES:  # ours: SGLang sizes and builds nothing in fp8 (its CPU path needs AMX)
        drop(out, "--kv-cache-dtype")
        fk.kv_store_dtype = kv_dtype
        notes.append(f"--kv-cache-dtype {kv_dtype}: the ragged pool stores K/V rows in fp8 (per-layer scales "
                     "from the checkpoint, else 1.0) in the KV bytes SGLang sizes for the model dtype: the same "
                     "memory holds 2x the rows of bf16, 4x of fp32")
    elif kv_dtype not in (None, "auto", "bf16", "bfloat16"):
        bad.append(f"--kv-cache-dtype {kv_dtype} (the ragged pool holds the model dtype, or fp8: "
                   f"{' / '.join(env.KV_STORE_DTYPES)})")
    if given(out, "--cuda-graph-config"):
        bad.append("--cuda-graph-config (fairkv: set decode graphs with --cuda-graph-backend-decode; "
                   "prefill runs eager)")
    if bad:
        raise UsageError(f"cannot be used with a compressed KV cache (--kv-compress): {', '.join(bad)}")
    if cfg.method == "headkv":
        try:
            load_config_head_budgets(cfg, mc["num_hidden_layers"],
                                     mc.get("num_key_value_heads", mc["num_attention_heads"]))
        except (OSError, KeyError, ValueError) as e:
            raise UsageError(f"--kv-head-budgets {cfg.head_budgets}: {e}") from None
    if not given(out, "--attention-backend"):
        out += ["--attention-backend", "fairkv"]
    if not given(out, "--max-running-requests"):
        # the segment page table is [requests, layers, kv_heads, context / page]: SGLang's CPU default
        # of 2048 requests would make it hundreds of MB for SmolLM2
        out += ["--max-running-requests", str(FAIRKV_DEFAULT_MAX_RUNNING)]
        notes.append(f"--max-running-requests {FAIRKV_DEFAULT_MAX_RUNNING}: bounds the segment page "
                     "table (give the flag to change it)")
    tier = fk.fairkv_prefix_tier
    if not 0.0 <= tier <= 1.0:
        raise UsageError(f"--fairkv-prefix-tier must be in [0, 1], got {tier}")
    if given(out, "--radix-cache-backend") and value(out, "--radix-cache-backend") != "fairkv":
        raise UsageError(f"--radix-cache-backend {value(out, '--radix-cache-backend')} cannot hold a compressed "
                         "server's prefixes (its dense prefix tier is --radix-cache-backend fairkv)")
    if given(out, "--disable-radix-cache") or tier == 0.0:
        cfg_tier = 0.0
        if not given(out, "--disable-radix-cache"):
            out += ["--disable-radix-cache"]
        notes.append("prefix caching off (--disable-radix-cache / --fairkv-prefix-tier 0)")
    else:
        cfg_tier = tier
        if not given(out, "--radix-cache-backend"):
            out += ["--radix-cache-backend", "fairkv"]
        notes.append(f"--fairkv-prefix-tier {tier:g}: prompts' dense KV stays cached in up to {tier:.0%} of the "
                     "KV pages (radix tree, LRU, evicted before a request waits); --fairkv-prefix-tier 0 or "
                     "--disable-radix-cache turn it off")
    fk.prefix_tier_effective = cfg_tier  # the launcher hands it to the schedulers (FAIRKV_PREFIX_TIER)
    ws_flag = "--constrained-json-disable-any-whitespace"
    if cfg.enabled and not fk.constrained_json_any_whitespace and not given(out, ws_flag):
        out.append(ws_flag)
        notes.append(f"{ws_flag}: JSON outputs (response_format, json_schema) without free whitespace -- on a "
                     "compressed prompt a small model can loop on whitespace until max_tokens (truncated JSON, "
                     "no error); --constrained-json-any-whitespace keeps SGLang's grammar")
    elif fk.constrained_json_any_whitespace and given(out, ws_flag):
        raise UsageError(f"{ws_flag} and --constrained-json-any-whitespace contradict each other")
    forced = FAIRKV_FORCED + ((FAIRKV_FORCED_EAGER_DECODE,) if eager_decode else ())
    for flag_value, why in forced:
        if not given(out, flag_value[0]):
            out += list(flag_value)
            notes.append(f"{' '.join(flag_value)}: {why}")
    return cfg, tuple(notes), warnings


def placement_setup(fk: argparse.Namespace, ns: argparse.Namespace, out: list[str], model_path: str, mc: dict,
                    cfg) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """Resolve ``--fairkv-plan`` (default ``sha`` at TP > 1) against the model's shape and ``--tp-size``;
    returns (plan JSON or None at TP = 1 without a plan, notes, warnings). The note names the plan and
    the KV heads each rank holds; stats measured with another method or budget than ``cfg`` (the
    run's ``CompressConfig``) are warned about (another model shape is refused)."""
    from ..placement.schema import PlanError

    from ..model import ARCHITECTURES, OWN_CLASS_AT_TP1

    spec = fk.fairkv_plan
    arch = (mc.get("architectures") or ["?"])[0]
    own_at_tp1 = spec is None and ns.tp_size == 1 and arch in OWN_CLASS_AT_TP1
    if spec is None and ns.tp_size == 1 and not own_at_tp1:
        if fk.fairkv_stats is not None:
            raise UsageError("--fairkv-stats needs a placement (--fairkv-plan, or --tp-size > 1): at TP 1 "
                             "there is nothing to balance")
        return None, (), ()
    spec = spec or "sha"
    if arch not in ARCHITECTURES:
        raise UsageError(f"--fairkv-plan: {arch} has no FairKV model class (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    if given(out, "--quantization"):
        raise UsageError("--fairkv-plan cannot be used with --quantization (weights are sliced per head)")
    from ..placement.runtime import RankPlan, resolve_plan, stats_mismatch
    from ..placement.stats import load_stats

    q = mc["num_attention_heads"]
    head_dim = mc.get("head_dim") or mc["hidden_size"] // q
    try:
        plan = resolve_plan(spec, model=model_path, num_layers=mc["num_hidden_layers"],
                            num_kv_heads=mc.get("num_key_value_heads") or q, num_q_heads=q, tp=ns.tp_size,
                            stats_path=fk.fairkv_stats, max_copies_per_layer=fk.fairkv_max_copies_per_layer,
                            head_dim=head_dim)
    except PlanError as e:
        raise UsageError(f"--fairkv-plan {spec}: {e}") from None
    warnings = ()
    if fk.fairkv_stats is not None and cfg.enabled:
        why = stats_mismatch(load_stats(fk.fairkv_stats), method=cfg.method, budget=cfg.budget, ratio=cfg.ratio)
        if why:
            warnings = (f"--fairkv-stats {fk.fairkv_stats} may not describe this server's load: {'; '.join(why)}. "
                        "A plan balances the load it was made for: profile this traffic (python -m "
                        "sglang_fairkv.profiler) and plan from that",)
    copies = sum(plan.copies_per_layer())
    per_layer = [RankPlan(plan, r, q).heads_per_layer() for r in range(plan.tp)]  # [rank][layer]
    if all(len(set(h)) == 1 for h in per_layer):
        heads = f"KV heads per rank in every layer {[h[0] for h in per_layer]}"
    else:
        heads = f"KV heads per rank summed over the {plan.num_layers} layers {[sum(h) for h in per_layer]}"
    if own_at_tp1:
        default = (f" ({arch} at TP 1: the FairKV model class with every head on rank 0, since SGLang's own "
                   "class writes K/V around the backend on GPU)")
    else:
        default = "" if fk.fairkv_plan else " (the default at --tp-size > 1)"
    note = (f"--fairkv-plan {spec}: {plan.strategy} plan, tp={plan.tp}, {copies} head copies over "
            f"{plan.num_layers} layers; {heads}" + default)
    return json.dumps(plan.to_json()), (note,), warnings


def replan_setup(fk: argparse.Namespace, ns: argparse.Namespace, cfg, placement_json: str | None
                 ) -> tuple[tuple[float, float, int] | None, int | None, tuple[str, ...]]:
    """``--fairkv-auto-replan*`` and ``--fairkv-replan-head-slots``: (gain, interval s, min samples) for the
    schedulers or None, the head slots to reserve or None, and notes."""
    gain, slots, notes = fk.fairkv_auto_replan, fk.fairkv_replan_head_slots, []
    if gain is None and slots is None:
        return None, None, ()
    if placement_json is None or ns.tp_size < 2:
        flag = "--fairkv-auto-replan" if gain is not None else "--fairkv-replan-head-slots"
        raise UsageError(f"{flag} needs --tp-size > 1 (a FairKV placement to re-plan)")
    from ..placement.runtime import RankPlan
    from ..placement.schema import plan_from_json

    plan = plan_from_json(json.loads(placement_json))
    most = max(RankPlan(plan, q, plan.num_q_heads or plan.num_kv_heads).max_local_heads for q in range(plan.tp))
    if slots is not None and not 1 <= slots <= plan.num_kv_heads:
        raise UsageError(f"--fairkv-replan-head-slots must be in [1, {plan.num_kv_heads}] (the model's KV heads), "
                         f"got {slots}")
    auto = None
    if gain is not None:
        if not gain >= 1.0:
            raise UsageError(f"--fairkv-auto-replan must be a gain >= 1 (1.1: switch when a fresh plan is 10% "
                             f"faster in attention), got {gain:g}")
        if cfg is None or not cfg.enabled:
            raise UsageError("--fairkv-auto-replan needs --kv-compress (the live profile it plans from is the "
                             "kept tokens per head)")
        if not fk.fairkv_auto_replan_interval >= 0 or fk.fairkv_auto_replan_min_samples < 1:
            raise UsageError("--fairkv-auto-replan-interval must be >= 0 and --fairkv-auto-replan-min-samples >= 1")
        if slots is None:
            slots = min(plan.num_kv_heads, 2 * most)
        auto = (float(gain), float(fk.fairkv_auto_replan_interval), int(fk.fairkv_auto_replan_min_samples))
        notes.append(f"--fairkv-auto-replan {gain:g}: the group migrates to a plan made from the live profile when "
                     f"its cost-model gain is >= {gain:g} (>= {fk.fairkv_auto_replan_min_samples} prompts profiled, "
                     f"at most every {fk.fairkv_auto_replan_interval:g} s)")
    if slots is not None and slots > most:
        notes.append(f"--fairkv-replan-head-slots {slots}: each rank's page table has {slots} KV head slots per "
                     f"layer (the start plan needs {most}), so a later plan may put up to {slots} heads of a "
                     "layer on a rank")
    return auto, slots, tuple(notes)
