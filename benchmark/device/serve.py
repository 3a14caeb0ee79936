"""One device call, real servers: stock SGLang vs the fairkv backend on the lent GPU.

On the device (``make device-check`` runs it after the kernel checks; carry ``.device`` with
``.device/sglang`` built by ``../shared/tools/sglang-for-device/build.sh`` and its ``model/`` folder
holding SmolLM2's config and tokenizer):

* unpacks the SGLang bundle (no sgl-kernel: its torch stand-in; ``SGLANG_FORCE_FUSED_OP_BACKEND=torch``);
* a SmolLM2-shaped Llama made on the device with **seeded** weights (transformers, seed 0: the same
  weights in every server, so greedy tokens can be compared);
* three servers, in this order (a deadline cuts the tail): fairkv ``--kv-compress none``, stock SGLang
  (``--attention-backend triton``), fairkv ``adakv`` 0.75 -- fairkv first (what this project must show),
  stock with fairkv's graph settings (decode graphs on, prefill graphs off: an equal comparison), every
  one with the same ``--max-total-tokens`` (equal KV memory);
* greedy tokens of stock vs fairkv ``none`` (equal up to bf16 near-ties, counted), as soon as both ran;
* a bench_serving-style load (concurrent streamed requests, random ids, ``ignore_eos``): output tok/s,
  mean TTFT / TPOT, the most requests SGLang decoded at once; for fairkv the pool must really have held
  KV during the load (``/server_info``), and a graphs-on run must have captured graphs (server log);
* every server's process group is registered for ``run.py`` (killed with the phase at its deadline) and
  the figures are rewritten after every server (``$RESULT_JSON``, else ``$OUT/serve.json``); a server is
  not started when the phase's deadline leaves it less than ``--min-run-s``; exit 1 if a check fails.

``--dry-run`` (CPU, the project's venv): the same plumbing with the embedded SmolLM2 (real weights,
float32, graphs unavailable), tiny loads, stock ``torch_native`` vs fairkv; ``make device-check-dry``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import _paths  # noqa: E402  (the project's folders on sys.path)
import _results  # noqa: E402
from sglang_fairkv.server_process import ServerProcess  # noqa: E402  (stdlib only: fine on the device)

REPO = _paths.REPO


@dataclass
class Run:
    model: str
    name: str
    module: str
    args: list[str]
    graphs: bool
    result: dict = field(default_factory=dict)


# ---- environment and models -------------------------------------------------------------------
def device_env(bundle: Path, site: Path) -> dict:
    """Unpack the SGLang bundle; the environment its servers need (stand-in sgl_kernel, our package)."""
    if not (site / "sglang").is_dir():
        tarfile.open(bundle / "site.tar.xz").extractall(site, filter="data")
    env = dict(os.environ)
    env.update(PYTHONPATH=_paths.pythonpath(bundle / 'standin', site), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK="1",
               SGLANG_FORCE_FUSED_OP_BACKEND="torch", SGLANG_JIT_CACHE_DIR="/tmp/sglang-jit")
    return env


def seeded_model(config_dir: Path, dst: Path, seed: int, env: dict, overrides: dict | None = None) -> Path:
    """A model folder with weights made from ``config_dir``'s config (``overrides`` applied) by
    transformers with ``torch.manual_seed(seed)`` (bf16), tokenizer files copied; in a subprocess with
    ``env`` (the bundle's transformers on the device)."""
    code = r"""
import json, os, shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst, seed, over = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
cfg = AutoConfig.from_pretrained(src)
for k, v in over.items():
    setattr(cfg, k, v)
torch.manual_seed(seed)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
model.save_pretrained(dst)
for f in os.listdir(src):
    if f != "config.json" and not f.endswith((".safetensors", ".bin", ".pt")) and os.path.isfile(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), dst)
print("seeded", sum(p.numel() for p in model.parameters()), "parameters")
"""
    subprocess.run([sys.executable, "-c", code, str(config_dir), str(dst), str(seed), json.dumps(overrides or {})],
                   env=env, check=True, timeout=300)
    return dst


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def greedy(server: ServerProcess, prompts: list[list[int]], n: int) -> list[list[int]]:
    return [server.greedy_ids(p, n) for p in prompts]


def stream_one(server: ServerProcess, ids: list[int], n_out: int) -> dict:
    """One streamed request: time to the first chunk, time per output token after it."""
    body = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": n_out, "temperature": 0.0,
                                                                  "ignore_eos": True}}
    req = urllib.request.Request(server.url + "/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.time()
    first = last = None
    out = 0
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            now = time.time()
            first = first or now
            last = now
            out = json.loads(line[5:]).get("meta_info", {}).get("completion_tokens", out)
    return {"ttft": (first or t0) - t0, "tpot": ((last - first) / max(1, out - 1)) if first else 0.0, "out": out}


def load(server: ServerProcess, prompts: list[list[int]], n_out: int, concurrency: int, fairkv: bool) -> dict:
    """Concurrent streamed requests (bench_serving-style, a fixed concurrency). For fairkv, samples the
    pool mid-load (KV really held)."""
    results, lock, it = [], threading.Lock(), iter(prompts)
    seen_rows = []

    def worker():
        while True:
            with lock:
                p = next(it, None)
            if p is None:
                return
            r = stream_one(server, p, n_out)
            with lock:
                results.append(r)

    t0 = time.time()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    while fairkv and any(t.is_alive() for t in threads):
        fk = server.fairkv_info() or {}
        seen_rows.append(fk.get("rows_in_segments", 0))
        time.sleep(0.5)
    for t in threads:
        t.join()
    wall = time.time() - t0
    outs = [r["out"] for r in results]
    return {"requests": len(results), "all_tokens": all(o == n_out for o in outs), "wall_s": wall,
            "out_tok_s": sum(outs) / wall, "ttft_ms": 1e3 * sum(r["ttft"] for r in results) / len(results),
            "tpot_ms": 1e3 * sum(r["tpot"] for r in results) / len(results),
            "max_rows_seen": max(seen_rows, default=None)}


# ---- the call ----------------------------------------------------------------------------------
def plan_runs(dry: bool) -> list[Run]:
    """The same three configurations on the device and in the dry run (CPU: no graphs, stock's
    ``torch_native`` attention)."""
    S, F = "sglang.launch_server", "sglang_fairkv.launch_server"
    if dry:
        common, stock, graphs = [], [], False
    else:
        # stock with fairkv's graph settings: decode graphs on, prefill graphs off (fairkv forces them off)
        common = ["--dtype", "bfloat16", "--sampling-backend", "pytorch", "--mem-fraction-static", "0.5",
                  "--cuda-graph-backend-prefill", "disabled"]
        stock, graphs = ["--attention-backend", "triton"], True
    return [Run("smollm2", "fairkv none", F, ["--kv-compress", "none", *common], graphs),
            Run("smollm2", "stock", S if not dry else F, [*stock, *common], graphs),
            Run("smollm2", "fairkv adakv 0.75", F, ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75", *common],
                graphs)]


def compare(tokens: dict, dry: bool) -> tuple[list[str], list[str]]:
    """Greedy tokens of stock vs fairkv none: (report lines, failures)."""
    stock, mine = tokens.get("stock"), tokens.get("fairkv none")
    if stock is None or mine is None:
        return [], []
    equal = sum(x == y for x, y in zip(stock, mine))
    first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(stock, mine)]
    line = (f"greedy tokens, stock vs fairkv none: {equal}/{len(stock)} prompts equal over 16 tokens; first "
            f"divergence per prompt {first}")
    need = len(stock) if dry else max(1, len(stock) - 2)  # bf16 near-ties may flip a couple
    return [line], ([f"greedy tokens differ on {len(stock) - equal} of {len(stock)} prompts"] if equal < need else [])


