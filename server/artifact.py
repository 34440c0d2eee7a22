"""Reads an artifact directory (docs/artifact.md): manifest, checksums, vocabulary, encoding.

Checksums are verified before any runtime touches a model file, so a corrupt or swapped file is
refused with one clear line instead of loading something else than the manifest describes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, InvalidInput

FORMAT = "nextchar-artifact"
FORMAT_VERSION = 1
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
# Optional: the CPU-fast ONNX graph (training/onnx_loop.py). The onnx backend verifies it too
# when the manifest lists it.
LOOP_ONNX = "model_loop.onnx"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_char(ch: str) -> str:
    """A character as a user can read it, even when it is a control or invisible character."""
    shown = ch if ch.isprintable() and not ch.isspace() else repr(ch)[1:-1]
    return f"'{shown}' (U+{ord(ch):04X})"


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    sha256: str  # of manifest.json: the artifact's identity
    vocab: list[str]
    unk_id: int | None
    char_to_id: dict[str, int] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.manifest["model"])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["model"]["hidden_size"])

    @property
    def state_layers(self) -> int:
        return int(self.manifest["state_layers"])

    def file(self, backend: str) -> Path:
        return self.path / MODEL_FILES[backend]

    def has_file(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    def encode(self, text: str, index: int = 0) -> np.ndarray:
        """Text -> int64 ids; INVALID_ARGUMENT names the first bad character and its position."""
        ids = np.empty(len(text), dtype=np.int64)
        lookup = self.char_to_id
        for pos, ch in enumerate(text):
            i = lookup.get(ch, self.unk_id)
            if i is None:
                raise InvalidInput(
                    f"texts[{index}]: character {describe_char(ch)} at position {pos} is not in "
                    f"the model's vocabulary ({self.vocab_size} characters; see GetModelInfo)"
                )
            ids[pos] = i
        return ids


def load_artifact(path: Path | str, backends: tuple[str, ...] = ("onnx", "torchscript")) -> Artifact:
    """Loads and verifies an artifact; raises ArtifactError with a one-line reason."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no manifest.json (is this an artifact directory from "
                            f"'nextchar export'?)")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not a nextchar artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format_version {manifest.get('format_version')!r} "
                            f"is not supported (this server reads {FORMAT_VERSION})")
    try:
        vocab = [str(c) for c in manifest["vocab"]]
        files = manifest["files"]
        int(manifest["state_layers"])
        int(manifest["model"]["hidden_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{manifest_path}: missing or malformed field {e}") from e
    if any(len(c) != 1 for c in vocab) or len(set(vocab)) != len(vocab):
        raise ArtifactError(f"{manifest_path}: vocab must be distinct single characters")
    unk_id = manifest.get("unk_id")
    needed = [MODEL_FILES[b] for b in backends]
    if "onnx" in backends and LOOP_ONNX in files:
        needed.append(LOOP_ONNX)
    for name in needed:
        entry = files.get(name)
        if entry is None:
            raise ArtifactError(f"{manifest_path}: lists no checksum for {name}")
        file_path = path / name
        if not file_path.is_file():
            raise ArtifactError(f"{file_path}: missing (the manifest lists it)")
        actual = sha256_file(file_path)
        if actual != entry.get("sha256"):
            raise ArtifactError(f"{file_path}: sha256 {actual[:12]}… does not match the "
                                f"manifest's {str(entry.get('sha256'))[:12]}…; refusing to load")
    return Artifact(
        path=path,
        manifest=manifest,
        sha256=hashlib.sha256(raw).hexdigest(),
        vocab=vocab,
        unk_id=None if unk_id is None else int(unk_id),
        char_to_id={c: i for i, c in enumerate(vocab)},
    )
