"""sglang-fairkv: FairKV (arXiv 2502.15804) as an SGLang 0.5.23 backend.

Subpackages (see ``docs/DESIGN.md``):
  placement/  per-head KV statistics -> head placement plan (pure numpy/scipy)
  patches/    the compatibility patches applied to SGLang (symlink to the repository's ``patches/``)
Entry points: ``python -m sglang_fairkv.launch_server``, ``python -m sglang_fairkv.plan``.
"""

__version__ = "0.1.0"
