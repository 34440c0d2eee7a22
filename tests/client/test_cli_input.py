"""What the `nextchar` command refuses before it sends anything, and how it starts.

- Arguments that are not UTF-8 (Python hands an undecodable byte of argv or the environment over
  as a lone surrogate), server ports outside 1-65535, timeouts beyond gRPC's deadlines, tokens
  that are not printable ASCII: one usage error naming the argument (or the environment variable
  it came from), exit 2.
- `train` / `export` (and `serve`) without their extra installed: one line saying which install
  they need, exit 2; an ImportError that is a bug keeps its traceback.
- Ctrl-C while the start-up imports run: exit 130, nothing on stderr.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nextchar.client import cli

REPO = Path(__file__).resolve().parents[2]
THIN_VENV = os.environ.get("NEXTCHAR_CLIENT_VENV")


def run(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    return code, capfd.readouterr().err


def usage_error(err: str) -> str:
    """The one line after argparse's usage block; fails on a traceback or more lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("usage: "), err
    lines = [line for line in lines[1:] if not line.startswith(" ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("NEXTCHAR_TOKEN", "NEXTCHAR_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


# -- arguments that are not UTF-8 ----------------------------------------------------------------
BAD = os.fsdecode(b"a\xffb")  # what Python makes of the bytes a, 0xff, b in argv


@pytest.mark.parametrize(("argv", "name"), [
    (["predict", BAD], "argument TEXT"),
    (["predict", "--model", BAD, "hello"], "argument --model"),
    (["predict", "--token", BAD, "hello"], "argument --token"),
    (["predict", "--server", BAD, "hello"], "argument --server"),
    (["generate", BAD], "argument PROMPT"),
    (["generate", "--stop", BAD, "hello"], "argument --stop"),
    (["health", "--service", BAD], "argument --service"),
    (["load", BAD], "argument NAME"),
    (["batch", BAD, "-o", "out.jsonl"], "argument INPUT"),
    (["batch", "in.txt", "-o", BAD], "argument -o/--output"),
], ids=lambda v: v if isinstance(v, str) else " ".join(a for a in v if a != BAD))
def test_an_argument_that_is_not_utf8_is_refused_naming_it(
        argv: list[str], name: str, clean_env: Path, tiny_server: Any,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "DEFAULT_SERVER", tiny_server.address)
    (clean_env / "in.txt").write_text("hello\n")
    code, err = run(argv, capfd)
    assert code == 2
    assert usage_error(err) == (f"nextchar {argv[0]}: error: {name}: not valid UTF-8 (byte 0xff "
                                f"at position 1)")
    assert sorted(p.name for p in clean_env.iterdir()) == ["in.txt"]  # no meta, no .tmp


def test_undecodable_bytes_on_a_real_command_line(tiny_server: Any, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nextchar", "predict", "--server",
                        tiny_server.address, b"a\xffb"], capture_output=True, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 2
    assert usage_error(r.stderr.decode()) == ("nextchar predict: error: argument TEXT: not valid "
                                              "UTF-8 (byte 0xff at position 1)")
    assert r.stdout == b""


def test_an_environment_value_is_named_by_its_variable(
        clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NEXTCHAR_TOKEN", BAD)
    code, err = run(["info"], capfd)
    assert code == 2
    assert usage_error(err) == ("nextchar info: error: NEXTCHAR_TOKEN: not valid UTF-8 (byte 0xff "
                                "at position 1)")
    monkeypatch.delenv("NEXTCHAR_TOKEN")
    monkeypatch.setattr(cli, "DEFAULT_SERVER", BAD)
    code, err = run(["info"], capfd)
    assert code == 2
    assert usage_error(err) == ("nextchar info: error: NEXTCHAR_SERVER: not valid UTF-8 (byte "
                                "0xff at position 1)")


# -- ports, timeouts, tokens ---------------------------------------------------------------------
@pytest.mark.parametrize("port", ["84067", "99999", "65536", "0", "-1"])
def test_a_port_outside_1_to_65535_is_refused(port: str, clean_env: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    """gRPC would wrap it (:84067 dials 18531) or refuse it deep in its core."""
    server = f"127.0.0.1:{port}"
    code, err = run(["predict", "--server", server, "hello"], capfd)
    assert code == 2
    assert usage_error(err) == (f"nextchar predict: error: argument --server: server address "
                                f"'{server}': port {port} is not between 1 and 65535")


def test_a_bad_port_in_nextchar_server_is_refused(clean_env: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "DEFAULT_SERVER", "127.0.0.1:84067")
    code, err = run(["health"], capfd)
    assert code == 2
    assert usage_error(err) == ("nextchar health: error: NEXTCHAR_SERVER: server address "
                                "'127.0.0.1:84067': port 84067 is not between 1 and 65535")


def test_an_empty_port_is_the_default_port(clean_env: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(["health", "--server", "127.0.0.1:", "--timeout-s", "2"], capfd)
    assert code == 1
    assert err.startswith("nextchar health: UNAVAILABLE: ") and err.count("\n") == 1, err
    assert "127.0.0.1:50051" in err and ":443" not in err


@pytest.mark.parametrize("timeout", ["1e10", "9.3e9", "1000000001"])
def test_a_timeout_beyond_grpc_deadlines_is_refused(timeout: str, clean_env: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(["predict", "--timeout-s", timeout, "hello"], capfd)
    assert code == 2
    assert usage_error(err) == (f"nextchar predict: error: argument --timeout-s: must be at most "
                                f"1000000000 seconds (about 31 years), got {timeout}")


def test_a_timeout_of_1e9_seconds_works(tiny_server: Any, clean_env: Path,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(["predict", "--server", tiny_server.address, "--timeout-s", "1e9", "hello"],
                    capfd)
    assert (code, err) == (0, "")


@pytest.mark.parametrize(("token", "char", "pos"), [
    ("abc\x01def", "0001", 3), ("tök", "00F6", 1), ("to ken", "0020", 2), ("a\tb", "0009", 1),
])
def test_a_token_that_is_not_printable_ascii_is_refused(
        token: str, char: str, pos: int, clean_env: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(["predict", "--token", token, "hello"], capfd)
    assert code == 2
    assert usage_error(err) == (f"nextchar predict: error: argument --token: token must be "
                                f"printable ASCII without spaces; character U+{char} at position "
                                f"{pos} is not")
    assert token not in err  # a secret: never echoed


def test_a_token_from_a_crlf_file_loses_its_line_end(
        tiny_server: Any, clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """`NEXTCHAR_TOKEN=$(cat token.txt)` keeps the \\r of a CRLF line: dropped, not sent (gRPC
    would log "Invalid metadata" and fail INTERNAL)."""
    monkeypatch.setenv("NEXTCHAR_TOKEN", "s3cret-token-value\r")
    code, err = run(["predict", "--server", tiny_server.address, "hello"], capfd)
    assert (code, err) == (0, "")
    monkeypatch.setenv("NEXTCHAR_TOKEN", "s3cret\x7f")
    code, err = run(["predict", "--server", tiny_server.address, "hello"], capfd)
    assert code == 2
    assert usage_error(err).startswith("nextchar predict: error: NEXTCHAR_TOKEN: token must be "
                                       "printable ASCII")


@pytest.mark.parametrize("value", ["0", "-1", "4294967296"])
def test_max_chars_bounds_read_the_same_for_every_bad_value(
        value: str, clean_env: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, err = run(["generate", f"--max-chars={value}", "hello"], capfd)
    assert code == 2
    assert usage_error(err) == (f"nextchar generate: error: argument --max-chars: must be between "
                                f"1 and 4294967295, got {value}")


# -- commands of an extra that is not installed ---------------------------------------------------
NO_TORCH = "import sys; sys.modules['torch'] = None\nfrom nextchar.client.cli import main\n"


@pytest.mark.parametrize("argv", [["train", "--preset", "hello"], ["train", "--help"],
                                  ["export", "x", "-o", "y"]], ids=" ".join)
def test_train_and_export_without_torch_say_which_install(argv: list[str],
                                                          tmp_path: Path) -> None:
    """Training's CLI imports torch inside its main (even for --help): that ImportError too
    is the missing extra, not a traceback."""
    code = NO_TORCH + f"sys.exit(main({argv!r}))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"nextchar {argv[0]}: this command needs 'pip install nextchar[train]' "
                        f"(No module named 'torch')\n")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "y").exists()


def test_an_import_error_inside_nextchar_keeps_its_traceback(tmp_path: Path) -> None:
    """A module of nextchar itself that fails to import is a bug, not a missing extra."""
    code = ("import sys; sys.modules['nextchar.training.cli'] = None\n"
            "from nextchar.client.cli import main\nsys.exit(main(['train', '--help']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "nextchar.training.cli" in r.stderr
    assert "pip install" not in r.stderr


@pytest.mark.skipif(not THIN_VENV, reason="NEXTCHAR_CLIENT_VENV unset: `make test` builds it")
@pytest.mark.parametrize(("argv", "extra"), [
    (["train", "--preset", "hello"], "train"), (["train", "--help"], "train"),
    (["export", "x", "-o", "y"], "train"), (["serve", "--help"], "serve"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_thin_install_commands_of_missing_extras(argv: list[str], extra: str,
                                                 tmp_path: Path) -> None:
    r = subprocess.run([str(Path(str(THIN_VENV)) / "bin" / "nextchar"), *argv],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith(f"nextchar {argv[0]}: this command needs 'pip install "
                               f"nextchar[{extra}]' (No module named '")
    assert r.stderr.count("\n") == 1, r.stderr


# -- Ctrl-C at start-up ---------------------------------------------------------------------------
def test_the_cli_module_imports_no_grpc() -> None:
    """`nextchar` gets to `main` (and its quiet Ctrl-C) before grpc's 0.2 s of imports."""
    code = ("import sys, nextchar.client.cli\n"
            "heavy = {'grpc', 'typing', 'nextchar.client.client'} & set(sys.modules)\n"
            "sys.exit(', '.join(sorted(heavy)) or 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers: a call waits for its deadline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def _interrupted(argv: list[str], delay_s: float) -> tuple[int, str]:
    """Runs `main(argv)` in a fresh process and sends SIGINT `delay_s` after `main` set up its
    quiet exit (SIGINT during the interpreter's own start-up, before `main`, is not this code's
    to quiet), while the imports after it still run."""
    code = ("import os, sys\nfrom nextchar.client import cli\n"
            "quiet = cli._sigint_exits\n"
            "def hooked():\n"
            "    restore = quiet()\n"
            "    os.write(1, b'ready\\n')\n"
            "    return restore\n"
            "cli._sigint_exits = hooked\n"
            f"sys.exit(cli.main({argv!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=60)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("delay_s", [0.0, 0.03, 0.1, 0.3, 1.0])
def test_ctrl_c_while_predict_starts_is_quiet(delay_s: float, silent_server: str) -> None:
    code, err = _interrupted(["predict", "--server", silent_server, "--timeout-s", "20",
                              "hello"], delay_s)
    assert (code, err) == (130, "")


# A line of serve's log (logging_setup.TEXT_FORMAT: its own loggers and uvicorn's), at INFO
# or WARNING.
SERVE_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) "
                            r"(nextchar|uvicorn)[.\w]* \[[^\]]*\]: ")


@pytest.mark.parametrize("delay_s", [0.0, 0.1, 1.0])
def test_ctrl_c_while_serve_starts_is_quiet(delay_s: float, tiny_artifact: Path) -> None:
    """While the server's packages import: 130 and nothing else. Once serve runs (1 s in, on
    an unloaded machine), SIGINT is its own: a drain, exit 0, and on stderr only serve's own
    log lines, the drain's among them."""
    code, err = _interrupted(["serve", "--model", str(tiny_artifact), "--port", "0",
                              "--http-port", "0"], delay_s)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    if code == 0:
        lines = err.splitlines()
        assert all(SERVE_LOG_LINE.match(line) for line in lines), err
        assert any("SIGINT: draining" in line for line in lines), err
    else:
        assert (code, err) == (130, "")


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-ca", "/nonexistent.pem"], "--tls-ca /nonexistent.pem: cannot read (No such file or "
                                       "directory)"),
    (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together (the client certificate "
                             "and its key)"),
])
def test_a_tls_option_the_client_cannot_use_is_a_usage_error(
        flags: list[str], message: str, clean_env: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Found when the client is built, after argparse: it exited 1 (a server-side failure, a
    rerun may work) with an INVALID_ARGUMENT prefix, though nothing was sent."""
    code, err = run(["health", *flags], capfd)
    assert (code, err) == (2, f"nextchar health: {message}\n")
