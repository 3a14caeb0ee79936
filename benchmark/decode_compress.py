"""Decode-time compression (``--kv-decode-compress``) on long outputs: capacity, throughput, and what the budget
costs a needle asked at the end of a long generation. One script, the configurations one after the other on
this machine (same model, same KV bytes).

* **long**: SGLang's ``bench_serving`` (random ids, ``ignore_eos``) with short prompts and long outputs
  against a server without decode-time compression (the ragged pool, every token kept) and with it at two
  budgets; the pool holds ``--pool-tokens`` tokens (equal KV bytes). Reported: the most requests decoding at
  once (SGLang's ``Decode batch, #running-req`` log line), output tokens/s and the benchmark's wall time,
  the rows decode-time compression evicted.
* **needle**: a retrieval prompt (``benchmark/retrieval.py``'s: filler with one "secret code", then a
  request to write) and a generation of ``--gen-tokens`` tokens of free text, after which the question is
  *decoded* -- a regex constraint forces the text ``Question: ... Answer: the secret code of the <place>
  is`` and four digits -- so the question's tokens and the answer are decode steps over the cache the
  generation built (with decode-time compression: compressed every ``K`` steps while generating). Correct =
  the four digits equal the code.

    .venv/bin/python benchmark/decode_compress.py [--part long needle] [--budgets 256 128]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "benchmark"))

from sglang_fairkv.server_process import ServerProcess  # noqa: E402


def decode_args(budget: int | None, interval: int, window: int) -> list[str]:
    if budget is None:
        return ["--kv-compress", "none"]
    return ["--kv-decode-compress", "adakv", "--kv-decode-budget", str(budget), "--kv-decode-interval",
            str(interval), "--kv-decode-window", str(window)]


def long_outputs(a) -> None:
    print(f"\n### Long outputs: {a.num_prompts} requests of {a.input_len} prompt + {a.output_len} generated tokens "
          f"(ignore_eos), KV pool {a.pool_tokens} tokens, AdaKV decode-time compression every {a.interval} steps, "
          f"window {a.window}\n")
    print("| decode-time compression | requests decoding at once | output tok/s | wall s | rows evicted |")
    print("|---|---|---|---|---|")
    for budget in [None, *a.budgets]:
        args = [*decode_args(budget, a.interval, a.window), "--max-total-tokens", str(a.pool_tokens),
                "--max-running-requests", "64", "--context-length", str(a.input_len + a.output_len + 64),
                "--decode-log-interval", "1"]
        with ServerProcess(args, startup_timeout=300) as s:
            out = Path(f"/tmp/decode-bench-{budget}.jsonl")
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--dataset-name",
                   "random-ids", "--num-prompts", str(a.num_prompts), "--random-input-len", str(a.input_len),
                   "--random-output-len", str(a.output_len), "--random-range-ratio", "1.0", "--seed", "1",
                   "--host", "127.0.0.1", "--port", str(s.port), "--output-file", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
            res = json.loads(out.read_text().splitlines()[-1])
            running = max(int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", s.log_text()))
            dc = (s.fairkv_info() or {}).get("decode_compress") or {}
        name = "off" if budget is None else f"budget {budget}"
        print(f"| {name} | {running} | {res['output_throughput']:.1f} | {wall:.0f} | "
              f"{dc.get('rows_evicted_total', 0)} |", flush=True)


def needle(a) -> None:
    from retrieval import make_prompt
    from transformers import AutoTokenizer

    from sglang_fairkv import embedded_model

    tok = AutoTokenizer.from_pretrained(str(embedded_model.prepare()))
    cases = []
    for i in range(a.needles):
        ids, code = make_prompt(tok, a.doc_tokens, 7000 + i)
        place = re.search(r"secret code of the (\w+)\?", tok.decode(ids)).group(1)
        cases.append((ids[:-len(tok(f"\nAnswer: the secret code of the {place} is")["input_ids"])]
                      + tok("\nWrite a long story about this place, then answer.\n")["input_ids"], code, place))
    # the free text: lines of eleven short lower-case words (about gen-tokens tokens: at most 8 letters a
    # word, so a line is at most ~30 tokens and the model cannot stretch it), then the question, four digits
    lines = max(1, a.gen_tokens // 16)
    print(f"\n### Needle after a long generation: {a.needles} prompts of {a.doc_tokens} tokens, about "
          f"{a.gen_tokens} generated tokens, then the question decoded (regex-forced) and 4 digits\n")
    print("| decode-time compression | correct | tokens generated (mean) |")
    print("|---|---|---|")
    for budget in [None, *a.budgets]:
        args = [*decode_args(budget, a.interval, a.window), "--max-running-requests", "32",
                "--context-length", "8192"]
        with ServerProcess(args, startup_timeout=300) as s:
            def one(case):
                ids, code, place = case
                regex = "(" + r"([a-z]{1,8} ){10}[a-z]{1,8}\.\n" + "){%d}" % lines
                regex += (f"\\nQuestion: what is the secret code of the {place}\\?\\nAnswer: the secret code of the "
                          f"{place} is [0-9]{{4}}")
                out = s.generate({"input_ids": ids, "sampling_params": {
                    "max_new_tokens": a.gen_tokens * 3, "temperature": 0.0, "regex": regex}}, timeout=7200)
                got = re.search(r"is (\d{4})$", out["text"])
                return (got is not None and got.group(1) == code), len(out["output_ids"])

            with ThreadPoolExecutor(len(cases)) as ex:
                res = list(ex.map(one, cases))
        name = "off" if budget is None else f"budget {budget}"
        print(f"| {name} | {sum(ok for ok, _ in res)}/{len(res)} | {sum(n for _, n in res) / len(res):.0f} |",
              flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", default=["long", "needle"], choices=["long", "needle"])
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 128])
    p.add_argument("--interval", type=int, default=64)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=2048)
    p.add_argument("--pool-tokens", type=int, default=9000)
    p.add_argument("--needles", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=1000)
    p.add_argument("--gen-tokens", type=int, default=800)
    a = p.parse_args()
    print("SmolLM2-135M-Instruct, float32, CPU (2 cores)")
    if "long" in a.part:
        long_outputs(a)
    if "needle" in a.part:
        needle(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
