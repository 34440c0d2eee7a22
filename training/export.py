"""Export a run to the serving artifact (docs/artifact.md), behind a parity gate.

    python -m nextchar.training.cli export runs/lm -o artifacts/lm [--version 20261127-101500]

Writes model.ts (torch.jit.trace), model.onnx (legacy exporter, opset 17, dynamic B and T on
every input and output) and manifest.json into a temporary folder beside the target, runs the
parity gate there, and only then renames it into place: a failed export leaves nothing behind.

The gate runs eager PyTorch, the TorchScript file and both ONNX files under ONNX Runtime on
the same random batches (mixed lengths including 1, batch 1, zero and random initial state) and
compares what the server returns: log-probabilities (next character and every position), the
top-5 order, and the state, within 1e-4 + 2e-5 x the case's max |logit| (or |state|). A graph
that fails (or fails `onnx.checker`) is left out of the artifact with a warning; the export is
refused only when no graph passes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    BEST_FILENAME,
    FILENAME,
    checkpoint_path,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .data import sha256_file
from .errors import CheckpointError, ExportError, ParityError
from .model import CharRNN, CharRNNConfig
from .names import name_problem
from .onnx_loop import build_loop_graph

FORMAT = "nextchar-artifact"
FORMAT_VERSION = 1
OPSET = 17
LOOP_ONNX = "model_loop.onnx"  # the server's artifact reader knows this name too
# The gate's bound on log-probabilities and state: ABS + REL * magnitude (tolerance_for).
ABS_TOLERANCE = 1e-4
REL_TOLERANCE = 2e-5
TOP_K = 5  # the ranking the server's top-k answers show must agree this deep
# Each graph by the name the gate and the manifest's parity use, and its file.
GRAPH_FILES = {"torchscript": "model.ts", "onnxruntime": "model.onnx",
               "onnxruntime_loop": LOOP_ONNX}
INPUT_NAMES = ["ids", "lengths", "state"]
OUTPUT_NAMES = ["logits", "state_out", "position_logits"]
DYNAMIC_AXES = {
    "ids": {0: "B", 1: "T"},
    "lengths": {0: "B"},
    "state": {1: "B"},
    "logits": {0: "B"},
    "state_out": {1: "B"},
    "position_logits": {0: "B", 1: "T"},
}
# (batch, time) of each parity case; lengths are drawn in [1, T] with 1 and T always present.
PARITY_SHAPES = [(1, 1), (1, 9), (2, 1), (3, 5), (4, 17), (8, 33), (5, 64), (16, 12)]

log = logging.getLogger(__name__)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def example_inputs(config: CharRNNConfig, batch: int, time: int, generator: torch.Generator,
                   random_state: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, T), lengths (B,) with 1 and T both present when B > 1, state (S, B, H)."""
    ids = torch.randint(0, config.vocab_size, (batch, time), generator=generator)
    lengths = torch.randint(1, time + 1, (batch,), generator=generator)
    lengths[0] = time
    if batch > 1:
        lengths[-1] = 1
    for b in range(batch):
        ids[b, lengths[b]:] = 0  # right padding, pad id 0
    state = torch.zeros(config.state_layers, batch, config.hidden_size)
    if random_state:
        state = torch.randn(config.state_layers, batch, config.hidden_size, generator=generator)
        state = 0.5 * state
    return ids, lengths, state


