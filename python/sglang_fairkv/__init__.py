"""sglang-fairkv: FairKV (arXiv 2502.15804) as an SGLang 0.5.23 backend.

Floors, bottom up (see ``docs/DESIGN.md``); only ``attention``, ``model`` and ``serving`` import SGLang:
  placement/  per-head KV statistics -> head placement plan, the balance formula (pure numpy/scipy)
  compress/   SnapKV scoring, per-head budgets, what a request keeps (pure torch; kvpress 0.5.5 semantics)
  kv/         the ragged per-(request, layer, KV head) pool, the TP group's ledger, admission arithmetic,
              the request table, pool sizing (pure torch/numpy)
  telemetry/  /server_info report, the log line, live traffic, Prometheus gauges (host-side)
  attention/  the ``fairkv`` SGLang attention backend
  model/      FairKV model classes (per-rank head slices; SGLang's external model package)
  serving/    every other place SGLang is touched: pool / allocator / prefill-budget adapters, the
              hooks and the one list of them, the scheduler entry, the launcher, plan resolution
The kernels (``sglang_fairkv_kernels``) and the SGLang compatibility patches (``sglang_fairkv_patches``)
are packages of their own (the repository's ``kernels/`` and ``patches/``).
Entry points: ``python -m sglang_fairkv.launch_server``, ``plan``, ``profiler``, ``kvdump``,
``offline_stats``, ``stats_synth``.
"""

__version__ = "0.1.0"
