"""Real clients nobody here wrote, against a real `nextchar serve` subprocess's HTTP port: the
`openai` Python SDK (completions with and without stream=True; NotFoundError, AuthenticationError),
`tritonclient[http]` (tests/compat/triton_http_check.py in .venv-triton) and curl, running every
example of README.md's "HTTP with curl" and "OpenAI SDK" sections as written (the address
swapped for the test server's)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from http_util import root_conftest

from nextchar import __version__
from nextchar.client import NextCharClient

REPO = Path(__file__).resolve().parents[2]
README_HTTP = "127.0.0.1:8000"
TOKEN = "sdk-token-0123456789abcdef"
TEXTS = ["hello worl", "To be, or not to b"]


@pytest.fixture(scope="module")
def served(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("http-clients")
    sp = root_conftest().ServerProcess(["--model", str(tiny_artifact)], d / "server.log")
    assert sp.http_url is not None and sp.http_url.startswith("http://127.0.0.1:")
    yield sp
    sp.proc.send_signal(signal.SIGTERM)
    assert sp.proc.wait(30) == 0, sp.log()
    sp.close()


def _model(sp) -> tuple[str, str]:
    with NextCharClient(sp.address) as c:
        info = c.model_info()
    return info.name, info.version


def test_openai_sdk_completions_plain_and_streamed(served) -> None:
    from openai import NotFoundError, OpenAI

    name, _ = _model(served)
    client = OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [name]
    done = client.completions.create(model=name, prompt="To be", max_tokens=30,
                                     temperature=0.7, seed=11)
    with NextCharClient(served.address) as c:
        expected = "".join(c.generate("To be", max_chars=30, temperature=0.7, seed=11))
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 30
    chunks = list(client.completions.create(model=name, prompt="To be", max_tokens=30,
                                            temperature=0.7, seed=11, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    lp = client.completions.create(model=name, prompt="To be", max_tokens=3, seed=1,
                                   logprobs=2).choices[0].logprobs
    assert lp is not None and len(lp.tokens or []) == 3
    for token, top in zip(lp.tokens or [], lp.top_logprobs or [], strict=True):
        assert len(top) in (2, 3) and token in top  # the 2 likeliest, and the chosen one
    with pytest.raises(NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="To be", max_tokens=3)
    assert "not served here" in e.value.message
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as bad:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert "character-level" in bad.value.message


def test_openai_sdk_authentication_error(tiny_artifact: Path, server_process) -> None:
    from openai import AuthenticationError, OpenAI

    sp = server_process(["--model", str(tiny_artifact)], env={"NEXTCHAR_AUTH_TOKENS": TOKEN})
    name, _ = _model_with_token(sp)
    for key in ("wrong-token-0123456789abcdef", ""):
        client = OpenAI(base_url=sp.http_url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(AuthenticationError) as e:
            client.completions.create(model=name, prompt="ab", max_tokens=2)
        assert e.value.status_code == 401
    ok = OpenAI(base_url=sp.http_url + "/v1", api_key=TOKEN, max_retries=0)
    assert len(ok.completions.create(model=name, prompt="ab", max_tokens=4,
                                     seed=1).choices[0].text) == 4


def _model_with_token(sp) -> tuple[str, str]:
    with NextCharClient(sp.address, token=TOKEN) as c:
        info = c.model_info()
    return info.name, info.version


def _triton_python() -> Path:
    venv = Path(os.environ.get("NEXTCHAR_TRITON_VENV", REPO / ".venv-triton"))
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        proc = subprocess.run(["make", "-C", str(REPO), "triton-venv", f"TRITON_VENV={venv}"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"could not build {venv} (needs PyPI): {proc.stderr[-2000:]}")
    has_http = subprocess.run([str(python), "-c", "import tritonclient.http"],
                              capture_output=True)
    if has_http.returncode != 0:  # a venv built before the Makefile asked for [http]
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        "tritonclient[grpc,http]==2.73.0"], check=True, timeout=600)
    return python


def test_tritonclient_http_against_nextchar(served, tmp_path: Path) -> None:
    python = _triton_python()
    name, version = _model(served)
    top_k = 3
    with NextCharClient(served.address) as c:
        preds = c.predict(TEXTS, top_k=top_k)
        vocab = list(c.model_info().vocab)
    expect = tmp_path / "expected.json"
    expect.write_text(json.dumps({
        "model": name, "version": version, "server_version": __version__, "vocab": vocab,
        "top_k": top_k, "texts": TEXTS,
        "predictions": [[{"id": cp.id, "char": cp.char, "prob": cp.prob} for cp in p.top]
                        for p in preds]}), encoding="utf-8")
    script = REPO / "tests" / "compat" / "triton_http_check.py"
    proc = subprocess.run([str(python), str(script), "--url", served.http_url.split("//")[1],
                           "--expect", str(expect)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "16 checks passed" in proc.stdout, proc.stdout
    print(proc.stdout.strip(), file=sys.stderr)


def _readme_blocks(heading: str, lang: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_readme_curl_examples_run(served) -> None:
    blocks = _readme_blocks("HTTP with curl", "sh")
    assert blocks and all("curl" in b for b in blocks)
    host = served.http_url.split("//")[1]
    for block in blocks:
        script = block.replace(README_HTTP, host)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, (block, proc.stdout, proc.stderr)
        assert proc.stdout.strip(), block
        assert '"error"' not in proc.stdout, (block, proc.stdout)


def test_readme_openai_sdk_example_runs(served) -> None:
    (block,) = _readme_blocks("OpenAI SDK", "python")
    code = block.replace(README_HTTP, served.http_url.split("//")[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) > 40, proc.stdout
