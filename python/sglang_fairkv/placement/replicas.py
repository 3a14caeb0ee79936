"""Fair-Copying at run time: which replica of a copied KV head serves each request.

Every TP rank runs its own scheduler and sees the same admissions and releases in the same order, so
each rank can run :class:`ReplicaAssigner` on its own and all of them agree without talking: the
assignment is a pure function of that shared sequence (no clocks, no randomness, ties to the lower
rank).

Rule (weighted deficit): a request of weight ``w`` (its prompt tokens: a head's KV grows with it) goes,
for every copied head, to the replica with the largest deficit ``share_i * (L + w) - load_i``, where
``L`` is the head's live load and ``load_i`` the live load on replica ``i``; the choice is sticky
until the request is released. With arrivals only, each replica's load stays within one request
weight of ``share_i * L`` (the deficit round-robin bound). Departures cannot be steered (requests are
sticky), so no rule bounds the error against adversarial departures; under random departures the
next arrivals pull the loads back (tested: mean relative error about 1.5%, p95 about 6%).
When a head has no live load at all (requests one at a time), the live deficit would always pick the
largest share; the rule then uses the cumulative weight each replica has served instead, so a
sequential stream is split by the plan's shares too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .schema import Plan


@dataclass
class ReplicaAssigner:
    """Sticky, deterministic replica choice per (request, layer, copied KV head).

    ``plan.layers[l][h]`` lists ``(rank, share)``; heads with one replica need no choice.
    """

    plan: Plan
    _copied: list[tuple[int, int, np.ndarray, np.ndarray]] = field(init=False)
    _load: list[np.ndarray] = field(init=False)
    _owner: dict[str, np.ndarray] = field(init=False, default_factory=dict)
    _weight: dict[str, float] = field(init=False, default_factory=dict)
    _served: list[np.ndarray] = field(init=False)

    def __post_init__(self):
        self._copied = []
        for l, layer in enumerate(self.plan.layers):
            for h, reps in enumerate(layer):
                if len(reps) > 1:
                    ranks = np.array([r for r, _ in reps], dtype=np.int64)
                    shares = np.array([s for _, s in reps], dtype=np.float64)
                    self._copied.append((l, h, ranks, shares))
        self._load = [np.zeros(len(c[2])) for c in self._copied]
        self._served = [np.zeros(len(c[2])) for c in self._copied]
        self._base_owner = np.full((self.plan.num_layers, self.plan.num_kv_heads), -1, dtype=np.int64)
        for l, layer in enumerate(self.plan.layers):
            for h, reps in enumerate(layer):
                if len(reps) == 1:
                    self._base_owner[l, h] = reps[0][0]

    @property
    def num_copied_heads(self) -> int:
        return len(self._copied)

    def choose(self, weight: float, pending: list[np.ndarray] | None = None) -> np.ndarray:
        """The replica :meth:`admit` would pick for a request of ``weight`` now, without recording it.

        ``pending``: per copied head, extra live load per replica (requests chosen earlier in the same
        admission pass and not admitted yet: they count as live and as served). Returns int64
        ``[num_copied_heads]``, an index into each copied head's replica list.
        """
        if not weight > 0:
            raise ValueError(f"request weight must be > 0, got {weight}")
        chosen = np.empty(len(self._copied), dtype=np.int64)
        for i, (_, _, _, shares) in enumerate(self._copied):
            extra = 0.0 if pending is None else pending[i]
            load = self._load[i] + extra
            ref = load if load.sum() > 0 else self._served[i] + extra
            deficit = shares * (ref.sum() + weight) - ref
            chosen[i] = int(np.argmax(deficit))  # first maximum: the lower-listed replica wins ties
        return chosen

    @property
    def copied_ranks(self) -> list[np.ndarray]:
        """Per copied head (the order of a choice): the ranks of its replicas."""
        return [c[2] for c in self._copied]

    @property
    def copied_heads(self) -> list[tuple[int, int]]:
        """Per copied head (the order of a choice): its (layer, KV head)."""
        return [(l, h) for l, h, _, _ in self._copied]

    def choice_for(self, owner: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`owners_for`: int64 ``[num_copied_heads]``, the index of ``owner[l, h]`` (int
        ``[layers, kv_heads]``) among each copied head's replicas, -1 where that rank holds no replica."""
        out = np.full(len(self._copied), -1, dtype=np.int64)
        for i, (l, h, ranks, _) in enumerate(self._copied):
            hit = np.nonzero(ranks == owner[l, h])[0]
            if hit.size:
                out[i] = hit[0]
        return out

    @property
    def base_owner(self) -> np.ndarray:
        """int64 ``[layers, kv_heads]``: the rank of each single-replica head, -1 for copied heads."""
        return self._base_owner.copy()

    def new_pending(self) -> list[np.ndarray]:
        """Zero extra load per copied head, the ``pending`` argument of :meth:`choose`."""
        return [np.zeros(len(c[2])) for c in self._copied]

    def admit(self, rid: str, weight: float, chosen: np.ndarray | None = None) -> np.ndarray:
        """Assign ``rid`` (weight > 0, e.g. prompt tokens); returns the chosen replica per copied head.

        ``chosen``: a choice made earlier by :meth:`choose` (admission control previews a request's
        replicas to charge each rank exactly); default: choose now. Admitting a live ``rid`` again
        returns its existing choice (sticky).
        """
        if rid in self._owner:
            return self._owner[rid]
        if chosen is None:
            chosen = self.choose(weight)
        elif not weight > 0:
            raise ValueError(f"request weight must be > 0, got {weight}")
        chosen = np.asarray(chosen, dtype=np.int64)
        if chosen.shape != (len(self._copied),):
            raise ValueError(f"choice for {len(self._copied)} copied heads expected, got {chosen.shape}")
        for i, j in enumerate(chosen):
            self._load[i][j] += weight
            self._served[i][j] += weight
        self._owner[rid] = chosen
        self._weight[rid] = float(weight)
        return chosen

    def weight_of(self, rid: str) -> float:
        """The weight ``rid`` was admitted with (1.0 for an unknown id)."""
        return self._weight.get(rid, 1.0)

    def release(self, rid: str) -> None:
        """Forget ``rid`` (finish, abort, retract); unknown ids are ignored."""
        chosen = self._owner.pop(rid, None)
        if chosen is None:
            return
        w = self._weight.pop(rid)
        for i, j in enumerate(chosen):
            self._load[i][j] -= w

    def owner(self, rid: str, layer: int, kv_head: int) -> int:
        """The rank serving ``rid``'s (layer, KV head)."""
        reps = self.plan.layers[layer][kv_head]
        if len(reps) == 1:
            return reps[0][0]
        for i, (l, h, ranks, _) in enumerate(self._copied):
            if (l, h) == (layer, kv_head):
                return int(ranks[self._owner[rid][i]])
        raise AssertionError("unreachable: copied head not indexed")

    def owners(self, rid: str) -> np.ndarray:
        """int64 ``[layers, kv_heads]``: the rank serving each (layer, KV head) of ``rid`` (admitted)."""
        return self.owners_for(self._owner[rid])

    def owners_for(self, chosen: np.ndarray) -> np.ndarray:
        """int64 ``[layers, kv_heads]``: the rank of each segment under a choice of :meth:`choose`."""
        own = self._base_owner.copy()
        for i, (l, h, ranks, _) in enumerate(self._copied):
            own[l, h] = ranks[chosen[i]]
        return own

    def owned_mask(self, rid: str, rank: int) -> np.ndarray:
        """bool ``[layers, kv_heads]``: the (layer, head) segments ``rank`` must hold for ``rid``."""
        mask = np.zeros((self.plan.num_layers, self.plan.num_kv_heads), dtype=bool)
        for l, layer in enumerate(self.plan.layers):
            for h, reps in enumerate(layer):
                if len(reps) == 1:
                    mask[l, h] = reps[0][0] == rank
        if rid in self._owner:
            for i, (l, h, ranks, _) in enumerate(self._copied):
                mask[l, h] = ranks[self._owner[rid][i]] == rank
        return mask

    def replica_loads(self) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """Per copied head: ``(layer, kv_head, planned shares, live load per replica)``."""
        return [(l, h, shares, self._load[i].copy()) for i, (l, h, _, shares) in enumerate(self._copied)]

    def served(self) -> list[dict]:
        """Per copied head: ranks, planned shares, and the share of all weight admitted so far that
        each replica served (cumulative, departures do not subtract)."""
        out = []
        for i, (l, h, ranks, shares) in enumerate(self._copied):
            tot = self._served[i].sum()
            out.append({"layer": l, "kv_head": h, "ranks": ranks.tolist(), "planned": shares.tolist(),
                        "served": (self._served[i] / tot).tolist() if tot > 0 else [0.0] * len(ranks),
                        "live_load": self._load[i].tolist()})
        return out
