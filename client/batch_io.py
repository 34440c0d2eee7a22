"""Batch job files: reading INPUT into items, and OUTPUT's resume rules with its meta sidecar.

OUTPUT is append-only JSONL in input order, so a job's progress is its number of complete
lines. `prepare_output` checks OUTPUT belongs to this job (OUTPUT.meta.json: input content,
format, shard, options, model), cuts a torn last line left by a crash, and says how many items
to skip; `shard_items` then yields the rest of this shard, checking the skip lands where
OUTPUT's last record says it should.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("nextchar.client.batch")

META_FORMAT = "nextchar-batch-meta"
META_VERSION = 1
INVALID = "INVALID_ARGUMENT"


class JobError(Exception):
    """The job cannot start as asked (options, input, an output from another job): one line."""


@dataclass
class Item:
    index: int  # line index in INPUT (0-based, over the whole file, not the shard)
    id: Any
    text: str | None
    record: dict[str, Any] | None = None  # set once the item's output line is known


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


def describe_char(ch: str) -> str:
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
    text: str = obj["text"]
    item = Item(index, obj.get("id"), text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON may spell lone surrogates ("\ud800"); UTF-8 cannot
        item.record = error_record(item, INVALID, f"text is not valid Unicode: lone surrogate "
                                                  f"U+{ord(e.object[e.start]):04X} at position "
                                                  f"{e.start}")
    return item


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
             model: dict[str, str]) -> dict[str, Any]:
    """model: name, version and artifact_sha256 of what answers the job."""
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
        "model": model,
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
