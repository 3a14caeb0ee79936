"""Simulated throughput of sha / assign / fairkv plans on LLaMA-3.3-70B and Mistral-Small-24B shapes.

    .venv/bin/python benchmark/simulate.py [--out benchmark/out]    # markdown tables + PNG

SIMULATED, not measured: ``sglang_fairkv.simulator`` with the H200 calibration
(``benchmark/calibration/h200-2026-11-26.json``; attention fitted on the SHA/LPT emulation rows,
all-reduce assumed). Per-head stats are synthetic (Dirichlet head split per layer, labelled), at
several skews. Plans use the planner's cost model calibrated to the same measurements at sha's batch
(``simulator.plan_calibrated``); each plan runs at the largest batch its per-rank KV memory allows
(cap 2048).
Tables: (a) throughput gain over sha vs budget and TP, (b) ablation sha / assign / fairkv,
(c) busy rate and gain vs copies per layer, (d) gain vs skew, (e) SmolLM2's measured AdaKV head
skew mapped onto the large shapes, (f) DP replicas (2 x TP 8) serving different traffic: sha, one plan
from the pooled stats, a plan per replica from its own stats.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sglang_fairkv.placement import build_plan, load_stats, synthetic_stats
from sglang_fairkv.placement.stats import map_to_shape
from sglang_fairkv.simulator import Calibration, max_batch, plan_calibrated, predict_throughput

CAL = Path(__file__).resolve().parent / "calibration" / "h200-2026-11-26.json"
#: Real AdaKV (ratio 0.75) kept-token stats of SmolLM2 on 6 long-context prompts (offline_stats).
SMOL = Path(__file__).resolve().parent / "calibration" / "smollm2-adakv-r0.75.json"
SHAPES = ("llama-3.3-70b", "mistral-small-24b")


def run(cal, shape, tp, budget, conc, strategy, k=2, seed=0, stats=None):
    """Plan with the cost model calibrated at sha's batch, then simulate at the plan's max batch."""
    stats = stats or synthetic_stats(shape, budget=budget, concentration=conc, seed=seed)
    sha, _ = build_plan(stats, tp, "sha")
    b0 = max_batch(sha, stats, shape, cal)
    if b0 < 1:
        return None
    plan = plan_calibrated(stats, shape, tp, strategy, cal, b0, max_copies_per_layer=k)
    b = max_batch(plan, stats, shape, cal)
    if b < 1:
        return None
    return predict_throughput(plan, stats, shape, cal, b)


def dp_group(cal, shape, tp, budget, seeds=(11, 12), conc=0.3):
    """DP 2 x TP ``tp``: replica i's traffic has its own skew (seed i). Returns (sha, one plan from the
    pooled stats for both, a plan per replica from its own stats) as GroupPredictions, or None."""
    from dataclasses import replace

    import numpy as np

    from sglang_fairkv.simulator import predict_replicas

    stats = [synthetic_stats(shape, budget=budget, concentration=conc, seed=s) for s in seeds]
    pooled = replace(stats[0], kv_len_mean=np.mean([np.asarray(s.kv_len_mean) for s in stats], axis=0))
    sha = build_plan(stats[0], tp, "sha")[0]
    b0 = max_batch(sha, stats[0], shape, cal)
    if b0 < 1:
        return None
    one = plan_calibrated(pooled, shape, tp, "fairkv", cal, b0, max_copies_per_layer=2)
    own = [plan_calibrated(s, shape, tp, "fairkv", cal, b0, max_copies_per_layer=2) for s in stats]
    return (predict_replicas([(sha, s) for s in stats], shape, cal),
            predict_replicas([(one, s) for s in stats], shape, cal),
            predict_replicas(list(zip(own, stats)), shape, cal))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--concentration", type=float, default=1.0)
    a = ap.parse_args()
    cal = Calibration.load(CAL)
    print(f"calibration: {cal.device}; attention fit {cal.attention}; all-reduce assumed "
          f"{cal.allreduce_latency_us} us + {cal.allreduce_GBps} GB/s")
    print(f"\n(a)+(b) decode throughput (tok/s, simulated) at max batch; Dirichlet concentration {a.concentration}, K=2")
    print("| shape | tp | budget | sha tok/s (batch) | assign gain | fairkv gain | fairkv batch |")
    print("|---|---|---|---|---|---|---|")
    rows_a = []
    for shape in SHAPES:
        for tp in (2, 4, 8):
            for budget in (128, 512, 1024, 2048):
                res = {s: run(cal, shape, tp, budget, a.concentration, s) for s in ("sha", "assign", "fairkv")}
                if res["sha"] is None:
                    print(f"| {shape} | {tp} | {budget} | does not fit | | | |")
                    continue
                base = res["sha"].tokens_per_s
                ga, gf = res["assign"].tokens_per_s / base, res["fairkv"].tokens_per_s / base
                rows_a.append((shape, tp, budget, ga, gf))
                print(f"| {shape} | {tp} | {budget} | {base:.0f} ({res['sha'].batch}) | {ga:.3f}x | "
                      f"{gf:.3f}x | {res['fairkv'].batch} |")
    print("\n(c) copies per layer vs busy rate and gain (llama-3.3-70b, tp 8, budget 1024)")
    print("| K | busy rate | gain over sha |")
    print("|---|---|---|")
    base = run(cal, "llama-3.3-70b", 8, 1024, a.concentration, "sha").tokens_per_s
    for k in range(0, 5):
        r = run(cal, "llama-3.3-70b", 8, 1024, a.concentration, "fairkv", k=k)
        print(f"| {k} | {r.attention_busy_rate:.3f} | {r.tokens_per_s / base:.3f}x |")
    print("\n(d) gain vs skew (llama-3.3-70b, budget 1024, K=2)")
    print("| concentration | tp 4 assign | tp 4 fairkv | tp 8 fairkv |")
    print("|---|---|---|---|")
    skew = []
    for conc in (0.3, 0.5, 1.0, 2.0, 4.0, 16.0):
        g = {}
        for tp in (4, 8):
            base = run(cal, "llama-3.3-70b", tp, 1024, conc, "sha").tokens_per_s
            g[tp, "assign"] = run(cal, "llama-3.3-70b", tp, 1024, conc, "assign").tokens_per_s / base
            g[tp, "fairkv"] = run(cal, "llama-3.3-70b", tp, 1024, conc, "fairkv").tokens_per_s / base
        skew.append((conc, g))
        print(f"| {conc} | {g[4, 'assign']:.3f}x | {g[4, 'fairkv']:.3f}x | {g[8, 'fairkv']:.3f}x |")
    print("\n(e) SmolLM2's measured AdaKV head skew mapped onto the large shapes (map_to_shape), K=2")
    print("| shape | tp | budget | assign gain | fairkv gain | fairkv busy |")
    print("|---|---|---|---|---|---|")
    smol = load_stats(SMOL)
    for shape in SHAPES:
        for tp in (2, 4, 8):
            for budget in (512, 2048):
                st = map_to_shape(smol, shape, budget, seed=0)
                res = {x: run(cal, shape, tp, budget, None, x, stats=st) for x in ("sha", "assign", "fairkv")}
                base = res["sha"].tokens_per_s
                print(f"| {shape} | {tp} | {budget} | {res['assign'].tokens_per_s / base:.3f}x | "
                      f"{res['fairkv'].tokens_per_s / base:.3f}x | {res['fairkv'].attention_busy_rate:.3f} |")
    print("\n(f) DP replicas behind a router (2 x TP 8 = 16 GPUs): each replica serves its own traffic "
          "(its own per-head skew); SIMULATED")
    print("| shape | budget | sha group tok/s | one pooled fairkv plan | a fairkv plan per replica | "
          "per replica (own plans) |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for budget in (512, 2048):
            group = dp_group(cal, shape, 8, budget)
            if group is None:
                continue
            sha, one, own = group
            print(f"| {shape} | {budget} | {sha.tokens_per_s:.0f} | {one.tokens_per_s / sha.tokens_per_s:.3f}x | "
                  f"{own.tokens_per_s / sha.tokens_per_s:.3f}x | "
                  f"{', '.join(f'{t:.0f}' for t in own.per_replica_tokens_per_s)} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a.out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [c for c, _ in skew]
        for key, label in (((4, "assign"), "tp4 assign"), ((4, "fairkv"), "tp4 fairkv"),
                           ((8, "fairkv"), "tp8 fairkv")):
            ax.plot(xs, [g[key] for _, g in skew], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("Dirichlet concentration (small = skewed heads)")
        ax.set_ylabel("simulated throughput gain over sha")
        ax.set_title("LLaMA-3.3-70B shape, budget 1024, H200 calibration (simulated)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out / "gain_vs_skew.png", dpi=90)
        print(f"\nwrote {a.out / 'gain_vs_skew.png'}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
