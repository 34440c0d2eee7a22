"""The server runs as the pod runs it: uid 10001, a read-only root filesystem, only /tmp written,
TLS and tokens from Secret-like files, and the TLS overlay's probe command accepts it.

    sudo .venv/bin/pytest -q tests/deploy/test_pod_runtime.py

deploy/k8s/base/deployment.yaml promises `readOnlyRootFilesystem: true` with an emptyDir on
/tmp, `runAsUser: 10001` and all capabilities dropped; components/tls-auth mounts a TLS Secret
and a token file (mode 0440, group 10001 through fsGroup) and probes with `nextchar health`
over TLS. No container runtime runs here, so this test makes the same conditions by hand: in
a private mount namespace (`unshare -m`, root only) the root filesystem is remounted read-only,
/tmp becomes an empty tmpfs, the artifact, certificate and tokens are bind-mounted at /srv,
and `nextchar serve` starts from this venv as uid 10001 (`setpriv`), with no HOME to write to.
The certificates come from the openssl commands docs/deploy.md gives operators. The server
must become SERVING, answer Predict over TLS with a token, /metrics, and the HTTP front end's
/v2/health/ready over TLS, pass the overlay's own
probe command (and fail it for a name the certificate does not carry), and drain on SIGTERM
within prestop_s + grace_s + 1 s, exiting 0. The host's mounts are untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from k8s_checks import K8S_DIR, TLS_SECRET_FILES, kubectl, one, render, write_tls_material

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="needs root, unshare and setpriv (util-linux) to build the pod's filesystem view")
POD_UID = 10001
PRESTOP_S, GRACE_S = 1.0, 3.0
SAN = "DNS:nextchar-headless,DNS:nextchar-headless.nextchar.svc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tls(secrets: Path) -> None:
    """docs/deploy.md's openssl commands ("TLS and tokens"), or the same material from
    cryptography where openssl is missing."""
    if not shutil.which("openssl"):
        write_tls_material(secrets)
        return
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-days", "365", "-subj", "/CN=nextchar CA",
         "-keyout", "ca.key", "-out", "ca.crt"],
        ["openssl", "req", *ec, "-subj", "/CN=nextchar-headless", "-keyout", "tls.key",
         "-out", "tls.csr"],
        ["bash", "-c", "openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial "
         f"-days 90 -out tls.crt -extfile <(printf 'subjectAltName={SAN}')"],
    ):
        subprocess.run(cmd, cwd=secrets, check=True, capture_output=True, timeout=60)
    (secrets / "tokens.txt").write_text("p" * 32 + "\n")
    for f in ("ca.key", "tls.csr", "ca.srl"):
        (secrets / f).unlink(missing_ok=True)


def tls_probe(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The rendered tls-auth overlay's readiness probe command and the server's env."""
    if kubectl() is None:
        pytest.skip("kubectl not found")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, tree, ignore=shutil.ignore_patterns(*TLS_SECRET_FILES))
    write_tls_material(tree / "components" / "tls-auth" / "secrets")  # only to render
    dep = one(render(tree / "overlays" / "tls-auth"), "Deployment", "nextchar")
    server: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    return server["readinessProbe"]["exec"]["command"], env


