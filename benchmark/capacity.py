"""Capacity and throughput of the ragged pool on CPU: how many requests run at once at a fixed
``--max-total-tokens``, with and without per-head compression.

For each configuration: start ``python -m sglang_fairkv.launch_server`` with the same token capacity
and ``--max-running-requests``, run ``sglang.benchmark.serving`` (random-ids prompts of a fixed
length, concurrency above what fits), read the largest ``#running-req`` SGLang logged for a decode
batch, and the client-side throughput. Prints a Markdown table.

    .venv/bin/python benchmark/capacity.py [--num-prompts 64] [--input-len 1000] [--output-len 32]
        [--concurrency 16] [--max-total-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from sglang_fairkv.server_process import ServerProcess

CONFIGS = {
    "stock torch_native": [],
    "fairkv none": ["--kv-compress", "none"],
    "fairkv snapkv ratio 0.75": ["--kv-compress", "snapkv", "--kv-compress-ratio", "0.75"],
    "fairkv adakv ratio 0.75": ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75"],
    "fairkv adakv ratio 0.5": ["--kv-compress", "adakv", "--kv-compress-ratio", "0.5"],
    # fp8 rows in the same KV bytes (the pool is sized in the model dtype's bytes): 4x the rows of fp32
    "fairkv adakv ratio 0.75 fp8_e4m3": ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75",
                                         "--kv-cache-dtype", "fp8_e4m3"],
    "fairkv none fp8_e4m3": ["--kv-compress", "none", "--kv-cache-dtype", "fp8_e4m3"],
}
# stock SGLang 0.5.23 with --kv-cache-dtype fp8_e4m3 on a CPU without AMX stops at start-up ("CPU FP8 KV
# cache requires Intel AMX support"): not a configuration here


def max_running(log_text: str) -> int:
    """The largest ``#running-req`` SGLang logged for a decode batch."""
    runs = [int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", log_text)]
    return max(runs, default=0)


def bench_serving(port: int, a) -> dict:
    """Run ``sglang.benchmark.serving`` (random-ids, fixed lengths, ``a.num_prompts`` at
    ``a.concurrency``) against the server on ``port``; returns its result record."""
    out = Path(tempfile.mkdtemp()) / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
           "--dataset-name", "random-ids", "--num-prompts", str(a.num_prompts),
           "--max-concurrency", str(a.concurrency), "--random-input-len", str(a.input_len),
           "--random-output-len", str(a.output_len), "--random-range-ratio", "1.0", "--seed", "1",
           "--host", "127.0.0.1", "--port", str(port), "--output-file", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads(out.read_text().splitlines()[-1])


def run_one(name: str, extra: list[str], a) -> dict:
    args = [*extra, "--max-total-tokens", str(a.max_total_tokens), "--max-running-requests", "64",
            "--decode-log-interval", "1"]  # every decode batch logged: the true peak of #running-req
    with ServerProcess(args, startup_timeout=300) as s:
        r = bench_serving(s.port, a)
        log = s.log_text()
    return {"config": name, "completed": r["completed"], "max_running": max_running(log),
            "req_s": r["request_throughput"], "out_tok_s": r["output_throughput"],
            "ttft_ms": r["mean_ttft_ms"], "tpot_ms": r["mean_tpot_ms"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-total-tokens", type=int, default=8192)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    a = p.parse_args()
    rows = [run_one(n, CONFIGS[n], a) for n in a.configs]
    print(f"\n{a.num_prompts} prompts x {a.input_len} in / {a.output_len} out, concurrency {a.concurrency}, "
          f"--max-total-tokens {a.max_total_tokens}\n")
    print("| config | completed | max running | req/s | out tok/s | mean TTFT ms | mean TPOT ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['completed']}/{a.num_prompts} | {r['max_running']} | {r['req_s']:.3f} | "
              f"{r['out_tok_s']:.2f} | {r['ttft_ms']:.0f} | {r['tpot_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
