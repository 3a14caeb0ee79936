"""N compressed servers behind sglang-router: start them, start the router, stop them all together.

Each replica is a whole ``python -m sglang_fairkv.launch_server`` (its own TP group, ragged pool,
ledger and plan) on its own port; ``sglang_router.launch_router`` (sglang-router 0.3.2) spreads
requests over them. On a CPU machine each replica's ranks get their own cores
(``SGLANG_CPU_OMP_THREADS_BIND``). A replica or the router that exits stops the group.

Routing policy: ``cache_aware`` (the router's own default) -- compressed servers keep a prefix cache
(the dense prefix tier, :mod:`sglang_fairkv.serving.prefix_cache`), so requests that share a document
or continue a chat are best sent where their prefix is cached. With prefix caching off
(``--fairkv-prefix-tier 0`` / ``--disable-radix-cache``) it only concentrates load: use ``round_robin``
for traffic of similar lengths and ``power_of_two`` (the less loaded of two random replicas, by the
router's load probe) when lengths vary.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..server_process import ServerProcess
from .fairkv_flags import value as flag_value

ROUTER_MODULE = "sglang_router.launch_router"
DEFAULT_POLICY = "cache_aware"
POLICIES = ("round_robin", "power_of_two", "random", "cache_aware")


def replica_cpu_binds(replicas: int, tp: int, cores: list[int] | None = None) -> list[str]:
    """``SGLANG_CPU_OMP_THREADS_BIND`` per replica: the machine's cores split over ``replicas x tp``
    ranks, replica ``i`` taking groups ``i * tp .. (i + 1) * tp - 1``."""
    from .machine import cpu_omp_bind

    groups = cpu_omp_bind(replicas * tp, cores).split("|")
    return ["|".join(groups[i * tp:(i + 1) * tp]) for i in range(replicas)]


class RouterGroup:
    """``replicas`` fairkv servers (``server_args`` each) and the router in front of them on ``port``."""

    def __init__(self, server_args: list[str], *, replicas: int = 2, port: int | None = None,
                 host: str = "127.0.0.1", policy: str = DEFAULT_POLICY, log_dir: Path | str | None = None,
                 env: dict[str, str] | None = None, on_cpu: bool | None = None, startup_timeout: float = 300.0):
        if replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {replicas}")
        if policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {policy}")
        for f in ("--port", "--host"):
            if flag_value(server_args, f) is not None:
                raise ValueError(f"{f} is the group's to choose (replicas get their own ports)")
        if on_cpu is None:
            from .machine import has_cuda

            on_cpu = not has_cuda()
        base = dict(os.environ if env is None else env)
        tp = int(flag_value(server_args, "--tp-size") or flag_value(server_args, "--tp") or 1)
        binds = replica_cpu_binds(replicas, tp) if on_cpu and "SGLANG_CPU_OMP_THREADS_BIND" not in base else None
        log_dir = Path(log_dir) if log_dir is not None else None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        self.servers = []
        for i in range(replicas):
            e = dict(base)
            if binds is not None:
                e["SGLANG_CPU_OMP_THREADS_BIND"] = binds[i]
            self.servers.append(ServerProcess(list(server_args), env=e, startup_timeout=startup_timeout,
                                              log=None if log_dir is None else log_dir / f"replica{i}.log"))
        from ..server_process import free_port

        #: the router's own Prometheus port (its default, 29000, would collide between groups)
        self.metrics_port = free_port()
        self.router_args = ["--worker-urls", *[s.url for s in self.servers], "--policy", policy,
                            "--prometheus-port", str(self.metrics_port), "--prometheus-host", "127.0.0.1"]
        self.router = ServerProcess(self.router_args, module=ROUTER_MODULE, env=base, port=port, host=host,
                                    startup_timeout=120.0,
                                    log=None if log_dir is None else log_dir / "router.log")
        self.policy = policy

    @property
    def url(self) -> str:
        return self.router.url

    def start(self) -> "RouterGroup":
        """Start every replica (all at once), wait until each is healthy, then the router."""
        try:
            for s in self.servers:  # launch all, then wait: start-ups overlap
                s.launch()
            for s in self.servers:
                s.wait_healthy()
            self.router.start()
            self._wait_workers_registered()
            return self
        except BaseException:
            self.stop()
            raise

    def _wait_workers_registered(self, timeout: float = 120.0) -> None:
        """The router registers its workers in the background after its ``/health`` answers: wait until
        ``/workers`` lists every replica and ``/readiness`` says ready."""
        import urllib.error

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                listed = self.router.get_json("/workers", timeout=5).get("total", 0)
                ready = self.router.get_json("/readiness", timeout=5)
                if listed >= len(self.servers) and ready.get("status") == "ready":
                    return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if self.router.proc is not None and self.router.proc.poll() is not None:
                raise RuntimeError(f"the router exited with {self.router.proc.returncode}:\n{self.router.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"the router did not register its {len(self.servers)} replicas in {timeout:.0f} s:\n"
                           f"{self.router.log_tail()}")

    def stop(self) -> None:
        self.router.stop()
        for s in self.servers:
            s.stop()

    def wait(self, poll_s: float = 1.0) -> str:
        """Block until a replica or the router exits; returns which (the caller stops the rest)."""
        while True:
            if self.router.proc is not None and self.router.proc.poll() is not None:
                return f"the router exited with {self.router.proc.returncode}"
            for i, s in enumerate(self.servers):
                if s.proc is not None and s.proc.poll() is not None:
                    return f"replica {i} exited with {s.proc.returncode} (log {s.log_path})"
            time.sleep(poll_s)

    def __enter__(self) -> "RouterGroup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
