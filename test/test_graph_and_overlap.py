"""CUDA-graph decode and overlap scheduling, checked without CUDA.

Graph replay equivalence: "capture" = the backend's out-of-graph capture metadata, then the in-graph
part (each layer's ``forward_decode``, the Triton kernel interpreted) run once on the static buffers;
"replay" = the out-of-graph part refills those buffers from SGLang's padded batch view for another batch
(different requests and lengths, padding slots, a request whose copied head is served by another
rank's replica) and the same in-graph part runs again. Every replay must equal a fresh eager step of a
twin backend over the same pool contents, padding slots must give zeros and leave every real row alone,
and the buffers must never be reallocated.

Deferred free: a request's pages released while a step is in flight are not handed out until that step
has ended (the pool's explicit step window).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.backend_harness import Geometry, decode_batch, extend_batch, layer, make_backend, qkv, use_cuda_branch
from sglang_fairkv.kv.ragged_pool import RaggedKVPool

GEO = Geometry(layers=2, q_heads=4, kv_heads=2, head_dim=16, max_reqs=10, max_context=512)
PROMPTS = {1: 40, 2: 17, 3: 64, 5: 33, 6: 90}
INACTIVE = (5, 1, 1)  # request 5 head 1 in layer 1: a copy served by another rank replica


#: decode-time compression small enough to run inside the replay test's four steps (a request reaching 3 decode
#: steps is cut to 12 rows per head)
DECODE = dict(decode_method="snapkv", decode_budget=12, decode_interval=3, decode_window=2)


def twin(seed: int = 0, fused: bool = False, store=None, decode: bool = False):
    """A backend on the CUDA branch with the prompts prefilled (same K/V for every twin). ``fused``: the
    pool's step runs as on CUDA, two Triton launches (interpreted) instead of torch ops; ``store``: the
    rows' dtype (fp8: ``--kv-cache-dtype fp8_e4m3``); ``decode``: with decode-time compression (:data:`DECODE`)."""
    b = make_backend(GEO, store_dtype=store, **(DECODE if decode else {}))
    use_cuda_branch(b, min_split=32, block_n=16)
    b.pool.fused_step = fused
    st, gen = b.state, torch.Generator().manual_seed(seed)
    r, l, h = INACTIVE
    for req, n in PROMPTS.items():
        st.requests.target_len[req] = n
        st.admit(req, f"req{req}", n)
    mask = np.ones((GEO.layers, GEO.kv_heads), dtype=np.bool_)
    mask[l, h] = False
    st.pool.free(r)
    st.pool.set_active(r, mask)
    fb = extend_batch(b, list(PROMPTS), [0] * len(PROMPTS), list(PROMPTS.values()), list(PROMPTS.values()))
    b.init_forward_metadata(fb)
    for lid in range(GEO.layers):
        q, k, v = qkv(GEO, sum(PROMPTS.values()), gen)
        b.forward_extend(q, k, v, layer(GEO, lid), fb)
    return b


def replay_view(reqs: list[int], bs: int):
    """SGLang's padded batch view of a replay (``build_replay_fb_view`` + our hook's host indices)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    padded = torch.zeros(bs, dtype=torch.int64)
    padded[:len(reqs)] = torch.tensor(reqs)
    return SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=bs, num_padding=bs - len(reqs),
                           req_pool_indices=padded, req_pool_indices_cpu=torch.tensor(reqs, dtype=torch.int64))


def in_graph(b, bs: int, gen: torch.Generator, q_real=None):
    """The captured part: every layer's forward_decode on the current metadata. ``q_real``: per layer
    the real slots' (q, k, v); padding slots get random q/k/v (their results must not matter)."""
    outs = []
    for lid in range(GEO.layers):
        q, k, v = qkv(GEO, bs, gen)
        if q_real is not None:
            qr, kr, vr = q_real[lid]
            q[:qr.shape[0]], k[:qr.shape[0]], v[:qr.shape[0]] = qr, kr, vr
        outs.append(b.forward_decode(q, k, v, layer(GEO, lid), None))
    return outs


