"""Model versions and hot reload: a new version is verified in full before it serves a request.

`--model` is either one artifact directory or a repository of versions:

    models/shakespeare/
      1/   manifest.json model.onnx model.ts
      2/   ...          <- served: the highest version (natural order: 2 < 10 < 20261127-1015)

Copy a new version in under a hidden name and rename it into place (`cp -r v3 .tmp-3 && mv
.tmp-3 3`): names starting with '.' and directories without manifest.json are ignored. Deleting
the highest version rolls back to the next one on the next check.

A check (every `--poll-s`, on SIGHUP, or the Admin.ReloadModel RPC) that finds a newer version:
  1. loads it (manifest, sha256 of the model file) and builds its backend, off the event loop;
  2. warms it up and runs a fixed probe: every output finite and of the right shape; when the
     model config, vocabulary and model-file checksum equal the served version's, the probe's
     logits must equal the served version's too;
  3. swaps it in: one assignment, no await between the servicers seeing the old and the new
     model. Calls that began before the swap finish on the old version, which is closed only
     when the last of them ended.
A version that fails any step is logged, counted (nextchar_model_reloads_total{result="failure"})
and skipped by polling until its manifest changes; the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact, load_artifact, sha256_file
from .backends import Backend, create_backend
from .errors import ArtifactError, FailedPrecondition
from .generator import Generator
from .metrics import Metrics
from .predictor import Predictor
from .settings import ServerSettings

log = logging.getLogger(__name__)

PROBE_TEXT = "To be, or not to be, that is the question:\n"
PARITY_ATOL = 1e-6


class ReloadFailed(FailedPrecondition):
    """A new version failed a check; the served version is unchanged (FAILED_PRECONDITION)."""


@dataclass(eq=False)  # identity: the app keeps replaced versions in a set until they close
class LoadedModel:
    """One version's serving objects; the servicers read `predictor` and `generator`."""

    predictor: Predictor
    generator: Generator
    probe_logits: np.ndarray | None = None  # (1, V) on PROBE_TEXT, for the next parity check

    @property
    def artifact(self) -> Artifact:
        return self.predictor.artifact

    async def close(self) -> None:
        await self.generator.close()
        await self.predictor.batcher.close()


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool
    previous_version: str
    version: str
    artifact_sha256: str


def version_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: digit runs compare as numbers, so '2' < '10' and '1.9' < '1.10'."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.findall(r"\d+|\D+", name))


