"""Export a run to the serving artifact (docs/artifact.md), behind a parity gate.

    python -m nextchar.training.cli export runs/lm -o artifacts/lm [--version 20261127-101500]

Writes model.ts (torch.jit.trace), model.onnx (legacy exporter, opset 17, dynamic B and T on
every input and output) and manifest.json into a temporary folder beside the target, runs the
parity gate there, and only then renames it into place: a failed export leaves nothing behind.

The gate runs eager PyTorch, the TorchScript file and the ONNX file under ONNX Runtime on the
same random batches (mixed lengths including 1, batch 1, zero and random initial state) and
refuses the artifact if `onnx.checker` fails or any logits/state_out/position_logits differ by
more than 1e-4.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import FILENAME, load_checkpoint, model_from_checkpoint, save_checkpoint
from .data import sha256_file
from .errors import ExportError, ParityError
from .model import CharRNN, CharRNNConfig
from .onnx_loop import build_loop_graph

FORMAT = "nextchar-artifact"
FORMAT_VERSION = 1
OPSET = 17
LOOP_ONNX = "model_loop.onnx"  # the server's artifact reader knows this name too
TOLERANCE = 1e-4
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


def parity_gate(model: CharRNN, ts_path: Path, onnx_path: Path, seed: int = 0,
                tolerance: float = TOLERANCE, loop_path: Path | None = None) -> dict[str, Any]:
    """Max |difference| of TorchScript and ONNX Runtime (the standard graph and, when given, the
    Loop graph) against eager over the parity cases; ParityError if any output of any case is
    off by more than the tolerance."""
    import onnxruntime as ort

    scripted = torch.jit.load(str(ts_path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {"onnxruntime": ort.InferenceSession(str(onnx_path), options,
                                                    providers=["CPUExecutionProvider"])}
    if loop_path is not None:
        sessions["onnxruntime_loop"] = ort.InferenceSession(str(loop_path), options,
                                                            providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = {"torchscript": 0.0, **{name: 0.0 for name in sessions}}
    cases = 0
    for batch, time in PARITY_SHAPES:
        for random_state in (True, False):
            inputs = example_inputs(model.config, batch, time, generator, random_state)
            with torch.no_grad():
                expected = [t.numpy() for t in model(*inputs)]
                got_ts = [t.numpy() for t in scripted(*inputs)]
            feeds = dict(zip(INPUT_NAMES, (t.numpy() for t in inputs), strict=False))
            got_all = [("torchscript", got_ts)]
            got_all.append(("onnxruntime", sessions["onnxruntime"].run(OUTPUT_NAMES, feeds)))
            if loop_path is not None:  # with and without positions, as the server runs it
                loop = sessions["onnxruntime_loop"]
                for positions in (True, False):  # false: no position_logits to compare
                    names = OUTPUT_NAMES if positions else OUTPUT_NAMES[:2]
                    got_all.append(("onnxruntime_loop", loop.run(
                        names, {**feeds, "positions": np.array(positions)})))
            for backend, got in got_all:
                for name, want, have in zip(OUTPUT_NAMES, expected, got, strict=False):
                    if want.shape != have.shape:
                        raise ParityError(
                            f"parity gate: {backend} {name} has shape {have.shape}, eager "
                            f"{want.shape} (batch {batch}, time {time})")
                    diff = float(np.max(np.abs(want - have))) if want.size else 0.0
                    if not diff <= tolerance:  # also catches nan
                        raise ParityError(
                            f"parity gate: {backend} {name} differs from eager by {diff:.3g} > "
                            f"{tolerance:g} (batch {batch}, time {time}); artifact not written")
                    worst[backend] = max(worst[backend], diff)
            cases += 1
    return {"max_abs_diff": worst, "tolerance": tolerance, "cases": cases}


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


def _prepare_target(out_dir: Path) -> None:
    """The target may be absent, empty, or an earlier artifact (replaced); nothing else."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    entries = list(out_dir.iterdir())
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


def export_artifact(run_dir_or_checkpoint_path: str | Path, out_dir: str | Path,
                    version: str | None = None, *, name: str | None = None,
                    seed: int = 0) -> Path:
    """Exports a run's checkpoint to out_dir (replacing an earlier artifact there) and returns
    out_dir. Raises CheckpointError, ExportError or ParityError; on error out_dir is untouched."""
    ckpt = load_checkpoint(run_dir_or_checkpoint_path)
    model = model_from_checkpoint(ckpt, run_dir_or_checkpoint_path)
    config = model.config
    out_dir = Path(out_dir)
    _prepare_target(out_dir)
    now = datetime.now(timezone.utc)
    version = version or now.strftime("%Y%m%d-%H%M%S")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        example = example_inputs(config, 3, 7, torch.Generator().manual_seed(seed))
        ts_path, onnx_path = tmp / "model.ts", tmp / "model.onnx"
        loop_path = tmp / LOOP_ONNX
        try:
            _trace(model, example).save(str(ts_path))
            _export_onnx(model, example, onnx_path)
            # The CPU-fast graph (training/onnx_loop.py); the server prefers it on CPU.
            loop_path.write_bytes(build_loop_graph(model, OPSET).SerializeToString())
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"export failed: {type(e).__name__}: {str(e).splitlines()[0]}") \
                from None
        _check_onnx(onnx_path)
        parity = parity_gate(model, ts_path, onnx_path, seed=seed, loop_path=loop_path)

        inputs, outputs = _io_spec(config)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name or ckpt.get("name") or f"nextchar-{config.cell}",
            "version": version,
            "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "vocab": list(ckpt["vocab"]),
            "unk_id": ckpt.get("unk_id"),
            "model": config.to_dict(),
            "state_layers": config.state_layers,
            "inputs": inputs,
            "outputs": outputs,
            "files": {
                f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                for f in (onnx_path, loop_path, ts_path)
            },
            "onnx_opset": OPSET,
            "versions": {
                "torch": torch.__version__.split("+")[0],
                "onnx": _version("onnx"),
                "onnxruntime": _version("onnxruntime"),
                "nextchar": _version("nextchar"),
            },
            "training": _plain(ckpt.get("metrics") or {}),
            "parity": parity,
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
