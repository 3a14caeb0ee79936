"""SnapKV scoring (Li et al. 2024, arXiv 2404.14469): attention of the last ``window`` queries.

Same semantics as NVIDIA kvpress 0.5.5 ``SnapKVPress.score``: softmax over all keys in float32
(causal inside the window), mean over the window queries, ``avg_pool1d`` (``count_include_pad``)
over positions, then a mean (or max) over the query heads of each KV head's GQA group; the window
positions get ``max + 1`` so they are always kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GQA_REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class SnapKVScorer:
    """``window``: observation window (last prompt tokens); ``kernel``: pooling width (odd)."""

    window: int = 64
    kernel: int = 5
    gqa: str = "mean"

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def score(self, q_window: torch.Tensor, k: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
        """Importance of every prompt position for every KV head.

        Parameters
        ----------
        q_window : [num_q_heads, window, head_dim], post-RoPE queries of the last ``window`` tokens.
        k : [num_kv_heads, seq_len, head_dim], post-RoPE keys of the whole prompt
            (``seq_len > window``).
        sm_scale : softmax scale, default ``head_dim ** -0.5``.

        Returns
        -------
        scores : float32 [num_kv_heads, seq_len]; the last ``window`` positions hold ``max + 1``.
        """
        hq, w, d = q_window.shape
        hkv, s, _ = k.shape
        if w != self.window:
            raise ValueError(f"q_window has {w} positions, scorer window is {self.window}")
        if s <= w:
            raise ValueError(f"prompt of {s} tokens must be longer than the window {w}")
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
        group = hq // hkv
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
        # per KV head, its group's window queries stacked: [hkv, group * w, d] against [hkv, s, d] -- K is
        # never expanded to the query heads (a 128k prompt's K would be copied group times per layer)
        qg = q_window.reshape(hkv, group * w, d)
        logits = torch.matmul(qg, k.transpose(1, 2)).view(hkv, group, w, s)
        logits.mul_(scale)
        # causal mask inside the window, in place on the window's own columns: window query i sees
        # keys < s - w + i + 1
        mask = torch.triu(torch.full((w, w), float("-inf"), dtype=logits.dtype, device=logits.device), diagonal=1)
        logits[..., s - w:] += mask
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        del logits
        scores = probs[..., : s - w].mean(dim=-2)  # [hkv, group, s - w]
        del probs
        scores = F.avg_pool1d(scores.reshape(hkv * group, 1, s - w), kernel_size=self.kernel,
                              padding=self.kernel // 2, stride=1).view(hkv, group, s - w)
        scores = scores.mean(1) if self.gqa == "mean" else scores.amax(1)
        # the window's positions score max + 1 (always kept); the max stays on the device (no .item())
        top = (scores.max() + 1).expand(hkv, w)
        return torch.cat([scores, top], dim=-1).float()
