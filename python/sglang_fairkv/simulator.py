"""Predict decode step time and throughput of a TP group serving a FairKV plan.

Inputs: the plan (per layer: replicas and shares), per-head stats (mean kept tokens), the model
shape, a batch size, and a calibration file of *measured* costs
(``benchmark/calibration/h200-2026-11-26.json``: per-rank FlashInfer ragged decode times from a
one-GPU TP emulation, per-rank decode GEMM times, device copy bandwidth).

Model of one decode step (per layer, summed over layers)::

    rank r:  attn[r] = c0 + c_seg * segments[r] + c_tok * tokens[r]      (fitted, see AttentionFit)
             proj[r] = (qkv + o)(model, tp, B) * heads_held[r] / (H / tp)  (weight-read bound GEMMs)
    layer  = max_r (attn[r] + proj[r]) + (gate_up + down)(model, tp, B) + 2 * allreduce(B)

``segments[r] = B * sum_h share`` and ``tokens[r] = B * sum_h share * w[h]`` over the heads rank r
holds. The all-reduce is **assumed**, not measured (no multi-GPU machine yet):
``allreduce_latency_us + 2 (R-1)/R * B * hidden * 2 bytes / allreduce_GBps``. Memory: each rank holds
``weights / tp`` plus copied heads' Q/K/V/O slices, and KV ``B * sum_l sum_h share * w * 2 * D * 2``
bytes; the largest batch that fits ``hbm_GB * mem_fraction`` on every rank decides throughput.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .placement.balance import busy_rate_of_sums
from .placement.metrics import copy_weight_bytes
from .placement.schema import Plan
from .placement.stats import KVStats

#: bf16 parameters of the shapes we simulate (billions), for per-rank weight memory.
PARAMS_B = {"llama-3.3-70b": 70.6, "mistral-small-24b": 23.6}


@dataclass(frozen=True)
class AttentionFit:
    """Per-rank ragged decode time in us: ``c0 + c_seg * segments + c_tok * tokens``."""

    c0: float
    c_seg: float
    c_tok: float

    def __call__(self, segments, tokens):
        return self.c0 + self.c_seg * np.asarray(segments) + self.c_tok * np.asarray(tokens)


def emulation_rank_loads(row: dict) -> list[tuple[float, float]]:
    """(segments, tokens) per rank of one TP-emulation row, rebuilding its placement exactly as the
    probe did (SHA contiguous; LPT by head length; LPT+copy: heaviest head split over its rank and
    the lightest other rank, half the batch each)."""
    lens, B, tp, plan = row["head_len"], row["B"], row["TP"], row["plan"]
    H = len(lens)
    per = H // tp
    sha = [[(h, 1.0) for h in range(r * per, (r + 1) * per)] for r in range(tp)]
    order = sorted(range(H), key=lambda h: -lens[h])
    loads = [0] * tp
    lpt: list[list[tuple[int, float]]] = [[] for _ in range(tp)]
    for h in order:
        r = min(range(tp), key=lambda x: loads[x])
        lpt[r].append((h, 1.0))
        loads[r] += lens[h]
    if plan == "SHA":
        place = sha
    elif plan == "LPT":
        place = lpt
    else:
        heavy = max(range(H), key=lambda h: lens[h])
        place = [list(x) for x in lpt]
        owner = next(r for r in range(tp) if any(h == heavy for h, _ in place[r]))
        light = min((r for r in range(tp) if r != owner), key=lambda r: sum(lens[h] for h, _ in place[r]))
        place[owner] = [(h, 0.5) if h == heavy else (h, s) for h, s in place[owner]]
        place[light].append((heavy, 0.5))
    return [(B * sum(s for _, s in heads), B * sum(s * lens[h] for h, s in heads)) for heads in place]


def fit_attention(rows: list[dict]) -> AttentionFit:
    """Least-squares fit of :class:`AttentionFit` to every rank of the given emulation rows."""
    X, y = [], []
    for row in rows:
        for (seg, tok), us in zip(emulation_rank_loads(row), row["rank_us"]):
            X.append([1.0, seg, tok])
            y.append(us)
    coef, *_ = np.linalg.lstsq(np.array(X), np.array(y), rcond=None)
    c0, c_seg, c_tok = (max(0.0, float(c)) for c in coef)
    return AttentionFit(c0, c_seg, c_tok)


@dataclass(frozen=True)
class Calibration:
    """Measured costs (see module docstring) plus the documented assumptions."""

    attention: AttentionFit
    gemm_rows: tuple
    hbm_GB: float
    device: str
    allreduce_latency_us: float = 15.0  # assumed (NVLink ring, small messages)
    allreduce_GBps: float = 300.0  # assumed bus bandwidth
    mem_fraction: float = 0.9
    source: str = ""

    @classmethod
    def load(cls, path: str | Path, fit_plans: tuple[str, ...] = ("SHA", "LPT")) -> "Calibration":
        """Read a calibration file; the attention model is fitted on rows whose plan is in
        ``fit_plans`` (the copy rows are then held out for validation)."""
        d = json.loads(Path(path).read_text())
        rows = d["attention_tp_emulation"]["rows"]
        fit_rows = [r for r in rows if r["plan"] in fit_plans]
        return cls(attention=fit_attention(fit_rows), gemm_rows=tuple(d["decode_gemm"]["rows"]),
                   hbm_GB=d["hbm_GB"], device=d["device"], source=d.get("source", ""))

    def gemm_us(self, model: str, tp: int, batch: float) -> dict[str, float]:
        """Per-rank GEMM times of one layer at ``batch``: linear in log2(batch) between measured points
        (clamped to the measured range, 1..2048)."""
        pts = sorted((r for r in self.gemm_rows if r["model"] == model and r["tp"] == tp),
                     key=lambda r: r["batch"])
        if not pts:
            raise ValueError(f"no GEMM calibration for model={model!r} tp={tp}")
        xs = np.log2([r["batch"] for r in pts])
        x = math.log2(min(max(batch, pts[0]["batch"]), pts[-1]["batch"]))
        return {k: float(np.interp(x, xs, [r[k] for r in pts])) for k in ("qkv", "o", "gate_up", "down")}

    def allreduce_us(self, tp: int, batch: float, hidden: int) -> float:
        if tp == 1:
            return 0.0
        return self.allreduce_latency_us + 2 * (tp - 1) / tp * batch * hidden * 2 / (self.allreduce_GBps * 1e3)


@dataclass(frozen=True)
class StepPrediction:
    step_us: float
    attention_us: float  # sum over layers of the slowest rank's attention + projections
    mlp_us: float
    allreduce_us: float
    batch: int
    attention_busy_rate: float  # sum over layers of mean rank (attn + proj) / max

    @property
    def tokens_per_s(self) -> float:
        return self.batch / (self.step_us * 1e-6)


def rank_loads(plan: Plan, stats: KVStats, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per rank in ``layer``: (sum of shares, sum of share * w, replicas held), float64 [R] each."""
    seg, tok, held = np.zeros(plan.tp), np.zeros(plan.tp), np.zeros(plan.tp)
    for h, reps in enumerate(plan.layers[layer]):
        for r, s in reps:
            seg[r] += s
            tok[r] += s * stats.kv_len_mean[layer][h]
            held[r] += 1
    return seg, tok, held


