"""Drives nextchar's model repository with the real Triton client (`tritonclient[grpc]`): the
repository index, readiness, inference on every model, statistics, unload and load.

    .venv-triton/bin/python tests/compat/triton_repository_check.py --url 127.0.0.1:50051 \
        --models gru-digits lstm-dna rnn-en --unload gru-digits

Runs in .venv-triton (tritonclient pins protobuf<7; it cannot import nextchar). Exits 0 after
printing one summary line; any mismatch raises.
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def infer_one(client: tc.InferenceServerClient, model: str) -> np.ndarray:
    meta = client.get_model_metadata(model)
    vocab_size = int(meta.outputs[0].shape[1])
    first_char = "A" if vocab_size == 4 else "1" if vocab_size < 20 else "a"
    text = tc.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([first_char.encode()], dtype=np.object_))
    result = client.infer(model, [text], outputs=[tc.InferRequestedOutput("probs")])
    probs = result.as_numpy("probs")
    assert probs.shape == (1, vocab_size), (model, probs.shape)
    assert abs(float(probs.sum()) - 1.0) < 1e-4, (model, probs.sum())
    return probs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--unload", required=True)
    args = p.parse_args()
    checks = 0
    with tc.InferenceServerClient(args.url) as client:
        index = client.get_model_repository_index(as_json=True)
        listed = sorted((m["name"], m.get("state")) for m in index.get("models", []))
        assert listed == [(m, "READY") for m in sorted(args.models)], listed
        checks += 1
        for model in args.models:
            assert client.is_model_ready(model), model
            infer_one(client, model)
            checks += 2
        stats = client.get_inference_statistics(model_name=args.models[0], as_json=True)
        (entry,) = stats["model_stats"]
        assert entry["name"] == args.models[0], entry
        assert int(entry["inference_count"]) >= 1 and int(entry["execution_count"]) >= 1, entry
        assert int(entry["inference_stats"]["success"]["count"]) >= 1, entry
        checks += 1
        client.unload_model(args.unload)
        assert not client.is_model_ready(args.unload)
        try:
            infer_one(client, args.unload)
        except InferenceServerException as e:
            # The hint names this protocol's way back, not only nextchar's own.
            assert "is not loaded" in e.message() and "RepositoryModelLoad" in e.message(), \
                e.message()
        else:
            raise AssertionError("an unloaded model answered")
        index = client.get_model_repository_index(as_json=True)
        states = {m["name"]: m.get("state") for m in index["models"]}
        assert states[args.unload] in ("UNAVAILABLE", "UNLOADING"), states
        checks += 3
        client.load_model(args.unload)
        assert client.is_model_ready(args.unload)
        infer_one(client, args.unload)
        checks += 2
        try:
            client.load_model("no-such-model")
        except InferenceServerException as e:
            assert "is not in the repository" in e.message(), e.message()
            checks += 1
        else:
            raise AssertionError("loading an unknown model succeeded")
    print(f"tritonclient {tc.__name__}: {checks} repository checks passed")


if __name__ == "__main__":
    main()
