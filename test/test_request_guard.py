"""The request guards without a server: prompt checks, and the scheduler-intake hook failing one
request alone (the end-to-end fuzz tests are in test_server_e2e, test_fairkv_server, test_tp_fairkv)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_fairkv.serving.request_guard import (BadRequest, handle_generate_hook, prompt_problem,
                                         run_batch_hook, tokenized_object_hook, validate_request_hook)


@pytest.mark.parametrize("ids,needle", [
    ([], "input_ids: the prompt is empty"),
    (None, "input_ids: the prompt is empty"),
    ([5, 100], "input_ids[1] = 100 is outside the vocabulary: token ids must be in [0, 100)"),
    ([-1], "input_ids[0] = -1 is outside"),
    ([3, 2.5], "input_ids[1]: token ids must be integers, got float 2.5"),
    ([3, "a"], "input_ids[1]: token ids must be integers, got str 'a'"),
    ([True, 3], "input_ids[0]: token ids must be integers, got bool True"),
])
def test_prompt_problem_names_the_field_and_position(ids, needle):
    assert needle in prompt_problem(ids, 100, field="input_ids")


def test_prompt_problem_accepts_good_prompts_and_placeholders():
    assert prompt_problem([0, 5, 99], 100, field="input_ids") is None
    assert prompt_problem(list(range(100)) * 1000, 100, field="text") is None
    assert prompt_problem([], 100, field="input_ids", allow_empty=True) is None  # multimodal placeholder


def _generate_obj(**kw):
    from sglang.srt.managers.io_struct import GenerateReqInput

    return GenerateReqInput(**{"sampling_params": {"max_new_tokens": 2}, **kw})


def test_validate_hook_rejects_before_sglang_and_passes_good_requests_on():
    tm = SimpleNamespace(model_config=SimpleNamespace(vocab_size=50))
    calls = []

    def original(self, obj, input_ids):
        calls.append(input_ids)

    with pytest.raises(BadRequest, match=r"text: the prompt is empty"):
        validate_request_hook(original, tm, _generate_obj(text=""), [])
    with pytest.raises(BadRequest, match=r"input_ids\[0\] = 77"):
        validate_request_hook(original, tm, _generate_obj(input_ids=[77]), [77])
    assert calls == []
    validate_request_hook(original, tm, _generate_obj(input_ids=[1, 2]), [1, 2])
    assert calls == [[1, 2]]
    assert issubclass(BadRequest, ValueError)  # SGLang's HTTP layer answers ValueError with 400


def test_tokenized_object_hook_turns_type_errors_into_400():
    def original(self, obj):
        return 0.5 < "hot"  # what SamplingParams.verify does with a string temperature

    with pytest.raises(BadRequest, match="sampling_params: invalid value"):
        tokenized_object_hook(original, None, None)


def test_intake_failure_aborts_that_request_and_keeps_the_queue():
    sent = []
    other = SimpleNamespace(rid="ok")
    sched = SimpleNamespace(waiting_queue=[other], send_abort_output=lambda req, recv: sent.append((req, recv)))
    recv = SimpleNamespace(rid="bad-1")

    def original(self, req):
        self.waiting_queue.append(SimpleNamespace(rid=req.rid))  # queued, then failed
        raise IndexError("boom")

    assert handle_generate_hook(original, sched, recv) is None
    assert [r.rid for r in sched.waiting_queue] == ["ok"]
    (abort, back), = sent
    assert abort.rid == "bad-1" and back is recv
    assert abort.finished_reason["status_code"] == 400 and "IndexError: boom" in abort.finished_reason["message"]


def test_forward_failure_names_the_batch_and_still_raises(caplog):
    batch = SimpleNamespace(reqs=[SimpleNamespace(rid="a"), SimpleNamespace(rid="b")],
                            forward_mode=SimpleNamespace(name="DECODE"))

    def original(self, b):
        raise RuntimeError("device assert")

    with pytest.raises(RuntimeError, match="device assert"):
        run_batch_hook(original, None, batch)
    assert "rids=['a', 'b']" in caplog.text and "DECODE" in caplog.text


def test_request_fields_problem_found_by_the_sweep():
    from sglang_fairkv.serving.request_guard import request_fields_problem

    def obj(**kw):
        base = dict(top_logprobs_num=None, logprob_start_len=None, sampling_params={"max_new_tokens": 2})
        return SimpleNamespace(**{**base, **kw})

    assert request_fields_problem(obj(), 100) is None
    assert request_fields_problem(obj(top_logprobs_num=100, logprob_start_len=-1), 100) is None
    assert "top_logprobs_num" in request_fields_problem(obj(top_logprobs_num=101), 100)
    assert "top_logprobs_num" in request_fields_problem(obj(top_logprobs_num=-1), 100)
    assert "logprob_start_len" in request_fields_problem(obj(logprob_start_len=-5), 100)
    assert "one object per prompt" in request_fields_problem(obj(sampling_params=[{}]), 100)
    # past the vocabulary: accepted, as stock SGLang accepts it (never produced); ill-typed: refused
    assert request_fields_problem(obj(sampling_params={"stop_token_ids": [3, 100, 10 ** 9]}), 100) is None
    assert "stop_token_ids[1]: token ids must be integers" in request_fields_problem(
        obj(sampling_params={"stop_token_ids": [3, "x"]}), 100)
    assert "must be a list" in request_fields_problem(obj(sampling_params={"stop_token_ids": 5}), 100)
    # ... but with min_new_tokens SGLang's penalizer indexes the logits by them: a 400 there
    assert "outside the vocabulary" in request_fields_problem(
        obj(sampling_params={"stop_token_ids": [3, 100], "min_new_tokens": 2}), 100)


@pytest.mark.parametrize("kw,needle", [
    (dict(text="Hi", sampling_params=[{"max_new_tokens": 2}] * 2), "a list of 2 for a single prompt"),
    (dict(text=["a", "b", "c"], sampling_params=[{"max_new_tokens": 2}]), "1 items for a batch of 3"),
    (dict(input_embeds=[], sampling_params={"max_new_tokens": 2}), "malformed request (IndexError"),
    (dict(text="Hi", sampling_params={"n": 0}), "sampling_params.n must be an integer >= 1, got 0"),
    (dict(text=["a", "b"], sampling_params=[{"n": 2}, "x"]), "sampling_params[1] must be an object"),
])
def test_normalize_hook_refuses_batches_that_do_not_add_up(kw, needle):
    from sglang.srt.managers.io_struct import GenerateReqInput

    from sglang_fairkv.serving.request_guard import normalize_hook

    with pytest.raises(BadRequest) as e:
        normalize_hook(GenerateReqInput.normalize_batch_and_arguments, GenerateReqInput(**kw))
    assert needle in str(e.value)
    ok = GenerateReqInput(text=["a", "b"], sampling_params=[{"n": 2}, {"n": 2}])
    normalize_hook(GenerateReqInput.normalize_batch_and_arguments, ok)
    assert ok.batch_size == 2 and ok.parallel_sample_num == 2


def test_embeds_problem_checks_width():
    from sglang_fairkv.serving.request_guard import embeds_problem

    assert embeds_problem([[0.1] * 4, [0.2] * 4], 4) is None
    assert "empty" in embeds_problem([], 4)
    assert "input_embeds[1] must have the model's hidden size 4, got 3" in embeds_problem([[0.0] * 4, [0.0] * 3], 4)
