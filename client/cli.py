"""The `nextchar` command. Client subcommands live here; others load their package lazily so
the thin client install (no torch, no onnxruntime) still runs `predict`, `info` and `health`.

    nextchar predict --server 127.0.0.1:50051 --top-k 3 "To be, or not to b"
    nextchar predict --json --per-position --model hello-rnn hello
    nextchar info | nextchar health | nextchar models
    nextchar generate --max-chars 200 --temperature 0.8 --seed 7 "To be, or not to b"
    nextchar batch in.txt -o out.jsonl --server 10.0.0.1:50051 --server 10.0.0.2:50051
    nextchar load NAME | nextchar unload NAME | nextchar reload [--model NAME]   (Admin)
    nextchar serve ...   (needs nextchar[serve])      nextchar train/export ... (nextchar[train])

Every failure is one line on stderr, `nextchar COMMAND: ...`, and a non-zero exit: 1 for a
failed call, 2 for a usage error (argparse's usage lines, then that one line), 141 (quietly)
when the reader of stdout went away (`nextchar predict ... | head -1`), 130 (quietly) on Ctrl-C.

This module imports grpc (and the rest of the client) only once `main` runs, so a Ctrl-C while
those imports run (about 0.2 s) ends as quietly as one later.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator

from nextchar import __version__

from .limits import (
    DEFAULT_PORT,
    FLOAT32_MAX,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TIMEOUT_S,
    UINT32_MAX,
    UINT64_MAX,
)

# typing.TYPE_CHECKING without importing typing before `main` runs (see main); mypy takes any
# name TYPE_CHECKING as True.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .client import NextCharClient

# An empty variable counts as unset, as in the server's settings (`NEXTCHAR_TLS_CA= nextchar ...`).
DEFAULT_SERVER = os.environ.get("NEXTCHAR_SERVER") or f"127.0.0.1:{DEFAULT_PORT}"
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports after Ctrl-C
# The flags whose default comes from the environment: a bad value there is named by its variable.
ENV_DEFAULTS = {"server": "NEXTCHAR_SERVER", "token": "NEXTCHAR_TOKEN", "tls_ca": "NEXTCHAR_TLS_CA"}


def _uint32(text: str, minimum: int) -> int:
    value = int(text)
    if not minimum <= value <= UINT32_MAX:
        raise argparse.ArgumentTypeError(f"must be between {minimum} and {UINT32_MAX}, got {value}")
    return value


def _count(text: str) -> int:
    """A uint32 count, refused by argparse with one line otherwise."""
    return _uint32(text, 0)


def _seed(text: str) -> int:
    """A uint64, as GenerateRequest.seed is: a seed the library takes replays here too."""
    value = int(text)
    if not 0 <= value <= UINT64_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {UINT64_MAX}, got {value}")
    return value


def _positive_count(text: str) -> int:
    return _uint32(text, 1)


def _seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    if value > MAX_TIMEOUT_S:  # gRPC's deadlines end near 9.2e9 s: longer fails at once
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_S:.0f} seconds (about 31 "
                                         f"years), got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: always the likeliest), "
                                         f"got {text}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (0 or 1: off), got {text}")
    return value


def _stop(text: str) -> str:
    if not 1 <= len(text) <= MAX_STOP_CHARS:
        raise argparse.ArgumentTypeError(f"must have 1 to {MAX_STOP_CHARS} characters, "
                                         f"got {len(text)}")
    return text


def _prompt(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("is empty: give at least one character")
    return text


# argparse names a type in its message ("invalid _count value"): name them for the reader.
_count.__name__ = _seed.__name__ = "integer"
_positive_count.__name__ = "integer"
_seconds.__name__ = "seconds"
_temperature.__name__ = _top_p.__name__ = "number"
_stop.__name__ = _prompt.__name__ = "text"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", action="append", default=None, metavar="HOST:PORT",
                   help=f"server address (port default {DEFAULT_PORT}); repeat to balance over "
                        f"several [env NEXTCHAR_SERVER, default {DEFAULT_SERVER}]")
    p.add_argument("--timeout-s", type=_seconds, default=30.0,
                   help="per-call deadline in seconds (default 30)")
    p.add_argument("--tls", action="store_true",
                   help="TLS, verifying the server against the system's CA roots")
    p.add_argument("--tls-ca", default=os.environ.get("NEXTCHAR_TLS_CA") or None, metavar="PEM",
                   help="TLS, verifying the server against this CA bundle [env NEXTCHAR_TLS_CA]")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mTLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name to verify in the server certificate (default: the host in --server)")
    p.add_argument("--token", default=os.environ.get("NEXTCHAR_TOKEN") or None,
                   help="bearer token sent with every call [env NEXTCHAR_TOKEN, preferred: a flag "
                        "shows in the process list]")


class UsageError(Exception):
    """An option the command cannot use, found once its value is read (a TLS file that is not
    PEM, a key without its certificate): exit 2, one line, as argparse's own refusals."""


