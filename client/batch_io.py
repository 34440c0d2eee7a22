"""Batch job files: reading INPUT into items, and OUTPUT's resume rules with its meta sidecar.

OUTPUT is append-only JSONL in input order, so a job's progress is its number of complete
lines. `prepare_output` checks OUTPUT belongs to this job (OUTPUT.meta.json: input content,
format, shard, options, model), cuts a torn last line left by a crash, and says how many items
to skip; `shard_items` then yields the rest of this shard, checking the skip lands where
OUTPUT's last record says it should.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import json
import logging
import math
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
# Some editors start a UTF-8 file with a byte order mark: it is the file's, not the first text's.
BOM = codecs.BOM_UTF8


class JobError(Exception):
    """The job cannot start as asked (options, input, an output from another job): one line."""


class NotYet(JobError):
    """The job cannot start now but the same command may later (no server answering yet,
    another job still writing OUTPUT): exit 1, which a Kubernetes Job retries, not exit 2,
    which its podFailurePolicy takes as final."""


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
        raise ValueError(f"--shard {spec!r}: need 0 <= I < N")
    return i, n


def describe_char(ch: str) -> str:
    # The form of nextchar.server.artifact.describe_char, which cannot be imported without numpy.
    shown = ch if ch.isprintable() and not ch.isspace() else repr(ch)[1:-1]
    return f"'{shown}' (U+{ord(ch):04X})"


# -- paths ---------------------------------------------------------------------------------------
def check_paths(input_path: Path, output_path: Path | str) -> None:
    """Refuses, before anything is read, sent or written, an INPUT or OUTPUT a job cannot run or
    resume on: the input is read three times (count, hash, items) and again on a rerun, so it
    must be a regular file; OUTPUT is appended to and counted, with its meta file beside it."""
    if str(input_path) == "-":
        raise JobError("INPUT -: batch cannot read standard input; it reads INPUT more than once "
                       "(and again to resume), so save it to a file first")
    if not input_path.exists():
        raise JobError(f"{input_path}: no such file")
    if not input_path.is_file():
        raise JobError(f"{input_path}: not a regular file; batch reads INPUT more than once (and "
                       f"again to resume), so it needs a file, not a pipe, folder or device")
    output = Path(output_path)
    if not str(output_path) or output.is_dir():
        raise JobError(f"-o {str(output_path)!r}: the output must be a file path, not a folder")
    if str(output_path) == "-":
        raise JobError("-o -: batch cannot write standard output; it appends to OUTPUT and "
                       "resumes from it, so give a file path")
    if output.exists() and not output.is_file():
        raise JobError(f"-o {output}: not a regular file; batch appends to OUTPUT, resumes from "
                       f"its lines and keeps OUTPUT.meta.json beside it, so give a file path")
    for parent in output.parents:  # the nearest one that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise JobError(f"-o {output}: cannot write ({parent} is not a folder)")
            break
    # samefile, not only resolved paths: a hard link is the input under another name, and
    # --restart would empty it.
    if output.resolve() == input_path.resolve() or (
            output.exists() and os.path.samefile(output, input_path)):
        raise JobError(f"-o {output}: the output is the input file; give another path")


def cannot_write(output: Path, e: OSError) -> JobError:
    """A full disk or quota is NotYet (exit 1), as it is mid-job: freeing space and rerunning
    works, and a Kubernetes Job's podFailurePolicy retries exit 1 but not 2."""
    where = f"{e.filename}: " if e.filename and str(e.filename) != str(output) else ""
    kind = NotYet if e.errno in (errno.ENOSPC, errno.EDQUOT) else JobError
    return kind(f"-o {output}: cannot write ({where}{e.strerror or e})")


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
        # readline with a bound: a file without newlines is not read whole to look at its start.
        first = True
        while raw := f.readline(1 << 16):
            if first:
                raw, first = raw.removeprefix(BOM), False
            if raw.strip():
                return "jsonl" if raw.lstrip().startswith(b"{") else "text"
            while not raw.endswith(b"\n") and (raw := f.readline(1 << 16)):
                pass  # the rest of a long run of blanks on one line
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
        obj = json.loads(line, parse_constant=_not_json, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        item = Item(index, None, None)
        item.record = error_record(item, INVALID, f"line is not valid JSON: {e.msg} "
                                                  f"(column {e.colno})")
        return item
    except ValueError as e:  # from the two hooks: the output could not carry it as JSON
        item = Item(index, None, None)
        item.record = error_record(item, INVALID, f"line is not valid JSON: {e}")
        return item
    except RecursionError:  # json's parser recurses per level: '[' * 100000 exhausts the stack
        item = Item(index, None, None)
        item.record = error_record(item, INVALID, "line nests JSON arrays or objects too deep "
                                                  "to read")
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


def _not_json(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have: echoed back as an id, they
    # would make the output file unreadable to strict parsers (jq, JavaScript).
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400: valid JSON, but no double holds it
        raise ValueError(f"the number {literal[:40]} is out of range for a double")
    return value


# -- output and its meta -------------------------------------------------------------------------
def meta_path_for(output: Path) -> Path:
    """Beside the file OUTPUT names: through a symlink, beside its target (see lock_path_for)."""
    real = output.resolve()
    return real.with_name(real.name + ".meta.json")


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
            was, now = f"{om['name']} {om['version']}", f"{nm['name']} {nm['version']}"
            if was == now:  # same name and version stamp, other weights: name the artifacts
                was, now = (f"{m['name']} {m['version']} (artifact {str(m['artifact_sha256'])[:12]})"
                            for m in (om, nm))
            diffs.append(f"model {was} -> {now}")
    except (KeyError, TypeError):
        diffs.append("unreadable meta")
    return diffs


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """The whole file or none of it: a failed write leaves no .tmp behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): \u escapes
        data = (json.dumps(obj, indent=2) + "\n").encode("ascii")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def start_output(output: Path, meta: dict[str, Any]) -> None:
    """An empty OUTPUT with this job's meta beside it, or JobError. A new OUTPUT that fails is
    removed again; an existing one (--restart) may be left empty, which is a fresh job to a
    rerun whatever meta is beside it."""
    existed = output.exists()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("wb"):
            pass
        _write_json_atomic(meta_path_for(output), meta)
    except OSError as e:
        if not existed:
            with contextlib.suppress(OSError):
                output.unlink()
        raise cannot_write(output, e) from e


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


def lock_path_for(output: Path) -> Path:
    """Beside the file OUTPUT names, symlinks followed: a job on a link to another job's OUTPUT
    takes the same lock, rather than its own beside the link, and is refused."""
    real = output.resolve()
    return real.with_name(real.name + ".lock")


@dataclass
class OutputLock:
    """What output_lock got: `problem` says why OUTPUT is not protected ("" when it is). The
    job reports it once OUTPUT proved writable: where no lock file can be made OUTPUT usually
    cannot be written either, and that refusal is the one line to print."""

    problem: str = ""


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[OutputLock]:
    """One job per OUTPUT at a time: a second one (a command run twice, a replaced pod while
    the old one still writes to the shared volume) would append the same items again. An
    advisory flock on OUTPUT.lock, held for the job's life and dropped by the kernel when the
    process dies, so a killed job never leaves OUTPUT locked; the file keeps the holder's
    host and pid for the refusal's message."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before this existed
        yield OutputLock("no file locks on this system")
        return
    path = lock_path_for(output)
    try:
        # OUTPUT's folder may not exist yet (`-o out/part-3.jsonl`, shards on an empty volume):
        # made here, or the lock could not be taken and every shard would run unprotected.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        yield OutputLock(f"{path}: cannot open ({e.strerror or e})")
        return
    try:
        lock = OutputLock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            raise NotYet(f"-o {output}: another nextchar batch is writing it ("
                           f"{holder or 'holder unknown'}; lock {path.name}); wait for it to "
                           f"finish or stop it, then rerun this command to resume") from None
        except OSError as e:  # a filesystem without locks (ENOLCK): go on, unprotected
            lock.problem = f"{path}: cannot lock ({e.strerror or e})"
        else:
            import socket

            try:  # the holder's name, for a refused job's message; the lock is held already
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
            except OSError as e:
                log.debug("%s: cannot record the holder (%s)", path, e.strerror or e)
        yield lock
    finally:
        os.close(fd)


def prepare_output(output: Path, meta: dict[str, Any], total: int, restart: bool
                   ) -> tuple[int, int | None]:
    """Checks OUTPUT belongs to this job and cuts a torn tail: (lines kept, last line's index)."""
    meta_path = meta_path_for(output)
    has_output = output.exists() and output.stat().st_size > 0
    if restart or not has_output:
        start_output(output, meta)
        return 0, None
    if not meta_path.is_file():
        raise JobError(f"{output} exists and has no {meta_path.name}, so 'nextchar batch' did not "
                       f"write it; pass --restart to overwrite it")
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise JobError(f"{meta_path}: unreadable ({e}); pass --restart to start over") from e
    diffs = meta_differences(old, meta)
    if diffs and all(d.startswith("model ") for d in diffs):
        # The command may be the very one that wrote OUTPUT: the server's model changed.
        raise JobError(f"{output} holds results of another model ({diffs[0]}): the server "
                       f"serves another artifact now; resume against the original one (the "
                       f"same artifact with --local DIR, or its server), or pass --restart to "
                       f"start over")
    if diffs:
        raise JobError(f"{output} holds another job's results ({'; '.join(diffs)}); rerun the "
                       f"original command to resume it, or pass --restart to start over")
    try:
        torn = truncate_torn_tail(output)  # opens OUTPUT for writing, also when nothing is torn
    except OSError as e:
        raise cannot_write(output, e) from e
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


def max_line_bytes(max_chars_per_text: int) -> int:
    """The longest input line read whole: a text at the server's limit written as JSON with
    every character escaped as a surrogate pair (12 bytes), plus 1 MiB for the id and the rest.
    A longer line cannot hold a text the server takes, so it is not kept in memory, nor copied
    into its error record."""
    return 12 * max(max_chars_per_text, 1) + (1 << 20)


def bounded_lines(f: Any, cap: int) -> Iterator[tuple[bytes, int]]:
    """(line, 0) for each line of at most `cap` bytes; (b"", its length) for a longer one,
    whose bytes are skipped in 1 MiB reads rather than held."""
    while raw := f.readline(cap + 1):
        if len(raw) <= cap or raw.endswith(b"\n"):
            yield raw, 0
            continue
        length = len(raw)
        while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
            length += len(more)
        length += len(more)
        yield b"", length


def input_changed(path: Path, what: str) -> JobError:
    """INPUT was cut, grown or edited while the job read it: OUTPUT answers no one version of
    it, and the meta (the content at the start) refuses a rerun, so only --restart goes on."""
    return JobError(f"{path} changed while the job ran ({what}): the output answers no one "
                    f"version of it; leave INPUT alone while a job reads it and pass --restart "
                    f"to start over")


def shard_items(path: Path, fmt: str, shard: tuple[int, int], skip: int,
                last_index: int | None, max_chars_per_text: int = 0,
                total: int | None = None) -> Iterator[Item]:
    """This shard's items in order, after the first `skip` (checked against OUTPUT's last line).
    With max_chars_per_text, a line longer than max_line_bytes of it becomes an error record.
    With total (the shard's items when the job started), more or fewer items are a JobError."""
    i, n = shard
    seen = 0
    cap = max_line_bytes(max_chars_per_text) if max_chars_per_text else 1 << 62
    with path.open("rb") as f:
        for index, (raw, too_long) in enumerate(bounded_lines(f, cap)):
            if index == 0:
                raw = raw.removeprefix(BOM)
            if index % n != i:
                continue
            seen += 1
            if total is not None and seen > total:
                raise input_changed(path, f"this shard had {total} items at the start, more "
                                          f"now")
            if seen < skip:
                continue
            if seen == skip:
                if index != last_index:
                    raise JobError(f"the output's last record has index {last_index} but this "
                                   f"job's item {skip} is line {index}: not this job's output; "
                                   f"pass --restart to start over")
                continue
            if too_long:
                item = Item(index, None, None)
                item.record = error_record(
                    item, INVALID, f"line is {too_long} bytes: longer than any line holding a "
                                   f"text of the server's max_chars_per_text "
                                   f"({max_chars_per_text}) can be; not read")
                yield item
                continue
            yield parse_line(index, raw, fmt)
    if total is not None and seen < total:
        raise input_changed(path, f"this shard had {total} items at the start, {seen} now")
