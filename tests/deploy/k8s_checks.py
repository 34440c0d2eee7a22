"""Render, validate and cross-check deploy/k8s: the helpers behind tests/deploy/test_k8s.py.

    .venv/bin/pytest -q tests/deploy

Rendering is `kubectl kustomize` (kustomize as built into kubectl); validation is
kubernetes-validate's offline JSON schemas in strict mode (unknown fields are errors), and a
kind it has no schema for is an error here too (its CLI only warns). `consistency()` checks
what no schema can: that the manifests agree with the server's own settings
(nextchar.server.settings.ServerSettings) and with each other. Every check returns a list of
problems, so a test can also assert that a broken copy is caught.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
# The current Kubernetes release and the oldest one every field used here is GA in
# (Job backoffLimitPerIndex: 1.33).
K8S_VERSIONS = ("1.37.0", "1.33.0")
TLS_SECRET_FILES = ("tls.crt", "tls.key", "ca.crt", "tokens.txt")
# NEXTCHAR_* variables in the manifests that are not server settings.
NOT_SETTINGS = {"NEXTCHAR_PROBE_TLS_NAME"}
# Settings the manifests set ahead of the server code that reads them (issue 14: the HTTP front
# end, `--http-port`; issue 13: `--model-repository`). Until the field exists the server ignores
# the variable (extra="ignore"); from then on it is checked like every other one.
PENDING_SETTINGS = {"http_port": 8000, "model_repository": None}
FLUSH_S_FALLBACK = 1.0  # server/app.py FLUSH_S: the last second a drain gives answers to leave
DRAIN_MARGIN_S = 2.0    # at least this much between the server's drain and the kubelet's SIGKILL


def kubectl() -> str | None:
    return os.environ.get("NEXTCHAR_KUBECTL") or shutil.which("kubectl")


def targets() -> list[Path]:
    """Every kustomization an operator applies: base, batch, overlays/* (not components)."""
    found = []
    for k in sorted(K8S_DIR.rglob("kustomization.yaml")):
        if yaml.safe_load(k.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(k.parent)
    return found


def components() -> list[Path]:
    return sorted(k.parent for k in (K8S_DIR / "components").glob("*/kustomization.yaml"))


