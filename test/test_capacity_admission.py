"""Admission by the compressed size: a property test over random workloads.

A small scheduler loop drives ``FairKVPrefillBudget`` the way SGLang's ``PrefillAdder`` does (the
running requests' decode adopted in pages, the chunked request's continuation first, then new requests
through ``check_prefill`` or -- ``ignore_eos`` -- ``can_allocate_prefill``, then ``reserve``), runs the
prefill and decode forwards, and aborts requests mid-prefill and mid-decode. At TP 1 the forwards are the
real backend (``FairKVAttnBackend`` through its SGLang interface, real compression of random K/V); under
a TP 2 plan with copied heads two ranks' pools run the backend's page operations (dense chunks, the last
chunk layer by layer: ``extend_layer`` then ``compact`` to kept counts drawn within the method's rule,
the same on every rank).

The pools are the reference. Every step: no pool runs out; the pages a step's forward really took at its
peak (the pool's high-water mark) are at most what the pass charged for ``now``, and the pages held when it
ends are exactly what the pass charged (SnapKV, ``none``; at most for AdaKV, whose per-head split is
data-dependent); the ledger equals every pool; a request that decodes all its tokens never meets a full
pool (no retraction); a request that finishes holds exactly the pages it was charged for its life
(SnapKV). At the end everything is free.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.backend_harness import Geometry, decode_batch, extend_batch, layer, make_backend, qkv
from sglang_fairkv.compress import footprint
from sglang_fairkv.compress.policy import CompressConfig
from sglang_fairkv.serving.prefill_budget import FairKVPrefillBudget
from sglang_fairkv.serving.state import build_state
from sglang_fairkv.placement.runtime import RankPlan
from sglang_fairkv.placement.schema import Plan


@dataclass(eq=False)
class Req:
    rid: str
    n: int
    m: int
    ignore_eos: bool
    full_untruncated_fill_ids: list = field(init=False)
    kv: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(req_pool_idx=None))
    done: int = 0  # prompt tokens prefilled
    out: int = 0  # tokens decoded

    def __post_init__(self):
        self.full_untruncated_fill_ids = list(range(self.n))
        self.sampling_params = SimpleNamespace(max_new_tokens=self.m, ignore_eos=self.ignore_eos)
        self.output_ids = []

    @property
    def prefix_len(self) -> int:
        """SGLang's ``req.prefix_len``: what is behind the next chunk (no cache hits in these workloads)."""
        return self.done


def budget_for(state, chunk: int | None = None) -> FairKVPrefillBudget:
    b = FairKVPrefillBudget(SimpleNamespace(state=state, page_size=1),
                            SimpleNamespace(evictable_size=lambda: 0, supports_mamba=lambda: False))
    # the adder-init hook (SGLang's PrefillAdder: no running offsets here, its chunk size)
    b.adopt_running(SimpleNamespace(running_batch=None, new_token_ratio=1.0, rem_chunk_tokens=chunk))
    return b


