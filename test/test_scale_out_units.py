"""The scale-out pieces that need no server: the lost-peer message, the multi-node defaults, the CPU
core split of DP replicas and router groups, the launcher taking ``--dp-size``."""

from __future__ import annotations

import pytest


def test_a_lost_peer_is_recognised_through_the_exception_chain():
    from sglang_fairkv.serving.group_guard import lost_peer, lost_peer_message

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:22948: Connection reset by "
                        "peer. This is typically caused by a remote worker hanging")
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise ValueError("while broadcasting the step's requests") from e
    except ValueError as wrapped:
        assert lost_peer(wrapped)
    assert not lost_peer(ValueError("prompt too long"))
    msg = lost_peer_message(0, 2, 0, 2, gloo)
    assert msg.startswith("sglang-fairkv: TP rank 0 of 2 (node 0 of 2, this process) lost a member of its TP group")
    assert "Connection reset by peer" in msg and "Restart the launchers of every node" in msg


def test_event_loop_hook_rewrites_only_lost_peers_at_tp_above_one():
    from types import SimpleNamespace

    from sglang_fairkv.serving.group_guard import event_loop_hook

    def boom(exc):
        def f(self):
            raise exc
        return f

    tp2 = SimpleNamespace(server_args=SimpleNamespace(tp_size=2, nnodes=2, node_rank=1), tp_rank=1)
    with pytest.raises(RuntimeError, match="TP rank 1 of 2 \\(node 1 of 2"):
        event_loop_hook(boom(RuntimeError("Connection closed by peer")), tp2)
    with pytest.raises(KeyError):  # anything else passes through unchanged
        event_loop_hook(boom(KeyError("x")), tp2)
    tp1 = SimpleNamespace(server_args=SimpleNamespace(tp_size=1, nnodes=1, node_rank=0), tp_rank=0)
    with pytest.raises(RuntimeError, match="^Connection closed by peer$"):
        event_loop_hook(boom(RuntimeError("Connection closed by peer")), tp1)


def test_multi_node_gets_a_bounded_dist_timeout_unless_given():
    from types import SimpleNamespace

    from sglang_fairkv.serving.launcher import scale_out_setup

    out = ["--nnodes", "2"]
    notes = scale_out_setup(SimpleNamespace(nnodes=2), out)
    assert out[-2:] == ["--dist-timeout", "300"] and "300 s" in notes[0]
    out = ["--nnodes", "2", "--dist-timeout", "30"]
    assert scale_out_setup(SimpleNamespace(nnodes=2), out) == () and out.count("--dist-timeout") == 1
    out = []
    assert scale_out_setup(SimpleNamespace(nnodes=1), out) == () and out == []


def test_replicas_get_disjoint_cores():
    from sglang_fairkv.serving.router_group import replica_cpu_binds

    assert replica_cpu_binds(2, 1, [0, 1]) == ["0", "1"]
    assert replica_cpu_binds(2, 2, [0, 1, 2, 3, 4, 5, 6, 7]) == ["0,1|2,3", "4,5|6,7"]
    assert replica_cpu_binds(3, 1, [0, 1]) == ["0", "1", "0"]  # fewer cores than ranks: shared round-robin


def test_router_group_refuses_what_it_must_choose():
    from sglang_fairkv.serving.router_group import RouterGroup

    with pytest.raises(ValueError, match="--port is the group's to choose"):
        RouterGroup(["--port", "1234"], replicas=2, on_cpu=True)
    with pytest.raises(ValueError, match="--policy must be one of"):
        RouterGroup([], replicas=2, policy="fastest", on_cpu=True)
    with pytest.raises(ValueError, match="--replicas must be >= 1"):
        RouterGroup([], replicas=0, on_cpu=True)
    g = RouterGroup(["--kv-compress", "adakv"], replicas=2, on_cpu=True, env={}, policy="round_robin")
    assert [s.env["SGLANG_CPU_OMP_THREADS_BIND"] for s in g.servers] != [None, None]
    assert g.router_args[:1] == ["--worker-urls"] and g.router_args[1:3] == [s.url for s in g.servers]
    assert g.router_args[3:5] == ["--policy", "round_robin"]
    assert RouterGroup([], replicas=2, on_cpu=True, env={}).router_args[3:5] == ["--policy", "cache_aware"]


def test_launcher_takes_dp_size_with_compression(smollm2_path):
    from sglang_fairkv.server_process import free_port
    from sglang_fairkv.serving.launcher import parse_launch

    launch = parse_launch(["--model-path", str(smollm2_path), "--dp-size", "2", "--kv-compress", "snapkv",
                           "--port", str(free_port())], on_cpu=True)
    assert "--dp-size" in launch.sglang_argv and launch.kv_compress_json is not None


_FAKE_SERVER = """
import http.server, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass

try:
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
except OSError:  # what uvicorn logs; SGLang's processes keep running
    print(f"ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
          "address already in use", flush=True)
    time.sleep(600)
srv.serve_forever()
"""


def test_a_port_taken_between_choice_and_bind_is_replaced(tmp_path, monkeypatch):
    """``ServerProcess`` chooses a free port, and the server binds it seconds later: when another process
    took it meanwhile (the server logs it and hangs), a fresh port is chosen and the server relaunched,
    instead of waiting out the start-up timeout."""
    import os
    import socket

    from sglang_fairkv import server_process as sp

    (tmp_path / "fake_server.py").write_text(_FAKE_SERVER)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    real = sp.free_port
    ports = iter([taken])
    monkeypatch.setattr(sp, "free_port", lambda: next(ports, None) or real())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    try:
        with sp.ServerProcess([], module="fake_server", env=env, startup_timeout=60) as s:
            assert s.port != taken and s.healthy()
            log = s.log_path.read_text()
    finally:
        held.close()
    assert f"('127.0.0.1', {taken}): address already in use" in log
    assert s.up_s < 30
