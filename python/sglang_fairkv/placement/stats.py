"""Per-head KV statistics: the ``fairkv-stats/1`` file the planner reads.

Schema (JSON object)::

    format        "fairkv-stats/1"
    model         str, model name or path the stats describe
    num_layers    int >= 1
    num_q_heads   int >= 1, divisible by num_kv_heads (GQA)
    num_kv_heads  int >= 1
    head_dim      int >= 1
    hidden_size   int >= 1, optional (default num_q_heads * head_dim)
    kv_len_mean   [num_layers][num_kv_heads] floats >= 0: mean kept KV tokens per request
    kv_len_std    optional, same shape, >= 0
    samples       optional int >= 0: requests the means were taken over
    method        optional str: how the stats were made ("adakv", "snapkv", ..., "synthetic")
    budget        optional number: the compression budget (mean tokens per head) or ratio
    synthetic     optional bool: true for generated (not measured) stats
    extra         optional object: anything else (quantiles, generator parameters)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .jsonio import read_json, require_int

FORMAT = "fairkv-stats/1"


class StatsError(ValueError):
    """A stats file or object that does not follow ``fairkv-stats/1``; the message names the field."""


@dataclass(frozen=True)
class KVStats:
    """Per-(layer, KV head) KV load of a model under some compression.

    ``kv_len_mean``: float64 ``[num_layers, num_kv_heads]``, mean kept tokens per request.
    """

    model: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    kv_len_mean: np.ndarray
    hidden_size: int | None = None
    kv_len_std: np.ndarray | None = None
    samples: int | None = None
    method: str | None = None
    budget: float | None = None
    synthetic: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def hidden(self) -> int:
        return self.hidden_size or self.num_q_heads * self.head_dim

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT, "model": self.model, "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads, "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "kv_len_mean": self.kv_len_mean.tolist(),
        }
        for key in ("hidden_size", "samples", "method", "budget"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.kv_len_std is not None:
            d["kv_len_std"] = self.kv_len_std.tolist()
        if self.synthetic:
            d["synthetic"] = True
        if self.extra:
            d["extra"] = self.extra
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _int(d: dict, key: str, lo: int = 1, required: bool = True) -> int | None:
    return require_int(d, key, StatsError, lo=lo, required=required)


def _matrix(d: dict, key: str, layers: int, heads: int) -> np.ndarray:
    v = d[key]
    if not isinstance(v, list) or len(v) != layers:
        got = len(v) if isinstance(v, list) else type(v).__name__
        raise StatsError(f"{key} must have num_layers={layers} rows, got {got}")
    for i, row in enumerate(v):
        if not isinstance(row, list) or len(row) != heads:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise StatsError(f"{key}[{i}] must have num_kv_heads={heads} entries, got {got}")
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise StatsError(f"{key}[{i}][{j}] must be a finite number >= 0, got {x!r}")
    return np.asarray(v, dtype=np.float64)


def stats_from_json(d: Any) -> KVStats:
    """Validate a parsed JSON object; raises :class:`StatsError` naming the first problem."""
    if not isinstance(d, dict):
        raise StatsError(f"stats must be a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise StatsError(f"format must be {FORMAT!r}, got {d.get('format')!r}")
    if not isinstance(d.get("model"), str):
        raise StatsError(f"model must be a string, got {d.get('model')!r}")
    layers, q, kv, hd = (_int(d, k) for k in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"))
    if q % kv:
        raise StatsError(f"num_q_heads={q} is not a multiple of num_kv_heads={kv}")
    if "kv_len_mean" not in d:
        raise StatsError("missing field 'kv_len_mean'")
    mean = _matrix(d, "kv_len_mean", layers, kv)
    std = _matrix(d, "kv_len_std", layers, kv) if "kv_len_std" in d else None
    budget = d.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise StatsError(f"budget must be a number, got {budget!r}")
    extra = d.get("extra", {})
    if not isinstance(extra, dict):
        raise StatsError(f"extra must be an object, got {type(extra).__name__}")
    return KVStats(model=d["model"], num_layers=layers, num_q_heads=q, num_kv_heads=kv,
                   head_dim=hd, kv_len_mean=mean, hidden_size=_int(d, "hidden_size", required=False),
                   kv_len_std=std, samples=_int(d, "samples", lo=0, required=False),
                   method=d.get("method"), budget=budget, synthetic=bool(d.get("synthetic", False)),
                   extra=extra)


#: quantiles a profile reports per (layer, KV head) (``extra["kv_len_p10"]`` ...)
QUANTILES = {"kv_len_p10": 0.1, "kv_len_p50": 0.5, "kv_len_p90": 0.9}


def summarize_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Kept tokens ``[prompts, layers, kv_heads]`` -> float64 ``[layers, kv_heads]`` each: ``kv_len_mean``,
    ``kv_len_std`` and the :data:`QUANTILES` -- what every profile (offline, engine, live) reports."""
    c = np.asarray(counts, dtype=np.float64)
    q = np.quantile(c, list(QUANTILES.values()), axis=0)
    return {"kv_len_mean": c.mean(axis=0), "kv_len_std": c.std(axis=0), **dict(zip(QUANTILES, q))}


