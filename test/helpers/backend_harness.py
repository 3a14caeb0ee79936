"""The fairkv attention backend driven directly (no SGLang server, no model): the real
``FairKVAttnBackend`` over a real ``FairKVCache``, fed SGLang-shaped forward batches and layers.

Used by ``test/test_decode_path.py`` (sync-free decode, graph-shaped metadata) and by
``benchmark/decode_host_ops.py`` (tensor ops, host time and syncs per layer, before/after).
Everything here goes through the backend's SGLang interface (``init_forward_metadata``,
``forward_extend``, ``forward_decode``), so the same harness runs against older trees.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass
class Geometry:
    layers: int = 4
    q_heads: int = 6
    kv_heads: int = 2
    head_dim: int = 16
    max_reqs: int = 12
    max_context: int = 1024
    max_total_tokens: int = 8192


def make_backend(geo: Geometry, method: str = "none", ratio: float | None = None, window: int = 8,
                 dtype=torch.float32, prefix_tier: float = 0.0, store_dtype=None, **decode):
    """A backend over a fresh pool (TP 1, every head on rank 0); ``prefix_tier`` > 0: with the dense
    prefix tier (no radix tree: a test hands prefixes over with ``state.tier_begin``); ``store_dtype``:
    the rows' dtype (fp8: ``--kv-cache-dtype fp8_*``; default ``dtype``); ``decode``: the
    ``CompressConfig`` decode fields (``decode_method=...``: decode-time compression)."""
    from sglang.srt.mem_cache.memory_pool import KVCache  # noqa: F401  (SGLang importable)

    from sglang_fairkv.attention.fairkv_backend import FairKVAttnBackend
    from sglang_fairkv.compress.policy import CompressConfig
    from sglang_fairkv.serving.kv_cache import FairKVCache
    from sglang_fairkv.serving.state import build_state
    from sglang_fairkv.placement.runtime import RankPlan, sha_plan

    cfg = CompressConfig(method=method, ratio=ratio, window=window, kernel=3, **decode)
    plan = sha_plan("harness", geo.layers, geo.kv_heads, geo.q_heads, 1)
    state = build_state(cfg, None, rank_plan=RankPlan(plan, 0, geo.q_heads), max_total_tokens=geo.max_total_tokens,
                        rows_per_token_budget=geo.layers * geo.kv_heads, page_size=16, head_dim=geo.head_dim,
                        max_reqs=geo.max_reqs, max_context=geo.max_context, dtype=dtype, device="cpu",
                        prefix_tier=prefix_tier, store_dtype=store_dtype, group=geo.q_heads // geo.kv_heads)
    cache = FairKVCache(state, size=geo.max_total_tokens, page_size=1, dtype=dtype, layer_num=geo.layers,
                        device="cpu")
    runner = SimpleNamespace(token_to_kv_pool=cache, device="cpu", model=SimpleNamespace(), dtype=dtype)
    return FairKVAttnBackend(runner)


def layer(geo: Geometry, lid: int):
    return SimpleNamespace(layer_id=lid, tp_q_head_num=geo.q_heads, tp_k_head_num=geo.kv_heads,
                           qk_head_dim=geo.head_dim, v_head_dim=geo.head_dim, scaling=geo.head_dim ** -0.5)


def use_cuda_branch(backend, kernel=None, **workspace_kw) -> None:
    """Switch a CPU backend to its CUDA decode branch: a static workspace for its pool and ``kernel``
    (default the Triton ``paged_decode``, interpreted on a CPU; a stand-in callable to count the ops
    around the launches: the step's plan is then a stand-in of one op too)."""
    from sglang_fairkv_kernels import DecodeWorkspace, paged_decode, plan_decode

    p = backend.pool
    workspace_kw.setdefault("group", max(1, backend_group(backend)))
    backend.workspace = DecodeWorkspace.create(max_batch=p.max_reqs, num_heads=p.num_kv_heads,
                                               head_dim=p.head_dim, num_layers=p.num_layers, device="cpu",
                                               **workspace_kw)
    backend._paged_decode = kernel or paged_decode

    def plan_stand_in(seg_len, idx, ws):  # one op stands for the plan's one launch
        ws.plan_chunk.zero_()
        ws.planned_batch = idx.shape[0]

    backend._plan_decode = plan_decode if kernel is None else plan_stand_in
    backend.decode_kernel = "triton"


def backend_group(backend) -> int:
    """Query heads per KV head of the harness model behind ``backend``."""
    plan = backend.state.rank_plan.plan
    return plan.num_q_heads // plan.num_kv_heads


def top_level_ops(fn) -> list[str]:
    """Names of the tensor ops ``fn`` issues (top-level aten calls, as ``torch.profiler`` records them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::") and
            (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


def extend_batch(backend, reqs: list[int], prefix: list[int], ext: list[int], target: list[int]):
    """A prefill forward batch (admits new requests with every segment active, as the prepare hook does)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    st = backend.state
    for r, p, t in zip(reqs, prefix, target):
        st.requests.target_len[r] = t
        if p == 0:
            st.admit(r, f"req{r}", t)
    idx = torch.tensor(reqs, dtype=torch.int64)
    return SimpleNamespace(forward_mode=ForwardMode.EXTEND, req_pool_indices=idx, req_pool_indices_cpu=idx,
                           extend_prefix_lens_cpu=list(prefix), extend_seq_lens_cpu=list(ext))


def decode_batch(backend, reqs: list[int]):
    """A decode forward batch carrying its host indices, as the ``ForwardBatch.init_new`` hook makes it."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    idx = torch.tensor(reqs, dtype=torch.int64)
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=idx,
                           req_pool_indices_cpu=torch.tensor(reqs, dtype=torch.int64))


def qkv(geo: Geometry, n: int, gen: torch.Generator, dtype=torch.float32):
    """Random q [n, Hq*D], k / v [n, H*D] as a model's attention layer passes them."""
    q = torch.randn(n, geo.q_heads * geo.head_dim, generator=gen).to(dtype)
    k = torch.randn(n, geo.kv_heads * geo.head_dim, generator=gen).to(dtype)
    v = torch.randn(n, geo.kv_heads * geo.head_dim, generator=gen).to(dtype)
    return q, k, v


#: host-sync entry points: (owner, attribute). (``numpy()`` of a device tensor raises by itself.)
SYNC_POINTS = [(torch.Tensor, n) for n in ("item", "__bool__", "__int__", "__float__", "__index__",
                                           "tolist", "nonzero", "cpu")] + [(torch, "nonzero")]


@contextlib.contextmanager
def sync_points(mode: str = "raise", counter: dict | None = None):
    """Make every host-sync entry point of torch raise (``mode="raise"``) or count its calls into
    ``counter`` (``mode="count"``) inside the block."""
    saved = [(o, n, getattr(o, n)) for o, n in SYNC_POINTS]

    def make(name, orig):
        def hooked(*a, **k):
            if mode == "raise":
                raise AssertionError(f"host sync inside the decode path: {name}")
            counter[name] = counter.get(name, 0) + 1
            return orig(*a, **k)
        return hooked

    try:
        for o, n, f in saved:
            setattr(o, n, make(n, f))
        yield
    finally:
        for o, n, f in saved:
            setattr(o, n, f)


def segments(backend, reqs) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Every segment of each request in ``reqs``: (length, K rows, V rows) per (layer, head), read through
    the host page table (an independent path from the device's)."""
    p = backend.pool
    out = []
    for r in reqs:
        for lid in range(p.num_layers):
            for h in range(p.num_kv_heads):
                n = int(p.seg_len_host[r, lid, h])
                rows = p.rows_of(r, lid, h, torch.arange(n))
                out.append((n, p.k_rows[rows].clone(), p.v_rows[rows].clone()))
    return out


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, calls: list | None = None):
    """CPU stand-in for ``causal.flash_varlen`` (the CUDA varlen flash op): per sequence ``i``, queries
    ``q[cu_q[i]:cu_q[i+1]]`` [n, Hq, D] over keys ``k[cu_k[i]:cu_k[i+1]]`` [t, H, D], lower-right causal,
    GQA, in float64; returns ``q``'s dtype. Reads ``cu_*`` on the host (a stand-in, not a kernel).
    ``calls`` records ``(T, K, Hq, H, max_q, max_k, b)`` per call."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and len(cq) == len(ck)
    assert q.shape[0] == cq[-1] and k.shape[0] == ck[-1] and q.shape[1] % k.shape[1] == 0
    if calls is not None:
        calls.append((q.shape[0], k.shape[0], q.shape[1], k.shape[1], max_q, max_k, len(cq) - 1))
    g = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].double().transpose(0, 1)  # [Hq, n, D]
        ki = k[ck[i]:ck[i + 1]].double().transpose(0, 1).repeat_interleave(g, 0)
        vi = v[ck[i]:ck[i + 1]].double().transpose(0, 1).repeat_interleave(g, 0)
        n, t = qi.shape[1], ki.shape[1]
        assert n <= max_q and t <= max_k
        allowed = torch.arange(t)[None, :] <= (t - n + torch.arange(n))[:, None]
        logits = (qi @ ki.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        out[cq[i]:cq[i + 1]] = (torch.softmax(logits, -1) @ vi).transpose(0, 1)
    return out.to(q.dtype)


def use_varlen(backend, monkeypatch, compute: bool = True, calls: list | None = None) -> None:
    """Switch a CPU backend to its CUDA prefill branch: one varlen call per layer, the kernel replaced by
    :func:`varlen_reference` (``compute=False``: a stand-in that only allocates the output, for op
    counts and memory)."""
    import sglang_fairkv.attention.causal as causal

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        if compute:
            return varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale, calls)
        if calls is not None:
            calls.append((q.shape[0], k.shape[0]))
        return q.new_empty(q.shape[0], q.shape[1], v.shape[2])

    monkeypatch.setattr(causal, "flash_varlen", fake)
    backend.prefill_varlen = True
