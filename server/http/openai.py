"""OpenAI-compatible completions over the data plane: `POST /v1/completions` is Generate (the same
step-batched streams as gRPC's, DataPlane.generate), a token is one character.

    GET  /v1/models                 the repository's served models
    GET  /v1/models/{model}
    POST /v1/completions            prompt (str or list), max_tokens, temperature, top_p, n, stop,
                                    seed, logprobs, echo, user; stream: true -> SSE, data: [DONE]
    POST /v1/chat/completions       400 in OpenAI's error shape: a character model has no chat

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="shakespeare", prompt="To be", max_tokens=40, seed=7)

Seeds: choice i of a prompt samples with seed + i, so choice 0 is exactly what gRPC Generate
answers with the same seed and settings. `logprobs` are the model's own distribution (before
temperature and top-p) after each prefix, computed by Predict on the prefixes (one batched call
per few hundred characters).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from ..dataplane import DataPlane, GenChunk, GenerateCall, GenerateSession, PredictCall
from ..errors import InvalidInput, ServingError
from ..generator import STOP_STRING, GenerateParams
from ..logging_setup import request_id_var
from ..telemetry import DrainGate
from .errors import error_body
from .openai_schemas import MAX_CHOICES, CompletionRequest

log = logging.getLogger(__name__)

JSON = "application/json"
NO_CHAT = ("this is a character-level language model: it continues text and has no chat "
           "format; use POST /v1/completions with a prompt")
STREAM_ENDED = ("server is shutting down: stream ended early; retry on another replica")
MIN_LOGPROB = -1e4  # log(0) is not JSON; a probability that underflowed to 0 reads as this


class OpenAIError(ServingError):
    """A 400 that names the request field at fault (OpenAI's `param`)."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type=JSON)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nextchar"}


class _Choice:
    """One prompt x one sample: its Generate session and what it produced."""

    def __init__(self, index: int, prompt: str, session: GenerateSession | None) -> None:
        self.index = index
        self.prompt = prompt
        self.session = session
        self.text = ""
        self.finish_reason = "length"


def router(plane: DataPlane, gate: DrainGate) -> APIRouter:
    r = APIRouter(tags=["OpenAI"])

    @r.get("/v1/models", summary="Served models")
    async def list_models() -> Response:
        return _json({"object": "list", "data": [_model_card(m.name) for m in plane.list_models()
                                                 if m.version]})

    @r.get("/v1/models/{model}", summary="One served model")
    async def get_model(model: str) -> Response:
        return _json(_model_card(plane.model(model).name))

    @r.post("/v1/chat/completions", summary="Not for a character model: 400 saying so")
    async def chat() -> Response:
        raise OpenAIError(NO_CHAT, "messages")

    @r.post("/v1/completions", summary="Text completion (one token = one character)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        bad = body.unsupported()
        if bad is not None:
            raise OpenAIError(f"{bad} is not supported by a character model", bad)
        if body.user:
            log.debug("completion for user %r", body.user[:64])
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise OpenAIError("prompt is empty: send a string or a list of strings", "prompt")
        if len(prompts) * body.n > MAX_CHOICES:
            raise OpenAIError(f"{len(prompts)} prompts x n {body.n} > {MAX_CHOICES} choices in "
                              f"one request", "n")
        model = plane.model(body.model)  # 404 for an unknown name, before any work
        if body.logprobs is not None:
            lim = model.limits
            bound = min(lim.max_top_k, model.artifact.vocab_size)
            if body.logprobs > bound:
                raise OpenAIError(f"logprobs must be between 0 and {bound}", "logprobs")
            longest = max(map(len, prompts)) + (body.max_tokens or 0)
            if longest > lim.max_chars_per_text:
                raise OpenAIError(f"logprobs needs prompt + max_tokens <= max_chars_per_text "
                                  f"{lim.max_chars_per_text} characters", "logprobs")
        stops = ([body.stop] if isinstance(body.stop, str) else list(body.stop or ()))
        choices = _open(plane, body, prompts, stops, request.state.deadline)
        meta = {"id": f"cmpl-{request_id_var.get() or ''}", "object": "text_completion",
                "created": int(time.time()), "model": model.name}
        if body.stream:
            return StreamingResponse(_stream(plane, body, choices, meta, gate),
                                     media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            await asyncio.gather(*(_run(c) for c in choices))
        finally:
            _close(choices)
        out = []
        for c in choices:
            text = c.prompt + c.text if body.echo else c.text
            lp = None
            if body.logprobs is not None:
                lp = await _logprobs(plane, body, c.prompt + c.text,
                                     0 if body.echo else len(c.prompt), request.state.deadline)
            out.append({"text": text, "index": c.index, "logprobs": lp,
                        "finish_reason": c.finish_reason})
        return _json({**meta, "choices": out, "usage": _usage(choices, body.n)})

    return r


def _open(plane: DataPlane, body: CompletionRequest, prompts: list[str], stops: list[str],
          deadline: float | None) -> list[_Choice]:
    """Admits every choice's stream up front, so a bad field or a full server is an HTTP status
    before any byte of an answer; on a failure, the ones already open are closed."""
    choices: list[_Choice] = []
    max_chars = body.max_tokens if body.max_tokens is not None else 16
    try:
        for p_index, prompt in enumerate(prompts):
            for i in range(body.n):
                index = p_index * body.n + i
                if max_chars == 0:
                    choices.append(_Choice(index, prompt, None))
                    continue
                params = GenerateParams(
                    prompt=prompt, max_chars=max_chars, temperature=body.temperature,
                    top_k=body.top_k, top_p=body.top_p,
                    seed=None if body.seed is None else (body.seed + i) % (1 << 63),
                    stop=tuple(stops))
                try:
                    session = plane.generate(GenerateCall(params, body.model, deadline))
                except InvalidInput as e:
                    raise OpenAIError(e.message, _param_of(e.message)) from None
                choices.append(_Choice(index, prompt, session))
    except BaseException:
        _close(choices)
        raise
    return choices


def _param_of(message: str) -> str | None:
    for field, param in (("prompt", "prompt"), ("max_chars", "max_tokens"),
                         ("temperature", "temperature"), ("top_k", "top_k"),
                         ("top_p", "top_p"), ("stop", "stop")):
        if message.startswith(field) or f" {field} " in message.split(":")[0]:
            return param
    return None


def _close(choices: list[_Choice]) -> None:
    for c in choices:
        if c.session is not None:
            c.session.close()


def _finish(c: _Choice, chunk: GenChunk) -> None:
    c.text += chunk.text
    if chunk.stop_reason is not None:
        c.finish_reason = "stop" if chunk.stop_reason == STOP_STRING else "length"


async def _run(c: _Choice) -> None:
    if c.session is None:
        return
    async for chunk in c.session.chunks():
        _finish(c, chunk)


def _usage(choices: list[_Choice], n: int) -> dict[str, int]:
    prompt = sum(len(c.prompt) for c in choices if c.index % n == 0)  # once per prompt
    completion = sum(len(c.text) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _logprobs(plane: DataPlane, body: CompletionRequest, full: str, first: int,
                    deadline: float | None) -> dict[str, Any]:
    """OpenAI's legacy logprobs object for the characters full[first:]: tokens, token_logprobs,
    top_logprobs (k = body.logprobs), text_offset (into the prompt + completion). Character j
    is scored by the distribution after full[:j]; the very first character of a prompt has
    none (None, as OpenAI answers for an echoed prompt's first token)."""
    k = body.logprobs or 0
    m = plane.model(body.model)
    vocab = m.artifact.vocab
    index = {ch: i for i, ch in enumerate(vocab)}
    lim = m.limits
    scored: dict[int, tuple[float, dict[str, float]]] = {}
    group: list[int] = []
    size = 0

    async def flush() -> None:
        answer = await plane.predict(PredictCall(
            texts=[full[:j] for j in group], top_k=max(k, 1), want_probs=True,
            model=body.model, deadline=deadline))
        for j, res in zip(group, answer.results, strict=True):
            probs = res.probs
            assert probs is not None  # want_probs
            target = full[j]
            chosen = float(probs[index[target]]) if target in index else 0.0
            top = {vocab[i]: _log(p) for i, p in zip(res.top_ids[:k].tolist(),
                                                      res.top_probs[:k].tolist(), strict=True)}
            scored[j] = (_log(chosen), top)
        group.clear()

    for j in range(max(first, 1), len(full)):
        if group and (len(group) >= lim.max_texts_per_request
                      or size + j > lim.max_chars_per_request):
            await flush()
            size = 0
        group.append(j)
        size += j
    if group:
        await flush()
    positions = list(range(first, len(full)))
    return {"tokens": [full[j] for j in positions],
            "token_logprobs": [scored[j][0] if j in scored else None for j in positions],
            "top_logprobs": [scored[j][1] if j in scored else None for j in positions],
            "text_offset": positions}


def _log(p: float) -> float:
    return math.log(p) if p > 0 else MIN_LOGPROB


def _sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


async def _stream(plane: DataPlane, body: CompletionRequest, choices: list[_Choice],
                  meta: dict[str, Any], gate: DrainGate) -> AsyncIterator[bytes]:
    """Every choice's chunks as they come (choices interleave), then usage if asked, then
    data: [DONE]. An error after the first byte is an `error` event (OpenAI's shape)."""
    queue: asyncio.Queue[tuple[_Choice, GenChunk | None] | BaseException] = asyncio.Queue()

    async def pump(c: _Choice) -> None:
        try:
            if c.session is not None:
                async for chunk in c.session.chunks():
                    await queue.put((c, chunk))
            await queue.put((c, None))
        except BaseException as e:  # handed to the writer, which answers it in-band
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        if body.echo:
            for c in choices:
                lp = (await _logprobs(plane, body, c.prompt, 0, None)
                      if body.logprobs is not None else None)
                yield _sse({**meta, "choices": [{"text": c.prompt, "index": c.index,
                                                 "logprobs": lp, "finish_reason": None}]})
        left = len(choices)
        while left:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            c, chunk = item
            if chunk is None:
                left -= 1
                continue
            before = c.text
            _finish(c, chunk)
            finish = None if chunk.stop_reason is None else c.finish_reason
            if not chunk.text and finish is None:
                continue
            lp = None
            if body.logprobs is not None:
                lp = await _logprobs(plane, body, c.prompt + c.text,
                                     len(c.prompt) + len(before), None)
            yield _sse({**meta, "choices": [{"text": chunk.text, "index": c.index,
                                             "logprobs": lp, "finish_reason": finish}]})
            if gate.streams_must_end:
                yield b"data: " + error_body("/v1/", 503, STREAM_ENDED) + b"\n\n"
                return
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(choices, body.n)})
        yield b"data: [DONE]\n\n"
    except ServingError as e:
        yield b"data: " + error_body("/v1/", e.http_status, e.message) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except Exception:
        log.exception("unhandled error in a completions stream")
        yield b"data: " + error_body("/v1/", 500, "internal server error (logged on the "
                                     "server)") + b"\n\n"
    finally:
        for t in tasks:
            t.cancel()
        _close(choices)

