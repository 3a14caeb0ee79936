"""Shared fixtures: the embedded SmolLM2 folder, a tiny local Llama, and one SmolLM2 server.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``): a test that shares
a module-scoped server with others carries ``xdist_group`` (one worker starts that server once), and
expensive session results (the kvpress oracle venv, the kvpress / HF reference outputs, TP = 1
reference tokens) are computed once per run and shared between workers through a file lock
(:func:`shared_json`), so the references stay independent of the servers they check.
"""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels are tested on CPU through its interpreter, which must be switched on before anything
# imports triton (transformers does): once triton was imported in compiled mode, kernels decorated
# later fail in the interpreter ("Cannot call @triton.jit'd outside of the scope of a kernel").
# Servers and launchers started by the tests get an environment without it (helpers/server.py).
os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist each worker gets its own share of the cores, and every server, reference and
# benchmark client it starts inherits that affinity (the launcher binds its OpenMP threads inside it):
# two servers spinning OpenMP threads on the same two cores ran the suite slower than one worker did.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    _n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if 1 < _n <= len(_cores):
        _per = len(_cores) // _n
        _k = int(_WORKER.removeprefix("gw")) % _n
        os.sched_setaffinity(0, _cores[_k * _per:(_k + 1) * _per])
        os.environ["OMP_NUM_THREADS"] = str(_per)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from helpers.server import Server  # noqa: E402
from helpers.tiny_model import build_llama  # noqa: E402


def _run_root(tmp_path_factory) -> Path:
    """A folder shared by every xdist worker of this run (the master's basetemp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_json(tmp_path_factory, key: str, compute):
    """``compute()`` once per test run, whichever worker asks first; the others wait and read its
    JSON result. ``compute`` must return JSON-serialisable data."""
    import json

    from filelock import FileLock

    root = _run_root(tmp_path_factory)
    path = root / f"shared-{key}.json"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return json.loads(path.read_text())
        value = compute()
        path.write_text(json.dumps(value))
        return value


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """``shared(key, compute)``: see :func:`shared_json`."""
    return lambda key, compute: shared_json(tmp_path_factory, key, compute)


@pytest.fixture(scope="session")
def smollm2_path():
    from sglang_fairkv import embedded_model

    return embedded_model.prepare()


@pytest.fixture(scope="session")
def kvpress_python(tmp_path_factory):
    """The kvpress oracle's interpreter (``.venv-kvpress``, built by scripts/kvpress_venv.sh once;
    one worker builds it, the other waits on the lock)."""
    import subprocess

    from filelock import FileLock

    repo = Path(__file__).resolve().parents[1]
    with FileLock(str(_run_root(tmp_path_factory) / "kvpress-venv.lock")):
        r = subprocess.run(["bash", str(repo / "scripts" / "kvpress_venv.sh")], capture_output=True,
                           text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return repo / ".venv-kvpress" / "bin" / "python"


@pytest.fixture(scope="session")
def fairkv_prompts(smollm2_path):
    """Two retrieval-style SmolLM2 prompts of 600 and 1100 tokens."""
    from helpers.fairkv_refs import long_prompt_ids

    return [long_prompt_ids(smollm2_path, 600, 1), long_prompt_ids(smollm2_path, 1100, 2)]


@pytest.fixture(scope="session")
def fairkv_references(smollm2_path, kvpress_python, fairkv_prompts, tmp_path_factory):
    """kvpress (adakv, snapkv) and HF full-cache greedy outputs for the fairkv server tests; computed
    once per run (by the first worker that needs them)."""
    from helpers.fairkv_refs import references

    return shared_json(tmp_path_factory, "fairkv-references", lambda: references(
        smollm2_path, kvpress_python, fairkv_prompts, tmp_path_factory.mktemp("kvp")))


@pytest.fixture(scope="session")
def decode_prompts(smollm2_path):
    """Retrieval prompts of 600, 1100 and 1700 tokens for the decode-time compression tests (the 600 / 1100
    ones are ``fairkv_prompts``)."""
    from helpers.fairkv_refs import long_prompt_ids

    return {n: long_prompt_ids(smollm2_path, n, seed) for n, seed in ((600, 1), (1100, 2), (1700, 3))}


def shared_model(tmp_path_factory, name: str, **kw) -> Path:
    """A tiny local checkpoint built once per run in the folder every worker shares."""
    from filelock import FileLock

    dest = _run_root(tmp_path_factory) / "models" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        return build_llama(dest, **kw)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """2 layers, 4 query / 2 KV heads (divisible by TP=2), head_dim 32."""
    return shared_model(tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="module")
def smollm2_server():
    """One default server (no --model-path: the embedded SmolLM2, CPU defaults)."""
    with Server([]) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_kv6_path(tmp_path_factory):
    """3 layers, 12 query / 6 KV heads (GQA 2), head_dim 16, MLP 384: every head layout over TP 2
    and 3 (sha splits it evenly at both). Per-head query scales make AdaKV keep unequal counts: in
    layer ``l`` heads ``2l, 2l+1`` attend flat and keep about a third of the others' tokens, so sha at
    TP 3 puts both light heads on one rank in every layer (memory balanced over layers, attention not)."""
    scales = [np.roll([0.05, 0.05, 4.0, 4.0, 4.0, 4.0], 2 * l).tolist() for l in range(3)]
    return shared_model(tmp_path_factory, "tiny-kv6", num_layers=3, hidden=192, num_heads=12,
                        num_kv_heads=6, head_dim=16, intermediate=384, q_head_scales=scales)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """With ``--dist loadgroup``, xdist renames grouped items ``nodeid@group``; pytest 9.2 made node ids
    read-only and the grouping silently stopped (two workers then each start a module's server). Fail
    loudly instead of running the suite twice as slow."""
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist did not group {len(lost)} tests (e.g. {lost[0]}): this pytest "
                                "version breaks --dist loadgroup; use the pinned pytest (requirements/)")
