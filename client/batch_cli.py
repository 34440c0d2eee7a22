"""`nextchar batch`: a file of texts through one or several servers (or in-process), resumable.

    nextchar batch in.txt -o out.jsonl --server 10.0.0.1:50051 --server 10.0.0.2:50051
    nextchar batch in.jsonl -o out.jsonl --server dns:///nextchar.default.svc:50051 --shard 3/8
    nextchar batch in.txt -o out.jsonl --local runs/demo/artifact    (needs nextchar[serve])

Rerunning the same command after a crash continues where OUTPUT stops (see docs/batch.md).
Exit status: 0 done (error records included), 1 not finished and a rerun may (stopped
part-way: rerun to resume; or not started yet: no server reachable, another job writing
OUTPUT), 2 refused, as a rerun would be (bad options, an INPUT or OUTPUT it cannot use,
another job's OUTPUT, an INPUT that changed while the job ran).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from .batch import (
    JobAborted,
    JobInterrupted,
    JobOptions,
    LocalTarget,
    RemoteTarget,
    Target,
    run_job,
)
from .batch_io import JobError, NotYet, parse_shard
from .client import NextCharClient, NextCharError


def _shard(spec: str) -> tuple[int, int]:
    try:
        return parse_shard(spec)
    except ValueError as e:
        # argparse names the flag itself: "argument --shard: '3/2': need 0 <= I < N".
        raise argparse.ArgumentTypeError(str(e).removeprefix("--shard ")) from e


def add_parser(
    sub: Any,
    add_common: Callable[[argparse.ArgumentParser], None],
    make_client: Callable[[argparse.Namespace], NextCharClient],
    top_k_type: Callable[[str], int] = int,
) -> argparse.ArgumentParser:
    """top_k_type: the CLI's count type, so a negative --top-k is a usage error as in predict."""
    p: argparse.ArgumentParser = sub.add_parser(
        "batch", help="run a file of texts through the model: ordered JSONL out, resumable",
        description="One output line per input line, in input order. Rerun the same command to "
                    "resume after a crash. Exit 0: done (error records included); 1: not "
                    "finished, rerun to resume (stopped part-way, or not started yet: no "
                    "server reachable, another job writing OUTPUT); 2: refused, as a rerun "
                    "would be (bad options, an INPUT or OUTPUT it cannot use, another job's "
                    "OUTPUT, an INPUT that changed while the job ran).")
    add_common(p)
    p.add_argument("input", metavar="INPUT", help="one text per line, or JSONL {\"id\", \"text\"}")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="JSONL results, appended in input order; OUTPUT.meta.json beside it")
    p.add_argument("--local", metavar="ARTIFACT_DIR", default=None,
                   help="run in this process on the artifact instead of a server "
                        "(needs nextchar[serve]; NEXTCHAR_* server settings apply)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--texts-per-request", type=int, default=64,
                   help="texts packed into one Predict (default 64; capped by the server's limit)")
    p.add_argument("--top-k", type=top_k_type, default=0,
                   help="characters per text (0: server default)")
    p.add_argument("--per-position", action="store_true",
                   help="also the argmax next character at every position")
    p.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                   help="input format; auto: by extension (.jsonl/.ndjson, .txt), else JSONL "
                        "when the first line starts with '{'")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="only lines whose index mod N == I (e.g. $(JOB_COMPLETION_INDEX)/8)")
    p.add_argument("--max-retries", type=int, default=10,
                   help="retries per request on UNAVAILABLE, RESOURCE_EXHAUSTED, "
                        "DEADLINE_EXCEEDED, CANCELLED (exponential backoff with jitter; "
                        "default 10)")
    p.add_argument("--restart", action="store_true",
                   help="discard an existing OUTPUT instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=lambda args: run(args, make_client))
    return p


def run(args: argparse.Namespace,
        make_client: Callable[[argparse.Namespace], NextCharClient]) -> int:
    log = logging.getLogger("nextchar.client.batch")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("nextchar batch: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if args.local is not None and args.server:
        return _refuse("--local runs in this process: it takes no --server")
    opts = JobOptions(
        top_k=args.top_k,
        per_position=args.per_position,
        input_format=args.format,
        shard=args.shard,
        concurrency=args.concurrency,
        texts_per_request=args.texts_per_request,
        timeout_s=args.timeout_s,
        max_retries=args.max_retries,
        restart=args.restart,
        progress=not args.no_progress,
    )
    target: Target
    if args.local is not None:
        try:
            target = LocalTarget(args.local, model=args.model, priority=args.priority)
        except ImportError as e:
            return _refuse(f"--local: {e}")
        except Exception as e:  # ArtifactError, DeviceUnavailable, bad NEXTCHAR_* settings
            return _refuse(f"--local {args.local}: {e}".splitlines()[0])
    else:
        try:
            client = make_client(args)
        except NextCharError as e:
            # A bad TLS file or flag is an option to fix (2); only a host name that does not
            # resolve (UNAVAILABLE, with several --server) may resolve later (1).
            message = " ".join(e.details.split())
            if e.code.name == "UNAVAILABLE":
                print(f"nextchar batch: cannot start: {message}; nothing was sent or written",
                      file=sys.stderr)
                return 1
            return _refuse(message)
        target = RemoteTarget(client, model=args.model, priority=args.priority)
    try:
        summary = run_job(args.input, args.output, target, opts)
    except NotYet as e:  # before JobError, its base: nothing started, a rerun may
        print(f"nextchar batch: {e}", file=sys.stderr)
        return 1
    except JobError as e:
        return _refuse(str(e))
    except JobAborted as e:
        print(f"nextchar batch: {e}", file=sys.stderr)
        return 130 if isinstance(e, JobInterrupted) else 1
    finally:
        target.close()
    print(f"nextchar batch: {summary.line()}", file=sys.stderr)
    return 0


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is logged, not when the handler was made
    (a redirected or captured stderr, as in-process CLI tests do, stays right)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _refuse(message: str) -> int:
    print(f"nextchar batch: {message}", file=sys.stderr)
    return 2
