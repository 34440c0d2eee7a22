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
temperature and top-p) after each prefix, from Predict with every position's distribution,
continuing from the state of the piece before (_Scorer): each character is read once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from ..dataplane import DataPlane, GenChunk, GenerateCall, GenerateSession, PredictCall
from ..errors import InvalidInput, ServingError
from ..generator import STATE_HINT, STOP_STRING, GenerateParams, as_float32
from ..logging_setup import request_id_var
from ..runtime import ModelRuntime
from ..telemetry import DrainGate
from .disconnect import ClientGone, gone_response, unless_gone
from .errors import error_body
from .json_body import json_router
from .openai_schemas import MAX_CHOICES, CompletionRequest
from .streams import error_event, opened

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
    r = json_router("OpenAI")

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
        if body.best_of is not None and body.best_of < body.n:  # OpenAI's own rule
            raise OpenAIError(f"best_of must be greater than or equal to n, got best_of "
                              f"{body.best_of} and n {body.n}", "best_of")
        if body.user:
            log.debug("completion for user %r", body.user[:64])
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise OpenAIError("prompt is empty: send a string or a list of strings", "prompt")
        if len(prompts) * body.n > MAX_CHOICES:
            raise OpenAIError(f"{len(prompts)} prompts x n {body.n} > {MAX_CHOICES} choices in "
                              f"one request", "n" if body.n > 1 else "prompt")
        if body.stream_options is not None and not body.stream:
            raise OpenAIError("stream_options is only allowed when stream is true",
                              "stream_options")
        model = plane.model(body.model)  # 404 for an unknown name, before any work
        if body.max_tokens != 0 and len(prompts) * body.n > model.limits.max_streams:
            # would never fit, busy or not (max_tokens 0 opens no stream)
            raise OpenAIError(f"{len(prompts)} prompts x n {body.n} choices > max_streams "
                              f"{model.limits.max_streams}, the Generate streams this server "
                              f"runs at once; ask for fewer", "n" if body.n > 1 else "prompt")
        if body.logprobs is not None:
            lim = model.limits
            bound = min(lim.max_top_k, model.artifact.vocab_size)
            if body.logprobs > bound:
                raise OpenAIError(f"logprobs must be between 0 and {bound}", "logprobs")
        stops = ([body.stop] if isinstance(body.stop, str) else list(body.stop or ()))
        choices = _open(plane, body, prompts, stops, request.state.deadline)
        meta = {"id": f"cmpl-{request_id_var.get() or ''}", "object": "text_completion",
                "created": int(time.time()), "model": model.name}
        if body.stream:
            events = await opened(_stream(plane, body, choices, meta, gate,
                                          request.state.deadline))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})

        async def answer() -> list[dict[str, Any]]:
            # Each scorer holds its choice's version: the logprobs come from the model that
            # wrote the text, also when an unload or a new version lands in between.
            scorers = _scorers(plane, body, choices, request.state.deadline)
            try:
                try:
                    await asyncio.gather(*(_run(c) for c in choices))
                finally:
                    _close(choices)  # the stream slots go back now, before the Predicts
                out = []
                for c in choices:
                    text = c.prompt + c.text if body.echo else c.text
                    lp = await _logprobs(scorers[c.index], body, c) if scorers else None
                    out.append({"text": text, "index": c.index, "logprobs": lp,
                                "finish_reason": c.finish_reason})
                return out
            finally:
                for scorer in scorers.values():
                    scorer.close()

        try:
            out = await unless_gone(request, answer())
        except ClientGone:
            return gone_response()
        finally:
            _close(choices)  # also when answer() was cancelled before it began
        return _json({**meta, "choices": out, "usage": _usage(choices, body.n)})

    return r


