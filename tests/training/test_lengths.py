"""Variable-length exactness: in a right-padded batch, every row's logits and final state equal
those of the same sequence run alone (<= 1e-5), in eager PyTorch, TorchScript and ONNX Runtime,
for every cell."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nextchar.training.export import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    _export_onnx,
    _trace,
    example_inputs,
)
from nextchar.training.model import CharRNN, CharRNNConfig

TOL = 1e-5


def _backends(model: CharRNN, tmp_path: Path):
    import onnxruntime as ort

    example = example_inputs(model.config, 3, 7, torch.Generator().manual_seed(0))
    ts_path, onnx_path = tmp_path / "m.ts", tmp_path / "m.onnx"
    _trace(model, example).save(str(ts_path))
    _export_onnx(model, example, onnx_path)
    scripted = torch.jit.load(str(ts_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def eager(ids, lengths, state):
        with torch.no_grad():
            return [t.numpy() for t in model(torch.from_numpy(ids), torch.from_numpy(lengths),
                                             torch.from_numpy(state))]

    def torchscript(ids, lengths, state):
        with torch.no_grad():
            return [t.numpy() for t in scripted(torch.from_numpy(ids), torch.from_numpy(lengths),
                                                torch.from_numpy(state))]

    def onnxruntime(ids, lengths, state):
        return session.run(OUTPUT_NAMES, dict(zip(INPUT_NAMES, (ids, lengths, state), strict=False)))

    return {"eager": eager, "torchscript": torchscript, "onnxruntime": onnxruntime}


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_each_row_equals_the_row_alone(cell: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = CharRNNConfig(vocab_size=11, embed_dim=6, hidden_size=10, num_layers=2, cell=cell)
    model = CharRNN(config).eval()
    generator = torch.Generator().manual_seed(1)
    for name, run in _backends(model, tmp_path).items():
        for batch, time in [(1, 1), (5, 9), (6, 16)]:
            ids, lengths, state = (t.numpy() for t in
                                   example_inputs(config, batch, time, generator))
            ids[ids == 0] = 3  # padding is never read: make it non-zero to prove it
            logits, state_out, position_logits = run(ids, lengths, state)
            for b in range(batch):
                n = int(lengths[b])
                alone = run(ids[b : b + 1, :n].copy(), lengths[b : b + 1].copy(),
                            state[:, b : b + 1].copy())
                np.testing.assert_allclose(logits[b], alone[0][0], atol=TOL, rtol=0,
                                           err_msg=f"{name} logits row {b}")
                np.testing.assert_allclose(state_out[:, b], alone[1][:, 0], atol=TOL, rtol=0,
                                           err_msg=f"{name} state row {b}")
                np.testing.assert_allclose(position_logits[b, :n], alone[2][0], atol=TOL,
                                           rtol=0, err_msg=f"{name} positions row {b}")
                assert not position_logits[b, n:].any(), f"{name}: logits past the end"
                # The last position's logits are the next-char logits.
                np.testing.assert_allclose(position_logits[b, n - 1], logits[b], atol=TOL,
                                           rtol=0)


def test_forward_train_matches_the_export_signature() -> None:
    torch.manual_seed(0)
    model = CharRNN(CharRNNConfig(vocab_size=7, embed_dim=4, hidden_size=8, num_layers=2,
                                  cell="lstm")).eval()
    ids = torch.randint(0, 7, (3, 5))
    state = torch.randn(4, 3, 8)
    with torch.no_grad():
        train_logits, train_state = model.forward_train(ids, state)
        logits, state_out, position_logits = model(ids, torch.full((3,), 5), state)
    torch.testing.assert_close(position_logits, train_logits)
    torch.testing.assert_close(state_out, train_state)
    torch.testing.assert_close(logits, train_logits[:, -1])