def _raw(rows: torch.Tensor) -> torch.Tensor:
    """Rows as bytes where they are fp8 (no comparison kernels for float8 on the CPU)."""
    return rows.view(torch.uint8) if rows.element_size() == 1 else rows


@pytest.mark.parametrize("fused,store,decode", [(False, None, False), (True, None, False),
                                                (True, torch.float8_e4m3fn, False), (True, None, True)],
                         ids=["torch-step", "fused-step", "fused-step-fp8-rows", "fused-step-decode-compress"])
def test_graph_replay_equals_eager_steps_and_never_reallocates(fused, store, decode):
    """Graph replays (static buffers, padding slots) equal eager steps of a twin, with the pool's step
    in torch ops or in the fused Triton launches (the CUDA path), over model-dtype or fp8 rows: same
    outputs, same tables, same rows. With decode-time compression the queries reach the ring through the
    static slot buffer (padding slots on the padding row 0) and the compressions between steps (outside
    the graph) leave both twins alike."""
    eager, graph = twin(store=store, decode=decode), twin(fused=fused, store=store, decode=decode)
    gen = torch.Generator().manual_seed(1)
    graph.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    buffers = [t.data_ptr() for t in graph.graph_buffers()]
    bs = 4
    capture = SimpleNamespace(forward_mode=replay_view([], bs).forward_mode, batch_size=bs,
                              req_pool_indices=torch.zeros(bs, dtype=torch.int64))
    graph.init_forward_metadata_out_graph(capture, in_capture=True)
    before = _raw(graph.pool.k_rows[graph.pool.page_size:]).clone()
    for o in in_graph(graph, bs, gen):
        assert not o.any()  # capture: empty slots attend nothing
    assert torch.equal(_raw(graph.pool.k_rows[graph.pool.page_size:]), before)  # and write only the sink page
    md_capture = graph.forward_metadata

    steps = [[1, 2, 5], [3, 6, 1, 2], [5, 6], [2, 3, 5, 6]]  # different batches, lengths, padding
    for reqs in steps:
        real = [qkv(GEO, len(reqs), gen) for _ in range(GEO.layers)]
        fb = decode_batch(eager, reqs)
        eager.init_forward_metadata(fb)
        want = [eager.forward_decode(*real[lid], layer(GEO, lid), fb) for lid in range(GEO.layers)]
        graph.init_forward_metadata_out_graph(replay_view(reqs, bs))
        assert graph.forward_metadata is md_capture  # the captured views, refilled in place
        got = in_graph(graph, bs, gen, real)
        for lid in range(GEO.layers):
            assert torch.allclose(got[lid][:len(reqs)], want[lid], atol=1e-5), (reqs, lid)
            assert not got[lid][len(reqs):].any()  # padding slots give zeros
        # the copied head's segment (served elsewhere) gives zeros and stays empty
        if INACTIVE[0] in reqs:
            i = reqs.index(INACTIVE[0])
            g = GEO.q_heads // GEO.kv_heads
            head = got[INACTIVE[1]][i].view(GEO.q_heads, GEO.head_dim)[INACTIVE[2] * g:(INACTIVE[2] + 1) * g]
            assert not head.any()
            assert graph.pool.seg_len_host[INACTIVE] == 0
        # same pool contents and tables as the eager twin (padding wrote only the sink page)
        assert np.array_equal(graph.pool.seg_len_host, eager.pool.seg_len_host)
        assert torch.equal(graph.pool.seg_len, eager.pool.seg_len)
        assert torch.equal(graph.pool.seg_pages, eager.pool.seg_pages)
        assert torch.equal(graph.pool.active, eager.pool.active)
        P = graph.pool.page_size
        assert torch.equal(_raw(graph.pool.k_rows[P:]), _raw(eager.pool.k_rows[P:]))
        assert torch.equal(_raw(graph.pool.v_rows[P:]), _raw(eager.pool.v_rows[P:]))
        if decode:  # the same queries in the ring (row 0: padding), then the same compressions
            ring_e, ring_g = eager.state.decode_ring, graph.state.decode_ring
            assert torch.equal(ring_g[1:], ring_e[1:])
            assert np.array_equal(eager.decode_press.pending if eager.decode_press.pending is not None else [],
                                  graph.decode_press.pending if graph.decode_press.pending is not None else [])
            eager.run_pending_compression()
            graph.run_pending_compression()
            assert np.array_equal(graph.pool.seg_len_host, eager.pool.seg_len_host)
            assert torch.equal(graph.pool.seg_len, eager.pool.seg_len)
    if decode:
        assert graph.state.decode_stats["request_compressions"] >= 3
        assert graph.state.decode_stats == eager.state.decode_stats
    assert graph.pool.k_rows.dtype == (store or torch.float32)
    assert [t.data_ptr() for t in graph.graph_buffers()] == buffers  # never reallocated
    assert graph.state.host_index_readbacks == 0