def _client(args: argparse.Namespace) -> NextCharClient:
    import grpc

    from .client import NextCharClient, NextCharError

    try:
        return NextCharClient(args.server or [DEFAULT_SERVER], timeout_s=args.timeout_s,
                              tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                              tls_key=args.tls_key, tls_server_name=args.tls_server_name,
                              token=args.token)
    except NextCharError as e:
        if e.code == grpc.StatusCode.INVALID_ARGUMENT:  # nothing was sent: fix the option
            raise UsageError(" ".join(e.details.split())) from None
        raise


def _add_model(p: argparse.ArgumentParser, what: str = "model to ask") -> None:
    p.add_argument("--model", default="", metavar="NAME",
                   help=f"{what} (`nextchar models` lists them; default: the server's default "
                        f"model)")


def _add_priority(p: argparse.ArgumentParser, default: str | None) -> None:
    shown = default or "the server's default, high"
    p.add_argument("--priority", choices=("high", "low"), default=default,
                   help=f"scheduling lane: high (interactive) or low (bulk; served when no high "
                        f"work is queued) (default: {shown})")


def cmd_predict(args: argparse.Namespace) -> int:
    from .client import prediction_to_dict

    with _client(args) as c:
        preds = c.predict(args.texts, top_k=args.top_k, per_position=args.per_position,
                          model=args.model, priority=args.priority)
    for text, pred in zip(args.texts, preds, strict=True):
        if args.json:
            print(json.dumps(prediction_to_dict(text, pred), ensure_ascii=False))
            continue
        tops = "  ".join(f"{c.char!r} {c.prob:.3f}" for c in pred.top)
        print(f"{text!r} -> {tops}")
        if pred.argmax_text:
            print(f"  per position: {pred.argmax_text!r}")
    return 0


