"""Where a server's CPU goes under load: per-thread CPU per request, from /proc (Linux).

    .venv/bin/python bench/server_cpu.py                       # nextchar defaults, c=64
    .venv/bin/python bench/server_cpu.py --ab -- --no-http2-bdp-probe --http2-bdp-probe
    .venv/bin/python bench/server_cpu.py --floor --rounds 3 --json docs/server_cpu_floor.json
    .venv/bin/python bench/server_cpu.py --ab --pin -- "--worker-nice 0" "--worker-nice 5"

Starts `nextchar serve` on the peer-benchmark model (bench/peer_bench.py), drives it with the
peer benchmark's closed loop (one 64-character KServe ModelInfer per request, C workers on one
channel), and reads each server thread's CPU time (utime + stime) and run-queue wait
(/proc/<pid>/task/<tid>/schedstat: time runnable but not running, i.e. waiting for a core)
before and after the measured seconds. With --ab, the flag sets after `--` are run in turns,
--rounds times, so drift on a shared machine hits each alike. With --floor, nextchar and
bench/grpc_floor.py (grpc.aio answering with a saved nextchar response, no model, no nextchar
code) take turns: what the transport alone costs per call, against what nextchar costs; and
grpc_floor.py --handoff, the same with each call waiting on a batch hand-off to a worker thread
and back (no compute), the cost any batching server on asyncio adds to the transport's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import peer_bench as pb

# nextchar serve's HTTP front end defaults to port 8000: servers this script starts pick a free
# one, so they never collide with each other or with a server already on 8000.
os.environ.setdefault("NEXTCHAR_HTTP_PORT", "0")


def thread_times(pid: int) -> dict[str, tuple[str, float, float]]:
    """tid -> (name, CPU seconds, run-queue wait seconds)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            sched = (task / "schedstat").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out[task.name] = ("main" if task.name == str(pid) else name, cpu, int(sched[1]) / 1e9)
    return out


FLOOR = "(grpc floor)"
HANDOFF = "(grpc floor + batch hand-off)"


def start_floor(workdir: Path, response: Path, flags: list[str]) -> pb.Server:
    port = pb.free_port()
    argv = [sys.executable, str(Path(__file__).with_name("grpc_floor.py")), "--port", str(port),
            "--infer-response", str(response), *flags]
    return pb.Server("grpc floor", argv, port, workdir, workdir / "grpc_floor.log")


def save_response(artifact: Path, workdir: Path, payload: bytes) -> Path:
    """nextchar's answer to the benchmark's first request, for the floor server to send."""
    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    server = pb.start_nextchar(artifact, workdir)
    try:
        server.wait_ready(manifest["name"])
        with grpc.insecure_channel(server.address) as ch:
            answer = ch.unary_unary(pb.INFER)(payload, timeout=30)
    finally:
        server.stop()
    path = workdir / "floor_response.bin"
    path.write_bytes(answer)
    return path


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of process pid onto `cpus` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:  # the thread ended meanwhile
            pass


