"""Real ``python -m sglang_fairkv.launch_server`` processes for end-to-end tests.

Starting, the health wait and stopping are the package's :class:`~sglang_fairkv.server_process.ServerProcess`
(the profiler, the benchmarks and the device check use it too); this adds the test environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from sglang_fairkv.server_process import ServerProcess, free_port, group_alive  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[2]
#: SGLang's strict idle memory check: a server whose KV pool is not empty when idle stops.
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment for a server, without the test-only Triton interpreter, without
    a core binding (each launcher derives its own from the cores it may use) and without fairkv
    settings a test may have left in this process."""
    drop = ("TRITON_INTERPRET", "SGLANG_CPU_OMP_THREADS_BIND", "FAIRKV_KV_COMPRESS", "FAIRKV_PLAN", "FAIRKV_KV_DTYPE",
            "SGLANG_EXTERNAL_MODEL_PACKAGE")  # the launcher sets the fairkv ones from its own flags
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra or {})
    return env


class Server(ServerProcess):
    """A test server: the launcher in this checkout, the test environment (:func:`server_env`),
    SIGKILL on stop; HTTP helpers raise on an error status."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 startup_timeout: float = 240.0):
        super().__init__(args, env=server_env(env), port=port, cwd=REPO, startup_timeout=startup_timeout)

    def fairkv_info(self, timeout: float = 30.0) -> dict:
        """The fairkv pool / TP-group stats: ``/server_info`` -> ``internal_states[0]["fairkv"]``."""
        info = requests.get(self.url + "/server_info", timeout=timeout).json()
        return info["internal_states"][0]["fairkv"]



def generate_in_background(server, prompts: list[list[int]], max_new_tokens: int, timeout: float = 600.0):
    """Greedy ``ignore_eos`` requests of ``prompts``, each from its own started thread; returns (the list
    their ``/generate`` answers land in, the threads to join)."""
    import threading

    out: list = [None] * len(prompts)

    def send(i):
        out[i] = requests.post(server.url + "/generate", json={"input_ids": prompts[i], "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}}, timeout=timeout).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return out, threads


def fairkv_states(server) -> list[dict]:
    """``/server_info``'s fairkv stats of every scheduler that reports (one per DP replica)."""
    info = requests.get(server.url + "/server_info", timeout=30).json()
    return [s["fairkv"] for s in info["internal_states"]]


def wait_ranks_empty(server, timeout: float = 60.0) -> list[dict]:
    """Poll until every rank's pages are back in every replica (the ledgers' view), return the last
    fairkv stats of each replica."""
    deadline = time.time() + timeout
    states = fairkv_states(server)
    while time.time() < deadline and any(r["pages_used"] for st in states for r in st["ranks"]):
        time.sleep(0.25)
        states = fairkv_states(server)
    return states


def run_launcher(args: list[str], timeout: float = 180.0, env: dict | None = None):
    """Run the launcher to completion (for bad-input tests); returns (rc, output, pgid_alive)."""
    proc = subprocess.Popen([sys.executable, "-m", "sglang_fairkv.launch_server", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=server_env(env), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.time() + 5.0  # children the launcher started exit with it
    while time.time() < deadline and group_alive(proc.pid):
        time.sleep(0.05)
    return proc.returncode, out, group_alive(proc.pid)