def _open(plane: DataPlane, body: CompletionRequest, prompts: list[str], stops: list[str],
          deadline: float | None) -> list[_Choice]:
    """Admits every choice's stream up front, so a bad field or a full server is an HTTP status
    before any byte of an answer; on a failure, the ones already open are closed."""
    choices: list[_Choice] = []
    max_chars = body.max_tokens if body.max_tokens is not None else 16
    one = isinstance(body.prompt, str)
    try:
        temperature = as_float32(body.temperature, "temperature")
        top_p = as_float32(body.top_p, "top_p")  # 1e-50 is 0 here too: the top token alone
    except InvalidInput as e:
        raise OpenAIError(e.message, e.message.split(" ", 1)[0]) from None
    try:
        for p_index, prompt in enumerate(prompts):
            for i in range(body.n):
                index = p_index * body.n + i
                params = GenerateParams(  # OpenAI's top_p 0 keeps the top token alone
                    prompt=prompt, max_chars=max(max_chars, 1),
                    temperature=temperature,
                    top_k=1 if top_p == 0 else body.top_k, top_p=top_p or 1.0,
                    seed=None if body.seed is None else (body.seed + i) % (1 << 64),
                    stop=tuple(stops))
                call = GenerateCall(params, body.model, deadline)
                try:
                    if max_chars == 0:  # no characters to make, the same checks
                        plane.check_generate(call)
                        session = None
                    else:
                        session = plane.generate(call)
                except InvalidInput as e:
                    raise _openai_error(e.message, None if one else p_index) from None
                choices.append(_Choice(index, prompt, session))
    except BaseException:
        _close(choices)
        raise
    return choices


def _openai_error(message: str, prompt_index: int | None) -> OpenAIError:
    """Generate's message in OpenAI's words: its field names (max_tokens, which may be 0 here),
    which prompt of a list, and no states (this API has none)."""
    param = _param_of(message)
    if param == "max_tokens" and message.startswith("max_chars "):
        message = "max_tokens " + message.removeprefix("max_chars ").replace(
            "between 1 and", "between 0 and", 1)
    if param == "prompt":
        message = message.replace(STATE_HINT, "")
        if prompt_index is not None:
            message = f"prompt[{prompt_index}]" + message.removeprefix("prompt")
    return OpenAIError(message, param)


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


class _Scorer:
    """OpenAI's legacy logprobs object (tokens, token_logprobs, top_logprobs with k =
    body.logprobs, text_offset into the prompt + completion) for one choice's characters, piece
    by piece as they come. Character j is scored by the model's own distribution (before
    temperature and top-p) after the text before it; the very first character of the prompt has
    none (None, as OpenAI answers for an echoed prompt's first token).

    One Predict per piece, with every position's distribution, continuing from the state the
    piece before returned: each character is read by the model once, however long the text.

    It predicts on one version, on a lease of its own (close() ends it): its choice's Generate
    session's, or without one (max_tokens 0) the version served when it was made."""

    def __init__(self, plane: DataPlane, body: CompletionRequest, deadline: float | None,
                 session: GenerateSession | None) -> None:
        self.plane, self.model, self.deadline = plane, body.model, deadline
        self.k = body.logprobs or 0
        self.rt: ModelRuntime | None = (plane.registry.acquire(body.model) if session is None
                                        else plane.registry.hold(session.runtime))
        artifact = self.rt.artifact
        self.vocab, self.unk = artifact.vocab, artifact.unk_id
        self.index = {ch: i for i, ch in enumerate(self.vocab)}
        self.state = b""  # fresh
        self.after: np.ndarray | None = None  # the distribution after the text scored so far
        self.offset = 0

    async def score(self, piece: str) -> dict[str, Any]:
        chosen: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if piece:
            answer = await self.plane.predict(PredictCall(
                texts=[piece], top_k=1, per_position=True, position_probs=True,
                states=[self.state], return_state=True, model=self.model,
                deadline=self.deadline), on=self.rt)
            (res,) = answer.results
            dists = res.position_dists
            assert dists is not None  # position_probs
            for j, ch in enumerate(piece):
                before = self.after if j == 0 else dists[j - 1]
                if before is None:
                    chosen.append(None)
                    tops.append(None)
                    continue
                # A character outside the vocabulary was read as the unknown token: that is
                # the id whose probability the model gave it.
                i = self.index.get(ch, self.unk)
                logp = _log(float(before[i]) if i is not None else 0.0)
                chosen.append(logp)
                ranked = np.argsort(-before, kind="stable")[: self.k].tolist()
                top = {self.vocab[r]: _log(float(before[r])) for r in ranked}
                # OpenAI always lists the chosen token too: up to logprobs + 1 entries.
                top.setdefault(ch, logp)
                tops.append(top)
            self.after, self.state = dists[-1], res.state
        offsets = list(range(self.offset, self.offset + len(piece)))
        self.offset += len(piece)
        return {"tokens": list(piece), "token_logprobs": chosen, "top_logprobs": tops,
                "text_offset": offsets}

    def close(self) -> None:
        """Idempotent: the version's lease goes back."""
        if self.rt is not None:
            self.plane.registry.release(self.rt)
            self.rt = None


