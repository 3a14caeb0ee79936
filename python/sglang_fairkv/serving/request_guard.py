"""One bad request must never take the server down (SGLang 0.5.23 adapters, CPU and CUDA alike).

Stock SGLang 0.5.23 lets some malformed requests through its tokenizer manager into the scheduler,
where they raise inside the event loop, and a scheduler exception ends every scheduler and the HTTP
server with them (``run_scheduler_process`` sends SIGQUIT to its parent). Seen on CPU, stock and fairkv
alike; on a GPU an out-of-range index is a device assert that ends the process too:

* an empty prompt (``"text": ""``, ``"input_ids": []`` in a batch, ...): a 0-token extend fails in rotary;
* a token id outside ``[0, vocab)`` in ``input_ids`` (any request form): the embedding lookup fails;
* ``top_logprobs_num`` (``/v1/*``: ``logprobs`` / ``top_logprobs``) past the vocabulary: ``topk`` fails.

A sweep of every endpoint with malformed fields (``test/helpers/malformed.py``) also found 500s
(``sampling_params`` lists that do not match the prompts, an empty ``input_embeds``) and nonsense
accepted silently (``n = 0``, ``logprob_start_len < -1``, ``stop_token_ids`` past the vocabulary). Where
stock SGLang accepts a request and nothing fails, so do we: ``stop_token_ids`` past the vocabulary are
accepted (such a token can never be produced; a client sending one stop list to several models must
work), only ill-typed ones (which fail in ``SamplingParams``) are refused.

The guards, each a ``HookRegistry`` hook:

1. **Launcher process** (the tokenizer manager and HTTP server run there; the hook list is
   ``sglang_fairkv.serving.hooks.launcher_hooks``). A :class:`BadRequest` (a ``ValueError``) is answered by SGLang's HTTP layer with HTTP 400,
   an OpenAI-style error body on ``/v1/*``, the message naming the field.
   * AROUND ``TokenizerManager._validate_one_request`` (once per request and batch item, after text
     and chat templates are tokenized): prompt and field checks (:func:`prompt_problem`,
     :func:`request_fields_problem`).
   * AROUND ``GenerateReqInput.normalize_batch_and_arguments``: batch shapes that do not add up, ``n``.
   * AROUND ``TokenizerManager._create_tokenized_object``: ill-typed ``sampling_params`` values
     (``TypeError`` ...) become a 400 instead of a 500.
   * AROUND ``http_server.serve_generate_request``: a streamed ``/generate`` request is validated
     before HTTP 200 (SGLang's OpenAI endpoints already do so), so its errors are 400s too.
2. **Scheduler, request intake** (every scheduler process, ``sglang_fairkv.serving.hooks.scheduler_hooks``): AROUND
   ``Scheduler.handle_generate_request``: an exception while a request is turned into a scheduler
   ``Req`` (nothing allocated yet) fails that request alone -- logged with its rid, answered with an
   abort carrying the message -- and the scheduler keeps serving. Every TP rank receives the same
   request and takes the same path.
3. **Scheduler, forward** (same): AROUND ``Scheduler.run_batch``: an exception inside a forward leaves
   the batch's KV state undefined, so SGLang's behaviour (the server stops) is kept, but the log first
   names the request ids of the batch (``sglang-fairkv: scheduler exception in run_batch ... rids=[...]``)
   so the request that triggered it can be found.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

logger = logging.getLogger(__name__)

_TM = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
T_VALIDATE = f"{_TM}._validate_one_request"
T_TOKENIZED_OBJECT = f"{_TM}._create_tokenized_object"
T_NORMALIZE = "sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments"
T_SERVE_GENERATE = "sglang.srt.entrypoints.http_server.serve_generate_request"
T_HANDLE_GENERATE = "sglang.srt.managers.scheduler.Scheduler.handle_generate_request"
T_RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"


class BadRequest(ValueError):
    """A request the scheduler cannot process; SGLang answers a ``ValueError`` with HTTP 400."""


def _is_int(x) -> bool:
    """A JSON integer (``bool`` is an ``int`` subclass in Python, not a token id or a count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def prompt_problem(input_ids: Sequence[Any] | None, vocab_size: int, *, field: str,
                   allow_empty: bool = False) -> str | None:
    """Why a prompt's token ids cannot be served, or None.

    ``input_ids``: the prompt after tokenization (list of ints); ``field``: the request field the ids
    came from, named in the message; ``allow_empty``: the ids are placeholders (multimodal or
    ``input_embeds`` requests, where the ids are filled in elsewhere).
    """
    if input_ids is None:
        return None if allow_empty else f"{field}: the prompt is empty (0 tokens)"
    n = len(input_ids)
    if n == 0:
        return None if allow_empty else f"{field}: the prompt is empty (0 tokens); give at least one token"
    try:  # min / max run in C: a 128k-token prompt costs well under a millisecond
        lo, hi = min(input_ids), max(input_ids)
    except TypeError:
        lo = hi = None
    if not (_is_int(lo) and _is_int(hi)):
        pos = next(i for i, t in enumerate(input_ids) if not _is_int(t))
        return (f"{field}[{pos}]: token ids must be integers, got "
                f"{type(input_ids[pos]).__name__} {input_ids[pos]!r}")
    if lo < 0 or hi >= vocab_size:
        pos = next(i for i, t in enumerate(input_ids) if not 0 <= t < vocab_size)
        return (f"{field}[{pos}] = {input_ids[pos]} is outside the vocabulary: token ids must be in "
                f"[0, {vocab_size})")
    return None


def request_fields_problem(obj, vocab_size: int) -> str | None:
    """Why one (already split) generate request's other fields cannot be served, or None.

    Found by the fuzz sweep (test/helpers/malformed.py): a ``top_logprobs_num`` past the vocabulary
    (``/generate`` or an OpenAI ``logprobs`` / ``top_logprobs``) is a ``topk`` past the logits width
    inside the forward and stops the server; the others are nonsense SGLang silently accepted."""
    top = obj.top_logprobs_num
    if top is not None and not (_is_int(top) and 0 <= top <= vocab_size):
        return f"top_logprobs_num (logprobs / top_logprobs) must be an integer in [0, {vocab_size}], got {top!r}"
    start = obj.logprob_start_len
    if start is not None and not (_is_int(start) and start >= -1):
        return f"logprob_start_len must be an integer >= -1, got {start!r}"
    sp = obj.sampling_params
    if sp is not None and not isinstance(sp, dict):
        return ("sampling_params must be one object per prompt (a list only for a batch, one object per "
                f"prompt), got {type(sp).__name__}")
    stop_ids = (sp or {}).get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            return f"sampling_params.stop_token_ids must be a list of token ids, got {type(stop_ids).__name__}"
        bad = next((i for i, t in enumerate(stop_ids) if not _is_int(t)), None)
        if bad is not None:  # ids past the vocabulary are fine (never produced), as in stock SGLang
            return (f"sampling_params.stop_token_ids[{bad}]: token ids must be integers, got "
                    f"{type(stop_ids[bad]).__name__} {stop_ids[bad]!r}")
        if (sp or {}).get("min_new_tokens"):  # SGLang's min_new_tokens penalizer indexes the logits by them
            problem = prompt_problem(stop_ids, vocab_size, field="sampling_params.stop_token_ids (with "
                                     "min_new_tokens, which masks them in the logits)", allow_empty=True)
            if problem is not None:
                return problem
    return None


def embeds_problem(embeds, hidden_size: int) -> str | None:
    """``input_embeds`` (used when radix caching is off, as with ``--kv-compress``) must be a non-empty
    ``[tokens][hidden_size]`` list: rows of another width fail inside the first layer norm, which stops
    the server (found by the fuzz test on a compressed server)."""
    if not isinstance(embeds, list) or len(embeds) == 0:
        return "input_embeds: the prompt is empty (0 embeddings)"
    for i, row in enumerate(embeds):
        if not isinstance(row, list) or len(row) != hidden_size:
            got = len(row) if isinstance(row, list) else type(row).__name__
            return f"input_embeds[{i}] must have the model's hidden size {hidden_size}, got {got}"
    return None


def _n_problem(sp) -> str | None:
    """``sampling_params.n`` (parallel samples per prompt) must be an integer >= 1."""
    for one in (sp if isinstance(sp, list) else [sp]):
        if isinstance(one, dict) and "n" in one:
            n = one["n"]
            if not (_is_int(n) and n >= 1):
                return f"sampling_params.n must be an integer >= 1, got {n!r}"
    return None


def normalize_hook(original, self, *args, **kwargs):
    """AROUND ``GenerateReqInput.normalize_batch_and_arguments``: a request whose batch shape does not
    add up (``sampling_params`` a list for one prompt or of another length than the batch, an empty
    ``input_embeds``) or whose ``n`` is not >= 1 gets a 400 instead of an ``IndexError`` -> 500 (or a
    silently dropped prompt)."""
    problem = _n_problem(self.sampling_params)
    if problem is not None:
        raise BadRequest(problem)
    sp_given = self.sampling_params
    if isinstance(sp_given, list):
        bad = next((i for i, one in enumerate(sp_given) if not isinstance(one, dict)), None)
        if bad is not None:
            raise BadRequest(f"sampling_params[{bad}] must be an object, got {type(sp_given[bad]).__name__}")
    try:
        out = original(self, *args, **kwargs)
    except (IndexError, TypeError, KeyError, AttributeError, AssertionError) as e:
        raise BadRequest(f"malformed request ({type(e).__name__}: {e})") from e
    if isinstance(sp_given, list):
        if self.is_single:
            raise BadRequest(f"sampling_params is a list of {len(sp_given)} for a single prompt: give one "
                             "object, or a list only for a batch (one per prompt)")
        if len(sp_given) != self.batch_size:
            raise BadRequest(f"sampling_params has {len(sp_given)} items for a batch of {self.batch_size} "
                             "prompts (one per prompt)")
    return out


def _prompt_field(obj) -> str:
    """The request field a prompt came from (``input_ids`` when the client sent ids, else ``text``)."""
    return "input_ids" if getattr(obj, "input_ids", None) is not None else "text"


def validate_request_hook(original, self, obj, input_ids, *args, **kwargs):
    """AROUND ``TokenizerManager._validate_one_request(obj, input_ids)``: our checks, then SGLang's."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    if isinstance(obj, GenerateReqInput):
        vocab = int(self.model_config.vocab_size)
        placeholder = obj.input_embeds is not None or bool(obj.contains_mm_input())
        problem = prompt_problem(input_ids, vocab, field=_prompt_field(obj), allow_empty=placeholder)
        if problem is None and obj.input_embeds is not None:
            problem = embeds_problem(obj.input_embeds, int(self.model_config.hidden_size))
        if problem is None:
            problem = request_fields_problem(obj, vocab)
        if problem is not None:
            raise BadRequest(problem)
    return original(self, obj, input_ids, *args, **kwargs)


def tokenized_object_hook(original, self, obj, *args, **kwargs):
    """AROUND ``TokenizerManager._create_tokenized_object``: ill-typed request fields -> HTTP 400."""
    try:
        return original(self, obj, *args, **kwargs)
    except (TypeError, KeyError, AttributeError, OverflowError) as e:
        raise BadRequest(f"sampling_params: invalid value ({type(e).__name__}: {e})") from e


async def serve_generate_hook(original, obj, request, *args, **kwargs):
    """AROUND ``http_server.serve_generate_request``: a streamed ``/generate`` request is validated
    before HTTP 200 is sent, as SGLang's OpenAI endpoints already do (they start the generator first),
    so a bad streamed request gets a 400 too instead of a 200 carrying an error event."""
    if not getattr(obj, "stream", False):
        return await original(obj, request, *args, **kwargs)
    from sglang.srt.entrypoints import http_server as hs

    if hs.envs.SGLANG_ENABLE_REQUEST_HEADER_OVERRIDES.get():
        hs.apply_header_overrides(obj, request.headers)
    tm = hs._global_state.tokenizer_manager
    gen = tm.generate_request(obj, request)
    try:
        first = await gen.__anext__()
    except ValueError as e:
        return hs._create_error_response(e)
    except StopAsyncIteration:
        first = None

    async def stream_results():
        # SGLang's own stream body (http_server.serve_generate_request), started one item early
        try:
            if first is not None:
                yield b"data: " + hs.dumps_json(first) + b"\n\n"
            async for out in gen:
                yield b"data: " + hs.dumps_json(out) + b"\n\n"
        except ValueError as e:
            if request is not None and await request.is_disconnected():
                logger.info("[http_server] Client disconnected: %s", e)
                return
            err = {"error": {"message": str(e), "type": "invalid_request_error",
                             "code": getattr(e, "status_code", 400), "retryable": False}}
            yield b"data: " + hs.dumps_json(err) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return hs.StreamingResponse(stream_results(), media_type="text/event-stream",
                                background=tm.create_abort_task(obj))


def handle_generate_hook(original, self, recv_req, *args, **kwargs):
    """AROUND ``Scheduler.handle_generate_request``: a request that cannot be taken in fails alone."""
    try:
        return original(self, recv_req, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- any intake failure is this request's, not the server's
        rid = getattr(recv_req, "rid", None)
        logger.exception("sglang-fairkv: request rid=%s failed at scheduler intake; it is aborted, the "
                         "server keeps serving", rid)
        _drop_queued(self, rid)
        from http import HTTPStatus

        from sglang.srt.managers.io_struct import AbortReq

        self.send_abort_output(AbortReq(rid=rid, finished_reason={
            "type": "abort", "status_code": HTTPStatus.BAD_REQUEST,
            "message": f"request rejected by the scheduler: {type(e).__name__}: {e}"}), recv_req)
        return None


def _drop_queued(scheduler, rid) -> None:
    """Remove a half-admitted request from the waiting queue (intake may fail after queueing it)."""
    queue = getattr(scheduler, "waiting_queue", None)
    if isinstance(queue, list):
        queue[:] = [r for r in queue if getattr(r, "rid", None) != rid]


def run_batch_hook(original, self, batch, *args, **kwargs):
    """AROUND ``Scheduler.run_batch``: name the batch's requests in the log before SGLang stops."""
    try:
        return original(self, batch, *args, **kwargs)
    except Exception:
        rids = [getattr(r, "rid", None) for r in (getattr(batch, "reqs", None) or [])]
        mode = getattr(getattr(batch, "forward_mode", None), "name", "?")
        logger.error("sglang-fairkv: scheduler exception in run_batch (%s, %d requests) rids=%s; the "
                     "batch's KV state is undefined, so the server stops (README: Reliability)",
                     mode, len(rids), rids)
        raise
