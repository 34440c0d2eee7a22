"""bench/grpc_floor.py, the transport floor the speed figures are measured against, answers as
its docstring says: the saved bytes for every ModelInfer (plain and through the batch hand-off,
concurrent calls included) and the prompt's last character first for Generate."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

FLOOR = Path(__file__).resolve().parents[2] / "bench" / "grpc_floor.py"
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(params=[[], ["--handoff"]], ids=["plain", "handoff"])
def floor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    answer = b"\x0a\x05floor-saved-answer"  # any bytes: the floor does not parse or build them
    saved = tmp_path / "response.bin"
    saved.write_bytes(answer)
    proc = subprocess.Popen([sys.executable, str(FLOOR), "--port", "0", "--infer-response",
                             str(saved), *request.param], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("nextchar serving on "), line
        yield line.split()[-1], answer
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_model_infer_answers_the_saved_bytes_to_every_concurrent_call(
        floor: tuple[str, bytes]) -> None:
    address, answer = floor
    with grpc.insecure_channel(address) as ch:
        infer = ch.unary_unary(INFER)
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda i: infer(b"not parsed %d" % i, timeout=10), range(64)))
    assert got == [answer] * 64


def test_generate_sends_the_prompt_s_last_character_first(floor: tuple[str, bytes]) -> None:
    address, _ = floor
    with grpc.insecure_channel(address) as ch:
        chunks = list(pb_grpc.NextCharStub(ch).Generate(
            pb.GenerateRequest(prompt="hello", max_chars=4), timeout=10))
    assert [c.text for c in chunks] == ["o", "ooo"]
    assert chunks[-1].stop_reason == pb.STOP_REASON_MAX_CHARS
