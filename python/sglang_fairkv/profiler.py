"""``python -m sglang_fairkv.profiler``: per-head KV statistics measured by the serving engine.

Starts ``python -m sglang_fairkv.launch_server`` with your compression flags (and ``--tp``), with
``FAIRKV_PROFILE_DIR`` set so that each TP rank's fairkv backend appends, for every prompt it
compresses, the kept tokens of every (layer, KV head) of the model: its TP group's ledger, in which
each rank's own segments are the lengths its ragged pool really holds. Sends the
prompts (``max_new_tokens`` 1, a progress bar on stderr), stops the server and writes
``fairkv-stats/1``: per (layer, KV head) mean / std / p10 / p50 / p90 of kept tokens, and the sample
count -- the input of ``python -m sglang_fairkv.plan``.

    python -m sglang_fairkv.profiler [--model-path M] [--tp N] --kv-compress adakv --kv-budget 256 \\
        (--prompts FILE | --synthetic long-context) [--num-prompts 16] [--prompt-len 2048] --out stats.json

Or from the traffic a running fairkv server has served (no prompts sent, nothing started): its live
profile (the last ``FAIRKV_LIVE_WINDOW`` compressed prompts, ``/server_info``), the stats to re-plan with
when its drift report says the plan no longer fits::

    python -m sglang_fairkv.profiler --from-server http://HOST:PORT --out stats.json [--min-samples 32]

Works on CPU with the embedded SmolLM2. ``FILE``: a JSON list of token-id lists. At TP > 1 (any
``--fairkv-plan``) every rank records the whole model's counts; the ranks must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from .offline_stats import add_prompt_args

PROG = "python -m sglang_fairkv.profiler"


def read_rank_files(folder: Path, tp: int, min_prompt_len: int) -> np.ndarray:
    """Counts int ``[prompts, layers, kv_heads]`` from ``rank<r>.jsonl`` (each rank writes every head's
    count from its ledger; they must be identical).

    Lines of prompts no longer than ``min_prompt_len`` (SGLang's warm-up and health checks) are skipped;
    the ranks must agree on the prompt sequence (every rank schedules identically) and the counts.
    """
    per_rank = []
    for r in range(tp):
        path = folder / f"rank{r}.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        per_rank.append([x for x in lines if x["prompt_len"] > min_prompt_len])
    n = len(per_rank[0])
    if any(len(x) != n for x in per_rank):
        raise ValueError(f"ranks recorded different numbers of prompts: {[len(x) for x in per_rank]}")
    rows = []
    for i in range(n):
        if len({json.dumps([x[i]["prompt_len"], x[i]["kept"]]) for x in per_rank}) != 1:
            raise ValueError(f"ranks disagree on prompt {i}")
        rows.append(np.array(per_rank[0][i]["kept"]))
    return np.array(rows, dtype=np.float64).reshape(n, *(rows[0].shape if rows else (0, 0)))


def stats_from_server(url: str, min_samples: int = 1):
    """The ``fairkv-stats/1`` object of a running fairkv server's live profile (``/server_info``, rank 0's
    fairkv state); raises ValueError when it has none or fewer than ``min_samples`` prompts."""
    import requests

    from .placement.stats import QUANTILES, KVStats

    try:
        r = requests.get(url.rstrip("/") + "/server_info", timeout=60)
        r.raise_for_status()
        info = r.json()
    except (requests.RequestException, ValueError) as e:
        raise ValueError(f"{url}/server_info: {e}") from None
    fk = next((s["fairkv"] for s in info.get("internal_states") or [] if isinstance(s, dict) and "fairkv" in s),
              None)
    if fk is None:
        raise ValueError(f"{url} is not a fairkv server (no fairkv state in /server_info)")
    prof = fk.get("live_profile")
    n = 0 if prof is None else prof["samples"]
    if n < max(1, min_samples):
        raise ValueError(f"{url} has served {n} compressed prompts, need {max(1, min_samples)}")
    return KVStats(model=prof["model"], num_layers=prof["num_layers"], num_q_heads=prof["num_q_heads"],
                   num_kv_heads=prof["num_kv_heads"], head_dim=prof["head_dim"],
                   kv_len_mean=np.asarray(prof["kv_len_mean"], dtype=np.float64),
                   kv_len_std=np.asarray(prof["kv_len_std"], dtype=np.float64), samples=n,
                   method=prof["method"],
                   budget=float(prof["budget"] if prof["budget"] is not None else np.mean(prof["kv_len_mean"])),
                   extra={**{k: prof[k] for k in QUANTILES}, "prompt_len_mean": prof["prompt_len_mean"],
                          "ratio": prof.get("ratio"),
                          "source": f"live profile of {url} (sglang_fairkv.profiler --from-server)"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--tp", type=int, default=1)
    source = add_prompt_args(p, num_prompts=16, prompt_len=2048)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=600.0, help="server start-up limit, seconds")
    source.add_argument("--from-server", metavar="URL", help="read the live profile of a running fairkv server "
                   "instead of starting one (its served traffic)")
    p.add_argument("--min-samples", type=int, default=1,
                   help="with --from-server: fail unless the live profile holds this many prompts")
    a, server_flags = p.parse_known_args(argv)
    if a.from_server:
        if server_flags:
            print(f"{PROG}: error: --from-server takes no server flags, got {' '.join(server_flags)}",
                  file=sys.stderr)
            return 2
        try:
            stats = stats_from_server(a.from_server, a.min_samples)
        except (ValueError, OSError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        stats.save(a.out)
        print(f"wrote {a.out}: live profile of {a.from_server}, {stats.samples} prompts, {stats.num_layers} "
              f"layers x {stats.num_kv_heads} KV heads, mean kept {stats.kv_len_mean.mean():.1f} tokens per head")
        return 0
    from .serving.launcher import fairkv_parser

    fka, _ = fairkv_parser().parse_known_args(server_flags)
    if fka.kv_compress is None:
        print(f"{PROG}: error: give --kv-compress (and its budget)", file=sys.stderr)
        return 2
    try:
        from transformers import AutoConfig

        from . import embedded_model
        from .offline_stats import load_prompts, stats_from_counts

        model_path = a.model_path or str(embedded_model.prepare())
        cfg = AutoConfig.from_pretrained(model_path)
        if cfg.num_key_value_heads % a.tp:
            raise ValueError(f"{cfg.num_key_value_heads} KV heads do not split over --tp {a.tp}")
        prompts = load_prompts(a, model_path)
        if min(len(x) for x in prompts) <= fka.kv_window:
            raise ValueError(f"every prompt must be longer than the observation window ({fka.kv_window})")
        counts = _run(model_path, a, server_flags, prompts, fka.kv_window)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    budget = fka.kv_budget if fka.kv_budget is not None else float(
        np.mean([len(x) for x in prompts]) * (1 - (fka.kv_compress_ratio or 0.0)))
    stats = stats_from_counts(counts, model_path, cfg, fka.kv_compress, budget=float(budget))
    stats.extra["source"] = "engine profile (sglang_fairkv.profiler)"
    stats.extra["ratio"] = fka.kv_compress_ratio  # the run's --kv-compress-ratio (None: --kv-budget)
    stats.save(a.out)
    print(f"wrote {a.out}: {counts.shape[0]} prompts, {counts.shape[1]} layers x {counts.shape[2]} KV heads, "
          f"mean kept {counts.mean():.1f} tokens per head")
    return 0


def _run(model_path: str, a, server_flags: list[str], prompts: list[list[int]], window: int) -> np.ndarray:
    from tqdm import tqdm

    from .server_process import ServerProcess

    folder = Path(tempfile.mkdtemp(prefix="fairkv-profile-"))
    server = ServerProcess(["--model-path", model_path, "--tp-size", str(a.tp), *server_flags],
                           env={**os.environ, "FAIRKV_PROFILE_DIR": str(folder)}, log=folder / "server.log",
                           startup_timeout=a.timeout)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{str(e).splitlines()[0]} (log: {server.log_path})") from None
    try:
        def one(ids):
            server.post_json("/generate", {"input_ids": ids,
                                           "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}},
                             timeout=3600)

        with ThreadPoolExecutor(a.concurrency) as ex:
            futures = [ex.submit(one, ids) for ids in prompts]
            for f in tqdm(as_completed(futures), total=len(futures), desc="prompts", file=sys.stderr):
                f.result()
    finally:
        server.stop()
    counts = read_rank_files(folder, a.tp, window)
    if counts.shape[0] != len(prompts):
        raise RuntimeError(f"recorded {counts.shape[0]} prompts, sent {len(prompts)}")
    return counts


if __name__ == "__main__":
    sys.exit(main())
