"""``python -m sglang_fairkv.profiler``: stats measured in the engine equal the offline HF path's."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sglang_fairkv.placement.stats import load_stats

pytestmark = pytest.mark.server


def test_engine_profile_equals_offline_counts(smollm2_path, fairkv_prompts, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sglang_fairkv.kvdump import capture_qk, kept_positions

    prompts = [fairkv_prompts[0][:300], fairkv_prompts[0][-400:], fairkv_prompts[1][:500]]
    src = tmp_path / "prompts.json"
    src.write_text(json.dumps(prompts))
    out = tmp_path / "stats.json"
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.profiler", "--model-path", str(smollm2_path),
                        "--kv-compress", "adakv", "--kv-compress-ratio", "0.6", "--prompts", str(src),
                        "--concurrency", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "prompts" in r.stderr  # the progress bar
    stats = load_stats(out)
    assert stats.samples == 3 and stats.method == "adakv"

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32).eval()
    counts = np.array([[[len(k) for k in layer] for layer in
                        kept_positions(capture_qk(model, ids, 64), "adakv", ratio=0.6, budget=None,
                                       window=64, kernel=5, alpha=0.2)] for ids in prompts], dtype=float)
    np.testing.assert_allclose(stats.kv_len_mean, counts.mean(axis=0))
    np.testing.assert_allclose(stats.kv_len_std, counts.std(axis=0))
    assert np.ptp(stats.kv_len_mean, axis=1).max() > 0  # AdaKV really moved budget between heads


def test_profile_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.profiler", "--synthetic", "long-context",
                        "--out", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give --kv-compress" in r.stderr
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps([[1, 2, 3]]))
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.profiler", "--kv-compress", "snapkv", "--kv-budget",
                        "8", "--prompts", str(bad), "--out", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "longer than the observation window (64)" in r.stderr, r.stderr[-2000:]
    # --from-server: a server that is not there, or server flags beside it, is a clear error
    port = _closed_port()
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.profiler", "--from-server", f"http://127.0.0.1:{port}",
                        "--out", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"http://127.0.0.1:{port}/server_info" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.profiler", "--from-server", "http://x",
                        "--kv-compress", "snapkv", "--out", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--from-server takes no server flags" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "s.json").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_old_module_name_runs_the_profiler(tmp_path):
    """``python -m sglang_fairkv.profile`` (the name before the layout move) runs the profiler with the same
    arguments and says where it went: its checks, exit codes and messages are the profiler's."""
    r = subprocess.run([sys.executable, "-m", "sglang_fairkv.profile", "--synthetic", "long-context",
                        "--out", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "give --kv-compress" in r.stderr
    assert "python -m sglang_fairkv.profile is now python -m sglang_fairkv.profiler" in r.stderr
