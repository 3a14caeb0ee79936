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


def test_kv_compress_bad_budget_one_line():
    rc, out, alive = run_launcher(["--kv-compress", "snapkv", "--kv-compress-ratio", "1.5"])
    _assert_clean_failure(rc, out, alive, "--kv-compress-ratio must be in [0, 1), got 1.5")


@pytest.mark.parametrize("args,needle", [
    (["--kv-compress", "snapkv", "--kv-budget", "0"], "--kv-budget must be >= 1 token per head, got 0"),
    (["--kv-compress", "adakv", "--kv-budget", "8", "--kv-compress-ratio", "0.5"],
     "give --kv-budget or --kv-compress-ratio, not both"),
    (["--kv-budget", "64"], "--kv-budget need --kv-compress"),
    (["--kv-compress", "snapkv", "--kv-budget", "64", "--kv-pool-kernel", "4"], "positive odd number"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--kv-alpha", "2"], "--kv-alpha must be in [0, 1]"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--enable-mixed-chunk"],
     "cannot be used with a compressed KV cache (--kv-compress): --enable-mixed-chunk"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--page-size", "16"], "--page-size > 1"),
    (["--kv-compress", "none", "--cuda-graph-backend-prefill", "full"], "--cuda-graph-backend-prefill full"),
    (["--kv-compress", "none", "--cuda-graph-backend-decode", "full"], "--cuda-graph-backend-decode full (CUDA"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--kv-cache-dtype", "nvfp4"],
     "--kv-cache-dtype nvfp4 (the ragged pool holds the model dtype, or fp8: fp8_e4m3 / fp8_e5m2)"),
    (["--fairkv-plan", "sha", "--tp-size", "3", "--kv-cache-dtype", "nvfp4"], "--kv-cache-dtype nvfp4"),
    (["--fairkv-plan", "fairkv", "--tp-size", "2"], "give --fairkv-stats FILE"),
    (["--fairkv-plan", "sha", "--tp-size", "4"], "3 KV heads over tp=4: more ranks than KV heads"),
    (["--kv-compress", "snapkv", "--kv-budget", "64", "--kv-window", "8192"],
     "--kv-window 8192 is not below the context length 8192"),
    (["--kv-compress", "snapkv", "--kv-budget", "64", "--kv-window", "600", "--context-length", "512"],
     "--kv-window 600 is not below the context length 512"),
    (["--fairkv-plan", "/no/such/plan.json", "--tp-size", "2"], "not a plan file and not one of"),
    (["--fairkv-plan", "sha", "--fairkv-stats", "/no/such/stats.json", "--tp-size", "3"],
     "--fairkv-stats /no/such/stats.json: "),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--fairkv-stats", "s.json"],
     "--fairkv-stats needs a placement (--fairkv-plan, or --tp-size > 1)"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--attention-backend", "torch_native"],
     "--kv-compress needs --attention-backend fairkv, got torch_native"),
    (["--kv-compress", "headkv"], "--kv-compress headkv needs --kv-head-budgets FILE"),
    (["--kv-compress", "adakv", "--fairkv-auto-replan", "1.1"], "--fairkv-auto-replan needs --tp-size > 1"),
    (["--tp-size", "2", "--kv-compress", "adakv", "--fairkv-auto-replan", "0.9"], "must be a gain >= 1"),
    (["--tp-size", "2", "--fairkv-plan", "sha", "--fairkv-auto-replan", "1.1"], "needs --kv-compress"),
    (["--tp-size", "2", "--kv-compress", "adakv", "--fairkv-replan-head-slots", "4"],
     "--fairkv-replan-head-slots must be in [1, 3]"),
    (["--kv-compress", "adakv", "--fairkv-replan-head-slots", "2"], "--fairkv-replan-head-slots needs --tp-size > 1"),
    (["--kv-decode-budget", "64"], "--kv-decode-budget need --kv-decode-compress snapkv|adakv"),
    (["--kv-compress", "adakv", "--kv-decode-interval", "64"], "--kv-decode-interval need --kv-decode-compress"),
    (["--kv-decode-compress", "adakv", "--kv-decode-interval", "8", "--kv-decode-window", "8"],
     "--kv-decode-interval 8 must be longer than --kv-decode-window 8"),
    (["--kv-decode-compress", "snapkv", "--kv-decode-budget", "16", "--kv-decode-window", "32"],
     "--kv-decode-budget 16 is below --kv-decode-window 32"),
    (["--kv-decode-compress", "snapkv", "--kv-decode-window", "0"], "--kv-decode-window must be >= 1, got 0"),
    (["--kv-decode-compress", "adakv", "--kv-compress", "pyramidkv"],
     "--kv-decode-compress adakv cannot follow --kv-compress pyramidkv"),
])
def test_kv_compress_flag_errors(smollm2_path, args, needle):
    """Validated before anything starts (parse_launch): the message names the offending flag/value."""
    from sglang_fairkv.serving.launcher import UsageError, parse_launch

    with pytest.raises(UsageError) as e:
        parse_launch(["--model-path", str(smollm2_path), *args], on_cpu=True)
    assert needle in str(e.value)