def json_block(value: object, indent: str = "") -> str:
    """Indented JSON whose lists of plain values stay on one line: the vocabulary is one line,
    not 84 (json.dumps(indent=2) puts every element on its own)."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {json_block(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + json_block(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def cmd_info(args: argparse.Namespace) -> int:
    from .client import message_to_dict

    with _client(args) as c:
        info = c.model_info(model=args.model)
    print(json_block(message_to_dict(info)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .client import message_to_dict

    with _client(args) as c:
        listing = c.list_models()
    if args.json:
        print(json_block(message_to_dict(listing)))
        return 0
    rows = [("NAME", "VERSION", "STATE", "DEFAULT", "REASON")]
    for m in listing.models:
        state = str(message_to_dict(m)["state"]).removeprefix("MODEL_STATE_")
        rows.append((m.name, m.version or "-", state, "yes" if m.is_default else "",
                     m.reason.splitlines()[0] if m.reason else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
               + ("  " + row[4] if row[4] else "")).rstrip())
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from .client import message_to_dict

    with _client(args) as c:
        outcome = c.load_model(args.name)
    print(json.dumps(message_to_dict(outcome), ensure_ascii=False))
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    from .client import message_to_dict

    with _client(args) as c:
        outcome = c.unload_model(args.name)
    print(json.dumps(message_to_dict(outcome), ensure_ascii=False))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    servers = args.server or [DEFAULT_SERVER]
    if len(servers) == 1:
        with _client(args) as c:
            status = c.health(args.service)
        print(status)
        return 0 if status == "SERVING" else 1
    # Several replicas: each one's own answer (one call on the balanced channel would report
    # whichever replica round_robin picked), exit 0 only when every one is SERVING.
    from .client import NextCharError

    every = True
    for server in servers:
        try:
            with _client(argparse.Namespace(**{**vars(args), "server": [server]})) as c:
                status = c.health(args.service)
        except NextCharError as e:
            status = f"{e.code.name}: {' '.join(e.details.split())}"
        print(f"{server} {status}")
        every = every and status == "SERVING"
    return 0 if every else 1


def cmd_reload(args: argparse.Namespace) -> int:
    from .client import message_to_dict

    with _client(args) as c:
        outcome = c.reload_model(model=args.model)
    print(json.dumps(message_to_dict(outcome), ensure_ascii=False))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Prints the characters as they arrive; Ctrl-C cancels the call on the server."""
    # The echo waits for the first chunk: a prompt the server refuses is not printed.
    echo, started = args.prompt if args.echo else "", False
    try:
        with _client(args) as c:
            for text in c.generate(args.prompt, max_chars=args.max_chars,
                                   temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed, stop=args.stop,
                                   model=args.model, priority=args.priority):
                sys.stdout.write(text if started else echo + text)
                sys.stdout.flush()
                started = True
    except BaseException:
        if started:  # the text so far ends its line; the error (or ^C) starts its own
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write(("" if started else echo) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The client commands (serve, train and export parse their own flags: LAZY)."""
    from . import batch_cli

    p = argparse.ArgumentParser(prog="nextchar", description="nextchar: next-character prediction over gRPC.")
    p.add_argument("--version", action="version", version=f"nextchar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sp = sub.add_parser("predict", help="top-k next characters for each TEXT")
    _add_common(sp)
    _add_model(sp)
    _add_priority(sp, None)
    sp.add_argument("--top-k", type=_count, default=0,
                    help="characters per text (default 0: the server's default_top_k)")
    sp.add_argument("--per-position", action="store_true", help="also the argmax at every position")
    sp.add_argument("--json", action="store_true", help="one JSON object per line (stable shape)")
    sp.add_argument("texts", nargs="+", metavar="TEXT")
    sp.set_defaults(func=cmd_predict)
    si = sub.add_parser("info", help="model, backend, device and limits of a server (JSON)")
    _add_common(si)
    _add_model(si, "model to describe")
    si.set_defaults(func=cmd_info)
    sm = sub.add_parser("models", help="the models a server knows: name, version, state, default")
    _add_common(sm)
    sm.add_argument("--json", action="store_true", help="the ListModels answer as JSON")
    sm.set_defaults(func=cmd_models)
    sh = sub.add_parser("health", help="gRPC health status; exit 0 only when SERVING")
    _add_common(sh)
    sh.add_argument("--service", default="", help="service name ('' = whole server)")
    sh.set_defaults(func=cmd_health)
    sr = sub.add_parser("reload", help="admin: load and swap in the newest model version now")
    _add_common(sr)
    _add_model(sr, "model to reload")
    sr.set_defaults(func=cmd_reload)
    for name, func, text in (("load", cmd_load, "admin: load a model of the server's repository"),
                             ("unload", cmd_unload, "admin: stop serving a model (accepted "
                                                    "calls finish first)")):
        sl = sub.add_parser(name, help=text)
        _add_common(sl)
        sl.add_argument("name", metavar="NAME", help="model name (`nextchar models`)")
        sl.set_defaults(func=func)
    sg = sub.add_parser("generate", help="sample text after PROMPT, printed as it is generated")
    _add_common(sg)
    _add_model(sg)
    _add_priority(sg, None)
    sg.add_argument("--max-chars", type=_positive_count, default=200,
                    help="characters to generate at most, 1 to the server's max_chars_per_text "
                         "(4096 by default) (default 200)")
    sg.add_argument("--temperature", type=_temperature, default=1.0,
                    help="0: always the likeliest (default 1)")
    sg.add_argument("--top-k", type=_count, default=0,
                    help="sample among the k likeliest (default 0: all)")
    sg.add_argument("--top-p", type=_top_p, default=0.0,
                    help="nucleus sampling mass (default 0: off)")
    sg.add_argument("--seed", type=_seed, default=None,
                    help="0 to 2^64-1; same seed, same text (default random)")
    sg.add_argument("--stop", action="append", default=[], metavar="STRING", type=_stop,
                    help="stop before this string; repeatable")
    sg.add_argument("--echo", action="store_true", help="print the prompt before the text")
    sg.add_argument("prompt", metavar="PROMPT", type=_prompt)
    sg.set_defaults(func=cmd_generate)
    sb = batch_cli.add_parser(sub, _add_common, _client, _count)
    _add_model(sb)
    _add_priority(sb, "low")
    for name, text in LAZY_HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name -> parser of every subcommand (the CLI error sweep walks them)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parse(argv: list[str]) -> argparse.Namespace:
    """parse_args, except that an unknown flag is reported by its subcommand's parser (usage
    and message name `nextchar predict`, not `nextchar`), with the nearest real flag; then the
    checks argparse's types cannot make (_check)."""
    import difflib

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sp = subparsers(parser)[args.command]
    if extra:
        flags = [o for a in sp._actions for o in a.option_strings]
        hint = ""
        for arg in extra:
            close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1)
            if arg.startswith("-") and close:
                hint = f" (did you mean {close[0]}?)"
                break
        sp.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    _check(sp, args)
    return args


