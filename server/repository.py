"""Where models come from: a model repository, each model's versions, its config.json.

    --model-repository models/          --model models/shakespeare   (one model)
      shakespeare/                        1/  manifest.json model.onnx model_loop.onnx model.ts
        config.json   (optional)          2/  ...   <- served: the highest version
        1/  manifest.json model.onnx ...
        2/  ...
      tiny-gru/
        manifest.json model.onnx ...     (a model directory may also be one plain artifact)

A model's name is its folder name (as in Triton and MLServer); for `--model DIR` it is the
artifact's manifest name. A version is a folder whose name starts with a digit, ordered
naturally (2 < 10 < 20261127-1015); a plain artifact directory has one version, the artifact's
own stamp. Other names (`backup/`, `.tmp-3/`) and folders without manifest.json are not
versions, so a new version is copied in under a hidden name and renamed into place
(`cp -r v3 .tmp-3 && mv .tmp-3 3`), and a copy kept beside the versions is never served.

`config.json` overrides server settings for that model only, as Triton's config.pbtxt and
MLServer's model-settings.json do: `{"backend": "torchscript", "max_batch_size": 64}`. The keys
are those of MODEL_SETTINGS; anything else is refused with the list of allowed keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import ArtifactError
from .settings import ServerSettings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DIGITS = "0123456789"  # ASCII: str.isdigit() takes '²', which int() refuses
# Server settings a model's config.json may override: what runs the model and how its queue
# and limits behave. Transport, security and lifecycle settings stay server-wide.
MODEL_SETTINGS = frozenset({
    "backend", "device", "onnx_graph", "backend_workers", "intra_op_threads", "warmup",
    "batching", "max_batch_size", "max_batch_chars", "max_batch_delay_ms", "max_queue_texts",
    "parallel_batch_chars", "low_max_queue_texts", "low_max_batch_size", "high_timeout_s", "low_timeout_s",
    "low_lane_workers", "low_lane_nice", "worker_nice", "max_texts_per_request", "max_chars_per_request", "max_queue_chars", "max_chars_per_text", "max_top_k",
    "default_top_k", "max_streams", "step_batching", "generate_flush_ms",
    "generate_max_messages_per_s", "generate_prefill_wait_ms",
})


def version_key(name: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Natural order: digit runs compare as numbers, so '2' < '10' and '1.9' < '1.10'; names
    equal as numbers ('1', '01') then by their text, so the order never depends on how the
    filesystem lists them."""
    return tuple((0, int(part)) if part[0] in DIGITS else (1, part)
                 for part in re.findall(r"[0-9]+|[^0-9]+", name)), name


def is_version(path: Path) -> bool:
    """A version folder: named by a number (Triton's versions are integers; a stamp such as
    20261127-1015 starts with one too) and holding a manifest. `backup/` beside `3/` would
    otherwise outrank every number in natural order and be served. The name is read first, so
    a folder the server may not enter (lost+found, mode 700) is never statted."""
    if path.name[:1] not in DIGITS:
        return False
    try:
        return path.is_dir() and (path / "manifest.json").is_file()
    except OSError:
        return False


def misnamed_versions(path: Path) -> list[str]:
    """Folders of `path` that hold a manifest but are not versions by name (`v1/`): what an
    operator meant as versions, said in the model's refusal and at a repository scan."""
    names = []
    try:
        children = list(path.iterdir())
    except OSError:
        return []
    for child in children:
        if child.name.startswith(".") or child.name[:1] in DIGITS:
            continue
        try:
            if child.is_dir() and (child / "manifest.json").is_file():
                names.append(child.name)
        except OSError:  # unreadable: not ours to judge
            continue
    return sorted(names)