def test_released_pages_wait_for_the_step_in_flight():
    """Explicit step window on the pool: pages of a request released while step 1 is in flight are not
    handed to another request during step 1; once step 2 begins (step 1 over) they are reused."""
    pool = RaggedKVPool(num_pages=12, page_size=4, num_layers=1, num_kv_heads=1, head_dim=2, max_reqs=4,
                        max_context=64, dtype=torch.float32)
    pool.set_active(1)
    pool.extend([1], [16])  # 4 pages
    held = set(pool.seg_pages_host[1, 0, 0, :4].tolist())
    pool.begin_step()  # step 1 launched; it may read request 1's pages
    assert pool.free(1) == 4
    assert pool.limbo_pages() == 4 and pool.used_pages() == 0 and pool.free_page_count() == 11
    pool.set_active(2)
    pool.extend([2], [16])  # during step 1: must come from elsewhere
    got = set(pool.seg_pages_host[2, 0, 0, :4].tolist())
    assert not got & held
    pool.begin_step()  # step 2: step 1 has finished
    assert pool.limbo_pages() == 0
    pool.set_active(3)
    pool.extend([3], [16])
    assert set(pool.seg_pages_host[3, 0, 0, :4].tolist()) <= held | set(range(1, 12))
    pool.free(2)
    pool.free(3)
    pool.begin_step()
    assert pool.used_pages() == 0 and pool.free_page_count() == pool.usable_pages and pool.limbo_pages() == 0


def test_a_pool_short_of_pages_waits_for_limbo_instead_of_failing():
    """When only released pages would satisfy an allocation, the pool waits for the step that may read
    them (an event on CUDA; at once on a CPU, whose steps are synchronous) rather than raising."""
    pool = RaggedKVPool(num_pages=5, page_size=4, num_layers=1, num_kv_heads=1, head_dim=2, max_reqs=4,
                        max_context=64, dtype=torch.float32)
    pool.set_active(1)
    pool.extend([1], [16])
    pool.begin_step()
    pool.free(1)
    pool.set_active(2)
    pool.extend([2], [16])  # all 4 usable pages are in limbo
    assert pool.used_pages() == 4 and pool.limbo_pages() == 0


def test_release_events_are_recorded_on_the_forward_stream(monkeypatch):
    """Under SGLang's overlap scheduler the forward runs on its own stream and requests are released
    from the scheduler's: the release event must follow the forward stream (the one current when the
    step was launched), not the releasing caller's. CUDA's stream and event objects are stand-ins here;
    the pool takes its CUDA branch."""
    recorded, current = [], {"stream": "forward-stream"}

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def query(self):
            return True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    pool = RaggedKVPool(num_pages=12, page_size=4, num_layers=1, num_kv_heads=1, head_dim=2, max_reqs=4,
                        max_context=64, dtype=torch.float32)
    pool.set_active(1)
    pool.extend([1], [8])
    pool.device = torch.device("cuda")  # the CUDA branch of begin_step / release (no tensor touched)
    pool.begin_step()  # launched on the forward stream
    current["stream"] = "schedule-stream"  # the scheduler releases from its own stream
    pool.free(1)
    assert recorded == ["forward-stream"]
    pool.begin_step()  # the event has completed: pages back
    assert pool.limbo_pages() == 0 and pool.free_page_count() == pool.usable_pages
