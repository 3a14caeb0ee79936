"""What the served traffic looks like to the plan: kept tokens per head, per-layer balance over time.

Host-side numpy, fed from events every rank sees alike (so every rank could report the same; rank 0
does): each compressed prompt's kept tokens per (layer, KV head) of the whole model (the TP group's
ledger, :meth:`record`), and every ``sample_every``-th decode step the per-layer rank loads of the
requests decoding (:meth:`decode_step`). From them:

* the **live profile**: mean / std / p10 / p50 / p90 of kept tokens per (layer, KV head) over the last
  ``window`` compressed prompts -- the ``fairkv-stats/1`` numbers ``python -m sglang_fairkv.profiler
  --from-server`` writes, to re-plan with;
* the **attention busy rate since start**: the paper's GPU busy rate (sum over layers of the mean rank
  load / sum over layers of the max) summed over the sampled decode steps -- the time balance of what
  was served, beside the instantaneous one in ``/server_info``;
* the **drift report** (:func:`~sglang_fairkv.placement.drift.drift_report`): live shares vs the plan's
  source stats and the cost-model gain of re-planning, recomputed at most every ``drift_interval_s``.
"""

from __future__ import annotations

import time

import numpy as np

from ..placement.balance import busy_rate_of_sums, layer_balance_of_sums
from ..placement.stats import summarize_counts


class LiveTraffic:
    """Ring of the last ``window`` compressed prompts' kept tokens ``[window, L, KV]`` (int32) and the
    sampled per-layer balance sums; see the module docstring."""

    def __init__(self, num_layers: int, num_kv_heads: int, *, window: int = 1024, sample_every: int = 16,
                 drift_interval_s: float = 30.0):
        self.window, self.sample_every, self.drift_interval_s = window, sample_every, drift_interval_s
        self.kept = np.zeros((window, num_layers, num_kv_heads), dtype=np.int32)
        self.prompt_len = np.zeros(window, dtype=np.int64)
        #: compressed prompts recorded since start (the ring holds the last ``window``)
        self.seen = 0
        self.decode_steps = 0
        #: sampled decode steps and their summed per-layer mean / max rank loads ``[L]`` (rows)
        self.balance_samples = 0
        self.load_mean_sum = np.zeros(num_layers)
        self.load_max_sum = np.zeros(num_layers)
        self._drift: dict | None = None
        self._profile: dict | None = None
        self._drift_at: tuple[int, float] = (-1, -np.inf)

    # ---- events -----------------------------------------------------------------------------
    def record(self, kept: np.ndarray, prompt_len: int) -> None:
        """A compressed prompt's kept tokens per (layer, KV head), int ``[L, KV]``."""
        i = self.seen % self.window
        self.kept[i] = kept
        self.prompt_len[i] = prompt_len
        self.seen += 1

    def decode_step(self, layer_loads) -> None:
        """A decode step was launched. ``layer_loads``: a callable returning the ``[tp, L]`` rows each rank
        reads per layer for the requests decoding (called on sampled steps only)."""
        self.decode_steps += 1
        if self.decode_steps % self.sample_every:
            return
        loads = np.asarray(layer_loads(), dtype=np.float64)
        if loads.sum() <= 0:
            return
        self.balance_samples += 1
        self.load_mean_sum += loads.mean(axis=0)
        self.load_max_sum += loads.max(axis=0)

    # ---- views ------------------------------------------------------------------------------
    def _filled(self) -> np.ndarray:
        return self.kept[:min(self.seen, self.window)]

    def live_mean(self) -> np.ndarray | None:
        """float64 ``[L, KV]``: mean kept tokens per request over the window, None before any prompt."""
        k = self._filled()
        return k.mean(axis=0) if len(k) else None

    def profile(self) -> dict | None:
        """The live profile (JSON-ready), None before any compressed prompt."""
        if self._profile is not None and self._profile["seen"] == self.seen:
            return self._profile
        k = self._filled()
        if not len(k):
            return None
        self._profile = {"samples": int(len(k)), "seen": self.seen,
                         "prompt_len_mean": float(self.prompt_len[:len(k)].mean()),
                         **{key: np.round(v, 3).tolist() for key, v in summarize_counts(k).items()}}
        return self._profile

    def attention_busy_rate_since_start(self) -> float | None:
        """Sum over sampled steps and layers of the mean rank load / of the max; None before a sample."""
        if not self.balance_samples:
            return None
        return busy_rate_of_sums(self.load_mean_sum, self.load_max_sum)

    def layer_balance_since_start(self) -> list[float] | None:
        """Per layer, the same ratio over the sampled steps (``[L]``), None before a sample."""
        if not self.balance_samples:
            return None
        return np.round(layer_balance_of_sums(self.load_mean_sum, self.load_max_sum), 4).tolist()

    def drift(self, plan, *, num_q_heads: int, head_dim: int, now: float | None = None) -> dict | None:
        """The drift report for ``plan`` on the live means (cached: recomputed when new prompts arrived
        and ``drift_interval_s`` has passed), None before any compressed prompt."""
        from ..placement.drift import drift_report

        now = time.monotonic() if now is None else now
        seen, at = self._drift_at
        if self.seen and self.seen != seen and now - at >= self.drift_interval_s:
            self._drift = drift_report(plan, self.live_mean(), min(self.seen, self.window),
                                       num_q_heads=num_q_heads, head_dim=head_dim)
            self._drift_at = (self.seen, now)
        return self._drift
