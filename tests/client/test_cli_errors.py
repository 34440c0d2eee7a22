"""The CLI error sweep: every flag of every `nextchar` subcommand, given bad values, ends in one
clear line.

The cases are generated from the argparse parsers themselves (the client's subcommands,
`nextchar serve`'s settings-generated parser, training's train/export), so a new flag or a new
subcommand is covered without a new test. For every option that takes a value, each of

    -1 (negative), 99999999999999999999 (huge), abc (wrong type), a missing file, "" (empty),
    and nan / inf for numbers

is given on top of a working command line (a live server for the client commands; an artifact
or corpus that does not exist for serve/train, so a value that is accepted stops there instead
of serving or training: that error, BASE_ERROR, means "accepted"). Every outcome must be one of:

- exit 0 with no traceback, or the base command's own error (the value was accepted), or
- a refusal: a non-zero exit with exactly one line on stderr, `nextchar COMMAND: ...`, after
  argparse's usage lines when it is a usage error, that names the flag (or the value it
  refuses); no traceback, no gRPC core log line.

A negative number for a numeric option must be refused. A large number train accepted before
it read the (missing) corpus is given again with a real tiny corpus, where the checks that need
the text run. Separately: an unknown flag names its
subcommand, every client command against a port nothing listens on, `nextchar serve` on a taken
port, and commands whose stdout is a closed pipe (`| head`) exit quietly.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nextchar.client import cli

# {tmp}/missing/x: a file that does not exist, in the case's own folder (a command that creates
# its output's parent folder must not write outside the test).
BAD_VALUES = ["-1", "99999999999999999999", "abc", "{tmp}/missing/x", ""]
BAD_NUMBERS = ["nan", "inf"]

# Arguments that make each subcommand work, before the swept flag is added. A new subcommand
# needs an entry here (test_every_subcommand_has_a_base says so). {server}, {input}, {output},
# {tmp} are filled in per case.
BASE: dict[str, list[str]] = {
    "predict": ["--timeout-s", "5", "hello"],
    "info": ["--timeout-s", "5"],
    "models": ["--timeout-s", "5"],
    "health": ["--timeout-s", "5"],
    "reload": ["--timeout-s", "5"],
    "load": ["--timeout-s", "5", "tiny"],
    "unload": ["--timeout-s", "5", "tiny"],
    "generate": ["--timeout-s", "5", "--max-chars", "5", "hello"],
    "batch": ["{input}", "-o", "{output}", "--no-progress", "--max-retries", "0",
              "--timeout-s", "5"],
    # The model does not exist: an accepted value ends there, one line, instead of serving.
    # Real (free) gRPC and metrics ports, so --host and --metrics-host are checked before it
    # (port 0 skips that bind check).
    "serve": ["--model", "{tmp}/no-such-artifact", "--port", "{port}", "--http-port", "0",
              "--metrics-port", "{metrics_port}"],
    # No such corpus: an accepted value ends there instead of training.
    "train": ["--corpus", "{tmp}/no-such-corpus", "--out", "{tmp}/run", "--max-steps", "1"],
    "export": ["{tmp}/no-such-run", "-o", "{tmp}/artifact"],
}
# Each base command's own failure, {tmp} filled in: a swept value that ends here was accepted
# (a refusal must come before it, naming the flag). load/unload: the live server serves no
# model named tiny.
BASE_ERROR: dict[str, str] = {
    "serve": "nextchar serve: {tmp}/no-such-artifact: no such directory",
    "train": "nextchar train: corpus path not found: {tmp}/no-such-corpus",
    "export": "nextchar export: no checkpoint at {tmp}/no-such-run",
    "load": "nextchar load: NOT_FOUND: model 'tiny' is not served here",
    "unload": "nextchar unload: NOT_FOUND: model 'tiny' is not served here",
}
# Refusals whose line names neither the flag nor the value (the value is empty): the exact line.
REFUSED_IN_OTHER_WORDS: dict[tuple[str, str, str], str] = {
    ("train", "--corpus", ""): "nextchar train: corpus path is empty",
}
# train with a real corpus: a tiny model, one step or a fraction of a second, whichever first.
REAL_TRAIN = ["--corpus", "{tmp}/corpus", "--out", "{tmp}/real-run", "--max-steps", "1",
              "--max-minutes", "0.005", "--embed-dim", "4", "--hidden-size", "8",
              "--num-layers", "1", "--threads", "1", "--no-progress"]
CORPUS_TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n" * 12
# Subcommands that talk to a server (and so are swept against a live one).
CLIENT_COMMANDS = ["predict", "info", "models", "health", "reload", "load", "unload", "generate",
                   "batch"]


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's real parser: the client's, serve's and training's own."""
    from nextchar.server.cli import build_parser as serve_parser
    from nextchar.training.cli import build_parser as training_parser

    found = dict(cli.subparsers(cli.build_parser()))
    found["serve"] = serve_parser()
    found.update(cli.subparsers(training_parser()))
    return found


