"""Two servers on one machine: what an idle one costs the other (``--sleep-on-idle``, the CPU default, vs
SGLang's busy-polling idle loop, ``--no-sleep-on-idle``). Side by side in one script.

For each mode: start server A and server B (the embedded SmolLM2, AdaKV 0.5, the mode's idle flag on
both), leave B idle, and time A's first token for a short and a long prompt (streamed ``/generate``,
greedy) and a 600-token prompt sent twice (the second a prefix-cache hit; a 1520-token prompt is past
the tier's write share of this default 16384-token pool, so it is not cached); then the same with B
stopped. Also the CPU
each idle server's process group takes while nobody sends anything (``/proc`` ticks over 5 s).

    python benchmark/idle_servers.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python")]

from sglang_fairkv.server_process import ServerProcess  # noqa: E402


def ttft(url: str, ids: list[int]) -> float:
    t0 = time.time()
    with requests.post(url + "/generate", stream=True, timeout=600, json={
            "input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                return time.time() - t0
    raise RuntimeError("no token streamed")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid:  # field 5 (pgrp), after the ")" split: index 2
            total += int(stat[11]) + int(stat[12])  # utime, stime
    return total / tick


def idle_cpu_share(server: ServerProcess, seconds: float = 5.0) -> float:
    a = group_cpu_s(server.proc.pid)
    time.sleep(seconds)
    return (group_cpu_s(server.proc.pid) - a) / seconds


def run(mode: str) -> dict:
    flags = ["--kv-compress", "adakv", "--kv-compress-ratio", "0.5"] + (["--no-sleep-on-idle"] if mode == "busy" else [])
    import random

    rng = random.Random(0)
    short = [rng.randrange(100, 40000) for _ in range(120)]
    long = [rng.randrange(100, 40000) for _ in range(1520)]
    out = {"mode": mode}
    with ServerProcess(flags, startup_timeout=300) as a:
        ttft(a.url, [rng.randrange(100, 40000) for _ in range(16)])  # warm
        with ServerProcess(flags, startup_timeout=300) as b:
            time.sleep(3)
            out["idle_cpu_cores_b"] = round(idle_cpu_share(b), 2)
            doc = [rng.randrange(100, 40000) for _ in range(600)]
            ttft(a.url, doc)
            out["two_up"] = {"ttft_120": ttft(a.url, short), "ttft_1520": ttft(a.url, long),
                             "ttft_600_hit": ttft(a.url, doc)}
        time.sleep(2)
        long2 = [rng.randrange(100, 40000) for _ in range(1520)]
        doc2 = [rng.randrange(100, 40000) for _ in range(600)]
        ttft(a.url, doc2)
        out["one_up"] = {"ttft_120": ttft(a.url, short[::-1]), "ttft_1520": ttft(a.url, long2),
                         "ttft_600_hit": ttft(a.url, doc2)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [run("sleep"), run("busy")]
    print("\n| idle loop | idle server's CPU (cores) | TTFT 120 tok, 2 up / 1 up | TTFT 1520 tok, 2 up / 1 up | "
          "cache hit 600, 2 up / 1 up |")
    print("|---|---|---|---|---|")
    for r in rows:
        t, o = r["two_up"], r["one_up"]
        print(f"| {'--sleep-on-idle (CPU default)' if r['mode'] == 'sleep' else 'busy polling (--no-sleep-on-idle)'} | "
              f"{r['idle_cpu_cores_b']} | {t['ttft_120']:.2f} / {o['ttft_120']:.2f} s | {t['ttft_1520']:.2f} / "
              f"{o['ttft_1520']:.2f} s | {t['ttft_600_hit']:.2f} / {o['ttft_600_hit']:.2f} s |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