class ModelRepository:
    """--model: one artifact directory, or a directory of versions DIR/<version>/."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def versioned(self) -> bool:
        return not (self.root / "manifest.json").is_file()

    def candidates(self) -> list[Path]:
        """Loadable-looking versions, highest first (just the root for a plain artifact)."""
        if not self.versioned:
            return [self.root]
        if not self.root.is_dir():
            raise ArtifactError(f"{self.root}: no such directory (an artifact directory or a "
                                f"repository of DIR/<version>/ artifact directories)")
        versions = [p for p in self.root.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file()]
        if not versions:
            raise ArtifactError(f"{self.root}: neither an artifact (no manifest.json) nor a "
                                f"repository (no <version>/manifest.json below it)")
        return sorted(versions, key=lambda p: version_key(p.name), reverse=True)


def open_model(path: Path, s: ServerSettings) -> tuple[Artifact, Backend]:
    """Verifies the artifact and builds its backend (blocking: file I/O, runtime start-up)."""
    artifact = load_artifact(path, backends=(s.backend,))
    backend = create_backend(artifact, s.backend, s.device, s.backend_workers, s.intra_op_threads,
                             s.onnx_graph)
    return artifact, backend


def _probe_ids(artifact: Artifact) -> np.ndarray:
    ids = [artifact.char_to_id[c] for c in PROBE_TEXT if c in artifact.char_to_id]
    if len(ids) < 4:  # a vocabulary without English: a fixed id pattern instead
        ids = [(7 * i) % artifact.vocab_size for i in range(16)]
    return np.asarray(ids, dtype=np.int64)


async def run_probe(model: LoadedModel) -> np.ndarray:
    """Runs the probe through the backend on its own executor; returns its (1, V) logits.

    Raises ReloadFailed when any output is non-finite or misshapen.
    """
    p = model.predictor
    a = p.artifact
    ids = _probe_ids(a)
    t = len(ids)
    loop = asyncio.get_running_loop()
    out = await loop.run_in_executor(
        p.batcher.executor, lambda: p.backend.run(ids[None, :], np.asarray([t], dtype=np.int64),
                                                  p.backend.zero_state(1), positions=True))
    expected = {
        "logits": (out.logits, (1, a.vocab_size)),
        "state_out": (out.state, (a.state_layers, 1, a.hidden_size)),
        "position_logits": (out.position_logits, (1, t, a.vocab_size)),
    }
    for name, (value, shape) in expected.items():
        if value is None or tuple(value.shape) != shape:
            got = None if value is None else tuple(value.shape)
            raise ReloadFailed(f"probe: {name} has shape {got}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise ReloadFailed(f"probe: {name} has non-finite values")
    return np.asarray(out.logits, dtype=np.float32)


def same_weights(a: Artifact, b: Artifact) -> bool:
    """Same model config, vocabulary and model files (by sha256): the answers must be equal."""
    def sums(x: Artifact) -> dict[str, object]:
        return {name: entry.get("sha256") for name, entry in x.manifest["files"].items()}

    return a.model_config == b.model_config and a.vocab == b.vocab and sums(a) == sums(b)


class Reloader:
    """Finds, verifies and swaps in new versions; one reload at a time."""

    def __init__(
        self,
        settings: ServerSettings,
        assemble: Callable[[Artifact, Backend], LoadedModel],
        swap: Callable[[LoadedModel], Awaitable[None]],
        current: Callable[[], LoadedModel | None],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings.model)
        self._assemble = assemble
        self._swap = swap
        self._current = current
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._failed: set[tuple[Path, str]] = set()  # (version dir, manifest sha256)
        self._poll_task: asyncio.Task[None] | None = None
        self._last_problem = ""

    # -- start-up ----------------------------------------------------------------------------
    def open_initial(self) -> tuple[Artifact, Backend]:
        """The highest version that loads; a broken newest version falls back to the next one.

        A plain artifact directory fails fast: its ArtifactError propagates.
        """
        candidates = self.repository.candidates()
        first_error: Exception | None = None
        for path in candidates:
            try:
                return open_model(path, self.settings)
            except Exception as e:  # ArtifactError, or a runtime refusing the model file
                if not self.repository.versioned:
                    raise
                first_error = first_error or e
                self._failed.add((path, _manifest_sha(path)))
                self._count("failure")
                log.error("version %s not loaded, trying an older one: %s", path.name, e)
        raise ArtifactError(f"{self.settings.model}: no version loads (newest: {first_error})")

    # -- reload ------------------------------------------------------------------------------
    async def reload(self, *, retry_failed: bool = True, reason: str = "admin") -> ReloadOutcome:
        """Loads and swaps in the newest version if it is not the one served.

        retry_failed=False (polling) skips a version that already failed with the same manifest.
        Raises ReloadFailed when the new version fails a check; the served one stays.
        """
        async with self._lock:
            current = self._current()
            if current is None:
                raise ReloadFailed("the server has not finished starting; retry shortly")
            served = current.artifact
            unchanged = ReloadOutcome(False, served.version, served.version, served.sha256)
            try:
                path = self.repository.candidates()[0]
            except ArtifactError as e:
                self._problem(f"{e}; still serving version {served.version}")
                return unchanged
            manifest_sha = _manifest_sha(path)
            if path == served.path and manifest_sha == served.sha256:
                return unchanged
            if not retry_failed and (path, manifest_sha) in self._failed:
                return unchanged
            log.info("%s: loading %s (serving version %s)", reason, path, served.version)
            try:
                model = await self._load(path, current)
            except Exception as e:
                self._failed.add((path, manifest_sha))
                self._count("failure")
                message = (f"version {path.name} not loaded ({_reason(e)}); still serving "
                           f"version {served.version}")
                log.error("%s: %s", reason, message, exc_info=not isinstance(e, ArtifactError | ReloadFailed))
                raise ReloadFailed(message) from e
            await self._swap(model)
            self._failed.discard((path, manifest_sha))
            self._count("success")
            new = model.artifact
            log.info("%s: now serving %s version %s (sha256 %s…), was %s", reason, new.name,
                     new.version, new.sha256[:12], served.version)
            self._last_problem = ""
            return ReloadOutcome(True, served.version, new.version, new.sha256)

    async def _load(self, path: Path, current: LoadedModel) -> LoadedModel:
        artifact, backend = await asyncio.to_thread(open_model, path, self.settings)
        if backend.name != current.predictor.backend.name:  # pragma: no cover - one setting
            raise ReloadFailed(f"backend {backend.name} != served {current.predictor.backend.name}")
        model = self._assemble(artifact, backend)
        try:
            await model.predictor.batcher.start(warmup=True)
            await model.generator.start()
            await self.check(model, current)
        except BaseException:
            await model.close()
            raise
        return model

    async def check(self, model: LoadedModel, served: LoadedModel | None) -> None:
        """The probe, and parity with the served version when both are the same weights."""
        model.probe_logits = await run_probe(model)
        if served is None or served.probe_logits is None:
            return
        if same_weights(model.artifact, served.artifact):
            diff = float(np.max(np.abs(model.probe_logits - served.probe_logits)))
            if diff > PARITY_ATOL:
                raise ReloadFailed(f"parity: same weights as the served version but probe logits "
                                   f"differ by {diff:.3g} > {PARITY_ATOL}")

    # -- polling -----------------------------------------------------------------------------
    def start_polling(self) -> None:
        if self.settings.poll_s > 0 and self._poll_task is None:
            self._poll_task = asyncio.create_task(self._poll(), name="nextchar-reload-poll")

    async def stop_polling(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.reload(retry_failed=False, reason="poll")
            except ReloadFailed:
                pass  # logged and counted by reload()
            except Exception:  # never let the poller die silently
                log.exception("poll: model check failed")

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(result).inc()

    def _problem(self, message: str) -> None:
        if message != self._last_problem:  # once per distinct problem, not every poll
            log.warning("model repository: %s", message)
            self._last_problem = message


def _manifest_sha(path: Path) -> str:
    try:
        return sha256_file(path / "manifest.json")
    except OSError:
        return ""


def _reason(e: BaseException) -> str:
    if isinstance(e, ArtifactError | ReloadFailed):
        return str(e)
    return f"{type(e).__name__}: {e}"
