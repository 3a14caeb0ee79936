"""``python -m sglang_fairkv.profile``: the name of :mod:`sglang_fairkv.profiler` before the layout move,
kept so scripts written against it keep working (same arguments, same output)."""

from __future__ import annotations

import sys

from .profiler import main

if __name__ == "__main__":
    print("sglang-fairkv: python -m sglang_fairkv.profile is now python -m sglang_fairkv.profiler "
          "(this alias runs it)", file=sys.stderr)
    sys.exit(main())
