"""`make demo`: train a small default model, export it, serve it, predict, shut down.

Every step is a real `nextchar` command, printed before it runs, so the demo doubles as a
walk-through of the CLI:

    python scripts/demo.py --workdir runs/demo --max-minutes 1.5
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

NEXTCHAR = [sys.executable, "-m", "nextchar"]
# `nextchar serve`'s default --model (server/settings.py): what this demo writes with its default
# --workdir, so a bare `nextchar serve` after `make demo` serves the demo's model.
DEFAULT_MODEL = Path("runs/demo/artifact")
PROMPTS = ["To be, or not to b", "ROMEO:\nBut soft, what light through yonder windo", "My lord, I ", "Exeun"]


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def run(args: list[str]) -> None:
    print("$ nextchar " + shlex.join(args), flush=True)
    subprocess.run(NEXTCHAR + args, check=True)


def serve(artifact: Path, backend: str) -> tuple[subprocess.Popen[str], str]:
    args = ["serve", "--model", str(artifact), "--backend", backend, "--port", "0", "--http-port", "0"]
    print("$ nextchar " + shlex.join(args) + " &", flush=True)
    proc = subprocess.Popen(NEXTCHAR + args, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once the model is warm and health says SERVING
    if not line.startswith("nextchar serving on "):
        proc.kill()
        raise SystemExit(f"demo: server failed to start ({line.strip() or 'no output'})")
    print(line.strip(), flush=True)
    return proc, line.rsplit(" ", 1)[1].strip()


def stop(proc: subprocess.Popen[str]) -> None:
    print("$ kill -TERM <server>   # graceful drain, exit code 0", flush=True)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    print(f"server exited with code {code}", flush=True)
    if code != 0:
        raise SystemExit(f"demo: server exited with {code}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    ap.add_argument("--max-minutes", type=float, default=1.5, help="training time budget")
    ap.add_argument("--backend", default="onnx", choices=["onnx", "torchscript"])
    args = ap.parse_args()
    work = args.workdir
    started = time.monotonic()

    step("1. The seed's task: three models learn 'hello' -> 'ohlol'")
    run(["train", "--preset", "hello", "--out", str(work / "hello")])
    run(["export", str(work / "hello"), "-o", str(work / "hello-artifact")])

    step(f"2. Train a character-level model on Shakespeare ({args.max_minutes} min budget)")
    # --overwrite: the demo's folder is its own, so a second `make demo` trains afresh
    # instead of stopping at the first run's checkpoint.
    run(["train", "--out", str(work / "shakespeare"), "--max-minutes", str(args.max_minutes),
         "--overwrite"])

    step("3. Export to ONNX + TorchScript, with the parity gate")
    run(["export", str(work / "shakespeare"), "-o", str(work / "artifact")])

    step("4. Serve the hello model and ask it over gRPC, one argmax per position")
    proc, address = serve(work / "hello-artifact", args.backend)
    try:
        run(["predict", "--server", address, "--per-position", "--top-k", "2", "hello"])
    finally:
        stop(proc)

    step(f"5. Serve the Shakespeare model ({args.backend}) and predict next characters")
    proc, address = serve(work / "artifact", args.backend)
    try:
        run(["info", "--server", address])
        run(["predict", "--server", address, "--top-k", "3", *PROMPTS])
        run(["predict", "--server", address, "--json", PROMPTS[0]])
    finally:
        stop(proc)

    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; artifacts under {work}/")
    if (work / "artifact").resolve() == DEFAULT_MODEL.resolve():
        print(f"serve it again: nextchar serve   (the default --model is {DEFAULT_MODEL})")
    else:
        print(f"serve it again: nextchar serve --model {work / 'artifact'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"demo: step failed: {shlex.join(e.cmd[2:])} (exit {e.returncode})", file=sys.stderr)
        sys.exit(1)
