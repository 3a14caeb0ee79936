"""The first command: ``make serve`` (no ARGS) serves the embedded model compressed and says what that
buys in its start-up lines; the README's curls answer; with ``--enable-metrics`` every series the Grafana
dashboard (``docs/grafana/fairkv.json``) queries is exported. One real server, started as a user would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from helpers.server import free_port

pytestmark = [pytest.mark.server]

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "fairkv.json"


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries use (its ``expr`` fields and its variables)."""
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    exprs += [v.get("query", "") for v in d["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"sglang:[a-z_]+", e)}


def test_dashboard_queries_parse():
    names = dashboard_metrics()
    assert {"sglang:fairkv_pages_used", "sglang:fairkv_attention_busy_rate_since_start", "sglang:fairkv_layer_balance",
            "sglang:fairkv_replan_gain", "sglang:fairkv_prefix_tier_pages", "sglang:fairkv_prefix_tier_hits"} <= names


def test_make_serve_is_compressed_and_exports_the_dashboards_metrics(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["make", "serve", f"PORT={port}", "ARGS=--enable-metrics"], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("make serve did not come up: " + log.read_text()[-3000:])
        text = log.read_text()
        m = re.search(r"KV compression: each layer keeps 50% of each prompt's tokens, split across its KV heads by "
                      r"score \(AdaKV\).*about (\d+) such requests at once vs (\d+) with stock KV\. Prefix cache: on",
                      text)
        assert m and int(m.group(1)) > int(m.group(2)) > 0, text[-3000:]
        assert "sglang-fairkv: CPU defaults:" in text and "--sleep-on-idle" in text
        # the README's first curls
        body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
        for _ in range(2):  # the second one reuses the first's prefix
            r = requests.post(url + "/generate", json=body, timeout=120)
            assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 16
        fk = requests.get(url + "/server_info", timeout=30).json()["internal_states"][0]["fairkv"]
        assert fk["kv_compress"] == "adakv" and fk["prefix_tier"]["hits"] >= 1
        cap = fk["capacity"]
        assert (cap["requests_compressed"], cap["requests_dense"]) == (int(m.group(1)), int(m.group(2)))
        assert cap["pages_compressed"] < cap["pages_dense"]
        metrics = requests.get(url + "/metrics", timeout=30).text
        exported = set(re.findall(r"^(sglang:[a-z_]+)[{ ]", metrics, re.M))
        missing = dashboard_metrics() - exported
        assert not missing, missing
        assert re.search(r'^sglang:fairkv_prefix_tier_hits\{[^}]*\} [1-9]', metrics, re.M)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
