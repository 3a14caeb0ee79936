"""``make device-check-dry``: the device check's orchestrator (``benchmark/device/run.py``) on the CPU with
every phase and every server configuration of the real run at tiny sizes, plus an injected phase that
hangs with a server-like process in a session of its own.

What a device call returns must survive a failure: at most 8 files (here the three the check writes),
the hanging phase reported as a timeout and killed with the process it registered, the phases after it
still run with real data through them (rows read from the pool, the kernel against fp64, greedy tokens of
fairkv and stock compared on three real servers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server]

RUN = Path(__file__).resolve().parents[1] / "benchmark" / "device" / "run.py"


def test_dry_run_returns_its_evidence_in_three_files_and_survives_a_hung_phase(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RESULT_JSON", "PHASE_DIR", "PHASE_DEADLINE_S")}
    r = subprocess.run([sys.executable, str(RUN), "--dry-run", "--inject-hang", "8"], env={**env, "OUT": str(out)},
                       capture_output=True, text=True, timeout=1500)
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"], r.stdout[-3000:]
    res = json.loads((out / "results.json").read_text())
    ph = res["phases"]
    assert list(ph) == ["gpu", "pool", "hang", "kernel", "serve"]
    assert ph["hang"]["status"] == "timeout" and ph["hang"]["survivors"] == []
    assert 8 <= ph["hang"]["seconds"] < 30
    bad = {k: v["status"] for k, v in ph.items() if k != "hang" and v["status"] != "ok"}
    assert not bad and r.returncode == 0, (bad, r.stdout[-3000:], r.stderr[-3000:])
    # the registered server-like process is gone
    pid = int(next(line.split()[-1] for line in _member(out, "hang/phase.log").splitlines()
                   if line.startswith("hang: started")))
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    # real data went through every phase
    pool = ph["pool"]["figures"]
    assert all(v["rows_read"] > 0 and v["max_abs_diff"] < 3e-2 for v in pool["correctness"].values())
    kern = ph["kernel"]["figures"]
    assert not kern["failures"] and kern["decode"]
    for row in kern["decode"]:
        assert row["ours_rel_err"] < 1e-5 and row["sgl_rel_err"] < 1e-5, row
    assert kern["prefill"]["rel_err_vs_fp32"] < 1e-5
    serve = ph["serve"]["figures"]
    assert [x["name"] for x in serve["runs"]] == ["fairkv none", "stock", "fairkv adakv 0.75"]  # fairkv first
    assert all(x["all_tokens"] and x["requests"] == 4 for x in serve["runs"])
    assert serve["greedy"] and "2/2 prompts equal" in serve["greedy"][0]
    assert serve["runs"][0]["max_rows_seen"] and serve["runs"][2]["max_rows_seen"]
    # the logs: every phase's and every server's
    with tarfile.open(out / "logs.tar.gz") as t:
        names = t.getnames()
    assert {f"{p}/phase.log" for p in ph} <= set(names)
    assert sum(n.startswith("serve/server-") for n in names) == 3
    summary = (out / "summary.md").read_text()
    assert "hang: timeout" in summary and "greedy tokens, stock vs fairkv none" in summary


def _member(out: Path, name: str) -> str:
    with tarfile.open(out / "logs.tar.gz") as t:
        return t.extractfile(name).read().decode()
