"""``python -m sglang_fairkv.stats_synth``: write synthetic (labelled) ``fairkv-stats/1`` files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .placement.stats import SHAPES, StatsError, synthetic_stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_fairkv.stats_synth", description=__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.3-70b")
    p.add_argument("--budget", type=float, default=1024.0, help="mean kept tokens per head")
    p.add_argument("--concentration", type=float, default=2.0,
                   help="Dirichlet concentration of the per-layer head split (small = skewed)")
    p.add_argument("--layer-skew", type=float, default=0.0, help="lognormal sigma of layer budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        s = synthetic_stats(a.shape, a.budget, a.concentration, a.seed, a.layer_skew)
    except StatsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s.save(a.out)
    print(f"wrote {a.out} ({s.model}, {s.num_layers}x{s.num_kv_heads}, synthetic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
