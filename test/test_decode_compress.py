"""Decode-time compression (``--kv-decode-compress``) below the server: the ragged scorer against the prompt
scorer run on each segment alone, the batched compaction against the one-request one, the admission bound
against simulated compressions, and the backend driven step by step against an independent per-segment
reference (kept positions, rows, attention, bounds, pages, host syncs). The kvpress equality end to end:
test_decode_compress_server."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.backend_harness import Geometry, decode_batch, extend_batch, layer, make_backend, sync_points

from sglang_fairkv.compress.decode_press import WINDOW_SCORE, select_adakv, select_uniform, window_scores
from sglang_fairkv.compress.policy import CompressConfig
from sglang_fairkv.compress.snapkv import SnapKVScorer


def ref_adakv(scores: list[torch.Tensor], T: int, alpha: float) -> list[list[int]]:
    """AdaKV over heads of unequal rows, one head at a time: a layer over ``KV x T`` keeps that many, each head
    first its top ``min(int(T alpha) or 1, n)``, then the best of the rest across heads."""
    kv = len(scores)
    if sum(len(s) for s in scores) <= kv * T:
        return [list(range(len(s))) for s in scores]
    n_safe = max(1, int(T * alpha)) if alpha > 0 else 0
    cand = []
    for h, s in enumerate(scores):
        safe = set(torch.topk(s, min(n_safe, len(s))).indices.tolist())
        cand += [(math.inf if i in safe else float(s[i]), h, i) for i in range(len(s))]
    cand.sort(key=lambda c: -c[0])
    kept: list[list[int]] = [[] for _ in range(kv)]
    for _, h, i in cand[:kv * T]:
        kept[h].append(i)
    return [sorted(k) for k in kept]


def test_ragged_scores_equal_the_prompt_scorer_on_each_segment():
    """Each (request, head) of a padded batch scores as SnapKV on its own rows would (the prompt scorer,
    itself checked against kvpress): pooled rows equal, window rows above everything, padding -inf."""
    g = torch.Generator().manual_seed(0)
    n, H, G, W, D = 3, 2, 3, 4, 8
    lens = torch.tensor([[9, 17], [30, 12], [5, 25]])
    S = int(lens.max())
    k = torch.randn(n, H, S, D, generator=g)
    q = torch.randn(n, H * G, W, D, generator=g)
    got = window_scores(q, k, lens, kernel=3)
    for i in range(n):
        for h in range(H):
            m = int(lens[i, h])
            want = SnapKVScorer(window=W, kernel=3).score(q[i, h * G:(h + 1) * G], k[i, h:h + 1, :m])[0]
            torch.testing.assert_close(got[i, h, :m - W], want[:m - W], rtol=1e-5, atol=1e-7)
            assert (got[i, h, m - W:m] == WINDOW_SCORE).all() and (got[i, h, :m - W] < WINDOW_SCORE).all()
            assert torch.isinf(got[i, h, m:]).all() and (got[i, h, m:] < 0).all()


def test_ragged_selection_equals_one_head_at_a_time():
    g = torch.Generator().manual_seed(1)
    lens = np.array([[40, 7, 22], [10, 10, 10], [3, 60, 31]])
    scores = torch.rand(3, 3, 60, generator=g)
    scores[torch.arange(60)[None, None] >= torch.as_tensor(lens)[..., None]] = float("-inf")
    order, counts = select_adakv(scores, lens, 12, 0.2)
    for i in range(3):
        want = ref_adakv([scores[i, h, :lens[i, h]] for h in range(3)], 12, 0.2)
        assert [order[i, h, :counts[i, h]].tolist() for h in range(3)] == want
    assert counts[1].tolist() == [10, 10, 10]  # 30 rows <= 3 x 12: nothing evicted
    kept, counts = select_uniform(scores, lens, 12)
    for i in range(3):
        for h in range(3):
            m = int(lens[i, h])
            assert kept[i, h, :counts[i, h]].tolist() == sorted(scores[i, h, :m].topk(min(12, m)).indices.tolist())


def test_compact_many_equals_one_segment_at_a_time():
    """Many segments of a layer in one gather / scatter move the same rows and free the same pages as the
    one-request compaction."""
    from sglang_fairkv.kv.ragged_pool import RaggedKVPool

    def pool():
        p = RaggedKVPool(num_pages=64, page_size=4, num_layers=2, num_kv_heads=2, head_dim=3, max_reqs=4,
                         max_context=64, dtype=torch.float32)
        for r in (1, 2):
            p.set_active(r)
        p.extend([1, 2], [23, 14])
        p.flush()
        p.k_rows.copy_(torch.arange(p.k_rows.numel(), dtype=torch.float32).view_as(p.k_rows))
        p.v_rows.copy_(-p.k_rows)
        return p

    kept = {(1, 0): [0, 5, 6, 21, 22], (1, 1): list(range(23)), (2, 0): [13], (2, 1): [2, 3, 4, 9, 10, 11, 12]}
    a, b = pool(), pool()
    for (r, h), pos in kept.items():
        a.compact(r, 1, [torch.tensor(pos)], [h])
    a.flush()
    width = max(len(p) for p in kept.values())
    padded = torch.tensor([p + [99] * (width - len(p)) for p in kept.values()])
    evicted = b.compact_many(np.array([r for r, _ in kept]), 1, np.array([h for _, h in kept]), padded,
                             np.array([len(p) for p in kept.values()]))
    b.flush()
    assert evicted == (23 - 5) + (14 - 1) + (14 - 7)
    assert (a.seg_len_host == b.seg_len_host).all() and a.free_page_count() == b.free_page_count()
    for (r, h), pos in kept.items():
        ra, rb = a.rows_of(r, 1, h, torch.arange(len(pos))), b.rows_of(r, 1, h, torch.arange(len(pos)))
        assert torch.equal(a.k_rows[ra], b.k_rows[rb]) and torch.equal(a.v_rows[ra], b.v_rows[rb])
    assert torch.equal(a.seg_len, b.seg_len)


@pytest.mark.parametrize("method", ["snapkv", "adakv"])
def test_admission_bound_holds_over_simulated_compressions(method):
    """``kept_pages`` with decode-time compression never undercharges: segments split over two ranks (and
    one head on neither), prompts kept whole then compressed every K steps with random scores; each rank's
    pages in every layer stay within the charge at every step, and the charge is below the uncompressed one."""
    from sglang_fairkv.compress.footprint import kept_pages

    cfg = CompressConfig(decode_method=method, decode_budget=20, decode_interval=8, decode_window=4)
    g = torch.Generator().manual_seed(2)
    L, KV, P, n, extra = 2, 5, 4, 30, 200
    owner = np.array([[0, 0, 1, 1, 1], [1, 0, 0, 1, 0]])
    charge = kept_pages(cfg, n, extra, owner, 2, P)
    assert (charge < kept_pages(CompressConfig(), n, extra, owner, 2, P)).all()
    lens = np.full((L, KV), n)
    history = [lens.copy()]
    for step in range(1, extra + 1):
        lens += 1
        if step % 8 == 0:
            for lid in range(L):
                sc = torch.rand(1, KV, int(lens[lid].max()), generator=g)
                sc[..., -4:] = WINDOW_SCORE
                sc[torch.arange(sc.shape[-1])[None, None] >= torch.as_tensor(lens[lid])[None, :, None]] = float("-inf")
                _, c = (select_uniform(sc, lens[lid][None], 20) if method == "snapkv"
                        else select_adakv(sc, lens[lid][None], 20, 0.2))
                lens[lid] = c[0]
        pages = np.zeros((2, L), dtype=np.int64)
        for lid in range(L):
            for h in range(KV):
                pages[owner[lid, h], lid] += -(-lens[lid, h] // P)
        assert (pages <= charge).all(), (step, pages, charge)
        history.append(lens.copy())
    # a live re-plan prices what each running request may still gain (footprint.decode_growth_bound)
    from sglang_fairkv.compress.footprint import decode_growth_bound

    hist = np.stack(history)  # [steps + 1, L, KV]
    for t in range(0, extra, 7):
        gain = (hist[t:] - hist[t]).max()
        assert gain <= decode_growth_bound(cfg, hist[t][None])[0], (t, gain)


def test_config_round_trip_and_words():
    from sglang_fairkv.compress.footprint import describe

    cfg = CompressConfig(method="adakv", ratio=0.5, decode_method="adakv", decode_budget=48, decode_interval=16,
                         decode_window=8)
    assert CompressConfig.from_json(cfg.to_json()) == cfg and cfg.decode_enabled and cfg.enabled
    words = describe(cfg)
    assert "every 16 steps" in words and "48 tokens" in words and "50% of each prompt" in words
    assert not CompressConfig().decode_enabled


# ---- the backend step by step --------------------------------------------------------------------------
GEO = Geometry(layers=3, q_heads=6, kv_heads=2, head_dim=16, max_reqs=8, max_context=512, max_total_tokens=8192)
T, K, W = 24, 10, 4  # K not a multiple of W: the ring wraps mid-interval


class Reference:
    """Every token's K / V / queries as the backend was given them, each segment's live positions, and what
    a decode-time compression keeps (the prompt scorer per segment, :func:`ref_adakv`)."""

    def __init__(self, method: str):
        self.method = method
        self.k: dict = {}  # (r, l) -> [positions, H, D]
        self.v: dict = {}
        self.q: dict = {}  # (r, l) -> list of [Hq, D] decode queries
        self.live: dict = {}  # (r, l) -> list over heads of position lists
        self.steps: dict = {}

    def add(self, r, lid, k, v, q=None):
        h, d = GEO.kv_heads, GEO.head_dim
        k, v = k.view(-1, h, d), v.view(-1, h, d)
        if (r, lid) not in self.k:
            self.k[r, lid], self.v[r, lid], self.q[r, lid] = k.clone(), v.clone(), []
            self.live[r, lid] = [list(range(k.shape[0])) for _ in range(h)]
            return
        n = self.k[r, lid].shape[0]
        self.k[r, lid] = torch.cat([self.k[r, lid], k])
        self.v[r, lid] = torch.cat([self.v[r, lid], v])
        self.q[r, lid].append(q.view(GEO.q_heads, d).clone())
        for pos in self.live[r, lid]:
            pos.append(n)

    def compress(self, r):
        g = GEO.q_heads // GEO.kv_heads
        for lid in range(GEO.layers):
            qw = torch.stack(self.q[r, lid][-W:], dim=1)  # [Hq, W, D]
            scores = [SnapKVScorer(window=W, kernel=3).score(qw[h * g:(h + 1) * g], self.k[r, lid][pos, h][None])[0]
                      for h, pos in enumerate(self.live[r, lid])]
            if self.method == "adakv":
                keep = ref_adakv(scores, T, 0.2)
            else:
                keep = [sorted(s.topk(min(T, len(s))).indices.tolist()) for s in scores]
            self.live[r, lid] = [[pos[i] for i in kp] for pos, kp in zip(self.live[r, lid], keep)]

    def attention(self, r, lid, q):
        """fp32 decode attention of ``q`` [Hq, D] over each head's live rows."""
        g, out = GEO.q_heads // GEO.kv_heads, []
        for h, pos in enumerate(self.live[r, lid]):
            kk, vv = self.k[r, lid][pos, h], self.v[r, lid][pos, h]
            p = torch.softmax(q[h * g:(h + 1) * g] @ kk.T / math.sqrt(GEO.head_dim), dim=-1)
            out.append(p @ vv)
        return torch.cat(out)


