"""`nextchar serve` as a subprocess for the benchmarks: started, SERVING, measurable, stopped.

    from serve_process import ServeProcess
    server = ServeProcess(["--model", str(artifact), "--no-batching"])
    ...  # server.address, server.cpu_s(), server.rss_mib()
    server.stop()

The server prints "nextchar serving on HOST:PORT" once it is SERVING (then, with
--metrics-port, its metrics URL), so reading that line is the readiness check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

# nextchar serve's HTTP front end defaults to port 8000: servers this script starts pick a free
# one, so they never collide with each other or with a server already on 8000.
os.environ.setdefault("NEXTCHAR_HTTP_PORT", "0")


class ServeProcess:
    def __init__(self, args: list[str], *, stderr: IO[str] | None = None, what: str = "server",
                 command: list[str] | None = None) -> None:
        """args: `nextchar serve` flags after `--port 0`; stderr: where its log goes (inherited
        by default); what: named in the error when it does not start; command: another program
        that prints the same line (bench/grpc_floor.py), run instead of `nextchar serve`."""
        command = command or [sys.executable, "-m", "nextchar", "serve"]
        self.proc = subprocess.Popen(
            [*command, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("nextchar serving on "):
            self.kill()
            raise SystemExit(f"{what} did not start: {line!r}")
        self.address = line.rsplit(" ", 1)[1].strip()

    def read_line(self) -> str:
        """The next line the server printed (e.g. its metrics URL after the address)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def cpu_s(self) -> float:
        """user+sys seconds of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (a graceful drain), then SIGKILL if it is still there after timeout_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