def load_stats(path: str | Path) -> KVStats:
    """Read and validate a stats file; raises :class:`StatsError` (also for unreadable JSON)."""
    return stats_from_json(read_json(path, StatsError))


# --- synthetic stats -------------------------------------------------------------------------

#: Model shapes for synthetic stats: (num_layers, num_q_heads, num_kv_heads, head_dim, hidden_size).
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "llama-3.3-70b": (80, 64, 8, 128, 8192),
    "mistral-small-24b": (40, 32, 8, 128, 5120),
    "smollm2-135m": (30, 9, 3, 64, 576),
}


def synthetic_stats(shape: str, budget: float = 1024.0, concentration: float = 2.0,
                    seed: int = 0, layer_skew: float = 0.0) -> KVStats:
    """Synthetic AdaKV-like stats, clearly labelled ``synthetic``.

    Per layer the KV heads share a budget ``num_kv_heads * budget`` (AdaKV moves budget only
    inside a layer), split by a Dirichlet(``concentration``) draw: small concentration = heavy
    skew (a few heads keep most tokens), large = nearly uniform. ``layer_skew`` > 0 also varies
    the per-layer budget (PyramidKV-like, lognormal sigma ``layer_skew``), keeping the mean.
    """
    if shape not in SHAPES:
        raise StatsError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if concentration <= 0 or budget <= 0 or layer_skew < 0:
        raise StatsError(f"need concentration > 0, budget > 0, layer_skew >= 0; got "
                         f"{concentration}, {budget}, {layer_skew}")
    layers, q, kv, hd, hidden = SHAPES[shape]
    rng = np.random.default_rng(seed)
    split = rng.dirichlet(np.full(kv, concentration), size=layers)  # [layers, kv], rows sum to 1
    scale = np.exp(rng.normal(0.0, layer_skew, size=(layers, 1))) if layer_skew else np.ones((layers, 1))
    scale /= scale.mean()
    mean = split * kv * budget * scale
    return KVStats(model=f"synthetic:{shape}", num_layers=layers, num_q_heads=q, num_kv_heads=kv,
                   head_dim=hd, hidden_size=hidden, kv_len_mean=mean, method="synthetic",
                   budget=budget, synthetic=True,
                   extra={"generator": "dirichlet", "concentration": concentration, "seed": seed,
                          "layer_skew": layer_skew})


def map_to_shape(stats: KVStats, shape: str, budget: float, seed: int = 0) -> KVStats:
    """Carry a measured head skew over to a larger model shape (labelled synthetic).

    The source's relative head loads ``w[l][h] / mean_h w[l][h]`` are pooled over all layers; each
    target layer draws its ``num_kv_heads`` relative loads from that pool (with replacement),
    renormalised to mean 1 and scaled to ``budget`` tokens per head (AdaKV keeps a layer's total).
    """
    if shape not in SHAPES:
        raise StatsError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    layers, q, kv, hd, hidden = SHAPES[shape]
    m = stats.kv_len_mean
    rel = (m / np.maximum(m.mean(axis=1, keepdims=True), 1e-9)).ravel()
    rng = np.random.default_rng(seed)
    draw = rng.choice(rel, size=(layers, kv), replace=True)
    draw = draw / np.maximum(draw.mean(axis=1, keepdims=True), 1e-9)
    return KVStats(model=f"mapped:{stats.model}->{shape}", num_layers=layers, num_q_heads=q,
                   num_kv_heads=kv, head_dim=hd, hidden_size=hidden, kv_len_mean=draw * budget,
                   method=stats.method, budget=budget, synthetic=True,
                   extra={"generator": "map_to_shape", "source_model": stats.model,
                          "source_samples": stats.samples, "seed": seed})
