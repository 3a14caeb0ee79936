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
    (["--kv-compress", "adakv"], "--kv-compress adakv needs --kv-budget N or --kv-compress-ratio R"),
    (["--kv-compress", "snapkv", "--kv-budget", "0"], "--kv-budget must be >= 1 token per head, got 0"),
    (["--kv-compress", "adakv", "--kv-budget", "8", "--kv-compress-ratio", "0.5"],
     "give --kv-budget or --kv-compress-ratio, not both"),
    (["--kv-budget", "64"], "--kv-budget need --kv-compress"),
    (["--kv-compress", "snapkv", "--kv-budget", "64", "--kv-pool-kernel", "4"], "positive odd number"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--kv-alpha", "2"], "--kv-alpha must be in [0, 1]"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--enable-mixed-chunk"],
     "cannot be used with a compressed KV cache (--kv-compress): --enable-mixed-chunk"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--page-size", "16"], "--page-size > 1"),
    (["--kv-compress", "none", "--cuda-graph-backend-decode", "full"], "--cuda-graph-backend-decode full"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--tp-size", "2"], "a layer's budget spans ranks"),
    (["--kv-compress", "adakv", "--kv-budget", "64", "--attention-backend", "torch_native"],
     "--kv-compress needs --attention-backend fairkv, got torch_native"),
    (["--kv-compress", "headkv"], "--kv-compress headkv needs --kv-head-budgets FILE"),
])
def test_kv_compress_flag_errors(smollm2_path, args, needle):
    """Validated before anything starts (plan_launch): the message names the offending flag/value."""
    from sglang_fairkv.launch_server import UsageError, plan_launch

    with pytest.raises(UsageError) as e:
        plan_launch(["--model-path", str(smollm2_path), *args], on_cpu=True)
    assert needle in str(e.value)


def test_kv_head_budgets_checked_against_model(smollm2_path, tmp_path):
    from sglang_fairkv.launch_server import UsageError, plan_launch

    bad = tmp_path / "b.json"
    bad.write_text('{"head_budgets": [[64, 64, 64]]}')  # one layer; SmolLM2 has 30
    with pytest.raises(UsageError, match=r"--kv-head-budgets .*b.json: head_budgets must be a \[30\]\[3\]"):
        plan_launch(["--model-path", str(smollm2_path), "--kv-compress", "headkv",
                     "--kv-head-budgets", str(bad)], on_cpu=True)
    good = tmp_path / "g.json"
    good.write_text('{"head_budgets": %s}' % ([[64, 32, 128]] * 30))
    plan = plan_launch(["--model-path", str(smollm2_path), "--kv-compress", "headkv",
                        "--kv-head-budgets", str(good)], on_cpu=True)
    assert plan.kv_compress_json is not None and "headkv" in plan.kv_compress_json
    argv = plan.sglang_argv
    assert argv[argv.index("--attention-backend") + 1] == "fairkv"
    assert "--disable-radix-cache" in argv and "--disable-overlap-schedule" in argv
    assert "--kv-compress" not in argv and "--kv-head-budgets" not in argv  # ours never reach SGLang
