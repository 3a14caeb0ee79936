"""sglang-fairkv: FairKV (arXiv 2502.15804) as an SGLang 0.5.23 backend.

Subpackages (see ``docs/DESIGN.md``):
  placement/  per-head KV statistics -> head placement plan (pure numpy/scipy)
  compress/   SnapKV scoring and per-head budgets (pure torch; kvpress 0.5.5 semantics)
  kv/         the ragged per-(request, layer, KV head) pool and its SGLang pool/allocator adapters
  attention/  the ``fairkv`` SGLang attention backend
  patches/    the compatibility patches applied to SGLang (symlink to the repository's ``patches/``)
  kernels/    Triton ragged decode (symlink to the repository's ``kernels/``)
Entry points: ``python -m sglang_fairkv.launch_server``, ``plan``, ``profile``, ``kvdump``,
``offline_stats``, ``stats_synth``.
"""

__version__ = "0.1.0"
