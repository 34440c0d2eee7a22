"""Drives a running nextchar server's KServe V2 REST endpoint with the real Triton HTTP client
(`tritonclient[http]`), in .venv-triton (tritonclient pins protobuf<7, so this cannot import
nextchar); the expected answers come from nextchar's own gRPC client, passed as JSON by
tests/server/test_http_clients.py:

    .venv-triton/bin/python tests/compat/triton_http_check.py --url 127.0.0.1:8000 \
        --expect expected.json

expected.json: {"model", "version", "server_version", "vocab", "top_k", "texts",
                "predictions": [[{"id", "char", "prob"}, ...] per text]}

Exits 0 after printing one summary line; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from typing import Any

import numpy as np
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

OUTPUTS = ("probs", "top_ids", "top_chars", "top_probs")


def check(result: Any, exp: dict[str, Any], how: str) -> None:
    k, n, v = exp["top_k"], len(exp["texts"]), len(exp["vocab"])
    want_ids = np.array([[c["id"] for c in p] for p in exp["predictions"]], dtype=np.int64)
    want_probs = np.array([[c["prob"] for c in p] for p in exp["predictions"]], dtype=np.float32)
    want_chars = [[c["char"] for c in p] for p in exp["predictions"]]
    top_ids, top_probs = result.as_numpy("top_ids"), result.as_numpy("top_probs")
    top_chars, probs = result.as_numpy("top_chars"), result.as_numpy("probs")
    assert top_ids.shape == (n, k) and probs.shape == (n, v), (how, top_ids.shape, probs.shape)
    assert np.array_equal(top_ids.astype(np.int64), want_ids), (how, top_ids, want_ids)
    assert np.abs(top_probs.astype(np.float32) - want_probs).max() <= 1e-6, how
    chars = [[c.decode() if isinstance(c, bytes) else str(c) for c in row] for row in top_chars]
    assert chars == want_chars, (how, chars)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5), how
    # Each row is its own text's distribution: its top-k entries are exactly top_probs (a sum
    # would pass rows swapped or shuffled).
    assert np.array_equal(np.take_along_axis(probs.astype(np.float32), top_ids.astype(np.int64),
                                             axis=1), top_probs.astype(np.float32)), how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--expect", required=True)
    args = ap.parse_args()
    exp = json.loads(open(args.expect, encoding="utf-8").read())
    client = tc.InferenceServerClient(args.url)
    checks = 0
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "nextchar" and meta["version"] == exp["server_version"], meta
    assert client.is_model_ready(exp["model"])
    assert client.is_model_ready(exp["model"], exp["version"])
    model = client.get_model_metadata(exp["model"])
    assert model["name"] == exp["model"] and model["versions"] == [exp["version"]], model
    assert [t["name"] for t in model["inputs"]] == ["text", "ids", "lengths"], model
    config = client.get_model_config(exp["model"])
    assert config["name"] == exp["model"] and config["max_batch_size"] >= len(exp["texts"]), config
    assert [(t["name"], t["data_type"]) for t in config["input"]] == [
        ("text", "TYPE_STRING"), ("ids", "TYPE_INT64"), ("lengths", "TYPE_INT64")], config
    assert config["output"][0]["dims"] == [len(exp["vocab"])], config
    checks += 6
    def successes() -> tuple[int, int]:
        (stats,) = client.get_inference_statistics(exp["model"])["model_stats"]
        assert (stats["name"], stats["version"]) == (exp["model"], exp["version"]), stats
        return stats["inference_stats"]["success"]["count"], stats["inference_count"]

    before = successes()
    texts = np.array([t.encode() for t in exp["texts"]], dtype=np.object_)
    answers: dict[bool, Any] = {}
    for binary in (True, False):  # the binary-tensor extension (tritonclient's default), JSON
        text = tc.InferInput("text", [len(texts)], "BYTES")
        text.set_data_from_numpy(texts, binary_data=binary)
        outputs = [tc.InferRequestedOutput(o, binary_data=binary) for o in OUTPUTS]
        result = client.infer(exp["model"], [text], outputs=outputs,
                              parameters={"top_k": exp["top_k"]})
        check(result, exp, f"text binary={binary}")
        answers[binary] = result.as_numpy("probs")
        checks += 1
    # Raw FP32 and JSON: the same float32 values, row for row.
    assert answers[True].dtype == np.float32 and np.array_equal(
        answers[True], answers[False].astype(np.float32)), (answers[True], answers[False])
    text = tc.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(texts)
    for algorithm in ("gzip", "deflate"):  # Content-Encoding of the request; answers as is
        result = client.infer(exp["model"], [text], outputs=[
            tc.InferRequestedOutput(o) for o in OUTPUTS], parameters={"top_k": exp["top_k"]},
            request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
        check(result, exp, f"text {algorithm}")
        checks += 1
    vocab = exp["vocab"]
    rows = [[vocab.index(ch) for ch in t] for t in exp["texts"]]
    width = max(map(len, rows))
    ids = tc.InferInput("ids", [len(rows), width], "INT64")
    ids.set_data_from_numpy(np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64))
    lengths = tc.InferInput("lengths", [len(rows)], "INT64")
    lengths.set_data_from_numpy(np.array([len(r) for r in rows], dtype=np.int64))
    result = client.infer(exp["model"], [ids, lengths], outputs=[
        tc.InferRequestedOutput(o) for o in OUTPUTS], parameters={"top_k": exp["top_k"]})
    check(result, exp, "ids")
    checks += 1
    # The statistics extension: the 5 infers above, each of every text, as successes.
    after = successes()
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5 * len(exp["texts"])), after
    checks += 1
    # The schedule-policy timeout reaches the server (its expiry: test_http.py): 60 s bounds
    # nothing, a negative one is refused.
    result = client.infer(exp["model"], [text], outputs=[
        tc.InferRequestedOutput(o) for o in OUTPUTS], parameters={"top_k": exp["top_k"]},
        timeout=60_000_000)
    check(result, exp, "timeout 60 s")
    checks += 1
    for bad, fragment in ((lambda: client.get_model_metadata("no-such-model"), "not served"),
                          (lambda: client.infer(exp["model"], [_bad_text()]), "vocabulary"),
                          (lambda: client.infer(exp["model"], [text], timeout=-1),
                           "parameter timeout must be microseconds")):
        try:
            bad()
        except InferenceServerException as e:
            assert fragment in str(e), str(e)
            checks += 1
        else:
            raise AssertionError("expected an error")
    print(f"tritonclient[http] {version('tritonclient')}: {checks} checks passed")


def _bad_text() -> tc.InferInput:
    t = tc.InferInput("text", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"a~"], dtype=np.object_))
    return t


if __name__ == "__main__":
    main()
