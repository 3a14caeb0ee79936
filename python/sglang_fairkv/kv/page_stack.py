"""The host free stack of :class:`~sglang_fairkv.kv.ragged_pool.RaggedKVPool` and its deferred free.

Page ids live on a host stack (int32, popped from the top). Pages released while a launched step may
still read them (overlap scheduling) wait in a *limbo* until that step is over: on CUDA an event recorded
on the forward stream at their release, queried (no wait) at the next step's launch; on a CPU at once.
"""

from __future__ import annotations

import numpy as np
import torch


class RaggedPoolFull(RuntimeError):
    """Raised when an allocation finds no free page (admission should have prevented it)."""


class PageStackMixin:
    """Free stack and limbo of the pool (its attributes: ``_free``, ``_n_free``, ``_limbo``,
    ``_limbo_pages``, ``step``, ``peak_used``, ``device``, ``_step_stream``)."""

    def begin_step(self) -> None:
        """A forward step is being launched (the backend's metadata, once per step). Pages freed during
        an earlier step come back to the free stack once that step has finished: on CUDA when the event
        recorded at their release has completed (queried, no wait), on a CPU at once (its forward ran
        synchronously).

        Called from the backend's metadata, i.e. on the stream the step's kernels are queued on (SGLang's
        overlap scheduler runs the forward on its own stream and releases requests from the scheduler's
        stream): that stream is remembered, and release events are recorded on it."""
        self.step += 1
        if self.device.type == "cuda":
            self._step_stream = torch.cuda.current_stream(self.device)
        self._reclaim(before_step=self.step, wait=False)

    def _reclaim(self, before_step: int, wait: bool) -> None:
        """Return limbo pages released during steps before ``before_step`` once those are over
        (``wait``: block on their events -- only when a pop would otherwise fail)."""
        keep = []
        for step, pages, ev in self._limbo:
            if step >= before_step:  # released during a step not yet launched: not before it launches
                keep.append((step, pages, ev))
                continue
            if ev is not None and not ev.query():
                if not wait:
                    keep.append((step, pages, ev))
                    continue
                ev.synchronize()
            self._push(pages)
            self._limbo_pages -= int(pages.size)
        self._limbo = keep

    def limbo_pages(self) -> int:
        """Pages freed but not yet reusable (a launched step may still read them)."""
        return self._limbo_pages

    def _pop(self, n: int) -> np.ndarray:
        if n > self._n_free and self._limbo_pages:  # released pages of a step that must end first
            # the caller's step is launched after everything queued so far, this step's releases included
            self._reclaim(before_step=self.step + 1, wait=True)
        if n > self._n_free:
            raise RaggedPoolFull(f"ragged KV pool: need {n} pages, {self._n_free} free")
        out = self._free[self._n_free - n:self._n_free][::-1].copy()
        self._n_free -= n
        self.peak_used = max(self.peak_used, self.used_pages())
        return out

    def _release(self, pages: np.ndarray) -> None:
        """Pages of a released request (finish / abort, from the scheduler, maybe while a launched step
        still reads them): reusable at once before any step was launched, else through the limbo
        (:meth:`begin_step`). Compaction's tail pages go back at once (:meth:`_push`): only the same
        step's later, stream-ordered work can take them."""
        pages = np.asarray(pages, dtype=np.int32).reshape(-1)
        if not pages.size:
            return
        if self.step == 0:
            self._push(pages)
            return
        ev = None
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            # on the forward stream, not the caller's (the scheduler's): the event completes after every
            # kernel queued there so far, i.e. after the launched steps that may read these pages
            ev.record(self._step_stream)
        self._limbo.append((self.step, pages.copy(), ev))
        self._limbo_pages += int(pages.size)

    def _push(self, pages: np.ndarray) -> None:
        k = int(pages.size)
        if k:
            self._free[self._n_free:self._n_free + k] = pages.reshape(-1)
            self._n_free += k