def run_once(artifact: Path, flags: list[str], concurrency: int, seconds: float,
             workdir: Path, floor_response: Path | None = None,
             server_cpus: set[int] | None = None) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    payloads = pb.make_payloads(manifest["name"])
    server = (start_floor(workdir, floor_response, flags) if floor_response is not None
              else pb.start_nextchar(artifact, workdir, *flags))
    try:
        server.wait_ready(manifest["name"])
        if server_cpus:
            pin_threads(server.proc.pid, server_cpus)
        asyncio.run(pb.closed_loop(server.address, payloads, concurrency, 2.0))  # warm-up
        before, own_before = thread_times(server.proc.pid), os.times()
        sample = asyncio.run(pb.closed_loop(server.address, payloads, concurrency, seconds))
        after, own_after = thread_times(server.proc.pid), os.times()
    finally:
        server.stop()
    n, wall = sample.requests, sample.duration_s
    threads = []
    for tid, (name, cpu, wait) in after.items():
        _, cpu0, wait0 = before.get(tid, (name, 0.0, 0.0))
        if cpu - cpu0 > 0.01 * wall:
            threads.append({"thread": f"{name}:{tid}", "cores": round((cpu - cpu0) / wall, 2),
                            "us_per_request": round((cpu - cpu0) / n * 1e6),
                            "runqueue_wait": round((wait - wait0) / wall, 2)})
    threads.sort(key=lambda t: -t["cores"])
    loadgen = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    floor = (HANDOFF if flags else FLOOR) if floor_response is not None else None
    return {"server": floor or "nextchar",
            "flags": flags, "throughput_rps": sample.throughput_rps, "p99_ms": sample.p99_ms,
            "server_us_per_request": round(sum(t["us_per_request"] for t in threads)),
            "loadgen_us_per_request": round(loadgen / n * 1e6), "threads": threads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--ab", action="store_true",
                    help="the arguments after -- are flag sets to compare, one per argument "
                         "(split on spaces; '' = defaults)")
    ap.add_argument("--floor", action="store_true",
                    help="nextchar (with the flags after --) and the grpc.aio floor server, "
                         "plain and with --handoff, in turns")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every round's results here")
    ap.add_argument("--pin", action="store_true",
                    help="the load generator on the first core, the server on the others: no "
                         "CPU shared between them, so a difference is the server's own")
    ap.add_argument("--workdir", type=Path, default=pb.REPO / "runs" / "server_cpu")
    args, rest = ap.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    args.workdir.mkdir(parents=True, exist_ok=True)
    artifact = pb.peer_artifact()
    sets = [s.split() for s in rest] if args.ab else [rest]
    rounds = args.rounds if args.ab or args.floor else 1
    runs: list[tuple[str, list[str], Path | None]] = [(" ".join(f) or "(defaults)", f, None)
                                                      for f in sets]
    if args.floor:
        manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        response = save_response(artifact, args.workdir, pb.make_payloads(manifest["name"])[0])
        runs += [(FLOOR, [], response), (HANDOFF, ["--handoff"], response)]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    server_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 cores")
        os.sched_setaffinity(0, {cpus[0]})
        server_cpus = set(cpus[1:])
    for _ in range(rounds):
        for label, flags, floor_response in runs:
            r = run_once(artifact, flags, args.concurrency, args.seconds, args.workdir,
                         floor_response, server_cpus)
            results[label].append(r)
            print(f"{label:<40} {r['throughput_rps']:>8.1f} req/s  p99 {r['p99_ms']:6.1f} ms  "
                  f"server {r['server_us_per_request']} us/req  loadgen "
                  f"{r['loadgen_us_per_request']} us/req", flush=True)
            if not args.ab:  # one flag set: where its CPU went, thread by thread
                for t in r["threads"]:
                    print(f"  {t['thread']:<24} {t['cores']:.2f} cores  {t['us_per_request']:>5} "
                          f"us/req  waiting for a core {t['runqueue_wait']:.2f} of the time")
    if args.json:
        args.json.write_text(json.dumps({
            "date": started, "commit": pb.git_commit(),
            "command": " ".join(["bench/server_cpu.py", *sys.argv[1:]]),
            "machine": f"{os.cpu_count()} cores", "concurrency": args.concurrency,
            "seconds": args.seconds, "rounds": rounds,
            "pinned": f"load generator on core {cpus[0]}, server on {sorted(server_cpus)}"
            if server_cpus else "no", "results": results}, indent=1) + "\n")
    if args.ab or args.floor:
        print("medians:")
        for label, rs in results.items():
            print(f"  {label:<40} {statistics.median(r['throughput_rps'] for r in rs):>8.1f} "
                  f"req/s  server {statistics.median(r['server_us_per_request'] for r in rs):.0f} "
                  "us/req")
    return 0


if __name__ == "__main__":
    sys.exit(main())
