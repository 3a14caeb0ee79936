"""Per-request rows of a scheduler process, indexed by SGLang's ``req_pool_idx`` (host numpy).

What the adapters and the backend need to know about a request between SGLang's calls, and nothing
SGLang keeps itself: the prompt length its prefill will reach, whether its prompt is done (compressed),
what admission charged it, and the compression scratch of a chunked prompt. A row is reset when its
request releases its KV (finish, abort, retract), so a reused ``req_pool_idx`` starts clean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RequestTable:
    """Rows for ``max_reqs`` request slots of a TP group of ``tp`` ranks (see the module docstring)."""

    max_reqs: int
    tp: int
    #: req_pool_idx -> rid of the admitted request holding it
    admitted: dict[int, str] = field(default_factory=dict)
    #: rid -> replica choice the current admission pass charged it for (taken by the first prefill)
    planned: dict[str, np.ndarray] = field(default_factory=dict)
    #: rid -> pages per rank the admission pass charged it for its whole life (kept + decode), until
    #: admitted; then in ``charged``
    planned_charge: dict[str, np.ndarray] = field(default_factory=dict)
    #: req_pool_idx -> [layer] -> the last ``window`` post-RoPE queries ``[w, Hq, D]`` of a prompt whose
    #: prefill is chunked (SnapKV scores with the prompt's last window, which a later chunk completes)
    q_stash: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    #: req_pool_idx -> kept tokens per layer so far (debug log only)
    kept_log: dict[int, list[int]] = field(default_factory=dict)
    #: rid -> whether the admission pass priced the request's prefill through the prefix tier
    planned_tier: dict[str, bool] = field(default_factory=dict)
    #: req_pool_idx -> int64 host [positions prefilled]: the tier token of each prompt position of a
    #: request whose prefill uses the dense prefix tier (the matched prefix's, then its own chunks')
    tier_tok: dict[int, np.ndarray] = field(default_factory=dict)
    #: req_pool_idx -> first position whose tier token the request owns (before: the radix tree's)
    tier_own_from: dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        n = self.max_reqs
        #: int64 [max_reqs]: the prompt length (``fill_ids``) the request's prefill will reach, -1 when
        #: unknown; the backend compresses in the chunk that reaches it
        self.target_len = np.full(n, -1, dtype=np.int64)
        #: bool [max_reqs]: the prompt is done (compressed); until then its rows are transient
        self.prompt_done = np.zeros(n, dtype=np.bool_)
        #: bool [max_reqs]: the request decodes all its max_new_tokens (ignore_eos): reserved in full
        self.fixed_length = np.zeros(n, dtype=np.bool_)
        #: int64 [max_reqs, tp]: pages each rank was charged for the request's whole life
        self.charged = np.zeros((n, self.tp), dtype=np.int64)
        #: int64 [max_reqs]: decode steps since the prompt or the last decode-time compression
        self.decode_steps = np.zeros(n, dtype=np.int64)
        #: int64 [max_reqs]: rows (group-wide, every layer and head) decode-time compression evicted, and
        #: how many times it ran, for the request in its slot now
        self.decode_evicted = np.zeros(n, dtype=np.int64)
        self.decode_compressions = np.zeros(n, dtype=np.int64)
        #: int64 [max_reqs]: the request's sequence length (prompt + decoded), for the live profile
        self.decode_context = np.zeros(n, dtype=np.int64)

    def admitted_indices(self) -> np.ndarray:
        """int64 ``[n]``: the ``req_pool_idx`` of every admitted request, in admission order."""
        return np.fromiter(self.admitted, dtype=np.int64, count=len(self.admitted))

    def admit(self, req_pool_idx: int, rid: str) -> None:
        """The request's first prefill chunk: its row starts, charged what the admission pass planned."""
        self.admitted[req_pool_idx] = rid
        self.prompt_done[req_pool_idx] = False
        charge = self.planned_charge.pop(rid, None)
        self.charged[req_pool_idx] = 0 if charge is None else charge

    def mark_prompt_done(self, req_pool_idx: np.ndarray, seq_len: np.ndarray | None = None) -> None:
        """These requests' prompts (of ``seq_len`` tokens each) end in the step being built (compressed by
        its end)."""
        idx = np.asarray(req_pool_idx, dtype=np.int64)
        self.prompt_done[idx] = True
        self.decode_steps[idx] = 0  # a re-prefilled (retracted) request counts its interval afresh
        if seq_len is not None:
            self.decode_context[idx] = seq_len

    def count_decode_step(self, req_pool_idx: np.ndarray, interval: int) -> tuple[np.ndarray, np.ndarray]:
        """A decode step of these requests (host ``[b]``) is launched: returns those that reach their
        decode-compression interval with it (their counters restart) and each request's step count in its
        interval with this step (``[b]``, 1 .. ``interval``)."""
        idx = np.asarray(req_pool_idx, dtype=np.int64)
        self.decode_steps[idx] += 1
        self.decode_context[idx] += 1
        steps = self.decode_steps[idx]
        due = idx[steps >= interval]
        self.decode_steps[due] = 0
        return due, steps

    def release(self, req_pool_idx: int) -> str | None:
        """Reset the row; returns the rid that held it (None if it was never admitted)."""
        self.q_stash.pop(req_pool_idx, None)
        self.kept_log.pop(req_pool_idx, None)
        self.target_len[req_pool_idx] = -1
        self.prompt_done[req_pool_idx] = False
        self.fixed_length[req_pool_idx] = False
        self.charged[req_pool_idx] = 0
        self.decode_steps[req_pool_idx] = 0
        self.decode_evicted[req_pool_idx] = 0
        self.decode_compressions[req_pool_idx] = 0
        self.decode_context[req_pool_idx] = 0
        return self.admitted.pop(req_pool_idx, None)
