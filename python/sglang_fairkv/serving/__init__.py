"""Where sglang-fairkv touches SGLang 0.5.23 (besides the attention backend and the model classes).

``launcher`` (``python -m sglang_fairkv.launch_server``) -> ``worker`` (every scheduler process) ->
``hooks`` (the one list of hooks per process, applied and verified) -> ``pool_hooks`` /
``scheduler_hooks`` / ``request_guard`` (the hooks) -> ``kv_cache`` / ``allocator`` / ``prefill_budget``
(SGLang's pool interfaces over :mod:`sglang_fairkv.kv`) around ``state`` (one process's fairkv state).
``server_plan``: the compression setting and FairKV plan each process reads; ``machine``: CUDA or CPU.
Nothing here does arithmetic of its own: prices, sizes and balances come from the pure floors.
"""
