"""Key-value retrieval on the embedded SmolLM2 through the real server: full cache vs per-head
compression. Generated locally, no downloads.

Each prompt is filler text with one fact, "The secret code of the <place> is <4 digits>.", at a
seeded depth, and a closing question; a sample counts as correct when the 4 digits appear in the
greedy answer (12 tokens). One server per (method, budget); all prompts of a configuration are sent
concurrently. Prints a Markdown table (accuracy per prompt length and overall).

    .venv/bin/python benchmark/retrieval.py [--lengths 1000 2000 4000] [--per-length 4]
        [--budgets 64 128 256 512] [--methods snapkv adakv] [--skip-full]
"""

from __future__ import annotations

import argparse
import random
import sys
from concurrent.futures import ThreadPoolExecutor

from sglang_fairkv.server_process import ServerProcess

WORDS = ("the river city stone north garden library window morning market bridge lantern harbor "
         "orchard valley quiet old road near across under light green small").split()
PLACES = ("harbor", "library", "orchard", "bridge", "market", "garden", "tower", "mill")


def make_prompt(tok, n_tokens: int, seed: int) -> tuple[list[int], str]:
    """``n_tokens`` token ids with one secret code at a seeded depth; returns (ids, code)."""
    rng = random.Random(seed)
    place, code = rng.choice(PLACES), str(rng.randrange(1000, 10000))
    question = tok(f"\nQuestion: what is the secret code of the {place}?\nAnswer: the secret code of "
                   f"the {place} is")["input_ids"]
    fact = tok(f" The secret code of the {place} is {code}. ")["input_ids"]
    filler: list[int] = []
    while len(filler) < n_tokens:
        filler += tok(" " + " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")["input_ids"]
    room = n_tokens - len(question) - len(fact)
    depth = int(room * rng.uniform(0.1, 0.9))
    body = filler[:depth] + fact + filler[depth:room]
    return body + question, code


def evaluate(server_args: list[str], prompts: list[tuple[list[int], str]]) -> list[bool]:
    with ServerProcess([*server_args, "--max-running-requests", "32"], startup_timeout=300) as s:
        def one(p):
            ids, code = p
            out = s.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": 12, "temperature": 0.0}},
                             timeout=1800)
            return code in out["text"]

        with ThreadPoolExecutor(len(prompts)) as ex:
            return list(ex.map(one, prompts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--per-length", type=int, default=4)
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--methods", nargs="+", default=["snapkv", "adakv"])
    p.add_argument("--skip-full", action="store_true", help="do not run the full-cache reference row")
    a = p.parse_args()
    from transformers import AutoTokenizer

    from sglang_fairkv import embedded_model

    tok = AutoTokenizer.from_pretrained(str(embedded_model.prepare()))
    prompts = [make_prompt(tok, n, 1000 * n + i) for n in a.lengths for i in range(a.per_length)]
    configs = ([] if a.skip_full else [("full cache", None, [])]) + [
        (m, b, ["--kv-compress", m, "--kv-budget", str(b)]) for m in a.methods for b in a.budgets]
    print(f"SmolLM2-135M-Instruct, float32, CPU; {a.per_length} prompts per length; correct = the 4-digit "
          "code appears in 12 greedy tokens\n")
    print("| method | budget (tokens/head) | " + " | ".join(f"{n} tok" for n in a.lengths) + " | all |")
    print("|---|---|" + "---|" * (len(a.lengths) + 1))
    for name, budget, args in configs:
        ok = evaluate(args, prompts)
        cells = []
        for j, _ in enumerate(a.lengths):
            part = ok[j * a.per_length:(j + 1) * a.per_length]
            cells.append(f"{sum(part)}/{len(part)}")
        print(f"| {name} | {budget if budget else '-'} | " + " | ".join(cells) + f" | {sum(ok)}/{len(ok)} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
