"""Batch jobs: a file of texts through the service, in order, resumable, over several replicas.

    from nextchar.client import NextCharClient
    from nextchar.client.batch import JobOptions, RemoteTarget, run_job
    with NextCharClient(["10.0.0.1:50051", "10.0.0.2:50051"], timeout_s=30) as c:
        summary = run_job("in.jsonl", "out.jsonl", RemoteTarget(c), JobOptions(concurrency=8))

    producer (this thread) --work queue--> N workers (one request each) --results--> writer
         ^                                                                            |
         +------------- window: at most `window` chunks between reading and writing <-+

- The producer reads INPUT, keeps this shard's lines (line index mod N), skips the ones the
  output already holds, validates each text against the model's vocabulary and limits
  (GetModelInfo), and packs them into chunks of `texts_per_request`. Every item carries its
  line index; every chunk its sequence number.
- Workers send one Predict per chunk. UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED
  (and CANCELLED, which only a stopping server causes here) are retried with exponential backoff
  and jitter; INVALID_ARGUMENT on a multi-text request is retried text by text so only the bad
  text becomes an error record; any other code makes error records at once. Retries exhausted
  stop the job (a rerun resumes it).
- The writer puts chunks back in sequence order and appends one JSON line per item to OUTPUT,
  flushing and fsyncing every `flush_every_s`. OUTPUT is therefore always an in-order prefix of
  the job (at worst with a torn last line after a crash), which is what makes resuming a matter
  of counting lines; batch_io.py holds those rules and the OUTPUT.meta.json check that stops a
  different job from appending to it.

The thin client needs only grpcio and protobuf; `LocalTarget` (the CLI's `--local`) imports the
server package lazily and runs the same job in-process through the server's own servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import grpc

from nextchar.v1 import nextchar_pb2 as pb

from .batch_io import (
    INVALID,
    Item,
    JobError,
    NotYet,
    cannot_write,
    check_paths,
    count_lines,
    describe_char,
    error_record,
    input_changed,
    job_meta,
    output_lock,
    prepare_output,
    resolve_format,
    sha256_file,
    shard_items,
)
from .client import NextCharClient, NextCharError, predict_request, prediction_to_dict
from .progress import progress

log = logging.getLogger(__name__)

RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # The job never cancels its own calls, so CANCELLED came from the other side: a server that
    # shuts down cancels the calls that reach it during its last flush window. Predict is
    # idempotent, so these are retried like UNAVAILABLE.
    grpc.StatusCode.CANCELLED,
})


# Codes about the call, not its texts (the server answers a bad text INVALID_ARGUMENT, naming
# it; NOT_FOUND on Predict is the model, unloaded or never there): every later item would get
# the same answer, and error records would make a rerun take the job as done. The job stops
# resumably instead, with what to fix.
STOPPING = {
    grpc.StatusCode.UNAUTHENTICATED: "check --token or NEXTCHAR_TOKEN",
    grpc.StatusCode.PERMISSION_DENIED: "use a token that may call Predict",
    grpc.StatusCode.NOT_FOUND: "check --model, or load the model on the server again",
    grpc.StatusCode.FAILED_PRECONDITION: "the model cannot be served now; nextchar models says "
                                         "why",
    grpc.StatusCode.UNIMPLEMENTED: "the server has no nextchar.v1 Predict; check --server",
}


MAX_CONCURRENCY = 1024  # requests in flight, one worker thread each


class JobAborted(Exception):
    """The job stopped part-way; OUTPUT holds a clean prefix and a rerun resumes it."""


class JobInterrupted(JobAborted):
    """Ctrl-C: stopped like JobAborted."""


# -- what the job runs against -------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What the job needs to know about the model before it sends anything."""

    name: str
    version: str
    artifact_sha256: str
    vocab: frozenset[str] | None  # None: the model maps unknown characters (has_unknown_token)
    vocab_size: int
    max_texts_per_request: int
    max_chars_per_text: int
    max_top_k: int
    default_top_k: int
    max_chars_per_request: int = 0  # 0: the server does not say (a server before it did)
    # Texts the job's priority lane queues: a request of more can never be admitted there.
    max_queue_texts: int = 0  # 0: the server does not say


@dataclass(frozen=True)
class Answerer:
    """Which model computed an answer: its version label and its artifact's sha256 ("" from a
    server that does not say)."""

    version: str
    artifact_sha256: str = ""


