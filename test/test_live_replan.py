"""A running TP 2 group switches plans without a restart: ``POST /fairkv/replan`` with ``"mode": "drain"``.

One server for the module: the tiny 6-KV-head model, AdaKV, started on ``test_tp_fairkv.edge_plan``
(copies, a rank without a head in a layer; its pools have 6 head slots each, so sha fits them too). Reference: the same prompts at
TP 1 (``test_tp_fairkv.tp1_reference``): any plan gives TP 1's tokens in float32, so a rank that attended
with stale weights, a stale head list or a stale replica choice after the switch would show.
"""

from __future__ import annotations

import threading
import time


import pytest
import requests
from helpers.server import STRICT, Server, wait_ranks_empty
from test_tp_fairkv import ADAKV, N_NEW, PROMPTS, edge_plan, tp1_reference, tp1_run  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.xdist_group("live-replan")]


@pytest.fixture(scope="module")
def server(tiny_kv6_path, tp1_reference, tmp_path_factory):
    plan = edge_plan(tmp_path_factory.mktemp("live") / "edge.json")
    with Server(["--model-path", str(tiny_kv6_path), "--tp-size", "2", *ADAKV, "--max-running-requests", "16",
                 "--fairkv-plan", str(plan)], env=STRICT) as s:
        yield s


def _sha() -> dict:
    from sglang_fairkv.placement.runtime import sha_plan

    return sha_plan("tiny-kv6", 3, 6, 12, 2).to_json()