def _numeric(command: str, action: argparse.Action) -> bool:
    if command == "serve":
        from nextchar.server.settings import ServerSettings

        field = ServerSettings.model_fields.get(action.dest)
        return field is not None and any(t in (int, float) for t in
                                         (field.annotation, *getattr(field.annotation, "__args__", ())))
    kind = action.type
    if kind in (int, float):
        return True
    return getattr(kind, "__name__", "") in ("integer", "seconds")


def _takes_value(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.nargs != 0 and not isinstance(
        action, (argparse._HelpAction, argparse._VersionAction, argparse.BooleanOptionalAction))


def sweep_cases() -> Iterator[Any]:
    for command, parser in sorted(parsers().items()):
        for action in parser._actions:
            if not _takes_value(action):
                continue
            flag = max(action.option_strings, key=len)
            values = BAD_VALUES + (BAD_NUMBERS if _numeric(command, action) else [])
            for value in values:
                shown = value.replace("{tmp}/", "")
                yield pytest.param(command, flag, value, _numeric(command, action),
                                   tuple(action.option_strings),
                                   id=f"{command} {flag} {shown!r}")


def _fill(args: list[str], **paths: str) -> list[str]:
    with socket.socket() as a, socket.socket() as b:  # both held: two different free ports
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = {"port": str(a.getsockname()[1]), "metrics_port": str(b.getsockname()[1])}
    return [arg.format(**ports, **paths) for arg in args]


def error_lines(stderr: str) -> list[str]:
    """stderr without argparse's usage block (usage: ... and its indented continuation)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage: "):
        lines = lines[1:]
        while lines and lines[0].startswith(" "):
            lines = lines[1:]
    return lines


def assert_one_clean_line(command: str, code: int, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code != 0
    lines = error_lines(stderr)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith(f"nextchar {command}: "), lines[0]


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each in-process CLI run in its own folder; the logging set-up a command does (serve
    configures the root logger) is undone after it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEXTCHAR_TOKEN", raising=False)
    monkeypatch.delenv("NEXTCHAR_TLS_CA", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield tmp_path
    root.handlers[:] = handlers
    root.setLevel(level)


def run_in_process(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def _argv(command: str, base: list[str], flag: str, value: str) -> list[str]:
    return [command, *base, f"{flag}={value}" if value.startswith("-") else flag, *(
        [] if value.startswith("-") else [value])]


def assert_refused(command: str, code: int, err: str, names: tuple[str, ...], value: str) -> None:
    """One clean line that names the flag (any of its spellings) or the value it refuses."""
    assert_one_clean_line(command, code, err)
    line = error_lines(err)[0]
    if (command, names[-1], value) in REFUSED_IN_OTHER_WORDS:
        assert line == REFUSED_IN_OTHER_WORDS[command, names[-1], value]
        return
    assert any(n in line for n in names) or (value and value in line), (
        f"the refusal names neither {'/'.join(names)} nor {value!r}: {line}")


@pytest.mark.parametrize(("command", "flag", "value", "numeric", "names"), list(sweep_cases()))
def test_bad_flag_value(command: str, flag: str, value: str, numeric: bool,
                        names: tuple[str, ...], isolated: Path, tiny_server: Any,
                        capfd: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "DEFAULT_SERVER", tiny_server.address)
    (isolated / "in.txt").write_text("hello\nworld\n", encoding="utf-8")
    base = _fill(BASE[command], tmp=str(isolated), input=str(isolated / "in.txt"),
                 output=str(isolated / "out.jsonl"))
    value = value.format(tmp=isolated)
    code, _, err = run_in_process(_argv(command, base, flag, value), capfd)
    assert "Traceback" not in err, err
    base_error = BASE_ERROR.get(command, "").format(tmp=isolated)
    lines = error_lines(err)
    accepted = code == 0 or (bool(base_error) and code != 0 and len(lines) == 1
                             and lines[0].startswith(base_error))
    if not accepted:
        assert_refused(command, code, err, names, value)
        return
    if code != 0:
        assert_one_clean_line(command, code, err)
    assert not (numeric and value == "-1"), f"{command} {flag}=-1 was accepted: {err}"
    if command == "train" and numeric:
        # Accepted before the corpus was read: with a real one, the checks that need the text
        # (its length against --batch-size and --bptt) run too.
        monkeypatch.setenv("NEXTCHAR_CACHE_DIR", str(isolated / "cache"))
        (isolated / "corpus").mkdir()
        (isolated / "corpus" / "a.txt").write_text(CORPUS_TEXT, encoding="utf-8")
        real = _fill(REAL_TRAIN, tmp=str(isolated))
        import torch  # training sets its thread count for the whole process: put it back

        threads = torch.get_num_threads()
        try:
            code, _, err = run_in_process(_argv(command, real, flag, value), capfd)
        finally:
            torch.set_num_threads(threads)
        assert "Traceback" not in err, err
        if code != 0:
            assert_refused(command, code, err, names, value)


def test_every_subcommand_has_a_base() -> None:
    missing = set(parsers()) - set(BASE)
    assert not missing, f"add working arguments for {sorted(missing)} to BASE"


def test_the_sweep_covers_every_subcommand() -> None:
    covered = {case.values[0] for case in sweep_cases()}
    assert covered == set(parsers()), set(parsers()) - covered


@pytest.mark.parametrize("command", sorted(BASE))
def test_unknown_flag_names_the_subcommand(command: str, isolated: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    base = _fill(BASE[command], tmp=str(isolated), input="in.txt", output="out.jsonl")
    code, _, err = run_in_process([command, *base, "--no-such-flag"], capfd)
    assert code == 2
    assert err.startswith(f"usage: nextchar {command} "), err
    assert_one_clean_line(command, code, err)
    assert "unrecognized arguments: --no-such-flag" in err


def test_unknown_flag_suggests_the_real_one(isolated: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_in_process(["predict", "--topk", "3", "hello"], capfd)
    assert code == 2 and "(did you mean --top-k?)" in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
def test_unreachable_server(command: str, isolated: Path,
                            capfd: pytest.CaptureFixture[str]) -> None:
    (isolated / "in.txt").write_text("hello\n", encoding="utf-8")
    base = _fill(BASE[command], tmp=str(isolated), input="in.txt", output="out.jsonl")
    server = f"127.0.0.1:{_closed_port()}"
    retries = ["--max-retries", "1"] if command == "batch" else []
    code, _, err = run_in_process([command, "--server", server, *base, *retries], capfd)
    assert "Traceback" not in err, err
    lines = error_lines(err)
    if command == "batch":
        # One "retrying" line per retry (nothing silent), then the refusal: exit 1 (a later
        # run may start it: a Kubernetes Job retries it), nothing written, and no "rerun to
        # resume" (there is nothing to resume).
        assert code == 1
        assert all("retrying in" in line for line in lines[:-1]) and len(lines) == 2, err
        assert "rerun" not in lines[-1] and "cannot start" in lines[-1], lines[-1]
        assert not (isolated / "out.jsonl").exists()
        err = lines[-1] + "\n"
    assert_one_clean_line(command, code, err)
    assert "UNAVAILABLE" in err


def _nextchar(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "0"}
    return subprocess.Popen([sys.executable, "-m", "nextchar", *args], env=env, **kw)


@pytest.mark.parametrize("args", [
    ["predict", "--top-k", "3", *["abcdefghij"[: 1 + i % 10] for i in range(50)]],
    ["generate", "--max-chars", "300", "--seed", "1", "hello"],
    ["info"],
    ["predict", "--json", "--per-position", "hello"],
], ids=lambda a: a[0] + ("-json" if "--json" in a else ""))
def test_closed_pipe_is_quiet(args: list[str], tiny_server: Any) -> None:
    """`nextchar ... | head -1`: the reader left before the output was written. Exit 141 (what
    a shell shows for SIGPIPE), nothing on stderr."""
    proc = _nextchar(args[0], "--server", tiny_server.address, *args[1:],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # no reader: every write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(60) == cli.EXIT_PIPE_CLOSED, err
    assert err == ""


@pytest.mark.parametrize("args", [["predict", "hello"], ["generate", "--echo", "hello"],
                                  ["info"]], ids=lambda a: a[0])
@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_a_stdout_that_cannot_be_written_is_one_line(args: list[str], stdout: str,
                                                     tiny_server: Any) -> None:
    """`> /dev/full` (every write: ENOSPC) and `>&-` (no stdout at all)."""
    cmd = [sys.executable, "-m", "nextchar", args[0], "--server", tiny_server.address, *args[1:]]
    redirect = "> /dev/full" if stdout == "full" else ">&-"
    r = subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", *cmd], capture_output=True,
                       text=True, timeout=60)
    assert_one_clean_line(args[0], r.returncode, r.stderr)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"nextchar {args[0]}: cannot write to standard output: "
                                "No space left on device" if stdout == "full"
                                else f"nextchar {args[0]}: standard output is closed")


def test_an_encoding_that_cannot_write_the_answer_says_how_to_fix_it() -> None:
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    with pytest.raises(cli.StdoutFailed) as e:
        cli._Stdout(ascii_out).write("caf\u00e9")
    assert str(e.value) == ("standard output's encoding 'ascii' cannot write '\u00e9': set "
                            "PYTHONIOENCODING=utf-8 or a UTF-8 locale")


def test_generate_ends_its_line_before_an_error_and_echoes_nothing_refused(
        tiny_server: Any) -> None:
    base = [sys.executable, "-m", "nextchar", "generate", "--server", tiny_server.address]
    r = subprocess.run([*base, "--echo", "h~llo"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""  # the prompt the server refused is not echoed
    assert "INVALID_ARGUMENT" in r.stderr
    r = subprocess.run([*base, "--echo", "--seed", "1", "--max-chars", "5", "hello"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("hello") and len(r.stdout) == 11
    assert r.stdout.endswith("\n")


def test_serve_on_a_taken_port(tiny_artifact: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _nextchar("serve", "--model", str(tiny_artifact), "--port", str(port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert_one_clean_line("serve", 1, text)
    assert f"127.0.0.1:{port} is already in use" in text
    assert out == b""


def test_serve_a_file_as_model(isolated: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (isolated / "README.md").write_text("# not an artifact\n")
    code, _, err = run_in_process(["serve", "--model", "README.md"], capfd)
    assert_one_clean_line("serve", code, err)
    assert "is a file, not a directory" in err


def test_version(capfd: pytest.CaptureFixture[str]) -> None:
    from nextchar import __version__

    code, out, _ = run_in_process(["--version"], capfd)
    assert code == 0 and out.strip() == f"nextchar {__version__}"


def test_generate_help_shows_max_chars_default_and_bounds(capfd: pytest.CaptureFixture[str]
                                                          ) -> None:
    code, out, _ = run_in_process(["generate", "--help"], capfd)
    assert code == 0
    text = " ".join(out.split())
    assert "characters to generate at most, 1 to the server's max_chars_per_text (4096 by default) (default 200)" in text
    for bad in ("0", "4294967296"):
        code, _, err = run_in_process(["generate", "--max-chars", bad, "x"], capfd)
        assert code == 2 and "argument --max-chars" in err


def test_serve_on_a_taken_http_port(tiny_artifact: Path) -> None:
    """The HTTP port is checked with the gRPC one, before the model loads: one line."""
    from nextchar.server.settings import ServerSettings

    if "http_port" not in ServerSettings.model_fields:
        pytest.skip("no HTTP front end")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _nextchar("serve", "--model", str(tiny_artifact), "--port", "0", "--http-port",
                         str(port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert_one_clean_line("serve", proc.returncode, text)
    assert f"HTTP 127.0.0.1:{port} is already in use" in text and "--http-port" in text


def test_tls_against_a_plaintext_server_prints_one_line(tiny_server: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC core logs the failed handshake itself; the command's own line is the only one."""
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    proc = _nextchar("predict", "--server", tiny_server.address, "--tls", "--timeout-s", "5",
                     "hello", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert out == b""
    assert_one_clean_line("predict", proc.returncode, err.decode())
    assert "UNAVAILABLE" in err.decode() and "handshake" in err.decode().lower()


def test_any_uint64_seed_is_taken(tiny_server: Any, isolated: Path,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--server", tiny_server.address, "--max-chars", "3"]
    code, out, err = run_in_process([*base, "--seed", str(2**64 - 1), "hello"], capfd)
    assert code == 0 and len(out.rstrip("\n")) == 3, err
    code, _, err = run_in_process([*base, "--seed", str(2**64), "hello"], capfd)
    assert code == 2 and error_lines(err) == [
        f"nextchar generate: error: argument --seed: must be between 0 and {2**64 - 1}, "
        f"got {2**64}"]


def test_an_empty_environment_variable_counts_as_unset(tiny_server: Any) -> None:
    env = {**os.environ, "NEXTCHAR_TLS_CA": "", "NEXTCHAR_SERVER": "", "NEXTCHAR_TOKEN": ""}
    r = subprocess.run([sys.executable, "-m", "nextchar", "predict", "--server",
                        tiny_server.address, "hello"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("'hello' -> "), r.stderr  # plaintext
    r = subprocess.run([sys.executable, "-c", "from nextchar.client import cli; "
                        "print(cli.DEFAULT_SERVER)"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.stdout.strip() == "127.0.0.1:50051"


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature=-1"], "argument --temperature: must be a finite number >= 0 (0: always the "
                           "likeliest), got -1"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0 (0: always "
                               "the likeliest), got nan"),
    (["--temperature", "1e39"], "argument --temperature: must be a finite number >= 0 (0: always "
                                "the likeliest), got 1e39"),
    (["--top-p", "1.5"], "argument --top-p: must be between 0 and 1 (0 or 1: off), got 1.5"),
    (["--top-p", "warm"], "argument --top-p: invalid number value: 'warm'"),
    (["--seed", "abc"], "argument --seed: invalid integer value: 'abc'"),
    (["--stop", ""], "argument --stop: must have 1 to 64 characters, got 0"),
    (["--stop", "x" * 65], "argument --stop: must have 1 to 64 characters, got 65"),
    ([f"--stop={i}" for i in range(9)], "argument --stop: at most 8 stop strings, got 9"),
])
def test_generate_refuses_sampling_values_the_server_would_refuse_as_a_usage_error(
        args: list[str], message: str, isolated: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Exit 2 before any call (the server at port 1 is never dialed), like every other flag."""
    code, out, err = run_in_process(["generate", "--server", "127.0.0.1:1", *args, "hi"], capfd)
    assert (code, out) == (2, "")
    assert error_lines(err) == [f"nextchar generate: error: {message}"]


def test_generate_refuses_an_empty_prompt_as_a_usage_error(
        isolated: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_in_process(["generate", "--server", "127.0.0.1:1", ""], capfd)
    assert (code, out) == (2, "")
    assert error_lines(err) == [
        "nextchar generate: error: argument PROMPT: is empty: give at least one character"]
