"""Plan A -> plan B for a running TP group: who holds each live segment under B, what moves, whether
it fits, and in what rounds it can move (pure; the *prepare* of a live re-plan, issue 34).

Every rank computes the same transition from the same inputs (the group ledger: identical on every
rank), so no rank decides alone. Nothing here touches a pool or a model.

* **Relabel** (:func:`relabel_to_overlap`). A plan's rank labels inside one layer are free (a layer's
  attention ends in an all-reduce over the group), so each layer of B is permuted to keep as much of
  A's live KV where it is: a maximum-weight matching of B's ranks to A's on a ``tp x tp`` overlap
  matrix (live rows of a head, plus one so a head without live KV still weighs its weight slices).
* **Owners** (:func:`assign_owners`). A live segment keeps its A owner when that rank holds a replica
  of the head under B; otherwise it goes where B's deficit rule (:class:`~.replicas.ReplicaAssigner`,
  requests in admission order) sends it. A head with one replica under B has one owner.
* **Fit**. Under B every rank must hold its segments with the decode rows they are still owed, in its
  usable pages (the admission promise made under A stays kept); and B may not give a rank more heads
  in a layer than its pool's head slots.
* **Rounds** (:func:`schedule_rounds`). A move's pages are taken on its destination before its source
  frees them (the copy needs both), so moves go in rounds: a round takes moves in a fixed order while
  every destination keeps room; the sources free theirs when the round ends. Pages never go below zero
  on any rank; a transition whose moves cannot start (every destination full until a source frees) is
  refused with that reason (drain instead).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from .replicas import ReplicaAssigner
from .schema import Plan, PlanError


@dataclass(frozen=True)
class LiveSegments:
    """The running requests as the group ledger sees them (identical on every rank).

    ``rids`` in admission order; ``weights`` float64 ``[R]`` (the assigner's request weight: prompt
    tokens); ``owner`` int64 ``[R, L, KV]`` the rank serving each segment now (under A); ``rows`` int64
    ``[R, L, KV]`` rows in each segment; ``owed`` int64 ``[R]`` decode rows each segment may still grow
    by (``max_new_tokens`` less the generated ones)."""

    rids: list[str]
    weights: np.ndarray
    owner: np.ndarray
    rows: np.ndarray
    owed: np.ndarray

    @staticmethod
    def empty(num_layers: int, num_kv_heads: int) -> "LiveSegments":
        z = np.zeros((0, num_layers, num_kv_heads), dtype=np.int64)
        return LiveSegments([], np.zeros(0), z, z.copy(), np.zeros(0, dtype=np.int64))


@dataclass(frozen=True)
class Move:
    """Segment ``(request index, layer, head)`` from rank ``src`` to ``dst``: ``rows`` rows in ``pages``."""

    req: int
    layer: int
    head: int
    src: int
    dst: int
    rows: int
    pages: int


@dataclass(frozen=True)
class Transition:
    """What switching to ``plan`` (B relabeled) means for the live segments; see the module text."""

    plan: Plan
    relabel: list[list[int]]  # per layer: B's rank label -> the label it has in ``plan``
    owner: np.ndarray  # int64 [R, L, KV] under ``plan``
    moves: list[Move]
    rounds: list[list[int]]  # indices into ``moves``
    pages_now: np.ndarray  # int64 [tp]: pages of the live segments per rank (under A)
    pages_after: np.ndarray  # int64 [tp]: the same under ``plan``
    pages_promised: np.ndarray  # int64 [tp]: under ``plan`` with the decode rows still owed
    usable: np.ndarray  # int64 [tp]
    fits: bool
    why: str | None = None
    #: B needs no more head slots per layer than each rank's pool has (else it cannot run here at all)
    slots_fit: bool = True
    #: head instances whose weight slices a rank gains under ``plan``: (layer, head, rank)
    heads_gained: list[tuple[int, int, int]] = field(default_factory=list)
    #: rows in the live segments (moved or not)
    rows_live: int = 0

    @property
    def rows_moved(self) -> int:
        return int(sum(m.rows for m in self.moves))

    def summary(self, row_bytes: int) -> dict:
        """JSON-ready: what moves (segments, rows, bytes), pages per rank before / after, the rounds."""
        return {"fits": self.fits, "why": self.why, "plan_hash": plan_hash(self.plan),
                "segments_moved": len(self.moves), "rows_moved": self.rows_moved, "rows_live": self.rows_live,
                "kv_bytes_moved": self.rows_moved * int(row_bytes), "rounds": len(self.rounds),
                "head_instances_gained": len(self.heads_gained),
                "pages_now": self.pages_now.tolist(), "pages_after": self.pages_after.tolist(),
                "pages_promised": self.pages_promised.tolist(), "usable_pages": self.usable.tolist(),
                "relabel": self.relabel}


def plan_hash(plan: Plan) -> str:
    """sha256 of the placement (layers, replicas, shares) and shape: equal plans hash equal on every rank
    whatever their metadata (predicted figures, source stats)."""
    core = {"tp": plan.tp, "num_kv_heads": plan.num_kv_heads, "layers": [
        [[[int(r), round(float(s), 9)] for r, s in reps] for reps in layer] for layer in plan.layers]}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def _relabeled(plan: Plan, perm: list[list[int]]) -> Plan:
    layers = [[[(perm[l][r], s) for r, s in reps] for reps in layer] for l, layer in enumerate(plan.layers)]
    return Plan(model=plan.model, tp=plan.tp, num_kv_heads=plan.num_kv_heads, strategy=plan.strategy,
                cost_model=plan.cost_model, layers=layers, num_q_heads=plan.num_q_heads,
                predicted=plan.predicted, source=plan.source)


def relabel_to_overlap(a: Plan, b: Plan, load: np.ndarray) -> tuple[Plan, list[list[int]]]:
    """B with each layer's rank labels permuted to overlap A the most, weighted by ``load`` float
    ``[L, KV]`` (live rows per head); returns (relabeled B, per layer B label -> new label)."""
    from scipy.optimize import linear_sum_assignment

    tp = b.tp
    perms = []
    for l in range(b.num_layers):
        m = np.zeros((tp, tp))  # [B label, A rank]
        for h in range(b.num_kv_heads):
            in_a = {r for r, _ in a.layers[l][h]}
            for rb, _ in b.layers[l][h]:
                for ra in in_a:
                    m[rb, ra] += float(load[l, h]) + 1.0
        rows, cols = linear_sum_assignment(m, maximize=True)
        perm = [0] * tp
        for rb, ra in zip(rows.tolist(), cols.tolist()):
            perm[rb] = ra
        # ties resolved the same way on every rank (scipy is deterministic); identity when it is as good
        if m[np.arange(tp), np.arange(tp)].sum() >= m[rows, cols].sum():
            perm = list(range(tp))
        perms.append(perm)
    return _relabeled(b, perms), perms


def assign_owners(b: Plan, live: LiveSegments) -> np.ndarray:
    """int64 ``[R, L, KV]``: each live segment's owner under ``b`` (kept where A's owner holds a replica,
    else B's deficit rule, requests in admission order)."""
    asg = ReplicaAssigner(b)
    out = live.owner.copy()
    for i, rid in enumerate(live.rids):
        weight = float(max(live.weights[i], 1e-9))
        kept = asg.choice_for(live.owner[i])  # A's owner where it holds a replica under B
        chosen = np.where(kept >= 0, kept, asg.choose(weight))
        asg.admit(rid, weight, chosen)
        out[i] = asg.owners_for(chosen)
    return out


