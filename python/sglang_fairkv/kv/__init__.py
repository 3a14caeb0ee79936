"""The physically ragged KV pool: one segment per (request, layer, KV head), paged.

``ragged_pool`` is the data structure (pure torch, no SGLang); ``sglang_pool`` adapts it to SGLang's
``KVCache`` / ``BaseTokenToKVPoolAllocator`` interfaces (logical slots, admission in token units).
"""
