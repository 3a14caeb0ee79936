"""The one-call device check (``make device-check``): phases with deadlines, evidence that comes back.

A device call returns at most 8 files from ``$OUT`` and may be cut at its limit, so:

* everything lands in **three files**: ``summary.md`` (one table a phase, the figures first),
  ``results.json`` (every figure, every phase's status) and ``logs.tar.gz`` (every log: the phases' own
  and each server's), all three **rewritten after every phase** -- a call killed mid-way still returns
  what the finished phases measured (and a phase's partial results: each phase rewrites its own JSON
  as it goes);
* every phase runs in its own session with a **deadline** that leaves the later phases their minimum;
  at the deadline the phase's session is killed, and so is every server session it registered
  (``$PHASE_DIR/pgids``: servers run in sessions of their own and would otherwise outlive it, holding
  GPU memory on a warm machine);
* the most important figures come first: the pool + kernel check, the kernel against FlashInfer, then
  the servers (fairkv before stock, stock with fairkv's graph settings) with one greedy comparison.

Budget (H100 or H200): the phases' deadlines add to ``--total-s`` (default 400 s) so that one call of at
most 540 s covers the machine's start as well.

``--dry-run`` (CPU, the project's venv, Triton interpreted): the same phases and the same server
configurations at tiny sizes (``make device-check-dry``); ``--inject-hang S`` adds a phase that starts a
server-like process in its own session and hangs, with an S-second deadline (the tests check that it is
killed, reported as a timeout, and that the phases after it still run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _paths  # noqa: E402,F401  (the project's folders on sys.path)
from _results import atomic_write  # noqa: E402
from sglang_fairkv.server_process import group_alive  # noqa: E402  (stdlib only: fine on the device)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass
class Phase:
    """One step of the check: ``cmd`` run in ``REPO`` in a session of its own; ``budget_s`` its deadline
    at most, ``min_s`` what the phases before it must leave it. It writes its figures to
    ``$RESULT_JSON`` (rewritten as it goes) and registers server process groups in ``$PHASE_DIR/pgids``."""

    name: str
    cmd: list[str]
    budget_s: float
    min_s: float


def phases(dry: bool, inject_hang: float | None) -> list[Phase]:
    py = sys.executable
    flag = ["--dry-run"] if dry else []
    out = [Phase("gpu", [py, str(HERE / "gpu_info.py")], 30, 5),
           Phase("pool", [py, str(HERE / "check_pool.py"), *flag], 90, 30)]
    if inject_hang is not None:
        out.append(Phase("hang", [py, "-c", HANG], inject_hang, inject_hang))
    out += [Phase("kernel", [py, str(HERE / "bench_kernel.py"), *flag], 150 if not dry else 400, 60),
            Phase("serve", [py, str(HERE / "serve.py"), *flag], 200 if not dry else 600, 90)]
    return out


#: the injected hang: a server-like child in its own session (registered), then the phase hangs
HANG = """
import os, subprocess, sys, time
from pathlib import Path
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
with open(Path(os.environ["PHASE_DIR"]) / "pgids", "a") as f:
    f.write(f"{p.pid}\\n")
print("hang: started a server-like session", p.pid, flush=True)
time.sleep(3600)
"""


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def registered_groups(phase_dir: Path) -> list[int]:
    f = phase_dir / "pgids"
    if not f.exists():
        return []
    return [int(x) for x in f.read_text().split() if x.strip().isdigit()]


def run_phase(ph: Phase, deadline_s: float, work: Path, base_env: dict) -> dict:
    """Run one phase to its deadline; kill its session and its servers' at the end, whatever happened."""
    pdir = work / ph.name
    pdir.mkdir(parents=True, exist_ok=True)
    result_json = pdir / "result.json"
    # the phases are scripts of this folder: their own directory puts _paths / _results on sys.path
    env = {**base_env, "PHASE_DIR": str(pdir), "RESULT_JSON": str(result_json), "OUT": str(pdir),
           "PHASE_DEADLINE_S": str(round(deadline_s))}
    t0 = time.time()
    status = "ok"
    with open(pdir / "phase.log", "w") as log:
        log.write(f"$ {' '.join(ph.cmd)}   (deadline {deadline_s:.0f} s)\n")
        log.flush()
        proc = subprocess.Popen(ph.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, deadline_s))
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = "timeout"
            rc = None
        kill_group(proc.pid)
        for g in registered_groups(pdir):
            kill_group(g)
        proc.wait()
        left = [g for g in registered_groups(pdir) if group_alive(g)]
        t_end = time.time() + 10
        while left and time.time() < t_end:
            time.sleep(0.2)
            left = [g for g in left if group_alive(g)]
    res = {"status": status, "exit": rc, "seconds": round(time.time() - t0, 1), "deadline_s": round(deadline_s),
           "survivors": left}
    if result_json.exists():
        try:
            res["figures"] = json.loads(result_json.read_text())
        except json.JSONDecodeError as e:  # written mid-way when killed
            res["figures_error"] = str(e)
    return res


