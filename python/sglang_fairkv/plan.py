"""``python -m sglang_fairkv.plan``: per-head KV stats -> FairKV placement plan.

Prints a comparison of the three strategies (sha = standard TP, assign = Best-effort Assignment,
fairkv = assignment + Fair-Copying) under one cost model and writes the chosen one. Bad input
(malformed stats, tp < 1, K < 0, shapes that do not fit) prints one line and exits 2.

``--from-server URL --apply [--plan-file PLAN] [--mode drain|migrate] [--dry-run]``: ask a running
server to switch to a plan (``POST /fairkv/replan``): the plan file, or one planned on the server from its
own live profile (``--strategy``, ``--max-copies-per-layer``). Prints the server's answer (with
``--dry-run``: what would move); exit 0 when the server says success, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .placement import (CostModel, StatsError, build_plan, default_cost_model, load_stats)
from .placement.cost import DEFAULT_CALIBRATION_BATCH
from .placement.schema import STRATEGIES

PROG = "python -m sglang_fairkv.plan"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stats", type=Path, help="fairkv-stats/1 JSON file (required unless --from-server)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (required unless --from-server)")
    p.add_argument("--from-server", metavar="URL", default=None,
                   help="a running sglang-fairkv server (with --apply: switch it to a plan)")
    p.add_argument("--apply", action="store_true", help="with --from-server: POST /fairkv/replan")
    p.add_argument("--plan-file", type=Path, default=None,
                   help="with --apply: this plan (default: planned on the server from its live profile)")
    p.add_argument("--mode", choices=("drain", "migrate"), default="migrate", help="with --apply (default migrate)")
    p.add_argument("--dry-run", action="store_true", help="with --apply: report what would move, change nothing")
    p.add_argument("--strategy", choices=STRATEGIES, default="fairkv", help="plan to write (default fairkv)")
    p.add_argument("--max-copies-per-layer", type=int, default=2, metavar="K",
                   help="extra head replicas allowed per layer (fairkv; default 2)")
    p.add_argument("--max-copies-total", type=int, default=None, metavar="N",
                   help="global copy budget, split over layers where it helps most")
    p.add_argument("--max-extra-weight-gb", type=float, default=None, metavar="GB",
                   help="the same budget as weight memory (bf16 Q/K/V/O slices of copied heads, "
                        "summed over the TP group)")
    p.add_argument("--c-head", type=float, default=None, help="cost of one head replica on a rank "
                   "(default: calibrated from the model shape, see --calibration-batch)")
    p.add_argument("--c-token", type=float, default=None, help="cost per kept token (default 1)")
    p.add_argument("--calibration-batch", type=int, default=DEFAULT_CALIBRATION_BATCH,
                   help="batch size the default c_head is calibrated for (default %(default)s)")
    p.add_argument("--objective", choices=("time", "memory"), default="time",
                   help="optimise per-layer attention time (default) or per-layer KV memory")
    p.add_argument("--no-memory-balance", action="store_true",
                   help="do not relabel ranks per layer to balance total KV memory")
    p.add_argument("--out", type=Path, help="plan JSON to write (required unless --from-server)")
    p.add_argument("--plot", type=Path, default=None, help="PNG: per-rank load per layer, sha vs plan")
    return p


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_table(results: dict, sha_time: float | None) -> str:
    head = (f"{'strategy':<8} {'busy':>6} {'min-layer':>9} {'mem-busy':>8} {'copies':>6} "
            f"{'extra-weight':>12} {'attn-time':>12} {'speedup':>8} {'gap':>7}")
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        if isinstance(res, str):
            lines.append(f"{name:<8} n/a: {res}")
            continue
        m = res.predicted
        speed = f"{sha_time / m['attention_time']:.3f}x" if sha_time else "n/a"
        gap = f"{100 * m['optimality_gap']:.2f}%" if "optimality_gap" in m else "-"
        lines.append(f"{name:<8} {m['attention_busy_rate']:>6.3f} {m['min_layer_balance']:>9.3f} "
                     f"{m['memory_busy_rate']:>8.3f} {m['copies']:>6d} "
                     f"{_fmt_bytes(m['extra_weight_bytes']):>12} {m['attention_time']:>12.1f} "
                     f"{speed:>8} {gap:>7}")
    lines.append("busy = attention busy rate: sum of per-layer mean rank time / sum of per-layer max; mem-busy = mean/max "
                 "KV memory per rank over all layers; speedup = sha attention time / plan's; "
                 "gap = vs proven optimum (sha: vs best copy-free placement)")
    return "\n".join(lines)


def plot(path: Path, stats, sha_plan, plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .placement.metrics import rank_time_matrix

    panels = ([("sha (standard TP)", rank_time_matrix(sha_plan, stats))] if sha_plan is not None else []) + \
        [(f"{plan.strategy}", rank_time_matrix(plan, stats))]
    vmax = max(x.max() for _, x in panels)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 6))
    for ax, (title, x) in zip(axes, panels):
        im = ax.imshow(x, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{title}: rank time per layer")
        ax.set_xlabel("TP rank")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[len(panels) - 1], label="cost-model time")
    ax = axes[-1]
    for title, x in panels:
        ax.plot(x.mean(1) / x.max(1), label=title)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("busy rate (mean / max rank time)")
    ax.legend()
    fig.suptitle(f"{stats.model}  tp={plan.tp}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def apply_on_server(args) -> int:
    """``--from-server URL --apply``: POST /fairkv/replan, print the answer."""
    import json

    import requests

    body: dict = {"mode": args.mode, "dry_run": bool(args.dry_run)}
    if args.plan_file is not None:
        body["plan_path"] = str(args.plan_file.resolve())
    else:
        if args.strategy not in ("fairkv", "assign"):
            print(f"{PROG}: error: --strategy must be fairkv or assign to plan from the live profile", file=sys.stderr)
            return 2
        body.update(from_live=True, strategy=args.strategy, max_copies_per_layer=args.max_copies_per_layer)
    try:
        r = requests.post(args.from_server.rstrip("/") + "/fairkv/replan", json=body, timeout=600)
        answer = r.json()
    except (requests.RequestException, ValueError) as e:
        print(f"{PROG}: error: {args.from_server}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=1))
    return 0 if r.status_code == 200 and answer.get("success") else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_server is not None:
        if not args.apply:
            print(f"{PROG}: error: --from-server needs --apply (to profile a server: python -m "
                  "sglang_fairkv.profiler --from-server)", file=sys.stderr)
            return 2
        return apply_on_server(args)
    missing = [f for f, v in (("--stats", args.stats), ("--tp", args.tp), ("--out", args.out)) if v is None]
    if missing:
        print(f"{PROG}: error: the following arguments are required: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        if args.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {args.tp}")
        if args.max_copies_per_layer < 0:
            raise ValueError(f"--max-copies-per-layer must be >= 0, got {args.max_copies_per_layer}")
        for flag, v in (("--max-copies-total", args.max_copies_total),
                        ("--max-extra-weight-gb", args.max_extra_weight_gb)):
            if v is not None and v < 0:
                raise ValueError(f"{flag} must be >= 0, got {v}")
        stats = load_stats(args.stats)
        cost = default_cost_model(stats.group_size, stats.hidden, args.calibration_batch)
        if args.c_head is not None or args.c_token is not None:
            cost = CostModel(c_head=cost.c_head if args.c_head is None else args.c_head,
                             c_token=1.0 if args.c_token is None else args.c_token)
        weight_budget = None if args.max_extra_weight_gb is None else int(args.max_extra_weight_gb * 2**30)
        kw = dict(cost=cost, max_copies_per_layer=args.max_copies_per_layer,
                  max_copies_total=args.max_copies_total, max_extra_weight_bytes=weight_budget,
                  objective=args.objective, balance_memory=not args.no_memory_balance)
        results: dict = {}
        for name in STRATEGIES:
            try:
                results[name] = build_plan(stats, args.tp, name, **kw)[0]
            except ValueError as e:
                if name == args.strategy:
                    raise
                results[name] = str(e)
    except (StatsError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sha = results["sha"] if not isinstance(results["sha"], str) else None
    sha_time = sha.predicted["attention_time"] if sha is not None else None
    print(f"{stats.model}: {stats.num_layers} layers x {stats.num_kv_heads} KV heads, tp={args.tp}, "
          f"cost c_head={cost.c_head:.4g} c_token={cost.c_token:.4g} ({cost.calibration})"
          + ("  [synthetic stats]" if stats.synthetic else ""))
    print(format_table(results, sha_time))
    chosen = results[args.strategy]
    chosen.save(args.out)
    print(f"wrote {args.strategy} plan to {args.out}")
    if args.plot:
        plot(args.plot, stats, sha, chosen)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