def test_kv_head_budgets_checked_against_model(smollm2_path, tmp_path):
    from sglang_fairkv.serving.launcher import UsageError, parse_launch

    bad = tmp_path / "b.json"
    bad.write_text('{"head_budgets": [[64, 64, 64]]}')  # one layer; SmolLM2 has 30
    with pytest.raises(UsageError, match=r"--kv-head-budgets .*b.json: head_budgets must be a \[30\]\[3\]"):
        parse_launch(["--model-path", str(smollm2_path), "--kv-compress", "headkv",
                     "--kv-head-budgets", str(bad)], on_cpu=True)
    good = tmp_path / "g.json"
    good.write_text('{"head_budgets": %s}' % ([[64, 32, 128]] * 30))
    plan = parse_launch(["--model-path", str(smollm2_path), "--kv-compress", "headkv",
                        "--kv-head-budgets", str(good)], on_cpu=True)
    assert plan.kv_compress_json is not None and "headkv" in plan.kv_compress_json
    argv = plan.sglang_argv
    assert argv[argv.index("--attention-backend") + 1] == "fairkv"
    assert "--disable-overlap-schedule" not in argv  # overlap stays on
    # prefix caching stays on: SGLang's radix cache over the dense prefix tier
    assert argv[argv.index("--radix-cache-backend") + 1] == "fairkv" and "--disable-radix-cache" not in argv
    assert plan.prefix_tier == 1.0
    assert argv[argv.index("--cuda-graph-backend-decode") + 1] == "disabled"  # no CUDA here
    assert "--kv-compress" not in argv and "--kv-head-budgets" not in argv  # ours never reach SGLang


def test_cuda_launch_keeps_decode_graphs_and_overlap(smollm2_path, monkeypatch):
    """On a CUDA machine fairkv leaves SGLang's decode CUDA graphs and overlap scheduling on (graph
    interface and deferred free); prefill graphs are turned off (per-layer page decisions);
    with the torch decode path, decode graphs are turned off too."""
    from sglang_fairkv.serving.launcher import parse_launch

    monkeypatch.delenv("FAIRKV_DECODE_KERNEL", raising=False)
    argv = parse_launch(["--model-path", str(smollm2_path), "--kv-compress", "adakv", "--kv-compress-ratio",
                        "0.5", "--cuda-graph-backend-decode", "full"], on_cpu=False).sglang_argv
    assert "--disable-overlap-schedule" not in argv
    assert argv[argv.index("--cuda-graph-backend-decode") + 1] == "full"
    assert argv[argv.index("--cuda-graph-backend-prefill") + 1] == "disabled"
    argv = parse_launch(["--model-path", str(smollm2_path), "--kv-compress", "none"], on_cpu=False).sglang_argv
    assert "--cuda-graph-backend-decode" not in argv  # SGLang's default
    monkeypatch.setenv("FAIRKV_DECODE_KERNEL", "torch")
    argv = parse_launch(["--model-path", str(smollm2_path), "--kv-compress", "none"], on_cpu=False).sglang_argv
    assert argv[argv.index("--cuda-graph-backend-decode") + 1] == "disabled"


