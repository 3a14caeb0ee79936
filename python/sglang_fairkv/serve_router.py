"""``python -m sglang_fairkv.serve_router``: N compressed fairkv servers behind sglang-router.

    python -m sglang_fairkv.serve_router --replicas 2 --port 30000 --policy cache_aware -- \\
        --model-path /models/Llama-3.3-70B-Instruct --tp-size 8 --kv-compress adakv

Everything after ``--`` goes to every replica's ``launch_server`` (each gets its own port). The router
listens on ``--port``; clients talk to it as to one SGLang server. Ctrl-C stops the whole group; a
replica or the router that exits stops it too (exit status 1). See ``serving/router_group.py`` for the
routing policy (``cache_aware``, the default, with prefix caching on; ``round_robin`` / ``power_of_two``
without it).
"""

from __future__ import annotations

import argparse
import signal
import sys

from .serving.router_group import DEFAULT_POLICY, POLICIES, RouterGroup


def _stop_on_term(*_) -> None:
    """SIGTERM stops the group as Ctrl-C does; a second one (e.g. forwarded by ``timeout``) must not
    interrupt the stopping."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m sglang_fairkv.serve_router", description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICIES)
    ap.add_argument("--log-dir", default="logs/router-group")
    a = ap.parse_args(own)
    try:
        group = RouterGroup(server_args, replicas=a.replicas, port=a.port, host=a.host, policy=a.policy,
                            log_dir=a.log_dir)
    except ValueError as e:
        print(f"{ap.prog}: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_term)
    print(f"starting {a.replicas} replicas (logs in {a.log_dir}/) and the router ({a.policy}) on "
          f"http://{a.host}:{a.port} ...", flush=True)
    try:
        with group:
            print(f"serving on {group.url}: replicas {', '.join(s.url for s in group.servers)}", flush=True)
            why = group.wait()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the group is stopped by now (the with block)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"{ap.prog}: {e}", file=sys.stderr)
        return 1
    print(f"{ap.prog}: {why}; stopped the group", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
