"""The models being served: name -> slot (current version, state, in-flight calls), and how a
slot changes: load, reload (hot swap), unload, polling.

    registry = ModelRegistry(settings, metrics)
    registry.open()                       # blocking: finds models, verifies and opens files
    await registry.start()                # warm-up + probe each; READY ones serve
    rt = registry.acquire("shakespeare")  # a lease: rt.calls += 1; NotFound / NotReady / ...
    try: ... finally: registry.release(rt)

A version is swapped in only after it passed every check: checksums, its backend, warm-up, a
fixed probe (outputs finite and well-shaped) and, when config, vocabulary and model files equal
the served version's, the probe's logits equal to the served version's. The swap is one
assignment. A replaced or unloaded version is closed when its last lease ends (reference
counted: a stream that began before the swap keeps its own version, and only that, alive), so
its memory is freed then and not later.

A version that fails is logged, counted (nextchar_model_reloads_total{result="failure"}) and
not tried again by polling until its files or the model's config.json change; a load call
re-verifies an unchanged one at most every RETRY_AFTER_S (a broken newest version cannot be used
to make the server re-verify it in a loop). A config.json change reloads the served version
with the new settings. Polling forgets a model whose folder left the repository, unloading it
if it was served (Triton's poll mode does the same).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .artifact import Artifact, sha256_file
from .backends import Backend
from .errors import ArtifactError, FailedPrecondition, InvalidInput, NotFound, NotReady
from .repository import (
    ModelSource,
    model_folder,
    model_settings,
    scan_repository,
    version_fingerprint,
)
from .runtime import ModelRuntime, open_model
from .settings import ServerSettings
from .stats import ModelStats

if TYPE_CHECKING:
    from .metrics import Metrics
    from .tracing import Tracing

log = logging.getLogger(__name__)

T = TypeVar("T")
PARITY_ATOL = 1e-6
RETRY_AFTER_S = 30.0  # a failed version (same files) is re-verified at most this often


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"  # known, not loaded (unloaded, or never)
    FAILED = "FAILED"  # its last load failed; `reason` says why
    UNLOADING = "UNLOADING"  # unloaded; its last calls are still running


class ReloadFailed(FailedPrecondition):
    """A version failed a check; what was served is unchanged (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class LoadOutcome:
    model: str
    loaded: bool  # False: the newest version was already the one served
    previous_version: str
    version: str
    artifact_sha256: str
    reason: str = ""  # why nothing was loaded


def same_weights(a: Artifact, b: Artifact) -> bool:
    """Same model config, vocabulary and model files (by sha256): the answers must be equal."""
    def sums(x: Artifact) -> dict[str, object]:
        return {name: entry.get("sha256") for name, entry in x.manifest["files"].items()}

    return a.model_config == b.model_config and a.vocab == b.vocab and sums(a) == sums(b)


def _failure_key(path: Path, model_dir: Path) -> tuple[Path, str]:
    return path, version_fingerprint(path, model_dir)


def _manifest_sha(path: Path) -> str:
    try:
        return sha256_file(path / "manifest.json")
    except OSError:
        return ""


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """asyncio.to_thread on a daemon thread of its own: a load cancelled by a stop (checksums
    of a large artifact, building its session) is not waited for at exit, which the default
    executor's threads are (asyncio.run shuts it down, joining them)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():  # cancelled meanwhile: nobody wants the result
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn(*args))
        except BaseException as e:  # handed to the loop, which raises it in the awaiting task
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed meanwhile (the server stopped): nobody waits
            pass

    threading.Thread(target=run, name="nextchar-load", daemon=True).start()
    return await future


def _reason(e: BaseException) -> str:
    if isinstance(e, ArtifactError | ReloadFailed | FailedPrecondition):
        return str(e)
    return f"{type(e).__name__}: {e}"


class ModelSlot:
    """One model name: its source directory, settings, and the version served now."""

    def __init__(self, registry: ModelRegistry, name: str, source: ModelSource,
                 settings: ServerSettings, has_config: bool = False) -> None:
        self.registry = registry
        self.name = name
        self.source = source
        self.base_settings = settings
        self.settings = settings
        self.has_config = has_config  # a repository model: its config.json applies
        self.current: ModelRuntime | None = None
        self.state = ModelState.UNAVAILABLE
        self.reason = ""
        self.wanted = True  # should be loaded: not unloaded by an operator
        self._lock = asyncio.Lock()
        self._failed: dict[tuple[Path, str], tuple[float, str]] = {}  # -> (when, why)
        self._served_settings = settings  # what the served version was started with
        self._opened: tuple[Path, Artifact, Backend] | None = None  # from open_initial()
        self._fallback_reason = ""  # open_initial(): the newer versions that failed
        self._last_problem = ""

    # -- start-up (blocking part, before the port opens) -----------------------------------
    def open_initial(self, fail_fast: bool) -> None:
        """Opens the highest version that loads (a broken newest one falls back to the next).

        fail_fast: a plain artifact's error propagates (`--model` fails the start).
        """
        try:
            self._read_config()
            candidates = self.source.candidates()
        except ArtifactError as e:
            if fail_fast:
                raise
            self._fail(str(e))
            return
        first_error: Exception | None = None
        newer: list[str] = []  # the newer versions that failed: the served one's reason
        for path in candidates:
            try:
                artifact, backend = open_model(path, self.settings)
                self._opened = (path, artifact, backend)
                self._fallback_reason = "; ".join(newer)
                return
            except Exception as e:  # ArtifactError, or a runtime refusing the model file
                if fail_fast and not self.source.versioned:
                    raise
                first_error = first_error or e
                self._failed[_failure_key(path, self.source.root)] = (time.monotonic(), _reason(e))
                newer.append(f"version {path.name} not loaded ({_reason(e)})")
                self.registry.count_reload(self.name, "failure")
                log.error("model %s: version %s not loaded, trying an older one: %s",
                          self.name, path.name, e)
        message = f"{self.source.root}: no version loads (newest: {first_error})"
        if fail_fast:
            raise ArtifactError(message)
        self._fail(message)

    async def start_initial(self) -> bool:
        """Warms up and probes what open_initial() opened; True when it serves."""
        if self._opened is None:
            return False
        path, artifact, backend = self._opened
        self._opened = None
        self.state = ModelState.LOADING
        try:
            rt = await self._start(path, artifact, backend, None)
        except Exception as e:
            self.registry.count_reload(self.name, "failure")
            self._fail(f"version {path.name} not loaded ({_reason(e)})")
            raise
        self._swap(rt, self._fallback_reason)
        self._served_settings = self.settings
        self.registry.count_reload(self.name, "success")  # loads count, the first one too
        return True

    # -- load / reload / unload ------------------------------------------------------------
    async def load(self, *, retry_failed: bool = True, reason: str = "admin",
                   keep_unloaded: bool = False) -> LoadOutcome:
        """Loads the newest version if it is not the one served (and the model if it is not
        loaded, falling back to older versions then), or the served one again when config.json
        changed. ReloadFailed when nothing new serves; with retry_failed False (polling) a
        loaded model's problems are logged once and returned as the outcome's reason.

        keep_unloaded (a reload, a poll): NotFound if an operator unloaded the model, checked
        under the lock, so an unload queued before it is not undone."""
        async with self._lock:
            return await self._load_held(retry_failed, reason, keep_unloaded)

    async def load_to_end(self, *, reason: str, keep_unloaded: bool = False) -> LoadOutcome:
        """load() for a caller that may go away (a client's deadline cancels its handler): once
        the model's lock is taken, in the callers' order, the load runs to its end, as Triton's
        do; the model ends READY or FAILED, never LOADING with nobody to finish it. The
        caller, if still there, gets the outcome."""
        await self._lock.acquire()
        task = asyncio.get_running_loop().create_task(
            self._load_held(True, reason, keep_unloaded))
        # Released by a callback, not a finally: a task cancelled before its first step (the
        # server stopping) never runs its body.
        task.add_done_callback(lambda _: self._lock.release())
        self.registry.keep(task, load=True)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():  # the caller went away: the load goes on
                raise
            # The stop ended the load: its caller gets the drain's answer (UNAVAILABLE, 503)
            # rather than a cancelled call (a bare 500 over HTTP).
            raise NotReady("server is shutting down: the load was stopped; load the model "
                           "on another replica or after the restart") from None

    async def _load_held(self, retry_failed: bool, reason: str,
                         keep_unloaded: bool) -> LoadOutcome:
        """load(), with the model's lock held."""
        if self.registry.slots.get(self.name) is not self:  # polling forgot it meanwhile
            raise NotFound(f"model '{self.name}' is no longer in the repository (its folder "
                           f"{self.source.root} is gone)")
        if keep_unloaded and not self.wanted:
            raise NotFound(f"model '{self.name}' is unloaded: reload takes the newest "
                           f"version of a loaded model; load it with LoadModel (nextchar "
                           f"load {self.name})")
        if not self.wanted:  # a wanted model counts in readiness: tell the health service
            self.wanted = True
            self.registry.changed()
        try:
            return await self._load_newest(retry_failed, reason)
        except asyncio.CancelledError:
            # Cancelled mid-load (the server stopping): not LOADING for good.
            if self.current is None and self.state is ModelState.LOADING:
                self.state, self.reason = ModelState.UNAVAILABLE, "load cancelled"
                self.registry.changed()
            raise

    async def _load_newest(self, retry_failed: bool, reason: str) -> LoadOutcome:
        """The load itself (the lock held, the checks done)."""
        current = self.current
        served = current.version if current is not None else ""
        served_sha = current.artifact.sha256 if current is not None else ""
        try:
            self._read_config()
            candidates = self.source.candidates()
        except ArtifactError as e:
            if current is None:
                self._fail(str(e))
                raise ReloadFailed(str(e)) from e
            # A bad config.json (or an unreadable folder) under a served model: it keeps
            # serving, and ListModels, the index and the failure counter say why.
            problem = f"{e}; still serving version {served}"
            if retry_failed or problem != self.reason:
                self.registry.count_reload(self.name, "failure")
            if problem != self.reason:
                self.reason = problem
                self.registry.changed()
            self._problem(problem)
            if retry_failed:  # a caller asked: the load did not happen, say so
                raise ReloadFailed(f"model {self.name}: {e}; still serving version "
                                   f"{served}") from e
            return LoadOutcome(self.name, False, served, served, served_sha, str(e))
        if current is not None:
            newest = candidates[0]
            if newest == current.artifact.path and _manifest_sha(newest) == served_sha \
                    and self.settings == self._served_settings:
                if self.reason:  # a newer version that failed is gone: nothing to explain
                    self.reason = ""
                    self.registry.changed()
                return LoadOutcome(self.name, False, served, served, served_sha,
                                   f"version {served} is already the newest")
            candidates = candidates[:1]  # a running model never falls back to older ones
        errors = []
        tried = []  # the failures of this call's attempts (not the skipped versions)
        for path in candidates:
            key = _failure_key(path, self.source.root)
            failed = self._failed.get(key)
            if failed is not None and (not retry_failed
                                       or time.monotonic() - failed[0] < RETRY_AFTER_S):
                # Polling re-verifies only after a change; a load call also after 30 s.
                when = (f"before {RETRY_AFTER_S:.0f}s or a change to its files or config.json"
                        if retry_failed else "until its files or config.json change")
                errors.append(f"version {path.name} failed {time.monotonic() - failed[0]:.0f}s "
                              f"ago ({failed[1]}); not re-verified {when}")
                continue
            log.info("%s: loading model %s from %s (serving %s)", reason, self.name, path,
                     served or "nothing")
            if current is None and self.state is not ModelState.LOADING:
                self.state = ModelState.LOADING
                self.registry.changed()
            try:
                artifact, backend = await _in_daemon_thread(open_model, path, self.settings)
                rt = await self._start(path, artifact, backend, current)
            except Exception as e:
                why = _reason(e)
                self._failed[key] = (time.monotonic(), why)
                self.registry.count_reload(self.name, "failure")
                log.error("%s: model %s version %s not loaded: %s", reason, self.name,
                          path.name, why, exc_info=not isinstance(e, ArtifactError | FailedPrecondition))
                errors.append(f"version {path.name} not loaded ({why})")
                tried.append(errors[-1])
                continue
            self._failed.pop(key, None)
            # Served after newer versions failed (a model's first load falls back): say so.
            self._swap(rt, "; ".join(tried))
            self._served_settings = self.settings
            self.registry.count_reload(self.name, "success")
            log.info("%s: now serving model %s version %s (artifact %s, sha256 %s…), was %s",
                     reason, self.name, rt.version, artifact.version, artifact.sha256[:12],
                     served or "nothing")
            self._last_problem = ""
            return LoadOutcome(self.name, True, served, rt.version, artifact.sha256)
        message = "; ".join(errors)
        if current is None:
            # A FAILED model's reason changes only with a new attempt: the skipped
            # versions' text holds their age, and a reason that changed every poll would
            # notify every watcher. Any other state (unloaded, loading) becomes FAILED.
            if tried or self.state is not ModelState.FAILED:
                self._fail(message)
            raise ReloadFailed(f"model {self.name}: {message}")
        # Still READY on the old version; ListModels and RepositoryIndex say why the newer
        # one is not served (Triton's index lists a failed version with its reason).
        if tried and self.reason != "; ".join(tried):
            self.reason = "; ".join(tried)
            self.registry.changed()
        if not retry_failed:
            return LoadOutcome(self.name, False, served, served, served_sha, message)
        raise ReloadFailed(f"model {self.name}: {message}; still serving version {served}")

    async def unload(self) -> str:
        """Stops serving: new calls get NOT_FOUND; returns the version that was served."""
        async with self._lock:
            return self._unload_locked()

    def _unload_locked(self) -> str:
        self.wanted = False
        rt, self.current = self.current, None
        if rt is None:
            self.state, self.reason = ModelState.UNAVAILABLE, "not loaded"
            self.registry.changed()
            return ""
        self.state, self.reason = ModelState.UNLOADING, "unloaded; last calls finishing"
        self.registry.on_unserved(self.name)
        self.registry.changed()
        self.registry.retire(rt)
        log.info("model %s version %s unloaded (%d call(s) still running)", self.name,
                 rt.version, rt.calls)
        return rt.version

    # -- helpers ---------------------------------------------------------------------------
    def _read_config(self) -> None:
        """Re-reads config.json: an operator fixes it, then loads the model again."""
        if self.has_config:
            self.settings = model_settings(self.base_settings, self.source.root)

    async def _start(self, path: Path, artifact: Artifact, backend: Backend,
                     served: ModelRuntime | None) -> ModelRuntime:
        version = self.source.version_of(path, artifact.version)
        # Statistics per version since its load, as Triton keeps them: a new version starts
        # at 0, while the old one finishes its calls into its own.
        rt = ModelRuntime.assemble(self.name, version, artifact, backend, self.settings,
                                   self.registry.metrics, ModelStats(), self.registry.tracing)
        try:
            await rt.start(warmup=True if served is not None else None)
            if served is not None and served.probe_logits is not None \
                    and same_weights(artifact, served.artifact):
                assert rt.probe_logits is not None
                diff = float(np.max(np.abs(rt.probe_logits - served.probe_logits)))
                if diff > PARITY_ATOL:
                    raise ReloadFailed(f"parity: same weights as the served version but probe "
                                       f"logits differ by {diff:.3g} > {PARITY_ATOL}")
        except BaseException:
            await rt.close()
            raise
        return rt

    def _swap(self, rt: ModelRuntime, reason: str = "") -> None:
        """Points new calls at `rt` in one step; the old version closes after its last call.
        `reason`: why a newer version is not the one served, if one failed."""
        old, self.current = self.current, rt
        self.state, self.reason = ModelState.READY, reason
        self.registry.on_served(rt)
        self.registry.changed()
        if old is not None:
            self.registry.retire(old)

    def _fail(self, message: str) -> None:
        if self.current is None:
            self.state, self.reason = ModelState.FAILED, message
            self.registry.changed()

    def _problem(self, message: str) -> None:
        if message != self._last_problem:  # once per distinct problem, not every poll
            log.warning("model %s: %s", self.name, message)
            self._last_problem = message


class ModelRegistry:
    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.slots: dict[str, ModelSlot] = {}
        self.default_name = ""
        self.retiring: set[ModelRuntime] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # closing runtimes
        self._loads: set[asyncio.Task[Any]] = set()  # loads whose callers may have gone
        self._poll_task: asyncio.Task[None] | None = None
        self._single = settings.model_repository is None or "model" in settings.model_fields_set
        self._primary = ""  # --model's name: its failure fails the start
        self.on_change: Callable[[], None] | None = None  # readiness may have changed

    # -- start-up --------------------------------------------------------------------------
    def open(self) -> None:
        """Blocking: finds the models and opens each one's newest loadable version.

        `--model` fails fast (its error propagates); a repository model that fails is FAILED
        and the others serve."""
        s = self.settings
        if self._single:
            slot = ModelSlot(self, "", ModelSource(s.model), s)
            slot.open_initial(fail_fast=True)
            assert slot._opened is not None
            slot.name = self._primary = slot._opened[1].name
            self.slots[slot.name] = slot
            self.default_name = slot.name
        if s.model_repository is not None:
            for name, path in scan_repository(s.model_repository).items():
                if name in self.slots:
                    raise ArtifactError(f"model name {name!r} is both --model's manifest name "
                                        f"and a folder of --model-repository")
                self._add_slot(name, path).open_initial(fail_fast=False)
            if not self.slots:
                raise ArtifactError(f"--model-repository {s.model_repository}: no model folders")
        if s.default_model:
            if s.default_model not in self.slots:
                raise ArtifactError(f"--default-model {s.default_model!r} is not a model here "
                                    f"({', '.join(self.slots)})")
            self.default_name = s.default_model
        elif not self.default_name and len(self.slots) == 1:
            self.default_name = next(iter(self.slots))

    def _add_slot(self, name: str, path: Path) -> ModelSlot:
        slot = ModelSlot(self, name, ModelSource(path), self.settings, has_config=True)
        self.slots[name] = slot
        return slot

    async def start(self) -> None:
        """Warm-up and probe of every opened model; `--model`'s failure fails the start."""
        for name, slot in list(self.slots.items()):
            try:
                await slot.start_initial()
            except Exception as e:
                if name == self._primary:
                    raise ArtifactError(f"{slot.source.root}: {_reason(e)}") from e
                log.error("model %s not served: %s", name, _reason(e))

    # -- leases (the hot path: no await, no lock) --------------------------------------------
    def serving(self, name: str) -> ModelRuntime:
        """The runtime serving `name` (empty: the default model), without a lease: NotFound,
        NotReady or FailedPrecondition, saying why, when none serves."""
        slot = self.slots.get(name or self.default_name)
        if slot is None:
            raise self._unknown(name)
        rt = slot.current
        if rt is None:
            raise self._not_serving(slot)
        return rt

    def acquire(self, name: str) -> ModelRuntime:
        """`serving(name)` with one more call on it; the caller must release() it."""
        rt = self.serving(name)
        rt.calls += 1
        return rt

    def hold(self, rt: ModelRuntime) -> ModelRuntime:
        """One more call on `rt`, which the caller already holds a lease on (so it is open):
        work that must stay on one version after the lease it began with ends."""
        assert rt.calls > 0, "hold() needs a lease on the runtime"
        rt.calls += 1
        return rt

    def release(self, rt: ModelRuntime) -> None:
        rt.calls -= 1
        if rt.retired and rt.calls == 0:
            self._close_soon(rt)

    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name or self.default_name)
        if slot is None:
            raise self._unknown(name)
        return slot

    def _unknown(self, name: str) -> Exception:
        names = ", ".join(sorted(self.slots)) or "none"
        if not name:
            return InvalidInput(f"no model named and this server has no default model: set the "
                                f"model name (one of: {names})")
        return NotFound(f"model '{name}' is not served here; models: {names}")

    @staticmethod
    def _not_serving(slot: ModelSlot) -> Exception:
        if slot.state is ModelState.LOADING:
            return NotReady(f"model '{slot.name}' is loading; retry shortly")
        if slot.state is ModelState.FAILED:
            return FailedPrecondition(f"model '{slot.name}' failed to load: {slot.reason}")
        why = slot.reason if slot.reason and slot.reason != "not loaded" else ""
        return NotFound(f"model '{slot.name}' is not loaded{f' ({why})' if why else ''}; "
                        f"load it (`nextchar load {slot.name}`, Admin.LoadModel, or KServe's "
                        f"RepositoryModelLoad / POST /v2/repository/models/{slot.name}/load)")

    # -- retiring ----------------------------------------------------------------------------
    def retire(self, rt: ModelRuntime) -> None:
        rt.retired = True
        self.retiring.add(rt)
        if rt.calls == 0:
            self._close_soon(rt)

    def _close_soon(self, rt: ModelRuntime) -> None:
        async def close() -> None:
            await rt.close()
            self.retiring.discard(rt)
            slot = self.slots.get(rt.name)
            # Another retired version of it may still run (unload, load, unload again): the
            # slot stays UNLOADING until the last one closed.
            others = any(r.name == rt.name for r in self.retiring)
            if slot is not None and slot.current is None and not others \
                    and slot.state is ModelState.UNLOADING:
                slot.state, slot.reason = ModelState.UNAVAILABLE, "unloaded"
                self.changed()

        self.keep(asyncio.get_running_loop().create_task(close()))

    @property
    def old_versions(self) -> list[str]:
        """Versions replaced or unloaded whose calls are still running."""
        return sorted(rt.version for rt in self.retiring)

    def runtimes(self) -> list[ModelRuntime]:
        """Every runtime still open: served ones and retiring ones."""
        served = [s.current for s in self.slots.values() if s.current is not None]
        return [*served, *self.retiring]

    # -- readiness ---------------------------------------------------------------------------
    def all_ready(self) -> bool:
        wanted = [s for s in self.slots.values() if s.wanted]
        ready = [s for s in wanted if s.state is ModelState.READY]
        # Nothing ready is never ready, also when nothing is wanted (every model unloaded):
        # a probe must not route calls that can only answer NOT_FOUND.
        if self.settings.strict_readiness:
            return bool(ready) and len(ready) == len(wanted)
        return bool(ready)

    # -- polling and explicit control --------------------------------------------------------
    async def load(self, name: str, reason: str = "admin") -> LoadOutcome:
        repo = self.settings.model_repository
        if name and name not in self.slots and repo is not None:
            path = model_folder(repo, name)
            if path is None:  # not added: an unknown name leaves readiness as it was
                raise NotFound(f"model '{name}' is not in the repository: a model is a folder "
                               f"directly under {repo} holding an artifact or <version>/ "
                               f"artifacts; models: {', '.join(sorted(self.slots)) or 'none'}")
            self._add_slot(name, path)
        return await self.slot(name).load_to_end(reason=reason)

    def keep(self, task: asyncio.Task[Any], load: bool = False) -> None:
        """A task of the registry's that nobody may await: close() waits for it (a load it
        cancels first: a stopping server has no use for a new version, and a second signal
        must not wait for one), and its exception is retrieved (whoever raised it logged it)."""
        tasks = self._loads if load else self._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def unload(self, name: str) -> str:
        return await self.slot(name).unload()

    def start_polling(self) -> None:
        if self.settings.poll_s > 0 and self._poll_task is None:
            self._poll_task = asyncio.create_task(self._poll(), name="nextchar-model-poll")

    async def stop_polling(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None

    async def poll_once(self, reason: str = "poll") -> None:
        repo = self.settings.model_repository
        if repo is not None:
            try:
                found = scan_repository(repo)
            except ArtifactError as e:
                log.warning("%s", e)
                found = {}
            else:
                await self._forget_removed(found, reason)
            for name, path in found.items():
                if name not in self.slots:
                    log.info("%s: new model folder %s", reason, path)
                    self._add_slot(name, path)
        for slot in list(self.slots.values()):
            if not slot.wanted:
                continue
            try:
                await slot.load(retry_failed=False, reason=reason, keep_unloaded=True)
            except ReloadFailed:
                pass  # logged and counted by load()
            except NotFound:
                pass  # unloaded or forgotten since the loop began

    async def _forget_removed(self, found: dict[str, Path], reason: str) -> None:
        """Models whose folder left the repository (or stopped holding a model): a FAILED one
        would keep the server not ready for a folder that is gone."""
        for name, slot in list(self.slots.items()):
            if name in found or name == self._primary:
                continue
            # Under its lock: a load running now ends first, and what it served is unloaded
            # here rather than left in a slot nobody can reach (never closed).
            async with slot._lock:
                repo = self.settings.model_repository
                if repo is not None and model_folder(repo, name) is not None:
                    continue  # back while a load of it ran: the scan is stale
                if slot.current is not None:
                    log.info("%s: model folder %s is gone: unloading model %s", reason,
                             slot.source.root, name)
                    slot._unload_locked()
                else:
                    log.info("%s: model folder %s is gone: forgetting model %s", reason,
                             slot.source.root, name)
                if self.slots.get(name) is slot:
                    del self.slots[name]
                    self.changed()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die silently
                log.exception("poll: model check failed")

    async def cancel_loads(self) -> None:
        """Ends the loads in progress (each model goes back to what it was, or UNAVAILABLE)."""
        loads = list(self._loads)
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_polling()
        await self.cancel_loads()
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        for rt in self.runtimes():
            await rt.close()
        self.retiring.clear()

    # -- hooks -------------------------------------------------------------------------------
    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def count_reload(self, model: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(model, result).inc()

    def on_served(self, rt: ModelRuntime) -> None:
        if self.metrics is not None:
            self.metrics.set_model(rt)

    def on_unserved(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.clear_model(name)
