"""Run checkpoints: plain dicts, lists, numbers, strings and tensors, so that
`torch.load(path, weights_only=True)` reads them without unpickling any Python class.

    {
      "format": "nextchar-checkpoint", "format_version": 1,
      "name": "shakespeare-lstm",
      "model_config": {"vocab_size": 84, "embed_dim": 64, "hidden_size": 512, ...},
      "vocab": ["\\n", " ", ...], "unk_id": None,
      "model_state": {...tensors...},
      "optimizer_state": {...} | None, "data_state": {...} | None,
      "train_config": {...}, "step": 1200, "train_time_s": 118.2,
      "metrics": {"val_nats_per_char": 1.52, ...}, "history": {...},
      "corpus": {"name": "shakespeare", "train_sha256": "...", ...},
      "versions": {"torch": "2.13.0"},
    }
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .model import CharRNN, CharRNNConfig

FORMAT = "nextchar-checkpoint"
FORMAT_VERSION = 1
FILENAME = "checkpoint.pt"  # the last state of a run: what --resume continues
BEST_FILENAME = "best.pt"  # the lowest validation loss the run saw: what export ships
REQUIRED = ("model_config", "vocab", "model_state")


def checkpoint_path(run_or_file: str | Path, which: str = "last") -> Path:
    """A run folder's checkpoint (`last`: checkpoint.pt, `best`: best.pt, falling back to
    checkpoint.pt for runs that have none, like the hello preset), or the file itself."""
    path = Path(run_or_file)
    if not path.is_dir():
        return path
    if which == "best" and (path / BEST_FILENAME).exists():
        return path / BEST_FILENAME
    return path / FILENAME


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes atomically (temp file + rename), so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _plain({"format": FORMAT, "format_version": FORMAT_VERSION, **payload})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value: Any) -> Any:
    """Only what weights_only=True reads back: str subclasses (torch.__version__ is one) become
    str, tuples lists; anything else that is not a tensor or a plain value is refused."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, torch.Tensor)):
        return value
    raise TypeError(f"checkpoints hold plain values only, not {type(value).__name__}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # torch's weights-only refusal puts the reason on a later line
        if "error:" in ln.lower():
            return ln[:300]
    return lines[0][:300] if lines else type(e).__name__


def load_checkpoint(run_or_file: str | Path, which: str = "last") -> dict[str, Any]:
    """The checkpoint's dict; CheckpointError with one clear line for anything wrong with it."""
    path = checkpoint_path(run_or_file, which)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... here
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nextchar checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt.get('format_version')}, this nextchar reads "
            f"{FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> CharRNN:
    """A float32 CharRNN in eval mode with the checkpoint's weights."""
    try:
        config = CharRNNConfig(**ckpt["model_config"])
        vocab = ckpt["vocab"]
        if config.vocab_size != len(vocab) or any(len(c) != 1 for c in vocab):
            raise ValueError(f"vocab of {len(vocab)} entries for vocab_size {config.vocab_size}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate characters")
        model = CharRNN(config)
        model.load_state_dict(ckpt["model_state"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path} does not describe a valid model: {_first_line(e)}") \
            from None
    return model.float().eval()
