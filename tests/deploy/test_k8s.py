"""deploy/k8s renders, validates against Kubernetes' schemas, and agrees with the server.

    .venv/bin/pytest -q tests/deploy/test_k8s.py

Every kustomization an operator applies (base, overlays/*, batch) and one that stacks every
component is rendered with `kubectl kustomize` and validated with kubernetes-validate --strict
(offline schemas) for Kubernetes 1.37 and 1.33; then checked against ServerSettings (ports,
probes, env, the drain arithmetic) and against itself (k8s_checks.py). Broken copies must fail
each stage. No cluster is involved: what that leaves unproven is in docs/deploy.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_checks import (
    K8S_DIR,
    K8S_VERSIONS,
    TLS_SECRET_FILES,
    RenderError,
    check_batch,
    check_pod_security,
    check_server,
    components,
    kubectl,
    one,
    render,
    settings_for,
    targets,
    validate,
    write_tls_material,
)

pytestmark = pytest.mark.skipif(
    kubectl() is None,
    reason="kubectl not found (it carries kustomize): install it, or set NEXTCHAR_KUBECTL; "
    "Debian's kubernetes-client is too old (kustomize v2)")
pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")

TARGETS = [t.relative_to(K8S_DIR).as_posix() for t in targets()]
SERVER_TARGETS = [t for t in TARGETS if t != "batch"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with what an operator adds: TLS material and tokens, and an overlay
    that stacks every component."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S_DIR, root, ignore=shutil.ignore_patterns(*TLS_SECRET_FILES))
    write_tls_material(root / "components" / "tls-auth" / "secrets")
    stacked = root / "overlays" / "all-components"
    stacked.mkdir()
    (stacked / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../../base"],
        "components": [f"../../components/{c.name}" for c in components()]}))
    return root


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    return {t: render(tree / t) for t in [*TARGETS, "overlays/all-components"]}


def test_every_overlay_and_component_is_tested() -> None:
    assert {"base", "batch", "overlays/cpu", "overlays/gpu", "overlays/tls-auth",
            "overlays/multi-model", "overlays/queue-depth-hpa",
            "overlays/network-policy"} <= set(TARGETS)
    used = set()
    for t in TARGETS:
        used |= {Path(c).name for c in yaml.safe_load(
            (K8S_DIR / t / "kustomization.yaml").read_text()).get("components", [])}
    assert used == {c.name for c in components()}, "a component no overlay uses"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", [*TARGETS, "overlays/all-components"])
def test_renders_and_validates(rendered: dict[str, list[dict[str, Any]]], target: str,
                               version: str) -> None:
    docs = rendered[target]
    assert docs, f"{target} renders nothing"
    assert validate(docs, version) == []
    assert check_pod_security(docs) == []


@pytest.mark.parametrize("target", [*SERVER_TARGETS, "overlays/all-components"])
def test_server_agrees_with_settings(rendered: dict[str, list[dict[str, Any]]],
                                     target: str) -> None:
    assert check_server(rendered[target]) == []


def test_batch_job_shards(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert check_batch(rendered["batch"]) == []


def test_overlays_do_what_they_say(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def server(target: str) -> dict[str, Any]:
        dep = one(rendered[target], "Deployment", "nextchar")
        return dep["spec"]["template"]["spec"]["containers"][0]

    def settings(target: str) -> Any:
        return settings_for({e["name"]: e["value"] for e in server(target)["env"] if "value" in e})

    assert settings("overlays/cpu").device == "cpu"
    gpu = server("overlays/gpu")
    assert settings("overlays/gpu").device == "cuda"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].startswith("nextchar-server-cuda:")
    tls = settings("overlays/tls-auth")
    assert tls.tls_cert is not None and tls.tls_key is not None and tls.auth_tokens_file is not None
    assert all("exec" in server("overlays/tls-auth")[p] for p in ("startupProbe", "readinessProbe"))
    # Liveness is the process answering, not the models' readiness (a restart cannot fix a
    # model): /v2/health/live, over TLS where the server is TLS.
    assert server("overlays/cpu")["livenessProbe"]["httpGet"] == {"path": "/v2/health/live",
                                                                 "port": "http"}
    assert server("overlays/tls-auth")["livenessProbe"]["httpGet"] == {
        "path": "/v2/health/live", "port": "http", "scheme": "HTTPS"}
    secrets = {d["metadata"]["name"].rsplit("-", 1)[0]: d
               for d in rendered["overlays/tls-auth"] if d["kind"] == "Secret"}
    assert secrets["nextchar-tls"]["type"] == "kubernetes.io/tls"
    env = {e["name"]: e["value"] for e in server("overlays/multi-model")["env"] if "value" in e}
    assert env["NEXTCHAR_MODEL_REPOSITORY"] == "/model-repository"
    # The policy selects the server's pods and opens exactly their named ports.
    policy = one(rendered["overlays/network-policy"], "NetworkPolicy")
    dep = one(rendered["overlays/network-policy"], "Deployment", "nextchar")
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert opened == {p["name"] for p in server("overlays/network-policy")["ports"]}
    assert [r.get("from") for r in policy["spec"]["ingress"]][0] is None  # clients: any
    hpa = one(rendered["overlays/queue-depth-hpa"], "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "nextchar_queue_depth_texts"


def test_service_links_would_break_the_server() -> None:
    """Why every pod sets enableServiceLinks: false. A Service named `nextchar` gives its pods
    NEXTCHAR_PORT=tcp://IP:PORT, which is not a port number."""
    with pytest.raises(ValueError, match="port"):
        settings_for({"NEXTCHAR_PORT": "tcp://10.0.0.7:50051"})


