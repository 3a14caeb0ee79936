"""FairKV plans through the engine at TP > 1: sha vs assign vs fairkv at equal compression and pool.

For each plan: start ``python -m sglang_fairkv.launch_server --tp-size N --fairkv-plan ...`` with the
same ``--kv-compress`` setting, ``--max-total-tokens`` (so the same KV bytes per rank) and
``--max-running-requests``; run ``sglang.benchmark.serving`` (random-ids prompts, concurrency above
what fits); poll ``/server_info`` during the run for every rank's KV rows in use, the realised memory busy
rate (mean rank rows / max rank rows, from the TP group's ledger) and the attention busy rate (per layer
each rank's rows read in a decode step; sum over layers of the mean rank / sum of the slowest rank); take the most requests holding KV at once
(sampled, and the largest ``#running-req`` SGLang logged for a decode batch). Writes a Markdown table (stdout and ``--out-dir/results.md``) and
``--out-dir/tp_plans.png`` (throughput, TTFT/TPOT, per-rank KV, busy rate).

Plans: ``sha`` is the standard contiguous split; when the KV heads do not divide evenly over the TP
ranks (SmolLM2: 3 heads at TP 2) it is the contiguous split with the remainder on the first ranks
(2 + 1 -- the layout SGLang's CPU head padding produces). ``assign`` / ``fairkv`` are computed at
start-up from ``--stats`` (a ``fairkv-stats/1`` file, e.g. from ``python -m sglang_fairkv.profiler``);
``assign@live`` / ``fairkv@live`` from the stats of the *served* prompts: the live profile of the first
run (``python -m sglang_fairkv.profiler --from-server`` at its end, written to
``--out-dir/live-stats-tp<N>.json``), i.e. stats profiled on the same kind of prompts the benchmark
serves, where ``--stats`` may come from other prompts (the default: real text vs random ids).

Balance, from ``/server_info`` at the end of each run (``FAIRKV_BALANCE_SAMPLE_STEPS=1``: every decode
step sampled): the attention busy rate since start (per layer, the rank loads of the decode step;
sum over steps and layers of the mean rank / of the slowest rank -- the time balance), next to the
memory busy rate (rank rows summed over layers); the plan's share drift against the stats it was made
from (``sha`` gets ``--stats`` as its reference) and the cost-model gain of re-planning on the live
shares.

    .venv/bin/python benchmark/tp_plans.py [--tp 2] [--stats benchmark/calibration/smollm2-adakv-r0.75.json]
        [--kv-compress adakv --ratio 0.75] [--num-prompts 48] [--input-len 1000] [--output-len 32]
        [--concurrency 48] [--max-total-tokens 6000] [--out-dir benchmark/out/tp_plans]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmark"))  # its sibling capacity.py
from capacity import bench_serving, max_running  # noqa: E402

from sglang_fairkv.placement.balance import busy_rate  # noqa: E402
from sglang_fairkv.server_process import ServerProcess  # noqa: E402


class Poller(threading.Thread):
    """Samples every rank's KV rows and the busy rate from /server_info while the benchmark runs."""

    def __init__(self, server: ServerProcess, period: float = 0.5):
        super().__init__(daemon=True)
        self.server, self.period, self.samples, self.stop = server, period, [], threading.Event()
        self.max_admitted = 0
        self.attention = []  # the step's per-layer busy rate (sum of mean / sum of max rank loads)

    def run(self):
        while not self.stop.is_set():
            try:
                fk = self.server.fairkv_info(timeout=10)
                rows = [r["rows_in_use"] for r in fk["ranks"]]
                self.max_admitted = max(self.max_admitted, fk["requests_admitted"])
                if max(rows) > 0:
                    self.samples.append(rows)
                    self.attention.append(fk["attention_busy_rate"])
            except (OSError, KeyError, ValueError):  # the server busy or starting: sample later
                pass
            self.stop.wait(self.period)