def render(directory: Path) -> list[dict[str, Any]]:
    exe = kubectl()
    assert exe, "kubectl not found"
    proc = subprocess.run([exe, "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


class RenderError(Exception):
    pass


def validate(docs: list[dict[str, Any]], version: str) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    problems = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{name}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            problems.append(f"{name}: {e.message}")
    return problems


def write_tls_material(secrets_dir: Path) -> None:
    """A throwaway CA, a server certificate it signs (SAN nextchar-headless) and two tokens:
    what an operator puts into components/tls-auth/secrets/ before rendering."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("nextchar-headless")]),
                                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("nextchar test CA", ca_key, "nextchar test CA", ca_key, ca=True)
    server_cert = cert("nextchar-headless", key, "nextchar test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (secrets_dir / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (secrets_dir / "tls.crt").write_bytes(server_cert.public_bytes(pem))
    (secrets_dir / "tls.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (secrets_dir / "tokens.txt").write_text("# test tokens\n" + "t" * 32 + "\n" + "u" * 32 + "\n")


# --- consistency ------------------------------------------------------------------------------

def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", []) if "value" in e}


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def settings_for(env: dict[str, str]) -> Any:
    """ServerSettings exactly as the container builds it: from its NEXTCHAR_* environment only."""
    from nextchar.server.settings import ServerSettings

    saved = {k: v for k, v in os.environ.items() if k.startswith("NEXTCHAR_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if k.startswith("NEXTCHAR_")})
        return ServerSettings()
    finally:
        for k in [k for k in os.environ if k.startswith("NEXTCHAR_")]:
            del os.environ[k]
        os.environ.update(saved)


def flush_s() -> float:
    try:
        from nextchar.server import app
    except ImportError:
        return FLUSH_S_FALLBACK
    return float(getattr(app, "FLUSH_S", FLUSH_S_FALLBACK))


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d


def probe_seconds(probe: dict[str, Any]) -> tuple[int, int]:
    return probe.get("periodSeconds", 10), probe.get("failureThreshold", 3)


def check_pod_security(docs: list[dict[str, Any]]) -> list[str]:
    """Pod Security "restricted" essentials, and no service links, on every pod template."""
    problems = []
    for name, tpl in pod_templates(docs):
        spec = tpl["spec"]
        if spec.get("enableServiceLinks", True):
            problems.append(f"{name}: enableServiceLinks must be false (a Service named "
                            "nextchar-http would set NEXTCHAR_HTTP_PORT=tcp://...)")
        if spec.get("automountServiceAccountToken", True):
            problems.append(f"{name}: automountServiceAccountToken must be false")
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot") or psc.get("runAsUser") in (None, 0):
            problems.append(f"{name}: must run as a non-root uid")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile RuntimeDefault")
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}/{c['name']}: allowPrivilegeEscalation must be false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}/{c['name']}: capabilities must drop ALL")
            if c.get("image", "").endswith(":latest") or ":" not in c.get("image", ""):
                problems.append(f"{name}/{c['name']}: image {c.get('image')!r} has no fixed tag")
    return problems


def check_server(docs: list[dict[str, Any]]) -> list[str]:
    """The server Deployment against ServerSettings, the Services, PDB, HPA and trainer Job."""
    problems: list[str] = []
    dep = one(docs, "Deployment", "nextchar")
    pod = dep["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "server"]
    env = env_of(server)
    from nextchar.server.settings import ServerSettings

    fields = ServerSettings.model_fields
    for var in env:
        if not var.startswith("NEXTCHAR_") or var in NOT_SETTINGS:
            continue
        field = var.removeprefix("NEXTCHAR_").lower()
        if field not in fields and field not in PENDING_SETTINGS:
            problems.append(f"env {var}: no such server setting (ServerSettings.{field})")
    try:
        s = settings_for(env)
    except Exception as e:  # pydantic's ValidationError names the field and the value
        return [*problems, f"the server's environment does not parse as ServerSettings: {e}"]

    def setting(name: str) -> Any:
        if name in fields:
            return getattr(s, name)
        var = f"NEXTCHAR_{name.upper()}"
        return type(PENDING_SETTINGS[name] or "")(env[var]) if var in env else PENDING_SETTINGS[name]

    ports = {p["name"]: p["containerPort"] for p in server.get("ports", [])}
    if s.host != "0.0.0.0":
        problems.append(f"host {s.host}: a pod must listen on 0.0.0.0")
    if ports.get("grpc") != s.port:
        problems.append(f"container port grpc {ports.get('grpc')} != settings port {s.port}")
    if ports.get("metrics") != s.metrics_port:
        problems.append(f"container port metrics {ports.get('metrics')} != metrics_port {s.metrics_port}")
    if ports.get("http") != setting("http_port"):
        problems.append(f"container port http {ports.get('http')} != http_port {setting('http_port')}")
    annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(s.metrics_port):
        problems.append(f"prometheus.io/port {annotations.get('prometheus.io/port')} != {s.metrics_port}")

    # Probes: on the gRPC port (plaintext) or `nextchar health` over TLS on it.
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server.get(kind)
        if probe is None:
            problems.append(f"no {kind}")
            continue
        if "grpc" in probe:
            if probe["grpc"]["port"] != s.port:
                problems.append(f"{kind} grpc port {probe['grpc']['port']} != settings port {s.port}")
            if s.tls_cert is not None:
                problems.append(f"{kind}: kubelet's gRPC probe is plaintext, the server is TLS")
        elif "httpGet" in probe:
            get = probe["httpGet"]
            if get["port"] not in ("http", s.http_port):
                problems.append(f"{kind} httpGet port {get['port']} is not the HTTP port "
                                f"{s.http_port}")
            if not s.http:
                problems.append(f"{kind}: an HTTP probe, but the server serves no HTTP")
            want = "/v2/health/live" if kind == "livenessProbe" else "/v2/health/ready"
            if get.get("path") != want:
                problems.append(f"{kind} httpGet path {get.get('path')} != {want}")
            if (get.get("scheme", "HTTP") == "HTTPS") != (s.tls_cert is not None):
                problems.append(f"{kind} httpGet scheme {get.get('scheme', 'HTTP')}, the server "
                                f"is {'TLS' if s.tls_cert is not None else 'plaintext'}")
        elif "exec" in probe:
            cmd = " ".join(probe["exec"]["command"])
            if f"127.0.0.1:{s.port}" not in cmd or "nextchar health" not in cmd:
                problems.append(f"{kind}: exec probe is not `nextchar health` on port {s.port}")
            if s.tls_cert is not None and "--tls-ca" not in cmd:
                problems.append(f"{kind}: the server is TLS, the probe does not verify it")
        else:
            problems.append(f"{kind}: neither grpc nor exec")

    # Drain: the kubelet's SIGKILL must come after prestop + grace + flush, the liveness probe
    # must not restart a draining pod, readiness must see NOT_SERVING within the pre-stop wait.
    hook = server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain_s = hook + s.prestop_s + s.grace_s + flush_s()
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps < drain_s + DRAIN_MARGIN_S:
        problems.append(f"terminationGracePeriodSeconds {tgps} < preStop {hook} + prestop_s "
                        f"{s.prestop_s} + grace_s {s.grace_s} + flush {flush_s()} + margin "
                        f"{DRAIN_MARGIN_S}")
    if s.prestop_s < 5:
        problems.append(f"prestop_s {s.prestop_s}: under 5 s, endpoints and DNS may still send "
                        "new calls when the server starts refusing them")
    if "livenessProbe" in server:
        period, failures = probe_seconds(server["livenessProbe"])
        if period * failures <= s.prestop_s + s.grace_s + flush_s():
            problems.append(f"liveness fails after {period * failures} s, within the "
                            f"{s.prestop_s + s.grace_s} s drain: it could restart a draining pod")
    if "readinessProbe" in server:
        period, failures = probe_seconds(server["readinessProbe"])
        if period * failures > s.prestop_s:
            problems.append(f"readiness notices NOT_SERVING after up to {period * failures} s, "
                            f"longer than prestop_s {s.prestop_s}")

    rolling = dep["spec"].get("strategy", {}).get("rollingUpdate", {})
    if rolling.get("maxUnavailable") != 0:
        problems.append("rolling update must keep maxUnavailable 0")
    if "replicas" in dep["spec"]:
        problems.append("Deployment sets replicas: the HPA owns the count")
    # Spread over nodes and zones, softly (a one-zone cluster must still schedule), selecting
    # the server's own pods.
    own = dep["spec"]["selector"]["matchLabels"]
    spread = {c["topologyKey"]: c for c in dep["spec"]["template"]["spec"].get(
        "topologySpreadConstraints", []) if c.get("labelSelector", {}).get("matchLabels") == own}
    for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone"):
        if spread.get(key, {}).get("whenUnsatisfiable") != "ScheduleAnyway":
            problems.append(f"server pods must spread over {key} (ScheduleAnyway, selecting "
                            f"the Deployment's pods)")

    # Threads: model calls x threads per call fit the CPU request.
    req = server.get("resources", {}).get("requests", {})
    if "cpu" not in req or "memory" not in req or "memory" not in server["resources"].get("limits", {}):
        problems.append("server needs cpu and memory requests and a memory limit")
    elif s.backend_workers and s.intra_op_threads:
        if s.backend_workers * s.intra_op_threads > math.ceil(cpu_cores(req["cpu"])):
            problems.append(f"{s.backend_workers} workers x {s.intra_op_threads} threads > "
                            f"cpu request {req['cpu']}")
    elif s.device != "cuda":
        problems.append("set NEXTCHAR_BACKEND_WORKERS and NEXTCHAR_INTRA_OP_THREADS: in a pod "
                        "os.cpu_count() is the node's, not the CPU request")
    sc = server.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("server: readOnlyRootFilesystem must be true")

    # Files the settings name lie on mounted volumes, and the Secrets hold those keys.
    mounts = {m["mountPath"]: m["name"] for m in server.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
    for name in ("model", "model_repository", "tls_cert", "tls_key", "tls_client_ca",
                 "auth_tokens_file", "admin_tokens_file"):
        value = setting(name) if name in PENDING_SETTINGS else getattr(s, name)
        if value is None:
            continue
        path = str(value)
        under = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
        if not under:
            problems.append(f"{name} {path}: on no volume mount of the server")
            continue
        vol = volumes.get(mounts[max(under, key=len)], {})
        if "secret" in vol:
            secret = secrets.get(vol["secret"]["secretName"])
            key = path[len(max(under, key=len)):].lstrip("/")
            if secret is None:
                problems.append(f"{name}: Secret {vol['secret']['secretName']} is not rendered")
            elif key not in secret.get("data", {}):
                problems.append(f"{name}: Secret {secret['metadata']['name']} has no key {key}")
    if "tmp" not in mounts.values() and "/tmp" not in mounts:
        problems.append("a read-only root filesystem needs a writable /tmp (emptyDir)")

    # The init container waits for the model the server serves.
    waits = " ".join(" ".join(c.get("command", []) + c.get("args", []))
                     for c in pod.get("initContainers", []))
    if f"{s.model}/manifest.json" not in waits:
        problems.append(f"no init container waits for {s.model}/manifest.json")

    # Services, PDB and HPA select these pods and name these ports.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    if dep["spec"]["selector"]["matchLabels"].items() - labels.items():
        problems.append("Deployment selector does not match its pod labels")
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    headless = services.get("nextchar-headless")
    if headless is None or headless["spec"].get("clusterIP") != "None":
        problems.append("no headless Service nextchar-headless (clusterIP: None) for round_robin")
    http = services.get("nextchar-http")
    if http is None or http["spec"].get("clusterIP") == "None":
        problems.append("no ClusterIP Service nextchar-http")
    for svc, want in ((headless, {"grpc": s.port}), (http, {"http": setting("http_port")})):
        if svc is None:
            continue
        if svc["spec"]["selector"].items() - labels.items():
            problems.append(f"Service {svc['metadata']['name']} selects no server pod")
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            port = ports.get(target) if isinstance(target, str) else target
            if p["name"] in want and (port != want[p["name"]] or p["port"] != want[p["name"]]):
                problems.append(f"Service {svc['metadata']['name']} port {p['name']}: "
                                f"{p['port']} -> {target} != {want[p['name']]}")
    pdb = one(docs, "PodDisruptionBudget")
    if pdb["spec"]["selector"]["matchLabels"].items() - labels.items():
        problems.append("PodDisruptionBudget selects no server pod")
    hpa = one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref["kind"], ref["name"]) != ("Deployment", "nextchar"):
        problems.append(f"HPA scales {ref['kind']}/{ref['name']}")
    if hpa["spec"].get("minReplicas", 1) < 2:
        problems.append("HPA minReplicas < 2: the PDB would block every node drain")
    metrics = [m.get("resource", {}).get("name") or m.get("pods", {}).get("metric", {}).get("name")
               for m in hpa["spec"]["metrics"]]
    if "cpu" in metrics and "cpu" not in req:
        problems.append("CPU HPA needs a CPU request")
    unknown = [m for m in metrics if m not in ("cpu", "nextchar_queue_depth_texts")]
    if unknown:
        problems.append(f"HPA metrics {unknown}: not cpu or a nextchar metric")

    # The trainer fills the volume the server reads, at the path it reads.
    for job in by_kind(docs, "Job"):
        if job["metadata"]["name"] != "nextchar-train":
            continue
        tpod = job["spec"]["template"]["spec"]
        (train,) = tpod["containers"]
        if env_of(train).get("NEXTCHAR_MODEL") != str(s.model):
            problems.append(f"trainer writes {env_of(train).get('NEXTCHAR_MODEL')}, server reads {s.model}")
        claims = {v["persistentVolumeClaim"]["claimName"] for v in tpod["volumes"]
                  if "persistentVolumeClaim" in v}
        model_vol = volumes.get(mounts.get("/models", ""), {})
        if model_vol.get("persistentVolumeClaim", {}).get("claimName") not in claims:
            problems.append("trainer and server mount different model volumes")
    for v in volumes.values():
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim and claim not in {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")}:
            problems.append(f"volume {v['name']}: PVC {claim} is not rendered")
    if s.device == "cuda":
        if "nvidia.com/gpu" not in server["resources"].get("limits", {}):
            problems.append("device cuda without an nvidia.com/gpu limit")
        if "-cuda" not in server["image"]:
            problems.append(f"device cuda on image {server['image']}: use nextchar-server-cuda")
    return problems


def check_batch(docs: list[dict[str, Any]]) -> list[str]:
    """The Indexed Job: shards = completions = parallelism, index from JOB_COMPLETION_INDEX, and
    arguments the real `nextchar batch` parser accepts."""
    from nextchar.client import cli

    # The real parser of the `nextchar` command (its name changed once; accept both).
    parser = getattr(cli, "build_parser", None) or cli._client_parser
    problems = []
    job = one(docs, "Job", "nextchar-batch")
    spec = job["spec"]
    (c,) = spec["template"]["spec"]["containers"]
    args = c["args"]
    if spec.get("completionMode") != "Indexed":
        problems.append("batch Job is not Indexed")
    if not any(e["name"] == "JOB_COMPLETION_INDEX" for e in c.get("env", [])):
        problems.append("JOB_COMPLETION_INDEX is not declared: $(JOB_COMPLETION_INDEX) would not expand")
    joined = " ".join(args)
    if "$(JOB_COMPLETION_INDEX)" not in joined.split("--shard")[0]:
        problems.append("the output path does not carry the index: shards would overwrite each other")
    shard = args[args.index("--shard") + 1] if "--shard" in args else ""
    m = re.fullmatch(r"\$\(JOB_COMPLETION_INDEX\)/(\d+)", shard)
    if not m:
        problems.append(f"--shard {shard!r} is not $(JOB_COMPLETION_INDEX)/N")
    elif not int(m.group(1)) == spec.get("completions") == spec.get("parallelism"):
        problems.append(f"--shard N {m.group(1)}, completions {spec.get('completions')}, "
                        f"parallelism {spec.get('parallelism')} differ")
    for index in (0, spec.get("completions", 1) - 1):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in args]
        try:
            ns = parser().parse_args(argv)
        except SystemExit:
            problems.append(f"`nextchar {' '.join(argv)}` does not parse")
            continue
        if ns.command != "batch" or tuple(ns.shard) != (index, spec.get("completions")):
            problems.append(f"index {index}: parsed shard {ns.shard}")
        if not any("nextchar-headless:50051" in s for s in ns.server or []):
            problems.append(f"--server {ns.server}: not the headless Service's gRPC port")
    return problems