def _given(sp: argparse.ArgumentParser, args: argparse.Namespace
           ) -> Iterator[tuple[str, str, str]]:
    """(dest, where it came from, value) for every string the subcommand got: `argument --model`
    (argparse's own name for it) or, for a default read from the environment, the variable."""
    for action in sp._actions:
        if action.dest not in vars(args) or isinstance(action, argparse._HelpAction):
            continue
        value = getattr(args, action.dest)
        name = "/".join(action.option_strings) or (
            action.metavar if isinstance(action.metavar, str) else action.dest)
        label = f"argument {name}"
        if action.dest == "server" and value is None:
            value, label = [DEFAULT_SERVER], ENV_DEFAULTS["server"]
        elif action.dest in ENV_DEFAULTS and value is not None and value is action.default:
            label = ENV_DEFAULTS[action.dest]  # the default object itself: not on the command line
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                yield action.dest, label, v


def _not_utf8(value: str) -> str | None:
    """Python decodes a byte of argv or the environment that is not UTF-8 as a lone surrogate
    (U+DC80..U+DCFF); it would fail deep in gRPC, protobuf or a JSON file as a traceback."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        cp = ord(value[e.start])
        what = f"byte 0x{cp - 0xDC00:02x}" if 0xDC80 <= cp <= 0xDCFF else f"character U+{cp:04X}"
        return f"not valid UTF-8 ({what} at position {e.start})"
    return None


def _bad_value(dest: str, value: str) -> str | None:
    """A server address or token that no call could use (also from the environment)."""
    from .client import NextCharError, check_token, with_default_port

    try:
        if dest == "server":
            with_default_port(value)
        elif dest == "token" and value:
            check_token(_strip_newline(value))
    except NextCharError as e:
        return e.details
    return None


def _strip_newline(token: str) -> str:
    # `NEXTCHAR_TOKEN=$(cat token.txt)` keeps the \r of a CRLF file; the server strips the
    # tokens it reads from its file too.
    return token.rstrip("\r\n")


def _check(sp: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses, as a usage error naming the argument, a value that is not UTF-8, a server
    address with a port outside 1-65535, a token that is not printable ASCII and more stop
    strings than the server takes."""
    for dest, label, value in _given(sp, args):
        problem = _not_utf8(value) or _bad_value(dest, value)
        if problem:
            sp.error(f"{label}: {problem}")
    if len(getattr(args, "stop", ())) > MAX_STOP_STRINGS:
        sp.error(f"argument --stop: at most {MAX_STOP_STRINGS} stop strings, got "
                 f"{len(args.stop)}")
    if getattr(args, "token", None):
        args.token = _strip_newline(args.token)


class StdoutFailed(Exception):
    """Standard output refused the command's answer: a full disk, an I/O error, or an encoding
    (a non-UTF-8 locale) that cannot write one of its characters."""


class _Stdout:
    """sys.stdout, whose write failures say they are standard output's (not an input file's)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def _guard(self, op: Callable[..., Any], *args: Any) -> Any:
        try:
            return op(*args)
        except BrokenPipeError:
            raise
        except UnicodeEncodeError as e:
            bad = e.object[e.start:e.start + 1]
            raise StdoutFailed(f"standard output's encoding {e.encoding!r} cannot write {bad!r}: "
                               "set PYTHONIOENCODING=utf-8 or a UTF-8 locale") from None
        except OSError as e:
            raise StdoutFailed(f"cannot write to standard output: {e.strerror or e}") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_closed() -> int:
    """The reader of stdout left (`| head`): no traceback, and none at exit either, when Python
    flushes what is still buffered."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE_CLOSED


def _needs(command: str, extra: str, reason: str) -> int:
    print(f"nextchar {command}: this command needs 'pip install nextchar[{extra}]' ({reason})",
          file=sys.stderr)
    return 2


def _missing_extra(extra: str, e: ModuleNotFoundError) -> bool:
    """One of the extra's own packages is missing: an incomplete install. Anything else (a module
    of nextchar itself, a name inside a module) is a bug and keeps its traceback."""
    return (e.name or "").partition(".")[0] in EXTRA_PACKAGES[extra]