def _trace(model: CharRNN, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    # The tracer warns that RNN shape checks become constants; the parity gate runs the trace
    # on other batch and time sizes, which is what proves it generalizes.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, example, check_trace=False)


@contextlib.contextmanager
def _native_stderr_hidden() -> Iterator[None]:
    """The legacy exporter's C++ code warns on fd 2 that PackPadded lacks shape inference; the
    parity gate is what proves the graph, so those lines stay out of the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _export_onnx(model: CharRNN, example: tuple[torch.Tensor, ...], path: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings(), _native_stderr_hidden():
        warnings.simplefilter("ignore")  # the legacy exporter warns about batch_first RNNs
        torch.onnx.export(
            model, example, str(path), dynamo=False, opset_version=OPSET,
            input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES,
        )


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejects the exported model: {str(e).splitlines()[0]}") \
            from None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def tolerance_for(magnitude: float) -> float:
    """Allowed |difference| for values of this magnitude (max |logit| or |state|): float32
    sums of H products in another order differ by a relative ~1e-6, so a fixed absolute
    bound fails trained models with large logits while a real defect is orders above it."""
    return ABS_TOLERANCE + REL_TOLERANCE * magnitude


def _ranking_error(want_lp: np.ndarray, have_lp: np.ndarray, tol: float, k: int) -> str | None:
    """The top-k characters must come out in the same order, except where eager's own
    log-probabilities of the swapped characters are within tol (a numerical tie)."""
    k = min(k, want_lp.shape[-1])
    want_top = np.argsort(-want_lp, axis=-1, kind="stable")[..., :k]
    have_top = np.argsort(-have_lp, axis=-1, kind="stable")[..., :k]
    rows_w, rows_h = want_top.reshape(-1, k), have_top.reshape(-1, k)
    flat = want_lp.reshape(-1, want_lp.shape[-1])
    for r in np.nonzero((rows_w != rows_h).any(axis=1))[0]:
        gap = np.abs(flat[r, rows_w[r]] - flat[r, rows_h[r]]).max()
        if gap > tol:
            return f"top-{k} ranking differs (eager log-prob gap {gap:.3g} > {tol:.3g})"
    return None


def _compare(backend: str, expected: list[np.ndarray], got: list[np.ndarray],
             lengths: np.ndarray, batch: int, time: int) -> tuple[float, float, float]:
    """(log-prob diff, state diff, tolerance) of one case; ParityError when off."""
    where = f"(batch {batch}, time {time})"
    for name, want, have in zip(OUTPUT_NAMES, expected, got, strict=False):
        if want.shape != have.shape:
            raise ParityError(f"{backend} {name} has shape {have.shape}, eager {want.shape} "
                              f"{where}")
    logits, state, positions = expected[0], expected[1], expected[2] if len(got) > 2 else None
    valid = np.arange(time)[None, :] < lengths[:, None]  # (B, T)
    magnitude = float(np.abs(logits).max()) if logits.size else 0.0
    if positions is not None and valid.any():
        magnitude = max(magnitude, float(np.abs(positions[valid]).max()))
    tol = tolerance_for(magnitude)
    pairs = [("logits", _log_softmax(logits), _log_softmax(got[0]))]
    if positions is not None and valid.any():
        pairs.append(("position_logits", _log_softmax(positions[valid]),
                      _log_softmax(got[2][valid])))
    lp_diff = 0.0
    for name, want_lp, have_lp in pairs:
        diff = float(np.max(np.abs(want_lp - have_lp))) if want_lp.size else 0.0
        if not diff <= tol:  # also catches nan
            raise ParityError(f"{backend} {name}: log-probabilities differ from eager by "
                              f"{diff:.3g} > {tol:.3g} (max |logit| {magnitude:.3g}) {where}")
        ranking = _ranking_error(want_lp, have_lp, tol, TOP_K)
        if ranking:
            raise ParityError(f"{backend} {name}: {ranking} {where}")
        lp_diff = max(lp_diff, diff)
    # The state goes back to callers who continue a text (Generate, continuation state).
    state_tol = tolerance_for(float(np.abs(state).max()) if state.size else 0.0)
    state_diff = float(np.max(np.abs(state - got[1]))) if state.size else 0.0
    if not state_diff <= state_tol:
        raise ParityError(f"{backend} state_out differs from eager by {state_diff:.3g} > "
                          f"{state_tol:.3g} {where}")
    return lp_diff, state_diff, tol


def parity_gate(model: CharRNN, graphs: dict[str, Path], seed: int = 0) -> dict[str, Any]:
    """Runs each graph (`torchscript`, `onnxruntime`, `onnxruntime_loop` -> its file) against
    eager over the parity cases, comparing what the server returns: log-probabilities of the
    next character and of every position, the top-k order, and the state. A graph's first
    failing case excludes it; the others go on.

    Returns {"max_abs_diff": {graph: worst log-prob diff}, "max_state_diff": {...},
    "failed": {graph: reason}, "tolerance": loosest bound applied, "max_abs_logit", "cases"}.
    """
    import onnxruntime as ort

    runners: dict[str, Callable[[tuple[torch.Tensor, ...]], list[list[np.ndarray]]]] = {}
    failed: dict[str, str] = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for graph, path in graphs.items():
        try:
            if graph == "torchscript":
                scripted = torch.jit.load(str(path))

                def run_ts(inputs, scripted=scripted):
                    with torch.no_grad():
                        return [[t.numpy() for t in scripted(*inputs)]]
                runners[graph] = run_ts
            else:
                session = ort.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])

                def run_ort(inputs, session=session, loop=graph == "onnxruntime_loop"):
                    feeds = dict(zip(INPUT_NAMES, (t.numpy() for t in inputs), strict=False))
                    if not loop:
                        return [session.run(OUTPUT_NAMES, feeds)]
                    # With and without positions, as the server runs it.
                    return [session.run(OUTPUT_NAMES, {**feeds, "positions": np.array(True)}),
                            session.run(OUTPUT_NAMES[:2],
                                        {**feeds, "positions": np.array(False)})]
                runners[graph] = run_ort
        except Exception as e:
            failed[graph] = f"{graph} does not load: {type(e).__name__}: " \
                            f"{(str(e).splitlines() or [''])[0][:200]}"
    generator = torch.Generator().manual_seed(seed)
    worst_lp = dict.fromkeys(graphs, 0.0)
    worst_state = dict.fromkeys(graphs, 0.0)
    loosest, max_logit, cases = ABS_TOLERANCE, 0.0, 0
    for batch, time in PARITY_SHAPES:
        for random_state in (True, False):
            inputs = example_inputs(model.config, batch, time, generator, random_state)
            with torch.no_grad():
                expected = [t.numpy() for t in model(*inputs)]
            max_logit = max(max_logit, float(np.abs(expected[0]).max()))
            for graph, run in runners.items():
                if graph in failed:
                    continue
                try:
                    for got in run(inputs):
                        lp, st, tol = _compare(graph, expected, got, inputs[1].numpy(),
                                               batch, time)
                        worst_lp[graph] = max(worst_lp[graph], lp)
                        worst_state[graph] = max(worst_state[graph], st)
                        loosest = max(loosest, tol)
                except ParityError as e:
                    failed[graph] = str(e)
                except Exception as e:  # a graph that crashes on some shape is as unusable
                    failed[graph] = (f"{graph} fails on batch {batch}, time {time}: "
                                     f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            cases += 1
    return {"max_abs_diff": {g: worst_lp[g] for g in graphs if g not in failed},
            "max_state_diff": {g: worst_state[g] for g in graphs if g not in failed},
            "failed": failed, "tolerance": loosest,
            "tolerance_rule": f"{ABS_TOLERANCE:g} + {REL_TOLERANCE:g} x max|logit| (or "
                              f"|state|) per case, on log-probabilities, state and top-{TOP_K}",
            "max_abs_logit": max_logit, "cases": cases}


def _io_spec(config: CharRNNConfig) -> tuple[list[dict], list[dict]]:
    S, H, V = config.state_layers, config.hidden_size, config.vocab_size
    inputs = [
        {"name": "ids", "dtype": "int64", "shape": ["B", "T"]},
        {"name": "lengths", "dtype": "int64", "shape": ["B"]},
        {"name": "state", "dtype": "float32", "shape": [S, "B", H]},
    ]
    outputs = [
        {"name": "logits", "dtype": "float32", "shape": ["B", V]},
        {"name": "state_out", "dtype": "float32", "shape": [S, "B", H]},
        {"name": "position_logits", "dtype": "float32", "shape": ["B", "T", V]},
    ]
    return inputs, outputs


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars to numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _check_out_path(out_dir: str | Path) -> Path:
    """-o must name a folder of its own: "" is the working folder (Path("") is "."), which
    the final rename cannot replace, so it would fail only after the whole export."""
    if not str(out_dir).strip():
        raise ExportError("-o is empty: name the artifact folder to write")
    path = Path(out_dir)
    if path.name in ("", ".", ".."):
        raise ExportError(f"-o {out_dir} is not a folder export can write: name a new or "
                          "artifact folder (such as artifacts/mine)")
    return path


def _prepare_target(out_dir: Path) -> None:
    """The target may be absent, empty, or an earlier artifact (replaced) holding nothing but
    artifact files: anything else in it would be lost with it."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text("utf-8"))
        is_artifact = manifest.get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_artifact = False
    if not is_artifact:
        raise ExportError(f"{out_dir} is not empty and holds no nextchar artifact; "
                          "refusing to replace it")
    artifact_files = {"manifest.json", *GRAPH_FILES.values()}
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries
               if p.name not in artifact_files or not p.is_file()]
    if foreign:
        raise ExportError(f"{out_dir} holds an artifact and also {', '.join(foreign)}, which "
                          "replacing it would delete: move them away or choose another -o")


