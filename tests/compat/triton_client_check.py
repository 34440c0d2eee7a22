"""Drives a running nextchar server with the real Triton client (`tritonclient[grpc]`).

tritonclient pins protobuf<7 and nextchar needs protobuf 7, so this script runs in its own venv
(`make tritonclient-test` builds .venv-triton) and cannot import nextchar; the expected answers
come from nextchar's own client, computed by tests/server/test_kserve.py and passed as JSON:

    .venv-triton/bin/python tests/compat/triton_client_check.py --url 127.0.0.1:50051 \
        --expect expected.json

expected.json: {"model", "version", "server_version", "vocab", "top_k", "texts",
                "predictions": [[{"id", "char", "prob"}, ...] per text]}

Exits 0 after printing one summary line; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from importlib.metadata import version
from typing import Any

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

OUTPUTS = ("probs", "top_ids", "top_chars", "top_probs")


def check_result(result: Any, exp: dict[str, Any], how: str) -> None:
    k = exp["top_k"]
    want_ids = np.array([[c["id"] for c in p] for p in exp["predictions"]], dtype=np.int64)
    want_chars = [[c["char"] for c in p] for p in exp["predictions"]]
    want_probs = np.array([[c["prob"] for c in p] for p in exp["predictions"]], dtype=np.float32)
    n, v = len(exp["texts"]), len(exp["vocab"])

    top_ids = result.as_numpy("top_ids")
    top_probs = result.as_numpy("top_probs")
    top_chars = result.as_numpy("top_chars")
    probs = result.as_numpy("probs")
    assert top_ids.dtype == np.int64 and top_ids.shape == (n, k), (how, top_ids.dtype, top_ids.shape)
    assert top_probs.dtype == np.float32 and top_probs.shape == (n, k), (how, top_probs.shape)
    assert top_chars.shape == (n, k), (how, top_chars.shape)
    assert probs.dtype == np.float32 and probs.shape == (n, v), (how, probs.shape)
    assert np.array_equal(top_ids, want_ids), (how, top_ids, want_ids)
    assert np.array_equal(top_probs, want_probs), (how, top_probs, want_probs)
    assert [[b.decode("utf-8") for b in row] for row in top_chars] == want_chars, (how, top_chars)
    # The full distribution agrees with the top-k it ranks, exactly.
    assert np.array_equal(np.take_along_axis(probs, top_ids, axis=1), top_probs), how
    assert np.array_equal(probs.argmax(axis=1), top_ids[:, 0]), how
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5), (how, probs.sum(axis=1))


def requested() -> list[tc.InferRequestedOutput]:
    return [tc.InferRequestedOutput(name) for name in OUTPUTS]


def text_inputs(exp: dict[str, Any]) -> list[tc.InferInput]:
    data = np.array([t.encode("utf-8") for t in exp["texts"]], dtype=np.object_)
    text = tc.InferInput("text", [len(data)], "BYTES")
    text.set_data_from_numpy(data)
    return [text]


def id_inputs(exp: dict[str, Any]) -> list[tc.InferInput]:
    index = {c: i for i, c in enumerate(exp["vocab"])}
    lengths = np.array([len(t) for t in exp["texts"]], dtype=np.int64)
    ids = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)  # right-padded with 0
    for row, t in enumerate(exp["texts"]):
        ids[row, : len(t)] = [index[c] for c in t]
    ids_in = tc.InferInput("ids", list(ids.shape), "INT64")
    ids_in.set_data_from_numpy(ids)
    lengths_in = tc.InferInput("lengths", list(lengths.shape), "INT64")
    lengths_in.set_data_from_numpy(lengths)
    return [ids_in, lengths_in]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="host:port of a running nextchar server")
    ap.add_argument("--expect", required=True, help="JSON of expected answers (see docstring)")
    args = ap.parse_args(argv)
    with open(args.expect, encoding="utf-8") as f:
        exp = json.load(f)
    model, model_version = exp["model"], exp["version"]
    checks = 0
    client = tc.InferenceServerClient(url=args.url)
    try:
        assert client.is_server_live() is True
        assert client.is_server_ready() is True
        assert client.is_model_ready(model) is True
        assert client.is_model_ready(model, model_version) is True
        # Not served: false, not an exception (Triton's answer; wait-until-ready loops need it).
        assert client.is_model_ready("no-such-model") is False
        assert client.is_model_ready(model, "no-such-version") is False
        checks += 6

        meta = client.get_server_metadata()
        assert meta.name == "nextchar" and meta.version == exp["server_version"], meta
        model_meta = client.get_model_metadata(model)
        assert model_meta.name == model and list(model_meta.versions) == [model_version], model_meta
        assert [(t.name, t.datatype) for t in model_meta.inputs] == [
            ("text", "BYTES"), ("ids", "INT64"), ("lengths", "INT64")], model_meta.inputs
        assert [(t.name, t.datatype, list(t.shape)) for t in model_meta.outputs] == [
            ("probs", "FP32", [-1, len(exp["vocab"])]), ("top_ids", "INT64", [-1, -1]),
            ("top_chars", "BYTES", [-1, -1]), ("top_probs", "FP32", [-1, -1])], model_meta.outputs
        config = client.get_model_config(model).config
        assert config.name == model and config.platform == model_meta.platform, config
        assert [(t.name, tc.model_config_pb2.DataType.Name(t.data_type)) for t in config.input] \
            == [("text", "TYPE_STRING"), ("ids", "TYPE_INT64"), ("lengths", "TYPE_INT64")], config
        assert list(config.output[0].dims) == [len(exp["vocab"])], config
        assert config.max_batch_size >= len(exp["texts"]), config
        checks += 3

        params = {"top_k": exp["top_k"]}
        result = client.infer(model, text_inputs(exp), outputs=requested(), parameters=params,
                              request_id="bytes-1")
        assert result.get_response().id == "bytes-1"
        assert result.get_response().model_version == model_version
        check_result(result, exp, "BYTES text input")
        result = client.infer(model, id_inputs(exp), model_version=model_version,
                              outputs=requested(), parameters=params)
        check_result(result, exp, "INT64 ids input")
        checks += 2

        # Only what is asked for comes back.
        only = client.infer(model, text_inputs(exp), outputs=[tc.InferRequestedOutput("top_chars")],
                            parameters=params)
        assert [o.name for o in only.get_response().outputs] == ["top_chars"]
        checks += 1

        try:
            client.infer("no-such-model", text_inputs(exp))
            raise AssertionError("an unknown model name was accepted")
        except InferenceServerException as e:
            assert e.status() == "StatusCode.NOT_FOUND", (e.status(), e.message())
        try:
            bad = tc.InferInput("text", [1], "BYTES")
            bad.set_data_from_numpy(np.array(["~~\u00e9~~".encode()], dtype=np.object_))
            client.infer(model, [bad], parameters=params)
            raise AssertionError("a character outside the vocabulary was accepted")
        except InferenceServerException as e:
            assert e.status() == "StatusCode.INVALID_ARGUMENT", (e.status(), e.message())
        checks += 2

        # The schedule-policy timeout reaches the server (microseconds; its expiry in the queue
        # is tested in test_kserve.py): 60 s bounds nothing, a negative one is refused.
        try:
            client.infer(model, text_inputs(exp), parameters=params, timeout=-1)
            raise AssertionError("a negative timeout was accepted")
        except InferenceServerException as e:
            assert e.status() == "StatusCode.INVALID_ARGUMENT", (e.status(), e.message())
            assert "parameter timeout must be microseconds" in e.message(), e.message()
        check_result(client.infer(model, text_inputs(exp), outputs=requested(),
                                  parameters=params, timeout=60_000_000), exp, "timeout 60 s")
        checks += 2

        # ModelStreamInfer: answers in order, errors in-band.
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, text_inputs(exp), outputs=requested(),
                                  parameters=params, request_id="s1")
        client.async_stream_infer("no-such-model", text_inputs(exp), request_id="s2")
        client.async_stream_infer(model, id_inputs(exp), outputs=requested(),
                                  parameters=params, request_id="s3")
        got = [answers.get(timeout=30) for _ in range(3)]
        client.stop_stream()
        (r1, e1), (r2, e2), (r3, e3) = got
        assert e1 is None and e3 is None and r2 is None, got
        assert r1.get_response().id == "s1" and r3.get_response().id == "s3"
        check_result(r1, exp, "stream, BYTES text input")
        check_result(r3, exp, "stream, INT64 ids input")
        assert "NOT_FOUND" in e2.message(), e2.message()
        checks += 3

        # The loop tritonclient's docs show for a stream: read until triton_final_response.
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, text_inputs(exp), outputs=requested(), parameters=params,
                                  request_id="f1", enable_empty_final_response=True)
        result, error = answers.get(timeout=30)
        client.stop_stream()
        assert error is None, error
        final = result.get_response().parameters["triton_final_response"]
        assert final.bool_param is True, result.get_response()
        check_result(result, exp, "stream with enable_empty_final_response")
        checks += 1
    finally:
        client.close()
    print(f"tritonclient {version('tritonclient')}: {checks} checks passed against {args.url} "
          f"(model {model} version {model_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