class ModelSource:
    """One model's directory: a plain artifact, or a directory of versions DIR/<version>/."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def versioned(self) -> bool:
        return not (self.root / "manifest.json").is_file()

    def candidates(self) -> list[Path]:
        """Loadable-looking versions, highest first (just the root for a plain artifact)."""
        if not self.versioned:
            return [self.root]
        if self.root.is_file():
            raise ArtifactError(f"{self.root}: is a file, not a directory (an artifact "
                                f"directory or a directory of <version>/ artifact directories)")
        if not self.root.is_dir():
            raise ArtifactError(f"{self.root}: no such directory (an artifact directory or a "
                                f"directory of <version>/ artifact directories)")
        versions = [p for p in self.root.iterdir() if is_version(p)]
        if not versions:
            named = misnamed_versions(self.root)
            hint = (f"; {', '.join(named)}: not versions, a version folder's name starts with a "
                    f"digit (1, 2, 20261127-1015)" if named else "")
            raise ArtifactError(f"{self.root}: neither an artifact (no manifest.json) nor a "
                                f"model with versions (no <version>/manifest.json below it)"
                                f"{hint}")
        return sorted(versions, key=lambda p: version_key(p.name), reverse=True)

    def version_of(self, path: Path, artifact_version: str) -> str:
        return path.name if self.versioned else artifact_version


def looks_like_model(path: Path) -> bool:
    """An artifact directory, or a directory with at least one <version>/manifest.json. Other
    folders (lost+found at a volume's root, a model still being copied in, an archive of old
    artifacts) are not models: they neither serve nor hold readiness back. One whose
    manifests sit only in folders not named as versions (`v1/`) is logged by
    scan_repository, not skipped without a word."""
    try:
        if (path / "manifest.json").is_file():
            return True
        return any(is_version(v) for v in path.iterdir())
    except OSError:  # unreadable (lost+found is root's, mode 700)
        return False


def scan_repository(root: Path) -> dict[str, Path]:
    """Model name -> model directory, for every non-hidden folder of the repository that
    holds a model (looks_like_model)."""
    if not root.is_dir():
        raise ArtifactError(f"--model-repository {root}: no such directory (a directory of "
                            f"<model>/ folders, each an artifact or <version>/ artifacts)")
    found = {}
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if looks_like_model(p):
            found[p.name] = p
        elif (named := misnamed_versions(p)) and (p, tuple(named)) not in _warned:
            _warned.add((p, tuple(named)))  # once, not at every poll
            log.warning("%s: not a model: %s hold a manifest but are not versions (a version "
                        "folder's name starts with a digit: 1, 2, 20261127-1015)", p,
                        ", ".join(named))
    return found


_warned: set[tuple[Path, tuple[str, ...]]] = set()


def model_folder(root: Path, name: str) -> Path | None:
    """The repository folder a load call names, or None when `name` is not one: a model name is
    a folder name directly under the repository (as in Triton), never a path, so a caller cannot
    make the server load a directory from elsewhere on its filesystem. A folder of the
    repository that is a symlink is followed, as Triton does: where it points is the choice of
    whoever may write the repository, not of the caller."""
    if name in ("", ".", "..") or name.startswith(".") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).is_absolute():
        return None
    path = root / name
    try:  # a name the filesystem cannot hold (over 255 bytes: ENAMETOOLONG) names no folder
        return path if path.is_dir() and looks_like_model(path) else None
    except OSError:
        return None


def version_fingerprint(path: Path, model_dir: Path) -> str:
    """What a failed version is remembered by: every file's name, size and mtime in its
    directory, and the model's config.json. A version copied in file by file, or repaired in
    place, is tried again once its files change; an unchanged broken one is not re-verified."""
    h = hashlib.sha256()
    for p in sorted([*_files(path), model_dir / CONFIG_FILE]):
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p.relative_to(model_dir) if p.is_relative_to(model_dir) else p}\0"
                 f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _files(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_file()]
    except OSError:
        return []


def model_settings(base: ServerSettings, model_dir: Path) -> ServerSettings:
    """`base` with the model's config.json applied (a copy; `base` unchanged)."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return base
    try:
        overrides: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(overrides, dict):
        raise ArtifactError(f"{path}: must be a JSON object of settings")
    unknown = sorted(set(overrides) - MODEL_SETTINGS)
    if unknown:
        raise ArtifactError(f"{path}: unknown setting(s) {', '.join(unknown)}; a model may set "
                            f"{', '.join(sorted(MODEL_SETTINGS))}")
    try:
        return ServerSettings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ArtifactError(f"{path}: {where}: {first['msg']}") from e
