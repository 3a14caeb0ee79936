"""What a newcomer types first works or says why: TP defaults that start, the frontend's chat template,
budget and window rules, the tool-call parser, SGLang's own flag errors as one line, and why a long
prompt is refused by a compressed server."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from helpers.server import run_launcher
from sglang_fairkv.placement.runtime import RankPlan
from sglang_fairkv.placement.schema import plan_from_json
from sglang_fairkv.placement.stats import load_stats
from sglang_fairkv.serving.launcher import EMBEDDED_TOOL_CALL_PARSER, UsageError, parse_launch

CALIBRATION = "benchmark/calibration/smollm2-adakv-r0.75.json"  # AdaKV, ratio 0.75, SmolLM2's shape


def _launch(smollm2_path, *args):
    return parse_launch(["--model-path", str(smollm2_path), *args], on_cpu=True)


def _heads(launch) -> list[list[int]]:
    plan = plan_from_json(json.loads(launch.placement_json))
    return [RankPlan(plan, r, 9).heads_per_layer() for r in range(plan.tp)]


def test_tp2_with_only_a_method_starts_on_the_default_sha_split(smollm2_path):
    """``--tp-size 2 --kv-compress adakv``: 3 KV heads split 2 + 1 (contiguous, as SGLang's padding), the
    default ratio, and notes that name both."""
    launch = _launch(smollm2_path, "--tp-size", "2", "--kv-compress", "adakv")
    assert json.loads(launch.kv_compress_json)["ratio"] == 0.5
    heads = _heads(launch)
    assert all(h == 2 for h in heads[0]) and all(h == 1 for h in heads[1])
    note = next(n for n in launch.notes if n.startswith("--fairkv-plan sha"))
    assert "KV heads per rank in every layer [2, 1]" in note and "the default at --tp-size > 1" in note
    assert any(n.startswith("--kv-compress-ratio 0.5: the default") for n in launch.notes)
    assert not launch.warnings


def test_assign_without_stats_balances_head_counts_over_layers(smollm2_path):
    launch = _launch(smollm2_path, "--tp-size", "2", "--fairkv-plan", "assign")
    heads = _heads(launch)
    assert sorted(set(h for rank in heads for h in rank)) == [1, 2]  # every layer 2 + 1 ...
    assert [sum(rank) for rank in heads] == [45, 45]                 # ... alternating: 45 heads each
    assert "summed over the 30 layers [45, 45]" in launch.notes[-1]
    assert not plan_from_json(json.loads(launch.placement_json)).source  # no measured stats to drift from


def test_stats_of_another_ratio_or_method_are_warned_another_shape_refused(smollm2_path, tmp_path):
    args = ["--tp-size", "2", "--fairkv-plan", "fairkv", "--fairkv-stats", CALIBRATION]
    ok = _launch(smollm2_path, "--kv-compress", "adakv", "--kv-compress-ratio", "0.75", *args)
    assert not ok.warnings
    other_ratio = _launch(smollm2_path, "--kv-compress", "adakv", "--kv-compress-ratio", "0.5", *args)
    assert len(other_ratio.warnings) == 1
    assert "measured at --kv-compress-ratio 0.75, this server runs 0.5" in other_ratio.warnings[0]
    other_method = _launch(smollm2_path, "--kv-compress", "snapkv", "--kv-compress-ratio", "0.75", *args)
    assert "measured with adakv, this server runs snapkv" in other_method.warnings[0]
    budget = _launch(smollm2_path, "--kv-compress", "adakv", "--kv-budget", "100", *args)
    assert "budget of 256.0 tokens per head, this server keeps 100" in budget.warnings[0]
    unknown = load_stats(CALIBRATION)
    replace(unknown, extra={k: v for k, v in unknown.extra.items() if k != "ratio"}).save(tmp_path / "s.json")
    silent = _launch(smollm2_path, "--kv-compress", "adakv", "--kv-compress-ratio", "0.75", "--tp-size", "2",
                     "--fairkv-plan", "fairkv", "--fairkv-stats", str(tmp_path / "s.json"))
    assert "do not record the compression ratio" in silent.warnings[0]
    full = load_stats(CALIBRATION)
    replace(full, num_layers=2, kv_len_mean=full.kv_len_mean[:2], kv_len_std=full.kv_len_std[:2],
            extra={}).save(tmp_path / "shape.json")
    with pytest.raises(UsageError, match="describes 2 layers x 3 KV heads"):
        _launch(smollm2_path, "--kv-compress", "adakv", "--tp-size", "2", "--fairkv-plan", "fairkv",
                "--fairkv-stats", str(tmp_path / "shape.json"))


def test_budget_below_the_window_is_warned_with_what_it_means(smollm2_path):
    launch = _launch(smollm2_path, "--kv-compress", "snapkv", "--kv-budget", "1")
    assert len(launch.warnings) == 1
    w = launch.warnings[0]
    assert "--kv-budget 1 is below the observation window (--kv-window 64)" in w
    assert "keeps only its last 1 tokens per head" in w
    w2 = _launch(smollm2_path, "--kv-compress", "snapkv", "--kv-budget", "256", "--kv-window", "300").warnings
    assert "--kv-budget 256 is below the observation window (--kv-window 300)" in w2[0]
    assert "no prompt will be compressed" in _launch(smollm2_path, "--kv-compress", "snapkv", "--kv-budget",
                                                     "9000").warnings[0]
    assert not _launch(smollm2_path, "--kv-compress", "snapkv", "--kv-budget", "64").warnings


def test_warnings_are_printed_at_start(smollm2_path, capsys, monkeypatch):
    from sglang_fairkv.serving.launcher import export_settings

    # export_settings hands the settings on through this process's environment: restore it afterwards
    for name in ("FAIRKV_KV_COMPRESS", "FAIRKV_PLAN", "SGLANG_EXTERNAL_MODEL_PACKAGE"):
        monkeypatch.delenv(name, raising=False)

    export_settings(_launch(smollm2_path, "--kv-compress", "snapkv", "--kv-budget", "1"))
    err = capsys.readouterr().err
    assert "sglang-fairkv: warning: --kv-budget 1 is below the observation window" in err


def test_embedded_model_gets_a_tool_call_parser_that_reads_its_json_calls():
    launch = parse_launch([], on_cpu=True)
    argv = launch.sglang_argv
    assert argv[argv.index("--tool-call-parser") + 1] == EMBEDDED_TOOL_CALL_PARSER
    assert parse_launch(["--tool-call-parser", "qwen25"], on_cpu=True).sglang_argv.count("--tool-call-parser") == 1
    # SGLang's own parser of that name turns the JSON call the model writes into a tool call
    from sglang.srt.entrypoints.openai.protocol import Function, Tool
    from sglang.srt.function_call.function_call_parser import FunctionCallParser

    tools = [Tool(type="function", function=Function(name="get_weather", parameters={
        "type": "object", "properties": {"city": {"type": "string"}}}))]
    parser = FunctionCallParser(tools, EMBEDDED_TOOL_CALL_PARSER)
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parser.has_tool_call(text)
    normal, calls = parser.parse_non_stream(text)
    assert [c.name for c in calls] == ["get_weather"] and json.loads(calls[0].parameters) == {"city": "Paris"}


def test_smollm2_instruct_paths_get_chatml_in_the_frontend():
    """The matcher the install's ``.pth`` hook registers in SGLang's frontend (in this very process: the
    test runs in the project's venv) and its rule."""
    from sglang.lang.chat_template import get_chat_template_by_model_path
    from sglang_fairkv_patches.frontend_chat_template import match_smollm_instruct

    assert get_chat_template_by_model_path("/x/models/SmolLM2-135M-Instruct").name == "chatml"
    assert get_chat_template_by_model_path("HuggingFaceTB/SmolLM2-1.7B-Instruct").name == "chatml"
    assert get_chat_template_by_model_path("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3-instruct"
    assert match_smollm_instruct("HuggingFaceTB/SmolLM2-135M") is None  # a base model has no template


@pytest.mark.server
def test_sglang_flag_errors_are_one_line_exit_2():
    rc, out, alive = run_launcher(["--context-length", "100000"])
    assert rc == 2 and not alive, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    line = [x for x in out.splitlines() if "launch_server: error:" in x]
    assert line and "context_length (100000) is greater than the derived context_length (8192)" in line[0], out[-2000:]


def test_uneven_placements_price_each_rank():
    """A 2 + 1 sha split gives the rank with two heads twice the rows per token (the ledger prices it)."""
    from sglang_fairkv.placement.runtime import sha_plan

    rp = RankPlan(sha_plan("m", 4, 3, 9, 2), 0, 9)
    assert np.allclose(rp.expected_rows_per_token(), [8.0, 4.0])


def _model_with(tmp_path, smollm2_path, **extra):
    import shutil

    d = tmp_path / "m"
    d.mkdir(parents=True)
    cfg = json.loads((smollm2_path / "config.json").read_text())
    cfg.update(extra)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / f, d / f)
    return d


@pytest.mark.parametrize("extra,needle", [
    ({"attn_logit_softcapping": 50.0}, "attention logit soft-capping (attn_logit_softcapping=50.0)"),
    ({"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"] * 15},
     "sliding-window attention layers (sliding_window=512)"),
])
def test_models_the_backend_does_not_implement_are_refused(tmp_path, smollm2_path, extra, needle):
    model = _model_with(tmp_path, smollm2_path, **extra)
    with pytest.raises(UsageError) as e:
        parse_launch(["--model-path", str(model), "--kv-compress", "adakv"], on_cpu=True)
    assert needle in str(e.value) and "serve it without --kv-compress" in str(e.value)
    parse_launch(["--model-path", str(model)], on_cpu=True)  # stock SGLang serves it as before
    # a Mistral/Qwen2-style sliding_window key alone is full attention in SGLang's classes: accepted
    parse_launch(["--model-path", str(_model_with(tmp_path / "q", smollm2_path, sliding_window=4096)),
                  "--kv-compress", "adakv"], on_cpu=True)


def test_metadata_glue_graph_is_refused(smollm2_path, monkeypatch):
    monkeypatch.setenv("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "1")
    with pytest.raises(UsageError, match="SGLANG_ENABLE_METADATA_GLUE_GRAPH=1"):
        _launch(smollm2_path, "--kv-compress", "adakv")


def test_backend_refuses_a_layer_with_soft_capping_or_a_window():
    """The backend's own guard (a model class that sets them on its attention layers)."""
    from types import SimpleNamespace

    from sglang_fairkv.attention.capabilities import layer_problem

    assert layer_problem(SimpleNamespace(layer_id=3, logit_cap=30.0, sliding_window_size=-1)) == \
        "layer 3 uses attention logit soft-capping (30.0)"
    assert layer_problem(SimpleNamespace(layer_id=1, logit_cap=0.0, sliding_window_size=256)) == \
        "layer 1 uses sliding-window attention (256 tokens)"
    assert layer_problem(SimpleNamespace(layer_id=0, logit_cap=0.0, sliding_window_size=-1)) is None
    assert layer_problem(SimpleNamespace(layer_id=0)) is None