def summary(results: dict, meta: dict) -> str:
    lines = [f"# device check ({'DRY RUN, CPU' if meta['dry_run'] else meta.get('device', 'device')})", "",
             f"{meta['elapsed_s']:.0f} s of {meta['total_s']:.0f} s; phases: "
             + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in results.items()), ""]
    for name, r in results.items():
        fig = r.get("figures") or {}
        lines.append(f"## {name}: {r['status']}")
        table = fig.get("table") if isinstance(fig, dict) else None
        if table:
            lines += ["", table, ""]
        if isinstance(fig, dict) and fig.get("failures"):
            lines.append("failures: " + "; ".join(map(str, fig["failures"])))
        if r.get("survivors"):
            lines.append(f"processes that survived the kill: {r['survivors']}")
        lines.append("")
    return "\n".join(lines)


def write_evidence(out: Path, work: Path, results: dict, meta: dict) -> None:
    """The three files, rewritten whole (a temporary name, then a rename: a kill leaves the old ones)."""
    atomic_write(out / "results.json", json.dumps({"meta": meta, "phases": results}, indent=1).encode())
    atomic_write(out / "summary.md", summary(results, meta).encode())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(work.rglob("*")):
            if f.is_file() and f.suffix in (".log", ".json", ".md", ".txt"):
                tar.add(f, arcname=str(f.relative_to(work)))
    atomic_write(out / "logs.tar.gz", buf.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--total-s", type=float, default=None, help="all phases' deadlines add to at most this")
    ap.add_argument("--inject-hang", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    total = a.total_s or (1500.0 if a.dry_run else 400.0)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device-check-"))
    env = dict(os.environ)
    if a.dry_run:
        env["TRITON_INTERPRET"] = "1"
    t_start = time.time()
    plan = phases(a.dry_run, a.inject_hang)
    meta = {"dry_run": a.dry_run, "total_s": total, "elapsed_s": 0.0, "phases": [p.name for p in plan]}
    results: dict = {}
    for i, ph in enumerate(plan):
        remaining = total - (time.time() - t_start)
        reserve = sum(p.min_s for p in plan[i + 1:])
        deadline = min(ph.budget_s, remaining - reserve)
        if deadline < min(ph.min_s, 5.0):
            results[ph.name] = {"status": "skipped (no time left)", "seconds": 0.0, "exit": None}
        else:
            print(f"[device-check] {ph.name}: deadline {deadline:.0f} s", flush=True)
            results[ph.name] = run_phase(ph, deadline, work, env)
            print(f"[device-check] {ph.name}: {results[ph.name]['status']} in {results[ph.name]['seconds']} s",
                  flush=True)
            if ph.name == "gpu":
                meta["device"] = (results["gpu"].get("figures") or {}).get("device", "unknown")
        meta["elapsed_s"] = round(time.time() - t_start, 1)
        write_evidence(out, work, results, meta)
    print((out / "summary.md").read_text())
    bad = [k for k, v in results.items() if v["status"] != "ok" and k != "hang"]
    print(("PASS" if not bad else "FAIL: " + ", ".join(bad)) + f" device check in {meta['elapsed_s']:.0f} s")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
