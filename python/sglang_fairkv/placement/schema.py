"""The ``fairkv-plan/1`` file: which ranks hold each KV head of each layer, with what share.

Schema (JSON object)::

    format        "fairkv-plan/1"
    model         str (the stats' model)
    tp            int >= 1
    num_layers    int >= 1
    num_kv_heads  int >= 1
    num_q_heads   int, optional (checked against the served model when present)
    strategy      "sha" | "assign" | "fairkv"
    cost_model    {"c_head": float, "c_token": float, ...}
    layers        [{"layer": i, "placement": [{"kv_head": h, "replicas": [{"rank": r, "share": s}]}]}]
                  one entry per layer in order, one placement entry per KV head in order; every
                  head has >= 1 replica on distinct ranks in [0, tp), shares > 0 summing to 1
    predicted     {...} metrics at plan time (informative; not validated)
    source        optional {"kv_len_mean": [num_layers][num_kv_heads] floats >= 0, "samples": int,
                  "method": str, "model": str}: the stats the plan was made for (the server's drift
                  report compares the live kept shares with them)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonio import read_json, require_int

FORMAT = "fairkv-plan/1"
STRATEGIES = ("sha", "assign", "fairkv")
SHARE_TOL = 1e-6


class PlanError(ValueError):
    """A plan that does not follow ``fairkv-plan/1`` or does not fit a model; names the problem."""


Replicas = list[tuple[int, float]]


@dataclass(frozen=True)
class Plan:
    """``layers[l][h]``: the ``(rank, share)`` replicas of KV head ``h`` in layer ``l``."""

    model: str
    tp: int
    num_kv_heads: int
    strategy: str
    cost_model: dict
    layers: list[list[Replicas]]
    num_q_heads: int | None = None
    predicted: dict = field(default_factory=dict)
    #: the stats the plan was made for: ``{"kv_len_mean": [L][KV], ...}`` (see the module docstring)
    source: dict = field(default_factory=dict)

    def source_kv_len_mean(self):
        """float64 ``[L, KV]``: mean kept tokens per (layer, KV head) the plan was made for, or None."""
        import numpy as np

        m = self.source.get("kv_len_mean")
        return None if m is None else np.asarray(m, dtype=np.float64)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def copies_per_layer(self) -> list[int]:
        return [sum(len(r) - 1 for r in layer) for layer in self.layers]

    def heads_on_rank(self, layer: int, rank: int) -> list[int]:
        """KV heads (sorted) that ``rank`` holds a replica of in ``layer``."""
        return sorted(h for h, reps in enumerate(self.layers[layer]) if any(r == rank for r, _ in reps))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "model": self.model, "tp": self.tp,
                             "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads}
        if self.num_q_heads is not None:
            d["num_q_heads"] = self.num_q_heads
        d.update(strategy=self.strategy, cost_model=self.cost_model, layers=[
            {"layer": l, "placement": [
                {"kv_head": h, "replicas": [{"rank": r, "share": s} for r, s in reps]}
                for h, reps in enumerate(layer)]}
            for l, layer in enumerate(self.layers)], predicted=self.predicted)
        if self.source:
            d["source"] = self.source
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def check_model(self, num_layers: int, num_kv_heads: int, tp: int,
                    num_q_heads: int | None = None) -> None:
        """Raise :class:`PlanError` if the plan was made for another model shape or TP size."""
        if self.tp != tp:
            raise PlanError(f"plan is for tp={self.tp}, server runs tp={tp}")
        if self.num_layers != num_layers:
            raise PlanError(f"plan has {self.num_layers} layers, model has {num_layers}")
        if self.num_kv_heads != num_kv_heads:
            raise PlanError(f"plan has {self.num_kv_heads} KV heads, model has {num_kv_heads}")
        if num_q_heads is not None and self.num_q_heads not in (None, num_q_heads):
            raise PlanError(f"plan has {self.num_q_heads} query heads, model has {num_q_heads}")


def _int(d: dict, key: str) -> int:
    return require_int(d, key, PlanError)


def plan_from_json(d: Any) -> Plan:
    """Validate a parsed JSON plan; raises :class:`PlanError` naming the first problem precisely."""
    if not isinstance(d, dict):
        raise PlanError(f"plan must be a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise PlanError(f"format must be {FORMAT!r}, got {d.get('format')!r}")
    if not isinstance(d.get("model"), str):
        raise PlanError(f"model must be a string, got {d.get('model')!r}")
    tp, num_layers, kv = (_int(d, k) for k in ("tp", "num_layers", "num_kv_heads"))
    q = _int(d, "num_q_heads") if "num_q_heads" in d else None
    if d.get("strategy") not in STRATEGIES:
        raise PlanError(f"strategy must be one of {STRATEGIES}, got {d.get('strategy')!r}")
    cm = d.get("cost_model")
    if not isinstance(cm, dict) or not all(isinstance(cm.get(k), (int, float)) for k in ("c_head", "c_token")):
        raise PlanError(f"cost_model must be an object with numbers c_head and c_token, got {cm!r}")
    layers_in = d.get("layers")
    if not isinstance(layers_in, list) or len(layers_in) != num_layers:
        got = len(layers_in) if isinstance(layers_in, list) else type(layers_in).__name__
        raise PlanError(f"layers must be a list of num_layers={num_layers} entries, got {got}")
    layers: list[list[Replicas]] = []
    for li, entry in enumerate(layers_in):
        where = f"layers[{li}]: "
        if not isinstance(entry, dict) or entry.get("layer") != li:
            raise PlanError(f"{where}expected an object with layer={li}, got {str(entry)[:80]}")
        placement = entry.get("placement")
        if not isinstance(placement, list) or len(placement) != kv:
            got = len(placement) if isinstance(placement, list) else type(placement).__name__
            raise PlanError(f"{where}placement must list num_kv_heads={kv} heads, got {got}")
        heads: list[Replicas] = []
        for hi, hp in enumerate(placement):
            hw = f"layers[{li}].placement[{hi}]: "
            if not isinstance(hp, dict) or hp.get("kv_head") != hi:
                raise PlanError(f"{hw}expected kv_head={hi}, got {str(hp)[:80]}")
            reps_in = hp.get("replicas")
            if not isinstance(reps_in, list) or not reps_in:
                raise PlanError(f"{hw}kv_head {hi} needs at least one replica, got {reps_in!r}")
            reps: Replicas = []
            for ri, rep in enumerate(reps_in):
                rw = f"{hw}replicas[{ri}]: "
                if not isinstance(rep, dict):
                    raise PlanError(f"{rw}expected an object, got {rep!r}")
                rank = rep.get("rank")
                if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp:
                    raise PlanError(f"{rw}rank must be an integer in [0, tp={tp}), got {rank!r}")
                share = rep.get("share")
                if (isinstance(share, bool) or not isinstance(share, (int, float))
                        or not math.isfinite(share) or not 0 < share <= 1 + SHARE_TOL):
                    raise PlanError(f"{rw}share must be a number in (0, 1], got {share!r}")
                reps.append((rank, float(share)))
            ranks = [r for r, _ in reps]
            if len(set(ranks)) != len(ranks):
                raise PlanError(f"{hw}kv_head {hi} has two replicas on one rank: ranks {ranks}")
            total = sum(s for _, s in reps)
            if abs(total - 1.0) > SHARE_TOL:
                raise PlanError(f"{hw}shares of kv_head {hi} sum to {total:.9g}, not 1")
            heads.append(reps)
        layers.append(heads)
    predicted = d.get("predicted", {})
    return Plan(model=d["model"], tp=tp, num_kv_heads=kv, strategy=d["strategy"],
                cost_model=dict(cm), layers=layers, num_q_heads=q,
                predicted=predicted if isinstance(predicted, dict) else {},
                source=_source(d.get("source"), num_layers, kv))


def _source(src: Any, num_layers: int, kv: int) -> dict:
    """The optional ``source`` object: its ``kv_len_mean`` must have the plan's shape."""
    if src is None:
        return {}
    if not isinstance(src, dict):
        raise PlanError(f"source must be an object, got {type(src).__name__}")
    m = src.get("kv_len_mean")
    if not isinstance(m, list) or len(m) != num_layers or any(
            not isinstance(row, list) or len(row) != kv for row in m):
        raise PlanError(f"source.kv_len_mean must be [num_layers={num_layers}][num_kv_heads={kv}] numbers")
    for i, row in enumerate(m):
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise PlanError(f"source.kv_len_mean[{i}][{j}] must be a finite number >= 0, got {x!r}")
    return dict(src)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; raises :class:`PlanError` (also for unreadable JSON)."""
    return plan_from_json(read_json(path, PlanError))