def table(rows: list[Run]) -> str:
    lines = ["| model | config | up s | out tok/s | mean TTFT ms | mean TPOT ms | max running | graphs captured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r.result
        if "out_tok_s" in x:
            lines.append(f"| {r.model} | {r.name} | {x['up_s']:.0f} | {x['out_tok_s']:.1f} | {x['ttft_ms']:.0f} | "
                         f"{x['tpot_ms']:.1f} | {x['max_running']} | {x['graphs_captured']} |")
        else:
            lines.append(f"| {r.model} | {r.name} | - | - | - | - | - | {x.get('skipped') or 'error'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--bundle", type=Path, default=REPO / ".device" / "sglang")
    ap.add_argument("--min-run-s", type=float, default=None, help="start no server with less time left")
    a = ap.parse_args()
    min_run = a.min_run_s or (30.0 if a.dry_run else 75.0)
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="serve-device-"))
    logs = Path(os.environ.get("OUT", "out"))
    logs.mkdir(parents=True, exist_ok=True)
    import random

    rng = random.Random(0)
    if a.dry_run:
        env = dict(os.environ)
        from sglang_fairkv import embedded_model

        models = {"smollm2": ["--model-path", str(embedded_model.prepare())]}
        total, n_in, n_out, n_req, conc, n_cmp = 8192, 64, 8, 4, 4, 2
    else:
        env = device_env(a.bundle, Path("/tmp/site"))
        small = seeded_model(a.bundle / "model", work / "smollm2-seeded", 0, env)
        models = {"smollm2": ["--model-path", str(small)]}
        total, n_in, n_out, n_req, conc, n_cmp = 65536, 512, 64, 64, 32, 8
    prompts = [[rng.randrange(100, 40000) for _ in range(n_in)] for _ in range(n_req)]
    cmp_prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(n_cmp)]
    failures, rows, tokens, cmp_lines = [], [], {}, []
    head = (f"{'DRY RUN (CPU)' if a.dry_run else 'device'}: {n_req} requests x {n_in} in / {n_out} out, concurrency "
            f"{conc}, --max-total-tokens {total} for every run")

    def save():
        text = "\n".join([head, "", table(rows), "", *cmp_lines])
        _results.write_results({"runs": [{"model": r.model, "name": r.name, **r.result} for r in rows],
                                "greedy": cmp_lines, "failures": failures, "table": text}, "serve.json")

    for run in plan_runs(a.dry_run):
        left = _results.deadline_left(t_start)
        if left is not None and left < min_run:
            run.result = {"skipped": f"deadline ({left:.0f} s left)"}
            rows.append(run)
            save()
            continue
        log = logs / f"server-{run.model}-{re.sub(r'[^a-z0-9]+', '-', run.name.lower())}.log"
        args = [*run.args, "--max-total-tokens", str(total), "--max-running-requests", str(max(conc, 8)),
                "--decode-log-interval", "1"]
        fairkv = run.module.startswith("sglang_fairkv") and "--kv-compress" in args
        s = ServerProcess([*models[run.model], *args], module=run.module, env=env, log=log,
                          startup_timeout=min(240.0, left - 10) if left else 240.0, graceful_s=10)
        try:
            s.launch()
            _results.register_group(s.proc.pid)  # killed with this phase at its deadline
            s.wait_healthy()
        except Exception as e:  # noqa: BLE001 - report every run
            s.stop()
            run.result = {"error": str(e)[-600:]}
            failures.append(f"{run.model} / {run.name}: did not start")
            rows.append(run)
            save()
            continue
        try:
            run.result["up_s"] = s.up_s
            if run.name in ("stock", "fairkv none"):
                tokens[run.name] = greedy(s, cmp_prompts, 16)
                lines, bad = compare(tokens, a.dry_run)
                cmp_lines[:] = lines
                failures.extend(bad)
            save()  # the greedy comparison is the first figure of this phase
            run.result.update(load(s, prompts, n_out, conc, fairkv))
            text = tail(log, 10 ** 7)
            running = [int(m) for m in re.findall(r"#running-req: (\d+)", text)]
            run.result["max_running"] = max(running, default=None)
            run.result["graphs_captured"] = bool(re.search(r"[Cc]apture cuda graph", text))
            if not run.result["all_tokens"]:
                failures.append(f"{run.model} / {run.name}: a request did not return all its tokens")
            if fairkv and not run.result.get("max_rows_seen"):
                failures.append(f"{run.model} / {run.name}: the fairkv pool never held KV during the load")
            if run.graphs and not run.result["graphs_captured"]:
                failures.append(f"{run.model} / {run.name}: no CUDA graph was captured")
        except Exception as e:  # noqa: BLE001
            run.result["error"] = str(e)[-600:]
            failures.append(f"{run.model} / {run.name}: {str(e)[-200:]}")
        finally:
            s.stop()
        rows.append(run)
        save()
    if not cmp_lines:
        failures.append("no greedy-token comparison ran")
    save()
    print("\n".join([head, "", table(rows), "", *cmp_lines, "", "failures: " + ("; ".join(failures) or "none")]))
    shutil.rmtree(work, ignore_errors=True)
    print(("PASS" if not failures else "FAIL") + f" serve.py in {time.time() - t_start:.0f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
