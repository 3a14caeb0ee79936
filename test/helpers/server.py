"""Start and stop real ``python -m sglang_fairkv.launch_server`` processes for end-to-end tests.

Every server runs in its own process group (``start_new_session``), so stopping it kills the
launcher and every process SGLang spawned, also when a test fails (the fixtures stop in ``finally``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
#: SGLang's strict idle memory check: a server whose KV pool is not empty when idle stops.
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment for a server, without the test-only Triton interpreter and
    without a core binding (each launcher derives its own from the cores it may use)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SGLANG_CPU_OMP_THREADS_BIND")}
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """True while any process of process group ``pgid`` exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Server:
    """One launch_server process group; use as a context manager."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 startup_timeout: float = 240.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*args, "--port", str(self.port)]
        self.env = server_env(env)
        self.startup_timeout = startup_timeout
        self.log = tempfile.NamedTemporaryFile(prefix="fairkv-server-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        cmd = [sys.executable, "-m", "sglang_fairkv.launch_server", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=REPO, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole process group at once; assert nothing survives.

        A test server holds nothing worth a graceful shutdown (each test checks the state it cares
        about, pools included, before it stops the server). SIGTERM costs 6-30 s per stop: SGLang
        either drains, or, when its schedulers get the signal too, treats their exit as a crash and
        sleeps 5 s before its crash diagnostics."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=timeout)
        deadline = time.time() + timeout
        while time.time() < deadline and group_alive(pgid):
            time.sleep(0.05)
        assert not group_alive(pgid), f"processes of server group {pgid} survived SIGKILL"
        self.proc = None

    def __enter__(self) -> "Server":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP helpers -------------------------------------------------------------------------
    def fairkv_info(self, timeout: float = 30.0) -> dict:
        """The fairkv pool / TP-group stats: ``/server_info`` -> ``internal_states[0]["fairkv"]``."""
        info = requests.get(self.url + "/server_info", timeout=timeout).json()
        return info["internal_states"][0]["fairkv"]

    def generate(self, payload: dict, timeout: float = 300.0) -> dict:
        r = requests.post(self.url + "/generate", json=payload, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def greedy_ids(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        out = self.generate({
            "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                "ignore_eos": True},
        })
        return out["output_ids"]


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