def _checkpoint_choice(source: str | Path, which: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint to export and what the manifest says about the choice: which file, its
    step and validation loss, and the run's last step."""
    path = checkpoint_path(source, which)
    ckpt = load_checkpoint(path)
    metrics = ckpt.get("metrics") or {}
    choice: dict[str, Any] = {
        "file": path.name,
        "selected": "best" if path.name == BEST_FILENAME else
                    ("last" if path.name == FILENAME else "file"),
        "step": ckpt.get("step"),
        "val_nats_per_char": metrics.get("val_nats_per_char"),
    }
    last_path = path.parent / FILENAME
    if path.name == BEST_FILENAME and last_path.exists():
        # Only for the record (the run's last step): a damaged checkpoint.pt must not keep
        # an intact best.pt from being exported.
        try:
            last = load_checkpoint(last_path)
        except CheckpointError as e:
            choice["warning"] = f"the run's last step is left out of the manifest: {e}"
            log.warning("%s", choice["warning"])
        else:
            choice["last_step"] = last.get("step")
            choice["last_val_nats_per_char"] = (last.get("metrics") or {}).get(
                "val_nats_per_char")
    elif Path(source).is_dir() and which == "best":
        choice["note"] = f"no {BEST_FILENAME} in the run (the hello preset, a run stopped " \
                         f"before its first validation, or one from before best tracking): " \
                         f"exported {FILENAME}"
    return ckpt, choice


def export_artifact(run_dir_or_checkpoint_path: str | Path, out_dir: str | Path,
                    version: str | None = None, *, name: str | None = None,
                    seed: int = 0, checkpoint: str = "best") -> Path:
    """Exports a run's best checkpoint (`checkpoint="last"`: its last one; a file: that file)
    to out_dir, replacing an earlier artifact there, and returns out_dir.

    Graphs that fail the parity gate or onnx.checker are left out (the manifest's
    `parity.failed` says why, and a warning is logged); ParityError when none passes.
    Raises CheckpointError, ExportError or ParityError; on error out_dir is untouched."""
    if not str(run_dir_or_checkpoint_path).strip():
        raise ExportError("the run to export is empty: name a run folder or checkpoint file")
    out_dir = _check_out_path(out_dir)
    for value, what in ((name, "--name"), (version, "--version")):
        if value is not None and name_problem(value, what):
            raise ExportError(str(name_problem(value, what)))
    ckpt, choice = _checkpoint_choice(run_dir_or_checkpoint_path, checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint_path(run_dir_or_checkpoint_path, checkpoint))
    config = model.config
    name = name or ckpt.get("name") or f"nextchar-{config.cell}"
    problem = name_problem(str(name), "the run's name")  # a run from before names were checked
    if problem:
        raise ExportError(f"{problem}; pass --name")
    _prepare_target(out_dir)
    now = datetime.now(timezone.utc)
    version = version or now.strftime("%Y%m%d-%H%M%S")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        example = example_inputs(config, 3, 7, torch.Generator().manual_seed(seed))
        graphs = {g: tmp / f for g, f in GRAPH_FILES.items()}
        try:
            _trace(model, example).save(str(graphs["torchscript"]))
            _export_onnx(model, example, graphs["onnxruntime"])
            # The CPU-fast graph (training/onnx_loop.py); the server prefers it on CPU.
            graphs["onnxruntime_loop"].write_bytes(
                build_loop_graph(model, OPSET).SerializeToString())
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"export failed: {type(e).__name__}: {str(e).splitlines()[0]}") \
                from None
        unchecked = {}
        for graph in ("onnxruntime", "onnxruntime_loop"):
            try:
                _check_onnx(graphs[graph])
            except ExportError as e:
                unchecked[graph] = f"{GRAPH_FILES[graph]}: {e}"
        parity = parity_gate(model, {g: p for g, p in graphs.items() if g not in unchecked},
                             seed=seed)
        parity["failed"] = {**unchecked, **parity["failed"]}
        for graph, reason in parity["failed"].items():
            graphs[graph].unlink(missing_ok=True)
            log.warning("%s left out of the artifact: %s", GRAPH_FILES[graph], reason)
        kept = [g for g in graphs if g not in parity["failed"]]
        if not kept:
            first = next(iter(parity["failed"].values()))
            raise ParityError(f"parity gate: no graph passed ({first}); artifact not written")

        inputs, outputs = _io_spec(config)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "vocab": list(ckpt["vocab"]),
            "unk_id": ckpt.get("unk_id"),
            "model": config.to_dict(),
            "state_layers": config.state_layers,
            "inputs": inputs,
            "outputs": outputs,
            "files": {
                graphs[g].name: {"sha256": sha256_file(graphs[g]),
                                 "bytes": graphs[g].stat().st_size}
                for g in ("onnxruntime", "onnxruntime_loop", "torchscript") if g in kept
            },
            "onnx_opset": OPSET,
            "versions": {
                "torch": torch.__version__.split("+")[0],
                "onnx": _version("onnx"),
                "onnxruntime": _version("onnxruntime"),
                "nextchar": _version("nextchar"),
            },
            "training": _plain(ckpt.get("metrics") or {}),
            "checkpoint": _plain(choice),
            "parity": _plain(parity),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False)
                                           + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{now.strftime('%Y%m%d%H%M%S%f')}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_random_artifact(out_dir: str | Path, vocab: str, cell: str = "rnn", embed_dim: int = 8,
                          hidden_size: int = 16, num_layers: int = 2, seed: int = 0,
                          version: str | None = None, name: str | None = None) -> Path:
    """A tiny random-init artifact for tests: writes a checkpoint into a temporary run folder
    and exports it through export_artifact, gate included."""
    chars = list(vocab)
    if not chars or len(set(chars)) != len(chars):
        raise ValueError("vocab must be a non-empty string of distinct characters")
    torch.manual_seed(seed)
    model = CharRNN(CharRNNConfig(len(chars), embed_dim, hidden_size, num_layers, cell))
    with tempfile.TemporaryDirectory(prefix="nextchar-random-run-") as run:
        save_checkpoint(Path(run) / FILENAME, {
            "name": name or f"random-{cell}",
            "model_config": model.config.to_dict(),
            "vocab": chars,
            "unk_id": None,
            "model_state": model.state_dict(),
            "metrics": {"random_init": True, "seed": seed},
        })
        return export_artifact(run, out_dir, version=version, seed=seed)
