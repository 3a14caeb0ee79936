"""The logical-slot allocator: a preallocated int32 stack (its excess over SGLang's stock free list is in
the KV budget), no ``torch.cat`` of the free list per free, no device read, SGLang's contract kept."""

from __future__ import annotations

import torch

from helpers.backend_harness import Geometry, make_backend, top_level_ops

GEO = Geometry(max_total_tokens=512)


def allocator():
    from sglang_fairkv.serving.allocator import FairKVTokenAllocator
    from sglang_fairkv.serving.kv_cache import FairKVCache

    backend = make_backend(GEO)
    kv = FairKVCache(backend.state, size=GEO.max_total_tokens, page_size=1, dtype=torch.float32,
                     layer_num=GEO.layers, device="cpu")
    return FairKVTokenAllocator(backend.state, max_total_tokens=GEO.max_total_tokens, dtype=torch.float32,
                                device="cpu", kvcache=kv)


def test_slots_are_unique_reused_and_never_slot_zero():
    a = allocator()
    size = GEO.max_total_tokens * 16
    assert a.size == size and a.logical_slots_free() == size
    assert a._stack.dtype == torch.int32 and a._stack.numel() == size  # 4 bytes a slot, allocated once
    x, y = a.alloc(100), a.alloc(7)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    got = torch.cat([x, y])
    assert got.unique().numel() == 107 and int(got.min()) >= 1 and int(got.max()) <= size
    a.free(x[10:20])
    z = a.alloc(10)
    assert sorted(z.tolist()) == sorted(x[10:20].tolist())  # freed slots come back
    y_before = y.clone()
    a.free(y)
    a.alloc(7)  # the stack's top is rewritten; an id tensor handed out earlier is a copy, not a view
    assert torch.equal(y, y_before)
    assert a.alloc(size) is None  # more than is free: None, as SGLang's allocator answers
    rest = a.alloc(a.logical_slots_free())
    assert a.logical_slots_free() == 0 and rest.numel() == size - 107  # 107 still out: x and y's reuse
    assert torch.cat([rest, x[:10], x[20:], z, a._stack[:0].long()]).unique().numel() == size - 7
    a.clear()
    assert a.logical_slots_free() == size and sorted(a.free_pages.tolist()) == list(range(1, size + 1))


def test_free_group_defers_and_double_free_is_refused():
    import pytest

    a = allocator()
    x = a.alloc(5)
    a.free_group_begin()
    a.free(x)
    assert a.logical_slots_free() == a.size - 5  # held until the group ends
    a.free_group_end()
    assert a.logical_slots_free() == a.size
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(torch.tensor([3], dtype=torch.int64))


def test_free_and_alloc_do_not_copy_the_free_list():
    """A free writes the freed ids (one copy of n elements), an alloc copies n ids out: no op sized like
    the free list (the stock allocator's torch.cat re-creates all of it on every free)."""
    a = allocator()
    x = a.alloc(64)
    ops_free = top_level_ops(lambda: a.free(x))
    ops_alloc = top_level_ops(lambda: a.alloc(64))
    assert "aten::cat" not in ops_free and "aten::cat" not in ops_alloc
    assert len(ops_free) <= 3 and len(ops_alloc) <= 3, (ops_free, ops_alloc)