def predict_step(plan: Plan, stats: KVStats, shape: str, batch: int, cal: Calibration) -> StepPrediction:
    """Decode step time of ``plan`` at ``batch`` requests (see module docstring)."""
    g = cal.gemm_us(shape, plan.tp, batch)
    heads_per_rank = stats.num_kv_heads / plan.tp
    layer_max, layer_mean = [], []
    for l in range(stats.num_layers):
        seg, tok, held = rank_loads(plan, stats, l)
        t = cal.attention(batch * seg, batch * tok) * (seg > 0) + (g["qkv"] + g["o"]) * held / heads_per_rank
        layer_max.append(float(t.max()))
        layer_mean.append(float(t.mean()))
    attn = sum(layer_max)
    mlp = stats.num_layers * (g["gate_up"] + g["down"])
    ar = stats.num_layers * 2 * cal.allreduce_us(plan.tp, batch, stats.hidden)
    return StepPrediction(step_us=attn + mlp + ar, attention_us=attn, mlp_us=mlp, allreduce_us=ar,
                          batch=batch, attention_busy_rate=busy_rate_of_sums(layer_mean, layer_max))


def max_batch(plan: Plan, stats: KVStats, shape: str, cal: Calibration, cap: int = 2048) -> int:
    """Largest batch whose KV fits on every rank (weights / tp + copied heads' weights per rank)."""
    kv_bytes = 2 * stats.head_dim * 2  # K and V, bf16, per token per head
    per_req = np.zeros(plan.tp)
    copies = np.zeros(plan.tp)
    for l in range(stats.num_layers):
        seg, tok, held = rank_loads(plan, stats, l)
        per_req += tok * kv_bytes
        copies += np.maximum(held - stats.num_kv_heads / plan.tp, 0)
    weights = PARAMS_B[shape] * 1e9 * 2 / plan.tp + copies * copy_weight_bytes(stats)
    free = cal.hbm_GB * 1e9 * cal.mem_fraction - weights
    if (free <= 0).any():
        return 0
    return int(min(cap, np.floor((free / np.maximum(per_req, 1e-9)).min())))


