"""One compression setting for a server or a dump: which method, how much, and the per-layer choice.

:class:`CompressConfig` is what ``--kv-compress ...`` parses into (frozen; JSON round trip so it can
travel to SGLang's spawned scheduler processes through ``FAIRKV_KV_COMPRESS``).
:func:`kept_for_layer` is the one place that turns one layer's window queries and prompt keys into
kept positions per KV head; the server backend and ``kvdump`` both call it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .budgets import (load_head_budgets, n_kept_for_budget, n_kept_for_ratio, pyramid_layer_budget,
                      select_adakv, select_per_head, select_uniform)
from .snapkv import SnapKVScorer

METHODS = ("none", "snapkv", "adakv", "pyramidkv", "headkv")


@dataclass(frozen=True)
class CompressConfig:
    """``budget``: mean kept tokens per head; ``ratio``: kvpress ``compression_ratio`` (one of them,
    except for ``none`` and ``headkv``); ``head_budgets``: JSON file for ``headkv``."""

    method: str = "none"
    budget: int | None = None
    ratio: float | None = None
    window: int = 64
    kernel: int = 5
    alpha: float = 0.2
    head_budgets: str | None = None
    #: decode-time compression (kvpress ``DecodingPress``): ``none``, ``snapkv`` or ``adakv`` -- every
    #: ``decode_interval`` decode steps a request's segments are re-scored with its last ``decode_window``
    #: decode queries and cut to ``decode_budget`` rows per head (AdaKV: per layer on average)
    decode_method: str = "none"
    decode_budget: int = 2048
    decode_interval: int = 512
    decode_window: int = 32

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--kv-compress must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give --kv-budget or --kv-compress-ratio, not both")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"--kv-budget must be >= 1 token per head, got {self.budget}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"--kv-compress-ratio must be in [0, 1), got {self.ratio}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--kv-alpha must be in [0, 1], got {self.alpha}")
        SnapKVScorer(window=self.window, kernel=self.kernel)  # validates window / kernel
        if self.method in ("snapkv", "adakv", "pyramidkv") and self.budget is None and self.ratio is None:
            raise ValueError(f"--kv-compress {self.method} needs --kv-budget N or --kv-compress-ratio R")
        if self.method == "headkv" and not self.head_budgets:
            raise ValueError("--kv-compress headkv needs --kv-head-budgets FILE")
        if self.method != "headkv" and self.head_budgets:
            raise ValueError("--kv-head-budgets is only used with --kv-compress headkv")
        check_decode(self)

    @property
    def enabled(self) -> bool:
        """Prefill compression is on (a prompt's last chunk is compressed)."""
        return self.method != "none"

    @property
    def decode_enabled(self) -> bool:
        """Decode-time compression is on (``--kv-decode-compress``)."""
        return self.decode_method != "none"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CompressConfig":
        return cls(**json.loads(text))

    def n_kept(self, seq_len: int) -> int:
        """Mean kept tokens per head for a prompt of ``seq_len`` tokens (``seq_len`` for none/headkv)."""
        if self.ratio is not None:
            return min(seq_len, n_kept_for_ratio(seq_len, self.ratio))
        if self.budget is not None:
            return n_kept_for_budget(seq_len, self.budget)
        return seq_len

    def pyramid_ratio(self, seq_len: int) -> float:
        """PyramidKV's compression ratio for a ``seq_len``-token prompt: the given ratio, or the one the
        budget implies (``1 - n_kept / seq_len``); the per-layer budgets come from it."""
        return self.ratio if self.ratio is not None else 1.0 - self.n_kept(seq_len) / seq_len


#: ``--kv-compress-ratio`` when a method that needs a budget is given none
DEFAULT_RATIO = 0.5
#: ``--kv-decode-compress`` choices (the base scorer of the decoding press)
DECODE_METHODS = ("none", "snapkv", "adakv")


def check_decode(cfg: CompressConfig) -> None:
    """The decode-time settings' rules (ValueError, one line, naming the flag): kvpress's ``DecodingPress``
    needs an interval longer than the scorer's window (the window's queries are the interval's last decode
    steps), a budget of at least the window (the window's rows are always kept: a smaller budget keeps only
    the newest tokens), positive sizes, and a prefill method it can follow (HeadKV / PyramidKV fix budgets
    per head or layer that a decode re-scoring would overrule)."""
    m = cfg.decode_method
    if m not in DECODE_METHODS:
        raise ValueError(f"--kv-decode-compress must be one of {', '.join(DECODE_METHODS)}, got {m!r}")
    if m == "none":
        return
    if cfg.decode_window < 1:
        raise ValueError(f"--kv-decode-window must be >= 1, got {cfg.decode_window}")
    if cfg.decode_interval <= cfg.decode_window:
        raise ValueError(f"--kv-decode-interval {cfg.decode_interval} must be longer than --kv-decode-window "
                         f"{cfg.decode_window} (the window's queries are the interval's last decode steps)")
    if cfg.decode_budget < cfg.decode_window:
        raise ValueError(f"--kv-decode-budget {cfg.decode_budget} is below --kv-decode-window {cfg.decode_window}: "
                         "the window's rows are always kept, so every head would keep only the newest tokens")
    if cfg.method in ("pyramidkv", "headkv"):
        raise ValueError(f"--kv-decode-compress {m} cannot follow --kv-compress {cfg.method}: its per-layer / "
                         "per-head budgets would be overruled by the decode re-scoring (use snapkv, adakv or none)")


def check_against_context(cfg: CompressConfig, context_len: int) -> list[str]:
    """The budget / window rule against the longest prompt the server takes (``context_len`` tokens).

    Refused (ValueError): a window of at least the context length (no prompt is ever longer than its
    window, so nothing is ever compressed: run ``--kv-compress none`` instead). Warned (returned as
    texts): a budget below the window -- SnapKV always keeps the window's own tokens first, so a kept
    set smaller than the window is only the prompt's last tokens and the rest of the prompt is lost; a
    budget of at least the context length (nothing is ever compressed). (A ratio keeps fewer tokens than
    the window for prompts shorter than ``window / (1 - ratio)``, the same as kvpress: not warned.)
    """
    if not cfg.enabled:
        return []
    w = cfg.window
    if w >= context_len:
        raise ValueError(f"--kv-window {w} is not below the context length {context_len}: no prompt would "
                         "ever be compressed (give a smaller window, or --kv-compress none)")
    out = []
    if cfg.budget is not None and cfg.budget < w:
        out.append(f"--kv-budget {cfg.budget} is below the observation window (--kv-window {w}): SnapKV keeps "
                   f"the window's own tokens first, so a compressed prompt keeps only its last {cfg.budget} "
                   f"tokens per head and loses the rest (use a budget of at least {w}, or a smaller window)")
    if cfg.budget is not None and cfg.budget >= context_len:
        out.append(f"--kv-budget {cfg.budget} is not below the context length {context_len}: no prompt will "
                   "be compressed")
    return out


def kept_for_layer(cfg: CompressConfig, layer: int, num_layers: int, q_window: torch.Tensor,
                   k: torch.Tensor, head_budgets: torch.Tensor | None = None, *,
                   head_ids: list[int] | None = None,
                   gather_scores: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
                   ) -> list[torch.Tensor] | None:
    """Kept positions of one layer, or None when the layer keeps everything.

    Parameters
    ----------
    q_window : [G * H, window, head_dim] post-RoPE queries of the prompt's last ``window`` tokens,
        the ``G`` query heads of each KV head of ``k`` in order.
    k : [H, seq_len, head_dim] post-RoPE keys of the whole prompt, for ``H`` of the layer's KV heads
        (all of them at TP = 1; a rank's own ones under a FairKV plan, possibly none).
    head_budgets : int64 [num_layers, num_kv_heads] for ``headkv``.
    head_ids : the layer-global KV head id of each of ``k``'s heads (default ``0 .. H-1``).
    gather_scores : AdaKV on a subset of heads: ``(scores [H, seq_len], head_ids) -> [num_kv_heads,
        seq_len]``, the whole layer's scores (an exchange between TP ranks), so the layer-wide top-k
        equals TP = 1 exactly. Called on every rank whenever the layer is compressed.

    Returns a list (one per head of ``k``) of sorted int64 positions. Prompts no longer than the
    window or than the budget are kept whole. Whether a layer is compressed depends only on the
    setting and ``seq_len`` (the same on every rank).
    """
    if not cfg.enabled:
        return None
    seq_len = k.shape[1]
    if seq_len <= cfg.window:
        return None
    n_kept = cfg.n_kept(seq_len)
    if cfg.method != "headkv" and n_kept >= seq_len:
        return None
    ids = list(range(k.shape[0])) if head_ids is None else list(head_ids)
    if k.shape[0]:
        scores = SnapKVScorer(window=cfg.window, kernel=cfg.kernel).score(q_window, k)
    else:  # this rank holds none of the layer's heads for this request
        scores = k.new_zeros(0, seq_len, dtype=torch.float32)
    if cfg.method == "snapkv":
        return select_uniform(scores, n_kept)
    if cfg.method == "adakv":
        if gather_scores is None:
            return select_adakv(scores, n_kept, cfg.alpha)
        full = gather_scores(scores, ids)
        # the scorer pads the window columns with (max over *its* heads) + 1; TP = 1 uses the layer's max
        full[:, seq_len - cfg.window:] = full[:, :seq_len - cfg.window].max() + 1
        kept = select_adakv(full, n_kept, cfg.alpha)
        return [kept[h] for h in ids]
    if cfg.method == "pyramidkv":
        return select_uniform(scores, pyramid_layer_budget(layer, num_layers, seq_len, cfg.pyramid_ratio(seq_len),
                                                           cfg.window))
    if head_budgets is None:
        raise ValueError("headkv needs the per-head budgets tensor")
    return select_per_head(scores, head_budgets[layer][ids])


def load_config_head_budgets(cfg: CompressConfig, num_layers: int, num_kv_heads: int) -> torch.Tensor | None:
    """The ``[num_layers, num_kv_heads]`` budgets for ``headkv`` (ValueError on a bad file), else None."""
    if cfg.method != "headkv":
        return None
    return load_head_budgets(cfg.head_budgets, num_layers, num_kv_heads)
