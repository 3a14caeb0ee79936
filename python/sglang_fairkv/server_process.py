"""Start a server, wait until it is healthy, stop it: the one helper the profiler, the benchmarks, the
device check and the tests share.

The server runs in its own process group (``start_new_session``), so stopping it stops the launcher
and every process SGLang started, also when the caller fails (the context manager stops in
``__exit__``). HTTP goes through the standard library only, so the device check can use this on a
machine with nothing but torch installed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

#: ``python -m`` modules that serve: this project's launcher, or stock SGLang for comparisons
LAUNCHER = "sglang_fairkv.launch_server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
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


class ServerProcess:
    """One ``python -m <module> <args> --host H --port P`` process group (``H`` 127.0.0.1 by default).

    ``env``: the server's whole environment (default: this process's). ``log``: where its output goes
    (default: a new temporary file, kept). ``graceful_s``: on stop, SIGTERM and wait this long before
    SIGKILL (0: SIGKILL at once -- a test server holds nothing worth a graceful shutdown, and SGLang's
    SIGTERM path costs 6-30 s).
    """

    #: a port chosen here (not given) that another process took before the server bound it is replaced
    #: by a fresh one this many times (the choice and the bind are 10-30 s apart on a busy machine)
    PORT_RETRIES = 3

    def __init__(self, args: list[str], *, module: str = LAUNCHER, env: dict[str, str] | None = None,
                 port: int | None = None, log: Path | str | None = None, cwd: Path | str | None = None,
                 startup_timeout: float = 240.0, graceful_s: float = 0.0, host: str = "127.0.0.1"):
        self._args, self._module, self._host = list(args), module, host
        self._own_port = port is None
        self._set_port(port or free_port())
        self.env = dict(os.environ if env is None else env)
        if log is None:
            fd, log = tempfile.mkstemp(prefix="fairkv-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log)
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.graceful_s = graceful_s
        self.proc: subprocess.Popen | None = None
        #: seconds from start to healthy
        self.up_s: float | None = None

    def _set_port(self, port: int) -> None:
        self.port = port
        host = self._host
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        self.cmd = [sys.executable, "-m", self._module, *self._args, "--host", host, "--port", str(port)]

    def _lost_port(self) -> bool:
        """The server logged that its HTTP port was taken (since its last launch)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return False
        return "address already in use" in text and f"{self.port})" in text

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ServerProcess":
        """Start and wait for ``/health``; raises RuntimeError (with the log's tail) when the server exits
        first, TimeoutError when it is not healthy in ``startup_timeout`` seconds (it is stopped then)."""
        return self.launch().wait_healthy()

    def launch(self) -> "ServerProcess":
        """Start the process group without waiting (several servers that start together, or a
        multi-node rank that cannot be healthy before its peers); :meth:`wait_healthy` waits."""
        self._t0 = time.time()
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd, start_new_session=True)
        return self

    def wait_healthy(self) -> "ServerProcess":
        """Wait for ``/health`` of a launched server (``startup_timeout`` counted from its launch). A port this
        object chose that was taken meanwhile (the server logs it and hangs) is replaced and the server
        relaunched (:attr:`PORT_RETRIES` times)."""
        t0 = self._t0
        retries = self.PORT_RETRIES
        while time.time() - t0 < self.startup_timeout:
            if self._own_port and retries and self._lost_port():
                retries -= 1
                self.stop()
                self._set_port(free_port())
                self.launch()
                continue
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was healthy:\n"
                                   f"{self.log_tail()}")
            if self.healthy():
                self.up_s = time.time() - t0
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the whole process group (see ``graceful_s``); raises if a process of it survives."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.graceful_s > 0 and self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(timeout=self.graceful_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=timeout)
        deadline = time.time() + timeout
        while time.time() < deadline and group_alive(pgid):
            time.sleep(0.05)
        if group_alive(pgid):
            raise RuntimeError(f"processes of server group {pgid} survived SIGKILL")
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ---- HTTP --------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: dict, timeout: float = 300.0):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def fairkv_info(self, timeout: float = 30.0) -> dict | None:
        """The fairkv pool / TP-group stats (``/server_info`` -> ``internal_states[0]["fairkv"]``), None
        on a server without the fairkv backend."""
        info = self.get_json("/server_info", timeout=timeout)
        return (info.get("internal_states") or [{}])[0].get("fairkv")

    def generate(self, payload: dict, timeout: float = 300.0) -> dict:
        """``POST /generate`` (raises ``urllib.error.HTTPError`` on an error status)."""
        return self.post_json("/generate", payload, timeout=timeout)

    def greedy(self, input_ids: list[int], max_new_tokens: int, timeout: float = 300.0) -> dict:
        """``/generate``'s whole answer for one greedy prompt, all ``max_new_tokens`` (``ignore_eos``)."""
        return self.generate({
            "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
        }, timeout=timeout)

    def greedy_ids(self, input_ids: list[int], max_new_tokens: int, timeout: float = 300.0) -> list[int]:
        """Greedy output ids of one prompt, all ``max_new_tokens`` of them (``ignore_eos``)."""
        return self.greedy(input_ids, max_new_tokens, timeout)["output_ids"]
