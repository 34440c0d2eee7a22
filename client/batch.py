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
- Workers send one Predict per chunk. UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are
  retried with exponential backoff and jitter; INVALID_ARGUMENT on a multi-text request is
  retried text by text so only the bad text becomes an error record; any other code makes
  error records at once. Retries exhausted stop the job (a rerun resumes it).
- The writer puts chunks back in sequence order and appends one JSON line per item to OUTPUT,
  flushing and fsyncing every `flush_every_s`. OUTPUT is therefore always an in-order prefix of
  the job (at worst with a torn last line after a crash), which is what makes resuming a matter
  of counting lines. `OUTPUT.meta.json` pins the input, shard, options and model, so a rerun
  of a different job refuses to append to it.

The thin client needs only grpcio and protobuf; `LocalTarget` (the CLI's `--local`) imports the
server package lazily and runs the same job in-process through its Predictor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from nextchar.v1 import nextchar_pb2 as pb

from .client import NextCharClient, NextCharError, prediction_to_dict

if TYPE_CHECKING:
    from nextchar.server.predictor import Predictor

log = logging.getLogger(__name__)

RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})
META_FORMAT = "nextchar-batch-meta"
META_VERSION = 1
INVALID = grpc.StatusCode.INVALID_ARGUMENT.name


class JobError(Exception):
    """The job cannot start as asked (options, input, an output from another job): one line."""


class JobAborted(Exception):
    """The job stopped part-way; OUTPUT holds a clean prefix and a rerun resumes it."""


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


class Target(Protocol):
    def model_spec(self) -> ModelSpec: ...

    def predict(
        self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
    ) -> tuple[list[pb.Prediction], str]:
        """(one prediction per text, the model version that answered); raises NextCharError."""
        ...

    def close(self) -> None: ...


class RemoteTarget:
    """One or several servers through a NextCharClient (gRPC's round_robin over replicas)."""

    def __init__(self, client: NextCharClient) -> None:
        self.client = client

    def model_spec(self) -> ModelSpec:
        info = self.client.model_info()
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
        )

    def predict(
        self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
    ) -> tuple[list[pb.Prediction], str]:
        request = pb.PredictRequest(texts=texts, top_k=top_k, per_position=per_position)
        response = self.client.predict_response(request, timeout_s=timeout_s)
        return list(response.predictions), response.model_version

    def close(self) -> None:
        self.client.close()