def _pages(rows: np.ndarray, page_size: int) -> np.ndarray:
    return -(-rows // page_size)


def rank_pages(owner: np.ndarray, rows: np.ndarray, tp: int, page_size: int) -> np.ndarray:
    """int64 ``[tp]``: pages the segments ``rows`` take on their owners."""
    out = np.zeros(tp, dtype=np.int64)
    np.add.at(out, owner.reshape(-1), _pages(rows, page_size).reshape(-1))
    return out


def request_pages(owner: np.ndarray, rows: np.ndarray, tp: int, page_size: int) -> np.ndarray:
    """int64 ``[R, tp]``: pages each request's segments (``owner`` / ``rows`` int ``[R, L, KV]``) take on
    each rank."""
    R = owner.shape[0]
    slot = np.arange(R)[:, None, None] * tp + owner
    return np.bincount(slot.reshape(-1), weights=_pages(rows, page_size).reshape(-1),
                       minlength=R * tp).astype(np.int64).reshape(R, tp)


def schedule_rounds(moves: list[Move], free: np.ndarray) -> tuple[list[list[int]], str | None]:
    """Rounds of ``moves`` such that no rank's free pages go below 0: a move takes its pages on ``dst``
    when its round starts and gives them back on ``src`` when the round ends. Returns (rounds, None), or
    (the rounds that could run, why the rest cannot start)."""
    free = np.asarray(free, dtype=np.int64).copy()
    if (free < 0).any():
        return [], f"ranks {np.nonzero(free < 0)[0].tolist()} are over their pages already"
    pending = list(range(len(moves)))
    rounds: list[list[int]] = []
    while pending:
        taken, rest = [], []
        room = free.copy()
        for i in pending:
            m = moves[i]
            if m.pages <= room[m.dst]:
                room[m.dst] -= m.pages
                taken.append(i)
            else:
                rest.append(i)
        if not taken:
            short = sorted({moves[i].dst for i in rest})
            return rounds, (f"{len(rest)} segment moves cannot start: ranks {short} have no free pages until "
                            "a segment they send is gone (drain instead)")
        for i in taken:
            free[moves[i].dst] -= moves[i].pages
            free[moves[i].src] += moves[i].pages
        rounds.append(taken)
        pending = rest
    return rounds, None


def plan_transition(a: Plan, b: Plan, live: LiveSegments, *, usable: np.ndarray, page_size: int,
                    pool_heads: np.ndarray | None = None, relabel: bool = True) -> Transition:
    """The transition from ``a`` to ``b`` for ``live``; ``usable`` int64 ``[tp]`` each rank's pages for
    segments, ``pool_heads`` int ``[tp]`` the head slots of each rank's pool (a layer of B may not put
    more heads on a rank). Raises :class:`PlanError` when B is for another shape or TP size."""
    b.check_model(a.num_layers, a.num_kv_heads, a.tp, a.num_q_heads)
    tp, L, KV = a.tp, a.num_layers, a.num_kv_heads
    load = live.rows.sum(axis=0).astype(np.float64) if len(live.rids) else np.zeros((L, KV))
    perms = [list(range(tp)) for _ in range(L)]
    plan = b
    if relabel:
        plan, perms = relabel_to_overlap(a, b, load)
    usable = np.asarray(usable, dtype=np.int64)
    why = None
    slots_fit = True
    if pool_heads is not None:
        heads = np.array([[len(plan.heads_on_rank(l, r)) for l in range(L)] for r in range(tp)])
        over = [r for r in range(tp) if heads[r].max() > int(pool_heads[r])]
        if over and relabel:  # the relabeling may be what overflows: B as given, if that fits the slots
            plain = np.array([[len(b.heads_on_rank(l, r)) for l in range(L)] for r in range(tp)])
            if all(plain[r].max() <= int(pool_heads[r]) for r in range(tp)):
                plan, perms, over = b, [list(range(tp)) for _ in range(L)], []
        if over:
            slots_fit = False
            why = (f"plan B puts up to {[int(heads[r].max()) for r in over]} KV heads of a layer on ranks {over}, "
                   f"whose pools have {[int(pool_heads[r]) for r in over]} head slots")
    owner = assign_owners(plan, live)
    moves = []
    if len(live.rids):
        diff = np.argwhere(owner != live.owner)
        for i, l, h in diff.tolist():
            n = int(live.rows[i, l, h])
            if n:
                moves.append(Move(i, l, h, int(live.owner[i, l, h]), int(owner[i, l, h]), n,
                                  int(_pages(np.int64(n), page_size))))
    pages_now = rank_pages(live.owner, live.rows, tp, page_size)
    pages_after = rank_pages(owner, live.rows, tp, page_size)
    promised = rank_pages(owner, live.rows + live.owed[:, None, None], tp, page_size) if len(live.rids) \
        else np.zeros(tp, dtype=np.int64)
    rounds: list[list[int]] = []
    if why is None and (promised > usable).any():
        bad = np.nonzero(promised > usable)[0].tolist()
        why = (f"under plan B ranks {bad} would need {promised[bad].tolist()} pages for the running requests "
               f"and their remaining decode, of {usable[bad].tolist()}")
    if why is None:
        rounds, why = schedule_rounds(moves, usable - pages_now)
    gained = [(l, h, r) for l in range(L) for h in range(KV)
              for r in sorted({r for r, _ in plan.layers[l][h]} - {r for r, _ in a.layers[l][h]})]
    return Transition(plan=plan, relabel=perms, owner=owner, moves=moves, rounds=rounds, pages_now=pages_now,
                      pages_after=pages_after, pages_promised=promised, usable=usable, fits=why is None,
                      why=why, heads_gained=gained, slots_fit=slots_fit, rows_live=int(live.rows.sum()))


__all__ = ["LiveSegments", "Move", "PlanError", "Transition", "assign_owners", "plan_hash", "plan_transition",
           "rank_pages", "relabel_to_overlap", "request_pages", "schedule_rounds"]
