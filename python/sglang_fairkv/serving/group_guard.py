"""A TP group that lost a member stops at once with a message that says so (thin adapter, every scheduler).

Under multi-node tensor parallelism (``--nnodes 2 --node-rank k --dist-init-addr``) the ranks of one TP
group live in processes on different machines. When one of them dies, the next collective on the others
fails -- on CPU gloo's "Connection reset by peer" within a scheduler step (the TP scheduler broadcasts
the step's requests every loop iteration, idle or not; measured: node 0 stopped 10 s after node 1 was
killed), on CUDA an NCCL error -- and SGLang stops the server with that low-level traceback. The AROUND
hook on ``Scheduler.run_event_loop`` re-raises such a failure as one line naming what happened and what
to do; SGLang's own handler then logs it and stops the processes of this node (its HTTP server too).

A peer that hangs instead of dying is bounded by the collectives' timeout: the launcher gives
multi-node servers ``--dist-timeout 300`` unless the flag is set (torch's default is 30 minutes).
"""

from __future__ import annotations

T_EVENT_LOOP = "sglang.srt.managers.scheduler.Scheduler.run_event_loop"

#: substrings of the errors gloo / NCCL / torch.distributed raise when a peer is gone or stuck
LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed",
                   "remote process exited", "communicator was aborted", "Timed out", "timed out",
                   "NCCL error", "ProcessGroupGloo", "DistBackendError")

#: the hint of the multi-node default (launcher) and of this message
DIST_TIMEOUT_S = 300


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a collective failing because a TP peer is gone."""
    seen = 0
    while exc is not None and seen < 8:
        text = f"{type(exc).__name__}: {exc}"
        if any(s in text for s in LOST_PEER_SIGNS):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def lost_peer_message(tp_rank: int, tp_size: int, node_rank: int, nnodes: int, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    where = f"node {node_rank} of {nnodes}, " if nnodes > 1 else ""
    return (f"sglang-fairkv: TP rank {tp_rank} of {tp_size} ({where}this process) lost a member of its TP "
            f"group: a collective failed ({first}). Another rank's process died or stopped answering (on "
            f"multi-node TP: the other node's launcher). A TP group cannot continue without every rank: "
            f"this server stops now. Restart the launchers of every node (node 0 first).")


def event_loop_hook(original, self, *args, **kwargs):
    """AROUND ``Scheduler.run_event_loop``: a lost TP peer becomes one clear error."""
    try:
        return original(self, *args, **kwargs)
    except Exception as e:
        sa = getattr(self, "server_args", None)
        tp = int(getattr(sa, "tp_size", 1) or 1)
        if tp > 1 and lost_peer(e):
            raise RuntimeError(lost_peer_message(int(getattr(self, "tp_rank", 0) or 0), tp,
                                                 int(getattr(sa, "node_rank", 0) or 0),
                                                 int(getattr(sa, "nnodes", 1) or 1), e)) from e
        raise
