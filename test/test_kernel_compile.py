"""The Triton kernels as a GPU would compile them, without a GPU.

Every launch the wrappers make is recorded (the interpreted kernels' ``run`` replaced by a recorder, so
nothing executes) with the arguments, constexprs and alignments they really pass; then

* **no recompiles while serving**: the JIT's own cache key (Triton's binder for a CUDA target: the
  specialisation of each argument -- ints ``== 1`` become constexprs, ints and pointers divisible by 16
  are marked -- plus the options) is computed for a sequence of decode steps through the backend with
  varying batch sizes, segment counts and layers. Each kernel must have one key per static shape:
  every integer that varies between steps or layers is in its ``do_not_specialize`` list;
* **ahead-of-time compile** for sm_80, sm_90a and sm_100a (``triton.compile`` with Triton's NVIDIA
  backend and the wheel's ptxas, ``ptxas -v``) at the shapes of SmolLM2, Llama-8B, Mistral-24B and
  Llama-70B at TP 8: the test fails on a compile error or a register spill and prints registers and
  shared memory per kernel.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers.backend_harness import Geometry, decode_batch, extend_batch, layer, make_backend, qkv, use_cuda_branch

KERNEL_MODULES = ("sglang_fairkv_kernels.ragged_decode", "sglang_fairkv_kernels.decode_step")


def _kernels() -> dict:
    """Every Triton kernel of ``sglang_fairkv_kernels``: name -> its (interpreted) function object."""
    out = {}
    for name in KERNEL_MODULES:
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if attr.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "run"):
                out[attr] = obj
    assert {"_plan_kernel", "_paged_split_kernel", "_paged_merge_kernel", "_apply_writes_kernel",
            "_decode_step_kernel"} <= set(out), sorted(out)
    return out


@contextmanager
def recording(execute: bool):
    """Record every launch ``(kernel name, args, kwargs)``; ``execute=False``: do not run them."""
    launches: list = []
    kernels = _kernels()
    saved = {n: k.run for n, k in kernels.items()}

    def make(name, orig):
        def run(*args, grid, warmup, **kwargs):
            launches.append((name, args, dict(kwargs)))
            return orig(*args, grid=grid, warmup=warmup, **kwargs) if execute else None
        return run

    try:
        for n, k in kernels.items():
            k.run = make(n, saved[n])
        yield launches
    finally:
        for n, k in kernels.items():
            k.run = saved[n]


def _jit(kernel):
    """A compiling ``JITFunction`` of the same Python function and ``do_not_specialize`` lists."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):  # not interpreted: the kernel itself
        return kernel
    kw = {k: kernel.kwargs.get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    return JITFunction(kernel.fn, **{k: v for k, v in kw.items() if v})


def _binder(kernel, arch: int = 90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit(kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)


def cache_keys(launches) -> dict[str, set]:
    """The JIT cache key (specialisation + options, as ``JITFunction.run`` computes it for a CUDA
    target) of every recorded launch, per kernel."""
    kernels = _kernels()
    binders = {n: _binder(k)[2] for n, k in kernels.items()}
    keys: dict[str, set] = {}
    for name, args, kwargs in launches:
        _, spec, options = binders[name](*args, **kwargs)
        keys.setdefault(name, set()).add(str(spec) + str(sorted(options.items())))
    return keys


def test_a_serving_sequence_compiles_each_kernel_once():
    """Decode steps through the backend's CUDA branch (interpreted) with batch sizes 1, 2, 3, 5 and 16
    slots -- so every count of the step's table writes, 1 / 16-multiples / others among them -- over all
    layers, and lengths that grow past page boundaries: one JIT cache key per kernel."""
    geo = Geometry(layers=3, q_heads=6, kv_heads=2, head_dim=16, max_reqs=20, max_context=512,
                   max_total_tokens=8192)
    b = make_backend(geo, "snapkv", 0.5)
    gen = torch.Generator().manual_seed(0)
    reqs = list(range(1, 17))
    for r in reqs:  # prompts of different lengths
        n = 20 + 7 * r
        fb = extend_batch(b, [r], [0], [n], [n])
        b.init_forward_metadata(fb)
        for lid in range(geo.layers):
            b.forward_extend(*qkv(geo, n, gen), layer(geo, lid), fb)
    use_cuda_branch(b)
    b.pool.fused_step = True
    with recording(execute=True) as launches:
        for batch in ([1], [1, 2], [3, 4, 5], [1, 2, 3, 4, 5], reqs, [2, 7, 9], reqs):
            fb = decode_batch(b, batch)
            b.init_forward_metadata(fb)
            for lid in range(geo.layers):
                b.forward_decode(*qkv(geo, len(batch), gen), layer(geo, lid), fb)
    names = {n for n, _, _ in launches}
    assert names == {"_plan_kernel", "_paged_split_kernel", "_paged_merge_kernel", "_apply_writes_kernel",
                     "_decode_step_kernel"}, names
    keys = cache_keys(launches)
    assert {n: len(k) for n, k in keys.items()} == {n: 1 for n in names}, keys
    # the check can tell: without do_not_specialize the write counts alone give several variants
    kern = _kernels()["_apply_writes_kernel"]
    saved = kern.kwargs["do_not_specialize"]
    kern.kwargs["do_not_specialize"] = None
    try:
        assert len(cache_keys([x for x in launches if x[0] == "_apply_writes_kernel"])["_apply_writes_kernel"]) > 1
    finally:
        kern.kwargs["do_not_specialize"] = saved
    for r in reqs:
        b.state.release(r)


#: (model, pool KV heads per rank H, query heads per KV head G, head dim D), bf16 pools
MODELS = [("SmolLM2-135M", 3, 3, 64), ("Llama-3.1-8B", 8, 4, 128), ("Mistral-Small-24B", 8, 4, 128),
          ("Llama-3.1-70B TP8", 1, 8, 128)]
ARCHS = [(80, "sm_80"), (90, "sm_90a"), (100, "sm_100a")]


#: the pool's row dtypes: the model's (bf16), and fp8 (``--kv-cache-dtype fp8_*``: the split kernel
#: loads fp8 rows and widens them in registers); sm_80 has no e4m3 conversion (Triton's fp8e4nv needs
#: sm_89+), so e4m3 pools there are refused at start-up and only e5m2 is compiled for it
KV_DTYPES = {"bf16": None, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_dtypes_for(arch: int) -> list[str]:
    return [k for k in KV_DTYPES if not (k == "fp8_e4m3" and arch < 89)]


def _model_launches(H: int, G: int, D: int, kv: str = "bf16") -> list:
    """The launches a server of this shape makes in one decode step (recorded, not run): the step's
    table writes and metadata, its plan, one layer's split and merge (over rows of ``kv``)."""
    from sglang_fairkv_kernels import DecodeWorkspace, apply_table_writes, decode_step, paged_decode, plan_decode

    L, R, MP, B, P = 4, 8, 9, 4, 16
    dt = torch.bfloat16
    seg_pages = torch.zeros(R, L, H, MP, dtype=torch.int32)
    seg_len = torch.zeros(R, L, H, dtype=torch.int32)
    active = torch.zeros(R, L, H, dtype=torch.bool)
    k_rows = torch.zeros(64 * P, D, dtype=dt)
    ws = DecodeWorkspace.create(max_batch=R, num_heads=H, group=G, head_dim=D, num_layers=L, device="cpu",
                                target_programs=528)
    idx = torch.arange(1, B + 1)
    with recording(execute=False) as launches:
        apply_table_writes(torch.zeros(64, dtype=torch.int64), 5, 7, 3, seg_pages.view(-1), seg_len.view(-1),
                           active.view(-1))
        decode_step(idx, seg_pages, seg_len, active, P, torch.zeros(L, B, H, dtype=torch.int64),
                    torch.zeros(B, L, H, dtype=torch.int32), torch.zeros(B, dtype=torch.int64))
        plan_decode(seg_len, idx, ws)
        q = torch.zeros(B, H * G * D, dtype=dt).view(B, H, G, D)
        rows = k_rows if KV_DTYPES[kv] is None else k_rows.to(KV_DTYPES[kv])
        paged_decode(q, rows, rows, seg_pages, seg_len, idx, 1, D ** -0.5, ws, P, planned=True, k_scale=0.5,
                     v_scale=2.0)
    return launches


def _ptxas_report(ptx: str, arch: int, gpu_name: str) -> dict[str, dict]:
    """``ptxas -v`` of a PTX module (the Triton wheel's ptxas): registers, spill bytes, shared memory."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([tool, "-v", f"--gpu-name={gpu_name}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout + r.stderr
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    smem = [int(x) for x in re.findall(r"(\d+) bytes smem", text)]
    assert regs, text
    return {"regs": max(regs), "spill": max(spills or [0]), "smem": max(smem or [0])}


def aot_table(arch: int, gpu_name: str) -> list[dict]:
    """Compile every kernel for every model shape for ``gpu_name`` exactly as the JIT would (the
    specialisation of the recorded launch). Runs in a process without ``TRITON_INTERPRET`` (the
    kernels are then compiling ``JITFunction`` objects; the wrappers' device guard is lifted so they
    launch -- i.e. record -- on CPU tensors, and the interpreter-only bf16 upcast stays off)."""
    from triton import compile as triton_compile
    from triton.compiler import ASTSource

    rd = importlib.import_module("sglang_fairkv_kernels.ragged_decode")
    rd._INTERPRET = True  # the guard only: nothing runs (recording(execute=False))
    kernels = _kernels()
    done: dict = {}
    rows = []
    for (model, H, G, D), kv in [(m, kv) for m in MODELS for kv in kv_dtypes_for(arch)]:
        for name, args, kwargs in _model_launches(H, G, D, kv):
            if "DOT_F32" in kwargs:
                kwargs["DOT_F32"] = False  # on CUDA the dots take the 16-bit inputs
            jit, backend, binder = _binder(kernels[name], arch)
            bound, spec, options = binder(*args, **kwargs)
            key = (name, str(spec), str(sorted(options.items())))
            if key not in done:
                opts, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
                src = ASTSource(jit, signature, constexprs, attrs)
                compiled = triton_compile(src, target=backend.target, options=opts.__dict__)
                done[key] = _ptxas_report(compiled.asm["ptx"], arch, gpu_name)
                done[key]["smem_triton"] = compiled.metadata.shared
            rows.append({"arch": gpu_name, "model": model, "kv": kv, "kernel": name, **done[key]})
    return rows


@pytest.mark.parametrize("arch,gpu_name", ARCHS, ids=[a[1] for a in ARCHS])
def test_kernels_compile_ahead_of_time_without_spills(arch, gpu_name):
    """Each kernel, for each model shape, compiled for ``gpu_name`` as the JIT would: no compile error,
    no spill; registers / spills / shared memory printed (``pytest -s``)."""
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, __file__, str(arch), gpu_name], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert {x["kernel"] for x in rows} == set(_kernels()) and {x["model"] for x in rows} == {m[0] for m in MODELS}
    assert {x["kv"] for x in rows} == set(kv_dtypes_for(arch))
    print(f"\n{gpu_name}: kernel (model, KV rows): registers / spill bytes / shared memory bytes")
    for x in rows:
        print(f"  {x['kernel']} ({x['model']}, {x['kv']}): {x['regs']} / {x['spill']} / {x['smem_triton']}")
    assert not [x for x in rows if x["spill"]], rows


if __name__ == "__main__":  # the AOT compile, in a process without TRITON_INTERPRET
    import json
    import sys

    print(json.dumps(aot_table(int(sys.argv[1]), sys.argv[2])))
