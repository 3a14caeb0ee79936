"""The per-layer cost model the planner minimises.

Rank time in one layer (arbitrary time unit)::

    T[r] = c_head * (replicas held by r, copies included) + c_token * sum_h share[h][r] * w[h]

where ``w[h]`` is the mean kept KV tokens per request of KV head ``h``. Both terms are reads of
memory in a bandwidth-bound decode step (DESIGN.md section 7: uniform ragged decode runs at 3.3-4.0
TB/s; small-batch decode GEMMs are weight-read bound), so the default is in *token-reads*:
``c_token = 1`` (one kept token of one request: K and V, ``2 * head_dim`` elements) and ``c_head`` =
the Q/K/V/O weight slice of one KV head (``(2 * group + 2) * head_dim * hidden`` elements), read once
per step for the whole batch, divided by ``batch`` token-reads::

    c_head = (2 * group + 2) * hidden / (2 * batch)

LLaMA-3.3-70B at batch 256: c_head = 18 * 8192 / 512 = 288 token-reads (about 11 us of weight reads
vs 81 us of KV reads for a 2048-token head at 3.3 TB/s). A smaller batch makes copies dearer.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CALIBRATION_BATCH = 256


@dataclass(frozen=True)
class CostModel:
    """``c_head``: cost of holding one head replica; ``c_token``: cost per kept token share."""

    c_head: float
    c_token: float = 1.0
    calibration: str = "user"

    def __post_init__(self):
        if not (self.c_head >= 0 and self.c_token > 0):
            raise ValueError(f"need c_head >= 0 and c_token > 0, got c_head={self.c_head}, "
                             f"c_token={self.c_token}")

    def to_json(self) -> dict:
        return {"c_head": self.c_head, "c_token": self.c_token, "calibration": self.calibration}


def default_cost_model(group_size: int, hidden: int, batch: int = DEFAULT_CALIBRATION_BATCH) -> CostModel:
    """The bandwidth-calibrated default described in the module docstring."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    c_head = (2 * group_size + 2) * hidden / (2 * batch)
    return CostModel(c_head=c_head, c_token=1.0,
                     calibration=f"weight-read vs KV-read bytes at batch {batch}")
