"""The one balance formula, used for memory and for time alike.

FairKV's "GPU busy rate" (paper, eq. 6): every layer ends in an all-reduce, so a step costs, per layer,
the slowest rank; the busy rate is the work the ranks do over the work they would do if every rank
were as busy as the slowest, ``sum_l mean_r load[r, l] / sum_l max_r load[r, l]`` (1.0 when nothing is
loaded). Two balances use it, and the names say which:

* **attention busy rate** -- ``load[r, l]`` = the rows (or cost-model time) rank ``r`` reads in layer
  ``l``: the time balance FairKV optimises;
* **memory busy rate** -- one "layer", ``load[r]`` = the KV rows rank ``r`` holds over all layers: which
  rank runs out of KV memory first (sha can be 1.0 here and 0.8 per layer).
"""

from __future__ import annotations

import numpy as np


def busy_rate_of_sums(mean_sum: np.ndarray, max_sum: np.ndarray) -> float:
    """``sum(mean_sum) / sum(max_sum)``, 1.0 when ``max_sum`` sums to 0: the busy rate from per-layer
    sums of the mean and of the max over ranks (over steps, when they are sums over sampled steps)."""
    mx = float(np.sum(max_sum))
    return float(np.sum(mean_sum)) / mx if mx > 0 else 1.0


def busy_rate(loads) -> float:
    """The busy rate of ``loads`` ``[ranks, layers]`` (or ``[ranks]``: one layer), any numeric array or
    CPU tensor."""
    x = np.asarray(loads, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.size == 0:
        return 1.0
    return busy_rate_of_sums(x.mean(axis=0), x.max(axis=0))


def layer_balance_of_sums(mean_sum: np.ndarray, max_sum: np.ndarray) -> np.ndarray:
    """float64 ``[layers]``: per layer ``mean_sum / max_sum`` (1.0 where ``max_sum`` is 0)."""
    mx = np.asarray(max_sum, dtype=np.float64)
    return np.where(mx > 0, np.asarray(mean_sum, dtype=np.float64) / np.where(mx > 0, mx, 1.0), 1.0)


def layer_balance(loads) -> np.ndarray:
    """float64 ``[layers]``: per layer, mean over ranks / max over ranks of ``loads`` ``[ranks, layers]``
    (1.0 for a layer nobody loads)."""
    x = np.asarray(loads, dtype=np.float64)
    return layer_balance_of_sums(x.mean(axis=0), x.max(axis=0))