def _send(s, prompt, n, out, i):
    out[i] = requests.post(s.url + "/generate", json={"input_ids": prompt, "sampling_params": {
        "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}, timeout=600).json()


def _wait_admitted(s, n, timeout=60):
    deadline = time.time() + timeout
    while s.fairkv_info()["requests_admitted"] < n and time.time() < deadline:
        time.sleep(0.02)
    assert s.fairkv_info()["requests_admitted"] >= n


def _switch_in_background(s, plan: dict, timeout_s: float) -> tuple[dict, threading.Thread]:
    """POST a drain switch from a thread (its answer comes when the switch is done); returns the dict
    its status and body land in, and the started thread (given 0.3 s to arm the switch)."""
    reply: dict = {}

    def switch():
        r = requests.post(s.url + "/fairkv/replan", json={"plan": plan, "mode": "drain", "timeout_s": timeout_s},
                          timeout=600)
        reply.update(status=r.status_code, body=r.json())

    sw = threading.Thread(target=switch)
    sw.start()
    time.sleep(0.3)
    return reply, sw


def _same_up_to_rank_labels(a: dict, b: dict) -> bool:
    """Two fairkv-plan/1 layer lists equal up to a permutation of rank labels inside each layer."""
    for la, lb in zip(a["layers"], b["layers"]):
        pa = [sorted(round(r["share"], 9) for r in h["replicas"]) for h in la["placement"]]
        pb = [sorted(round(r["share"], 9) for r in h["replicas"]) for h in lb["placement"]]
        if pa != pb:
            return False
    return True


def test_drain_switch_keeps_every_request_and_its_tokens(server, tp1_reference, tmp_path):
    """Requests decoding when the switch is asked finish under plan A; requests arriving during it wait
    (none refused) and run under plan B (sha, no copies); every one gives TP 1's tokens. The reply and
    ``GET /fairkv/plan`` agree on the new plan (B, relabeled to overlap A) and epoch 1; pages return to 0
    on both ranks; then the switch back to the edge plan (copies) at an idle server is immediate, and the
    tokens stay."""
    s = server
    start_capacity = s.fairkv_info()["capacity"]
    a = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    assert a["epoch"] == 0 and max(sum(len(h["replicas"]) - 1 for h in la["placement"]) for la in a["plan"]["layers"])
    b = _sha()
    early: list = [None] * len(PROMPTS)
    threads = [threading.Thread(target=_send, args=(s, p, 48, early, i)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    _wait_admitted(s, len(PROMPTS))
    reply, sw = _switch_in_background(s, b, timeout_s=300)
    late: list = [None] * len(PROMPTS)
    late_threads = [threading.Thread(target=_send, args=(s, p, N_NEW, late, i)) for i, p in enumerate(PROMPTS)]
    for t in late_threads:
        t.start()
    for t in [*threads, sw, *late_threads]:
        t.join()
    assert reply["status"] == 200, reply
    body = reply["body"]
    assert body["success"] and body["epoch"] == 1 and body["pause_ms"] >= 0 and body["drain_ms"] > 0, body
    assert [o["output_ids"][:N_NEW] for o in early] == tp1_reference  # finished under A
    assert [o["output_ids"] for o in late] == tp1_reference  # waited, then ran under B
    now = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    assert now["epoch"] == 1 and now["plan_hash"] == body["plan_hash"] != a["plan_hash"]
    assert _same_up_to_rank_labels(now["plan"], b)
    info = wait_ranks_empty(s)[0]
    assert [r["pages_used"] for r in info["ranks"]] == [0, 0] and info["ledger_matches_pool"]
    assert info["plan_epoch"] == 1 and max(info["plan_copies_per_layer"]) == 0
    # the capacity figures follow the new plan (the edge plan's copies and empty layer change a request's pages)
    assert info["capacity"]["pages_compressed"] != start_capacity["pages_compressed"], (start_capacity, info["capacity"])
    # back to the edge plan at an idle server: the switch commits in the iteration that receives it
    back = requests.post(s.url + "/fairkv/replan", json={"plan": a["plan"], "mode": "drain"}, timeout=120)
    assert back.status_code == 200 and back.json()["epoch"] == 2, back.text
    assert _same_up_to_rank_labels(requests.get(s.url + "/fairkv/plan", timeout=30).json()["plan"], a["plan"])
    assert max(wait_ranks_empty(s)[0]["plan_copies_per_layer"]) >= 1
    # the prefix tier was flushed at the switch and prices its blocks by the new plan's heads: a prompt
    # cached under it is reused with the same tokens
    long_prompt = PROMPTS[3] * 2
    first = s.greedy(long_prompt, N_NEW)
    again = s.greedy(long_prompt, N_NEW)
    assert again["meta_info"]["cached_tokens"] == len(long_prompt) - 8 and again["output_ids"] == first["output_ids"]
    assert [s.greedy_ids(p, N_NEW) for p in PROMPTS] == tp1_reference
    assert [r["pages_used"] for r in wait_ranks_empty(s)[0]["ranks"]] == [0, 0]


def test_a_drain_past_its_timeout_is_cancelled_and_a_second_switch_is_refused(server, tp1_reference, tmp_path):
    """While a long request decodes: a second switch gets 409; a drain past its ``timeout_s`` answers 504
    and plan A keeps serving (same hash, same epoch); the request finishes with TP 1's tokens and new
    requests are admitted again."""
    s = server
    a = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    b = _sha()
    out: list = [None]
    t = threading.Thread(target=_send, args=(s, PROMPTS[0], 400, out, 0))
    t.start()
    _wait_admitted(s, 1)
    first, sw = _switch_in_background(s, b, timeout_s=1.0)
    second = requests.post(s.url + "/fairkv/replan", json={"plan": b, "mode": "drain"}, timeout=60)
    sw.join()
    t.join()
    assert second.status_code == 409 and "in progress" in second.json()["error"], second.text
    assert first["status"] == 504 and "cancelled" in first["body"]["error"], first
    now = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    assert now["plan_hash"] == a["plan_hash"] and now["epoch"] == a["epoch"]
    assert out[0]["output_ids"][:N_NEW] == tp1_reference[0]
    assert s.greedy_ids(PROMPTS[1], N_NEW) == tp1_reference[1]
    for bad in ("soon", 0, -1):
        r = requests.post(s.url + "/fairkv/replan", json={"plan": b, "mode": "drain", "timeout_s": bad}, timeout=60)
        assert r.status_code == 400 and "timeout_s must be a number > 0" in r.json()["error"], r.text
    assert requests.get(s.url + "/fairkv/plan", timeout=30).json()["plan_hash"] == a["plan_hash"]
    assert [r["pages_used"] for r in wait_ranks_empty(s)[0]["ranks"]] == [0, 0]



def _decoded(s, n: int, timeout: float = 60) -> None:
    """Wait until every running request has decoded ``n`` tokens (the ledger's longest segment grows)."""
    deadline = time.time() + timeout
    start = None
    while time.time() < deadline:
        info = s.fairkv_info()
        rows = info["kept_rows"]
        if start is None and info["requests_admitted"] and not any(info["transient_rows"]):
            start = rows
        if start is not None and sum(rows) >= sum(start) + n * info["requests_admitted"]:
            return
        time.sleep(0.02)


def test_migrate_switch_moves_running_requests_and_keeps_their_tokens(server, tp1_reference):
    """``mode: migrate`` while requests decode: the switch runs at the first step boundary without waiting
    for them, their segments move to their owners under B (the edge plan -> sha moves layer 1's heads 0-2
    from rank 1 to rank 0) and their weight slices follow; every request -- running through the switch,
    arriving during it, and a client that disconnects during it -- finishes, and the tokens of the ones
    that ran through both plans equal a run without a switch (TP 1's in float32). Back to the edge plan the
    same way. Pages return to 0, the ledger equals the pool, ``/server_info`` counts both switches."""
    s = server
    a = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    n_long = 48
    no_switch = [s.greedy_ids(p, n_long) for p in PROMPTS]
    assert [t[:N_NEW] for t in no_switch] == tp1_reference
    replies = []
    for target in (_sha(), a["plan"]):
        out: list = [None] * len(PROMPTS)
        threads = [threading.Thread(target=_send, args=(s, p, n_long, out, i)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        _wait_admitted(s, len(PROMPTS))
        _decoded(s, 4)
        dropped = threading.Thread(target=lambda: _quiet_post(s, PROMPTS[1], 400, timeout=1.0))
        dropped.start()
        late: list = [None] * 2
        late_threads = [threading.Thread(target=_send, args=(s, PROMPTS[i], N_NEW, late, i)) for i in range(2)]
        for t in late_threads:
            t.start()
        r = requests.post(s.url + "/fairkv/replan", json={"plan": target, "mode": "migrate"}, timeout=300)
        during = s.fairkv_info()["requests_admitted"]
        for t in [*threads, *late_threads, dropped]:
            t.join()
        assert r.status_code == 200, r.text
        body = r.json()
        replies.append(body)
        assert body["success"] and body["verified"] and body["mode"] == "migrate", body
        assert body["running_requests"] >= len(PROMPTS) and during >= 1, (body, during)
        assert body["moved"]["segments"] > 0 and body["moved"]["kv_bytes"] > 0 and body["moved"]["weight_bytes"] > 0
        assert all(q["ledger_ok"] for q in body["ranks"]) and len({q["plan_hash"] for q in body["ranks"]}) == 1
        assert [o["output_ids"] for o in out] == no_switch  # decoded across the switch: unchanged tokens
        assert [o["output_ids"] for o in late] == tp1_reference[:2]
    assert replies[1]["epoch"] == replies[0]["epoch"] + 1 == a["epoch"] + 2
    assert _same_up_to_rank_labels(requests.get(s.url + "/fairkv/plan", timeout=30).json()["plan"], a["plan"])
    info = wait_ranks_empty(s)[0]
    assert [q["pages_used"] for q in info["ranks"]] == [0, 0] and info["ledger_matches_pool"]
    log = info["replan"]
    assert log["switches"] >= 2 and log["last"]["mode"] == "migrate" and log["last"]["pause_ms"] > 0
    assert log["kv_bytes_moved_total"] >= sum(b["moved"]["kv_bytes"] for b in replies)
    assert [s.greedy_ids(p, N_NEW) for p in PROMPTS] == tp1_reference
    # the prefix tier was flushed at each switch; a prompt cached under the new plan is reused, same tokens
    long_prompt = PROMPTS[2] * 2
    first = s.greedy(long_prompt, N_NEW)
    again = s.greedy(long_prompt, N_NEW)
    assert again["meta_info"]["cached_tokens"] == len(long_prompt) - 8 and again["output_ids"] == first["output_ids"]
    assert [q["pages_used"] for q in wait_ranks_empty(s)[0]["ranks"]] == [0, 0]


def _quiet_post(s, prompt, n, timeout):
    try:
        requests.post(s.url + "/generate", json={"input_ids": prompt, "sampling_params": {
            "max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}, timeout=timeout)
    except requests.exceptions.RequestException:
        pass  # the client went away; the server aborts the request


def test_migrate_dry_run_and_refusals(server):
    """A migrate dry run reports what would move and changes nothing; a plan for another TP size is a 400,
    a bad mode a 400, and plan A keeps serving."""
    s = server
    a = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    out: list = [None]
    t = threading.Thread(target=_send, args=(s, PROMPTS[0], 200, out, 0))
    t.start()
    _wait_admitted(s, 1)
    _decoded(s, 2)
    dry = requests.post(s.url + "/fairkv/replan", json={"plan": _sha(), "mode": "migrate", "dry_run": True}, timeout=60)
    from sglang_fairkv.placement.runtime import sha_plan

    tp3 = requests.post(s.url + "/fairkv/replan", json={"plan": sha_plan("tiny-kv6", 3, 6, 12, 3).to_json(),
                                                          "mode": "migrate"}, timeout=60)
    mode = requests.post(s.url + "/fairkv/replan", json={"plan": _sha(), "mode": "teleport"}, timeout=60)
    t.join()
    assert dry.status_code == 200 and dry.json()["dry_run"] and dry.json()["running_requests"] == 1, dry.text
    tr = dry.json()["transition"]
    assert tr["fits"] and tr["segments_moved"] > 0 and tr["kv_bytes_moved"] > 0, tr
    assert tp3.status_code == 400 and "tp" in tp3.json()["error"].lower(), tp3.text
    assert mode.status_code == 400 and "mode must be one of" in mode.json()["error"], mode.text
    now = requests.get(s.url + "/fairkv/plan", timeout=30).json()
    assert now["plan_hash"] == a["plan_hash"] and now["epoch"] == a["epoch"]
    assert [q["pages_used"] for q in wait_ranks_empty(s)[0]["ranks"]] == [0, 0]
