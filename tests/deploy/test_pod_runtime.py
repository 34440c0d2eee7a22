"""The server runs as the pod runs it: uid 10001, a read-only root filesystem, only /tmp written.

    sudo .venv/bin/pytest -q tests/deploy/test_pod_runtime.py

deploy/k8s/base/deployment.yaml promises `readOnlyRootFilesystem: true` with an emptyDir on
/tmp and `runAsUser: 10001`. No container runtime runs here, so this test makes the same
conditions by hand: in a private mount namespace (`unshare -m`, root only) the root filesystem
is remounted read-only, /tmp becomes an empty tmpfs, the artifact is bind-mounted read-only
at /srv, and `nextchar serve` starts from this venv as uid 10001 (`setpriv`), with the
container's environment (no HOME to write to, no bytecode files). It must become SERVING,
answer Predict and /metrics, and drain on SIGTERM within prestop_s + grace_s + 1 s, exiting 0.
The host's mounts are untouched (the namespace's mounts are private to it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="needs root, unshare and setpriv (util-linux) to build the pod's filesystem view")
POD_UID = 10001
PRESTOP_S, GRACE_S = 1.0, 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_root
def test_serves_read_only_as_uid_10001(tiny_artifact: Path, tmp_path: Path) -> None:
    from nextchar.client import NextCharClient

    srv = Path("/srv")
    if not srv.is_dir() or any(srv.iterdir()):
        pytest.skip("/srv must be an empty directory (the artifact's mount point)")
    for parent in [Path(sys.prefix), *Path(sys.prefix).parents]:
        if parent.stat().st_mode & 0o005 != 0o005:
            pytest.skip(f"the venv's {parent} is not readable by uid {POD_UID}")
    shutil.copytree(tiny_artifact, tmp_path / "artifact")
    os.chmod(tmp_path, 0o755)
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "server.log"
    # The interpreter lives under /root (mode 0700 here): its tree is moved onto a 0755 tmpfs
    # that hides the rest of /root, as a container image has no root home to read either.
    base = Path(sys.base_prefix).resolve()
    hidden = [p for p in [base, *base.parents] if p.stat().st_mode & 0o005 != 0o005]
    lift = ""
    if hidden:
        top = hidden[-1]  # the outermost unreadable directory, e.g. /root
        inner = base.relative_to(top).parts[0]
        lift = (f"mount --bind {top / inner} /srv; mount -t tmpfs -o mode=0755,size=1m tmpfs {top}; "
                f"mkdir {top / inner}; mount --move /srv {top / inner}; ")
    script = (
        "set -e; mount --make-rprivate /; " + lift +
        f"mount --bind {tmp_path / 'artifact'} /srv; "
        "mount -o remount,bind,ro /; mount -t tmpfs -o size=64m tmpfs /tmp; "
        f"exec setpriv --reuid {POD_UID} --regid {POD_UID} --clear-groups "
        "--inh-caps=-all --bounding-set=-all "
        f"{sys.executable} -m nextchar.client.cli serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTCHAR_")}
    env.update({"HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
                "NEXTCHAR_MODEL": "/srv", "NEXTCHAR_HOST": "127.0.0.1",
                "NEXTCHAR_PORT": str(port), "NEXTCHAR_METRICS_PORT": str(metrics_port),
                "NEXTCHAR_PRESTOP_S": str(PRESTOP_S), "NEXTCHAR_GRACE_S": str(GRACE_S),
                "NEXTCHAR_BACKEND_WORKERS": "1", "NEXTCHAR_INTRA_OP_THREADS": "1"})
    with log.open("w") as out:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        with NextCharClient(f"127.0.0.1:{port}", timeout_s=2) as c:
            while True:
                try:
                    if c.health() == "SERVING":
                        break
                except Exception:
                    pass
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
            (pred,) = c.predict(["hello"], top_k=2)
            assert len(pred.top) == 2
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                         timeout=5).read().decode()
        assert "nextchar_requests_total" in metrics
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        drain_s = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "Read-only file system" not in text and "Permission denied" not in text, text
    # The arithmetic terminationGracePeriodSeconds is built on (tests/deploy/k8s_checks.py).
    assert PRESTOP_S <= drain_s < PRESTOP_S + GRACE_S + 1.0 + 1.0, (drain_s, text)
