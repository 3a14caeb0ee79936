"""Host-to-device uploads of :class:`~sglang_fairkv.kv.ragged_pool.RaggedKVPool`: one packed int64 copy
per call, through a ring of pinned staging buffers on CUDA (asynchronous; the host waits only when a whole
ring ahead of the device)."""

from __future__ import annotations

import numpy as np
import torch


class StagingMixin:
    """``upload`` / ``_upload`` of the pool (its attributes: ``device``, ``_staging``, ``_staging_events``,
    ``_flip``, ``staging_waits``, ``uploads``)."""

    #: pinned staging buffers in the upload ring: a buffer is refilled only once the copy that last read
    #: it has finished, so the host waits only when it runs this many uploads ahead of the device
    STAGING_RING = 8

    def upload(self, host: np.ndarray) -> torch.Tensor:
        """int64 host data on the pool's device in one asynchronous copy (pinned staging on CUDA), for
        callers with small per-layer metadata (head ids, kept counts); see :meth:`_upload`."""
        return self._upload(np.asarray(host, dtype=np.int64).reshape(-1))

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy. On CUDA through a ring of ``STAGING_RING`` pinned staging buffers: a
        buffer is reused only after the copy that last read it has finished (queried; the host waits
        only if that copy is still pending, i.e. when it is a whole ring of uploads ahead of the device:
        back-pressure that leaves the device's queue full, not a stall of the device). A compressed
        prompt's last chunk uploads twice per layer (its pages, then the compaction's rows), so the host
        may run four layers ahead before it waits."""
        self.uploads += 1
        src = torch.from_numpy(host)
        if self.device.type != "cuda":
            return src.to(self.device)
        slot, self._flip = self._flip, (self._flip + 1) % self.STAGING_RING
        buf, ev = self._staging[slot], self._staging_events[slot]
        if ev is not None and not ev.query():
            self.staging_waits += 1
            ev.synchronize()
        if buf is None or buf.numel() < src.numel():
            buf = self._staging[slot] = torch.empty(max(src.numel(), 1 << 16), dtype=torch.int64,
                                                    pin_memory=True)
        buf[:src.numel()].copy_(src)
        out = buf[:src.numel()].to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._staging_events[slot] = ev
        return out