def _scorers(plane: DataPlane, body: CompletionRequest, choices: list[_Choice],
             deadline: float | None) -> dict[int, _Scorer]:
    """A scorer per choice (by index) when logprobs are asked for; none are left holding a
    lease if one cannot be made."""
    scorers: dict[int, _Scorer] = {}
    if body.logprobs is None:
        return scorers
    try:
        for c in choices:
            scorers[c.index] = _Scorer(plane, body, deadline, c.session)
    except BaseException:
        for scorer in scorers.values():
            scorer.close()
        raise
    return scorers


async def _logprobs(scorer: _Scorer, body: CompletionRequest, c: _Choice) -> dict[str, Any]:
    """The whole choice's logprobs: its prompt too when echoed."""
    prompt = await scorer.score(c.prompt)
    completion = await scorer.score(c.text)
    if not body.echo:
        return completion
    return {key: prompt[key] + completion[key] for key in completion}


def _log(p: float) -> float:
    return math.log(p) if p > 0 else MIN_LOGPROB


def _sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


async def _stream(plane: DataPlane, body: CompletionRequest, choices: list[_Choice],
                  meta: dict[str, Any], gate: DrainGate,
                  deadline: float | None) -> AsyncGenerator[bytes, None]:
    """_events, with an error after the first event sent as an `error` event (OpenAI's shape,
    then data: [DONE]); one before it is raised, for the route to answer as an HTTP status (a
    full queue: 429 with retry-after, which the SDK retries)."""
    events = _events(plane, body, choices, meta, gate, deadline)
    sent = False
    try:
        async for event in events:
            sent = True
            yield event
    except Exception as e:
        if not sent:
            raise
        yield error_event("/v1/", e)
        yield b"data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client gone mid-stream: the choices' streams end now


async def _events(plane: DataPlane, body: CompletionRequest, choices: list[_Choice],
                  meta: dict[str, Any], gate: DrainGate,
                  deadline: float | None) -> AsyncGenerator[bytes, None]:
    """Every choice's chunks as they come (choices interleave), then usage if asked, then
    data: [DONE]. Errors are raised (see _stream)."""
    queue: asyncio.Queue[tuple[_Choice, GenChunk | None] | BaseException] = asyncio.Queue()

    async def pump(c: _Choice) -> None:
        try:
            if c.session is not None:
                async for chunk in c.session.chunks():
                    await queue.put((c, chunk))
            await queue.put((c, None))
        except BaseException as e:  # handed to the writer, which answers it in-band
            await queue.put(e)

    scorers: dict[int, _Scorer] = {}
    tasks: list[asyncio.Future[None]] = []
    finished: set[int] = set()  # choices whose finish_reason went out
    try:  # the finally closes the choices' streams, whatever fails
        scorers = _scorers(plane, body, choices, deadline)
        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        # Every choice's first model call has its outcome before any event, echoed prompts
        # included: a refusal until then (a full queue, an expired deadline) is still an HTTP
        # status the SDK retries (streams.py), not an error event after a 200.
        early: list[tuple[_Choice, GenChunk | None]] = []
        while len({c.index for c, _ in early}) < len(choices):
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            early.append(item)
        for c in choices:
            lp = await scorers[c.index].score(c.prompt) if scorers else None
            if body.echo:
                yield _sse({**meta, "choices": [{"text": c.prompt, "index": c.index,
                                                 "logprobs": lp, "finish_reason": None}]})
        left = len(choices)
        while left:
            item = early.pop(0) if early else await queue.get()
            if isinstance(item, BaseException):
                raise item
            c, chunk = item
            if chunk is None:
                left -= 1
                if c.index not in finished:  # e.g. max_tokens 0: no chunk carried the reason
                    yield _sse({**meta, "choices": [{
                        "text": "", "index": c.index,
                        "logprobs": await scorers[c.index].score("") if scorers else None,
                        "finish_reason": c.finish_reason}]})
                continue
            _finish(c, chunk)
            finish = None if chunk.stop_reason is None else c.finish_reason
            if not chunk.text and finish is None:
                continue
            if finish is not None:
                finished.add(c.index)
            lp = await scorers[c.index].score(chunk.text) if scorers else None
            yield _sse({**meta, "choices": [{"text": chunk.text, "index": c.index,
                                             "logprobs": lp, "finish_reason": finish}]})
            if gate.streams_must_end and finish is None:
                yield b"data: " + error_body("/v1/", 503, STREAM_ENDED) + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(choices, body.n)})
        yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        _close(choices)
        for scorer in scorers.values():
            scorer.close()