class Target(Protocol):
    def model_spec(self) -> ModelSpec: ...

    def predict(
        self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
    ) -> tuple[list[pb.Prediction], Answerer]:
        """(one prediction per text, the model that answered); raises NextCharError."""
        ...

    def close(self) -> None: ...


def spec_from_info(info: pb.GetModelInfoResponse, priority: str = "low") -> ModelSpec:
    lim = info.limits
    return ModelSpec(
        name=info.name,
        version=info.version,
        artifact_sha256=info.artifact_sha256,
        vocab=None if info.has_unknown_token else frozenset(info.vocab),
        vocab_size=len(info.vocab),
        max_texts_per_request=lim.max_texts_per_request,
        max_chars_per_text=lim.max_chars_per_text,
        max_top_k=lim.max_top_k,
        default_top_k=lim.default_top_k,
        max_chars_per_request=lim.max_chars_per_request,
        max_queue_texts=lim.low_max_queue_texts if priority == "low" else lim.max_queue_texts,
    )


class RemoteTarget:
    """One or several servers through a NextCharClient (gRPC's round_robin over replicas).

    model: the model to ask ("" = the server's default); priority: the scheduling lane, "low" by
    default so a job leaves the high lane to interactive callers.
    """

    def __init__(self, client: NextCharClient, *, model: str = "", priority: str = "low") -> None:
        self.client = client
        self.model = model
        self.priority = priority
        predict_request([], model=model, priority=priority)  # bad values fail here, not mid-job

    def describe(self) -> str:
        return self.client.target

    def model_spec(self) -> ModelSpec:
        return spec_from_info(self.client.model_info(model=self.model), self.priority)

    def predict(
        self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
    ) -> tuple[list[pb.Prediction], Answerer]:
        request = predict_request(texts, top_k, per_position, model=self.model,
                                  priority=self.priority)
        response = self.client.predict_response(request, timeout_s=timeout_s)
        return list(response.predictions), Answerer(response.model_version,
                                                    response.artifact_sha256)

    def close(self) -> None:
        self.client.close()


