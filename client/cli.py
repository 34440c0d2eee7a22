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
when the reader of stdout went away (`nextchar predict ... | head -1`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Callable

from nextchar import __version__

from . import batch_cli
from .client import (
    DEFAULT_PORT,
    UINT32_MAX,
    NextCharClient,
    NextCharError,
    message_to_dict,
    prediction_to_dict,
)

DEFAULT_SERVER = os.environ.get("NEXTCHAR_SERVER", f"127.0.0.1:{DEFAULT_PORT}")
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def _count(text: str) -> int:
    """A uint32 (count or seed), refused by argparse with one line otherwise."""
    value = int(text)
    if not 0 <= value <= UINT32_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {UINT32_MAX}, got {value}")
    return value


def _positive_count(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


# argparse names a type in its message ("invalid _count value"): name them for the reader.
_count.__name__ = "integer"
_positive_count.__name__ = "integer"
_seconds.__name__ = "seconds"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", action="append", default=None, metavar="HOST:PORT",
                   help=f"server address (port default {DEFAULT_PORT}); repeat to balance over "
                        f"several [env NEXTCHAR_SERVER, default {DEFAULT_SERVER}]")
    p.add_argument("--timeout-s", type=_seconds, default=30.0,
                   help="per-call deadline in seconds (default 30)")
    p.add_argument("--tls", action="store_true",
                   help="TLS, verifying the server against the system's CA roots")
    p.add_argument("--tls-ca", default=os.environ.get("NEXTCHAR_TLS_CA"), metavar="PEM",
                   help="TLS, verifying the server against this CA bundle [env NEXTCHAR_TLS_CA]")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mTLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name to verify in the server certificate (default: the host in --server)")
    p.add_argument("--token", default=os.environ.get("NEXTCHAR_TOKEN"),
                   help="bearer token sent with every call [env NEXTCHAR_TOKEN, preferred: a flag "
                        "shows in the process list]")


def _client(args: argparse.Namespace) -> NextCharClient:
    return NextCharClient(args.server or [DEFAULT_SERVER], timeout_s=args.timeout_s,
                          tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, tls_server_name=args.tls_server_name,
                          token=args.token)


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
    with _client(args) as c:
        info = c.model_info(model=args.model)
    print(json_block(message_to_dict(info)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
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
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
              + ("  " + row[4] if row[4] else "").rstrip())
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with _client(args) as c:
        outcome = c.load_model(args.name)
    print(json.dumps(message_to_dict(outcome), ensure_ascii=False))
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        outcome = c.unload_model(args.name)
    print(json.dumps(message_to_dict(outcome), ensure_ascii=False))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_reload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        outcome = c.reload_model(model=args.model)
    print(json.dumps(message_to_dict(outcome), ensure_ascii=False))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Prints the characters as they arrive; Ctrl-C cancels the call on the server."""
    if args.echo:
        sys.stdout.write(args.prompt)
    with _client(args) as c:
        for text in c.generate(args.prompt, max_chars=args.max_chars, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                               model=args.model, priority=args.priority):
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The client commands (serve, train and export parse their own flags: LAZY)."""
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
    sg.add_argument("--temperature", type=float, default=1.0,
                    help="0: always the likeliest (default 1)")
    sg.add_argument("--top-k", type=_count, default=0,
                    help="sample among the k likeliest (default 0: all)")
    sg.add_argument("--top-p", type=float, default=0.0,
                    help="nucleus sampling mass (default 0: off)")
    sg.add_argument("--seed", type=_count, default=None, help="same seed, same text (default random)")
    sg.add_argument("--stop", action="append", default=[], metavar="STRING",
                    help="stop before this string; repeatable")
    sg.add_argument("--echo", action="store_true", help="print the prompt before the text")
    sg.add_argument("prompt", metavar="PROMPT")
    sg.set_defaults(func=cmd_generate)
    sb = batch_cli.add_parser(sub, _add_common, _client)
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
    and message name `nextchar predict`, not `nextchar`), with the nearest real flag."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sp = subparsers(parser)[args.command]
        flags = [o for a in sp._actions for o in a.option_strings]
        hint = ""
        for arg in extra:
            close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1)
            if arg.startswith("-") and close:
                hint = f" (did you mean {close[0]}?)"
                break
        sp.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _stdout_closed() -> int:
    """The reader of stdout left (`| head`): no traceback, and none at exit either, when Python
    flushes what is still buffered."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE_CLOSED


def _lazy(module: str, extra: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"nextchar: this command needs 'pip install nextchar[{extra}]' ({e})", file=sys.stderr)
            return 2
        return int(mod.main(argv))

    return run


# Subcommands whose code lives in other packages: name -> (module, extra, help).
LAZY = {
    "serve": ("nextchar.server.cli", "serve", "serve an artifact over gRPC"),
    "train": ("nextchar.training.cli", "train", "train a model (--preset hello, --corpus ...)"),
    "export": ("nextchar.training.cli", "train", "export a run to ONNX + TorchScript + manifest"),
}
LAZY_HELP = {name: text for name, (_, _, text) in LAZY.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LAZY:
        module, extra, _ = LAZY[argv[0]]
        # training's CLI takes its own subcommand name; serve's parser does not.
        rest = argv if module.endswith("training.cli") else argv[1:]
        try:
            code = _lazy(module, extra)(rest)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            return _stdout_closed()
    args = _parse(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except NextCharError as e:
        details = " ".join(e.details.split("\n")).strip()
        print(f"nextchar {args.command}: {e.code.name}: {details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
