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

import io
import math
import os
import tempfile
import zipfile
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
# torch.save writes a zip archive: a file that does not start like one was never a checkpoint.
ZIP_MAGIC = b"PK\x03\x04"


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
    # Serialized in memory first: torch.save reports a failed write (a full disk) as a bare
    # RuntimeError ("unexpected pos ..."), a plain write an OSError that names the file.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"{e.strerror or e} (the previous {path.name}, if any, is kept)",
                      str(path)) from e
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
    """The reason in torch's message: its first sentence (what follows is advice)."""
    lines = [ln.strip().split(". ")[0] for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):  # torch's weights-only refusal puts the reason on a later line
        if "error:" in ln.lower():
            rest = ln[ln.lower().index("error:") + len("error:"):].strip()
            return (ln if rest or i + 1 == len(lines) else lines[i + 1])[:300]
    return lines[0][:300] if lines else type(e).__name__


def _not_a_torch_file(path: Path) -> str | None:
    """Why the file cannot be a checkpoint at all (empty, not a zip archive), or None."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        return "is empty"
    if head != ZIP_MAGIC:
        return "is not a file torch.save wrote"
    return None


def load_checkpoint(run_or_file: str | Path, which: str = "last") -> dict[str, Any]:
    """The checkpoint's dict; CheckpointError with one clear line for anything wrong with it."""
    path = checkpoint_path(run_or_file, which)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file, not a nextchar checkpoint")
    why = _not_a_torch_file(path)
    if why:
        raise CheckpointError(f"{path} is not a nextchar checkpoint (it {why})")
    damaged = _bad_record(path)
    if damaged:
        raise CheckpointError(f"{path} is damaged: {damaged}; use another checkpoint (best.pt, "
                              f"an older copy) or train again")
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


def _bad_record(path: Path) -> str:
    """A checkpoint is a zip archive with a CRC-32 per record, which torch.load does not check:
    flipped bytes inside a tensor load as other weights. "" when every record checks out (or
    the archive is unreadable as a zip: torch.load then says why)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return ""
    return f"record {bad} fails its CRC-32 check" if bad else ""


def _check_vocab(vocab: Any, vocab_size: int) -> None:
    if not isinstance(vocab, list):
        raise ValueError(f"vocab is a {type(vocab).__name__}, not a list of characters")
    for i, c in enumerate(vocab):
        if not isinstance(c, str) or len(c) != 1:
            raise ValueError(f"vocab entry {i} is {c!r}, not one character")
    if vocab_size != len(vocab):
        raise ValueError(f"vocab of {len(vocab)} characters for vocab_size {vocab_size}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab has duplicate characters")


def _check_unk_id(unk_id: Any, vocab_size: int) -> None:
    # Exported as is into the manifest, where an id outside the vocabulary fails every call.
    if unk_id is not None and (type(unk_id) is not int or not 0 <= unk_id < vocab_size):
        raise ValueError(f"unk_id must be None or an id of the vocabulary (0..{vocab_size - 1}), "
                         f"got {unk_id!r}")


def _shape(t: Any) -> str:
    return "x".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_state(model: CharRNN, state: Any) -> None:
    """Names the first tensor that is missing, extra or of the wrong shape (load_state_dict
    lists them all on lines after its first, which says only that there were errors)."""
    if not isinstance(state, dict):
        raise ValueError(f"model_state is a {type(state).__name__}, not a dict of tensors")
    want = model.state_dict()
    for name, tensor in want.items():
        if name not in state:
            raise ValueError(f"model_state lacks {name}")
        got = state[name]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            raise ValueError(f"model_state's {name} is {_shape(got)}, the model_config needs "
                             f"{_shape(tensor)}")
    extra = [k for k in state if k not in want]
    if extra:
        raise ValueError(f"model_state holds {extra[0]}, which the model_config has no place for")


def _first_non_finite(model: CharRNN) -> str | None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "nan" if bool(torch.isnan(tensor).any()) else "inf"
            return f"{kind} in {name}"
    return None


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> CharRNN:
    """A float32 CharRNN in eval mode with the checkpoint's weights, all of them finite."""
    try:
        config = CharRNNConfig(**ckpt["model_config"])
        _check_vocab(ckpt["vocab"], config.vocab_size)
        _check_unk_id(ckpt.get("unk_id"), config.vocab_size)
        model = CharRNN(config)
        _check_state(model, ckpt["model_state"])
        model.load_state_dict(ckpt["model_state"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path} does not describe a valid model: {_first_line(e)}") \
            from None
    bad = _first_non_finite(model)
    if bad:  # what a diverged run leaves: every output of such a model is nan
        raise CheckpointError(f"{path} holds non-finite weights ({bad}): the run diverged; use "
                              "an earlier checkpoint or train again with a lower --lr")
    return model.float().eval()


def finite_or_none(value: Any) -> Any:
    """A JSON-safe copy: nan and inf (no validation text, a diverged loss) become None, since
    JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