def run_step(be, ref, reqs, gen, check_attention=True, compress_ref=True):
    fb = decode_batch(be, reqs)
    be.init_forward_metadata(fb)
    for lid in range(GEO.layers):
        q = torch.randn(len(reqs), GEO.q_heads * GEO.head_dim, generator=gen)
        k = torch.randn(len(reqs), GEO.kv_heads * GEO.head_dim, generator=gen)
        v = torch.randn(len(reqs), GEO.kv_heads * GEO.head_dim, generator=gen)
        for i, r in enumerate(reqs):
            ref.add(r, lid, k[i], v[i], q[i])
        o = be.forward_decode(q, k, v, layer(GEO, lid), fb)
        if check_attention:
            for i, r in enumerate(reqs):
                want = ref.attention(r, lid, q[i].view(GEO.q_heads, -1))
                torch.testing.assert_close(o[i].view(GEO.q_heads, -1), want, rtol=1e-4, atol=1e-5)
    for r in reqs:
        ref.steps[r] = ref.steps.get(r, 0) + 1
        if ref.steps[r] % K == 0 and compress_ref:
            ref.compress(r)


def prefill(be, ref, reqs, lens, gen):
    fb = extend_batch(be, reqs, [0] * len(reqs), lens, lens)
    be.init_forward_metadata(fb)
    n = sum(lens)
    for lid in range(GEO.layers):
        q = torch.randn(n, GEO.q_heads * GEO.head_dim, generator=gen)
        k = torch.randn(n, GEO.kv_heads * GEO.head_dim, generator=gen)
        v = torch.randn(n, GEO.kv_heads * GEO.head_dim, generator=gen)
        be.forward_extend(q, k, v, layer(GEO, lid), fb)
        o = 0
        for r, m in zip(reqs, lens):
            ref.add(r, lid, k[o:o + m], v[o:o + m])
            o += m