@needs_root
def test_serves_like_the_pod(tiny_artifact: Path, tmp_path: Path) -> None:
    from nextchar.client import NextCharClient

    srv = Path("/srv")
    if not srv.is_dir() or any(srv.iterdir()):
        pytest.skip("/srv must be an empty directory (the pod files' mount point)")
    for parent in [Path(sys.prefix), *Path(sys.prefix).parents]:
        if parent.stat().st_mode & 0o005 != 0o005:
            pytest.skip(f"the venv's {parent} is not readable by uid {POD_UID}")
    probe, overlay_env = tls_probe(tmp_path)
    pod = tmp_path / "pod"
    (pod / "tls").mkdir(parents=True)
    shutil.copytree(tiny_artifact, pod / "model")
    make_tls(pod / "tls")
    for f in (pod / "tls").iterdir():  # a Secret volume: defaultMode 0440, group = fsGroup
        os.chown(f, 0, POD_UID)
        f.chmod(0o440)
    for d in (tmp_path, pod, pod / "tls"):
        d.chmod(0o755)
    in_pod = {"/etc/nextchar/tls/": "/srv/tls/", "/etc/nextchar/auth/": "/srv/tls/"}

    def pod_path(value: str) -> str:
        for old, new in in_pod.items():
            value = value.replace(old, new)
        return value

    port, metrics_port, http_port = free_port(), free_port(), free_port()
    assert str(port) != overlay_env["NEXTCHAR_PORT"]  # the probe's port is rewritten below
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTCHAR_")}
    env.update({k: pod_path(v) for k, v in overlay_env.items() if k.startswith("NEXTCHAR_")})
    env.update({"HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
                "NEXTCHAR_MODEL": "/srv/model", "NEXTCHAR_HOST": "127.0.0.1",
                "NEXTCHAR_PORT": str(port), "NEXTCHAR_METRICS_PORT": str(metrics_port),
                "NEXTCHAR_HTTP_PORT": str(http_port),
                "NEXTCHAR_PRESTOP_S": str(PRESTOP_S), "NEXTCHAR_GRACE_S": str(GRACE_S),
                "NEXTCHAR_BACKEND_WORKERS": "1", "NEXTCHAR_INTRA_OP_THREADS": "1"})
    # The interpreter lives under /root (mode 0700 here): its tree is moved onto a 0755 tmpfs
    # that hides the rest of /root, as an image has no readable root home either.
    base = Path(sys.base_prefix).resolve()
    hidden = [p for p in [base, *base.parents] if p.stat().st_mode & 0o005 != 0o005]
    lift = ""
    if hidden:
        top = hidden[-1]
        inner = base.relative_to(top).parts[0]
        lift = (f"mount --bind {top / inner} /srv; mount -t tmpfs -o mode=0755,size=1m tmpfs "
                f"{top}; mkdir {top / inner}; mount --move /srv {top / inner}; ")
    # The pod's /tmp is an empty tmpfs: a checkout (or its venv) under /tmp would vanish under
    # it in the namespace. Holding it elsewhere and moving it back fails on the read-only root
    # (tried), so such a checkout skips with the reason.
    code = Path(sys.prefix).resolve()
    if Path("/tmp") in code.parents or Path("/tmp") in Path(__file__).resolve().parents:
        pytest.skip(f"this checkout's venv {code} is under /tmp, which the pod's empty /tmp "
                    f"hides; run it from a checkout elsewhere")
    script = (
        "set -e; mount --make-rprivate /; " + lift + f"mount --bind {pod} /srv; "
        "mount -o remount,bind,ro /; mount -t tmpfs -o size=64m tmpfs /tmp; "
        f"exec setpriv --reuid {POD_UID} --regid {POD_UID} --clear-groups "
        f"--inh-caps=-all --bounding-set=-all {sys.executable} -m nextchar.client.cli serve")
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    host_probe = [a.replace("/etc/nextchar/tls/", f"{pod}/tls/")
                  .replace(f"127.0.0.1:{overlay_env['NEXTCHAR_PORT']}", f"127.0.0.1:{port}")
                  for a in probe]

    def run_probe(name: str) -> int:
        probe_env = {**env, "NEXTCHAR_PROBE_TLS_NAME": name,
                     "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"}
        return subprocess.run(host_probe, env=probe_env, capture_output=True,
                              timeout=30).returncode

    try:
        token = (pod / "tls" / "tokens.txt").read_text().split()[0]
        tls = {"tls_ca": pod / "tls" / "ca.crt", "tls_server_name": "nextchar-headless"}
        deadline = time.monotonic() + 90
        with NextCharClient(f"127.0.0.1:{port}", timeout_s=2, **tls) as c:  # type: ignore[arg-type]
            while True:
                try:
                    if c.health() == "SERVING":
                        break
                except Exception:
                    pass
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert run_probe(overlay_env["NEXTCHAR_PROBE_TLS_NAME"]) == 0
        assert run_probe("not-in-the-certificate") != 0
        with NextCharClient(f"127.0.0.1:{port}", timeout_s=5, token=token, **tls) as c:  # type: ignore[arg-type]
            (pred,) = c.predict(["hello"], top_k=2)
            assert len(pred.top) == 2
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                         timeout=5).read().decode()
        assert "nextchar_requests_total" in metrics
        from nextchar.server.settings import ServerSettings

        if "http_port" in ServerSettings.model_fields:  # the HTTP front end, TLS as well
            ctx = ssl.create_default_context(cafile=str(pod / "tls" / "ca.crt"))
            ctx.check_hostname = False  # the certificate names nextchar-headless, not 127.0.0.1
            with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/v2/health/ready",
                                        timeout=5, context=ctx) as r:
                assert r.status == 200
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
