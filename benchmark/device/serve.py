"""One device call, real servers: stock SGLang vs the fairkv backend on the lent GPU.

On the device (``make device-check`` runs it after the kernel checks; carry ``.device`` with
``.device/sglang`` built by ``../shared/tools/sglang-for-device/build.sh`` and its ``model/`` folder
holding SmolLM2's config and tokenizer):

* unpacks the SGLang bundle (no sgl-kernel: its torch stand-in; ``SGLANG_FORCE_FUSED_OP_BACKEND=torch``);
* models made on the device: a SmolLM2-shaped Llama with **seeded** weights (transformers, seed 0: the
  same weights in every server, so greedy tokens can be compared) and an 8B-shaped Llama (Llama-3-8B
  dimensions, SmolLM2's tokenizer) with ``--load-format dummy`` (timing only);
* serves each configuration through ``python -m sglang.launch_server`` (stock, ``--attention-backend
  triton``) or ``python -m sglang_fairkv.launch_server`` (``--kv-compress none`` / ``adakv`` 0.75), CUDA
  graphs on and off, every one with the same ``--max-total-tokens`` (equal KV memory);
* greedy tokens of stock vs fairkv ``none`` on the seeded weights (equal up to bf16 near-ties, counted);
* a bench_serving-style load (concurrent streamed requests, random ids, ``ignore_eos``): output tok/s,
  mean TTFT / TPOT, the most requests SGLang decoded at once; for fairkv the pool must really have held
  KV during the load (``/server_info``), and a graphs-on run must have captured graphs (server log);
* prints one table and writes ``$OUT/serve_table.md`` and ``$OUT/serve.json``; exit 1 if a check fails.
  A global deadline skips (and reports) the runs that no longer fit the call.

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
from sglang_fairkv.server_process import ServerProcess  # noqa: E402  (stdlib only: fine on the device)

REPO = _paths.REPO
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)


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


def shaped_config(config_dir: Path, dst: Path, overrides: dict) -> Path:
    """A config-only folder (tokenizer files copied) with ``overrides``: for ``--load-format dummy``."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((config_dir / "config.json").read_text())
    cfg.update(overrides)
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in config_dir.iterdir():
        if f.name != "config.json" and f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt")):
            shutil.copy(f, dst)
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
    if dry:
        return [Run("smollm2", "stock torch_native", "sglang_fairkv.launch_server", [], False),
                Run("smollm2", "fairkv none", "sglang_fairkv.launch_server", ["--kv-compress", "none"], False),
                Run("smollm2", "fairkv adakv 0.75", "sglang_fairkv.launch_server",
                    ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75"], False)]
    common = ["--dtype", "bfloat16", "--sampling-backend", "pytorch", "--mem-fraction-static", "0.5"]
    stock = ["--attention-backend", "triton", *common]
    off = ["--cuda-graph-backend-decode", "disabled"]
    ada = ["--kv-compress", "adakv", "--kv-compress-ratio", "0.75", *common]
    none = ["--kv-compress", "none", *common]
    S, F = "sglang.launch_server", "sglang_fairkv.launch_server"
    # in priority order: the deadline skips what no longer fits the call
    return [Run("smollm2", "stock triton, graphs", S, stock, True),
            Run("smollm2", "fairkv none, graphs", F, none, True),
            Run("smollm2", "fairkv adakv 0.75, graphs", F, ada, True),
            Run("llama8b", "stock triton, graphs", S, stock, True),
            Run("llama8b", "fairkv adakv 0.75, graphs", F, ada, True),
            Run("smollm2", "fairkv adakv 0.75, eager", F, [*ada, *off], False),
            Run("smollm2", "stock triton, eager", S, [*stock, *off], False),
            Run("smollm2", "fairkv none, eager", F, [*none, *off], False),
            Run("llama8b", "fairkv none, graphs", F, none, True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--bundle", type=Path, default=REPO / ".device" / "sglang")
    ap.add_argument("--deadline-s", type=float, default=200.0, help="start no server after this many seconds")
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="serve-device-"))
    import random

    rng = random.Random(0)
    if a.dry_run:
        env = dict(os.environ)
        from sglang_fairkv import embedded_model

        models = {"smollm2": ["--model-path", str(embedded_model.prepare())]}
        total, n_in, n_out, n_req, conc, n_cmp = 8192, 64, 8, 4, 4, 2
    else:
        env = device_env(a.bundle, Path("/tmp/site"))
        cfg_dir = a.bundle / "model"
        small = seeded_model(cfg_dir, work / "smollm2-seeded", 0, env)
        big = shaped_config(cfg_dir, work / "llama8b", LLAMA_8B)
        models = {"smollm2": ["--model-path", str(small)],
                  "llama8b": ["--model-path", str(big), "--load-format", "dummy"]}
        total, n_in, n_out, n_req, conc, n_cmp = 65536, 512, 64, 64, 32, 8
    prompts = [[rng.randrange(100, 40000) for _ in range(n_in)] for _ in range(n_req)]
    cmp_prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(n_cmp)]
    failures, rows, tokens = [], [], {}
    for run in plan_runs(a.dry_run):
        if time.time() - t_start > a.deadline_s:
            run.result = {"skipped": "deadline"}
            rows.append(run)
            continue
        log = out / f"server-{run.model}-{re.sub(r'[^a-z0-9]+', '-', run.name.lower())}.log"
        args = [*run.args, "--max-total-tokens", str(total), "--max-running-requests", str(max(conc, 8)),
                "--decode-log-interval", "1"]
        fairkv = run.module.startswith("sglang_fairkv") and "--kv-compress" in args
        try:
            s = ServerProcess([*models[run.model], *args], module=run.module, env=env, log=log,
                              startup_timeout=240, graceful_s=30).start()
        except Exception as e:  # noqa: BLE001 - report every run
            run.result = {"error": str(e)[-600:]}
            failures.append(f"{run.model} / {run.name}: did not start")
            rows.append(run)
            continue
        try:
            run.result["up_s"] = s.up_s
            if run.model == "smollm2" and run.name.split(",")[0] in ("stock triton", "stock torch_native", "fairkv none"):
                tokens[(run.name.split(",")[0], run.graphs)] = greedy(s, cmp_prompts, 16)
            run.result.update(load(s, prompts, n_out, conc, fairkv))
            text = tail(log, 10 ** 7)
            running = [int(m) for m in re.findall(r"#running-req: (\d+)", text)]
            run.result["max_running"] = max(running, default=None)
            run.result["graphs_captured"] = bool(re.search(r"[Cc]apture cuda graph", text))
            if not run.result["all_tokens"]:
                failures.append(f"{run.model} / {run.name}: a request did not return all its tokens")
            if fairkv and not run.result.get("max_rows_seen"):
                failures.append(f"{run.model} / {run.name}: the fairkv pool never held KV during the load")
            if run.graphs and not a.dry_run and not run.result["graphs_captured"]:
                failures.append(f"{run.model} / {run.name}: no CUDA graph was captured")
        except Exception as e:  # noqa: BLE001
            run.result["error"] = str(e)[-600:]
            failures.append(f"{run.model} / {run.name}: {str(e)[-200:]}")
        finally:
            s.stop()
        rows.append(run)
    # greedy tokens: stock vs fairkv none on the same weights
    cmp_lines = []
    for graphs in (True, False):
        stock = tokens.get(("stock triton" if not a.dry_run else "stock torch_native", graphs))
        mine = tokens.get(("fairkv none", graphs))
        if stock is None or mine is None:
            continue
        equal = sum(x == y for x, y in zip(stock, mine))
        first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(stock, mine)]
        cmp_lines.append(f"greedy tokens, stock vs fairkv none ({'graphs' if graphs else 'eager'}): {equal}/{len(stock)} "
                         f"prompts equal over 16 tokens; first divergence per prompt {first}")
        need = len(stock) if a.dry_run else max(1, len(stock) - 2)  # bf16 near-ties may flip a couple
        if equal < need:
            failures.append(f"greedy tokens differ on {len(stock) - equal} of {len(stock)} prompts")
    if not cmp_lines:
        failures.append("no greedy-token comparison ran")
    lines = [f"| model | config | up s | out tok/s | mean TTFT ms | mean TPOT ms | max running | graphs captured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r.result
        if "out_tok_s" in x:
            lines.append(f"| {r.model} | {r.name} | {x['up_s']:.0f} | {x['out_tok_s']:.1f} | {x['ttft_ms']:.0f} | "
                         f"{x['tpot_ms']:.1f} | {x['max_running']} | {x['graphs_captured']} |")
        else:
            lines.append(f"| {r.model} | {r.name} | - | - | - | - | - | {x.get('skipped') or 'error'} |")
    head = (f"{'DRY RUN (CPU)' if a.dry_run else 'device'}: {n_req} requests x {n_in} in / {n_out} out, concurrency "
            f"{conc}, --max-total-tokens {total} for every run")
    text = "\n".join([head, "", *lines, "", *cmp_lines, "", "failures: " + ("; ".join(failures) or "none")])
    print(text)
    (out / "serve_table.md").write_text(text + "\n")
    (out / "serve.json").write_text(json.dumps([{"model": r.model, "name": r.name, **r.result} for r in rows], indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(("PASS" if not failures else "FAIL") + f" serve.py in {time.time() - t_start:.0f} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