def _plan_file(tmp_path, name, **kw):
    """A valid fairkv-plan/1 document, SmolLM2-shaped unless ``kw`` says otherwise."""
    import json

    from sglang_fairkv.placement.runtime import sha_plan

    plan = sha_plan("m", kw.pop("layers", 30), kw.pop("kv", 3), kw.pop("q", 9), kw.pop("tp", 3)).to_json()
    plan.update(kw)
    path = tmp_path / name
    path.write_text(json.dumps(plan))
    return path


def test_plan_checked_against_model_and_tp(smollm2_path, tmp_path):
    """A plan for another TP size, another model shape, or a broken file stops start-up naming why;
    a good one reaches the scheduler processes through FAIRKV_PLAN (as JSON here)."""
    import json

    from sglang_fairkv.serving.launcher import UsageError, parse_launch
    from sglang_fairkv.placement.stats import KVStats

    base = ["--model-path", str(smollm2_path)]
    cases = [
        (_plan_file(tmp_path, "tp3.json"), "2", "plan is for tp=3, server runs tp=2"),
        (_plan_file(tmp_path, "kv.json", kv=2, q=8, tp=2), "2", "plan has 2 KV heads, model has 3"),
        (_plan_file(tmp_path, "layers.json", layers=2), "3", "plan has 2 layers, model has 30"),
    ]
    bad_share = json.loads(_plan_file(tmp_path, "s.json").read_text())
    bad_share["layers"][4]["placement"][1]["replicas"] = [{"rank": 0, "share": 0.5}, {"rank": 2, "share": 0.25}]
    (tmp_path / "share.json").write_text(json.dumps(bad_share))
    cases.append((tmp_path / "share.json", "3", "layers[4].placement[1]: shares of kv_head 1 sum to 0.75, not 1"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    cases.append((broken, "2", "broken.json"))
    for path, tp, needle in cases:
        with pytest.raises(UsageError) as e:
            parse_launch([*base, "--fairkv-plan", str(path), "--tp-size", tp], on_cpu=True)
        assert needle in str(e.value), (path, str(e.value))
    # stats for another shape
    import numpy as np

    stats = tmp_path / "stats.json"
    KVStats(model="x", num_layers=2, num_q_heads=9, num_kv_heads=3, head_dim=64,
            kv_len_mean=np.ones((2, 3))).save(stats)
    with pytest.raises(UsageError, match="describes 2 layers x 3 KV heads"):
        parse_launch([*base, "--fairkv-plan", "fairkv", "--fairkv-stats", str(stats), "--tp-size", "2"],
                    on_cpu=True)
    # good: a plan computed from SmolLM2-shaped stats, with copies
    KVStats(model="x", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64,
            kv_len_mean=np.tile([900.0, 100.0, 100.0], (30, 1))).save(stats)
    lp = parse_launch([*base, "--fairkv-plan", "fairkv", "--fairkv-stats", str(stats), "--tp-size", "2"],
                     on_cpu=True)
    plan = json.loads(lp.placement_json)
    assert plan["tp"] == 2 and plan["strategy"] == "fairkv"
    assert any(len(h["replicas"]) > 1 for layer in plan["layers"] for h in layer["placement"])
    assert lp.kv_compress_json is not None and '"none"' in lp.kv_compress_json  # plan alone: no compression


def test_cpu_sleeps_on_idle_unless_told(smollm2_path):
    """On CPU the launcher adds SGLang's --sleep-on-idle (an idle scheduler otherwise spins a core:
    two servers on this machine made every request 5-25x slower) and says so; --no-sleep-on-idle
    (ours, never passed to SGLang) keeps the busy loop; on CUDA SGLang's default stands."""
    from sglang_fairkv.serving.launcher import UsageError, parse_launch

    lc = parse_launch(["--model-path", str(smollm2_path)], on_cpu=True)
    assert "--sleep-on-idle" in lc.sglang_argv
    assert any("CPU defaults:" in n and "--sleep-on-idle" in n for n in lc.notes)
    lc = parse_launch(["--model-path", str(smollm2_path), "--no-sleep-on-idle"], on_cpu=True)
    assert "--sleep-on-idle" not in lc.sglang_argv and "--no-sleep-on-idle" not in lc.sglang_argv
    assert "--sleep-on-idle" not in parse_launch(["--model-path", str(smollm2_path)], on_cpu=False).sglang_argv
    with pytest.raises(UsageError, match="contradict"):
        parse_launch(["--model-path", str(smollm2_path), "--sleep-on-idle", "--no-sleep-on-idle"], on_cpu=True)


def test_compressed_servers_default_to_json_without_free_whitespace(smollm2_path):
    """With compression the launcher adds SGLang's --constrained-json-disable-any-whitespace (a small
    model on a compressed prompt loops on whitespace inside a JSON grammar that allows any) and says so;
    --constrained-json-any-whitespace (ours) keeps SGLang's grammar; no compression: SGLang's default."""
    from sglang_fairkv.serving.launcher import UsageError, parse_launch

    flag = "--constrained-json-disable-any-whitespace"
    base = ["--model-path", str(smollm2_path)]
    lc = parse_launch([*base, "--kv-compress", "adakv"], on_cpu=True)
    assert lc.sglang_argv.count(flag) == 1 and any(n.startswith(flag) for n in lc.notes)
    assert flag not in parse_launch([*base, "--kv-compress", "none"], on_cpu=True).sglang_argv
    assert flag not in parse_launch(base, on_cpu=True).sglang_argv
    argv = parse_launch([*base, "--kv-compress", "adakv", "--constrained-json-any-whitespace"], on_cpu=True).sglang_argv
    assert flag not in argv and "--constrained-json-any-whitespace" not in argv
    assert parse_launch([*base, "--kv-compress", "snapkv", flag], on_cpu=True).sglang_argv.count(flag) == 1
    with pytest.raises(UsageError, match="contradict"):
        parse_launch([*base, "--kv-compress", "adakv", flag, "--constrained-json-any-whitespace"], on_cpu=True)


def test_architectures_checked_at_start_up(tmp_path):
    """A plan for an architecture without a FairKV class is refused naming every one that has one;
    Qwen3-MoE at TP 1 is served by the FairKV class (a one-rank sha plan, said in a note) because
    SGLang's own class writes K/V around the backend on GPU, which the backend also refuses at start-up
    for any such SGLang class (read off the class's module, not a list); Qwen3 at TP 1 keeps
    SGLang's class."""
    import json

    from sglang.srt.models import qwen3 as sg_qwen3
    from sglang.srt.models import qwen3_moe as sg_qwen3_moe

    from sglang_fairkv.attention.capabilities import model_problem
    from sglang_fairkv.model import ARCHITECTURES
    from sglang_fairkv.model.qwen3_moe import Qwen3MoeForCausalLM
    from sglang_fairkv.serving.launcher import UsageError, parse_launch

    def folder(name, arch, **kw):
        d = tmp_path / name
        d.mkdir()
        cfg = {"architectures": [arch], "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 256,
               "num_hidden_layers": 2, "max_position_embeddings": 4096, "vocab_size": 512, **kw}
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    gemma = folder("gemma", "GemmaForCausalLM")
    with pytest.raises(UsageError) as e:
        parse_launch(["--model-path", gemma, "--kv-compress", "adakv", "--tp-size", "2"], on_cpu=True)
    msg = str(e.value)
    assert "GemmaForCausalLM has no FairKV model class" in msg
    assert all(a in msg for a in ARCHITECTURES) and "Qwen3MoeForCausalLM" in msg and "Qwen3ForCausalLM" in msg
    moe = parse_launch(["--model-path", folder("moe", "Qwen3MoeForCausalLM"), "--kv-compress", "adakv"], on_cpu=True)
    plan = json.loads(moe.placement_json)
    assert plan["tp"] == 1 and plan["strategy"] == "sha"
    assert any("Qwen3MoeForCausalLM at TP 1: the FairKV model class" in n for n in moe.notes), moe.notes
    dense = parse_launch(["--model-path", folder("dense", "Qwen3ForCausalLM"), "--kv-compress", "adakv"], on_cpu=True)
    assert dense.placement_json is None
    # the backend's start-up check, on SGLang's real classes (not instantiated: only the class matters)
    stock_moe = object.__new__(sg_qwen3_moe.Qwen3MoeForCausalLM)
    assert "writes K/V into a dense cache itself on cuda" in model_problem(stock_moe, "cuda")
    assert model_problem(stock_moe, "cpu") is None  # SGLang takes that path on CUDA / ROCm only
    assert model_problem(object.__new__(Qwen3MoeForCausalLM), "cuda") is None  # ours
    assert model_problem(object.__new__(sg_qwen3.Qwen3ForCausalLM), "cuda") is None


def test_fp8_kv_dtype_is_the_pools_not_sglangs(smollm2_path):
    """``--kv-cache-dtype fp8_e4m3 | fp8_e5m2`` with the fairkv backend: taken by the ragged pool
    (FAIRKV_KV_DTYPE via the launch config), removed from SGLang's argv (SGLang sizes the bytes in the
    model dtype and builds nothing in fp8), said in a note; without fairkv it is SGLang's flag."""
    from sglang_fairkv.serving.launcher import parse_launch

    base = ["--model-path", str(smollm2_path)]
    for dt in ("fp8_e4m3", "fp8_e5m2"):
        for extra in (["--kv-compress", "adakv"], ["--kv-compress", "none"], ["--tp-size", "2", "--kv-compress", "snapkv"]):
            lc = parse_launch([*base, *extra, "--kv-cache-dtype", dt], on_cpu=True)
            assert lc.kv_store_dtype == dt and "--kv-cache-dtype" not in lc.sglang_argv
            assert any(n.startswith(f"--kv-cache-dtype {dt}: the ragged pool stores") for n in lc.notes), lc.notes
        lc = parse_launch([*base, "--kv-compress", "adakv", f"--kv-cache-dtype={dt}"], on_cpu=True)
        assert lc.kv_store_dtype == dt and not any(a.startswith("--kv-cache-dtype") for a in lc.sglang_argv)
    stock = parse_launch([*base, "--kv-cache-dtype", "fp8_e4m3"], on_cpu=False)
    assert stock.kv_store_dtype is None and "fp8_e4m3" in stock.sglang_argv


def test_replan_flags_reach_the_schedulers(smollm2_path):
    """``--fairkv-auto-replan`` (gain, interval, samples) and the head slots it reserves by default (twice the
    start plan's most heads on a rank, at most the model's KV heads) travel in the launch config; an explicit
    ``--fairkv-replan-head-slots`` wins."""
    from sglang_fairkv.serving.launcher import parse_launch

    base = ["--model-path", str(smollm2_path), "--tp-size", "2", "--kv-compress", "adakv"]
    lc = parse_launch([*base, "--fairkv-auto-replan", "1.2", "--fairkv-auto-replan-interval", "30"], on_cpu=True)
    assert lc.auto_replan == (1.2, 30.0, 64) and lc.replan_head_slots == 3  # sha 2 + 1: min(3, 2 * 2)
    assert any(n.startswith("--fairkv-auto-replan 1.2:") for n in lc.notes), lc.notes
    lc = parse_launch([*base, "--fairkv-replan-head-slots", "3"], on_cpu=True)
    assert lc.auto_replan is None and lc.replan_head_slots == 3
    assert any("--fairkv-replan-head-slots 3:" in n for n in lc.notes)
    lc = parse_launch(base, on_cpu=True)
    assert lc.auto_replan is None and lc.replan_head_slots is None