# --- broken copies fail -----------------------------------------------------------------------

def _break(tree: Path, tmp_path: Path, path: str, old: str, new: str) -> Path:
    broken = tmp_path / "k8s"
    shutil.copytree(tree, broken)
    f = broken / path
    text = f.read_text()
    assert old in text, f"{old!r} not in {path}"
    f.write_text(text.replace(old, new, 1))
    return broken


@pytest.mark.parametrize("path, old, new, expect", [
    # a misspelt field: only strict validation rejects it
    ("base/deployment.yaml", "terminationGracePeriodSeconds: 45",
     "terminationGracePeriodSecond: 45", "terminationGracePeriodSecond"),
    # a wrong type
    ("base/deployment.yaml", "containerPort: 50051", "containerPort: grpc-port", "grpc-port"),
    # a kind with no schema (a typo in apiVersion) is an error, not a warning
    ("base/pdb.yaml", "apiVersion: policy/v1", "apiVersion: policy/v1beta2", "policy/v1beta2"),
])
def test_broken_copy_fails_validation(tree: Path, tmp_path: Path, path: str, old: str, new: str,
                                      expect: str) -> None:
    problems = validate(render(_break(tree, tmp_path, path, old, new) / "overlays" / "cpu"),
                        K8S_VERSIONS[0])
    assert problems and expect in " ".join(problems), problems


@pytest.mark.parametrize("path, old, new, expect", [
    ("base/deployment.yaml", "terminationGracePeriodSeconds: 45",
     "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds 30"),
    ("base/deployment.yaml", "port: 50051\n            periodSeconds: 5",
     "port: 50052\n            periodSeconds: 5", "readinessProbe grpc port 50052"),
    ("base/deployment.yaml", 'value: "9100"', 'value: "9101"', "metrics"),
    ("base/deployment.yaml", "path: /v2/health/live", "path: /v2/health/ready",
     "livenessProbe httpGet path /v2/health/ready != /v2/health/live"),
    ("base/deployment.yaml", "name: NEXTCHAR_GRACE_S", "name: NEXTCHAR_GRACE_SECONDS",
     "NEXTCHAR_GRACE_SECONDS: no such server setting"),
    ("base/deployment.yaml", "enableServiceLinks: false", "enableServiceLinks: true",
     "enableServiceLinks"),
    ("base/service-headless.yaml", "clusterIP: None", "clusterIP: ''", "headless"),
    ("base/deployment.yaml", "topologyKey: topology.kubernetes.io/zone",
     "topologyKey: example.com/rack", "spread over topology.kubernetes.io/zone"),
])
def test_broken_copy_fails_consistency(tree: Path, tmp_path: Path, path: str, old: str, new: str,
                                       expect: str) -> None:
    docs = render(_break(tree, tmp_path, path, old, new) / "overlays" / "cpu")
    problems = check_server(docs) + check_pod_security(docs)
    assert problems and expect in " ".join(problems), problems


def test_broken_batch_shards_fail(tree: Path, tmp_path: Path) -> None:
    docs = render(_break(tree, tmp_path, "batch/batch-job.yaml", "parallelism: 8",
                         "parallelism: 4") / "batch")
    assert "differ" in " ".join(check_batch(docs))


def test_broken_patch_fails_rendering(tree: Path, tmp_path: Path) -> None:
    broken = _break(tree, tmp_path, "components/tls-auth/kustomization.yaml",
                    "path: /spec/template/spec/containers/0/name\n        value: server",
                    "path: /spec/template/spec/containers/0/name\n        value: sidecar")
    with pytest.raises(RenderError, match="test"):
        render(broken / "overlays" / "tls-auth")