class Workload:
    """Scheduler loop over ``states`` (one per rank); ``forward_extend`` / ``forward_decode`` run a step."""

    def __init__(self, states, rng: random.Random, chunk: int, exact: bool):
        self.states, self.rng, self.chunk, self.exact = states, rng, chunk, exact
        self.free_idx = list(range(states[0].pool.max_reqs - 1, 0, -1))
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.abort_rate = 1.0  # scales the abort probabilities
        self.stats = dict(admitted=0, finished=0, aborted_prefill=0, aborted_decode=0, max_running=0,
                          chunked_steps=0, steps=0)

    # ---- admission, as PrefillAdder -----------------------------------------------------------
    def _all(self, fn):
        res = [fn(b) for b in self.budgets]
        assert all(r == res[0] for r in res), f"ranks disagree: {res}"  # every rank decides alike
        return res[0]

    def admission_pass(self) -> list[tuple[Req, int]]:
        self.budgets = [budget_for(st, self.chunk) for st in self.states]
        taken, rem, new_chunked = [], self.chunk, None
        if self.chunked is not None:
            req = self.chunked
            for b in self.budgets:
                b.current_req = req
            rest = req.n - req.done
            ext = min(rest, self._all(lambda b: b.available_chunk_tokens(rem)))
            last = ext == rest
            for b in self.budgets:
                b.reserve(ext, req.m if last else 0, is_chunked_continuation=True)
                b.current_req = None
            taken.append((req, ext))
            rem -= ext
            new_chunked = None if last else req
            self.stats["chunked_steps"] += 1
        for req in list(self.waiting[:6]):
            if rem <= 0 or new_chunked is not None:
                break
            for b in self.budgets:
                b.current_req = req
            if req.ignore_eos:
                ok = self._all(lambda b: b.can_allocate_prefill(paged_input=req.n + 1, extend_input_len=req.n,
                                                                max_new_tokens=req.m, chunk_limit=rem))
            else:
                ok = self._all(lambda b: b.check_prefill(
                    extend_input_len=req.n, total_tokens=req.n + req.m + 1, max_new_tokens=req.m,
                    input_tokens=req.n, swa_host_hit_length=0, chunk_limit=rem)[0])
            if not ok:
                for b in self.budgets:
                    b.current_req = None
                break
            ext = req.n if req.n <= rem else rem
            for b in self.budgets:
                b.reserve(ext, req.m if ext == req.n else 0)
                b.current_req = None
            self.waiting.remove(req)
            self.stats["admitted"] += 1
            taken.append((req, ext))
            rem -= ext
            if ext < req.n:
                new_chunked = req
        self.chunked = new_chunked
        return taken

    # ---- one scheduler iteration --------------------------------------------------------------
    def step(self) -> None:
        self.stats["steps"] += 1
        taken = self.admission_pass()
        if taken:
            for req, _ in taken:
                if req.kv.req_pool_idx is None:
                    req.kv.req_pool_idx = self.free_idx.pop()
            used0 = [st.pool.used_pages() for st in self.states]
            for st in self.states:
                st.pool.reset_peak()
            self.forward_extend(taken)
            for q, st in enumerate(self.states):
                b = self.budgets[q]
                grew = st.pool.used_pages() - used0[q]
                peak = st.pool.peak_used - used0[q]
                assert peak <= int(b.pages_current[q]), (peak, b.pages_current.tolist())
                if self.exact:
                    assert grew == int(b.pages_after[q]), (q, grew, b.pages_after.tolist())
                else:
                    assert grew <= int(b.pages_after[q]), (q, grew, b.pages_after.tolist())
            for req, ext in taken:
                req.done += ext
                if req.done == req.n:
                    self.running.append(req)
        elif self.running:
            live = [r for r in self.running if r.out < r.m]
            if live:
                idx = [r.kv.req_pool_idx for r in live]
                # every running request was reserved the rest of its decode: the step always fits (no
                # retraction; SGLang's new_token_ratio is 1 here, as for ignore_eos requests)
                assert self.states[0].ledger.decode_fits(idx)
                self.forward_decode(idx)
                for r in live:
                    r.out += 1
            self.stats["max_running"] = max(self.stats["max_running"], len(live))
        self.check_ledger()
        # finish, abort mid-decode, abort the chunked request mid-prefill
        for r in list(self.running):
            if r.out == r.m:
                if self.exact:
                    for q, st in enumerate(self.states):
                        held = st.ledger._by_rank((st.ledger.length[r.kv.req_pool_idx] + st.ledger.page_size - 1)
                                                  // st.ledger.page_size, st.ledger.owner[r.kv.req_pool_idx])
                        assert held.tolist() == st.requests.charged[r.kv.req_pool_idx].tolist()
                self.finish(r)
                self.stats["finished"] += 1
        if self.running and self.rng.random() < 0.03 * self.abort_rate:  # one request aborts mid-decode
            self.finish(self.rng.choice(self.running))
            self.stats["aborted_decode"] += 1
        if self.chunked is not None and self.rng.random() < 0.05 * self.abort_rate:
            self.release(self.chunked)
            self.free_idx.append(self.chunked.kv.req_pool_idx)
            self.chunked = None
            self.stats["aborted_prefill"] += 1

    def finish(self, r: Req) -> None:
        self.release(r)
        self.free_idx.append(r.kv.req_pool_idx)
        self.running.remove(r)

    def release(self, r: Req) -> None:
        for st in self.states:
            st.release(r.kv.req_pool_idx)

    def check_ledger(self) -> None:
        for st in self.states:
            assert st.ledger.pages_used().tolist() == [s.pool.used_pages() for s in self.states]
            assert st.ledger_mismatch() is None
            # never admitted what it cannot hold: what is held (less the evictable prefix tier) plus the
            # decode still owed fits every rank
            owed = st.decode_pages_to_come(1.0)
            cached = st.tree.evictable_pages() if st.tree is not None else 0
            assert bool((st.ledger.pages_used() - cached + owed <= st.ledger.usable).all()), \
                (st.ledger.pages_used().tolist(), owed.tolist())

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
            if not self.waiting and not self.running and self.chunked is None:
                break
        for r in list(self.running):
            self.finish(r)
        if self.chunked is not None:
            self.release(self.chunked)
        for st in self.states:
            if st.tree is not None:  # a flush
                st.tree.evict_until(lambda: False)
                st.pool.begin_step()
            assert st.pool.used_pages() == 0 and st.pool.used_tokens() == 0
            assert int(st.ledger.pages_used().sum()) == 0 and not st.requests.admitted
            assert st.pool.free_page_count() == st.pool.usable_pages


# ---- TP 1: the real backend ------------------------------------------------------------------
GEO = Geometry(layers=3, q_heads=4, kv_heads=2, head_dim=8, max_reqs=24, max_context=4224, max_total_tokens=6000)


class BackendWorkload(Workload):
    def __init__(self, backend, rng, chunk, exact, geo: Geometry = GEO):
        super().__init__([backend.state], rng, chunk, exact)
        self.backend, self.geo = backend, geo
        self.gen = torch.Generator().manual_seed(rng.randrange(1 << 30))

    def forward_extend(self, taken):
        st = self.backend.state
        for r, _ in taken:  # the prepare_for_extend hook (admit is idempotent: extend_batch's is a no-op)
            st.requests.target_len[r.kv.req_pool_idx] = r.n
            first = r.kv.req_pool_idx not in st.requests.admitted
            tier = st.requests.planned_tier.pop(r.rid, False)
            st.admit(r.kv.req_pool_idx, r.rid, r.n)
            if first and tier:
                st.tier_begin(r.kv.req_pool_idx, np.zeros(0, dtype=np.int64))
        fb = extend_batch(self.backend, [r.kv.req_pool_idx for r, _ in taken], [r.done for r, _ in taken],
                          [e for _, e in taken], [r.n for r, _ in taken])
        st = self.backend.state
        for r, _ in taken:
            st.requests.fixed_length[r.kv.req_pool_idx] = r.ignore_eos
        self.backend.init_forward_metadata(fb)
        T = sum(e for _, e in taken)
        for lid in range(self.geo.layers):
            q, k, v = qkv(self.geo, T, self.gen)
            self.backend.forward_extend(q, k, v, layer(self.geo, lid), fb)
        if st.tree is not None:  # SGLang's checkpoint after the prompt's last chunk: into the cache
            for r, e in taken:
                if r.done + e == r.n and r.kv.req_pool_idx in st.requests.tier_tok:
                    st.tree.insert(r.kv.req_pool_idx)

    def forward_decode(self, idx):
        fb = decode_batch(self.backend, idx)
        self.backend.init_forward_metadata(fb)
        for lid in range(self.geo.layers):
            q, k, v = qkv(self.geo, len(idx), self.gen)
            self.backend.forward_decode(q, k, v, layer(self.geo, lid), fb)


def workload(rng: random.Random, count: int, max_len: int) -> list[Req]:
    out = []
    for i in range(count):
        n = rng.choice([rng.randrange(1, 80), rng.randrange(1, max_len + 1), rng.randrange(max_len // 2, max_len + 1)])
        m = rng.choice([rng.randrange(1, 40), rng.randrange(100, 400)])
        out.append(Req(f"r{i}", n, m, ignore_eos=rng.random() < 0.7))
    return out


@pytest.mark.parametrize("method,ratio,seed", [("snapkv", 0.75, 1), ("adakv", 0.5, 2)])
def test_tp1_backend_random_workload_never_overflows_and_charges_what_it_takes(method, ratio, seed):
    rng = random.Random(seed)
    backend = make_backend(GEO, method=method, ratio=ratio, window=8)
    w = BackendWorkload(backend, rng, chunk=rng.choice([256, 512, 1024, 2048]), exact=method != "adakv")
    w.waiting = workload(rng, 40, 4096)
    w.run(1500)
    s = w.stats
    assert s["admitted"] >= 25 and s["finished"] >= 10 and s["chunked_steps"] >= 3, s


class StandInTree:
    """The radix tree as the budget and the backend see it: finished prompts' tier tokens in LRU order,
    evicted oldest first (``FairKVRadixCache`` is tested end to end in ``test_prefix_tier.py``)."""

    disable = False

    def __init__(self, state):
        self.state, self.lru = state, []
        state.tree = self

    @property
    def evictable_leaves(self):
        return self.lru

    def insert(self, r: int) -> None:
        reqs = self.state.requests
        tok, own = reqs.tier_tok.pop(r), reqs.tier_own_from.pop(r)
        self.lru.append(tok[own:])

    def evict_until(self, ok) -> bool:
        while not ok():
            if not self.lru:
                return ok()
            self.state.tier_release(self.lru.pop(0))
        return True

    def evictable_pages(self) -> torch.Tensor:
        """Pages evicting everything would free (every block of the cached prompts is theirs alone)."""
        P = self.state.ledger.page_size
        return self.state.ledger.tier_pages(sum(-(-t.size // P) for t in self.lru))


@pytest.mark.parametrize("method,ratio,seed", [("snapkv", 0.75, 3)])
def test_tp1_backend_random_workload_with_the_prefix_tier(method, ratio, seed):
    """The same workload with the dense prefix tier: prompts within the write share are prefilled
    through the tier and cached, the others the classic way; cached prompts are evicted as admission
    needs their pages. Charges still bound every step's peak and equal what it holds after (SnapKV,
    none), no pool runs out, the ledger equals the pool, and the prefix tier really held and gave
    back pages."""
    rng = random.Random(seed)
    backend = make_backend(GEO, method=method, ratio=ratio, window=8, prefix_tier=1.0)
    tree = StandInTree(backend.state)
    released = []
    orig = backend.state.tier_release
    backend.state.tier_release = lambda tok: released.append(orig(tok)) or released[-1]
    w = BackendWorkload(backend, rng, chunk=rng.choice([256, 512, 1024]), exact=True)
    w.waiting = workload(rng, 40, 4096)
    w.run(1500)
    s = w.stats
    assert s["admitted"] >= 25 and s["finished"] >= 10, s
    assert sum(released) > 10, "the tier never gave pages back"
    assert not tree.lru and backend.state.tier.blocks_used == 0


# ---- TP 2, a plan with copied heads: the backend's page operations on two pools ----------------
L, KV, Q, P = 4, 4, 8, 4


def half_copied_plan() -> Plan:
    layers = [[[(0, 1.0)], [(1, 1.0)], [(0, 0.5), (1, 0.5)], [(0, 0.3 + 0.1 * l), (1, 0.7 - 0.1 * l)]]
              for l in range(L)]
    return Plan(model="t", tp=2, num_kv_heads=KV, strategy="fairkv", cost_model={"c_head": 0, "c_token": 1},
                layers=layers, num_q_heads=Q)


class PoolWorkload(Workload):
    def __init__(self, states, rng, chunk, cfg: CompressConfig):
        super().__init__(states, rng, chunk, exact=cfg.method != "adakv")
        self.cfg = cfg

    def _counts(self, n: int, layer_: int, owner: np.ndarray) -> np.ndarray:
        """Kept rows per KV head of one layer, within the method's rule (AdaKV: a random split, often
        skewed onto one rank's heads)."""
        kept = footprint.kept_per_head(self.cfg, n, L, KV)
        if kept is not None:
            return kept[layer_]
        total, floor = footprint.adakv_layer_rule(self.cfg, n, KV)
        counts = np.full(KV, floor, dtype=np.int64)
        left = total - floor * KV
        favour = self.rng.randrange(2)
        order = sorted(range(KV), key=lambda h: (owner[layer_, h] != favour, self.rng.random()))
        for h in order:
            take = min(n - counts[h], left if self.rng.random() < 0.6 else self.rng.randrange(left + 1))
            counts[h] += take
            left -= take
        for h in order:  # whatever is left goes where there is room
            take = min(n - counts[h], left)
            counts[h] += take
            left -= take
        return counts

    def forward_extend(self, taken):
        for req, _ in taken:
            r = req.kv.req_pool_idx
            for st in self.states:
                st.requests.target_len[r] = req.n
                st.admit(r, req.rid, req.n)
                st.requests.fixed_length[r] = req.ignore_eos
        grow = [(req, req.done + e) for req, e in taken if req.done + e == req.n and footprint.compresses(self.cfg, req.n)]
        dense = [(req.kv.req_pool_idx, req.done + e) for req, e in taken if (req, req.done + e) not in grow]
        for st in self.states:
            if dense:
                st.pool.extend([r for r, _ in dense], [n for _, n in dense])
            st.ledger.extend([req.kv.req_pool_idx for req, _ in taken], [req.done + e for req, e in taken])
            st.requests.mark_prompt_done(np.array([req.kv.req_pool_idx for req, e in taken if req.done + e == req.n], dtype=np.int64))
        for lid in range(L):
            for st in self.states:
                st.pool.extend_layer([req.kv.req_pool_idx for req, _ in grow], lid, [n for _, n in grow])
            for req, n in grow:
                r = req.kv.req_pool_idx
                counts = self._counts(n, lid, self.states[0].ledger.owner[r].numpy())
                for st in self.states:
                    own = np.nonzero(st.pool.active_host[r, lid])[0].tolist()
                    heads = [st.local_heads(lid)[j] for j in own]
                    kept = [torch.tensor(sorted(self.rng.sample(range(n), int(counts[h])))) for h in heads]
                    st.pool.compact(r, lid, kept, own)
                    st.ledger.set_kept(r, lid, torch.from_numpy(counts))

    def forward_decode(self, idx):
        for st in self.states:
            st.pool.append(np.asarray(idx), torch.as_tensor(idx))
            st.ledger.append(idx)


@pytest.mark.parametrize("method,ratio,seed", [("adakv", 0.75, 11), ("none", None, 13)])
def test_tp2_copied_plan_random_workload_never_overflows(method, ratio, seed):
    rng = random.Random(seed)
    cfg = CompressConfig(method=method, ratio=ratio, window=8 if method != "none" else 64)
    plan = half_copied_plan()
    states = [build_state(cfg, None, rank_plan=RankPlan(plan, q, Q), max_total_tokens=6000,
                          rows_per_token_budget=L * KV // 2, page_size=P, head_dim=2, max_reqs=32,
                          max_context=4224, dtype=torch.float32, device="cpu", metadata_in_budget=False)
              for q in range(2)]
    w = PoolWorkload(states, rng, chunk=rng.choice([300, 700, 1500]), cfg=cfg)
    w.waiting = workload(rng, 60, 4096)
    w.run(1500)
    s = w.stats
    assert s["admitted"] >= 30 and s["finished"] >= 15 and s["chunked_steps"] >= 3, s


def test_kept_size_admission_decodes_three_times_the_dense_requests_at_once():
    """Capacity at ratio 0.75 (TP 1, the real backend): 1000-token prompts, 32 tokens out, more requests
    than fit. At least 3x the requests the dense rule holds (stock SGLang's: prompt + max_new each)
    decode at once in the same pool, and never more than their kept + decode pages allow."""
    geo = Geometry(layers=3, q_heads=4, kv_heads=2, head_dim=8, max_reqs=48, max_context=1100,
                   max_total_tokens=8192)
    backend = make_backend(geo, method="adakv", ratio=0.75, window=8)
    st = backend.state
    rng = random.Random(5)
    n, m = 1000, 32
    w = BackendWorkload(backend, rng, chunk=2048, exact=False, geo=geo)
    w.waiting = [Req(f"c{i}", n, m, ignore_eos=True) for i in range(40)]
    w.abort_rate = 0.0
    w.run(2000)
    dense = geo.max_total_tokens // (n + m)
    per = math.ceil((250 + m) / st.pool.page_size) * geo.layers * geo.kv_heads  # pages a request holds at most
    assert w.stats["finished"] == 40
    assert w.stats["max_running"] >= 3 * dense, (w.stats, dense)
    assert w.stats["max_running"] <= st.pool.usable_pages // (per - geo.layers * geo.kv_heads)


def test_a_cache_hit_without_room_in_the_tier_comes_back_without_its_match():
    """A cache hit prefills through the tier (its rest dense in every layer at once). When that does not
    fit but the whole prompt would, prefilled the classic way (one layer dense at a time), the budget
    refuses this pass and marks the request: the tree then matches nothing for it (it comes back as a
    miss and is admitted the classic way), so a hit never needs more room than the prompt without a
    cache. With room, the hit is admitted through the tier and not marked."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    from sglang_fairkv.serving.prefix_cache import FairKVRadixCache

    backend = make_backend(GEO, method="snapkv", ratio=0.75, window=8, prefix_tier=1.0)
    st = backend.state
    StandInTree(st)
    n, m = 1000, 100

    def hit():
        r = Req("hit", n, 8, ignore_eos=False)
        r.done = m  # its prefix_len: the matched prefix
        r.origin_input_ids = list(range(n))
        return r

    def check(req) -> bool:
        b = budget_for(st, chunk=2048)
        b.current_req = req
        return b.check_prefill(extend_input_len=n - req.done, total_tokens=n - req.done + 9, max_new_tokens=8,
                               input_tokens=n - req.done, swa_host_hit_length=0, chunk_limit=2048)[0]

    roomy = hit()
    assert check(roomy) and not getattr(roomy, "fairkv_no_reuse", False)
    # leave 300 free pages: the rest through the tier takes 57 blocks x 6 pages + its kept rows; the whole
    # prompt the classic way its kept rows + one layer dense
    lg = st.ledger
    lg.usable[:] = lg.pages_used() + 300
    tight = hit()
    assert not check(tight) and tight.fairkv_no_reuse
    tree = FairKVRadixCache(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=
                                            SimpleNamespace(device="cpu"), page_size=1), st)
    assert tree.swa_reprefill_tail_tokens(tight) == n  # matches nothing: a miss next pass
    assert tree.swa_reprefill_tail_tokens(roomy) == 8  # the window only
    tight.done = 0  # the next pass: no match
    assert check(tight)  # admitted the classic way (a new prompt over the tier's write share)
