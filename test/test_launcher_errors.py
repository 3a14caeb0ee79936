"""Bad input to the launcher: one clear line, exit code 2, no process left behind."""

from __future__ import annotations

import socket

import pytest

from helpers.server import free_port, run_launcher

pytestmark = pytest.mark.server


def _assert_clean_failure(rc, out, alive, needle):
    assert rc == 2, out[-2000:]
    assert needle in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    assert not alive, "launcher left processes running"


def test_unknown_flag():
    rc, out, alive = run_launcher(["--no-such-flag", "3"])
    _assert_clean_failure(rc, out, alive, "unrecognized arguments: --no-such-flag 3")


def test_missing_model_path(tmp_path):
    missing = tmp_path / "not-a-model"
    rc, out, alive = run_launcher(["--model-path", str(missing)])
    _assert_clean_failure(rc, out, alive, f"--model-path {missing}: no such model folder")


def test_port_in_use(smollm2_path):
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        rc, out, alive = run_launcher(["--model-path", str(smollm2_path), "--port", str(port)])
    _assert_clean_failure(rc, out, alive, f"port {port} on 127.0.0.1 is already in use")
