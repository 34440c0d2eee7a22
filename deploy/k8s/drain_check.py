"""What a rolling update does to callers, without a cluster: two replicas, one drains.

    .venv/bin/python deploy/k8s/drain_check.py [--rounds 3] [--prestop-s 0.3] [--grace-s 8]

A Deployment's rolling update sends SIGTERM to an old pod while clients keep calling. A gRPC
client on the headless Service holds one connection per pod it resolved and round_robins over
them; it re-resolves the name only when a connection breaks or the server says GOAWAY. So the
pod leaving the Service's endpoints changes nothing for an existing channel: what matters is
what the draining server answers on the connection the client already has. This script makes
exactly that situation on loopback: two `nextchar serve` processes (this venv, a tiny
random-weight model), 8 closed-loop callers on one NextCharClient over both addresses (one
channel, round_robin, the client's own retry policy), SIGTERM to the first server, and counts
every call's outcome after the signal, in two modes:

- unary: only Predict calls in flight;
- stream: also one Generate stream on the draining server that outlasts its pre-stop wait
  (long calls: streams, big batches).

Each round prints the outcomes; docs/deploy.md ("Rolling updates") has a recorded run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

VOCAB = "\n !',.?abcdefghijklmnopqrstuvwxyz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(art: Path, port: int, prestop_s: float, grace_s: float, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTCHAR_")}
    cmd = [sys.executable, "-m", "nextchar.client.cli", "serve", "--model", str(art), "--port",
           str(port), "--prestop-s", str(prestop_s), "--grace-s", str(grace_s),
           "--http-port", "0"]  # gRPC is what this measures; HTTP on any free port
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    from nextchar.client import NextCharClient

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with NextCharClient(address, timeout_s=1) as c:
                if c.health() == "SERVING":
                    return
        except Exception:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise SystemExit(f"{address} did not start:\n{log.read_text()[-2000:]}")


def one_round(art: Path, work: Path, stream: bool, prestop_s: float, grace_s: float) -> dict[str, object]:
    from nextchar.client import NextCharClient, NextCharError

    ports = [free_port(), free_port()]
    logs = [work / f"server-{p}.log" for p in ports]
    procs = [start(art, p, prestop_s, grace_s, log) for p, log in zip(ports, logs, strict=True)]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    try:
        for a, p, log in zip(addresses, procs, logs, strict=True):
            wait_serving(a, p, log)
        after: Counter[str] = Counter()
        before = [0]
        lock = threading.Lock()
        stop = threading.Event()
        signalled = threading.Event()
        stream_result: list[str] = []

        def caller() -> None:
            with NextCharClient(addresses, timeout_s=5) as c:
                while not stop.is_set():
                    try:
                        c.predict(["hello there"], top_k=1)
                        outcome = "OK"
                    except NextCharError as e:
                        outcome = e.code.name
                    with lock:
                        if signalled.is_set():
                            after[outcome] += 1
                        else:
                            before[0] += outcome == "OK"

        def streamer() -> None:
            with NextCharClient(addresses[0], timeout_s=60) as c:
                try:
                    chars = sum(len(t) for t in c.generate("hello", max_chars=4096, seed=1))
                    stream_result.append(f"finished, {chars} chars")
                except NextCharError as e:
                    stream_result.append(f"{e.code.name}: {e.details[:60]}")

        threads = [threading.Thread(target=caller) for _ in range(8)]
        if stream:
            threads.append(threading.Thread(target=streamer))
        for t in threads:
            t.start()
        time.sleep(1.0)
        with lock:
            signalled.set()
        t0 = time.monotonic()
        os.killpg(procs[0].pid, signal.SIGTERM)
        code = procs[0].wait(timeout=grace_s + prestop_s + 30)
        drain_s = time.monotonic() - t0
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        return {"mode": "stream" if stream else "unary", "before_ok": before[0],
                "after": dict(after), "drain_s": round(drain_s, 2), "exit": code,
                "stream": stream_result[0] if stream_result else "-"}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prestop-s", type=float, default=0.3)
    ap.add_argument("--grace-s", type=float, default=8.0)
    args = ap.parse_args(argv)
    from nextchar.training.export import build_random_artifact

    with tempfile.TemporaryDirectory(prefix="nextchar-drain-") as tmp:
        work = Path(tmp)
        art = build_random_artifact(work / "art", vocab=VOCAB, cell="rnn", embed_dim=8,
                                    hidden_size=16, num_layers=2, seed=0)
        print(f"prestop_s {args.prestop_s}, grace_s {args.grace_s}, 8 callers, 2 replicas")
        for stream in (False, True):
            for i in range(args.rounds):
                r = one_round(art, work, stream, args.prestop_s, args.grace_s)
                failed = sum(n for k, n in r["after"].items() if k != "OK")  # type: ignore[union-attr]
                print(f"{r['mode']:6} round {i + 1}: after SIGTERM {r['after']} "
                      f"({failed} failed); before {r['before_ok']} OK; drained replica exit "
                      f"{r['exit']} in {r['drain_s']} s; stream: {r['stream']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