def run_one(name: str, plan_args: list[str], a, live_stats_out: Path | None = None) -> dict:
    args = ["--tp-size", str(a.tp), "--kv-compress", a.kv_compress, "--kv-compress-ratio", str(a.ratio),
            *plan_args, "--max-total-tokens", str(a.max_total_tokens), "--max-running-requests", "128"]
    if a.model_path:
        args += ["--model-path", a.model_path]
    env = {"FAIRKV_BALANCE_SAMPLE_STEPS": "1", "FAIRKV_DRIFT_INTERVAL_S": "0"}
    with ServerProcess(args, env={**os.environ, **env}, startup_timeout=600) as s:
        cap = s.fairkv_info()["group_token_capacity"]
        poll = Poller(s)
        poll.start()
        t0 = time.time()
        try:
            r = bench_serving(s.port, a)
        finally:
            poll.stop.set()
            poll.join()
        fk = s.fairkv_info(timeout=120)
        if live_stats_out is not None:
            from sglang_fairkv.profiler import stats_from_server

            stats_from_server(s.url, min_samples=1).save(live_stats_out)
        log = s.log_text()
        copies = re.search(r"fairkv-plan \S+: \w+ plan, tp=\d+, (\d+) head copies", log)
    rows = np.array(poll.samples, dtype=float) if poll.samples else np.zeros((1, a.tp))
    memory_busy = [busy_rate(r) for r in rows]  # each sample: KV rows per rank over all layers
    return {"plan": name, "completed": r["completed"], "max_running": max(max_running(log), poll.max_admitted),
            "capacity_tokens": cap, "copies": int(copies.group(1)) if copies else 0,
            "req_s": r["request_throughput"], "out_tok_s": r["output_throughput"],
            "ttft_ms": r["mean_ttft_ms"], "tpot_ms": r["mean_tpot_ms"], "wall_s": time.time() - t0,
            "peak_rows_per_rank": rows.max(0).tolist(), "mean_rows_per_rank": rows.mean(0).tolist(),
            "memory_busy_rate_mean": float(np.mean(memory_busy)),
            "attention_busy_rate_mean": float(np.mean(poll.attention)) if poll.attention else 1.0,
            "attention_busy_rate_since_start": fk["attention_busy_rate_since_start"],
            "balance_samples": fk["balance_samples"], "memory_busy_rate_idle": fk["memory_busy_rate"],
            "share_drift": (fk["plan_drift"] or {}).get("share_drift"),
            "replan_gain": (fk["plan_drift"] or {}).get("replan_gain"),
            "live_prompts": (fk["live_profile"] or {}).get("samples", 0)}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["plan"] for r in rows]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    ax[0].bar(names, [r["out_tok_s"] for r in rows])
    ax[0].set_title("output tokens/s")
    x = np.arange(len(rows))
    ax[1].bar(x - 0.2, [r["ttft_ms"] for r in rows], 0.4, label="mean TTFT")
    ax[1].bar(x + 0.2, [r["tpot_ms"] for r in rows], 0.4, label="mean TPOT")
    ax[1].set_xticks(x, names)
    ax[1].set_title("latency (ms)")
    ax[1].legend()
    tp = len(rows[0]["peak_rows_per_rank"])
    for q in range(tp):
        ax[2].bar(x + (q - (tp - 1) / 2) * 0.8 / tp, [r["peak_rows_per_rank"][q] for r in rows], 0.8 / tp,
                  label=f"rank {q}")
    ax[2].set_xticks(x, names)
    ax[2].set_title("peak KV rows in use per rank")
    ax[2].legend()
    ax[3].bar(names, [r["memory_busy_rate_mean"] for r in rows])
    ax[3].set_ylim(0, 1.05)
    ax[3].set_title("realised busy rate (mean / max rank KV)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    p.add_argument("--stats", default=str(REPO / "benchmark" / "calibration" / "smollm2-adakv-r0.75.json"))
    p.add_argument("--kv-compress", default="adakv")
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--max-copies-per-layer", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--max-total-tokens", type=int, default=6000)
    p.add_argument("--plans", nargs="*", default=["sha", "assign", "fairkv", "assign@live", "fairkv@live"],
                   help="the first run's live profile is the @live plans' stats")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmark" / "out" / "tp_plans")
    a = p.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    live = a.out_dir / f"live-stats-tp{a.tp}.json"

    def plan_args(name: str) -> list[str]:
        kind, _, src = name.partition("@")
        stats_file = str(live) if src == "live" else a.stats
        if kind == "sha":  # the stats are its drift reference only
            return ["--fairkv-plan", "sha", "--fairkv-stats", stats_file]  # contiguous, 2 + 1 for 3 heads at TP 2
        extra = ["--fairkv-max-copies-per-layer", str(a.max_copies_per_layer)] if kind == "fairkv" else []
        return ["--fairkv-plan", kind, "--fairkv-stats", stats_file, *extra]

    rows = []
    for i, name in enumerate(a.plans):
        rows.append(run_one(name, plan_args(name), a, live_stats_out=live if i == 0 else None))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    head = (f"TP={a.tp}, {a.kv_compress} ratio {a.ratio}, {a.num_prompts} prompts x {a.input_len} in / "
            f"{a.output_len} out, concurrency {a.concurrency}, --max-total-tokens {a.max_total_tokens} "
            f"(same KV bytes per rank), plans from {Path(a.stats).name} (@live: the first run's live profile)")
    lines = [head, "",
             "| plan | copies | capacity (prompt tokens) | max running | completed | req/s | out tok/s | "
             f"vs {base['plan']} | mean TTFT ms | mean TPOT ms | peak KV rows per rank | memory busy rate | "
             "attention busy rate (polled) | attention busy rate (every decode step) | share drift vs its stats "
             "| re-plan gain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['copies']} | {r['capacity_tokens']} | {r['max_running']} | "
                     f"{r['completed']}/{a.num_prompts} | {r['req_s']:.3f} | {r['out_tok_s']:.2f} | "
                     f"{r['out_tok_s'] / base['out_tok_s']:.2f}x | {r['ttft_ms']:.0f} | {r['tpot_ms']:.0f} | "
                     f"{' / '.join(str(int(x)) for x in r['peak_rows_per_rank'])} | {r['memory_busy_rate_mean']:.3f} | "
                     f"{r['attention_busy_rate_mean']:.3f} | {r['attention_busy_rate_since_start']:.3f} | "
                     f"{_f(r['share_drift'])} | {_f(r['replan_gain'])} |")
    text = "\n".join(lines)
    print("\n" + text)
    (a.out_dir / "results.md").write_text(text + "\n")
    (a.out_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, a.out_dir / "tp_plans.png", head[:120])
    print(f"wrote {a.out_dir}/results.md, results.json, tp_plans.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