def _load_lazy(argv: list[str]) -> Callable[[], int]:
    """Imports the package of serve, train or export; the command, to run."""
    import importlib
    import importlib.util

    module, extra, _ = LAZY[argv[0]]
    # Checked before the command runs: training's CLI imports torch inside its main (even for
    # --help), past an except around the import of the module.
    key = EXTRA_PACKAGES[extra][0]
    if importlib.util.find_spec(key) is None:
        return lambda: _needs(argv[0], extra, f"No module named {key!r}")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not _missing_extra(extra, e):
            raise
        reason = str(e)
        return lambda: _needs(argv[0], extra, reason)
    # training's CLI takes its own subcommand name; serve's parser does not.
    rest = argv if module.endswith("training.cli") else argv[1:]

    def run() -> int:
        try:
            code = int(mod.main(rest))
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            return _stdout_closed()
        except ModuleNotFoundError as e:
            if not _missing_extra(extra, e):
                raise
            return _needs(argv[0], extra, str(e))

    return run


def _load_client(argv: list[str]) -> Callable[[], int]:
    """Parses a client command's arguments (importing grpc); the command, to run."""
    # gRPC core logs some failures itself (a TLS handshake with a plaintext server, at INFO)
    # before the call fails; the call's own error is the one line this command prints. Read
    # once, when grpc loads; a user's own GRPC_VERBOSITY wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from .client import NextCharError

    args = _parse(argv)

    def run() -> int:
        if sys.stdout is None:  # started with stdout closed (`>&-`)
            print(f"nextchar {args.command}: standard output is closed", file=sys.stderr)
            return 1
        real, sys.stdout = sys.stdout, _Stdout(sys.stdout)  # type: ignore[assignment]
        try:
            code = int(args.func(args))
            sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
            return code
        except BrokenPipeError:
            return _stdout_closed()
        except StdoutFailed as e:
            print(f"nextchar {args.command}: {e}", file=sys.stderr)
            _stdout_closed()  # what is still buffered cannot be written at exit either
            return 1
        except NextCharError as e:
            details = " ".join(e.details.split("\n")).strip()
            print(f"nextchar {args.command}: {e.code.name}: {details}", file=sys.stderr)
            return 1
        except UsageError as e:
            print(f"nextchar {args.command}: {e}", file=sys.stderr)
            return 2
        finally:
            sys.stdout = real

    return run


# Subcommands whose code lives in other packages: name -> (module, extra, help).
LAZY = {
    "serve": ("nextchar.server.cli", "serve", "serve models over gRPC and HTTP"),
    "train": ("nextchar.training.cli", "train", "train a model (--preset hello, --corpus ...)"),
    "export": ("nextchar.training.cli", "train", "export a run to ONNX + TorchScript + manifest"),
}
LAZY_HELP = {name: text for name, (_, _, text) in LAZY.items()}
# The import names of each extra's packages (pyproject.toml); the first is one every run of its
# commands imports.
EXTRA_PACKAGES = {
    "serve": ("pydantic_settings", "pydantic", "numpy", "onnxruntime", "grpc_reflection",
              "prometheus_client", "uvloop", "fastapi", "uvicorn", "httptools", "orjson"),
    "train": ("torch", "numpy", "onnx", "onnxruntime", "matplotlib"),
}


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(EXIT_INTERRUPTED)  # nothing is written yet: nothing to flush or clean up


def _sigint_exits() -> Callable[[], object]:
    """Makes SIGINT end the process at once; returns what puts the previous handler back."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with SIGINT ignored (`nohup`, `cmd &`): keep it so
        return lambda: None
    try:
        signal.signal(signal.SIGINT, _exit_quietly)
    except ValueError:  # not the main thread (a library caller): signals are not ours to set
        return lambda: None
    return lambda: signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def main(argv: list[str] | None = None) -> int:
    """The `nextchar` command. Ctrl-C ends it with 130 and nothing on stderr wherever it lands.
    While the imports run (grpc, the server's or training's packages: 0.2 s and more), SIGINT
    exits at once: a KeyboardInterrupt raised inside a compiled module's initialisation comes
    out as a mangled ImportError or an "Exception ignored" line, not as itself. The command
    then gets KeyboardInterrupt as usual (generate cancels its call, batch stops resumably)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        restore = _sigint_exits()
        try:
            command = _load_lazy(argv) if argv and argv[0] in LAZY else _load_client(argv)
        finally:
            restore()
        return command()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
