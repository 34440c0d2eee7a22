"""The `nextchar` command. Client subcommands live here; others load their package lazily so
the thin client install (no torch, no onnxruntime) still runs `predict`, `info` and `health`.

    nextchar predict --server 127.0.0.1:50051 --top-k 3 "To be, or not to b"
    nextchar predict --json --per-position hello
    nextchar info | nextchar health
    nextchar generate --max-chars 200 --temperature 0.8 --seed 7 "To be, or not to b"
    nextchar batch in.txt -o out.jsonl --server 10.0.0.1:50051 --server 10.0.0.2:50051
    nextchar serve ...   (needs nextchar[serve])      nextchar train/export ... (nextchar[train])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from . import batch_cli
from .client import NextCharClient, NextCharError, prediction_to_dict

DEFAULT_SERVER = os.environ.get("NEXTCHAR_SERVER", "127.0.0.1:50051")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", action="append", default=None, metavar="HOST:PORT",
                   help=f"server address; repeat to balance over several "
                        f"[env NEXTCHAR_SERVER, default {DEFAULT_SERVER}]")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-call deadline in seconds")
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


def cmd_predict(args: argparse.Namespace) -> int:
    with _client(args) as c:
        preds = c.predict(args.texts, top_k=args.top_k, per_position=args.per_position)
    for text, pred in zip(args.texts, preds, strict=True):
        if args.json:
            print(json.dumps(prediction_to_dict(text, pred), ensure_ascii=False))
            continue
        tops = "  ".join(f"{c.char!r} {c.prob:.3f}" for c in pred.top)
        print(f"{text!r} -> {tops}")
        if pred.argmax_text:
            print(f"  per position: {pred.argmax_text!r}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        info = c.model_info()
    print(json.dumps(MessageToDict(info), indent=2, ensure_ascii=False))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_reload(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        outcome = c.reload_model()
    print(json.dumps(MessageToDict(outcome, always_print_fields_with_no_presence=True)))
    return 0


def _count(text: str) -> int:
    """A uint32 (count or seed), refused by argparse with one line otherwise."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and {2**32 - 1}, got {value}")
    return value


def cmd_generate(args: argparse.Namespace) -> int:
    """Prints the characters as they arrive; Ctrl-C cancels the call on the server."""
    if args.echo:
        sys.stdout.write(args.prompt)
    with _client(args) as c:
        for text in c.generate(args.prompt, max_chars=args.max_chars, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop):
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _client_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextchar", description="nextchar: next-character prediction over gRPC.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sp = sub.add_parser("predict", help="top-k next characters for each TEXT")
    _add_common(sp)
    sp.add_argument("--top-k", type=int, default=0, help="characters per text (0: server default)")
    sp.add_argument("--per-position", action="store_true", help="also the argmax at every position")
    sp.add_argument("--json", action="store_true", help="one JSON object per line (stable shape)")
    sp.add_argument("texts", nargs="+", metavar="TEXT")
    sp.set_defaults(func=cmd_predict)
    si = sub.add_parser("info", help="model, backend, device and limits of a server (JSON)")
    _add_common(si)
    si.set_defaults(func=cmd_info)
    sh = sub.add_parser("health", help="gRPC health status; exit 0 only when SERVING")
    _add_common(sh)
    sh.add_argument("--service", default="", help="service name ('' = whole server)")
    sh.set_defaults(func=cmd_health)
    sr = sub.add_parser("reload", help="admin: load and swap in the newest model version now")
    _add_common(sr)
    sr.set_defaults(func=cmd_reload)
    sg = sub.add_parser("generate", help="sample text after PROMPT, printed as it is generated")
    _add_common(sg)
    sg.add_argument("--max-chars", type=_count, default=200, help="characters to generate at most")
    sg.add_argument("--temperature", type=float, default=1.0, help="0: always the likeliest")
    sg.add_argument("--top-k", type=_count, default=0, help="sample among the k likeliest (0: all)")
    sg.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0: off)")
    sg.add_argument("--seed", type=_count, default=None, help="same seed, same text (default random)")
    sg.add_argument("--stop", action="append", default=[], metavar="STRING",
                    help="stop before this string; repeatable")
    sg.add_argument("--echo", action="store_true", help="print the prompt before the text")
    sg.add_argument("prompt", metavar="PROMPT")
    sg.set_defaults(func=cmd_generate)
    batch_cli.add_parser(sub, _add_common, _client)
    for name, text in LAZY_HELP.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


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
        return _lazy(module, extra)(rest)
    args = _client_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NextCharError as e:
        print(f"nextchar {args.command}: {e.code.name}: {e.details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