@pytest.mark.parametrize("method", ["snapkv", "adakv"])
def test_backend_decode_compression_equals_the_per_segment_reference(method):
    """Three requests, the third admitted later (their intervals fall in different steps): after every
    step each segment holds exactly the reference's kept positions, in position order (rows compared), the
    next step's attention equals fp32 attention over them, rows stay within budget + interval per head
    (AdaKV: per layer) once compressed, the ledger equals the pool, and releasing returns every page."""
    be = make_backend(GEO, decode_method=method, decode_budget=T, decode_interval=K, decode_window=W)
    ref, gen = Reference(method), torch.Generator().manual_seed(3)
    pool, st = be.pool, be.state
    prefill(be, ref, [1, 2], [40, 70], gen)
    for _ in range(3):
        run_step(be, ref, [1, 2], gen)
        be.run_pending_compression()
    prefill(be, ref, [3], [100], gen)
    evicted_seen = 0
    for step in range(30):
        reqs = [1, 2, 3]
        run_step(be, ref, reqs, gen, check_attention=step % 5 == 0 or step % K in (0, 1))
        be.run_pending_compression()  # the ModelRunner.forward hook's call
        for r in reqs:
            for lid in range(GEO.layers):
                for h in range(GEO.kv_heads):
                    pos = ref.live[r, lid][h]
                    assert int(pool.seg_len_host[r, lid, h]) == len(pos)
                    rows = pool.rows_of(r, lid, h, torch.arange(len(pos)))
                    assert torch.equal(pool.k_rows[rows], ref.k[r, lid][pos, h])
                    assert torch.equal(pool.v_rows[rows], ref.v[r, lid][pos, h])
            if ref.steps[r] >= K:  # compressed at least once
                lens = pool.seg_len_host[r]
                if method == "snapkv":
                    assert lens.max() <= T + K
                else:
                    assert lens.sum(axis=1).max() <= GEO.kv_heads * (T + K)
        assert st.ledger_mismatch() is None
        evicted_seen = int(st.requests.decode_evicted[[1, 2, 3]].sum())
    assert evicted_seen > 0 and st.decode_stats["rows_evicted_total"] == evicted_seen
    assert st.decode_stats["request_compressions"] == sum(ref.steps[r] // K for r in (1, 2, 3))
    for r in (1, 2, 3):
        st.release(r)
    assert pool.used_pages() == 0 and pool.segment_pages() == 0


def test_decode_step_and_snapkv_pass_are_sync_free():
    """The decode step with the query ring and a SnapKV compression pass (counts known on the host) read
    nothing back; an AdaKV pass reads its counts once per layer and nothing else."""
    for method, allowed in (("snapkv", 0), ("adakv", GEO.layers)):
        be = make_backend(GEO, decode_method=method, decode_budget=T, decode_interval=K, decode_window=W)
        ref, gen = Reference(method), torch.Generator().manual_seed(4)
        prefill(be, ref, [1, 2], [50, 60], gen)
        for _ in range(K - 1):
            run_step(be, ref, [1, 2], gen, check_attention=False)
        counter: dict = {}
        with sync_points("raise" if allowed == 0 else "count", counter):
            run_step(be, ref, [1, 2], gen, check_attention=False, compress_ref=False)
            assert be.decode_press.pending is not None
            be.run_pending_compression()
        assert sum(counter.values()) == allowed, counter
        lens = be.pool.seg_len_host[1]
        assert (lens.max() if method == "snapkv" else lens.sum(axis=1).max() / GEO.kv_heads) <= T


def test_retraction_restarts_the_interval_and_the_pass_skips_released_requests():
    """A request retracted mid-interval (released, then re-prefilled from prompt + answer, as SGLang does)
    counts its interval afresh and is compressed K steps after its new prompt; a request released after it
    reached its interval but before the pass (a finish, an abort) is skipped, its slot untouched."""
    be = make_backend(GEO, decode_method="snapkv", decode_budget=T, decode_interval=K, decode_window=W)
    ref, gen = Reference("snapkv"), torch.Generator().manual_seed(5)
    st, pool = be.state, be.pool
    prefill(be, ref, [1, 2], [50, 60], gen)
    for _ in range(K - 3):
        run_step(be, ref, [1, 2], gen, check_attention=False)
    st.release(1)  # retracted with 3 steps left in its interval
    assert st.requests.decode_steps[1] == 0
    ref.steps.pop(1)
    for key in [k for k in ref.k if k[0] == 1]:
        del ref.k[key], ref.v[key], ref.q[key], ref.live[key]
    prefill(be, ref, [1], [50 + K - 3], gen)  # prompt + generated, dense again
    for _ in range(3):
        run_step(be, ref, [1, 2], gen, check_attention=False)
    be.run_pending_compression()
    assert pool.seg_len_host[2].max() <= T  # request 2 reached K: compressed
    assert pool.seg_len_host[1].min() == 50 + K - 3 + 3  # request 1 counts afresh: not yet
    for _ in range(K - 3):
        run_step(be, ref, [1], gen, check_attention=False)  # the last: request 1's K-th step since re-prefill
    be.run_pending_compression()
    assert pool.seg_len_host[1].max() <= T
    for lid in range(GEO.layers):
        for h in range(GEO.kv_heads):
            pos = ref.live[1, lid][h]
            rows = pool.rows_of(1, lid, h, torch.arange(len(pos)))
            assert torch.equal(pool.k_rows[rows], ref.k[1, lid][pos, h])
    for _ in range(K):
        run_step(be, ref, [2], gen, check_attention=False, compress_ref=False)
    assert be.decode_press.pending is not None and 2 in be.decode_press.pending
    before = dict(st.decode_stats)
    st.release(2)  # finished in the step that reached its interval: released before the pass
    be.run_pending_compression()
    assert st.decode_stats == before and be.decode_press.pending is None
    st.release(1)
    assert pool.used_pages() == 0 and st.ledger_mismatch() is None