def predict_throughput(plan: Plan, stats: KVStats, shape: str, cal: Calibration,
                       batch: int | None = None) -> StepPrediction:
    """Decode tokens/s at ``batch`` (default: the largest batch memory allows)."""
    b = batch if batch is not None else max_batch(plan, stats, shape, cal)
    if b < 1:
        raise ValueError(f"the plan does not fit: weights leave no KV memory on some rank (tp={plan.tp})")
    return predict_step(plan, stats, shape, b, cal)


def calibrated_cost(cal: Calibration, stats: KVStats, shape: str, tp: int, batch: int):
    """The planner's cost model matching this calibration at ``batch``, in token-reads.

    Returns ``(CostModel, w_offset)``: the fitted per-segment cost becomes a constant ``w_offset``
    added to every head's mean length (it scales with a head's share like its tokens do), and
    ``c_head`` is one head's Q/K/V/O projection time over the per-token attention time.
    """
    from .placement.cost import CostModel

    g = cal.gemm_us(shape, tp, batch)
    per_tok = batch * cal.attention.c_tok
    proj_per_head = (g["qkv"] + g["o"]) / (stats.num_kv_heads / tp)
    return (CostModel(c_head=proj_per_head / per_tok, c_token=1.0,
                      calibration=f"{cal.device} fit at batch {batch}"),
            cal.attention.c_seg / cal.attention.c_tok)


def plan_calibrated(stats: KVStats, shape: str, tp: int, strategy: str, cal: Calibration,
                    batch: int, **kw) -> Plan:
    """``build_plan`` with :func:`calibrated_cost` (plans on ``w + w_offset``, reports on ``w``)."""
    from dataclasses import replace

    from .placement import build_plan, evaluate

    cost, offset = calibrated_cost(cal, stats, shape, tp, batch)
    shifted = replace(stats, kv_len_mean=stats.kv_len_mean + offset)
    plan, _ = build_plan(shifted, tp, strategy, cost, **kw)
    return replace(plan, predicted=evaluate(plan, stats))


@dataclass(frozen=True)
class GroupPrediction:
    """Data-parallel replicas behind a router (``--dp-size`` or several servers): each replica a TP group
    of its own (its plan, its traffic's stats, its batch); they share nothing, so the group's decode
    throughput is the sum of the replicas'. SIMULATED like :func:`predict_step`."""

    replicas: tuple[StepPrediction, ...]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens_per_s for r in self.replicas)

    @property
    def per_replica_tokens_per_s(self) -> list[float]:
        return [r.tokens_per_s for r in self.replicas]


def predict_replicas(replicas: list[tuple[Plan, KVStats]], shape: str, cal: Calibration,
                     batch: int | None = None) -> GroupPrediction:
    """Decode throughput of DP replicas, each ``(plan, stats of the traffic it serves)``, each at the
    largest batch its own ranks' memory allows (or ``batch``)."""
    if not replicas:
        raise ValueError("no replica")
    return GroupPrediction(tuple(predict_throughput(p, s, shape, cal, batch) for p, s in replicas))
