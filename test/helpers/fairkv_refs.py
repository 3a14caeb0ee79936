"""Prompts and reference outputs shared by the fairkv end-to-end tests (see conftest fixtures)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from helpers import hf_ref

REPO = Path(__file__).resolve().parents[2]
RATIO = 0.5
N_NEW = 16


def long_prompt_ids(smollm2_path, n_tokens: int, seed: int) -> list[int]:
    """A retrieval-style prompt of exactly ``n_tokens`` tokens with a key-value fact inside."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    rng = random.Random(seed)
    words = ("the river city stone north garden library window morning market bridge lantern "
             "harbor orchard valley").split()
    sents = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(400)]
    key = rng.randrange(1000, 9999)
    fact = f" Remember: the secret code of the harbor is {key}. "
    body = tok(" ".join(sents[:30]) + fact + " ".join(sents[30:]))["input_ids"]
    tail = tok(" Question: what is the secret code of the harbor? Answer: the secret code is")["input_ids"]
    return body[: n_tokens - len(tail)] + tail


def kvpress_greedy(kvpress_python, model, jobs: list[dict], tmp_path) -> list[list[int]]:
    src, out = tmp_path / "jobs.json", tmp_path / "out.json"
    src.write_text(json.dumps(jobs))
    r = subprocess.run([str(kvpress_python), str(REPO / "test" / "helpers" / "kvpress_generate.py"),
                        str(model), str(src), str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def references(smollm2_path, kvpress_python, prompts, tmp_dir):
    """Every reference output, computed before any server of this module starts (2 cores: a server
    next to the references would slow both): kvpress adakv / snapkv and HF full-cache greedy."""
    from transformers import AutoTokenizer

    short = AutoTokenizer.from_pretrained(str(smollm2_path))("The capital of France is")["input_ids"]
    jobs = [{"method": m, "ratio": RATIO, "n_new": N_NEW, "ids": ids}
            for m, ids in (("adakv", prompts[0]), ("adakv", prompts[1]), ("snapkv", prompts[1]))]
    ada0, ada1, snap1 = kvpress_greedy(kvpress_python, smollm2_path, jobs, tmp_dir)
    return {
        "adakv": [ada0, ada1], "snapkv": snap1, "short": short,
        "hf": [hf_ref.greedy(smollm2_path, ids, N_NEW) for ids in prompts],
        "hf_short": hf_ref.greedy(smollm2_path, short, 24),
    }




def decode_references(kvpress_python, model, prompts: list[list[int]], n_new: int, decodes: list[dict | None],
                      tmp_path, prefill: dict | None = None) -> list[list[list[int]]]:
    """Greedy tokens of kvpress's decoding presses (``kvpress_decode.py``, one model load, each prompt
    prefilled once with ``prefill``): for each of ``decodes`` (a decoding press, or None: without one) the
    tokens of each prompt."""
    jobs = [{"ids": ids, "n_new": n_new, "prefill": prefill, "decodes": decodes} for ids in prompts]
    src, out = tmp_path / "decode-jobs.json", tmp_path / "decode-out.json"
    src.write_text(json.dumps(jobs))
    r = subprocess.run([str(kvpress_python), str(REPO / "test" / "helpers" / "kvpress_decode.py"), str(model),
                        str(src), str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())  # [prompt][decode]
    return [[got[p][d] for p in range(len(prompts))] for d in range(len(decodes))]


#: decode-time compression tests: kvpress's DecodingPress(compression_interval=16) with SnapKVPress(window_size=8),
#: 64 new tokens (compressions after decode steps 16, 32, 48)
DECODE_N, DECODE_K, DECODE_W = 64, 16, 8


def decode_press(method: str, target: int) -> dict:
    """A ``kvpress_decode.py`` decoding press at the tests' interval and window."""
    return {"method": method, "interval": DECODE_K, "target": target, "window": DECODE_W}


def prefill_decode_references(kvpress_python, model, prompts, tmp_path, prefill_method: str = "adakv"
                              ) -> list[list[list[int]]]:
    """``PrefillDecodingPress(<prefill_method> 0.5, DecodingPress(AdaKV, 16, 48))``, then the prefill press alone."""
    return decode_references(kvpress_python, model, prompts, DECODE_N, [decode_press("adakv", 48), None], tmp_path,
                             prefill={"method": prefill_method, "ratio": 0.5})