class LocalTarget:
    """The server's own serving core (the registry and data plane `nextchar serve` runs, built
    by the same code) in this process, without a transport: the same checks, batcher and
    answers as a server. `path` is an artifact, a model directory of versions, or (with
    `model`) a model repository.

    The core runs on an event loop in a background thread; workers submit to it as a server's
    requests would, so concurrent chunks share model calls. Settings (backend, device, limits,
    batching) are the server's: defaults plus NEXTCHAR_* environment variables. Nothing else
    shares this process's model, so low-priority batches may use every backend worker.
    """

    def __init__(self, path: Path | str, *, model: str = "", priority: str = "low") -> None:
        # Imported here: the thin client install has neither numpy nor onnxruntime.
        try:
            from pydantic import ValidationError

            from nextchar.server.batcher import HIGH, LOW
            from nextchar.server.dataplane import DataPlane
            from nextchar.server.errors import ArtifactError
            from nextchar.server.registry import ModelRegistry
            from nextchar.server.repository import looks_like_model
            from nextchar.server.settings import ServerSettings
        except ImportError as e:
            raise ImportError(f"LocalTarget runs the server's core in this process: it needs "
                              f"'pip install nextchar[serve]' ({e})") from e

        if priority not in ("high", "low"):
            raise ValueError(f"priority must be high or low, got {priority!r}")
        path = Path(path)
        try:
            base = ServerSettings()  # the NEXTCHAR_* environment, as `nextchar serve` reads it
        except ValidationError as e:
            err = e.errors()[0]
            name = f"NEXTCHAR_{str(err['loc'][0]).upper()}" if err["loc"] else "settings"
            raise ValueError(f"invalid {name}: {err['msg']}") from None
        repository = bool(model) and not _one_model(path, model, looks_like_model)
        # Only what was given: a NEXTCHAR_MODEL or NEXTCHAR_MODEL_REPOSITORY in the environment
        # (a server's pod) adds no model. The registry reads `model` as set (a --model beside
        # the repository) when it is in the fields set, so a repository drops it from there.
        if repository:
            s = base.model_copy(update={"model_repository": path, "low_lane_workers": 1 << 16,
                                        "model": ServerSettings.model_fields["model"].default})
            s.__pydantic_fields_set__.discard("model")
        else:
            s = base.model_copy(update={"model": path, "model_repository": None,
                                        "low_lane_workers": 1 << 16})
        self._model = model
        self._lane = LOW if priority == "low" else HIGH
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nextchar-local",
                                        daemon=True)
        self._thread.start()
        self.registry = ModelRegistry(s)
        self.plane = DataPlane(self.registry)

        async def start() -> None:
            try:
                self.registry.open()
            except ArtifactError as e:  # worded for `nextchar serve`'s flags, which batch lacks
                raise ArtifactError(str(e).replace(
                    f"--model-repository {path}: no model folders",
                    "neither an artifact (manifest.json) nor a repository of model folders "
                    "(DIR/<model>/)")) from None
            await self.registry.start()
            if model:
                self.registry.serving(model)  # NOT_FOUND names the models there
            self.plane.accepting = True

        try:
            self._rpc(start())
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _rpc(self, coro: Any) -> Any:
        from nextchar.server.errors import ServingError

        try:
            return self._call(coro)
        except ServingError as e:  # the code and message a server would answer
            raise NextCharError(e.code, e.message) from e

    def model_spec(self) -> ModelSpec:
        from nextchar.server.batcher import HIGH

        async def view() -> ModelSpec:
            m = self.plane.model(self._model)
            a, lim = m.artifact, m.limits
            return ModelSpec(
                name=m.name, version=m.version, artifact_sha256=a.sha256,
                vocab=None if a.unk_id is not None else frozenset(a.vocab),
                vocab_size=a.vocab_size, max_texts_per_request=lim.max_texts_per_request,
                max_chars_per_text=lim.max_chars_per_text,
                max_top_k=min(lim.max_top_k, a.vocab_size), default_top_k=lim.default_top_k,
                max_chars_per_request=lim.max_chars_per_request,
                max_queue_texts=(lim.max_queue_texts if self._lane == HIGH
                                 else lim.low_max_queue_texts))

        return cast(ModelSpec, self._rpc(view()))

    def predict(
        self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
    ) -> tuple[list[pb.Prediction], Answerer]:
        from nextchar.server.dataplane import PredictCall
        from nextchar.server.grpc.converters import prediction_to_pb

        async def call() -> tuple[list[pb.Prediction], Answerer]:
            deadline = asyncio.get_running_loop().time() + timeout_s
            answer = await self.plane.predict(PredictCall(
                texts=texts, top_k=top_k, per_position=per_position, model=self._model,
                lane=self._lane, deadline=deadline))
            return ([prediction_to_pb(r, answer.vocab) for r in answer.results],
                    Answerer(answer.version, answer.artifact_sha256))

        return cast(tuple[list[pb.Prediction], Answerer], self._rpc(call()))

    def close(self) -> None:
        try:
            if self._thread.is_alive():
                self._call(self.registry.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


# -- options, items, summary ---------------------------------------------------------------------
@dataclass(frozen=True)
class JobOptions:
    top_k: int = 0  # 0: the server's default, resolved once at start and pinned in the meta
    per_position: bool = False
    input_format: str = "auto"  # auto | text | jsonl
    shard: tuple[int, int] = (0, 1)  # (I, N): lines whose index mod N == I
    concurrency: int = 4  # requests in flight
    texts_per_request: int = 64
    timeout_s: float = 30.0  # per request
    max_retries: int = 10  # per request, on RETRYABLE codes
    backoff_base_s: float = 0.25
    backoff_max_s: float = 15.0
    restart: bool = False  # discard an existing OUTPUT
    progress: bool = True  # tqdm on stderr
    flush_every_s: float = 1.0


@dataclass
class JobSummary:
    output: Path
    total: int  # items in this shard
    resumed: int  # items already in OUTPUT when this run started
    written: int = 0  # items this run wrote
    errors: int = 0  # error records among them
    retries: int = 0
    seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        resumed = f", {self.resumed} were already there" if self.resumed else ""
        return (f"{self.written} items ({self.errors} errors, {self.retries} retries) in "
                f"{self.seconds:.1f} s, {self.items_per_s:.0f} items/s{resumed}; "
                f"{self.resumed + self.written}/{self.total} in {self.output}")


@dataclass
class Chunk:
    seq: int
    items: list[Item] = field(default_factory=list)


def validate(item: Item, spec: ModelSpec) -> None:
    """The server's own checks, done before sending, so a bad text never fails its neighbours."""
    text = item.text
    if item.record is not None or text is None:
        return
    if not text:
        item.record = error_record(item, INVALID, "empty text: every text needs at least one "
                                                  "character")
    elif len(text) > spec.max_chars_per_text:
        item.record = error_record(item, INVALID, f"text has {len(text)} characters > the "
                                                  f"server's max_chars_per_text "
                                                  f"{spec.max_chars_per_text}")
    elif spec.max_chars_per_request and len(text) > spec.max_chars_per_request:
        item.record = error_record(item, INVALID, f"text has {len(text)} characters > the "
                                                  f"server's max_chars_per_request "
                                                  f"{spec.max_chars_per_request}")
    elif spec.vocab is not None:
        for pos, ch in enumerate(text):
            if ch not in spec.vocab:
                item.record = error_record(
                    item, INVALID, f"character {describe_char(ch)} at position {pos} is not in "
                                   f"the model's vocabulary ({spec.vocab_size} characters; see "
                                   f"GetModelInfo)")
                return


# -- the job -------------------------------------------------------------------------------------
_FINAL = object()


class _Job:
    def __init__(self, target: Target, spec: ModelSpec, opts: JobOptions, top_k: int,
                 texts_per_request: int, summary: JobSummary) -> None:
        self.target = target
        self.spec = spec
        self.opts = opts
        self.top_k = top_k
        self.texts_per_request = texts_per_request
        self.summary = summary
        self.window = threading.BoundedSemaphore(opts.concurrency * 4)
        self.work: queue.Queue[Chunk | None] = queue.Queue()
        self.results: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._rng = random.Random()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = exc
        self.stop.set()

    # -- workers ---------------------------------------------------------------------------------
    def worker(self) -> None:
        while True:
            chunk = self.work.get()
            if chunk is None:
                return
            if self.stop.is_set():
                continue  # draining: the writer stops at the first gap anyway
            try:
                self.resolve([it for it in chunk.items if it.record is None])
            except BaseException as e:  # noqa: BLE001 - any failure stops the job, not the thread
                self.fail(e)
                continue
            self.results.put(chunk)

    def resolve(self, items: list[Item]) -> None:
        """Sets every item's record; on INVALID_ARGUMENT retries the texts one by one."""
        if not items:
            return
        texts = [str(it.text) for it in items]
        try:
            preds = self.call_with_retries(texts)
        except NextCharError as e:
            if e.code in STOPPING:
                details = e.details.splitlines()[0] if e.details else "no details"
                raise JobAborted(f"{e.code.name}: {details} ({STOPPING[e.code]})") from e
            if e.code == grpc.StatusCode.INVALID_ARGUMENT and len(items) > 1:
                for it in items:
                    self.resolve([it])
                return
            message = re.sub(r"^texts\[0\]: ", "", e.details) if len(items) == 1 else e.details
            for it in items:
                it.record = error_record(it, e.code.name, message)
            return
        for it, pred in zip(items, preds, strict=True):
            it.record = {"index": it.index, "id": it.id, **prediction_to_dict(str(it.text), pred)}

    def call_with_retries(self, texts: list[str]) -> list[pb.Prediction]:
        opts = self.opts
        attempt = 0
        while True:
            try:
                preds, answerer = self.target.predict(texts, self.top_k, opts.per_position,
                                                      opts.timeout_s)
            except NextCharError as e:
                if e.code not in RETRYABLE:
                    raise
                if attempt >= opts.max_retries:
                    hint = ("; raise --timeout-s or lower --texts-per-request"
                            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED else "")
                    raise JobAborted(f"{e.code.name} after {attempt} retries: {e.details}{hint}"
                                     ) from e
                delay = self.backoff_s(attempt)
                attempt += 1
                with self._lock:
                    self.summary.retries += 1
                log.debug("%s; retry %d in %.2fs", e, attempt, delay)
                if self.stop.wait(delay):
                    raise JobAborted("stopped") from e
                continue
            self.check_same_model(answerer)
            return preds

    def check_same_model(self, answerer: Answerer) -> None:
        """A replica with another model (a rolling update) stops the job: mixing two models'
        answers in one output would be silent. The artifact's sha256 decides where both sides
        give it (two models may share a version label); the version label otherwise."""
        spec = self.spec
        if spec.artifact_sha256 and answerer.artifact_sha256:
            if answerer.artifact_sha256 != spec.artifact_sha256:
                raise JobAborted(
                    f"a server answered with another model (artifact sha256 "
                    f"{answerer.artifact_sha256[:12]}..., version {answerer.version!r}), the "
                    f"job started on {spec.artifact_sha256[:12]}... (version {spec.version!r})")
        elif spec.version and answerer.version != spec.version:
            raise JobAborted(f"a server answered with model version {answerer.version!r}, the "
                             f"job started on {spec.version!r}")

    def backoff_s(self, attempt: int) -> float:
        """Exponential with 'equal jitter': at least half the step, so retries keep spacing out."""
        step = min(self.opts.backoff_max_s, self.opts.backoff_base_s * 2.0 ** attempt)
        with self._lock:
            return step / 2 + self._rng.uniform(0, step / 2)

    # -- writer ----------------------------------------------------------------------------------
    def writer(self, out: Any, on_written: Callable[[int], None]) -> None:
        """Appends the chunks in sequence order; a failed write or sync (a full disk, a final
        fsync the file refuses) stops the job with one line, not a thread's traceback."""
        try:
            self._write_in_order(out, on_written)
            _sync(out)  # the last lines are only there once this succeeds
        except BaseException as e:  # noqa: BLE001 - reported by run_job
            self.fail(JobAborted(f"writing the output failed: {_reason(e)}"))
            with contextlib.suppress(OSError, ValueError):
                os.fsync(out.fileno())  # keep what did reach the file (the buffer would fail again)

    def _write_in_order(self, out: Any, on_written: Callable[[int], None]) -> None:
        pending: dict[int, Chunk] = {}
        next_seq = 0
        last_sync = time.monotonic()
        while True:
            try:
                msg = self.results.get(timeout=self.opts.flush_every_s)
            except queue.Empty:
                msg = None
            if msg is _FINAL:
                return
            if isinstance(msg, Chunk):
                pending[msg.seq] = msg
            while next_seq in pending:
                chunk = pending.pop(next_seq)
                lines = []
                for it in chunk.items:
                    record = it.record or error_record(it, "INTERNAL", "no result")
                    self.summary.errors += "error" in record
                    lines.append(_json_line(record))
                out.write(b"".join(lines))
                self.summary.written += len(chunk.items)
                on_written(len(chunk.items))
                next_seq += 1
                self.window.release()
            if time.monotonic() - last_sync >= self.opts.flush_every_s:
                _sync(out)
                last_sync = time.monotonic()

    # -- producer --------------------------------------------------------------------------------
    def produce(self, items: Iterator[Item]) -> None:
        """Chunks of at most texts_per_request texts and the server's max_chars_per_request
        characters: long texts make shorter chunks, or the server would refuse valid lines."""
        max_chars = self.spec.max_chars_per_request or sys.maxsize
        chunk, chars = Chunk(0), 0
        for item in items:
            validate(item, self.spec)
            size = len(item.text or "") if item.record is None else 0
            if chunk.items and chars + size > max_chars:
                if not self._submit(chunk):
                    return
                chunk, chars = Chunk(chunk.seq + 1), 0
            chunk.items.append(item)
            chars += size
            if len(chunk.items) >= self.texts_per_request:
                if not self._submit(chunk):
                    return
                chunk, chars = Chunk(chunk.seq + 1), 0
        if chunk.items:
            self._submit(chunk)

    def _submit(self, chunk: Chunk) -> bool:
        while not self.window.acquire(timeout=0.2):
            if self.stop.is_set():
                return False
        if self.stop.is_set():
            return False
        if any(it.record is None for it in chunk.items):
            self.work.put(chunk)
        else:
            self.results.put(chunk)  # nothing to send: straight to the writer
        return True


def _one_model(path: Path, model: str, looks_like_model: Callable[[Path], bool]) -> bool:
    """With --model NAME, is `path` that one model (an artifact, or a folder of its versions,
    whose manifests name it) rather than a repository holding DIR/NAME/? A repository of
    plain artifacts and a folder of versions look alike but for the names inside."""
    if (path / "manifest.json").is_file():
        return True
    if looks_like_model(path / model):
        return False
    for manifest in path.glob("*/manifest.json"):
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("name") == model:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _json_line(record: dict[str, Any]) -> bytes:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in an id or text: JSON's \u escapes hold it
        return (json.dumps(record) + "\n").encode("ascii")


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _reason(e: BaseException) -> str:
    """'No space left on device', not '[Errno 28] No space left on device: ...'."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__


class ServerUnreachable(NotYet):
    """GetModelInfo kept failing before the job began: nothing was sent or written; a later
    run, once a server answers, starts the job (exit 1)."""


def fetch_spec(target: Target, opts: JobOptions) -> ModelSpec:
    """GetModelInfo with the job's retry policy, so a job may start while a server boots; each
    retry says so on the log (a silent minute looks like a hang)."""
    where = target.describe() if hasattr(target, "describe") else "the server"
    attempt = 0
    while True:
        try:
            return target.model_spec()
        except NextCharError as e:
            if e.code not in RETRYABLE:  # e.g. NOT_FOUND (--model), UNAUTHENTICATED (--token)
                raise JobError(f"cannot start: {where} answered {e.code.name}: "
                               f"{e.details.splitlines()[0] if e.details else 'no details'}"
                               ) from e
            if _tls_mismatch(e.details):
                raise JobError(f"cannot start: TLS with {where} failed ({_tls_reason(e.details)}): "
                               f"check --tls / --tls-ca / --tls-server-name against the server's "
                               f"TLS settings (a plaintext server takes no --tls)") from e
            if attempt >= opts.max_retries:
                tries = f" after {attempt} retries" if attempt else ""
                raise ServerUnreachable(
                    f"cannot start: {where} answered {e.code.name}{tries} "
                    f"({e.details.splitlines()[0] if e.details else 'no details'}); nothing was "
                    f"sent or written; check --server and that the server runs") from e
            step = min(opts.backoff_max_s, opts.backoff_base_s * 2.0 ** attempt)
            delay = step / 2 + random.uniform(0, step / 2)
            attempt += 1
            log.warning("%s: %s; retrying in %.1f s (%d/%d)", where, e.code.name, delay,
                        attempt, opts.max_retries)
            time.sleep(delay)


# gRPC's UNAVAILABLE for a TLS handshake the peer's protocol refused (SSL_ERROR_SSL: a wrong
# version, i.e. a plaintext server, or a certificate that does not verify), or for a certificate
# that does not hold the name checked (--tls-server-name, or the host in --server). Retrying
# cannot help, unlike a reset or a refused connection (SSL_ERROR_SYSCALL, "Connection refused").
_HOSTNAME_FAILED = "Hostname Verification Check failed"
_TLS_REFUSED = re.compile(rf"handshake failed.*SSL_ERROR_SSL|{_HOSTNAME_FAILED}",
                          re.IGNORECASE | re.DOTALL)


def _tls_mismatch(details: str) -> bool:
    return bool(details and _TLS_REFUSED.search(details))


def _tls_reason(details: str) -> str:
    if _HOSTNAME_FAILED.lower() in details.lower():
        return "the certificate does not hold the name checked: --tls-server-name, else the host"
    m = re.search(r"OPENSSL_internal:([A-Z_]+)", details)
    return m.group(1) if m else "handshake refused"


def _run_threads(job: _Job, out: Any, on_written: Callable[[int], None],
                 items: Iterator[Item]) -> bool:
    """Producer (this thread), workers and writer until the items run out or the job fails;
    True when Ctrl-C stopped it."""
    writer = threading.Thread(target=job.writer, args=(out, on_written),
                              name="nextchar-batch-writer", daemon=True)
    workers = [threading.Thread(target=job.worker, name=f"nextchar-batch-{k}", daemon=True)
               for k in range(job.opts.concurrency)]
    writer.start()
    for w in workers:
        w.start()
    interrupted = False
    try:
        job.produce(items)
    except KeyboardInterrupt:
        interrupted = True
        job.fail(JobAborted("interrupted"))
    except BaseException as e:
        job.fail(e)
    finally:
        for _ in workers:
            job.work.put(None)
        try:
            _join(job, workers, writer)
        except KeyboardInterrupt:
            # Ctrl-C once everything is queued lands here, in the joins: the job stops the
            # same way (the writer keeps the in-order prefix), with its message and exit 130.
            interrupted = True
            job.fail(JobAborted("interrupted"))
            _join(job, workers, writer)
    return interrupted


def _join(job: _Job, workers: list[threading.Thread], writer: threading.Thread) -> None:
    # After a failure, in-flight requests need not finish: the writer keeps the in-order
    # prefix of what has completed, and a rerun redoes the rest.
    for w in workers:
        w.join(None if not job.stop.is_set() else 2.0)
    job.results.put(_FINAL)  # a second one, after an interrupted first join, is never read
    writer.join()


def run_job(input_path: Path | str, output_path: Path | str, target: Target,
            opts: JobOptions | None = None) -> JobSummary:
    """Runs (or resumes) one job; JobError before anything is sent, JobAborted part-way."""
    opts = opts or JobOptions()
    input_path, output = Path(input_path), Path(output_path)
    if opts.concurrency < 1 or opts.texts_per_request < 1 or opts.max_retries < 0:
        raise JobError("--concurrency and --texts-per-request must be >= 1, --max-retries >= 0")
    if opts.concurrency > MAX_CONCURRENCY:
        raise JobError(f"--concurrency {opts.concurrency}: at most {MAX_CONCURRENCY} requests in "
                       f"flight (one thread each; 2 to 4 per replica keep a server busy)")
    if opts.input_format not in ("auto", "text", "jsonl"):
        raise JobError(f"--format {opts.input_format!r}: expected auto, text or jsonl")
    check_paths(input_path, output_path)
    spec = fetch_spec(target, opts)
    top_k = opts.top_k or min(spec.default_top_k, spec.vocab_size)
    if not 1 <= top_k <= spec.max_top_k:
        raise JobError(f"--top-k {opts.top_k}: the server allows 1..{spec.max_top_k} (0: its "
                       f"default, {spec.default_top_k})")
    texts_per_request = min(opts.texts_per_request, spec.max_texts_per_request)
    if spec.max_queue_texts:
        # The lane's queue holds the job's `concurrency` requests at once: each gets its share,
        # or every request at the bound is refused while another one waits.
        texts_per_request = min(texts_per_request,
                                max(1, spec.max_queue_texts // max(1, opts.concurrency)))

    model = {"name": spec.name, "version": spec.version, "artifact_sha256": spec.artifact_sha256}
    try:
        fmt = resolve_format(input_path, opts.input_format)
        i, n = opts.shard
        total = len(range(i, count_lines(input_path), n))
        meta = job_meta(input_path, fmt, opts.shard, top_k, opts.per_position, model)
    except OSError as e:
        raise JobError(f"{input_path}: cannot read ({e.strerror or e})") from e
    with output_lock(output) as lock:
        done, last_index = prepare_output(output, meta, total, opts.restart)
        if lock.problem:
            log.warning("%s; nothing stops a second job writing %s", lock.problem, output.name)
        if done:
            log.info("resuming %s: %d of %d items already there", output, done, total)
        summary = JobSummary(output=output, total=total, resumed=done)
        job = _Job(target, spec, opts, top_k, texts_per_request, summary)

        try:
            out = output.open("ab")
        except OSError as e:
            raise cannot_write(output, e) from e

        bar = progress(total, done, output.name, opts.progress)
        started = time.monotonic()
        try:
            interrupted = _run_threads(job, out, bar.update,
                                       shard_items(input_path, fmt, opts.shard, done, last_index,
                                                   spec.max_chars_per_text, total))
        finally:
            bar.close()
            try:
                out.close()
            except OSError as e:  # what a failed write left in the buffer fails again
                job.fail(JobAborted(f"writing the output failed: {_reason(e)}"))
        summary.seconds = time.monotonic() - started
        if job.failure is not None:
            if isinstance(job.failure, JobError):
                raise job.failure
            kind = JobInterrupted if interrupted else JobAborted
            reason = "interrupted" if interrupted else str(job.failure)
            raise kind(f"{reason}; stopped after {summary.resumed + summary.written}/{total} "
                       f"items: rerun the same command to resume") from job.failure
        # shard_items stops at a changed line count; an edit that keeps it changes the size or,
        # written in place to the same length, the modification time (both as this run began).
        answered = summary.resumed + summary.written
        if answered != total:
            raise input_changed(input_path, f"{answered} of its {total} items were read")
        try:
            st = input_path.stat()
        except OSError:  # deleted since
            raise input_changed(input_path, "it is gone") from None
        if st.st_size != meta["input"]["size"]:
            raise input_changed(input_path, f"{meta['input']['size']} bytes at the start, "
                                            f"{st.st_size} bytes now")
        # A write that kept the bytes (`touch`, a sync tool) changes nothing the output answers.
        if st.st_mtime_ns != meta["input"]["mtime_ns"] \
                and sha256_file(input_path) != meta["input"]["sha256"]:
            raise input_changed(input_path, "written to since the job began")
        return summary
