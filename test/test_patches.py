"""The CPU compatibility patches, each against an independent reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sglang_fairkv_patches as patches
from sglang_fairkv.serving import hooks, machine
from sglang_fairkv_patches import fork_children, pynccl_cpu


def test_cpu_omp_bind_splits_cores():
    assert machine.cpu_omp_bind(2, [0, 1]) == "0|1"
    assert machine.cpu_omp_bind(2, [0, 1, 2, 3]) == "0,1|2,3"
    assert machine.cpu_omp_bind(3, [0, 1]) == "0|1|0"
    assert machine.cpu_omp_bind(1, [4, 5]) == "4,5"


@pytest.mark.parametrize("affinity,cpus,tp,want", [
    ({1}, 2, 1, "1"),            # a launcher confined to core 1 (taskset, a test worker): TP 1 stays there
    ({1}, 2, 2, "1|1"),
    ({0, 1}, 2, 1, None),        # all cores: SGLang's own TP 1 default
    ({0, 1}, 2, 2, "0|1"),
])
def test_cpu_environment_binds_within_the_launchers_cores(monkeypatch, affinity, cpus, tp, want):
    # a private environment: the variable must not leak into servers this worker starts later
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_CPU_OMP_THREADS_BIND"}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(patches, "enable_cpu_startup_patches", lambda: None)
    machine.configure_cpu_environment(tp)
    assert env.get("SGLANG_CPU_OMP_THREADS_BIND") == want


def test_cpu_children_fork_unless_told_to_spawn(monkeypatch):
    """A CPU launcher starts SGLang's children by fork (they inherit its imports); spawn on request
    or on CUDA; a bad value is refused. The hook really changes the start method SGLang set."""
    import multiprocessing as mp

    monkeypatch.delenv("FAIRKV_CPU_START_METHOD", raising=False)
    fork = hooks.Hook("sglang.srt.entrypoints.engine._set_envs_and_config", fork_children.fork_children_hook,
                      "AFTER")
    assert fork in hooks.launcher_hooks(on_cpu=True)
    assert fork not in hooks.launcher_hooks(on_cpu=False)
    monkeypatch.setenv("FAIRKV_CPU_START_METHOD", "spawn")
    assert fork not in hooks.launcher_hooks(on_cpu=True)
    monkeypatch.setenv("FAIRKV_CPU_START_METHOD", "forkserver")
    with pytest.raises(ValueError, match="FAIRKV_CPU_START_METHOD must be fork or spawn"):
        hooks.launcher_hooks(on_cpu=True)
    before = mp.get_start_method(allow_none=True)
    try:
        mp.set_start_method("spawn", force=True)
        fork_children.fork_children_hook(None)
        assert mp.get_start_method() == "fork"
    finally:
        mp.set_start_method(before, force=True)


def test_cpu_pythonpath_puts_stand_in_first_once():
    p = patches.cpu_pythonpath("/a" + os.pathsep + str(patches.CPU_PATH))
    assert p.split(os.pathsep) == [str(patches.CPU_PATH), "/a"]


def test_pynccl_hook_forces_false_positional_and_keyword():
    args, kwargs = pynccl_cpu.force_no_pynccl([[0, 1]], 0, "gloo", True, group_name="tp")
    assert args[3] is False and kwargs == {"group_name": "tp"}
    args, kwargs = pynccl_cpu.force_no_pynccl([[0, 1]], 0, "gloo", use_pynccl=True)
    assert kwargs["use_pynccl"] is False and len(args) == 3


def _run_with_cpu_patches(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter set up like a CPU scheduler process."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1",
                               "PYTHONPATH": patches.cpu_pythonpath(os.environ.get("PYTHONPATH"))})


def test_pynccl_hook_applies_to_sglang_and_is_verified():
    """The hook is installed on SGLang's real function, and a group built on CPU has no PyNccl."""
    code = (
        "from sglang_fairkv.serving import hooks\n"
        "t = hooks.apply_hooks([h for h in hooks.scheduler_hooks(on_cpu=True) if 'pynccl' in h.fn.__module__])\n"
        "import sglang.srt.distributed.parallel_state as ps\n"
        "seen = {}\n"
        "class Stop(Exception): pass\n"
        "def fake(**kw):\n"
        "    seen.update(kw); raise Stop\n"
        "ps.GroupCoordinator = fake\n"
        "try:\n"
        "    ps.init_model_parallel_group([[0, 1]], 0, 'gloo')\n"
        "except Stop:\n"
        "    pass\n"
        "print(t, seen['use_pynccl'])\n"
    )
    out = _run_with_cpu_patches(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("False"), out.stdout
    assert pynccl_cpu.TARGET in out.stdout


def test_unapplied_hook_refuses_to_start():
    code = (
        "from sglang_fairkv.serving import hooks\n"
        "hooks.apply_hooks([*hooks.scheduler_hooks(on_cpu=True), hooks.Hook('sglang.srt.no_such_module.fn', "
        "lambda *a, **k: None, 'BEFORE')])\n"
    )
    out = _run_with_cpu_patches(code)
    assert out.returncode != 0
    assert "did not apply to ['sglang.srt.no_such_module.fn']" in out.stderr


def test_torchvision_imports_in_this_venv():
    out = subprocess.run([sys.executable, "-c", "import torchvision, transformers;"
                          "from transformers import LlamaConfig; print('ok')"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _random_assign_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    rows, pool_len, bs = 9, 64, 5
    req_pool_indices = torch.randperm(rows, generator=g)[:bs].to(torch.int64)
    start = torch.randint(0, 30, (bs,), generator=g)
    end = start + torch.randint(0, 30, (bs,), generator=g)
    total = int((end - start).sum())
    out_cache_loc = torch.randint(1, 10_000, (total,), generator=g)
    table = torch.full((rows, pool_len), -1, dtype=torch.int32)
    return req_pool_indices, table, start, end, out_cache_loc, bs


def test_sgl_kernel_stand_in_matches_sglang_triton_kernel(tmp_path):
    """assign_req_to_token_pool_cpu == SGLang's own Triton kernel (run under TRITON_INTERPRET=1)."""
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, %r)\n"
        "from test_patches import _random_assign_case\n"
        "from sglang.srt.mem_cache.allocation import assign_req_to_token_pool\n"
        "from sglang.srt.utils import next_power_of_2\n"
        "for seed in range(4):\n"
        "    idx, table, s, e, loc, bs = _random_assign_case(seed)\n"
        "    assign_req_to_token_pool[(bs,)](idx, table, s, e, loc, table.shape[1], next_power_of_2(bs))\n"
        "    torch.save(table, %r + f'/ref{seed}.pt')\n"
    ) % (os.path.dirname(__file__), str(tmp_path))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": patches.cpu_pythonpath(os.environ.get("PYTHONPATH"))}
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    sys.path.insert(0, str(patches.CPU_PATH))
    try:
        import sgl_kernel
    finally:
        sys.path.remove(str(patches.CPU_PATH))
    assert getattr(sgl_kernel, "FAIRKV_CPU_STAND_IN", False)
    for seed in range(4):
        idx, table, s, e, loc, _ = _random_assign_case(seed)
        sgl_kernel.assign_req_to_token_pool_cpu(idx, table, s, e, loc, table.shape[1])
        assert torch.equal(table, torch.load(tmp_path / f"ref{seed}.pt")), f"seed {seed}"
    with pytest.raises(NotImplementedError, match="sgl_kernel.silu_and_mul is a CUDA kernel"):
        sgl_kernel.silu_and_mul(torch.zeros(2))