class LocalTarget:
    """The server's own Artifact -> Backend -> Batcher -> Predictor chain, in this process.

    The batcher runs on an event loop in a background thread; workers submit to it as a server's
    requests would, so concurrent chunks share model calls. Settings (backend, device, limits,
    batching) are the server's: defaults plus NEXTCHAR_* environment variables.
    """

    def __init__(self, artifact_dir: Path | str) -> None:
        # Imported here: the thin client install has neither numpy nor onnxruntime.
        from nextchar.server.artifact import load_artifact
        from nextchar.server.backends import create_backend
        from nextchar.server.batcher import Batcher
        from nextchar.server.predictor import Limits, Predictor
        from nextchar.server.servicer import _prediction
        from nextchar.server.settings import ServerSettings

        s = ServerSettings(model=Path(artifact_dir))
        artifact = load_artifact(s.model, backends=(s.backend,))
        backend = create_backend(artifact, s.backend, s.device, s.backend_workers,
                                 s.intra_op_threads)
        self._to_proto = _prediction
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nextchar-local",
                                        daemon=True)
        self._thread.start()
        self.batcher = self._call(_make_batcher(Batcher, backend, s))
        self.predictor: Predictor = Predictor(artifact, backend, self.batcher,
                                              Limits.from_settings(s))
        self._call(self.batcher.start(warmup=s.warmup))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def model_spec(self) -> ModelSpec:
        a = self.predictor.artifact
        lim = self.predictor.limits
        return ModelSpec(
            name=a.name,
            version=a.version,
            artifact_sha256=a.sha256,
            vocab=None if a.unk_id is not None else frozenset(a.vocab),
            vocab_size=a.vocab_size,
            max_texts_per_request=lim.max_texts_per_request,
            max_chars_per_text=lim.max_chars_per_text,
            max_top_k=min(lim.max_top_k, a.vocab_size),
            default_top_k=lim.default_top_k,
        )

    def predict(
        self, texts: list[str], top_k: int, per_position: bool, timeout_s: float
    ) -> tuple[list[pb.Prediction], str]:
        from nextchar.server.errors import ServingError

        try:
            results = self._call(self.predictor.predict(texts, top_k, per_position))
        except ServingError as e:  # the same code and message a server would answer
            raise NextCharError(e.code, e.message) from e
        vocab = self.predictor.artifact.vocab
        return [self._to_proto(r, vocab) for r in results], self.predictor.artifact.version

    def close(self) -> None:
        try:
            self._call(self.batcher.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


async def _make_batcher(batcher_cls: Any, backend: Any, s: Any) -> Any:
    # The Batcher creates asyncio primitives, so it is built on the loop it will run on.
    return batcher_cls(backend, batching=s.batching, max_batch_size=s.max_batch_size,
                       max_batch_chars=s.max_batch_chars, max_batch_delay_ms=s.max_batch_delay_ms,
                       max_queue_texts=s.max_queue_texts)


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
class Item:
    index: int  # line index in INPUT (0-based, over the whole file, not the shard)
    id: Any
    text: str | None
    record: dict[str, Any] | None = None  # set once the item's output line is known


@dataclass
class Chunk:
    seq: int
    items: list[Item] = field(default_factory=list)


def error_record(item: Item, code: str, message: str) -> dict[str, Any]:
    return {"index": item.index, "id": item.id, "text": item.text,
            "error": {"code": code, "message": message}}


def parse_shard(spec: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; ValueError with a readable reason otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise ValueError(f"--shard {spec!r}: expected I/N, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def _describe_char(ch: str) -> str:
    # The form of nextchar.server.artifact.describe_char, which cannot be imported without numpy.
    shown = ch if ch.isprintable() and not ch.isspace() else repr(ch)[1:-1]
    return f"'{shown}' (U+{ord(ch):04X})"


# -- input ---------------------------------------------------------------------------------------
def resolve_format(path: Path, fmt: str) -> str:
    """auto: .jsonl/.ndjson -> jsonl, .txt -> text, else jsonl when the first line starts '{'."""
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".txt":
        return "text"
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                return "jsonl" if raw.lstrip().startswith(b"{") else "text"
    return "text"


def count_lines(path: Path) -> int:
    """Lines as the reader sees them: a last line without a newline counts."""
    n = 0
    last = b"\n"
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def parse_line(index: int, raw: bytes, fmt: str) -> Item:
    """One input line -> an Item; a line that cannot be a text gets its error record here."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
        if raw.endswith(b"\r"):  # CRLF files
            raw = raw[:-1]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        item = Item(index, None, None)
        item.record = error_record(item, INVALID, f"line is not valid UTF-8 (byte {e.start})")
        return item
    if fmt == "text":
        return Item(index, None, line)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        item = Item(index, None, None)
        item.record = error_record(item, INVALID, f"line is not valid JSON: {e.msg} "
                                                  f"(column {e.colno})")
        return item
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        item = Item(index, obj.get("id") if isinstance(obj, dict) else None, None)
        item.record = error_record(item, INVALID,
                                   'expected a JSON object with a string "text" field')
        return item
    return Item(index, obj.get("id"), obj["text"])


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
    elif spec.vocab is not None:
        for pos, ch in enumerate(text):
            if ch not in spec.vocab:
                item.record = error_record(
                    item, INVALID, f"character {_describe_char(ch)} at position {pos} is not in "
                                   f"the model's vocabulary ({spec.vocab_size} characters; see "
                                   f"GetModelInfo)")
                return


# -- output and its meta -------------------------------------------------------------------------
def meta_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def job_meta(input_path: Path, fmt: str, shard: tuple[int, int], top_k: int, per_position: bool,
             spec: ModelSpec) -> dict[str, Any]:
    st = input_path.stat()
    return {
        "format": META_FORMAT,
        "format_version": META_VERSION,
        "input": {"path": str(input_path.resolve()), "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(input_path)},
        "input_format": fmt,
        "shard": f"{shard[0]}/{shard[1]}",
        "top_k": top_k,
        "per_position": per_position,
        "model": {"name": spec.name, "version": spec.version,
                  "artifact_sha256": spec.artifact_sha256},
    }


def meta_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes `new` a different job from `old`. The input is compared by size and content,
    so a copied or moved input (new path, new mtime) still resumes."""
    diffs = []
    try:
        oi, ni = old["input"], new["input"]
        if oi["size"] != ni["size"] or oi["sha256"] != ni["sha256"]:
            diffs.append(f"input {oi['path']} ({oi['size']} bytes) -> {ni['path']} "
                         f"({ni['size']} bytes, other content)")
        for key in ("input_format", "shard", "top_k", "per_position"):
            if old[key] != new[key]:
                diffs.append(f"{key} {old[key]} -> {new[key]}")
        om, nm = old["model"], new["model"]
        if om["artifact_sha256"] != nm["artifact_sha256"]:
            diffs.append(f"model {om['name']} {om['version']} -> {nm['name']} {nm['version']}")
    except (KeyError, TypeError):
        diffs.append("unreadable meta")
    return diffs


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_torn_tail(path: Path) -> int:
    """Cuts a last line that has no newline (a write interrupted by a crash); returns its bytes."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        end = size
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            block = f.read(end - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def last_line(path: Path) -> bytes:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        back = min(size, 1 << 16)
        while True:
            f.seek(size - back)
            tail = f.read(back).rstrip(b"\n")
            nl = tail.rfind(b"\n")
            if nl >= 0 or back == size:
                return tail[nl + 1:]
            back = min(size, back * 4)


def prepare_output(output: Path, meta: dict[str, Any], total: int, restart: bool
                   ) -> tuple[int, int | None]:
    """Checks OUTPUT belongs to this job and cuts a torn tail: (lines kept, last line's index)."""
    meta_path = meta_path_for(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    has_output = output.exists() and output.stat().st_size > 0
    if restart or not has_output:
        output.write_bytes(b"")
        _write_json_atomic(meta_path, meta)
        return 0, None
    if not meta_path.is_file():
        raise JobError(f"{output} exists and has no {meta_path.name}, so 'nextchar batch' did not "
                       f"write it; pass --restart to overwrite it")
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise JobError(f"{meta_path}: unreadable ({e}); pass --restart to start over") from e
    diffs = meta_differences(old, meta)
    if diffs:
        raise JobError(f"{output} holds another job's results ({'; '.join(diffs)}); rerun the "
                       f"original command to resume it, or pass --restart to start over")
    torn = truncate_torn_tail(output)
    if torn:
        log.info("%s: dropped a torn last line (%d bytes)", output, torn)
    done = count_lines(output)
    if done > total:
        raise JobError(f"{output} has {done} lines but this job has {total} items: not this "
                       f"job's output; pass --restart to start over")
    if done == 0:
        return 0, None
    try:
        last_index = int(json.loads(last_line(output))["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise JobError(f"{output}: the last line is not a nextchar batch record ({e}); pass "
                       f"--restart to start over") from e
    return done, last_index


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
                preds, version = self.target.predict(texts, self.top_k, opts.per_position,
                                                     opts.timeout_s)
            except NextCharError as e:
                if e.code not in RETRYABLE:
                    raise
                if attempt >= opts.max_retries:
                    raise JobAborted(f"{e.code.name} after {attempt} retries: {e.details}") from e
                delay = self.backoff_s(attempt)
                attempt += 1
                with self._lock:
                    self.summary.retries += 1
                log.debug("%s; retry %d in %.2fs", e, attempt, delay)
                if self.stop.wait(delay):
                    raise JobAborted("stopped") from e
                continue
            if self.spec.version and version != self.spec.version:
                # A replica with another model (a rolling update): mixing would be silent.
                raise JobAborted(f"a server answered with model version {version!r}, the job "
                                 f"started on {self.spec.version!r}")
            return preds

    def backoff_s(self, attempt: int) -> float:
        """Exponential with 'equal jitter': at least half the step, so retries keep spacing out."""
        step = min(self.opts.backoff_max_s, self.opts.backoff_base_s * 2 ** attempt)
        with self._lock:
            return step / 2 + self._rng.uniform(0, step / 2)

    # -- writer ----------------------------------------------------------------------------------
    def writer(self, out: Any, on_written: Callable[[int], None]) -> None:
        pending: dict[int, Chunk] = {}
        next_seq = 0
        last_sync = time.monotonic()
        try:
            while True:
                try:
                    msg = self.results.get(timeout=self.opts.flush_every_s)
                except queue.Empty:
                    msg = None
                if msg is _FINAL:
                    break
                if isinstance(msg, Chunk):
                    pending[msg.seq] = msg
                while next_seq in pending:
                    chunk = pending.pop(next_seq)
                    lines = []
                    for it in chunk.items:
                        record = it.record or error_record(it, "INTERNAL", "no result")
                        self.summary.errors += "error" in record
                        lines.append(json.dumps(record, ensure_ascii=False))
                    out.write(("\n".join(lines) + "\n").encode("utf-8"))
                    self.summary.written += len(chunk.items)
                    on_written(len(chunk.items))
                    next_seq += 1
                    self.window.release()
                if time.monotonic() - last_sync >= self.opts.flush_every_s:
                    _sync(out)
                    last_sync = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - e.g. a full disk: stop the job, say why
            self.fail(JobAborted(f"writing the output failed: {e}"))
        finally:
            _sync(out)

    # -- producer --------------------------------------------------------------------------------
    def produce(self, items: Iterator[Item]) -> None:
        chunk = Chunk(0)
        for item in items:
            validate(item, self.spec)
            chunk.items.append(item)
            if len(chunk.items) >= self.texts_per_request:
                if not self._submit(chunk):
                    return
                chunk = Chunk(chunk.seq + 1)
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


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def shard_items(path: Path, fmt: str, shard: tuple[int, int], skip: int,
                last_index: int | None) -> Iterator[Item]:
    """This shard's items in order, after the first `skip` (checked against OUTPUT's last line)."""
    i, n = shard
    seen = 0
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            if index % n != i:
                continue
            seen += 1
            if seen < skip:
                continue
            if seen == skip:
                if index != last_index:
                    raise JobError(f"the output's last record has index {last_index} but this "
                                   f"job's item {skip} is line {index}: not this job's output; "
                                   f"pass --restart to start over")
                continue
            yield parse_line(index, raw, fmt)


def fetch_spec(target: Target, opts: JobOptions) -> ModelSpec:
    """GetModelInfo with the job's retry policy, so a job may start while a server boots."""
    attempt = 0
    while True:
        try:
            return target.model_spec()
        except NextCharError as e:
            if e.code not in RETRYABLE or attempt >= opts.max_retries:
                raise
            step = min(opts.backoff_max_s, opts.backoff_base_s * 2 ** attempt)
            time.sleep(step / 2 + random.uniform(0, step / 2))
            attempt += 1


def run_job(input_path: Path | str, output_path: Path | str, target: Target,
            opts: JobOptions | None = None) -> JobSummary:
    """Runs (or resumes) one job; JobError before anything is sent, JobAborted part-way."""
    opts = opts or JobOptions()
    input_path, output = Path(input_path), Path(output_path)
    if opts.concurrency < 1 or opts.texts_per_request < 1 or opts.max_retries < 0:
        raise JobError("--concurrency and --texts-per-request must be >= 1, --max-retries >= 0")
    if opts.input_format not in ("auto", "text", "jsonl"):
        raise JobError(f"--format {opts.input_format!r}: expected auto, text or jsonl")
    if not input_path.is_file():
        raise JobError(f"{input_path}: no such file")
    if output.resolve() == input_path.resolve():
        raise JobError("the output must not be the input file")
    spec = fetch_spec(target, opts)
    top_k = opts.top_k or min(spec.default_top_k, spec.vocab_size)
    if not 1 <= top_k <= spec.max_top_k:
        raise JobError(f"--top-k {opts.top_k}: the server allows 1..{spec.max_top_k}")
    texts_per_request = min(opts.texts_per_request, spec.max_texts_per_request)

    fmt = resolve_format(input_path, opts.input_format)
    i, n = opts.shard
    total = len(range(i, count_lines(input_path), n))
    meta = job_meta(input_path, fmt, opts.shard, top_k, opts.per_position, spec)
    done, last_index = prepare_output(output, meta, total, opts.restart)
    if done:
        log.info("resuming %s: %d of %d items already there", output, done, total)
    summary = JobSummary(output=output, total=total, resumed=done)
    job = _Job(target, spec, opts, top_k, texts_per_request, summary)

    from tqdm import tqdm  # imported here: `nextchar predict` need not pay for it

    bar = tqdm(total=total, initial=done, unit="items", dynamic_ncols=True, smoothing=0.05,
               disable=not opts.progress, desc=output.name)
    started = time.monotonic()
    with output.open("ab") as out:
        writer = threading.Thread(target=job.writer, args=(out, bar.update),
                                  name="nextchar-batch-writer", daemon=True)
        workers = [threading.Thread(target=job.worker, name=f"nextchar-batch-{k}", daemon=True)
                   for k in range(opts.concurrency)]
        writer.start()
        for w in workers:
            w.start()
        interrupted = False
        try:
            job.produce(shard_items(input_path, fmt, opts.shard, done, last_index))
        except KeyboardInterrupt:
            interrupted = True
            job.fail(JobAborted("interrupted"))
        except BaseException as e:
            job.fail(e)
        finally:
            for _ in workers:
                job.work.put(None)
            # After a failure, in-flight requests need not finish: the writer keeps the in-order
            # prefix of what has completed, and a rerun redoes the rest.
            for w in workers:
                w.join(None if not job.stop.is_set() else 2.0)
            job.results.put(_FINAL)
            writer.join()
            bar.close()
    summary.seconds = time.monotonic() - started
    if job.failure is not None:
        if isinstance(job.failure, JobError):
            raise job.failure
        reason = "interrupted" if interrupted else str(job.failure)
        raise JobAborted(f"{reason}; stopped after {summary.resumed + summary.written}/{total} "
                         f"items: rerun the same command to resume") from job.failure
    return summary
