"""Planner speed and the sha/assign/fairkv comparison on synthetic model shapes.

    .venv/bin/python benchmark/plan_speed.py            # prints a markdown table

Times ``build_plan`` (the whole model: every layer solved exactly, copy budget, memory relabel) for
LLaMA-3.3-70B and Mistral-Small-24B shapes, TP 2/4/8, K = 2. Median of 3 runs, one process.
"""

from __future__ import annotations

import statistics
import time

from sglang_fairkv.placement import build_plan, synthetic_stats


def main() -> None:
    print("| shape | tp | K | concentration | sha speedup | assign | fairkv | fairkv busy | fairkv copies | plan time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in ("llama-3.3-70b", "mistral-small-24b"):
        for conc in (1.0, 2.0, 8.0):
            stats = synthetic_stats(shape, budget=1024, concentration=conc, seed=0)
            for tp in (2, 4, 8):
                res = {}
                times = []
                for strategy in ("sha", "assign", "fairkv"):
                    reps = []
                    for _ in range(3 if strategy == "fairkv" else 1):
                        t0 = time.perf_counter()
                        plan, _ = build_plan(stats, tp, strategy, max_copies_per_layer=2)
                        reps.append(time.perf_counter() - t0)
                    res[strategy] = plan.predicted
                    if strategy == "fairkv":
                        times = reps
                base = res["sha"]["attention_time"]
                f = res["fairkv"]
                print(f"| {shape} | {tp} | 2 | {conc} | 1.000 | "
                      f"{base / res['assign']['attention_time']:.3f} | {base / f['attention_time']:.3f} | "
                      f"{f['attention_busy_rate']:.3f} | {f['copies']} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
